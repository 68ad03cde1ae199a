package cow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// dirCAS is a small directory-backed blob store standing in for the local
// cache: blobs are files named by hash, verified when written and opened.
type dirCAS struct {
	dir       string
	opens     atomic.Int64
	closes    atomic.Int64
	writes    atomic.Int64
	openDelay time.Duration
	openErr   func(d *repb.Digest) error // injected failure, may be nil

	mu    sync.Mutex
	order []string // hashes in order of Open calls
}

func newDirCAS(t testing.TB) *dirCAS {
	return &dirCAS{dir: t.TempDir()}
}

func (c *dirCAS) path(d *repb.Digest) string { return filepath.Join(c.dir, d.Hash) }

func (c *dirCAS) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	var out []*repb.Digest
	for _, d := range ds {
		if _, err := os.Stat(c.path(d)); err != nil {
			out = append(out, d)
		}
	}
	return out, nil
}

func (c *dirCAS) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if got := digest.Compute(ns.Function, b); !digest.Equal(got, d) {
		return status.Errorf(codes.InvalidArgument, "blob %s hashes to %s", digest.String(d), digest.String(got))
	}
	tmp := c.path(d) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	c.writes.Add(1)
	return os.Rename(tmp, c.path(d))
}

type fileBlob struct {
	*os.File
	size int64
	c    *dirCAS
}

func (b *fileBlob) Size() int64 { return b.size }
func (b *fileBlob) WithContents(fn func(cache.Contents) error) error {
	return fn(cache.Contents{File: b.File})
}
func (b *fileBlob) Close() error {
	b.c.closes.Add(1)
	return b.File.Close()
}

func (c *dirCAS) Open(ctx context.Context, ns cache.Namespace, d *repb.Digest) (cache.Blob, error) {
	c.mu.Lock()
	c.order = append(c.order, d.Hash)
	c.mu.Unlock()
	c.opens.Add(1)
	if c.openDelay > 0 {
		time.Sleep(c.openDelay)
	}
	if c.openErr != nil {
		if err := c.openErr(d); err != nil {
			return nil, err
		}
	}
	b, err := os.ReadFile(c.path(d))
	if errors.Is(err, os.ErrNotExist) {
		return nil, cache.NotFoundf("blob %s not found", digest.String(d))
	}
	if err != nil {
		return nil, err
	}
	if got := digest.Compute(ns.Function, b); !digest.Equal(got, d) {
		return nil, status.Errorf(codes.DataLoss, "blob %s is corrupt", digest.String(d))
	}
	f, err := os.Open(c.path(d))
	if err != nil {
		return nil, err
	}
	return &fileBlob{File: f, size: d.SizeBytes, c: c}, nil
}

const testCS = 16 * PageSize // 64 KiB chunks keep test data small

