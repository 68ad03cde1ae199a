package cow

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

func TestValidateChunkedFile(t *testing.T) {
	d := func(n int64) *repb.Digest { return digest.Compute(digest.BLAKE3, make([]byte, n)) }
	good := func() *snapshotpb.ChunkedFile {
		return &snapshotpb.ChunkedFile{Name: "mem", Size: 2*testCS + 100, ChunkSize: testCS, Chunks: []*snapshotpb.Chunk{
			{Offset: 0, Digest: d(testCS)}, {Offset: 2 * testCS, Digest: d(100)},
		}}
	}
	tests := []struct {
		name   string
		mutate func(cf *snapshotpb.ChunkedFile)
		errHas string // "" = valid
	}{
		{"valid", func(cf *snapshotpb.ChunkedFile) {}, ""},
		{"empty file", func(cf *snapshotpb.ChunkedFile) { cf.Size = 0; cf.Chunks = nil }, ""},
		{"empty name", func(cf *snapshotpb.ChunkedFile) { cf.Name = "" }, "base name"},
		{"slash", func(cf *snapshotpb.ChunkedFile) { cf.Name = "/" }, "base name"},
		{"dotdot", func(cf *snapshotpb.ChunkedFile) { cf.Name = ".." }, "base name"},
		{"absolute", func(cf *snapshotpb.ChunkedFile) { cf.Name = "/etc/passwd" }, "base name"},
		{"nested", func(cf *snapshotpb.ChunkedFile) { cf.Name = "a/../../b" }, "base name"},
		{"negative size", func(cf *snapshotpb.ChunkedFile) { cf.Size = -1; cf.Chunks = nil }, "size -1"},
		{"absurd size", func(cf *snapshotpb.ChunkedFile) { cf.Size = MaxSize + 1; cf.Chunks = nil }, "outside"},
		{"zero chunk size", func(cf *snapshotpb.ChunkedFile) { cf.ChunkSize = 0 }, "not positive"},
		{"negative chunk size", func(cf *snapshotpb.ChunkedFile) { cf.ChunkSize = -4096 }, "not positive"},
		{"unaligned chunk size", func(cf *snapshotpb.ChunkedFile) { cf.ChunkSize = 5000 }, "multiple of 4096"},
		{"huge chunk size", func(cf *snapshotpb.ChunkedFile) { cf.ChunkSize = 2 << 30 }, "exceeds"},
		{"unaligned offset", func(cf *snapshotpb.ChunkedFile) { cf.Chunks[1].Offset = testCS + 1 }, "not a multiple"},
		{"negative offset", func(cf *snapshotpb.ChunkedFile) { cf.Chunks[0].Offset = -testCS }, "outside"},
		{"offset beyond size", func(cf *snapshotpb.ChunkedFile) { cf.Chunks[1].Offset = 3 * testCS }, "outside"},
		{"duplicate offset", func(cf *snapshotpb.ChunkedFile) { cf.Chunks[1].Offset = 0; cf.Chunks[1].Digest = d(testCS) }, "twice"},
		{"short digest", func(cf *snapshotpb.ChunkedFile) { cf.Chunks[0].Digest = d(testCS - 1) }, "want 65536"},
		{"long last digest", func(cf *snapshotpb.ChunkedFile) { cf.Chunks[1].Digest = d(testCS) }, "want 100"},
		{"nil digest", func(cf *snapshotpb.ChunkedFile) { cf.Chunks[0].Digest = nil }, "nil"},
		{"bad hash", func(cf *snapshotpb.ChunkedFile) { cf.Chunks[0].Digest.Hash = strings.ToUpper(cf.Chunks[0].Digest.Hash) }, "hex"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cf := good()
			tc.mutate(cf)
			err := ValidateChunkedFile(cf)
			if tc.errHas == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.errHas) {
				t.Fatalf("err = %v; want InvalidArgument containing %q", err, tc.errHas)
			}
			if _, err := Open("x", cf, newDirCAS(t), testOpts(t)); status.Code(err) != codes.InvalidArgument {
				t.Fatalf("Open accepted a hostile ChunkedFile: %v", err)
			}
		})
	}
}

