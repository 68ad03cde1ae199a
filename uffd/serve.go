package uffd

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/uffd/internal/uffdio"
)

// Serve accepts one VMM connection on lis (one restore), performs the
// handshake and serves the VMM's page faults until the VMM process exits
// or ctx ends. It returns nil when the VMM exits.
//
// A malformed handshake (bad JSON, no userfaultfd, a region that is
// unaligned, overlapping or beyond Memory.Size()) is rejected: the
// connection and descriptors are closed and an InvalidArgument error
// returned. If a block cannot be read from Memory, or ctx ends while the
// VMM still runs, the VMM process is killed (SIGKILL) before its
// userfaultfd is released, so it never runs on memory that was not served
// from the snapshot, and Serve returns the error (naming the offset) or
// ctx.Err(). Serve returns once in-flight reads have finished.
//
// The VMM's socket may be closed right after the handshake (Firecracker
// does so); the end of the restore is the exit of the peer process,
// observed through a pidfd. When no pidfd can be obtained, the socket's
// hang-up is used instead.
func (s *Server) Serve(ctx context.Context, lis *net.UnixListener) error {
	if !s.started.CompareAndSwap(false, true) {
		return status.Error(codes.FailedPrecondition, "uffd: Serve called twice on one Server")
	}
	conn, err := accept(ctx, lis)
	if err != nil {
		return err
	}
	defer conn.Close()
	p, err := s.handshake(ctx, conn)
	if err != nil {
		s.logf("rejected VMM handshake", "err", err)
		return err
	}
	defer p.close()
	return newSession(s, p).run(ctx, conn)
}

func accept(ctx context.Context, lis *net.UnixListener) (*net.UnixConn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { lis.SetDeadline(time.Unix(1, 0)) })
	conn, err := lis.AcceptUnix()
	if !stop() {
		lis.SetDeadline(time.Time{})
	}
	if err != nil {
		if conn != nil {
			conn.Close()
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, status.Errorf(codes.Unavailable, "accepting VMM connection on %s: %v", lis.Addr(), err)
	}
	return conn, nil
}

type region struct {
	idx       int
	base      uint64 // address in the VMM
	size      uint64
	off       uint64 // offset in Memory
	page      uint64
	block     uint64 // fetch granularity, a multiple of page
	populated bitset // pages installed in the VMM
	removed   bitset // pages released by the VMM: serve zeros next time
	// zeroCopy: UFFDIO_ZEROPAGE is refused here (hugetlb); zeros are
	// installed with UFFDIO_COPY instead.
	zeroCopy atomic.Bool
}

type bitset []uint64

func newBitset(n uint64) bitset            { return make(bitset, (n+63)/64) }
func (b bitset) get(i uint64) bool         { return b[i/64]&(1<<(i%64)) != 0 }
func (b bitset) set(i uint64)              { b[i/64] |= 1 << (i % 64) }
func (b bitset) clear(i uint64)            { b[i/64] &^= 1 << (i % 64) }
func (r *region) pageAddr(p uint64) uint64 { return r.base + p*r.page }
func (r *region) pageOff(p uint64) uint64  { return r.off + p*r.page }

type session struct {
	s       *Server
	p       *peer
	regions []*region
	sysPage uint64
	wake    chan struct{} // fatal error or VMM gone

	mu          sync.Mutex
	inflight    map[blockKey]*fetch
	removeEpoch uint64

	sem  chan struct{}
	wg   sync.WaitGroup
	done chan struct{}

	errMu sync.Mutex
	err   error
	gone  bool // the VMM's address space is gone (ESRCH)

	bufs sync.Pool

	zeroMu sync.Mutex
	zeros  []byte // never written
}

func newSession(s *Server, p *peer) *session {
	ss := &session{
		s:        s,
		p:        p,
		sysPage:  uint64(os.Getpagesize()),
		wake:     make(chan struct{}, 1),
		inflight: make(map[blockKey]*fetch),
		sem:      make(chan struct{}, s.opts.Parallelism),
		done:     make(chan struct{}),
	}
	for i, m := range p.regions {
		block := uint64(s.opts.ChunkSize)
		if block < m.PageSize {
			block = m.PageSize
		}
		block = (block + m.PageSize - 1) / m.PageSize * m.PageSize
		n := m.Size / m.PageSize
		ss.regions = append(ss.regions, &region{
			idx: i, base: m.BaseHostVirtAddr, size: m.Size, off: m.Offset,
			page: m.PageSize, block: block,
			populated: newBitset(n), removed: newBitset(n),
		})
	}
	return ss
}

func (ss *session) regionOf(addr uint64) *region {
	for _, r := range ss.regions {
		if addr >= r.base && addr-r.base < r.size {
			return r
		}
	}
	return nil
}

// fail records the first fatal error and wakes the event loop.
func (ss *session) fail(err error) {
	ss.errMu.Lock()
	if ss.err == nil {
		ss.err = err
	}
	ss.errMu.Unlock()
	ss.notify()
}

func (ss *session) markGone() {
	ss.errMu.Lock()
	ss.gone = true
	ss.errMu.Unlock()
	ss.notify()
}

