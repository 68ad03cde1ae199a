package cow

import (
	"context"
	"sync"
	"time"
)

// prefetchItem is one queued background open.
type prefetchItem struct {
	c   *chunk
	ctx context.Context // nil for read-ahead
}

// prefetchQueue is a LIFO of chunks to open in the background, served by
// goroutines that exist only while there is work: as many as the link
// estimate wants in flight, at most max.
type prefetchQueue struct {
	mu      sync.Mutex
	stack   []prefetchItem
	running int
	max     int
	stopped bool
	wg      sync.WaitGroup
	rate    int64     // bytes per second; <= 0 unbounded
	next    time.Time // when the next background open may start
}

// pace reserves n bytes of the prefetch rate and returns how long to wait
// before starting them.
func (q *prefetchQueue) pace(n int64) time.Duration {
	if q.rate <= 0 {
		return 0
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	now := time.Now()
	if q.next.Before(now) {
		q.next = now
	}
	wait := q.next.Sub(now)
	q.next = q.next.Add(time.Duration(float64(n) / float64(q.rate) * float64(time.Second)))
	return wait
}

func (q *prefetchQueue) stop() {
	q.mu.Lock()
	q.stopped = true
	for _, it := range q.stack {
		it.c.queued.Store(false)
	}
	q.stack = nil
	q.mu.Unlock()
	q.wg.Wait()
}

// push adds items so that the last one is served first. It never blocks on
// a fetch.
func (s *Store) push(items []prefetchItem) {
	q := &s.pq
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.stopped {
		return
	}
	for _, it := range items {
		if it.c.settled.Load() {
			continue
		}
		if it.c.queued.Swap(true) {
			// Already waiting: move it up, so that the newest request's
			// order wins (a sequential reader's next chunks stay on top
			// instead of sinking under ever farther read-ahead).
			for i := range q.stack {
				if q.stack[i].c == it.c {
					q.stack = append(q.stack[:i], q.stack[i+1:]...)
					break
				}
			}
		} else {
			s.queuedTotal.Add(1)
		}
		q.stack = append(q.stack, it)
	}
	s.spawnLocked(0)
}

// spawnLocked starts workers while fewer run than the link estimate wants
// in flight (at most Options.PrefetchConcurrency) and than there are
// queued items for them; busy is how many running workers hold an item
// already. q.mu is held.
func (s *Store) spawnLocked(busy int) {
	q := &s.pq
	limit := s.link.target(s.cs, q.max)
	for q.running < limit && q.running-busy < len(q.stack) {
		q.running++
		q.wg.Add(1)
		go s.prefetchWorker()
	}
}

func (s *Store) prefetchWorker() {
	q := &s.pq
	defer q.wg.Done()
	for {
		q.mu.Lock()
		// Workers beyond what the link wants in flight stop (see
		// linkEstimate); more start when it wants more.
		if q.stopped || len(q.stack) == 0 || q.running > s.link.target(s.cs, q.max) {
			q.running--
			q.mu.Unlock()
			return
		}
		it := q.stack[len(q.stack)-1]
		q.stack[len(q.stack)-1] = prefetchItem{}
		q.stack = q.stack[:len(q.stack)-1]
		it.c.queued.Store(false) // under q.mu, so push sees stack and flag agree
		s.spawnLocked(1)
		q.mu.Unlock()
		if (it.ctx != nil && it.ctx.Err() != nil) || it.c.settled.Load() {
			continue
		}
		// Faults first: a read waiting on the source goes before
		// read-ahead. A working set's chunks are no guess: they are what
		// the VM reads next, and do not wait.
		if it.ctx == nil && s.faults.wait(s.ctx.Done(), maxYield) {
			s.yields.Add(1)
			if it.c.settled.Load() {
				continue
			}
		}
		if wait := q.pace(s.cs); wait > 0 {
			select {
			case <-time.After(wait):
			case <-s.ctx.Done(): // Close does not wait out the pacing
			}
		}
		// Errors are left for the foreground access to report.
		_ = s.fetch(it.c, false)
	}
}

// Prefetch schedules the chunks at offsets (e.g. a previous run's Touched)
// for background opening, the first offset served first, ahead of earlier
// requests. It returns at once; items still queued when ctx is done are
// skipped. Offsets of holes and of chunks already open are ignored.
func (s *Store) Prefetch(ctx context.Context, offsets []int64) {
	items := make([]prefetchItem, 0, len(offsets))
	s.mu.RLock()
	for i := len(offsets) - 1; i >= 0; i-- {
		off := offsets[i]
		if off < 0 || off >= s.size {
			continue
		}
		if c := s.chunks[off/s.cs]; c != nil && !c.settled.Load() {
			items = append(items, prefetchItem{c: c, ctx: ctx})
		}
	}
	s.mu.RUnlock()
	if len(items) > 0 {
		s.push(items)
	}
}
