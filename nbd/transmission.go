package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

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
