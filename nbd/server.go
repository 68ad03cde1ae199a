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
// never reaches the device. A request with a bad magic, an oversized WRITE
// or a truncated payload closes the connection without touching the device.
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
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
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

	reads, writes, flushes, trims, writeZeroes atomic.Int64
	bytesRead, bytesWritten, errs              atomic.Int64
	conns, activeConns                         atomic.Int64
}

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
	l := opts.Logger
	if l == nil {
		l = slog.New(slog.DiscardHandler)
	}
	return &Server{opts: opts, log: l, exports: make(map[string]*export)}
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
		c.nc.Close()
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

	wmu  sync.Mutex // serializes replies
	dead atomic.Bool
}

func (s *Server) handle(ctx context.Context, nc net.Conn) {
	c := &conn{s: s, nc: nc, done: make(chan struct{})}
	defer close(c.done)
	defer nc.Close()
	stop := context.AfterFunc(ctx, func() { nc.Close() })
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
			c.nc.Close()
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
			r.data = c.s.getBuf(int(r.length))
			if _, err := io.ReadFull(br, r.data); err != nil {
				c.s.putBuf(r.data)
				return fmt.Errorf("reading payload of WRITE of %d bytes at offset %d: %w", r.length, r.off, err)
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

// serve handles one request and sends its reply.
func (c *conn) serve(r request) {
	s, e := c.s, c.exp
	var payload []byte
	errno := c.execute(&r, &payload)
	if r.data != nil {
		s.putBuf(r.data)
	}
	if errno != 0 {
		s.errs.Add(1)
	}
	var h [16]byte
	binary.BigEndian.PutUint32(h[0:], replyMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], r.handle)
	c.wmu.Lock()
	var err error
	if errno == 0 && payload != nil {
		bufs := net.Buffers{h[:], payload}
		_, err = bufs.WriteTo(c.nc)
	} else {
		_, err = c.nc.Write(h[:])
	}
	c.wmu.Unlock()
	if payload != nil {
		s.putBuf(payload)
	}
	if err != nil && !c.dead.Swap(true) {
		s.log.Info("nbd: sending reply", "export", e.name, "remote", remote(c.nc), "err", err)
		c.nc.Close()
	}
}

// execute performs r on the device and returns the NBD error number; for a
// successful READ it sets *payload to a pooled buffer holding the data.
func (c *conn) execute(r *request, payload *[]byte) (errno uint32) {
	s, e := c.s, c.exp
	defer func() {
		if v := recover(); v != nil {
			s.log.Error("nbd: device panicked", "export", e.name, "command", r.typ, "offset", r.off, "length", r.length, "panic", v)
			*payload = nil
			errno = errIO
		}
	}()
	fail := func(op string, errno uint32, err error) uint32 {
		s.log.Warn("nbd: request failed", "export", e.name, "op", op, "offset", r.off, "length", r.length, "errno", errno, "err", err)
		return errno
	}
	inBounds := func() bool {
		size := uint64(e.dev.Size())
		return uint64(r.length) <= size && r.off <= size-uint64(r.length)
	}
	switch r.typ {
	case cmdRead:
		if r.length > MaxPayload {
			return fail("read", errInval, fmt.Errorf("READ of %d bytes exceeds the %d-byte limit", r.length, MaxPayload))
		}
		if !inBounds() {
			return fail("read", errInval, fmt.Errorf("READ past the end of the device (%d bytes)", e.dev.Size()))
		}
		buf := s.getBuf(int(r.length))
		n, err := e.dev.ReadAt(buf, int64(r.off))
		if err != nil && !(errors.Is(err, io.EOF) && n == len(buf)) {
			s.putBuf(buf)
			return fail("read", errnoFor(err), err)
		}
		*payload = buf
		s.reads.Add(1)
		s.bytesRead.Add(int64(r.length))
		return 0
	case cmdWrite:
		if e.readOnly {
			return fail("write", errPerm, errors.New("export is read-only"))
		}
		if !inBounds() {
			return fail("write", errInval, fmt.Errorf("WRITE past the end of the device (%d bytes)", e.dev.Size()))
		}
		if _, err := e.dev.WriteAt(r.data, int64(r.off)); err != nil {
			return fail("write", errnoFor(err), err)
		}
		if r.flags&cmdFlagFUA != 0 {
			if err := c.flush(); err != nil {
				return fail("write", errnoFor(err), err)
			}
		}
		s.writes.Add(1)
		s.bytesWritten.Add(int64(r.length))
		return 0
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