func (ss *session) state() (bool, error) {
	ss.errMu.Lock()
	defer ss.errMu.Unlock()
	return ss.gone, ss.err
}

func (ss *session) notify() {
	select {
	case ss.wake <- struct{}{}:
	default:
	}
}

// run serves events until the VMM is gone, a fatal error occurs or ctx
// ends, then tears the session down. The userfaultfd and the pidfd are
// waited on through the runtime's poller, so a fault wakes a goroutine
// without handing a blocked thread's P around.
func (ss *session) run(ctx context.Context, conn *net.UnixConn) error {
	uf := os.NewFile(uintptr(ss.p.uffd), "userfaultfd")
	defer func() { uf.Close(); ss.p.uffd = -1 }()
	events := make(chan error, 1)
	go func() { events <- ss.readEvents(uf) }()

	exited := make(chan error, 1)
	var stopExit func()
	if ss.p.pidfd >= 0 {
		unix.SetNonblock(ss.p.pidfd, true)
		pf := os.NewFile(uintptr(ss.p.pidfd), "pidfd")
		defer func() { pf.Close(); ss.p.pidfd = -1 }()
		go func() { exited <- waitReadable(pf) }()
		stopExit = func() { pf.SetReadDeadline(time.Unix(1, 0)) }
	} else {
		// No pidfd: the socket's hang-up marks the VMM's exit.
		go func() { _, err := io.Copy(io.Discard, conn); exited <- err }()
		stopExit = func() { conn.SetReadDeadline(time.Unix(1, 0)) }
	}

	var err error
	eventsDone, exitDone := false, false
loop:
	for {
		select {
		case <-ctx.Done():
			err = ctx.Err()
			break loop
		case <-exited:
			exitDone = true
			break loop
		case err = <-events:
			eventsDone = true
			break loop
		case <-ss.wake:
			gone, ferr := ss.state()
			if ferr != nil {
				err = ferr
				break loop
			}
			if gone {
				break loop
			}
		}
	}
	if err == nil {
		if _, ferr := ss.state(); ferr != nil {
			err = ferr
		}
	}
	if err != nil {
		ss.killVMM(err)
	}
	if !eventsDone {
		uf.SetReadDeadline(time.Unix(1, 0))
		if rerr := <-events; err == nil {
			err = rerr
		}
	}
	if !exitDone {
		stopExit()
		<-exited
	}
	close(ss.done)
	ss.wg.Wait()
	return err
}

// waitReadable returns when f becomes readable (a pidfd: the process
// exited) or its read deadline passes.
func waitReadable(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Read(func(fd uintptr) bool {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, _ := unix.Poll(p, 0)
		return n > 0
	})
}

// readEvents reads and dispatches userfaultfd events until a fatal error
// or until uf's read deadline passes (returning nil).
func (ss *session) readEvents(uf *os.File) error {
	rc, err := uf.SyscallConn()
	if err != nil {
		return status.Errorf(codes.Internal, "waiting on userfaultfd: %v", err)
	}
	buf := make([]byte, 128*uffdio.MsgSize)
	var ferr error
	rerr := rc.Read(func(fd uintptr) bool {
		for {
			n, err := unix.Read(int(fd), buf)
			switch {
			case err == unix.EAGAIN:
				return false
			case err == unix.EINTR:
				continue
			case err != nil:
				ferr = status.Errorf(codes.Internal, "reading userfaultfd events: %v", err)
				return true
			case n == 0:
				return false
			}
			now := time.Now()
			for off := 0; off+uffdio.MsgSize <= n; off += uffdio.MsgSize {
				m := uffdio.ParseMsg(buf[off : off+uffdio.MsgSize])
				switch m.Event {
				case uffdio.EventPagefault:
					ss.s.c.faults.Add(1)
					if err := ss.onFault(m.Address, now); err != nil {
						ferr = err
						return true
					}
				case uffdio.EventRemove:
					ss.onRemove(m.Start, m.End)
				}
			}
		}
	})
	if ferr != nil {
		return ferr
	}
	if rerr != nil && !errors.Is(rerr, os.ErrDeadlineExceeded) {
		return status.Errorf(codes.Internal, "waiting on userfaultfd: %v", rerr)
	}
	return nil
}

// killVMM kills the VMM process so that it cannot run on memory this
// server did not provide, and waits briefly for it to die.
func (ss *session) killVMM(reason error) {
	p := ss.p
	var err error
	switch {
	case p.pidfd >= 0:
		err = unix.PidfdSendSignal(p.pidfd, unix.SIGKILL, nil, 0)
	case p.pid > 0:
		err = unix.Kill(p.pid, unix.SIGKILL)
	default:
		err = errors.New("VMM process unknown")
	}
	ss.s.logf("killing VMM: guest memory cannot be served", "pid", p.pid, "reason", reason, "killErr", err)
	if p.pidfd < 0 || err != nil {
		return
	}
	fds := []unix.PollFd{{Fd: int32(p.pidfd), Events: unix.POLLIN}}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		n, perr := unix.Poll(fds, int(time.Until(deadline)/time.Millisecond)+1)
		if perr == unix.EINTR {
			continue
		}
		if perr != nil || n > 0 {
			return
		}
	}
}
