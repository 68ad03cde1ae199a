package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestVerifyDropsWhatFailsVerification: a chunk whose bytes changed in a
// host's local cache after it was verified (and marked so) is reported by
// `verify`, which exits with DataLoss and drops the local copy with its
// marker; the next restore fetches the chunk again from the remote and
// writes the right bytes.
func TestVerifyDropsWhatFailsVerification(t *testing.T) {
	srv := startServe(t, nil, "--cache-dir", t.TempDir())
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	want := writeVM(t, filepath.Join(dir, "mem.img"), 1<<20, 9)
	key := []string{"--cache-dir", cacheDir, "--remote", srv.url(), "--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main"}
	cli(t, nil, append([]string{"save", "--chunk-size", "65536", "--chunked", "mem.img=" + filepath.Join(dir, "mem.img")}, key...)...)
	// A first restore reads (and verifies, and marks) every chunk.
	cli(t, nil, append([]string{"restore", "--out", filepath.Join(dir, "out1")}, key...)...)

	var victim string
	filepath.Walk(filepath.Join(cacheDir, "cas"), func(p string, info os.FileInfo, err error) error {
		if err == nil && victim == "" && info.Mode().IsRegular() && info.Size() == 65536 {
			victim = p
		}
		return nil
	})
	if victim == "" {
		t.Fatal("found no chunk file in the local cache")
	}
	f, err := os.OpenFile(victim, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	f.ReadAt(b, 100)
	f.WriteAt([]byte{b[0] ^ 0x40}, 100) // in place: the inode and its marker stay
	f.Close()

	cmd := exec.Command(binary, append([]string{"verify"}, key...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	name := filepath.Base(victim)
	if err == nil || !strings.Contains(stdout.String(), "BAD") || !strings.Contains(stdout.String(), name[:64]) || !strings.Contains(stderr.String(), "DataLoss") {
		t.Fatalf("verify of a changed chunk: err %v\nstdout %s\nstderr %s\nwant BAD naming %s and a DataLoss error", err, stdout.String(), stderr.String(), name)
	}
	if _, err := os.Stat(victim); !os.IsNotExist(err) {
		t.Fatalf("the corrupt chunk is still in the local cache after verify (stat: %v)", err)
	}
	cli(t, nil, append([]string{"restore", "--out", filepath.Join(dir, "out2")}, key...)...)
	if got, err := os.ReadFile(filepath.Join(dir, "out2", "mem.img")); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("restore after verify differs (err %v)", err)
	}
	cli(t, nil, append([]string{"verify"}, key...)...)
}
