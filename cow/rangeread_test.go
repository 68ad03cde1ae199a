package cow

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// rangeCS is the chunk size of these tests: 16 leaves of 16 KiB.
const rangeCS = 256 << 10

// gatedRemote is a remote tier whose whole-blob reads of chunks wait until
// the gate opens, counting what it serves; ReadRange may flip a byte.
type gatedRemote struct {
	cache.Tier
	chunks map[string]bool // chunk digests whose Read waits
	gate   chan struct{}
	once   sync.Once

	chunkStarts atomic.Int64 // whole-chunk Reads started (gated or not)
	chunkBytes  atomic.Int64 // bytes of chunks served by Read
	otherBytes  atomic.Int64 // bytes of other blobs (outboards) served by Read
	rangeBytes  atomic.Int64 // bytes served by ReadRange
	flipRange   atomic.Bool
}

func (g *gatedRemote) open() { g.once.Do(func() { close(g.gate) }) }

func (g *gatedRemote) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	n := &g.otherBytes
	if g.chunks[d.GetHash()] {
		g.chunkStarts.Add(1)
		select {
		case <-g.gate:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		n = &g.chunkBytes
	}
	b, err := cache.ReadAll(ctx, g.Tier, ns, d)
	if err != nil {
		return nil, err
	}
	n.Add(int64(len(b)))
	return io.NopCloser(bytes.NewReader(b)), nil
}

func (g *gatedRemote) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	rr, ok := g.Tier.(cache.RangeReader)
	if !ok {
		return nil, status.Error(codes.Unimplemented, "no range reads")
	}
	rc, err := rr.ReadRange(ctx, ns, d, off, n)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return nil, err
	}
	if g.flipRange.Load() {
		b[len(b)/2] ^= 1
	}
	g.rangeBytes.Add(int64(len(b)))
	return io.NopCloser(bytes.NewReader(b)), nil
}

// noRanges is a tier without range reads.
type noRanges struct{ cache.Tier }

func (n noRanges) Traits() cache.Traits {
	t := n.Tier.Traits()
	t.ServesRanges = false
	return t
}

func (n noRanges) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, l int64) (io.ReadCloser, error) {
	return nil, status.Errorf(codes.Unimplemented, "no range reads: %v", cache.ErrNoRange)
}