func TestReadContent(t *testing.T) {
	tests := []struct {
		name string
		spec string
		tail int
	}{
		{"exact chunks", "dddd", 0},
		{"short last chunk", "ddd", 5000},
		{"holes and zeros", "dhzdhh", 0},
		{"sparse with tail", "hhdh", 4097},
		{"tail only", "", 123},
		{"all holes", "hhh", 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, cas, want := newStore(t, tc.spec, tc.tail, testOpts(t))
			if n := cas.opens.Load(); n != 0 {
				t.Fatalf("opening the store fetched %d chunks; want a lazy store", n)
			}
			if s.Size() != int64(len(want)) {
				t.Fatalf("Size = %d, want %d", s.Size(), len(want))
			}
			if got := readAll(t, s); !bytes.Equal(got, want) {
				t.Fatal("content differs from the file")
			}
			if got, wantN := int(cas.opens.Load()), strings.Count(tc.spec, "d")+min(tc.tail, 1); got != wantN {
				t.Fatalf("fetched %d chunks, want %d (holes and zeros are not fetched)", got, wantN)
			}
			// Random ranges, including ones crossing chunk boundaries.
			r := rand.New(rand.NewPCG(1, 2))
			for range 50 {
				off := r.Int64N(int64(len(want)) + 1)
				n := r.IntN(3 * testCS)
				p := make([]byte, n)
				got, err := s.ReadAt(p, off)
				end := min(off+int64(n), int64(len(want)))
				if got != int(end-off) || !bytes.Equal(p[:got], want[off:end]) {
					t.Fatalf("ReadAt(%d, %d) = %d, %v: wrong content", n, off, got, err)
				}
				if end < off+int64(n) && err != io.EOF {
					t.Fatalf("short read at end: err = %v, want io.EOF", err)
				}
				if end == off+int64(n) && err != nil {
					t.Fatalf("ReadAt(%d, %d): %v", n, off, err)
				}
			}
		})
	}
}

func TestOutOfRange(t *testing.T) {
	s, _, _ := newStore(t, "dd", 100, testOpts(t))
	size := s.Size()
	if _, err := s.ReadAt(make([]byte, 1), size+1); err == nil || err == io.EOF {
		t.Fatalf("read beyond the end: err = %v, want an error", err)
	}
	if n, err := s.ReadAt(make([]byte, 1), size); n != 0 || err != io.EOF {
		t.Fatalf("read at the end = %d, %v; want 0, EOF", n, err)
	}
	if _, err := s.ReadAt(make([]byte, 1), -1); err == nil {
		t.Fatal("negative offset accepted")
	}
	if _, err := s.WriteAt(make([]byte, 2), size-1); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("write across the end: err = %v, want InvalidArgument", err)
	}
	if d := s.Dirty(); len(d) != 0 {
		t.Fatalf("a rejected write dirtied chunks %v", d)
	}
}

