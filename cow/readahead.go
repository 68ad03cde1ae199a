package cow

import (
	"sync"
	"time"
)

// touch records the first access of c and schedules read-ahead.
func (s *Store) touch(c *chunk, idx int64) {
	if c.touched.Load() || c.touched.Swap(true) {
		return
	}
	s.touchMu.Lock()
	s.touched = append(s.touched, c.off)
	s.touchMu.Unlock()
	if s.opts.ReadAhead > 0 {
		s.scheduleAhead(idx, s.ra.depth(idx, s.opts.ReadAhead, time.Duration(s.fetchLat.Load())))
	}
}

// minReadAhead is the read-ahead depth of a first or out-of-order touch.
const minReadAhead = 4

// readAheadState sizes read-ahead to the reader: a reader that touches
// chunk after chunk gets as many chunks scheduled as it consumes while two
// fetches complete (fast readers up to Options.ReadAhead); a first or
// out-of-order touch gets minReadAhead, so that scattered accesses (a VM
// faulting here and there) do not pull in chunks nobody reads.
type readAheadState struct {
	mu       sync.Mutex
	last     int64 // index of the previous first touch, -1 before any
	lastAt   time.Time
	interval time.Duration // moving average of the time between sequential first touches
}

// depth returns how many chunks after idx to schedule, given the longest
// allowed and the fetches' average latency.
func (r *readAheadState) depth(idx int64, most int, fetchLat time.Duration) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	seq := r.lastAt != (time.Time{}) && idx == r.last+1
	if seq {
		gap := now.Sub(r.lastAt)
		if r.interval == 0 {
			r.interval = gap
		} else {
			r.interval = (3*r.interval + gap) / 4
		}
	} else {
		r.interval = 0
	}
	r.last, r.lastAt = idx, now
	low := min(minReadAhead, most)
	if !seq {
		return low
	}
	if r.interval <= 0 || fetchLat <= 0 {
		return most
	}
	// Chunks consumed while two fetches complete, plus a margin.
	n := int64(2*fetchLat/r.interval) + 2
	return int(max(int64(low), min(n, int64(most))))
}

// scheduleAhead schedules the n chunks after idx, nearest served first.
func (s *Store) scheduleAhead(idx int64, n int) {
	items := make([]prefetchItem, 0, n)
	s.mu.RLock()
	last := (s.size - 1) / s.cs
	for i := min(idx+int64(n), last); i > idx; i-- {
		if c := s.chunks[i]; c != nil && !c.settled.Load() {
			items = append(items, prefetchItem{c: c})
		}
	}
	s.mu.RUnlock()
	if len(items) > 0 {
		s.push(items)
	}
}