// rangeFixture saves a file of layout spec (see layout: 'd' data, 'h' hole)
// plus a short tail into a remote local cache and returns its description,
// the remote and the file's content.
func rangeFixture(t *testing.T, spec string, tail int, opts Options) (*snapshotpb.ChunkedFile, *localcache.Cache, []byte) {
	t.Helper()
	dir := t.TempDir()
	size := int64(len(spec))*rangeCS + int64(tail)
	want := make([]byte, size)
	for i, k := range spec {
		if k == 'd' {
			copy(want[int64(i)*rangeCS:], randBytes(uint64(i+7), rangeCS))
		}
	}
	copy(want[int64(len(spec))*rangeCS:], randBytes(77, tail))
	path := filepath.Join(dir, "file")
	if err := os.WriteFile(path, want, 0o644); err != nil {
		t.Fatal(err)
	}
	remote, err := localcache.New(filepath.Join(dir, "remote"), localcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	opts.ChunkSize, opts.TempDir, opts.ReadAhead = rangeCS, t.TempDir(), -1
	s, _, err := FromFile(context.Background(), "mem", path, remote, remote, opts)
	if err != nil {
		t.Fatal(err)
	}
	cf := s.ChunkedFile()
	s.Close()
	return cf, remote, want
}

// openCold opens cf through an empty local tier over remote.
func openCold(t *testing.T, cf *snapshotpb.ChunkedFile, remote cache.Tier, opts Options) (*Store, *cache.ReadThrough) {
	t.Helper()
	local, err := localcache.New(t.TempDir(), localcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	rt := cache.NewReadThrough(local, remote)
	opts.TempDir, opts.ReadAhead = t.TempDir(), -1
	s, err := Open("mem", cf, rt, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s, rt
}

func gated(cf *snapshotpb.ChunkedFile, remote cache.Tier) *gatedRemote {
	g := &gatedRemote{Tier: remote, chunks: map[string]bool{}, gate: make(chan struct{})}
	for _, c := range cf.GetChunks() {
		g.chunks[c.GetDigest().GetHash()] = true
	}
	return g
}

// reads are (offset, length) pairs: inside a leaf, across leaves, the
// first and last bytes of a chunk, a hole, and the short last chunk.
func rangeReads(size int64) [][2]int64 {
	return [][2]int64{
		{100, 4096}, {16384 - 100, 200}, {rangeCS - 1, 1}, {rangeCS + 5000, 3000},
		{2*rangeCS + 40000, 4096}, {size - 100, 100}, {3 * rangeCS, 1},
	}
}

func TestRangeReadVerifiedBeforeWholeChunk(t *testing.T) {
	cf, remote, want := rangeFixture(t, "dhd", 5000, Options{})
	for _, c := range cf.GetChunks() {
		if c.GetOutboard() == nil {
			t.Fatalf("chunk at %d saved without an outboard", c.GetOffset())
		}
	}
	g := gated(cf, remote)
	defer g.open()
	s, rt := openCold(t, cf, g, Options{})
	for _, r := range rangeReads(cf.GetSize()) {
		p := make([]byte, r[1])
		if n, err := s.ReadAt(p, r[0]); err != nil || n != len(p) {
			t.Fatalf("ReadAt(%d, %d) = %d, %v", r[0], r[1], n, err)
		}
		if !bytes.Equal(p, want[r[0]:r[0]+r[1]]) {
			t.Fatalf("ReadAt(%d, %d): wrong bytes", r[0], r[1])
		}
	}
	// Every read returned while the whole chunks were still held back:
	// only the aligned ranges and the outboards came from the remote.
	if n := g.chunkBytes.Load(); n != 0 {
		t.Errorf("%d bytes of whole chunks read before the reads returned", n)
	}
	wantRange := int64(16384 + 32768 + 16384 + 16384 + 5000 + 5000)
	if n := g.rangeBytes.Load(); n != wantRange {
		t.Errorf("range bytes read = %d, want %d", n, wantRange)
	}
	var obBytes int64
	for _, c := range cf.GetChunks() {
		obBytes += c.GetOutboard().GetSizeBytes()
	}
	if n := g.otherBytes.Load(); n != obBytes {
		t.Errorf("outboard bytes read = %d, want %d (each outboard once)", n, obBytes)
	}
	if st := s.Stats(); st.RangeReads != 6 {
		t.Errorf("range reads = %d, want 6", st.RangeReads)
	}
	// The whole chunks stream in behind; once they are in, reads come from
	// them and everything matches.
	g.open()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if st := rt.Stats(); st.RemoteFetches != int64(len(cf.GetChunks())+len(cf.GetChunks())) {
		t.Errorf("remote fetches = %d, want %d (chunks and outboards)", st.RemoteFetches, 2*len(cf.GetChunks()))
	}
	s2, err := Open("mem", cf, rt, Options{TempDir: t.TempDir(), ReadAhead: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got := readAll(t, s2); !bytes.Equal(got, want) {
		t.Fatal("content differs after the chunks streamed in")
	}
	if n := g.chunkBytes.Load(); n != int64(2*rangeCS+5000) {
		t.Errorf("whole chunk bytes = %d, want %d (each chunk once)", n, 2*rangeCS+5000)
	}
}

func TestRangeReadFallbacks(t *testing.T) {
	for _, tc := range []struct {
		name     string
		save     Options
		noRanges bool
	}{
		{"saved without outboards", Options{NoOutboards: true}, false},
		{"SHA-256", Options{Namespace: cache.Namespace{Function: digest.SHA256}}, false},
		{"remote without range reads", Options{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cf, remote, want := rangeFixture(t, "dhd", 5000, tc.save)
			var r cache.Tier = remote
			if tc.noRanges {
				r = noRanges{remote}
			}
			g := gated(cf, r)
			g.open()
			s, rt := openCold(t, cf, g, Options{Namespace: tc.save.Namespace})
			defer s.Close()
			for _, rr := range rangeReads(cf.GetSize()) {
				p := make([]byte, rr[1])
				if n, err := s.ReadAt(p, rr[0]); err != nil || n != len(p) {
					t.Fatalf("ReadAt(%d, %d) = %d, %v", rr[0], rr[1], n, err)
				}
				if !bytes.Equal(p, want[rr[0]:rr[0]+rr[1]]) {
					t.Fatalf("ReadAt(%d, %d): wrong bytes", rr[0], rr[1])
				}
			}
			if got := readAll(t, s); !bytes.Equal(got, want) {
				t.Fatal("content differs")
			}
			if st := s.Stats(); st.RangeReads != 0 || rt.Stats().RangeReads != 0 || g.rangeBytes.Load() != 0 {
				t.Errorf("range reads happened: store %d, read-through %d, %d bytes", st.RangeReads, rt.Stats().RangeReads, g.rangeBytes.Load())
			}
		})
	}
}

func TestRangeReadCorruption(t *testing.T) {
	t.Run("data", func(t *testing.T) {
		cf, remote, _ := rangeFixture(t, "dd", 0, Options{})
		g := gated(cf, remote)
		g.flipRange.Store(true)
		s, _ := openCold(t, cf, g, Options{})
		defer func() { g.open(); s.Close() }()
		checkCorrupt(t, s, cf.GetChunks()[1].GetDigest(), rangeCS+20000)
	})
	t.Run("outboard", func(t *testing.T) {
		cf, remote, _ := rangeFixture(t, "dd", 0, Options{})
		// A self-consistent blob that is not the chunk's outboard: one
		// byte of a parent node flipped, stored under its own digest.
		c := cf.GetChunks()[1]
		ob, err := cache.ReadAll(context.Background(), remote, cache.Namespace{}, c.GetOutboard())
		if err != nil {
			t.Fatal(err)
		}
		ob[8+10] ^= 1
		od := digest.Compute(digest.BLAKE3, ob)
		if err := remote.Write(context.Background(), cache.Namespace{}, od, bytes.NewReader(ob)); err != nil {
			t.Fatal(err)
		}
		c.Outboard = od
		g := gated(cf, remote)
		s, _ := openCold(t, cf, g, Options{})
		defer func() { g.open(); s.Close() }()
		checkCorrupt(t, s, c.GetDigest(), rangeCS+20000)
	})
}

func checkCorrupt(t *testing.T, s *Store, d *repb.Digest, off int64) {
	t.Helper()
	p := make([]byte, 4096)
	_, err := s.ReadAt(p, off)
	if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), digest.String(d)) {
		t.Fatalf("corrupt range: err = %v, want Internal naming %s", err, digest.String(d))
	}
	for _, want := range []string{"chunk at offset 262144", "range [16384, 32768)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if !bytes.Equal(p, make([]byte, len(p))) {
		t.Fatal("bytes of a corrupt range reached the reader")
	}
}

// TestWholeChunkWaitsForTheReaderToPause checks when the whole chunk
// starts streaming in behind a range read: not while range reads go on
// (they would queue behind it), but once the reader pauses, once the
// longest wait has passed, at once when asked, and at Close.
func TestWholeChunkWaitsForTheReaderToPause(t *testing.T) {
	for _, tc := range []struct {
		name       string
		quiet, max time.Duration
		wantStart  bool // the whole chunks start while the store is open
	}{
		{"reader never pauses", time.Hour, time.Hour, false},
		{"reader pauses", 5 * time.Millisecond, time.Hour, true},
		{"longest wait passes", time.Hour, 20 * time.Millisecond, true},
		{"no wait", -1, time.Hour, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cf, remote, want := rangeFixture(t, "dd", 0, Options{})
			g := gated(cf, remote)
			g.open()
			s, rt := openCold(t, cf, g, Options{BehindQuiet: tc.quiet, BehindMaxDelay: tc.max})
			for _, off := range []int64{100, rangeCS + 100} {
				p := make([]byte, 4096)
				if _, err := s.ReadAt(p, off); err != nil || !bytes.Equal(p, want[off:off+4096]) {
					t.Fatalf("ReadAt(%d): %v or wrong bytes", off, err)
				}
			}
			if tc.wantStart {
				for deadline := time.Now().Add(10 * time.Second); g.chunkStarts.Load() < 2 && time.Now().Before(deadline); {
					time.Sleep(time.Millisecond)
				}
				if n := g.chunkStarts.Load(); n != 2 {
					t.Fatalf("%d whole chunks started, want 2", n)
				}
			} else {
				time.Sleep(50 * time.Millisecond)
				if n := g.chunkStarts.Load(); n != 0 {
					t.Fatalf("%d whole chunks started while the reader had not paused", n)
				}
			}
			// Close lets the waiting fetches run and waits for them.
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if st := rt.Stats(); st.RemoteFetches != 4 {
				t.Errorf("remote fetches after Close = %d, want 4 (2 chunks, 2 outboards)", st.RemoteFetches)
			}
		})
	}
}

// A small read of a chunk whose read-ahead is in flight is served by a
// verified range read at once instead of waiting for the whole chunk, and
// the chunk is still fetched from the remote once.
func TestRangeReadDoesNotWaitForReadAhead(t *testing.T) {
	cf, remote, want := rangeFixture(t, "dd", 0, Options{})
	g := gated(cf, remote)
	defer g.open()
	s, rt := openCold(t, cf, g, Options{})
	s.Prefetch(context.Background(), []int64{rangeCS})
	waitFor(t, "read-ahead of chunk 1 to start", func() bool { return g.chunkStarts.Load() == 1 })
	done := make(chan error, 1)
	p := make([]byte, 4096)
	go func() {
		_, err := s.ReadAt(p, rangeCS+50000)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		g.open()
		t.Fatal("a small read waited for the whole chunk being read ahead")
	}
	if !bytes.Equal(p, want[rangeCS+50000:rangeCS+50000+4096]) {
		t.Fatal("range read returned wrong bytes")
	}
	if n := g.chunkBytes.Load(); n != 0 {
		t.Errorf("%d bytes of whole chunks served before the read returned", n)
	}
	g.open()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if n, b := g.chunkStarts.Load(), g.chunkBytes.Load(); n != 1 || b != rangeCS {
		t.Errorf("remote served %d whole-chunk reads, %d bytes; want the chunk once (%d bytes)", n, b, rangeCS)
	}
	if st := rt.Stats(); st.RangeReads != 1 {
		t.Errorf("%d verified range reads, want 1", st.RangeReads)
	}
}

// TestCloseCancelsWholeChunkFetchesPastGrace: a whole chunk behind a range
// read that never arrives (a remote riding out an outage) holds Close for
// Options.CloseGrace at most; then it is cancelled and Close returns.
func TestCloseCancelsWholeChunkFetchesPastGrace(t *testing.T) {
	cf, remote, want := rangeFixture(t, "dd", 0, Options{})
	g := gated(cf, remote) // the gate never opens: whole chunks never come
	s, _ := openCold(t, cf, g, Options{BehindQuiet: -1, CloseGrace: 50 * time.Millisecond})
	p := make([]byte, 4096)
	if _, err := s.ReadAt(p, 100); err != nil || !bytes.Equal(p, want[100:4196]) {
		t.Fatalf("range read: %v", err)
	}
	for g.chunkStarts.Load() == 0 {
		time.Sleep(time.Millisecond) // the whole chunk's fetch has begun
	}
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Close still waits for a whole-chunk fetch that cannot finish")
	}
}
