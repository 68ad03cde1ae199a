// Package nbd serves block devices over the Network Block Device protocol,
// so that a VMM such as QEMU can use a lazily loaded, copy-on-write store as
// a disk (-drive file=nbd:unix:SOCK:exportname=NAME).
//
// The server speaks the fixed newstyle handshake with the options GO, INFO,
// EXPORT_NAME, LIST and ABORT; it declines STRUCTURED_REPLY and every other
// option with NBD_REP_ERR_UNSUP, so clients use simple replies. In the
// transmission phase it handles READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and
// DISCONNECT. Requests on one connection are handled concurrently and their
// replies are serialized. Every request is bounds-checked against the
// device's current size: a request outside it is answered with EINVAL and
// never reaches the device. A request with a bad magic or an oversized
// WRITE closes the connection without touching the device.
//
// Memory is bounded whatever clients do. No request may exceed MaxPayload
// (advertised as the maximum block size). A WRITE payload is buffered only
// when it is at most BufferedWriteMax bytes and fits the server-wide write
// buffer budget (Options.MaxWriteBuffer); otherwise it is streamed into the
// device as it arrives, piece by piece from the connection's read buffer.
// READ replies are buffered within a server-wide read budget
// (Options.MaxReadBuffer), a READ waiting for budget when it is spent. A
// client that stops sending a payload it announced, or stops reading its
// replies, for Options.StallTimeout is disconnected and its buffers freed.
// A buffered WRITE whose payload is truncated never reaches the device; a
// streamed one may have in part, which the protocol allows for a write that
// got no reply.
package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"
)

// Device is the storage behind an export. ReadAt and WriteAt may be called
// concurrently, for non-overlapping or overlapping ranges alike; the server
// never calls them outside [0, Size()).
type Device interface {
	io.ReaderAt
	io.WriterAt
	Size() int64
}

// Zeroer is implemented by devices that can turn a range into a hole.
// TRIM and WRITE_ZEROES call Zero when the device implements it, and write
// zeros through WriteAt otherwise. After Zero returns, the range must read
// as zeros.
type Zeroer interface {
	Zero(off, length int64) error
}

// Flusher is implemented by devices that can make completed writes
// durable. FLUSH, and WRITE with the FUA flag, call Flush when the device
// implements it; otherwise they succeed without doing anything.
type Flusher interface {
	Flush() error
}

// Options configures a Server. The zero value is usable.
type Options struct {
	// MaxInFlight bounds the requests handled concurrently on one
	// connection. Default 16.
	MaxInFlight int
	// HandshakeTimeout bounds the option negotiation of a new connection.
	// Default 10s.
	HandshakeTimeout time.Duration
	// MaxWriteBuffer bounds the bytes of WRITE payloads buffered at once,
	// across all connections. A WRITE that does not fit is streamed into
	// the device instead. Default DefaultMaxWriteBuffer.
	MaxWriteBuffer int64
	// MaxReadBuffer bounds the bytes of READ replies buffered at once,
	// across all connections (at least MaxPayload); a READ waits until it
	// fits. Default DefaultMaxReadBuffer.
	MaxReadBuffer int64
	// StallTimeout is how long a client may make no progress sending a
	// request's payload or reading a reply before it is disconnected.
	// Waiting between requests is not a stall. Default DefaultStallTimeout.
	StallTimeout time.Duration
	// Logger receives device errors and protocol violations. Nil discards
	// them.
	Logger *slog.Logger
}

// Stats counts what a Server has done since it was created.
type Stats struct {
	// Reads, Writes, Flushes, Trims and WriteZeroes count requests that
	// completed successfully.
	Reads, Writes, Flushes, Trims, WriteZeroes int64
	// BytesRead and BytesWritten count payload bytes of successful READ
	// and WRITE requests.
	BytesRead, BytesWritten int64
	// Errors counts requests answered with an error.
	Errors int64
	// StreamedWrites counts WRITE requests whose payload was streamed into
	// the device rather than buffered whole.
	StreamedWrites int64
	// Stalls counts connections closed because the client stopped sending
	// a payload or reading replies for StallTimeout.
	Stalls int64
	// Connections counts accepted connections; ActiveConnections those
	// still open.
	Connections, ActiveConnections int64
}

