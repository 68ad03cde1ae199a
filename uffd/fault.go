package uffd

import (
	"errors"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/uffd/internal/uffdio"
)

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
