package cow

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

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

// PutHashed fails as Write does.
func (f *failingSink) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	return f.Write(ctx, ns, d, bytes.NewReader(data))
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
