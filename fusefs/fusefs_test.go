package fusefs

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/internal/testutil"
)

// TestMain lets the test binary act as a separate process that maps a
// mounted file: a Go process must not fault pages of a FUSE file it serves
// itself, since a stop-the-world pause would stop the server too.
func TestMain(m *testing.M) {
	if os.Getenv("FUSEFS_MMAP_HELPER") != "" {
		if err := mmapHelper(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// mmapHelper maps PATH shared, checks it equals the bytes at CHECK (a
// plain file), writes 0xab over [OFF, OFF+LEN) and msyncs.
func mmapHelper(args []string) error {
	if len(args) != 4 {
		return fmt.Errorf("usage: PATH CHECK OFF LEN, got %q", args)
	}
	path, check := args[0], args[1]
	off, _ := strconv.Atoi(args[2])
	n, _ := strconv.Atoi(args[3])
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	want, err := os.ReadFile(check)
	if err != nil {
		return err
	}
	if !bytes.Equal(mem, want) {
		return errors.New("mapped contents differ from the source")
	}
	for i := off; i < off+n; i++ {
		mem[i] = 0xab
	}
	if err := unix.Msync(mem, unix.MS_SYNC); err != nil {
		return fmt.Errorf("msync: %w", err)
	}
	return unix.Munmap(mem)
}

// diskFile is a File backed by a real file; it fails the test on any
// access outside its size.
type diskFile struct {
	t       testing.TB
	f       *os.File
	size    int64
	writes  atomic.Int64
	flushes atomic.Int64
	failAt  int64 // ReadAt of this offset fails, if >= 0
}

func newDiskFile(t testing.TB, dir string, data []byte) *diskFile {
	t.Helper()
	p := filepath.Join(dir, fmt.Sprintf("backing-%d", mrand.Int64()))
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &diskFile{t: t, f: f, size: int64(len(data)), failAt: -1}
}

func (d *diskFile) check(op string, n int, off int64) error {
	if off < 0 || off+int64(n) > d.size {
		d.t.Errorf("%s of %d bytes at %d outside the %d-byte file", op, n, off, d.size)
		return syscall.EINVAL
	}
	return nil
}

func (d *diskFile) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check("read", len(p), off); err != nil {
		return 0, err
	}
	if d.failAt >= 0 && off <= d.failAt && d.failAt < off+int64(len(p)) {
		return 0, fmt.Errorf("reading chunk at offset %d: injected failure", d.failAt)
	}
	return d.f.ReadAt(p, off)
}

func (d *diskFile) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check("write", len(p), off); err != nil {
		return 0, err
	}
	d.writes.Add(1)
	return d.f.WriteAt(p, off)
}

func (d *diskFile) Size() int64 { return d.size }

func (d *diskFile) Flush() error { d.flushes.Add(1); return d.f.Sync() }

func (d *diskFile) contents(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(d.f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func requireFUSE(t testing.TB) {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireDevice(t, "/dev/fuse")
}

// mount mounts files on a fresh directory and unmounts when the test ends.
func mount(t testing.TB, files map[string]File, opts Options) *Server {
	t.Helper()
	requireFUSE(t)
	dir := t.TempDir()
	s, err := Mount(context.Background(), dir, files, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
		}
		waitFor(t, "the FUSE server to stop", s.Wait)
	})
	return s
}

func waitFor(t testing.TB, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func mounted(t testing.TB, dir string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}

func TestReadWholeFiles(t *testing.T) {
	dir := t.TempDir()
	data := map[string][]byte{
		"disk.raw": randomBytes(8 << 20),
		"odd-size": randomBytes(3<<20 + 123),
		"empty":    {},
	}
	files := map[string]File{}
	for name, b := range data {
		files[name] = newDiskFile(t, dir, b)
	}
	s := mount(t, files, Options{})
	ents, err := os.ReadDir(s.Dir())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	slices.Sort(names)
	if want := []string{"disk.raw", "empty", "odd-size"}; !slices.Equal(names, want) {
		t.Fatalf("directory lists %q, want %q", names, want)
	}
	for name, want := range data {
		st, err := os.Stat(filepath.Join(s.Dir(), name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() != int64(len(want)) || !st.Mode().IsRegular() || st.Mode().Perm() != 0o644 {
			t.Errorf("%s: size %d mode %v, want regular 0644 of %d bytes", name, st.Size(), st.Mode(), len(want))
		}
		got, err := os.ReadFile(filepath.Join(s.Dir(), name))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: read %d bytes differing from the %d-byte source", name, len(got), len(want))
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(s.Dir(), &st); err != nil {
		t.Fatal(err)
	}
	ra, err := os.ReadFile(fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev)))
	if err == nil && strings.TrimSpace(string(ra)) != "1024" {
		t.Errorf("read-ahead of the mount is %s KiB, want 1024", ra)
	}
	if _, err := os.Stat(filepath.Join(s.Dir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat of a missing name: %v", err)
	}
}

func TestPwriteReadsBack(t *testing.T) {
	const size = 4<<20 + 100
	tests := []struct {
		name string
		off  int64
		n    int
	}{
		{"page-aligned", 8192, 4096},
		{"unaligned-across-pages", 4000, 10000},
		{"large", 1 << 20, 2 << 20},
		{"last-byte", size - 1, 1},
		{"first-byte", 0, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := randomBytes(size)
			df := newDiskFile(t, t.TempDir(), src)
			s := mount(t, map[string]File{"f": df}, Options{})
			path := filepath.Join(s.Dir(), "f")
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			// Read first so the kernel has the pages cached.
			if _, err := io.ReadAll(f); err != nil {
				t.Fatal(err)
			}
			payload := randomBytes(tc.n)
			if n, err := f.WriteAt(payload, tc.off); err != nil || n != tc.n {
				t.Fatalf("pwrite: %d, %v", n, err)
			}
			want := bytes.Clone(src)
			copy(want[tc.off:], payload)

			got := make([]byte, tc.n)
			if _, err := f.ReadAt(got, tc.off); err != nil || !bytes.Equal(got, payload) {
				t.Fatalf("pread through the same descriptor: %v, equal %v", err, bytes.Equal(got, payload))
			}
			again, err := os.ReadFile(path)
			if err != nil || !bytes.Equal(again, want) {
				t.Fatalf("reading through a new descriptor: %v, equal %v", err, bytes.Equal(again, want))
			}
			fromFile := make([]byte, size)
			if _, err := df.ReadAt(fromFile, 0); err != nil || !bytes.Equal(fromFile, want) {
				t.Fatalf("File.ReadAt: %v, equal %v", err, bytes.Equal(fromFile, want))
			}
			if err := f.Sync(); err != nil {
				t.Fatalf("fsync: %v", err)
			}
			if df.flushes.Load() == 0 {
				t.Error("fsync did not reach Flush")
			}
		})
	}
}

func TestSizeIsFixed(t *testing.T) {
	const size = 1 << 20
	src := randomBytes(size)
	df := newDiskFile(t, t.TempDir(), src)
	s := mount(t, map[string]File{"f": df}, Options{})
	path := filepath.Join(s.Dir(), "f")
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tests := []struct {
		name    string
		op      func() (int, error)
		wantN   int
		wantErr error
	}{
		{"write-at-end", func() (int, error) { return f.WriteAt([]byte("x"), size) }, 0, syscall.EFBIG},
		{"write-far-beyond", func() (int, error) { return f.WriteAt([]byte("x"), 10*size) }, 0, syscall.EFBIG},
		{"write-crossing-end-is-short", func() (int, error) {
			n, err := unix.Pwrite(int(f.Fd()), bytes.Repeat([]byte{0xcc}, 100), size-10)
			return n, err
		}, 10, nil},
		{"grow", func() (int, error) { return 0, f.Truncate(2 * size) }, 0, syscall.EFBIG},
		{"shrink", func() (int, error) { return 0, f.Truncate(size / 2) }, 0, syscall.EPERM},
		{"same-size", func() (int, error) { return 0, f.Truncate(size) }, 0, nil},
		{"chmod-ignored", func() (int, error) { return 0, f.Chmod(0o600) }, 0, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n, err := tc.op()
			if n != tc.wantN || !errors.Is(err, tc.wantErr) && !(err == nil && tc.wantErr == nil) {
				t.Fatalf("got %d, %v; want %d, %v", n, err, tc.wantN, tc.wantErr)
			}
		})
	}
	if st, err := os.Stat(path); err != nil || st.Size() != size {
		t.Fatalf("size after the attempts: %v %v", st.Size(), err)
	}
	want := bytes.Clone(src)
	for i := size - 10; i < size; i++ {
		want[i] = 0xcc
	}
	if !bytes.Equal(df.contents(t), want) {
		t.Fatal("file changed other than by the 10 bytes before the end")
	}
}

func TestMmapSharedWriteReachesFile(t *testing.T) {
	const size = 8 << 20
	src := randomBytes(size)
	dir := t.TempDir()
	df := newDiskFile(t, dir, src)
	srcPath := filepath.Join(dir, "source")
	if err := os.WriteFile(srcPath, src, 0o644); err != nil {
		t.Fatal(err)
	}
	s := mount(t, map[string]File{"mem": df}, Options{})
	tests := []struct{ off, n int }{
		{4096, 3 * 4096},
		{size/2 + 17, 100000},
	}
	want := bytes.Clone(src)
	for _, tc := range tests {
		before := df.writes.Load()
		cmd := exec.Command(os.Args[0], filepath.Join(s.Dir(), "mem"), srcPath, strconv.Itoa(tc.off), strconv.Itoa(tc.n))
		cmd.Env = append(os.Environ(), "FUSEFS_MMAP_HELPER=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("mmap helper: %v\n%s", err, out)
		}
		if df.writes.Load() == before {
			t.Fatal("msync of a MAP_SHARED mapping did not reach WriteAt")
		}
		for i := tc.off; i < tc.off+tc.n; i++ {
			want[i] = 0xab
		}
		if !bytes.Equal(df.contents(t), want) {
			t.Fatalf("after mmap write of [%d, %d): File contents differ", tc.off, tc.off+tc.n)
		}
		// The next mapping starts from the written contents.
		if err := os.WriteFile(srcPath, want, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestConcurrentReaders(t *testing.T) {
	const size = 16 << 20
	src := randomBytes(size)
	s := mount(t, map[string]File{"f": newDiskFile(t, t.TempDir(), src)}, Options{ReadOnly: true})
	path := filepath.Join(s.Dir(), "f")
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.Open(path)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			r := mrand.New(mrand.NewPCG(uint64(g), 1))
			buf := make([]byte, 300<<10)
			for range 50 {
				n := 1 + r.IntN(len(buf))
				off := r.Int64N(size - int64(n))
				if _, err := f.ReadAt(buf[:n], off); err != nil {
					errs <- fmt.Errorf("pread %d at %d: %w", n, off, err)
					return
				}
				if !bytes.Equal(buf[:n], src[off:off+int64(n)]) {
					errs <- fmt.Errorf("pread %d at %d: wrong data", n, off)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestReadOnly(t *testing.T) {
	src := randomBytes(1 << 20)
	df := newDiskFile(t, t.TempDir(), src)
	s := mount(t, map[string]File{"f": df}, Options{ReadOnly: true})
	path := filepath.Join(s.Dir(), "f")
	if _, err := os.OpenFile(path, os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("opening read-write: %v, want EROFS", err)
	}
	if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, src) {
		t.Fatalf("read: %v", err)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o444 {
		t.Errorf("mode %v, want 0444", st.Mode())
	}
	if df.writes.Load() != 0 {
		t.Fatal("read-only file was written")
	}
}

func TestReadErrorIsEIO(t *testing.T) {
	src := randomBytes(2 << 20)
	df := newDiskFile(t, t.TempDir(), src)
	df.failAt = 1<<20 + 5
	s := mount(t, map[string]File{"f": df}, Options{})
	f, err := os.Open(filepath.Join(s.Dir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	if _, err := f.ReadAt(buf, 1<<20); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read over a failing range: %v, want EIO", err)
	}
	if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, src[:4096]) {
		t.Fatalf("read of a good range after a failure: %v", err)
	}
}

func TestInvalidate(t *testing.T) {
	src := randomBytes(1 << 20)
	df := newDiskFile(t, t.TempDir(), src)
	s := mount(t, map[string]File{"f": df}, Options{})
	f, err := os.Open(filepath.Join(s.Dir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	f.ReadAt(buf, 0) // cache the page
	if _, err := df.WriteAt(bytes.Repeat([]byte{0x77}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Invalidate("f"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{0x77}, 4096)) {
		t.Fatalf("read after Invalidate: %v, fresh %v", err, bytes.Equal(buf, bytes.Repeat([]byte{0x77}, 4096)))
	}
	if err := s.Invalidate("nope"); err == nil {
		t.Fatal("Invalidate of an unknown name succeeded")
	}
}

func TestUnmount(t *testing.T) {
	requireFUSE(t)
	src := randomBytes(1 << 20)

	t.Run("busy-mount-detaches", func(t *testing.T) {
		dir := t.TempDir()
		s, err := Mount(context.Background(), dir, map[string]File{"f": newDiskFile(t, t.TempDir(), src)}, Options{})
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(filepath.Join(dir, "f"))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Unmount(); err != nil {
			t.Fatalf("Unmount with an open file: %v", err)
		}
		if mounted(t, dir) {
			t.Fatal("still mounted")
		}
		buf := make([]byte, 4096)
		if _, err := f.ReadAt(buf, 8192); err != nil || !bytes.Equal(buf, src[8192:8192+4096]) {
			t.Fatalf("open file after a lazy unmount: %v", err)
		}
		f.Close()
		waitFor(t, "the server to stop after the last file closed", s.Wait)
		if err := s.Unmount(); err != nil {
			t.Fatalf("second Unmount: %v", err)
		}
	})
	t.Run("context-end-unmounts", func(t *testing.T) {
		dir := t.TempDir()
		ctx, cancel := context.WithCancel(context.Background())
		s, err := Mount(ctx, dir, map[string]File{"f": newDiskFile(t, t.TempDir(), src)}, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if !mounted(t, dir) {
			t.Fatal("not mounted")
		}
		cancel()
		waitFor(t, "the server to stop after the context ended", s.Wait)
		if mounted(t, dir) {
			t.Fatal("still mounted after the context ended")
		}
		if err := s.Unmount(); err != nil {
			t.Fatalf("Unmount after the context ended: %v", err)
		}
	})
	t.Run("after-io-errors", func(t *testing.T) {
		dir := t.TempDir()
		df := newDiskFile(t, t.TempDir(), src)
		df.failAt = 0
		s, err := Mount(context.Background(), dir, map[string]File{"f": df}, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.ReadFile(filepath.Join(dir, "f")); err == nil {
			t.Fatal("read of a failing file succeeded")
		}
		if err := s.Unmount(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the server to stop", s.Wait)
		if mounted(t, dir) {
			t.Fatal("still mounted")
		}
	})
	t.Run("bad-arguments", func(t *testing.T) {
		tests := []struct {
			name  string
			dir   string
			files map[string]File
		}{
			{"missing-dir", filepath.Join(t.TempDir(), "nope"), map[string]File{"f": newDiskFile(t, t.TempDir(), src)}},
			{"slash-in-name", t.TempDir(), map[string]File{"a/b": newDiskFile(t, t.TempDir(), src)}},
			{"dot-dot", t.TempDir(), map[string]File{"..": newDiskFile(t, t.TempDir(), src)}},
			{"nil-file", t.TempDir(), map[string]File{"f": nil}},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				s, err := Mount(context.Background(), tc.dir, tc.files, Options{})
				if err == nil {
					s.Unmount()
					t.Fatal("Mount succeeded")
				}
				if mounted(t, tc.dir) {
					t.Fatal("left a mount behind")
				}
			})
		}
	})
}
