package cow

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// gatedSource holds every open of a chunk other than the free ones until
// the gate opens, counting opens in flight.
type gatedSource struct {
	*dirCAS
	gate     chan struct{}
	free     map[string]bool // hashes opened at once (the foreground reads)
	inflight atomic.Int64
	maxIn    atomic.Int64
}

func newGatedSource(cas *dirCAS) *gatedSource {
	g := &gatedSource{dirCAS: cas, gate: make(chan struct{}), free: map[string]bool{}}
	cas.openErr = func(d *repb.Digest) error {
		if g.free[d.Hash] {
			return nil
		}
		n := g.inflight.Add(1)
		for {
			m := g.maxIn.Load()
			if n <= m || g.maxIn.CompareAndSwap(m, n) {
				break
			}
		}
		<-g.gate
		g.inflight.Add(-1)
		return nil
	}
	return g
}

func hashesByChunk(s *Store) map[int64]string {
	out := map[int64]string{}
	for _, c := range s.ChunkedFile().Chunks {
		out[c.Offset/s.ChunkSize()] = c.Digest.Hash
	}
	return out
}

// openOrder returns the chunk indexes of s that cas opened, in order.
func openOrder(s *Store, cas *dirCAS) string {
	chunkOf := map[string]int64{}
	for i, h := range hashesByChunk(s) {
		chunkOf[h] = i
	}
	cas.mu.Lock()
	defer cas.mu.Unlock()
	var got []string
	for _, h := range cas.order {
		got = append(got, fmt.Sprint(chunkOf[h]))
	}
	return strings.Join(got, " ")
}

// TestForegroundReadNotQueuedBehindPrefetch saturates prefetch with opens
// of a source that never answers and many more queued, then reads a chunk
// that is queued last, and one that is not queued at all: each read opens
// its chunk at once instead of waiting for a prefetch slot or its turn.
func TestForegroundReadNotQueuedBehindPrefetch(t *testing.T) {
	const chunks = 64
	for _, tc := range []struct {
		name   string
		queued int // chunks 0..queued-1 are prefetched
		read   int64
	}{
		{"queued last", chunks, chunks - 1},
		{"not queued", chunks - 1, chunks - 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := testOpts(t)
			opts.PrefetchConcurrency = 4
			s, cas, want := newStore(t, strings.Repeat("d", chunks), 0, opts)
			src := newGatedSource(cas)
			src.free[hashesByChunk(s)[tc.read]] = true
			var ws []int64
			for i := range tc.queued {
				ws = append(ws, int64(i)*testCS)
			}
			s.Prefetch(context.Background(), ws)
			// As many as the link estimate wants in flight: with nothing
			// completed yet, one.
			slots := int64(s.link.target(s.cs, opts.PrefetchConcurrency))
			if slots != 1 {
				close(src.gate)
				t.Fatalf("%d fetches wanted in flight before any completed, want 1", slots)
			}
			waitFor(t, "prefetch to fill its slots", func() bool { return src.inflight.Load() == slots })

			done := make(chan error, 1)
			buf := make([]byte, testCS)
			go func() {
				_, err := s.ReadAt(buf, tc.read*testCS)
				done <- err
			}()
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(20 * time.Second):
				close(src.gate)
				t.Fatalf("a foreground read waited behind %d prefetches in flight and %d queued", src.inflight.Load(), tc.queued)
			}
			if string(buf) != string(want[tc.read*testCS:(tc.read+1)*testCS]) {
				t.Fatal("foreground read returned wrong bytes")
			}
			// Counters, not Stats: Stats waits for chunks being opened.
			if fg, pf := s.fgFetches.Load(), s.prefetched.Load(); fg != 1 || pf != 0 {
				t.Errorf("%d foreground fetches, %d prefetched; want 1 foreground fetch and no prefetch finished while the source was held", fg, pf)
			}
			if n := src.inflight.Load(); n != slots {
				t.Errorf("%d prefetch opens in flight, want %d", n, slots)
			}
			close(src.gate)
			waitFor(t, "the queue to drain", func() bool { return s.Stats().Prefetched == int64(chunks-1) })
			if m := src.maxIn.Load(); m > int64(opts.PrefetchConcurrency) {
				t.Errorf("%d prefetch opens were in flight at once, more than PrefetchConcurrency %d", m, opts.PrefetchConcurrency)
			}
			if n := cas.opens.Load(); n != chunks {
				t.Errorf("source opened %d times, want each of the %d chunks once", n, chunks)
			}
		})
	}
}

