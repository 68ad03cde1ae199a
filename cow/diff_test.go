package cow

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// dirty is a page range a VMM wrote since the base snapshot; zero says it
// now holds zeros.
type dirty struct {
	off, n int64
	zero   bool
}

// writeDiff writes a sparse diff file of size bytes holding only the dirty
// ranges, as a VMM's diff snapshot does, and returns the full memory the
// VMM would have written instead: base (zero-extended to size) with the
// dirty ranges applied.
func writeDiff(t *testing.T, base []byte, size int64, ds []dirty) (string, []byte) {
	t.Helper()
	full := make([]byte, size)
	copy(full, base)
	path := filepath.Join(t.TempDir(), "mem.diff")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for i, d := range ds {
		p := make([]byte, d.n)
		if !d.zero {
			p = randBytes(uint64(1000+i), int(d.n))
		}
		copy(full[d.off:], p)
		if _, err := f.WriteAt(p, d.off); err != nil {
			t.Fatal(err)
		}
	}
	return path, full
}

// countingReader records every read of the diff.
type countingReader struct {
	f     *os.File
	mu    sync.Mutex
	reads []Region
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	c.reads = append(c.reads, Region{off, int64(len(p))})
	c.mu.Unlock()
	return c.f.ReadAt(p, off)
}

func TestMergeDiff(t *testing.T) {
	const cs = testCS
	tests := []struct {
		name      string
		spec      string // base layout (see layout)
		tail      int
		size      int64 // diff size; 0 = the base's
		ds        []dirty
		wantOpens int64 // base blobs opened: chunks with data the diff covers partly
	}{
		{
			name: "pages in several chunks",
			spec: "dddhdd",
			ds: []dirty{
				{off: PageSize, n: PageSize},                    // chunk 0: one page
				{off: cs + 3*PageSize, n: PageSize, zero: true}, // chunk 1: a page became zero
				{off: 2 * cs, n: cs, zero: true},                // chunk 2: all zero now
				{off: 3*cs + 5*PageSize, n: PageSize},           // chunk 3: was a hole
				{off: 5*cs - PageSize, n: 2 * PageSize},         // across chunks 4 and 5
			},
			wantOpens: 4, // chunks 0, 1, 4, 5
		},
		{
			name: "whole chunks are not fetched",
			spec: "dddd",
			ds:   []dirty{{off: cs, n: 2 * cs}},
		},
		{
			name: "grows the file",
			spec: "dd",
			tail: 1000,
			size: 4*cs + 500,
			ds: []dirty{
				{off: 2 * cs, n: PageSize},          // the short last chunk, growing
				{off: 3*cs + PageSize, n: PageSize}, // beyond the base
				{off: 4 * cs, n: 500},               // the new short tail
				{off: 0, n: PageSize, zero: true},   // a page of the base became zero
			},
			wantOpens: 2, // chunks 0 and 2
		},
		{name: "no dirty page", spec: "dhd"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			s, cas, base := newStore(t, tc.spec, tc.tail, testOpts(t))
			size := tc.size
			if size == 0 {
				size = s.Size()
			}
			slices.SortFunc(tc.ds, func(a, b dirty) int { return int(a.off - b.off) })
			path, full := writeDiff(t, base, size, tc.ds)

			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			regions, err := DataRegions(f, size)
			if err != nil {
				t.Fatal(err)
			}
			var dirtyBytes int64
			for _, d := range tc.ds {
				dirtyBytes += d.n
			}
			var regionBytes int64
			for _, r := range regions {
				regionBytes += r.Len
			}
			if regionBytes != dirtyBytes {
				t.Fatalf("data regions %v hold %d bytes, want the %d dirty bytes (does this filesystem keep holes?)", regions, regionBytes, dirtyBytes)
			}

			cr := &countingReader{f: f}
			st, err := s.MergeDiff(ctx, cr, size, regions)
			if err != nil {
				t.Fatal(err)
			}
			// Only data regions were read, each byte once.
			var read int64
			for _, r := range cr.reads {
				read += r.Len
				if !slices.ContainsFunc(regions, func(g Region) bool { return r.Off >= g.Off && r.Off+r.Len <= g.Off+g.Len }) {
					t.Errorf("read [%d, +%d) lies outside the diff's data regions %v", r.Off, r.Len, regions)
				}
			}
			if read != dirtyBytes || st.BytesRead != dirtyBytes || st.DataBytes != dirtyBytes {
				t.Errorf("read %d bytes (stats: %d read, %d data), want exactly the %d dirty bytes", read, st.BytesRead, st.DataBytes, dirtyBytes)
			}
			if got := cas.opens.Load(); got != tc.wantOpens {
				t.Errorf("%d base blobs opened, want %d", got, tc.wantOpens)
			}
			chunksHit := map[int64]bool{}
			for _, d := range tc.ds {
				for o := d.off / cs; o*cs < d.off+d.n; o++ {
					chunksHit[o] = true
				}
			}
			if len(s.Dirty()) != len(chunksHit) || st.ChunksWritten != len(chunksHit) {
				t.Errorf("%d chunks dirty (%d written), want the %d the diff covers", len(s.Dirty()), st.ChunksWritten, len(chunksHit))
			}
			if len(s.Touched()) != 0 {
				t.Errorf("merging recorded touched chunks %v", s.Touched())
			}
			if s.Size() != size || !slices.Equal(readAll(t, s), full) {
				t.Fatalf("merged store (size %d) differs from the full memory file (size %d)", s.Size(), size)
			}

			// Save and restore from the new description: byte-for-byte the
			// full memory file, pages that became zero included.
			cf, sst, err := s.Save(ctx, cas)
			if err != nil {
				t.Fatal(err)
			}
			if sst.ChunksDirty != len(chunksHit) {
				t.Errorf("save hashed %d chunks, want the %d the diff covers", sst.ChunksDirty, len(chunksHit))
			}
			r, err := Open("mem", cf, cas, testOpts(t))
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if r.Size() != size || !slices.Equal(readAll(t, r), full) {
				t.Fatal("restored snapshot differs from the full memory file")
			}
			for _, c := range cf.GetChunks() {
				if o := c.GetOffset(); slices.Equal(full[o:min(o+cs, size)], make([]byte, min(cs, size-o))) {
					t.Errorf("all-zero chunk at offset %d is listed, want a hole", o)
				}
			}
		})
	}
}

