package cow

import (
	"context"
	"slices"
	"time"
)

// Defaults of SettleOptions.
const (
	// DefaultSettleInterval is how often RecordWorkingSet counts the chunks
	// touched for the first time.
	DefaultSettleInterval = 250 * time.Millisecond
	// DefaultSettleThreshold: an interval with fewer newly touched chunks
	// than this is quiet.
	DefaultSettleThreshold = 2
	// DefaultSettleQuiet is how many quiet intervals in a row end the
	// working set (1 s at the default interval).
	DefaultSettleQuiet = 4
)

// SettleOptions say when a restored VM's fault rate has settled, so that
// its working set is complete. The zero value gives the defaults.
type SettleOptions struct {
	// Interval is the counting period. Default DefaultSettleInterval.
	Interval time.Duration
	// Threshold: an interval in which fewer than Threshold chunks were
	// touched for the first time is quiet. Default DefaultSettleThreshold.
	Threshold int
	// Quiet is how many quiet intervals in a row settle the fault rate.
	// Default DefaultSettleQuiet.
	Quiet int
}

func (o SettleOptions) withDefaults() SettleOptions {
	if o.Interval <= 0 {
		o.Interval = DefaultSettleInterval
	}
	if o.Threshold <= 0 {
		o.Threshold = DefaultSettleThreshold
	}
	if o.Quiet <= 0 {
		o.Quiet = DefaultSettleQuiet
	}
	return o
}

// settle decides from successive counts of touched chunks when the rate of
// new touches has settled. Quiet intervals count only once something was
// touched: a VM that has not started faulting yet has not settled.
type settle struct {
	opts  SettleOptions
	prev  int
	quiet int
}

// observe takes the total count of touched chunks at the end of an
// interval and reports whether the rate has settled.
func (st *settle) observe(total int) bool {
	n := total - st.prev
	st.prev = total
	if total == 0 || n >= st.opts.Threshold {
		st.quiet = 0
		return false
	}
	st.quiet++
	return st.quiet >= st.opts.Quiet
}

// RecordWorkingSet watches the chunks touched for the first time and ends
// the working set (EndWorkingSet) once their rate settles: fewer than
// opts.Threshold new chunks per opts.Interval for opts.Quiet intervals in a
// row, counted from the first touch. It blocks until then and returns
// true, or returns false when ctx is done or the store is closed first
// (the working set then keeps growing).
func (s *Store) RecordWorkingSet(ctx context.Context, opts SettleOptions) bool {
	st := settle{opts: opts.withDefaults()}
	t := time.NewTicker(st.opts.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-s.ctx.Done():
			return false
		case <-t.C:
		}
		s.touchMu.Lock()
		if s.wsEnded {
			s.touchMu.Unlock()
			return true
		}
		done := st.observe(len(s.touched))
		if done {
			s.wsEnd, s.wsEnded = len(s.touched), true
		}
		s.touchMu.Unlock()
		if done {
			return true
		}
	}
}

// EndWorkingSet ends the working set at the chunks touched so far: Touched
// (what a save records for the next restore to prefetch) no longer grows.
// Later calls do nothing.
func (s *Store) EndWorkingSet() {
	s.touchMu.Lock()
	defer s.touchMu.Unlock()
	if !s.wsEnded {
		s.wsEnd, s.wsEnded = len(s.touched), true
	}
}

// WorkingSetEnded reports whether the working set was ended.
func (s *Store) WorkingSetEnded() bool {
	s.touchMu.Lock()
	defer s.touchMu.Unlock()
	return s.wsEnded
}

// Touched returns the offsets of the non-hole chunks read or written so
// far, in order of first access: the working set to Prefetch next time.
// Once EndWorkingSet was called it stops growing (Accessed does not).
func (s *Store) Touched() []int64 {
	s.touchMu.Lock()
	defer s.touchMu.Unlock()
	if s.wsEnded {
		return slices.Clone(s.touched[:s.wsEnd])
	}
	return slices.Clone(s.touched)
}

// Accessed returns the offsets of every non-hole chunk read or written so
// far, in order of first access, including those after the working set
// ended.
func (s *Store) Accessed() []int64 {
	s.touchMu.Lock()
	defer s.touchMu.Unlock()
	return slices.Clone(s.touched)
}

// AccessedBytes is the total size of the chunks Accessed returns: the bytes
// the VM touched, at chunk granularity.
func (s *Store) AccessedBytes() int64 {
	size := s.Size()
	s.touchMu.Lock()
	defer s.touchMu.Unlock()
	var n int64
	for _, off := range s.touched {
		n += max(0, min(s.cs, size-off))
	}
	return n
}
