package cow

import (
	"sync"
	"time"
)

// linkWindow is how many recent fetches the link estimate remembers.
const linkWindow = 16

// linkEstimate sizes background fetching to the link, from the fetches
// that completed: about one bandwidth-delay product in flight, whatever
// the chunk size. Two numbers are observed as fetches complete, never
// configured:
//
//   - the delivery rate: the bytes all fetches delivered while one was in
//     flight, over its duration (the highest of the recent ones);
//   - the latency: the part of a lone fetch's duration (no other fetch in
//     flight at any time during it) that its bytes at that rate do not
//     explain (the lowest of the recent ones).
//
// The target is one until a fetch completes (see target), then two
// fetches (one arriving, the next already asked for, so the link does not
// idle for a round trip between chunks) plus as many
// chunks as the rate delivers in one latency. On a 1 Gbit/s link with
// 1 ms each way and 4 MB chunks that is 2; 50 ms from a 100 MB/s bucket it
// is 3. Options.PrefetchConcurrency bounds it (memory: that many chunks).
type linkEstimate struct {
	mu        sync.Mutex
	inflight  int
	begun     int64 // fetches begun, ever
	delivered int64 // bytes of completed fetches, ever
	rates     [linkWindow]float64
	lone      [linkWindow]loneFetch
	nRate     int
	nLone     int
}

// loneFetch is a fetch during which no other fetch was in flight.
type loneFetch struct {
	bytes int64
	dur   time.Duration
}

// fetchTicket is one fetch in flight.
type fetchTicket struct {
	start     time.Time
	begun     int64 // linkEstimate.begun after this one began
	delivered int64 // linkEstimate.delivered when it began
	lone      bool  // nothing else was in flight when it began
}

func (l *linkEstimate) begin(now time.Time) fetchTicket {
	l.mu.Lock()
	defer l.mu.Unlock()
	t := fetchTicket{start: now, delivered: l.delivered, lone: l.inflight == 0}
	l.inflight++
	l.begun++
	t.begun = l.begun
	return t
}

// end records the fetch of t, of n bytes; observed is false when it
// crossed no link (served by the local tier, or failed).
func (l *linkEstimate) end(t fetchTicket, n int64, now time.Time, observed bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inflight--
	if !observed {
		return
	}
	l.delivered += n
	dur := now.Sub(t.start)
	if dur <= 0 {
		return
	}
	l.rates[l.nRate%linkWindow] = float64(l.delivered-t.delivered) / dur.Seconds()
	l.nRate++
	if t.lone && t.begun == l.begun && l.inflight == 0 {
		l.lone[l.nLone%linkWindow] = loneFetch{bytes: n, dur: dur}
		l.nLone++
	}
}

// rate is the highest recent delivery rate, bytes per second (0 before
// any fetch completed).
func (l *linkEstimate) rateLocked() float64 {
	var r float64
	for _, x := range l.rates[:min(l.nRate, linkWindow)] {
		r = max(r, x)
	}
	return r
}

// latency is the lowest recent latency of a lone fetch at the given rate
// (0 when none was seen).
func (l *linkEstimate) latencyLocked(rate float64) time.Duration {
	var lat time.Duration = -1
	for _, f := range l.lone[:min(l.nLone, linkWindow)] {
		x := max(0, f.dur-time.Duration(float64(f.bytes)/rate*float64(time.Second)))
		if lat < 0 || x < lat {
			lat = x
		}
	}
	return max(0, lat)
}

// target is how many fetches of chunk bytes to keep in flight, at least
// one and at most most.
func (l *linkEstimate) target(chunk int64, most int) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.begun == int64(l.inflight) {
		// Nothing completed yet: one at a time, so that the first fetch
		// (a working set's, before the VM runs) crosses the link alone,
		// which is how its latency is seen; a store whose fetches always
		// overlap would stay at two.
		return 1
	}
	n := 2
	if rate := l.rateLocked(); rate > 0 {
		n += int(rate * l.latencyLocked(rate).Seconds() / float64(chunk))
	}
	return max(1, min(n, most))
}

// inFlight is the number of fetches in flight.
func (l *linkEstimate) inFlight() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.inflight
}
