package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
)

func (e *export) transmissionFlags() uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendTrim | tflagSendWriteZeroes)
	if e.readOnly {
		f |= tflagReadOnly
	}
	return f
}

var errAbort = errors.New("client aborted the handshake")

// handshake runs the fixed newstyle negotiation and returns the export the
// client chose, attached to c.
func (s *Server) handshake(br *bufio.Reader, nc net.Conn, c *conn) (*export, error) {
	bw := bufio.NewWriterSize(nc, 4096)
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], nbdMagic)
	binary.BigEndian.PutUint64(hello[8:], optMagic)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := nc.Write(hello[:]); err != nil {
		return nil, fmt.Errorf("sending greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(br, cf[:]); err != nil {
		return nil, fmt.Errorf("reading client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 {
		return nil, fmt.Errorf("client sent unknown flags %#x", clientFlags)
	}
	noZeroes := clientFlags&clientFlagNoZeroes != 0

	reply := func(opt, typ uint32, data []byte) {
		var h [20]byte
		binary.BigEndian.PutUint64(h[0:], optReplyMagic)
		binary.BigEndian.PutUint32(h[8:], opt)
		binary.BigEndian.PutUint32(h[12:], typ)
		binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
		bw.Write(h[:])
		bw.Write(data)
	}
	for {
		var h [16]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return nil, fmt.Errorf("reading option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(h[0:]); m != optMagic {
			return nil, fmt.Errorf("bad option magic %#x", m)
		}
		opt := binary.BigEndian.Uint32(h[8:])
		n := binary.BigEndian.Uint32(h[12:])
		if n > maxOptionLength {
			return nil, fmt.Errorf("option %d has %d bytes of data, the limit is %d", opt, n, maxOptionLength)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(br, data); err != nil {
			return nil, fmt.Errorf("reading data of option %d: %w", opt, err)
		}
		switch opt {
		case optExportName:
			e := s.lookup(string(data))
			if e == nil || !e.attach(c) {
				return nil, fmt.Errorf("client asked for unknown export %q", data)
			}
			out := make([]byte, 10, 10+124)
			binary.BigEndian.PutUint64(out[0:], uint64(e.dev.Size()))
			binary.BigEndian.PutUint16(out[8:], e.transmissionFlags())
			if !noZeroes {
				out = out[:10+124]
			}
			if _, err := nc.Write(out); err != nil {
				e.detach(c)
				return nil, fmt.Errorf("sending export %q: %w", e.name, err)
			}
			return e, nil
		case optAbort:
			reply(opt, repAck, nil)
			bw.Flush()
			return nil, errAbort
		case optList:
			if n != 0 {
				reply(opt, repErrInvalid, []byte("NBD_OPT_LIST takes no data"))
				break
			}
			for _, name := range s.names() {
				d := make([]byte, 4+len(name))
				binary.BigEndian.PutUint32(d, uint32(len(name)))
				copy(d[4:], name)
				reply(opt, repServer, d)
			}
			reply(opt, repAck, nil)
		case optInfo, optGo:
			name, infos, ok := parseInfoRequest(data)
			if !ok {
				reply(opt, repErrInvalid, []byte("malformed NBD_OPT_INFO/GO request"))
				break
			}
			e := s.lookup(name)
			if e == nil || (opt == optGo && !e.attach(c)) {
				reply(opt, repErrUnknown, fmt.Appendf(nil, "no export named %q", name))
				break
			}
			size := e.dev.Size()
			d := make([]byte, 12)
			binary.BigEndian.PutUint16(d[0:], infoExport)
			binary.BigEndian.PutUint64(d[2:], uint64(size))
			binary.BigEndian.PutUint16(d[10:], e.transmissionFlags())
			reply(opt, repInfo, d)
			for _, t := range infos {
				switch t {
				case infoName:
					d := make([]byte, 2+len(e.name))
					binary.BigEndian.PutUint16(d, infoName)
					copy(d[2:], e.name)
					reply(opt, repInfo, d)
				case infoBlockSize:
					d := make([]byte, 14)
					binary.BigEndian.PutUint16(d[0:], infoBlockSize)
					binary.BigEndian.PutUint32(d[2:], 1)
					binary.BigEndian.PutUint32(d[6:], 4096)
					binary.BigEndian.PutUint32(d[10:], MaxPayload)
					reply(opt, repInfo, d)
				}
			}
			reply(opt, repAck, nil)
			if opt == optGo {
				if err := bw.Flush(); err != nil {
					e.detach(c)
					return nil, fmt.Errorf("sending export %q: %w", e.name, err)
				}
				return e, nil
			}
		default: // including NBD_OPT_STRUCTURED_REPLY and NBD_OPT_STARTTLS
			reply(opt, repErrUnsup, fmt.Appendf(nil, "option %d is not supported", opt))
		}
		if err := bw.Flush(); err != nil {
			return nil, fmt.Errorf("replying to option %d: %w", opt, err)
		}
	}
}

// parseInfoRequest parses the data of NBD_OPT_INFO and NBD_OPT_GO.
func parseInfoRequest(d []byte) (name string, infos []uint16, ok bool) {
	if len(d) < 4 {
		return "", nil, false
	}
	nl := binary.BigEndian.Uint32(d)
	if nl > maxNameLength || uint64(len(d)) < 4+uint64(nl)+2 {
		return "", nil, false
	}
	name = string(d[4 : 4+nl])
	rest := d[4+nl:]
	cnt := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*cnt {
		return "", nil, false
	}
	for i := 0; i < cnt; i++ {
		infos = append(infos, binary.BigEndian.Uint16(rest[2*i:]))
	}
	return name, infos, true
}