// TestPrefetchFollowsRecordedOrder checks that a working set is opened in
// the order it was recorded, and that chunks the VM reads in the foreground
// meanwhile are skipped, not opened again.
func TestPrefetchFollowsRecordedOrder(t *testing.T) {
	opts := testOpts(t)
	opts.PrefetchConcurrency = 1
	s, cas, _ := newStore(t, "ddddhddddddd", 0, opts)
	hashes := hashesByChunk(s)
	src := newGatedSource(cas)
	src.free[hashes[6]] = true
	recorded := []int64{9, 2, 11, 4 /* hole */, 0, 6, 7, 1, 10, 3, 5, 8}
	var ws []int64
	for _, i := range recorded {
		ws = append(ws, i*testCS)
	}
	s.Prefetch(context.Background(), ws)
	waitFor(t, "the first prefetch", func() bool { return src.inflight.Load() == 1 })
	// The VM reads chunk 6 while prefetch holds chunk 9.
	if _, err := s.ReadAt(make([]byte, 1), 6*testCS); err != nil {
		t.Fatal(err)
	}
	close(src.gate)
	waitFor(t, "the working set", func() bool { return s.Stats().Prefetched == 10 })
	if g, w := openOrder(s, cas), "9 6 2 11 0 7 1 10 3 5 8"; g != w {
		t.Fatalf("chunks opened in order %s, want %s (the recorded order, the foreground read of 6 first, holes and settled chunks skipped)", g, w)
	}
}

// TestPrefetchOrderSurvivesConcurrentRequests checks that a working set
// queued while read-ahead of earlier touches is pending is still opened in
// its recorded order.
func TestPrefetchOrderSurvivesConcurrentRequests(t *testing.T) {
	opts := testOpts(t)
	opts.PrefetchConcurrency = 1
	opts.ReadAhead = 2
	s, cas, _ := newStore(t, "dddddddddd", 0, opts)
	hashes := hashesByChunk(s)
	src := newGatedSource(cas)
	src.free[hashes[0]] = true
	// Touching chunk 0 queues read-ahead of 1 and 2; the first is held.
	if _, err := s.ReadAt(make([]byte, 1), 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "read-ahead to start", func() bool { return src.inflight.Load() == 1 })
	s.Prefetch(context.Background(), []int64{8 * testCS, 5 * testCS, 2 * testCS, 7 * testCS})
	close(src.gate)
	waitFor(t, "all opens", func() bool { return s.Stats().Prefetched == 5 })
	if g, w := openOrder(s, cas), "0 1 8 5 2 7"; g != w {
		t.Fatalf("chunks opened in order %s, want %s", g, w)
	}
}

// TestWorkingSetDoesNotYieldToFaults checks that the working set's opens
// start while a fault waits on the source: they are what the VM reads
// next, not read-ahead.
func TestWorkingSetDoesNotYieldToFaults(t *testing.T) {
	opts := testOpts(t)
	opts.ReadAhead = -1
	s, cas, _ := newStore(t, "dddd", 0, opts)
	src := newGatedSource(cas)
	fault := make(chan error, 1)
	go func() {
		_, err := s.ReadAt(make([]byte, testCS), 0)
		fault <- err
	}()
	waitFor(t, "the fault to wait on the source", func() bool { return src.inflight.Load() == 1 })
	s.Prefetch(context.Background(), []int64{1 * testCS, 2 * testCS, 3 * testCS})
	waitFor(t, "a working-set open beside the fault", func() bool { return src.inflight.Load() == 2 })
	close(src.gate)
	if err := <-fault; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the working set", func() bool { return s.Stats().Prefetched == 3 })
	if y := s.Stats().PrefetchYields; y != 0 {
		t.Errorf("%d working-set opens waited for a fault first, want none", y)
	}
}
