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
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
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
