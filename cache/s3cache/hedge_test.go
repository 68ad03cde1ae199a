package s3cache

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

func TestHedgerDelay(t *testing.T) {
	for _, tc := range []struct {
		name    string
		fixed   time.Duration
		samples []time.Duration
		want    time.Duration
		hedge   bool
	}{
		{"off", -1, nil, 0, false},
		{"fixed", 30 * time.Millisecond, nil, 30 * time.Millisecond, true},
		{"adaptive, too few samples", 0, durations(hedgeMinSamples-1, 50*time.Millisecond), 0, false},
		{"adaptive: the 95th percentile", 0, append(durations(95, 50*time.Millisecond), durations(5, 400*time.Millisecond)...), 400 * time.Millisecond, true},
		{"adaptive: the last window only", 0, append(durations(200, 400*time.Millisecond), durations(hedgeWindow, 60*time.Millisecond)...), 60 * time.Millisecond, true},
		{"adaptive, never below the floor", 0, durations(50, time.Millisecond), hedgeFloor, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHedger(tc.fixed)
			for _, d := range tc.samples {
				h.observe(d)
			}
			got, hedge := h.delay()
			if got != tc.want || hedge != tc.hedge {
				t.Errorf("delay() = %v, %v; want %v, %v", got, hedge, tc.want, tc.hedge)
			}
		})
	}
}

func durations(n int, d time.Duration) []time.Duration {
	s := make([]time.Duration, n)
	for i := range s {
		s[i] = d
	}
	return s
}

func TestHedgedCall(t *testing.T) {
	errFinal := errors.New("final")
	stop := func(err error) bool { return errors.Is(err, errFinal) }
	t.Run("a stalled first request is answered by the second, and cancelled", func(t *testing.T) {
		h := newHedger(time.Millisecond)
		var calls atomic.Int32
		cancelled := make(chan struct{})
		v, err := do(context.Background(), h, stop, func(ctx context.Context) (int, error) {
			if calls.Add(1) == 1 {
				<-ctx.Done() // stalls until the winner cancels it
				close(cancelled)
				return 0, ctx.Err()
			}
			return 2, nil
		})
		if err != nil || v != 2 {
			t.Fatalf("got %d, %v; want the second answer", v, err)
		}
		<-cancelled
		if h.hedges.Load() != 1 || h.wins.Load() != 1 {
			t.Errorf("hedges %d, wins %d; want 1 and 1", h.hedges.Load(), h.wins.Load())
		}
	})
	t.Run("a final error is not retried", func(t *testing.T) {
		h := newHedger(time.Hour)
		_, err := do(context.Background(), h, stop, func(ctx context.Context) (int, error) { return 0, errFinal })
		if !errors.Is(err, errFinal) || h.hedges.Load() != 0 {
			t.Fatalf("got %v after %d hedges; want the final error and none", err, h.hedges.Load())
		}
	})
	t.Run("a failed first request waits for the hedge in flight", func(t *testing.T) {
		h := newHedger(time.Millisecond)
		var calls atomic.Int32
		second := make(chan struct{})
		v, err := do(context.Background(), h, stop, func(ctx context.Context) (int, error) {
			if calls.Add(1) == 1 {
				<-second // fails only once the hedge runs
				return 0, errors.New("connection reset")
			}
			close(second)
			time.Sleep(time.Millisecond)
			return 7, nil
		})
		if err != nil || v != 7 {
			t.Fatalf("got %d, %v; want the hedge's answer", v, err)
		}
	})
	t.Run("both failing return the last error", func(t *testing.T) {
		h := newHedger(time.Millisecond)
		var calls atomic.Int32
		second := make(chan struct{})
		_, err := do(context.Background(), h, stop, func(ctx context.Context) (int, error) {
			if calls.Add(1) == 1 {
				<-second
				return 0, errors.New("first")
			}
			close(second)
			time.Sleep(time.Millisecond)
			return 0, errors.New("second")
		})
		if err == nil {
			t.Fatal("no error when both requests failed")
		}
	})
}