// Server serves named exports to NBD clients. Create it with NewServer.
type Server struct {
	opts  Options
	log   *slog.Logger
	pools [bufClasses]sync.Pool

	mu      sync.Mutex
	exports map[string]*export

	writeBudget, readBudget *semaphore.Weighted

	reads, writes, flushes, trims, writeZeroes atomic.Int64
	bytesRead, bytesWritten, errs              atomic.Int64
	streamedWrites, stalls                     atomic.Int64
	conns, activeConns                         atomic.Int64
}

// Defaults of Options.
const (
	DefaultMaxWriteBuffer = 64 << 20
	DefaultMaxReadBuffer  = 128 << 20
	DefaultStallTimeout   = 30 * time.Second
)

// BufferedWriteMax is the largest WRITE payload the server buffers whole
// (so that it runs concurrently with the connection's other requests);
// larger ones are streamed into the device as they arrive.
const BufferedWriteMax = 1 << 20

type export struct {
	name     string
	dev      Device
	readOnly bool

	mu      sync.Mutex
	removed bool
	conns   map[*conn]struct{}
}

// NewServer returns a server with no exports.
func NewServer(opts Options) *Server {
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = 16
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = 10 * time.Second
	}
	if opts.MaxWriteBuffer <= 0 {
		opts.MaxWriteBuffer = DefaultMaxWriteBuffer
	}
	if opts.MaxReadBuffer <= 0 {
		opts.MaxReadBuffer = DefaultMaxReadBuffer
	}
	opts.MaxReadBuffer = max(opts.MaxReadBuffer, MaxPayload)
	if opts.StallTimeout <= 0 {
		opts.StallTimeout = DefaultStallTimeout
	}
	l := opts.Logger
	if l == nil {
		l = slog.New(slog.DiscardHandler)
	}
	return &Server{
		opts: opts, log: l, exports: make(map[string]*export),
		writeBudget: semaphore.NewWeighted(opts.MaxWriteBuffer),
		readBudget:  semaphore.NewWeighted(opts.MaxReadBuffer),
	}
}

// AddExport makes d available under name. A read-only export refuses
// WRITE, TRIM and WRITE_ZEROES with EPERM and advertises itself read-only.
// It is an error if name is already exported or longer than 4096 bytes.
func (s *Server) AddExport(name string, d Device, readOnly bool) error {
	if len(name) > maxNameLength {
		return fmt.Errorf("adding NBD export %.40q...: name is %d bytes, the limit is %d", name, len(name), maxNameLength)
	}
	if d == nil {
		return fmt.Errorf("adding NBD export %q: nil device", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exports[name]; ok {
		return fmt.Errorf("adding NBD export %q: already exported", name)
	}
	s.exports[name] = &export{name: name, dev: d, readOnly: readOnly, conns: make(map[*conn]struct{})}
	return nil
}

// RemoveExport withdraws an export: new clients no longer see it, its open
// connections are closed, and RemoveExport returns once their in-flight
// requests have finished, so the device is not used after it returns. It
// must not be called from within the device's own methods. Removing an
// unknown name does nothing.
func (s *Server) RemoveExport(name string) {
	s.mu.Lock()
	e := s.exports[name]
	delete(s.exports, name)
	s.mu.Unlock()
	if e == nil {
		return
	}
	e.mu.Lock()
	e.removed = true
	conns := make([]*conn, 0, len(e.conns))
	for c := range e.conns {
		conns = append(conns, c)
	}
	e.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
	for _, c := range conns {
		<-c.done
	}
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	return Stats{
		Reads:             s.reads.Load(),
		Writes:            s.writes.Load(),
		Flushes:           s.flushes.Load(),
		Trims:             s.trims.Load(),
		WriteZeroes:       s.writeZeroes.Load(),
		BytesRead:         s.bytesRead.Load(),
		BytesWritten:      s.bytesWritten.Load(),
		Errors:            s.errs.Load(),
		StreamedWrites:    s.streamedWrites.Load(),
		Stalls:            s.stalls.Load(),
		Connections:       s.conns.Load(),
		ActiveConnections: s.activeConns.Load(),
	}
}

// Serve accepts connections on lis (a Unix socket or a TCP listener) until
// ctx ends or lis fails. It closes lis, then closes every connection it
// accepted and waits for their goroutines before returning. It returns
// ctx.Err() when ctx ended, else the error that stopped accepting.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	stop := context.AfterFunc(ctx, func() { lis.Close() })
	defer stop()
	defer lis.Close()

	var delay time.Duration
	for {
		nc, err := lis.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if retryableAccept(err) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("nbd: accepting a connection", "addr", lis.Addr().String(), "err", err, "retry_in", delay)
				select {
				case <-time.After(delay):
					continue
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			return fmt.Errorf("accepting NBD connections on %s: %w", lis.Addr(), err)
		}
		delay = 0
		s.conns.Add(1)
		s.activeConns.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer s.activeConns.Add(-1)
			s.handle(ctx, nc)
		}()
	}
}

