package fusefs

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/snaploader/snaploader/internal/testutil"
)

// BenchmarkColdSequentialRead copies a 256 MiB file with cp out of a FUSE
// mount and, for comparison, straight from its backing file. Every open of
// the mounted file starts with no cached pages, so each copy through FUSE
// is cold; the backing file is in the page cache for both.
//
//	go test -run '^$' -bench ColdSequentialRead ./fusefs
func BenchmarkColdSequentialRead(b *testing.B) {
	const size = 256 << 20
	requireFUSE(b)
	cp := testutil.LookPath(b, "cp")
	dir := b.TempDir()
	data := make([]byte, size)
	for i := 0; i < size; i += 4096 {
		data[i] = byte(i >> 12)
	}
	df := newDiskFile(b, dir, data)
	data = nil
	mnt := b.TempDir()
	s, err := Mount(context.Background(), mnt, map[string]File{"disk.raw": df}, Options{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Unmount(); s.Wait() })
	out := os.DevNull // measure reading only
	for _, bc := range []struct{ name, src string }{
		{"cp", df.f.Name()},
		{"cp-through-fuse", filepath.Join(mnt, "disk.raw")},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				if o, err := exec.Command(cp, bc.src, out).CombinedOutput(); err != nil {
					b.Fatalf("%v: %s", err, o)
				}
			}
		})
	}
}
