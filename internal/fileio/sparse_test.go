package fileio

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestWriteSparse(t *testing.T) {
	const mib = 1 << 20
	data := func(n int) []byte { return bytes.Repeat([]byte{7}, n) }
	zeros := func(n int) []byte { return make([]byte, n) }
	for _, tc := range []struct {
		name      string
		b         []byte
		off       int64
		maxBlocks int64 // bytes the file may occupy at most
	}{
		{"all data", data(mib), 0, mib + 64<<10},
		{"a long zero run is a hole", append(append(data(4096), zeros(mib)...), data(4096)...), 0, 64 << 10},
		{"a short zero run is written", append(append(data(4096), zeros(16<<10)...), data(4096)...), 0, 64 << 10},
		{"all zeros", zeros(mib), 0, 0},
		{"unaligned offset", append(zeros(mib), data(100)...), 100, 64 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := os.Create(filepath.Join(t.TempDir(), "f"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := WriteSparse(f, tc.b, tc.off); err != nil {
				t.Fatal(err)
			}
			if err := f.Truncate(tc.off + int64(len(tc.b))); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(tc.b))
			if _, err := f.ReadAt(got, tc.off); err != nil || !bytes.Equal(got, tc.b) {
				t.Fatalf("content differs (err %v)", err)
			}
			var st unix.Stat_t
			if err := unix.Fstat(int(f.Fd()), &st); err != nil {
				t.Fatal(err)
			}
			if used := st.Blocks * 512; used > tc.maxBlocks {
				t.Errorf("file occupies %d bytes, want at most %d", used, tc.maxBlocks)
			}
		})
	}
}
