package uffd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

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

type blockKey struct {
	region int
	block  uint64 // Memory offset / region.block
}

type pendingFault struct {
	addr uint64
	t0   time.Time
}

type fetch struct {
	pending []pendingFault
}

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

// onFault starts (or joins) the fetch of the block containing addr.
func (ss *session) onFault(addr uint64, t0 time.Time) error {
	r := ss.regionOf(addr)
	if r == nil {
		return status.Errorf(codes.InvalidArgument, "page fault at address %#x outside every region of the handshake", addr)
	}
	pg := (addr - r.base) / r.page
	pageStart := r.pageAddr(pg)
	ss.mu.Lock()
	if r.populated.get(pg) {
		ss.mu.Unlock()
		// Installed after this fault was queued: make sure it is woken.
		if err := uffdio.Wake(ss.p.uffd, pageStart, r.page); err != nil && err != unix.ESRCH {
			return status.Errorf(codes.Internal, "UFFDIO_WAKE at address %#x (offset %d): %v", pageStart, r.pageOff(pg), err)
		}
		ss.s.c.wakes.Add(1)
		ss.s.c.observe(time.Since(t0))
		return nil
	}
	key := blockKey{region: r.idx, block: r.pageOff(pg) / r.block}
	if f, ok := ss.inflight[key]; ok {
		f.pending = append(f.pending, pendingFault{pageStart, t0})
		ss.mu.Unlock()
		return nil
	}
	select {
	case <-ss.done:
		ss.mu.Unlock()
		return nil
	default:
	}
	f := &fetch{pending: []pendingFault{{pageStart, t0}}}
	ss.inflight[key] = f
	ss.wg.Add(1)
	ss.mu.Unlock()
	go ss.fetchBlock(r, key, f)
	return nil
}

// onRemove records that the VMM released [start, end): those pages are
// missing again and must be served as zeros, not re-read.
func (ss *session) onRemove(start, end uint64) {
	ss.s.c.removes.Add(1)
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.removeEpoch++
	for _, r := range ss.regions {
		lo, hi := max(start, r.base), min(end, r.base+r.size)
		if lo >= hi {
			continue
		}
		p0 := (lo - r.base) / r.page
		p1 := (hi - r.base + r.page - 1) / r.page
		for p := p0; p < p1; p++ {
			r.removed.set(p)
			r.populated.clear(p)
		}
		ss.s.c.removedPages.Add(p1 - p0)
	}
}

// run of pages [p0, p0+n) in one region, served as zeros or from Memory.
type run struct {
	p0, n uint64
	zero  bool
}

func (ss *session) fetchBlock(r *region, key blockKey, f *fetch) {
	defer ss.wg.Done()
	select {
	case ss.sem <- struct{}{}:
	case <-ss.done:
		ss.mu.Lock()
		delete(ss.inflight, key)
		ss.mu.Unlock()
		return
	}
	defer func() { <-ss.sem }()

	// The block's pages: [blockStart, blockEnd) of Memory, clipped to the region.
	bs := max(key.block*r.block, r.off)
	be := min(key.block*r.block+r.block, r.off+r.size)
	p0, p1 := (bs-r.off)/r.page, (be-r.off)/r.page

	ss.mu.Lock()
	epoch := ss.removeEpoch
	need := make([]int8, p1-p0) // 0: populated, 1: data, 2: zero
	for p := p0; p < p1; p++ {
		switch {
		case r.populated.get(p):
		case r.removed.get(p):
			need[p-p0] = 2
		default:
			need[p-p0] = 1
		}
	}
	ss.mu.Unlock()
	if h := ss.s.holes; h != nil {
		for i := range need {
			if need[i] == 1 && ss.isHole(h, r.pageOff(p0+uint64(i)), r.page) {
				need[i] = 2
			}
		}
	}
	var runs []run
	for i := 0; i < len(need); {
		if need[i] == 0 {
			i++
			continue
		}
		j := i
		for j < len(need) && need[j] == need[i] {
			j++
		}
		runs = append(runs, run{p0: p0 + uint64(i), n: uint64(j - i), zero: need[i] == 2})
		i = j
	}

	installed := make([]bool, p1-p0) // pages this fetch installed (their waiters are woken)
	err := ss.serveRuns(r, p0, runs, installed)
	if err != nil && !errors.Is(err, errGone) {
		ss.fail(err)
	}

	ss.mu.Lock()
	delete(ss.inflight, key)
	for i, ok := range installed {
		p := p0 + uint64(i)
		if !ok {
			continue
		}
		if ss.removeEpoch != epoch && r.removed.get(p) {
			continue // released while being installed: serve zeros next time
		}
		r.populated.set(p)
		r.removed.clear(p)
	}
	pending := f.pending
	ss.mu.Unlock()

	if err != nil {
		if errors.Is(err, errGone) {
			ss.markGone()
		}
		return
	}
	for _, pf := range pending {
		pg := (pf.addr - r.base) / r.page
		if pg >= p0 && pg < p1 && installed[pg-p0] {
			ss.s.c.observe(time.Since(pf.t0))
			continue
		}
		// Not installed by this fetch (already present, or released
		// meanwhile): resolve it afresh.
		if err := ss.onFault(pf.addr, pf.t0); err != nil {
			ss.fail(err)
			return
		}
	}
}

