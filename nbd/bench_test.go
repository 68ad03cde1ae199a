package nbd

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/snaploader/snaploader/internal/testutil"
)

// BenchmarkSequentialRead copies a 256 MiB file out of an NBD export with
// qemu-img convert, and the same file with cp, for a throughput ratio.
// The source is in the page cache for both.
//
//	go test -run '^$' -bench SequentialRead ./nbd
func BenchmarkSequentialRead(b *testing.B) {
	const size = 256 << 20
	qemuImg := testutil.LookPath(b, "qemu-img")
	cp := testutil.LookPath(b, "cp")
	dir := b.TempDir()
	src := filepath.Join(dir, "src.raw")
	f, err := os.Create(src)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + i>>12)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		buf[0]++
		if _, err := f.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	out := filepath.Join(dir, "out.raw")
	srv := NewServer(Options{})
	if err := srv.AddExport("disk", newFileDevice(b, src, size), true); err != nil {
		b.Fatal(err)
	}
	uri := "nbd+unix:///disk?socket=" + serve(b, srv)
	for _, bc := range []struct {
		name string
		cmd  func() *exec.Cmd
	}{
		{"cp", func() *exec.Cmd { return exec.Command(cp, src, out) }},
		{"qemu-img-convert-nbd", func() *exec.Cmd {
			return exec.Command(qemuImg, "convert", "-f", "raw", "-O", "raw", uri, out)
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				os.Remove(out)
				if o, err := bc.cmd().CombinedOutput(); err != nil {
					b.Fatalf("%v: %s", err, o)
				}
			}
		})
	}
}