func retryableAccept(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.ENOBUFS) ||
		errors.Is(err, syscall.ENOMEM)
}

// conn is one client connection in the transmission phase.
type conn struct {
	s    *Server
	nc   net.Conn
	exp  *export
	done chan struct{} // closed when the connection's goroutines have ended

	// ctx ends when the connection is closed; requests waiting for buffer
	// budget stop waiting then.
	ctx    context.Context
	cancel context.CancelFunc

	wmu  sync.Mutex // serializes replies
	dead atomic.Bool
}

// close closes the connection and ends its context.
func (c *conn) close() {
	c.cancel()
	c.nc.Close()
}

func (s *Server) handle(ctx context.Context, nc net.Conn) {
	cctx, cancel := context.WithCancel(ctx)
	c := &conn{s: s, nc: nc, done: make(chan struct{}), ctx: cctx, cancel: cancel}
	defer close(c.done)
	defer c.close()
	stop := context.AfterFunc(ctx, func() { c.close() })
	defer stop()

	br := bufio.NewReaderSize(nc, 64<<10)
	nc.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	exp, err := s.handshake(br, nc, c)
	if err != nil {
		if !errors.Is(err, errAbort) && ctx.Err() == nil {
			s.log.Info("nbd: handshake ended", "remote", remote(nc), "err", err)
		}
		return
	}
	defer exp.detach(c)
	nc.SetDeadline(time.Time{})
	if err := c.transmit(br); err != nil && !errors.Is(err, io.EOF) && ctx.Err() == nil {
		s.log.Info("nbd: connection closed", "export", exp.name, "remote", remote(nc), "err", err)
	}
}

func remote(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return nc.LocalAddr().String()
}

func (e *export) attach(c *conn) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.removed {
		return false
	}
	e.conns[c] = struct{}{}
	c.exp = e
	return true
}

func (e *export) detach(c *conn) {
	e.mu.Lock()
	delete(e.conns, c)
	e.mu.Unlock()
}

func (s *Server) lookup(name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.exports[name]; ok {
		return e
	}
	if name == "" && len(s.exports) == 1 {
		for _, e := range s.exports {
			return e
		}
	}
	return nil
}

func (s *Server) names() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.exports))
	for n := range s.exports {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

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

type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	off    uint64
	length uint32
	data   []byte // WRITE payload, from the buffer pool
	budget int64  // bytes of writeBudget held for data
}

// errStalled marks a connection closed because its client stopped sending
// a payload or reading replies.
var errStalled = errors.New("client stalled")

// stallReader reads from the connection's buffered reader, allowing
// StallTimeout for each read to make progress.
type stallReader struct {
	c  *conn
	br *bufio.Reader
}

func (r stallReader) Read(p []byte) (int, error) {
	r.c.nc.SetReadDeadline(time.Now().Add(r.c.s.opts.StallTimeout))
	n, err := r.br.Read(p)
	return n, r.c.stalled(err)
}

// stalled turns a deadline error into errStalled (counting the stall).
func (c *conn) stalled(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		c.s.stalls.Add(1)
		return fmt.Errorf("%w: no progress for %v", errStalled, c.s.opts.StallTimeout)
	}
	return err
}