// randBytes returns n deterministic pseudo-random bytes.
func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for k := range 8 {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

// layout builds file content: for each chunk, 'd' = random data,
// 'z' = explicit zeros, 'h' = hole (sparse), plus a short tail of tail bytes.
func layout(t testing.TB, dir, spec string, tail int) (string, []byte) {
	t.Helper()
	size := int64(len(spec))*testCS + int64(tail)
	want := make([]byte, size)
	path := filepath.Join(dir, "file")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for i, k := range spec {
		off := int64(i) * testCS
		switch k {
		case 'd':
			copy(want[off:], randBytes(uint64(i+1), testCS))
			if _, err := f.WriteAt(want[off:off+testCS], off); err != nil {
				t.Fatal(err)
			}
		case 'z':
			if _, err := f.WriteAt(make([]byte, testCS), off); err != nil {
				t.Fatal(err)
			}
		}
	}
	if tail > 0 {
		off := int64(len(spec)) * testCS
		copy(want[off:], randBytes(999, tail))
		if _, err := f.WriteAt(want[off:], off); err != nil {
			t.Fatal(err)
		}
	}
	return path, want
}

func testOpts(t testing.TB) Options {
	return Options{ChunkSize: testCS, TempDir: t.TempDir(), ReadAhead: -1}
}

// newStore splits a file with the given layout and returns a lazy store
// over the result, reopened so that nothing has been fetched.
func newStore(t *testing.T, spec string, tail int, opts Options) (*Store, *dirCAS, []byte) {
	t.Helper()
	cas := newDirCAS(t)
	path, want := layout(t, t.TempDir(), spec, tail)
	s0, _, err := FromFile(context.Background(), "mem", path, cas, cas, opts)
	if err != nil {
		t.Fatal(err)
	}
	cf := s0.ChunkedFile()
	if err := s0.Close(); err != nil {
		t.Fatal(err)
	}
	s, err := Open("mem", cf, cas, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	cas.opens.Store(0)
	cas.closes.Store(0)
	return s, cas, want
}

func readAll(t *testing.T, s *Store) []byte {
	t.Helper()
	got := make([]byte, s.Size())
	n, err := s.ReadAt(got, 0)
	if err != nil || n != len(got) {
		t.Fatalf("ReadAt(all) = %d, %v", n, err)
	}
	return got
}

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

func TestSave(t *testing.T) {
	tests := []struct {
		name        string
		spec        string
		tail        int
		writes      map[int64][]byte // offset -> data
		wantWritten int
		wantDirty   int
		wantTotal   int
		wantZero    int64
	}{
		{
			name: "k dirty chunks write k blobs", spec: "dddddd",
			writes:      map[int64][]byte{5: {1}, 2*testCS + 9: {2, 3}, 5 * testCS: {4}},
			wantWritten: 3, wantDirty: 3, wantTotal: 6,
		},
		{
			name: "write into hole", spec: "dhd",
			writes:      map[int64][]byte{testCS + 4096: {7}},
			wantWritten: 1, wantDirty: 1, wantTotal: 3,
		},
		{
			name: "zeroed chunk becomes hole", spec: "ddd",
			writes:      map[int64][]byte{testCS: make([]byte, testCS)},
			wantWritten: 0, wantDirty: 1, wantTotal: 2, wantZero: testCS,
		},
		{
			name: "zeroed short last chunk becomes hole", spec: "dd", tail: 300,
			writes:      map[int64][]byte{2 * testCS: make([]byte, 300)},
			wantWritten: 0, wantDirty: 1, wantTotal: 2, wantZero: 300,
		},
		{
			name: "identical dirty chunks stored once", spec: "ddd",
			writes:      map[int64][]byte{0: bytes.Repeat([]byte{9}, testCS), testCS: bytes.Repeat([]byte{9}, testCS)},
			wantWritten: 1, wantDirty: 2, wantTotal: 3,
		},
		{
			name: "rewriting the same content stores nothing", spec: "dd",
			writes:      map[int64][]byte{0: randBytes(1, 16)}, // the bytes already there
			wantWritten: 0, wantDirty: 1, wantTotal: 2,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, cas, want := newStore(t, tc.spec, tc.tail, testOpts(t))
			for off, p := range tc.writes {
				if _, err := s.WriteAt(p, off); err != nil {
					t.Fatal(err)
				}
				copy(want[off:], p)
			}
			writesBefore := cas.writes.Load()
			cf, st, err := s.Save(context.Background(), cas)
			if err != nil {
				t.Fatal(err)
			}
			if st.ChunksWritten != tc.wantWritten || st.ChunksDirty != tc.wantDirty || st.ChunksTotal != tc.wantTotal || st.BytesSkippedZero != tc.wantZero {
				t.Fatalf("SaveStats = %+v; want written %d dirty %d total %d zero %d", st, tc.wantWritten, tc.wantDirty, tc.wantTotal, tc.wantZero)
			}
			if got := cas.writes.Load() - writesBefore; got != 2*int64(tc.wantWritten) {
				t.Fatalf("sink received %d writes, want %d (chunks and their outboards)", got, 2*tc.wantWritten)
			}
			if st.BytesWritten > int64(tc.wantWritten)*testCS {
				t.Fatalf("BytesWritten = %d for %d chunks", st.BytesWritten, tc.wantWritten)
			}
			if err := ValidateChunkedFile(cf); err != nil {
				t.Fatalf("Save produced an invalid ChunkedFile: %v", err)
			}
			if d := s.Dirty(); len(d) != 0 {
				t.Fatalf("Dirty after Save = %v", d)
			}
			if !proto.Equal(cf, s.ChunkedFile()) {
				t.Fatal("ChunkedFile() differs from what Save returned")
			}
			if got := readAll(t, s); !bytes.Equal(got, want) {
				t.Fatal("store content changed by Save")
			}
			s2, err := Open("mem", cf, cas, testOpts(t))
			if err != nil {
				t.Fatal(err)
			}
			defer s2.Close()
			if got := readAll(t, s2); !bytes.Equal(got, want) {
				t.Fatal("a store over the saved ChunkedFile has other content")
			}
			// A second Save with nothing dirty stores nothing.
			_, st2, err := s.Save(context.Background(), cas)
			if err != nil || st2.ChunksWritten != 0 || st2.ChunksDirty != 0 || st2.ChunksTotal != tc.wantTotal {
				t.Fatalf("second Save = %+v, %v", st2, err)
			}
		})
	}
}

// failingSink fails every Write after the first n.
type failingSink struct {
	*dirCAS
	n atomic.Int64
}

func (f *failingSink) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	if f.n.Add(-1) < 0 {
		return status.Error(codes.Unavailable, "remote is down")
	}
	return f.dirCAS.Write(ctx, ns, d, r)
}