func (ss *session) isHole(h HoleChecker, off, n uint64) bool {
	for o := off; o < off+n; o += ss.sysPage {
		if !h.IsHole(int64(o)) {
			return false
		}
	}
	return true
}

var errGone = errors.New("VMM address space is gone")

func (ss *session) getBuf(n uint64) []byte {
	if b, ok := ss.bufs.Get().(*[]byte); ok && uint64(cap(*b)) >= n {
		return (*b)[:n]
	}
	return make([]byte, n)
}

func (ss *session) putBuf(b []byte) { ss.bufs.Put(&b) }

// serveRuns reads the data runs from Memory in one span and installs every
// run. installed[i] reports pages (relative to the first run's block start)
// this call installed, indexed from the block's first page blockP0.
func (ss *session) serveRuns(r *region, blockP0 uint64, runs []run, installed []bool) error {
	if len(runs) == 0 {
		return nil
	}
	// Read all data runs with one ReadAt over their span.
	var d0, d1 uint64
	first := true
	for _, rn := range runs {
		if rn.zero {
			continue
		}
		if first {
			d0, first = rn.p0, false
		}
		d1 = rn.p0 + rn.n
	}
	var data []byte
	if !first {
		off := r.pageOff(d0)
		data = ss.getBuf((d1 - d0) * r.page)
		defer ss.putBuf(data)
		n, err := ss.s.mem.ReadAt(data, int64(off))
		ss.s.c.fetches.Add(1)
		ss.s.c.bytesRead.Add(uint64(n))
		if n == len(data) && err == io.EOF {
			err = nil
		}
		if err == nil && n < len(data) {
			err = status.Errorf(codes.Internal, "short read: %d of %d bytes", n, len(data))
		}
		if err != nil {
			return fmt.Errorf("reading guest memory at offset %d (%d bytes, region %d, address %#x) for a page fault: %w",
				off, len(data), r.idx, r.pageAddr(d0), err)
		}
	}
	for _, rn := range runs {
		var err error
		if rn.zero {
			err = ss.installZero(r, rn, installed[rn.p0-blockP0:])
		} else {
			src := data[(rn.p0-d0)*r.page : (rn.p0-d0+rn.n)*r.page]
			err = ss.installCopy(r, rn, src, installed[rn.p0-blockP0:], false)
		}
		if err != nil {
			return err
		}
	}
	// Pages were installed without waking their waiters: wake them once
	// the whole block is in, so that a thread touching its way through
	// the block does not fault again on a page still being installed.
	lo, last := runs[0].p0, runs[len(runs)-1]
	if err := uffdio.Wake(ss.p.uffd, r.pageAddr(lo), (last.p0+last.n-lo)*r.page); err != nil {
		if err == unix.ESRCH {
			return errGone
		}
		return status.Errorf(codes.Internal, "UFFDIO_WAKE at address %#x (offset %d): %v", r.pageAddr(lo), r.pageOff(lo), err)
	}
	return nil
}

const maxRetries = 1000