// awaitPayload waits (at most StallTimeout) until some of a payload has
// arrived, so that no buffer is taken for a client that sent only a header.
func (c *conn) awaitPayload(br *bufio.Reader) error {
	c.nc.SetReadDeadline(time.Now().Add(c.s.opts.StallTimeout))
	_, err := br.Peek(1)
	return c.stalled(err)
}

// transmit reads requests until the client disconnects or misbehaves, and
// returns after every request it started has been answered.
func (c *conn) transmit(br *bufio.Reader) (err error) {
	var wg sync.WaitGroup
	defer wg.Wait()
	defer func() {
		// A client that broke the protocol or went away gets no more
		// replies: closing first keeps a request blocked on sending its
		// reply from holding the connection open.
		if err != nil {
			c.dead.Store(true)
			c.close()
		}
	}()
	sem := make(chan struct{}, c.s.opts.MaxInFlight)
	for {
		var h [28]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return io.EOF // the client went away between requests
			}
			return fmt.Errorf("reading request header: %w", err)
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != requestMagic {
			return fmt.Errorf("bad request magic %#x", m)
		}
		r := request{
			flags:  binary.BigEndian.Uint16(h[4:]),
			typ:    binary.BigEndian.Uint16(h[6:]),
			handle: binary.BigEndian.Uint64(h[8:]),
			off:    binary.BigEndian.Uint64(h[16:]),
			length: binary.BigEndian.Uint32(h[24:]),
		}
		switch r.typ {
		case cmdDisc:
			return nil
		case cmdWrite:
			if r.length > MaxPayload {
				return fmt.Errorf("WRITE of %d bytes at offset %d exceeds the %d-byte limit", r.length, r.off, MaxPayload)
			}
			buffered, err := c.readPayload(br, &r)
			if err != nil {
				return err
			}
			if !buffered {
				// Streamed in the reading goroutine: no buffer beyond the
				// connection's read buffer, whatever the length.
				sem <- struct{}{}
				err := c.streamWrite(br, &r)
				<-sem
				if err != nil {
					return err
				}
				continue
			}
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c.serve(r)
		}()
	}
}

// readPayload reads a WRITE's payload into a pooled buffer when it is at
// most BufferedWriteMax bytes and fits the write budget, once some of it has
// arrived; it reports false (nothing read) when the payload is to be
// streamed instead. An error closes the connection.
func (c *conn) readPayload(br *bufio.Reader, r *request) (bool, error) {
	if r.length == 0 {
		r.data = []byte{}
		return true, nil
	}
	if r.length > BufferedWriteMax {
		return false, nil
	}
	if err := c.awaitPayload(br); err != nil {
		return false, fmt.Errorf("reading payload of WRITE of %d bytes at offset %d: %w", r.length, r.off, err)
	}
	n := int64(r.length)
	if !c.s.writeBudget.TryAcquire(n) {
		return false, nil
	}
	r.data = c.s.getBuf(int(r.length))
	if _, err := io.ReadFull(stallReader{c, br}, r.data); err != nil {
		c.s.putBuf(r.data)
		r.data = nil
		c.s.writeBudget.Release(n)
		return false, fmt.Errorf("reading payload of WRITE of %d bytes at offset %d: %w", r.length, r.off, err)
	}
	c.nc.SetReadDeadline(time.Time{})
	r.budget = n
	return true, nil
}

// streamWrite executes a WRITE whose payload is still on the connection:
// each piece that has arrived is written to the device straight from the
// read buffer. A payload for a refused request is read and dropped. It
// replies, and returns an error (closing the connection) only when the
// payload cannot be read.
func (c *conn) streamWrite(br *bufio.Reader, r *request) error {
	s := c.s
	s.streamedWrites.Add(1)
	errno := c.checkWrite(r)
	off, left := int64(r.off), int64(r.length)
	for left > 0 {
		if err := c.awaitPayload(br); err != nil {
			return fmt.Errorf("reading payload of WRITE of %d bytes at offset %d, %d bytes short: %w", r.length, r.off, left, err)
		}
		piece, _ := br.Peek(int(min(left, int64(br.Buffered()))))
		if errno == 0 {
			errno = c.devWrite(r, piece, off)
		}
		br.Discard(len(piece))
		off += int64(len(piece))
		left -= int64(len(piece))
	}
	c.nc.SetReadDeadline(time.Time{})
	if errno == 0 {
		errno = c.finishWrite(r)
	}
	c.reply(r, errno, nil)
	return nil
}