func TestMergeDiffFileRejects(t *testing.T) {
	ctx := context.Background()
	s, _, base := newStore(t, "ddd", 0, testOpts(t))
	tests := []struct {
		name string
		path func(t *testing.T) string
		code codes.Code
		want string
	}{
		{"shorter than the base", func(t *testing.T) string {
			p, _ := writeDiff(t, base, s.Size()-PageSize, []dirty{{off: 0, n: PageSize}})
			return p
		}, codes.InvalidArgument, "fewer than the base's"},
		{"a directory", func(t *testing.T) string { return t.TempDir() }, codes.InvalidArgument, "directory"},
		{"missing", func(t *testing.T) string { return filepath.Join(t.TempDir(), "nope") }, codes.InvalidArgument, "no such file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.path(t)
			_, err := s.MergeDiffFile(ctx, p)
			if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), filepath.Base(p)) {
				t.Fatalf("MergeDiffFile(%s) = %v, want %v naming the file and containing %q", p, err, tc.code, tc.want)
			}
			if len(s.Dirty()) != 0 || s.Size() != int64(len(base)) {
				t.Errorf("a rejected diff changed the store: %d dirty chunks, size %d", len(s.Dirty()), s.Size())
			}
		})
	}
	if _, err := s.MergeDiff(ctx, strings.NewReader(""), s.Size(), []Region{{2 * PageSize, PageSize}, {0, PageSize}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("unordered regions: %v, want InvalidArgument", err)
	}
}

func TestMergeDiffFileReadsOnlyData(t *testing.T) {
	ctx := context.Background()
	s, _, base := newStore(t, "dddddddd", 0, testOpts(t))
	ds := []dirty{{off: 3 * PageSize, n: PageSize}, {off: 5 * testCS, n: 2 * PageSize, zero: true}}
	path, full := writeDiff(t, base, s.Size(), ds)
	st, err := s.MergeDiffFile(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if st.BytesRead != 3*PageSize || st.DataRegions != 2 || st.DiffSize != int64(len(base)) {
		t.Errorf("stats %+v, want 2 regions and %d bytes read", st, 3*PageSize)
	}
	if !slices.Equal(readAll(t, s), full) {
		t.Fatal("merged store differs from the full memory file")
	}
}

func TestCarryWorkingSet(t *testing.T) {
	s, _, _ := newStore(t, "ddhdd", 0, testOpts(t))
	if _, err := s.ReadAt(make([]byte, 1), 4*testCS); err != nil {
		t.Fatal(err)
	}
	s.CarryWorkingSet([]int64{3 * testCS, 2 * testCS, 0, 4 * testCS, 77, 99 * testCS})
	if got, want := s.Touched(), []int64{3 * testCS, 0, 4 * testCS}; !slices.Equal(got, want) {
		t.Errorf("Touched() = %v, want %v (carried chunks first, holes, duplicates and bad offsets skipped)", got, want)
	}
	if st := s.Stats(); st.Fetched != 1 {
		t.Errorf("carrying a working set fetched %d chunks, want only the one read", st.Fetched)
	}
}
