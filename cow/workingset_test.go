package cow

import (
	"context"
	"fmt"
	"testing"
	"time"
)

func TestSettleObserve(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opts   SettleOptions
		totals []int
		want   int // index of the observation that settles, -1 for none
	}{
		{"quiet from the first touch", SettleOptions{Threshold: 2, Quiet: 3}, []int{5, 6, 6, 7}, 3},
		{"nothing touched yet is not quiet", SettleOptions{Threshold: 2, Quiet: 2}, []int{0, 0, 0, 0, 0}, -1},
		{"a burst restarts the count", SettleOptions{Threshold: 2, Quiet: 2}, []int{10, 10, 20, 20, 21}, 4},
		{"at the threshold is not quiet", SettleOptions{Threshold: 2, Quiet: 2}, []int{2, 4, 6, 8}, -1},
		{"threshold 1 wants no new touch", SettleOptions{Threshold: 1, Quiet: 1}, []int{3, 4, 4}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := settle{opts: tc.opts.withDefaults()}
			got := -1
			for i, n := range tc.totals {
				if st.observe(n) {
					got = i
					break
				}
			}
			if got != tc.want {
				t.Fatalf("settled at observation %d of %v, want %d", got, tc.totals, tc.want)
			}
		})
	}
}

func TestSettleDefaults(t *testing.T) {
	o := SettleOptions{}.withDefaults()
	if o.Interval != DefaultSettleInterval || o.Threshold != DefaultSettleThreshold || o.Quiet != DefaultSettleQuiet {
		t.Fatalf("defaults %+v", o)
	}
}

// TestRecordWorkingSetEnds checks that the working set a save records stops
// at the chunks touched before the rate settled, while the access record
// goes on.
func TestRecordWorkingSetEnds(t *testing.T) {
	s, _, _ := newStore(t, "dddddddddddd", 0, testOpts(t))
	buf := make([]byte, 10)
	for _, i := range []int64{3, 0, 7} {
		if _, err := s.ReadAt(buf, i*testCS); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if !s.RecordWorkingSet(ctx, SettleOptions{Interval: time.Millisecond, Threshold: 1, Quiet: 3}) {
		t.Fatal("recording did not end")
	}
	if !s.WorkingSetEnded() {
		t.Fatal("WorkingSetEnded is false after recording ended")
	}
	for _, i := range []int64{9, 1} {
		if _, err := s.WriteAt(buf, i*testCS); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := fmt.Sprint(s.Touched()), fmt.Sprint([]int64{3 * testCS, 0, 7 * testCS}); got != want {
		t.Errorf("working set %s, want %s", got, want)
	}
	if got, want := fmt.Sprint(s.Accessed()), fmt.Sprint([]int64{3 * testCS, 0, 7 * testCS, 9 * testCS, testCS}); got != want {
		t.Errorf("access record %s, want %s", got, want)
	}
	if got := s.AccessedBytes(); got != 5*testCS {
		t.Errorf("AccessedBytes = %d, want %d", got, 5*testCS)
	}
	if st := s.Stats(); st.Touched != 5 {
		t.Errorf("Stats.Touched = %d, want 5", st.Touched)
	}
	// Ending again keeps the first end.
	s.EndWorkingSet()
	if n := len(s.Touched()); n != 3 {
		t.Errorf("working set has %d chunks after a second end, want 3", n)
	}
}

// TestRecordWorkingSetWaitsForFirstTouch checks that a store nothing has
// touched yet (a VM still starting) does not settle, and that a cancelled
// recording leaves the working set growing.
func TestRecordWorkingSetWaitsForFirstTouch(t *testing.T) {
	s, _, _ := newStore(t, "dddd", 0, testOpts(t))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if s.RecordWorkingSet(ctx, SettleOptions{Interval: time.Millisecond, Threshold: 1, Quiet: 2}) {
		t.Fatal("an untouched store settled")
	}
	if s.WorkingSetEnded() {
		t.Fatal("a cancelled recording ended the working set")
	}
	if _, err := s.ReadAt(make([]byte, 1), 2*testCS); err != nil {
		t.Fatal(err)
	}
	if got := s.Touched(); len(got) != 1 || got[0] != 2*testCS {
		t.Fatalf("working set %v, want [%d]", got, 2*testCS)
	}
}

// TestRecordWorkingSetStopsOnClose checks that closing the store ends a
// recording in progress.
func TestRecordWorkingSetStopsOnClose(t *testing.T) {
	s, _, _ := newStore(t, "dddd", 0, testOpts(t))
	done := make(chan bool)
	go func() { done <- s.RecordWorkingSet(context.Background(), SettleOptions{Interval: time.Millisecond}) }()
	s.Close()
	select {
	case ended := <-done:
		if ended {
			t.Fatal("recording of a closed, untouched store reported an end")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("recording did not return after Close")
	}
}
