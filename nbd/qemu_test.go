package nbd

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/snaploader/snaploader/internal/testutil"
)

const testSize = 8 << 20

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qemuIO runs qemu-io commands against uri and fails the test if any
// command reports a failure (qemu-io exits 0 even then).
func qemuIO(t testing.TB, uri string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := run(t, testutil.LookPath(t, "qemu-io"), append(args, uri)...)
	if strings.Contains(out, "failed") || strings.Contains(out, "Pattern verification") {
		t.Fatalf("qemu-io %q: %s", cmds, out)
	}
	return out
}

type transport struct {
	name string
	uri  func(t testing.TB, srv *Server, export string) string
}

var transports = []transport{
	{"unix", func(t testing.TB, srv *Server, export string) string {
		return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, serve(t, srv))
	}},
	{"unix-legacy-syntax", func(t testing.TB, srv *Server, export string) string {
		return fmt.Sprintf("nbd:unix:%s:exportname=%s", serve(t, srv), export)
	}},
	{"tcp", func(t testing.TB, srv *Server, export string) string {
		return fmt.Sprintf("nbd://%s/%s", serveTCP(t, srv), export)
	}},
}

func TestQemuImgConvertEqualsSource(t *testing.T) {
	qemuImg := testutil.LookPath(t, "qemu-img")
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			dir := t.TempDir()
			src, data := sourceFile(t, dir, testSize)
			dev := newFileDevice(t, src, testSize)
			srv := NewServer(Options{})
			if err := srv.AddExport("disk", dev, true); err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(dir, "out.raw")
			run(t, qemuImg, "convert", "-f", "raw", "-O", "raw", tr.uri(t, srv, "disk"), out)
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("converted image (%d bytes) differs from the source (%d bytes)", len(got), len(data))
			}
			st := srv.Stats()
			if st.Reads == 0 || st.BytesRead == 0 || st.Connections == 0 || st.Writes != 0 {
				t.Errorf("stats after a read-only copy: %+v", st)
			}
		})
	}
}

func TestQemuImgInfo(t *testing.T) {
	qemuImg := testutil.LookPath(t, "qemu-img")
	src, _ := sourceFile(t, t.TempDir(), testSize)
	srv := NewServer(Options{})
	if err := srv.AddExport("disk", newFileDevice(t, src, testSize), false); err != nil {
		t.Fatal(err)
	}
	sock := serve(t, srv)
	out := run(t, qemuImg, "info", "--output=json", "nbd+unix:///disk?socket="+sock)
	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("parsing qemu-img info: %v\n%s", err, out)
	}
	if info.VirtualSize != testSize || info.Format != "raw" {
		t.Fatalf("qemu-img info: %+v, want raw of %d bytes", info, testSize)
	}
}

func TestQemuIOWriteThenRead(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			src, data := sourceFile(t, t.TempDir(), testSize)
			dev := newFileDevice(t, src, testSize)
			srv := NewServer(Options{})
			if err := srv.AddExport("disk", dev, false); err != nil {
				t.Fatal(err)
			}
			uri := tr.uri(t, srv, "disk")
			qemuIO(t, uri, "write -P 0xab 4096 8192")
			// A second connection reads back what the first wrote.
			out := qemuIO(t, uri, "read -P 0xab 4096 8192")
			if !strings.Contains(out, "read 8192/8192 bytes") {
				t.Fatalf("qemu-io read: %s", out)
			}
			want := bytes.Clone(data)
			for i := 4096; i < 4096+8192; i++ {
				want[i] = 0xab
			}
			got, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("device contents differ from the source plus the 8 KiB written at 4096")
			}
			if st := srv.Stats(); st.Writes == 0 || st.BytesWritten != 8192 {
				t.Errorf("stats: %+v, want 8192 bytes written", st)
			}
		})
	}
}

func TestQemuIOZeroesAndDiscard(t *testing.T) {
	tests := []struct {
		name     string
		zeroer   bool
		cmd      string
		wantHole bool // the range ends up unallocated in the backing file
	}{
		{"write-zeroes-may-unmap-punches-hole", true, "write -z -u 2097152 1048576", true},
		// Without -u the client sets NBD_CMD_FLAG_NO_HOLE: zeros are written.
		{"write-zeroes-no-hole-writes-zeros", true, "write -z 2097152 1048576", false},
		{"discard-punches-hole", true, "discard 3145728 1048576", true},
		{"write-zeroes-without-zeroer-writes-zeros", false, "write -z 2097152 1048576", false},
		{"discard-without-zeroer-writes-zeros", false, "discard 3145728 1048576", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src, data := sourceFile(t, t.TempDir(), testSize)
			fd := newFileDevice(t, src, testSize)
			var dev Device = fd
			hd := &holeDevice{fileDevice: fd}
			if tc.zeroer {
				dev = hd
			}
			srv := NewServer(Options{})
			if err := srv.AddExport("disk", dev, false); err != nil {
				t.Fatal(err)
			}
			uri := "nbd+unix:///disk?socket=" + serve(t, srv)
			qemuIO(t, uri, tc.cmd)
			var off, n int64
			fields := strings.Fields(tc.cmd)
			fmt.Sscan(fields[len(fields)-2], &off)
			fmt.Sscan(fields[len(fields)-1], &n)

			want := bytes.Clone(data)
			clear(want[off : off+n])
			got, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("device contents differ from the source with [%d, %d) zeroed", off, off+n)
			}
			qemuIO(t, uri, fmt.Sprintf("read -P 0 %d %d", off, n))
			if got := hd.zeroes.Load() > 0; got != tc.wantHole {
				t.Errorf("Zeroer called: %v, want %v", got, tc.wantHole)
			}
			hole, err := isHole(src, off, n)
			if err != nil {
				t.Fatal(err)
			}
			if hole != tc.wantHole {
				t.Errorf("range [%d, %d) is a hole: %v, want %v", off, off+n, hole, tc.wantHole)
			}
		})
	}
}

func TestReadOnlyExportRefusesWrites(t *testing.T) {
	src, data := sourceFile(t, t.TempDir(), testSize)
	srv := NewServer(Options{})
	if err := srv.AddExport("disk", newFileDevice(t, src, testSize), true); err != nil {
		t.Fatal(err)
	}
	uri := "nbd+unix:///disk?socket=" + serve(t, srv)
	out, _ := exec.Command(testutil.LookPath(t, "qemu-io"), "-f", "raw", "-c", "write -P 0xcd 0 4096", uri).CombinedOutput()
	if !strings.Contains(string(out), "failed") && !strings.Contains(strings.ToLower(string(out)), "read-only") && !strings.Contains(string(out), "Permission denied") {
		t.Fatalf("write to a read-only export did not fail: %s", out)
	}
	got, _ := os.ReadFile(src)
	if !bytes.Equal(got, data) {
		t.Fatal("read-only device changed")
	}
}