// installCopy installs src at the run's pages with UFFDIO_COPY, skipping
// pages that already exist. zero says src is zeros (counted as zero pages).
func (ss *session) installCopy(r *region, rn run, src []byte, installed []bool, zero bool) error {
	dst := r.pageAddr(rn.p0)
	total := rn.n * r.page
	var done uint64
	retries := 0
	for done < total {
		n, err := uffdio.Copy(ss.p.uffd, dst+done, unsafe.Pointer(&src[done]), total-done, uffdio.CopyModeDontwake)
		runtime.KeepAlive(src)
		if n > 0 {
			for p := done / r.page; p < (done+uint64(n))/r.page; p++ {
				installed[p] = true
			}
			if zero {
				ss.s.c.zeroPages.Add(uint64(n) / r.page)
			} else {
				ss.s.c.pagesCopied.Add(uint64(n) / r.page)
				ss.s.c.bytesCopied.Add(uint64(n))
			}
			done += uint64(n)
		}
		switch err {
		case nil:
			if n <= 0 {
				return status.Errorf(codes.Internal, "UFFDIO_COPY at address %#x (offset %d) made no progress", dst+done, r.off+(dst+done-r.base))
			}
		case unix.EEXIST:
			// Present already: skip it, but count it as in place, so
			// that the block's wake covers its waiters and a later fault
			// on it is only woken, never fetched again (a fetch that
			// finds it present again would wake no one).
			installed[done/r.page] = true
			done += r.page
		case unix.EAGAIN, unix.ENOENT, unix.EINTR:
			if retries++; retries > maxRetries {
				return status.Errorf(codes.Internal, "UFFDIO_COPY at address %#x (offset %d): %v after %d retries", dst+done, r.off+(dst+done-r.base), err, maxRetries)
			}
			runtime.Gosched()
		case unix.ESRCH:
			return errGone
		default:
			return status.Errorf(codes.Internal, "UFFDIO_COPY at address %#x (offset %d, %d bytes, %d-byte pages): %v", dst+done, r.off+(dst+done-r.base), total-done, r.page, err)
		}
	}
	return nil
}

// zeroSource returns n bytes of zeros that are never written, shared by
// every zero copy of the session.
func (ss *session) zeroSource(n uint64) []byte {
	ss.zeroMu.Lock()
	defer ss.zeroMu.Unlock()
	if uint64(len(ss.zeros)) < n {
		ss.zeros = make([]byte, n)
	}
	return ss.zeros[:n]
}

// installZero installs zero pages over the run with UFFDIO_ZEROPAGE where
// the kernel allows it. Regions where it does not (hugetlb: the kernel
// answers EINVAL, having no huge zero page) get a UFFDIO_COPY from a zero
// buffer, one page at a time so the buffer stays one page long.
func (ss *session) installZero(r *region, rn run, installed []bool) error {
	if !r.zeroCopy.Load() {
		err := ss.installZeropage(r, rn, installed)
		if !errors.Is(err, errNoZeropage) {
			return err
		}
		r.zeroCopy.Store(true)
	}
	zero := ss.zeroSource(r.page)
	for i := uint64(0); i < rn.n; i++ {
		p := rn.p0 + i
		if installed[p-rn.p0] {
			continue
		}
		if err := ss.installCopy(r, run{p0: p, n: 1, zero: true}, zero, installed[p-rn.p0:], true); err != nil {
			return err
		}
	}
	return nil
}

// errNoZeropage: the region does not support UFFDIO_ZEROPAGE.
var errNoZeropage = errors.New("UFFDIO_ZEROPAGE unsupported on this region")

func (ss *session) installZeropage(r *region, rn run, installed []bool) error {
	dst := r.pageAddr(rn.p0)
	total := rn.n * r.page
	var done uint64
	retries := 0
	for done < total {
		n, err := uffdio.Zeropage(ss.p.uffd, dst+done, total-done, uffdio.ZeropageModeDontwake)
		if n > 0 {
			for p := done / r.page; p < (done+uint64(n))/r.page; p++ {
				installed[p] = true
			}
			ss.s.c.zeroPages.Add(uint64(n) / r.page)
			done += uint64(n)
		}
		switch err {
		case nil:
			if n <= 0 {
				return status.Errorf(codes.Internal, "UFFDIO_ZEROPAGE at address %#x (offset %d) made no progress", dst+done, r.off+(dst+done-r.base))
			}
		case unix.EEXIST:
			installed[done/r.page] = true // present already (see installCopy)
			done += r.page
		case unix.EAGAIN, unix.ENOENT, unix.EINTR:
			if retries++; retries > maxRetries {
				return status.Errorf(codes.Internal, "UFFDIO_ZEROPAGE at address %#x (offset %d): %v after %d retries", dst+done, r.off+(dst+done-r.base), err, maxRetries)
			}
			runtime.Gosched()
		case unix.ESRCH:
			return errGone
		case unix.EINVAL:
			if r.page != ss.sysPage {
				return errNoZeropage
			}
			fallthrough
		default:
			return status.Errorf(codes.Internal, "UFFDIO_ZEROPAGE at address %#x (offset %d, %d bytes): %v", dst+done, r.off+(dst+done-r.base), total-done, err)
		}
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