// checkWrite returns the error number refusing a WRITE, 0 if it may run.
func (c *conn) checkWrite(r *request) uint32 {
	e := c.exp
	if e.readOnly {
		return c.fail(r, "write", errPerm, errors.New("export is read-only"))
	}
	if !c.inBounds(r) {
		return c.fail(r, "write", errInval, fmt.Errorf("WRITE past the end of the device (%d bytes)", e.dev.Size()))
	}
	return 0
}

// devWrite writes p at off, turning an error or a panic of the device into
// an error number.
func (c *conn) devWrite(r *request, p []byte, off int64) (errno uint32) {
	defer func() {
		if v := recover(); v != nil {
			c.s.log.Error("nbd: device panicked", "export", c.exp.name, "command", r.typ, "offset", off, "length", len(p), "panic", v)
			errno = errIO
		}
	}()
	if _, err := c.exp.dev.WriteAt(p, off); err != nil {
		return c.fail(r, "write", errnoFor(err), err)
	}
	return 0
}

// finishWrite flushes a FUA write and counts it.
func (c *conn) finishWrite(r *request) uint32 {
	if r.flags&cmdFlagFUA != 0 {
		if err := c.flush(); err != nil {
			return c.fail(r, "write", errnoFor(err), err)
		}
	}
	c.s.writes.Add(1)
	c.s.bytesWritten.Add(int64(r.length))
	return 0
}

func (c *conn) fail(r *request, op string, errno uint32, err error) uint32 {
	c.s.log.Warn("nbd: request failed", "export", c.exp.name, "op", op, "offset", r.off, "length", r.length, "errno", errno, "err", err)
	return errno
}

func (c *conn) inBounds(r *request) bool {
	size := uint64(c.exp.dev.Size())
	return uint64(r.length) <= size && r.off <= size-uint64(r.length)
}

// serve handles one request and sends its reply.
func (c *conn) serve(r request) {
	s := c.s
	var payload []byte
	var held int64 // readBudget bytes held for payload
	errno := c.execute(&r, &payload, &held)
	if r.data != nil {
		s.putBuf(r.data)
		s.writeBudget.Release(r.budget)
	}
	c.reply(&r, errno, payload)
	if payload != nil {
		s.putBuf(payload)
	}
	if held > 0 {
		s.readBudget.Release(held)
	}
}

// reply sends a simple reply, with payload for a successful READ; a client
// that does not take it within StallTimeout is disconnected.
func (c *conn) reply(r *request, errno uint32, payload []byte) {
	s, e := c.s, c.exp
	if errno != 0 {
		s.errs.Add(1)
	}
	var h [16]byte
	binary.BigEndian.PutUint32(h[0:], replyMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], r.handle)
	c.wmu.Lock()
	c.nc.SetWriteDeadline(time.Now().Add(s.opts.StallTimeout))
	var err error
	if errno == 0 && payload != nil {
		bufs := net.Buffers{h[:], payload}
		_, err = bufs.WriteTo(c.nc)
	} else {
		_, err = c.nc.Write(h[:])
	}
	c.wmu.Unlock()
	if err != nil && !c.dead.Swap(true) {
		err = c.stalled(err)
		s.log.Info("nbd: sending reply", "export", e.name, "remote", remote(c.nc), "err", err)
		c.close()
	}
}