func TestWriteDirtyAndSourceUnchanged(t *testing.T) {
	s, cas, want := newStore(t, "dddhd", 0, testOpts(t))
	before := map[string][]byte{}
	for _, c := range s.ChunkedFile().Chunks {
		b, err := os.ReadFile(cas.path(c.Digest))
		if err != nil {
			t.Fatal(err)
		}
		before[c.Digest.Hash] = b
	}
	// Read chunk 1 first so that its blob is open when it is written.
	readAll(t, s)
	writes := []struct {
		off int64
		n   int
	}{
		{testCS + 10, 100},        // inside chunk 1
		{2*testCS - 50, 100},      // across chunks 1 and 2
		{3*testCS + 7, 10},        // into the hole
		{4 * testCS, int(testCS)}, // whole chunk 4
	}
	for i, w := range writes {
		p := randBytes(uint64(100+i), w.n)
		if n, err := s.WriteAt(p, w.off); n != w.n || err != nil {
			t.Fatalf("WriteAt = %d, %v", n, err)
		}
		copy(want[w.off:], p)
	}
	if got, exp := s.Dirty(), []int64{testCS, 2 * testCS, 3 * testCS, 4 * testCS}; fmt.Sprint(got) != fmt.Sprint(exp) {
		t.Fatalf("Dirty = %v, want %v", got, exp)
	}
	if got := readAll(t, s); !bytes.Equal(got, want) {
		t.Fatal("reads do not see the writes")
	}
	for h, b := range before {
		after, err := os.ReadFile(filepath.Join(cas.dir, h))
		if err != nil || !bytes.Equal(after, b) {
			t.Fatalf("source blob %s changed after writes (err %v)", h, err)
		}
	}
	// A second store over the same clean state does not see the writes.
	s2, err := Open("mem", s.ChunkedFile(), cas, testOpts(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	p := make([]byte, 100)
	s2.ReadAt(p, testCS+10)
	if bytes.Equal(p, want[testCS+10:testCS+110]) {
		t.Fatal("another store over the same snapshot sees this store's writes")
	}
	if st := s.Stats(); st.Dirty != 4 {
		t.Fatalf("Stats.Dirty = %d, want 4", st.Dirty)
	}
}

func TestConcurrentReadWrite(t *testing.T) {
	opts := testOpts(t)
	opts.ReadAhead = 4
	s, _, want := newStore(t, "ddhdddhddd", 777, opts)
	size := int64(len(want))
	const workers = 8
	// Worker w owns bytes whose index i satisfies (i/1000)%workers == w, so
	// writes interleave inside and across chunks without overlapping.
	var wg sync.WaitGroup
	var mu sync.Mutex
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			for range 200 {
				blk := r.Int64N(size/1000+1)*workers + int64(w)
				off := blk * 1000
				if off >= size {
					continue
				}
				n := min(1000, size-off)
				p := randBytes(r.Uint64(), int(n))
				if _, err := s.WriteAt(p, off); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				copy(want[off:], p)
				mu.Unlock()
				got := make([]byte, n)
				if _, err := s.ReadAt(got, off); err != nil && err != io.EOF {
					t.Error(err)
					return
				}
				if !bytes.Equal(got, p) {
					t.Errorf("worker %d: read back different bytes at %d", w, off)
					return
				}
				// A read across chunks written by others must not fail.
				big := make([]byte, 3*testCS)
				if _, err := s.ReadAt(big, r.Int64N(size)); err != nil && err != io.EOF {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if got := readAll(t, s); !bytes.Equal(got, want) {
		t.Fatal("final content differs from the model")
	}
}

func TestConcurrentFirstReadsOpenOnce(t *testing.T) {
	s, cas, want := newStore(t, "dd", 0, testOpts(t))
	cas.openDelay = 20 * time.Millisecond
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 100)
			if _, err := s.ReadAt(p, int64(i*100)); err != nil || !bytes.Equal(p, want[i*100:i*100+100]) {
				t.Errorf("read %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	if n := cas.opens.Load(); n != 1 {
		t.Fatalf("8 concurrent first reads opened the chunk %d times, want 1", n)
	}
}

func TestReadAhead(t *testing.T) {
	opts := testOpts(t)
	opts.ReadAhead = 4
	s, cas, _ := newStore(t, "dddhdddddd", 0, opts)
	s.ReadAt(make([]byte, 10), 0)
	// Chunks 1..4 are scheduled; 3 is a hole, so 3 opens besides chunk 0.
	waitFor(t, "read-ahead of chunks 1, 2 and 4", func() bool { return s.Stats().Prefetched == 3 })
	st := s.Stats()
	if st.ForegroundFetches != 1 || cas.opens.Load() != 4 {
		t.Fatalf("stats %+v, source opens %d; want 1 foreground + 3 read-ahead", st, cas.opens.Load())
	}
	// Reading the prefetched chunks costs no further foreground fetch.
	s.ReadAt(make([]byte, 10), testCS)
	if st := s.Stats(); st.ForegroundFetches != 1 {
		t.Fatalf("read of a prefetched chunk fetched in the foreground: %+v", st)
	}
	if got := s.Touched(); fmt.Sprint(got) != fmt.Sprint([]int64{0, testCS}) {
		t.Fatalf("Touched = %v", got)
	}
}

func TestPrefetchWorkingSet(t *testing.T) {
	s, cas, _ := newStore(t, "dddddddd", 0, testOpts(t))
	ws := []int64{5 * testCS, 2 * testCS, 7 * testCS, 100 * testCS /* beyond: ignored */}
	s.Prefetch(context.Background(), ws)
	waitFor(t, "prefetch of the working set", func() bool { return s.Stats().Prefetched == 3 })
	if cas.opens.Load() != 3 {
		t.Fatalf("source opens = %d, want 3", cas.opens.Load())
	}
	if len(s.Touched()) != 0 {
		t.Fatal("prefetch counted as a touch")
	}
	// A cancelled prefetch opens nothing.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	cas.openDelay = 0
	s.Prefetch(ctx, []int64{0, testCS})
	s.pq.wg.Wait()
	if cas.opens.Load() != 3 {
		t.Fatalf("cancelled prefetch opened chunks: %d opens", cas.opens.Load())
	}
}

func TestSourceErrors(t *testing.T) {
	tests := []struct {
		name   string
		break_ func(cas *dirCAS, d *repb.Digest)
		code   codes.Code
	}{
		{"missing", func(cas *dirCAS, d *repb.Digest) { os.Remove(cas.path(d)) }, codes.NotFound},
		{"corrupt", func(cas *dirCAS, d *repb.Digest) {
			b, _ := os.ReadFile(cas.path(d))
			b[10] ^= 1
			os.WriteFile(cas.path(d), b, 0o644)
		}, codes.DataLoss},
		{"unavailable", func(cas *dirCAS, d *repb.Digest) {
			cas.openErr = func(x *repb.Digest) error {
				if digest.Equal(x, d) {
					return status.Error(codes.Unavailable, "remote down")
				}
				return nil
			}
		}, codes.Unavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, cas, _ := newStore(t, "ddd", 0, testOpts(t))
			d := s.ChunkedFile().Chunks[1].Digest
			tc.break_(cas, d)
			_, err := s.ReadAt(make([]byte, 2*testCS), 10)
			if status.Code(err) != tc.code {
				t.Fatalf("read error = %v; want code %v", err, tc.code)
			}
			for _, part := range []string{`"mem"`, fmt.Sprint(testCS), d.Hash} {
				if !strings.Contains(err.Error(), part) {
					t.Fatalf("error %q does not name %s", err, part)
				}
			}
			if _, err := s.WriteAt([]byte{1}, testCS+5); status.Code(err) != tc.code {
				t.Fatalf("partial write to a broken chunk: err = %v; want code %v", err, tc.code)
			}
			if s.Stats().FetchErrors == 0 {
				t.Fatal("FetchErrors not counted")
			}
			// Overwriting the whole chunk needs no fetch and succeeds.
			if _, err := s.WriteAt(make([]byte, testCS), testCS); err != nil {
				t.Fatalf("full overwrite of a broken chunk: %v", err)
			}
		})
	}
}

func TestResize(t *testing.T) {
	s, cas, want := newStore(t, "dd", 1000, testOpts(t))
	old := s.Size()
	if err := s.Resize(old - 1); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("shrink: err = %v", err)
	}
	newSize := old + 2*testCS + 5
	if err := s.Resize(newSize); err != nil {
		t.Fatal(err)
	}
	want = append(want, make([]byte, newSize-old)...)
	if got := readAll(t, s); !bytes.Equal(got, want) {
		t.Fatal("grown area does not read as zeros or old data changed")
	}
	p := randBytes(5, 10)
	if _, err := s.WriteAt(p, newSize-10); err != nil {
		t.Fatalf("write in the grown area: %v", err)
	}
	copy(want[newSize-10:], p)
	if got := s.ChunkedFile().Size; got != old {
		t.Fatalf("ChunkedFile().Size = %d before Save, want the clean size %d", got, old)
	}
	cf, _, err := s.Save(context.Background(), cas)
	if err != nil {
		t.Fatal(err)
	}
	if err := ValidateChunkedFile(cf); err != nil {
		t.Fatalf("after Resize, Save produced an invalid ChunkedFile: %v", err)
	}
	s2, err := Open("mem", cf, cas, testOpts(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got := readAll(t, s2); !bytes.Equal(got, want) {
		t.Fatal("saved grown store has other content")
	}
}

func TestCloseReleases(t *testing.T) {
	tmp := t.TempDir()
	opts := testOpts(t)
	opts.TempDir = tmp
	opts.ReadAhead = 8
	s, cas, _ := newStore(t, "dddddd", 0, opts)
	readAll(t, s)
	s.WriteAt([]byte{1}, 3)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if o, c := cas.opens.Load(), cas.closes.Load(); o != c || o == 0 {
		t.Fatalf("opened %d blobs, closed %d", o, c)
	}
	if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
		t.Fatalf("overlay left in TempDir: %v", ents)
	}
	if _, err := s.ReadAt(make([]byte, 1), 0); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("read after Close: %v", err)
	}
}

func TestWithLocalCache(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	lc, err := localcache.New(dir, localcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer lc.Close()
	path, want := layout(t, t.TempDir(), "ddhdzdd", 1234)
	opts := testOpts(t)
	s, st, err := FromFile(ctx, "mem", path, lc, lc, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if st.ChunksWritten != 6 || st.ChunksTotal != 6 {
		t.Fatalf("FromFile stats %+v; want 6 blobs", st)
	}
	if got := readAll(t, s); !bytes.Equal(got, want) {
		t.Fatal("content read through the local cache differs")
	}
	for _, off := range []int64{5, 3*testCS + 1} {
		p := randBytes(uint64(off), 64)
		if _, err := s.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	cf, st, err := s.Save(ctx, lc)
	if err != nil {
		t.Fatal(err)
	}
	if st.ChunksWritten != 2 || st.ChunksDirty != 2 || st.ChunksTotal != 6 {
		t.Fatalf("Save stats %+v; want 2 of 6 chunks written", st)
	}
	// A fresh cache instance over the same directory (as after a restart).
	lc2, err := localcache.New(dir, localcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer lc2.Close()
	s2, err := Open("mem", cf, lc2, opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, s2); !bytes.Equal(got, want) {
		t.Fatal("saved content differs after reopening the cache")
	}
	s2.Close()

	// Corrupt chunk 1 and remove chunk 5; a fresh instance verifies blobs
	// it did not write.
	ns := opts.Namespace
	ns.Function = digest.BLAKE3
	d1, d5 := cf.Chunks[1].Digest, cf.Chunks[3].Digest
	if cf.Chunks[3].Offset != 5*testCS {
		t.Fatalf("unexpected layout %v", cf.Chunks)
	}
	b, err := os.ReadFile(lc.Path(ns, d1))
	if err != nil {
		t.Fatal(err)
	}
	b[100] ^= 0xff
	os.Chmod(lc.Path(ns, d1), 0o644)
	if err := os.WriteFile(lc.Path(ns, d1), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(lc.Path(ns, d5)); err != nil {
		t.Fatal(err)
	}
	// The damage stands for a write torn by a crash: the next boot trusts
	// no verification of the last one.
	lc3, err := localcache.New(dir, localcache.Options{BootID: "after-a-crash"})
	if err != nil {
		t.Fatal(err)
	}
	defer lc3.Close()
	s3, err := Open("mem", cf, lc3, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	for _, tc := range []struct {
		off  int64
		d    *repb.Digest
		code codes.Code
	}{{testCS, d1, codes.DataLoss}, {5 * testCS, d5, codes.NotFound}} {
		_, err := s3.ReadAt(make([]byte, 10), tc.off+3)
		if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.d.Hash) || !strings.Contains(err.Error(), fmt.Sprint(tc.off)) {
			t.Fatalf("read at %d: err = %v; want %v naming offset and digest", tc.off, err, tc.code)
		}
	}
	if _, err := s3.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatalf("intact chunk: %v", err)
	}
}

func TestPrefetchNewestFirst(t *testing.T) {
	opts := testOpts(t)
	opts.PrefetchConcurrency = 1
	s, cas, _ := newStore(t, "dddddddd", 0, opts)
	cas.openDelay = 30 * time.Millisecond
	hashAt := map[string]int64{}
	for _, c := range s.ChunkedFile().Chunks {
		hashAt[c.Digest.Hash] = c.Offset / testCS
	}
	s.Prefetch(context.Background(), []int64{0})
	waitFor(t, "the first prefetch to start", func() bool { return cas.opens.Load() == 1 })
	s.Prefetch(context.Background(), []int64{testCS, 2 * testCS})
	s.Prefetch(context.Background(), []int64{5 * testCS, 6 * testCS})
	waitFor(t, "all prefetches", func() bool { return s.Stats().Prefetched == 5 })
	cas.mu.Lock()
	var got []int64
	for _, h := range cas.order {
		got = append(got, hashAt[h])
	}
	cas.mu.Unlock()
	if fmt.Sprint(got) != "[0 5 6 1 2]" {
		t.Fatalf("chunks opened in order %v; want [0 5 6 1 2] (newest request first, each in its given order)", got)
	}
}
