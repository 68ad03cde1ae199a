package cow

import (
	"context"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"

	"github.com/snaploader/snaploader/internal/testutil"
)

// benchSize is SNAPLOADER_BENCH_MIB MiB (default 1024).
func benchSize(b *testing.B) int64 { return testutil.BenchMiB(b, 1024) << 20 }

// benchFile writes a file of VM-like pages: ~30% zero pages, the rest
// random, into a fresh directory under os.TempDir(); removed after b.
func benchFile(b *testing.B, size int64) (dir, path string) {
	b.Helper()
	dir, err := os.MkdirTemp("", "cow-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	path = filepath.Join(dir, "mem")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		for p := int64(0); p < n; p += PageSize {
			page := buf[p:min(p+PageSize, n)]
			if r.IntN(10) < 3 {
				clear(page)
				continue
			}
			for i := 0; i+8 <= len(page); i += 8 {
				v := r.Uint64()
				for k := range 8 {
					page[i+k] = byte(v >> (8 * k))
				}
			}
		}
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			b.Fatal(err)
		}
	}
	return dir, path
}

func benchCp(b *testing.B, src, dst string) {
	b.Helper()
	if out, err := exec.Command("cp", src, dst).CombinedOutput(); err != nil {
		b.Fatalf("cp: %v: %s", err, out)
	}
}

// BenchmarkFromFile compares splitting a file into a fresh local cache with
// cp of the same file.
func BenchmarkFromFile(b *testing.B) {
	size := benchSize(b)
	dir, path := benchFile(b, size)
	b.Run("cp", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			dst := filepath.Join(dir, "copy")
			benchCp(b, path, dst)
			b.StopTimer()
			os.Remove(dst)
			b.StartTimer()
		}
	})
	b.Run("fromfile", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			b.StopTimer()
			cdir := filepath.Join(dir, "cache")
			os.RemoveAll(cdir)
			lc, err := localcache.New(cdir, localcache.Options{MaxBytes: 4 * size})
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			s, st, err := FromFile(context.Background(), "mem", path, lc, lc, Options{TempDir: dir})
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if st.ChunksWritten == 0 {
				b.Fatal("nothing stored")
			}
			s.Close()
			lc.Close()
			os.RemoveAll(cdir)
			b.StartTimer()
		}
	})
	b.Run("fromfile-discard", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			s, _, err := FromFile(context.Background(), "mem", path, &dirCAS{}, discardSink{}, Options{TempDir: dir})
			if err != nil {
				b.Fatal(err)
			}
			s.Close()
		}
	})
}

// discardSink reports every blob missing and drops what it is given: it
// isolates FromFile's own reading, hashing and scheduling.
type discardSink struct{}

func (discardSink) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	return ds, nil
}

func (discardSink) PutHashed(context.Context, cache.Namespace, *repb.Digest, []byte) error {
	return nil
}

func (discardSink) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	_, err := io.Copy(io.Discard, r)
	return err
}

// BenchmarkSaveIncremental saves a store with 1% of its chunks dirtied.
func BenchmarkSaveIncremental(b *testing.B) {
	size := benchSize(b)
	dir, path := benchFile(b, size)
	lc, err := localcache.New(filepath.Join(dir, "cache"), localcache.Options{MaxBytes: 4 * size})
	if err != nil {
		b.Fatal(err)
	}
	defer lc.Close()
	s, _, err := FromFile(context.Background(), "mem", path, lc, lc, Options{TempDir: dir})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	n := (size + s.ChunkSize() - 1) / s.ChunkSize()
	k := max(1, n/100)
	r := rand.New(rand.NewPCG(3, 4))
	p := make([]byte, 4096)
	b.SetBytes(k * s.ChunkSize())
	for b.Loop() {
		b.StopTimer()
		for range k {
			for i := range p {
				p[i] = byte(r.Uint32())
			}
			if _, err := s.WriteAt(p, r.Int64N(n)*s.ChunkSize()); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
		_, st, err := s.Save(context.Background(), lc)
		if err != nil {
			b.Fatal(err)
		}
		if st.ChunksDirty == 0 || len(s.Dirty()) != 0 {
			b.Fatalf("save stats %+v", st)
		}
	}
	b.ReportMetric(float64(k), "dirty-chunks")
}

// BenchmarkSequentialRead reads a whole lazy store over the local cache,
// 1 MiB at a time, compared with cp of the original file.
func BenchmarkSequentialRead(b *testing.B) {
	size := benchSize(b)
	dir, path := benchFile(b, size)
	lc, err := localcache.New(filepath.Join(dir, "cache"), localcache.Options{MaxBytes: 4 * size})
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
	dst := filepath.Join(dir, "copy")
	b.Run("cp", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			benchCp(b, path, dst)
			b.StopTimer()
			os.Remove(dst)
			b.StartTimer()
		}
	})
	read := func(b *testing.B, toFile bool) {
		b.SetBytes(size)
		for b.Loop() {
			s, err := Open("mem", cf, lc, Options{TempDir: dir})
			if err != nil {
				b.Fatal(err)
			}
			var w io.Writer = io.Discard
			var f *os.File
			if toFile {
				if f, err = os.Create(dst); err != nil {
					b.Fatal(err)
				}
				w = f
			}
			buf := make([]byte, 1<<20)
			for off := int64(0); off < s.Size(); off += int64(len(buf)) {
				n, err := s.ReadAt(buf, off)
				if err != nil && err != io.EOF {
					b.Fatal(err)
				}
				if _, err := w.Write(buf[:n]); err != nil {
					b.Fatal(err)
				}
			}
			s.Close()
			if f != nil {
				f.Close()
				b.StopTimer()
				os.Remove(dst)
				b.StartTimer()
			}
		}
	}
	b.Run("store-to-file", func(b *testing.B) { read(b, true) })
	b.Run("store-read", func(b *testing.B) { read(b, false) })
}
