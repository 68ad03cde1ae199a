package nbd

// Constants of the NBD protocol, as documented in
// https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.
const (
	nbdMagic      = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic      = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic = 0x0003e889045565a9
	requestMagic  = 0x25609513
	replyMagic    = 0x67446698

	// Handshake flags (server).
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	// Client flags.
	clientFlagFixedNewstyle = 1 << 0
	clientFlagNoZeroes      = 1 << 1

	// Transmission flags.
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6

	// Options.
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8

	// Option reply types.
	repAck        = 1
	repServer     = 2
	repInfo       = 3
	repFlagError  = 1 << 31
	repErrUnsup   = repFlagError | 1
	repErrInvalid = repFlagError | 3
	repErrUnknown = repFlagError | 6

	// Info types.
	infoExport    = 0
	infoName      = 1
	infoBlockSize = 3

	// Commands.
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6

	// Command flags.
	cmdFlagFUA = 1 << 0

	// Error values in simple replies.
	errPerm   = 1
	errIO     = 5
	errNoMem  = 12
	errInval  = 22
	errNoSpc  = 28
	errNotSup = 95
)

// MaxPayload is the largest READ or WRITE request the server accepts. A
// larger READ is answered with EINVAL; a larger WRITE closes the
// connection, since its payload cannot be trusted.
const MaxPayload = 32 << 20

// maxOptionLength bounds the data of one handshake option; a longer option
// closes the connection.
const maxOptionLength = 64 << 10

// maxNameLength bounds export names (the protocol's limit is 4096 bytes).
const maxNameLength = 4096
