package cow

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// lazyRead reads a lazy store of cf over lc whole, 1 MiB at a time.
func lazyRead(tb testing.TB, cf *snapshotpb.ChunkedFile, lc *localcache.Cache, dir string, w io.Writer) {
	tb.Helper()
	s, err := Open("mem", cf, lc, Options{TempDir: dir})
	if err != nil {
		tb.Fatal(err)
	}
	defer s.Close()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < s.Size(); off += int64(len(buf)) {
		n, err := s.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			tb.Fatal(err)
		}
		w.Write(buf[:n])
	}
}

// TestLazyReadsOverCompressedCache: a VM-like file split into a local cache
// that compresses at rest reads back byte for byte through a lazy store, in
// the process that stored it and in a fresh one.
func TestLazyReadsOverCompressedCache(t *testing.T) {
	dir := t.TempDir()
	img := testutil.VMImage(5, 20<<20+12345)
	path := filepath.Join(dir, "mem")
	if err := os.WriteFile(path, img, 0o644); err != nil {
		t.Fatal(err)
	}
	lc, err := localcache.New(filepath.Join(dir, "cache"), localcache.Options{Compression: true})
	if err != nil {
		t.Fatal(err)
	}
	s0, _, err := FromFile(context.Background(), "mem", path, lc, lc, Options{TempDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	cf := s0.ChunkedFile()
	s0.Close()
	if u := lc.Usage(); u*10 >= int64(len(img))*6 {
		t.Errorf("the compressing cache takes %d bytes for a %d-byte image", u, len(img))
	}
	fresh, err := localcache.New(lc.Dir(), localcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*localcache.Cache{lc, fresh} {
		var got bytes.Buffer
		lazyRead(t, cf, c, dir, &got)
		if !bytes.Equal(got.Bytes(), img) {
			t.Fatalf("lazy read gives %d bytes that differ from the %d stored", got.Len(), len(img))
		}
	}
}

// BenchmarkSequentialReadCompression reads a whole lazy store of a VM-like
// image (SNAPLOADER_BENCH_MIB MiB, default 1024) over a local cache with and
// without compression at rest, and reports what the cache stores.
//
//	SNAPLOADER_BENCH_MIB=1024 go test -run '^$' -bench SequentialReadCompression -benchtime 3x ./cow/
func BenchmarkSequentialReadCompression(b *testing.B) {
	size := benchSize(b)
	dir := b.TempDir()
	path := filepath.Join(dir, "mem")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	if err := testutil.WriteVMImage(f, 9, size); err != nil {
		b.Fatal(err)
	}
	f.Close()
	for _, on := range []bool{false, true} {
		name := "raw"
		if on {
			name = "compressed"
		}
		b.Run(name, func(b *testing.B) {
			lc, err := localcache.New(filepath.Join(dir, name), localcache.Options{MaxBytes: 4 * size, Compression: on})
			if err != nil {
				b.Fatal(err)
			}
			defer lc.Close()
			s0, _, err := FromFile(context.Background(), "mem", path, lc, lc, Options{TempDir: dir})
			if err != nil {
				b.Fatal(err)
			}
			cf := s0.ChunkedFile()
			s0.Close()
			b.SetBytes(size)
			for b.Loop() {
				lazyRead(b, cf, lc, dir, io.Discard)
			}
			b.ReportMetric(float64(lc.Usage())/(1<<20), "stored-MiB")
		})
	}
}
