package cow

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// The read-ahead depth follows the reader: back-to-back sequential touches
// with slow fetches get the most, a reader much slower than the fetches and
// any out-of-order touch get minReadAhead.
func TestReadAheadDepth(t *testing.T) {
	var r readAheadState
	r.last = -1
	if got := r.depth(0, 32, time.Second); got != minReadAhead {
		t.Errorf("first touch: depth %d, want %d", got, minReadAhead)
	}
	for i := int64(1); i < 5; i++ {
		if got := r.depth(i, 32, time.Second); got != 32 {
			t.Errorf("fast sequential touch %d: depth %d, want 32", i, got)
		}
	}
	if got := r.depth(100, 32, time.Second); got != minReadAhead {
		t.Errorf("jump: depth %d, want %d", got, minReadAhead)
	}
	for i := int64(101); i < 104; i++ {
		time.Sleep(2 * time.Millisecond)
		if got := r.depth(i, 32, time.Microsecond); got != minReadAhead {
			t.Errorf("slow sequential touch %d (fetches 2000x faster): depth %d, want %d", i, got, minReadAhead)
		}
	}
	if got := r.depth(104, 2, time.Second); got != 2 {
		t.Errorf("depth above the configured most: %d, want 2", got)
	}
}

// Scattered touches schedule a few chunks each, not the whole read-ahead;
// a sequential read still gets chunks prefetched ahead of it and reads the
// right bytes.
func TestReadAheadAdapts(t *testing.T) {
	opts := testOpts(t)
	opts.ReadAhead = 32
	s, cas, _ := newStore(t, strings.Repeat("d", 200), 0, opts)
	cas.openDelay = time.Millisecond
	one := make([]byte, 1)
	for i := int64(0); i < 200; i += 20 {
		if _, err := s.ReadAt(one, i*testCS); err != nil {
			t.Fatal(err)
		}
	}
	if q := s.Stats().PrefetchQueued; q > 10*minReadAhead {
		t.Errorf("10 scattered touches queued %d chunks, want at most %d", q, 10*minReadAhead)
	}
	s2, cas2, want2 := newStore(t, strings.Repeat("d", 64), 0, opts)
	cas2.openDelay = time.Millisecond
	got := make([]byte, s2.Size())
	for off := int64(0); off < s2.Size(); off += testCS {
		if _, err := s2.ReadAt(got[off:off+testCS], off); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, want2) {
		t.Fatal("sequential read returned wrong bytes")
	}
	if st := s2.Stats(); st.Prefetched == 0 {
		t.Errorf("sequential read: nothing prefetched (%+v)", st)
	}
}
