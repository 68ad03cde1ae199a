package localcache

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// TestPutHashedDirect stores blobs through PutHashed, whose large ones go
// to the disk past the page cache when their memory is page-aligned: the
// content reads back the same in a fresh instance, zero runs stay holes,
// and a direct write leaves no page of the file in the page cache (on a
// filesystem that takes direct writes).
func TestPutHashedDirect(t *testing.T) {
	dir := t.TempDir()
	direct := acceptsDirect(t, dir)
	for _, tc := range []struct {
		name     string
		size     int
		misalign int  // bytes the data starts after a page boundary
		holes    bool // a 1 MiB zero run in the middle
		bypass   bool // written past the page cache
	}{
		{"chunk", 4096000, 0, true, true},
		{"unaligned-tail", 3<<20 + 4097, 0, false, true},
		{"unaligned-memory", 1 << 20, 1, false, false},
		{"small", 100 << 10, 0, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCache(t, dir, Options{})
			mem := make([]byte, tc.size+directAlign)
			data := mem[tc.misalign : tc.misalign+tc.size]
			copy(data, content(uint64(tc.size), tc.size))
			if tc.holes {
				clear(data[tc.size/2-(1<<19) : tc.size/2+(1<<19)])
			}
			d := digest.Compute(ns.DigestFunction(), data)
			if err := c.PutHashed(context.Background(), ns, d, data); err != nil {
				t.Fatal(err)
			}
			path := c.Path(ns, d)
			if resident := residentPages(t, path); direct && tc.bypass && resident > 1 {
				t.Errorf("%d pages of the blob's file in the page cache after a direct write", resident)
			}
			var st unix.Stat_t
			if err := unix.Stat(path, &st); err != nil {
				t.Fatal(err)
			}
			if st.Size != int64(tc.size) {
				t.Errorf("file size %d, want %d", st.Size, tc.size)
			}
			if tc.holes && st.Blocks*512 > int64(tc.size)-(1<<19) {
				t.Errorf("file uses %d bytes of disk: the zero run was written", st.Blocks*512)
			}
			got, err := cache.ReadAll(context.Background(), newCache(t, dir, Options{}), ns, d)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("reading the blob back: %v (equal %v)", err, bytes.Equal(got, data))
			}
		})
	}
}

// acceptsDirect reports whether dir's filesystem opens files for direct
// I/O.
func acceptsDirect(t *testing.T, dir string) bool {
	f, err := os.OpenFile(filepath.Join(dir, "probe"), os.O_CREATE|os.O_RDWR|unix.O_DIRECT, 0o644)
	if err != nil {
		t.Logf("no direct I/O on %s: %v", dir, err)
		return false
	}
	f.Close()
	os.Remove(f.Name())
	return true
}

// residentPages counts the pages of the file at path in the page cache.
func residentPages(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(unsafe.SliceData(m))), uintptr(len(m)), uintptr(unsafe.Pointer(unsafe.SliceData(vec)))); errno != 0 {
		t.Fatal(errno)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}