// execute performs r on the device and returns the NBD error number; for a
// successful READ it sets *payload to a pooled buffer holding the data and
// *held to the read budget it holds for it.
func (c *conn) execute(r *request, payload *[]byte, held *int64) (errno uint32) {
	s, e := c.s, c.exp
	defer func() {
		if v := recover(); v != nil {
			s.log.Error("nbd: device panicked", "export", e.name, "command", r.typ, "offset", r.off, "length", r.length, "panic", v)
			if *payload != nil {
				s.putBuf(*payload)
			}
			*payload = nil
			errno = errIO
		}
	}()
	fail := func(op string, errno uint32, err error) uint32 { return c.fail(r, op, errno, err) }
	inBounds := func() bool { return c.inBounds(r) }
	switch r.typ {
	case cmdRead:
		if r.length > MaxPayload {
			return fail("read", errInval, fmt.Errorf("READ of %d bytes exceeds the %d-byte limit", r.length, MaxPayload))
		}
		if !inBounds() {
			return fail("read", errInval, fmt.Errorf("READ past the end of the device (%d bytes)", e.dev.Size()))
		}
		if err := s.readBudget.Acquire(c.ctx, int64(r.length)); err != nil {
			return fail("read", errIO, fmt.Errorf("waiting for read buffer budget: %w", err))
		}
		*held = int64(r.length)
		buf := s.getBuf(int(r.length))
		*payload = buf
		n, err := e.dev.ReadAt(buf, int64(r.off))
		if err != nil && !(errors.Is(err, io.EOF) && n == len(buf)) {
			s.putBuf(buf)
			*payload = nil
			return fail("read", errnoFor(err), err)
		}
		s.reads.Add(1)
		s.bytesRead.Add(int64(r.length))
		return 0
	case cmdWrite:
		if errno := c.checkWrite(r); errno != 0 {
			return errno
		}
		if errno := c.devWrite(r, r.data, int64(r.off)); errno != 0 {
			return errno
		}
		return c.finishWrite(r)
	case cmdFlush:
		if err := c.flush(); err != nil {
			return fail("flush", errnoFor(err), err)
		}
		s.flushes.Add(1)
		return 0
	case cmdTrim, cmdWriteZeroes:
		op := "trim"
		if r.typ == cmdWriteZeroes {
			op = "write_zeroes"
		}
		if e.readOnly {
			return fail(op, errPerm, errors.New("export is read-only"))
		}
		if !inBounds() {
			return fail(op, errInval, fmt.Errorf("%s past the end of the device (%d bytes)", op, e.dev.Size()))
		}
		const noHole = 1 << 1
		z, ok := e.dev.(Zeroer)
		var err error
		if ok && !(r.typ == cmdWriteZeroes && r.flags&noHole != 0) {
			err = z.Zero(int64(r.off), int64(r.length))
		} else {
			err = writeZeros(e.dev, int64(r.off), int64(r.length))
		}
		if err == nil && r.flags&cmdFlagFUA != 0 {
			err = c.flush()
		}
		if err != nil {
			return fail(op, errnoFor(err), err)
		}
		if r.typ == cmdTrim {
			s.trims.Add(1)
		} else {
			s.writeZeroes.Add(1)
		}
		return 0
	default:
		return fail("unknown", errInval, fmt.Errorf("unknown command %d", r.typ))
	}
}

func (c *conn) flush() error {
	if f, ok := c.exp.dev.(Flusher); ok {
		return f.Flush()
	}
	return nil
}

// zeros is a read-only source for writing zeros.
var zeros = make([]byte, 1<<20)

func writeZeros(d Device, off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(zeros)))
		if _, err := d.WriteAt(zeros[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// errnoFor maps a device error onto an NBD error number.
func errnoFor(err error) uint32 {
	var en syscall.Errno
	if errors.As(err, &en) {
		switch en {
		case syscall.EPERM, syscall.EROFS, syscall.EACCES:
			return errPerm
		case syscall.ENOSPC, syscall.EFBIG, syscall.EDQUOT:
			return errNoSpc
		case syscall.ENOMEM:
			return errNoMem
		case syscall.EINVAL:
			return errInval
		case syscall.EOPNOTSUPP:
			return errNotSup
		}
	}
	return errIO
}

// Buffers come from per-size-class pools, from 4 KiB to MaxPayload.
const (
	minBufShift = 12
	bufClasses  = 26 - minBufShift
)

func bufClass(n int) int {
	c := bits.Len(uint(n-1)) - minBufShift
	return max(c, 0)
}

func (s *Server) getBuf(n int) []byte {
	if n == 0 {
		return []byte{}
	}
	c := bufClass(n)
	if p, ok := s.pools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+minBufShift))
}

func (s *Server) putBuf(b []byte) {
	if cap(b) == 0 {
		return
	}
	c := bufClass(cap(b))
	if cap(b) != 1<<(c+minBufShift) {
		return
	}
	b = b[:cap(b)]
	s.pools[c].Put(&b)
}
