package s3cache

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Hedging: a ranged GET that has not completed once it is slower than
// nearly all recent ones is sent again, the first complete answer is used
// and the other request is cancelled (the bucket's slowest few percent of
// requests, a server or connection having a bad moment, then cost one
// more request instead of their whole tail). The delay is the 95th
// percentile of the last hedgeWindow completed requests' durations, once
// hedgeMinSamples are known; Options.HedgeAfter fixes it or turns
// hedging off.
const (
	hedgeWindow     = 128
	hedgeMinSamples = 20
	// hedgeFloor keeps loopback-fast buckets from hedging on noise.
	hedgeFloor = 5 * time.Millisecond
)

// hedger keeps the recent durations of ranged GETs and counts hedges.
type hedger struct {
	fixed time.Duration // Options.HedgeAfter

	mu   sync.Mutex
	durs []time.Duration // ring of the last hedgeWindow
	next int

	hedges atomic.Int64 // second requests sent
	wins   atomic.Int64 // second requests that answered first
}

func newHedger(fixed time.Duration) *hedger {
	return &hedger{fixed: fixed, durs: make([]time.Duration, 0, hedgeWindow)}
}

func (h *hedger) observe(d time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.durs) < hedgeWindow {
		h.durs = append(h.durs, d)
		return
	}
	h.durs[h.next] = d
	h.next = (h.next + 1) % hedgeWindow
}

// delay is how long a request runs before it is hedged; ok is false when
// it is not hedged.
func (h *hedger) delay() (time.Duration, bool) {
	switch {
	case h.fixed < 0:
		return 0, false
	case h.fixed > 0:
		return h.fixed, true
	}
	h.mu.Lock()
	if len(h.durs) < hedgeMinSamples {
		h.mu.Unlock()
		return 0, false
	}
	s := slices.Clone(h.durs)
	h.mu.Unlock()
	slices.Sort(s)
	return max(hedgeFloor, s[len(s)*95/100]), true
}

// do runs f, and once more alongside when the first has not completed
// after the hedge delay; it returns the first success (cancelling the
// other), or the last error when both fail. An error that a second try
// cannot change (stop reports it) is returned at once.
func do[T any](ctx context.Context, h *hedger, stop func(error) bool, f func(context.Context) (T, error)) (T, error) {
	delay, hedge := h.delay()
	start := time.Now()
	if !hedge {
		v, err := f(ctx)
		if err == nil {
			h.observe(time.Since(start))
		}
		return v, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		v      T
		err    error
		second bool
		took   time.Duration
	}
	ch := make(chan result, 2)
	run := func(second bool) {
		t := time.Now()
		v, err := f(ctx)
		ch <- result{v, err, second, time.Since(t)}
	}
	go run(false)
	timer := time.NewTimer(delay)
	defer timer.Stop()
	inflight := 1
	var last result
	for {
		select {
		case <-timer.C:
			if inflight == 1 && ctx.Err() == nil {
				h.hedges.Add(1)
				inflight++
				go run(true)
			}
		case r := <-ch:
			inflight--
			if r.err == nil {
				h.observe(r.took)
				if r.second {
					h.wins.Add(1)
				}
				return r.v, nil
			}
			last = r
			if inflight == 0 || stop(r.err) {
				return last.v, last.err
			}
		}
	}
}