func TestSaveErrorKeepsDirty(t *testing.T) {
	s, cas, _ := newStore(t, "dddddddd", 0, testOpts(t))
	for i := range 8 {
		s.WriteAt([]byte{byte(i + 1)}, int64(i)*testCS)
	}
	sink := &failingSink{dirCAS: cas}
	sink.n.Store(2)
	_, _, err := s.Save(context.Background(), sink)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "offset") {
		t.Fatalf("Save error = %v; want Unavailable naming the offset", err)
	}
	if d := s.Dirty(); len(d) != 8 {
		t.Fatalf("after a failed Save, Dirty = %v; want all 8 chunks", d)
	}
	_, st, err := s.Save(context.Background(), cas)
	if err != nil || len(s.Dirty()) != 0 || st.ChunksDirty != 8 {
		t.Fatalf("retry: %+v, %v", st, err)
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

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
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

func TestFromFileSparse(t *testing.T) {
	cas := newDirCAS(t)
	path, want := layout(t, t.TempDir(), "hhdhzhdh", 0)
	opts := testOpts(t)
	s, st, err := FromFile(context.Background(), "disk", path, cas, cas, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// Only chunks 2, 4 (explicit zeros: data to SEEK_DATA) and 6 are read.
	if st.ChunksDirty != 3 || st.ChunksWritten != 2 || st.ChunksTotal != 2 || st.BytesSkippedZero != 6*testCS || st.BytesWritten != 2*testCS {
		t.Fatalf("SaveStats = %+v", st)
	}
	if n, _ := os.ReadDir(cas.dir); len(n) != 4 {
		t.Fatalf("sink holds %d blobs, want 4 (2 chunks and their outboards)", len(n))
	}
	if got := readAll(t, s); !bytes.Equal(got, want) {
		t.Fatal("content differs")
	}
	// Splitting again stores nothing new.
	s2, st2, err := FromFile(context.Background(), "disk", path, cas, cas, opts)
	if err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if st2.ChunksWritten != 0 {
		t.Fatalf("second split wrote %d blobs", st2.ChunksWritten)
	}
}

func TestFromFileDigestFunctions(t *testing.T) {
	for _, fn := range []digest.Function{digest.BLAKE3, digest.SHA256} {
		t.Run(fn.String(), func(t *testing.T) {
			cas := newDirCAS(t)
			path, want := layout(t, t.TempDir(), "dd", 10)
			opts := testOpts(t)
			opts.Namespace.Function = fn
			s, _, err := FromFile(context.Background(), "", path, cas, cas, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if s.Name() != "file" {
				t.Fatalf("Name = %q, want the file's base name", s.Name())
			}
			c := s.ChunkedFile().Chunks[0]
			if !digest.Equal(c.Digest, digest.Compute(fn, want[:testCS])) {
				t.Fatalf("chunk digest %s is not the %v of the data", digest.String(c.Digest), fn)
			}
			if got := readAll(t, s); !bytes.Equal(got, want) {
				t.Fatal("content differs")
			}
		})
	}
}

func TestFromFileErrors(t *testing.T) {
	cas := newDirCAS(t)
	if _, _, err := FromFile(context.Background(), "x", filepath.Join(t.TempDir(), "nope"), cas, cas, testOpts(t)); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("missing file: %v", err)
	}
	opts := testOpts(t)
	opts.ChunkSize = 5000
	path, _ := layout(t, t.TempDir(), "d", 0)
	if _, _, err := FromFile(context.Background(), "x", path, cas, cas, opts); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("bad chunk size: %v", err)
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

// hookSink runs a hook on the first FindMissing.
type hookSink struct {
	*dirCAS
	once sync.Once
	hook func()
}

func (h *hookSink) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	h.once.Do(h.hook)
	return h.dirCAS.FindMissing(ctx, ns, ds)
}

func TestWriteDuringSaveStaysDirty(t *testing.T) {
	s, cas, want := newStore(t, "ddd", 0, testOpts(t))
	first := randBytes(1000, 64)
	s.WriteAt(first, 0)
	snap := slices.Clone(want)
	copy(snap, first)
	second := randBytes(2000, 64)
	// FindMissing runs after chunk 0 was hashed: the hook writes to it and
	// to the clean chunk 1 while the Save is in flight.
	sink := &hookSink{dirCAS: cas, hook: func() {
		for _, off := range []int64{0, testCS} {
			if _, err := s.WriteAt(second, off); err != nil {
				t.Error(err)
			}
		}
	}}
	cf, st, err := s.Save(context.Background(), sink)
	if err != nil || st.ChunksWritten != 1 {
		t.Fatalf("Save = %+v, %v", st, err)
	}
	if got := s.Dirty(); fmt.Sprint(got) != fmt.Sprint([]int64{0, testCS}) {
		t.Fatalf("Dirty = %v; want [0 %d], the chunks written during Save", got, testCS)
	}
	s2, err := Open("mem", cf, cas, testOpts(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got := readAll(t, s2); !bytes.Equal(got, snap) {
		t.Fatal("the saved snapshot is not the content as of the Save")
	}
	copy(want, snap)
	copy(want, second)
	copy(want[testCS:], second)
	if got := readAll(t, s); !bytes.Equal(got, want) {
		t.Fatal("the store lost the writes made during Save")
	}
	cf2, st, err := s.Save(context.Background(), cas)
	if err != nil || st.ChunksWritten != 2 || len(s.Dirty()) != 0 {
		t.Fatalf("second Save = %+v, %v", st, err)
	}
	s3, err := Open("mem", cf2, cas, testOpts(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	if got := readAll(t, s3); !bytes.Equal(got, want) {
		t.Fatal("second snapshot content differs")
	}
}
