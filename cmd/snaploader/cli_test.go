package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

var binary string

func TestMain(m *testing.M) {
	bin, cleanup, err := testutil.BuildMain(".", "snaploader")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = bin
	code := m.Run()
	cleanup()
	os.Exit(code)
}

// run runs the CLI and returns stdout; it fails the test on a non-zero exit
// unless wantErr.
func run(t *testing.T, wantErr bool, args ...string) (string, string) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if (err != nil) != wantErr {
		t.Fatalf("snaploader %s: err=%v wantErr=%v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, wantErr, stdout.String(), stderr.String())
	}
	return stdout.String(), stderr.String()
}

func writeRandom(t *testing.T, path string, size int, seed uint64) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, size)
	for off := 0; off < size; off += 64 << 10 {
		if rng.IntN(3) == 0 {
			continue
		}
		for i := off; i < min(size, off+64<<10); i++ {
			b[i] = byte(rng.Uint32())
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

func keyArgs(cacheDir string) []string {
	return []string{"--cache-dir", cacheDir, "--instance", "ci", "--platform", "os=linux,arch=amd64", "--config-hash", "c0ffee", "--ref", "feat", "--default-ref", "main"}
}

func TestSaveRestoreInspectVerify(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	mem := writeRandom(t, filepath.Join(dir, "mem.img"), 3<<20+100, 1)
	if err := os.WriteFile(filepath.Join(dir, "vmstate"), []byte("state"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, stderr := run(t, false, append(keyArgs(cacheDir), "save", "--json", "--chunk-size", "65536",
		"--file", "vmstate="+filepath.Join(dir, "vmstate"), "--chunked", "mem.img="+filepath.Join(dir, "mem.img"))...)
	if stderr != "" {
		t.Errorf("save --json with stderr piped wrote to stderr (no progress bar expected): %q", stderr)
	}
	var saved report
	if err := json.Unmarshal([]byte(out), &saved); err != nil {
		t.Fatalf("save --json output %q: %v", out, err)
	}
	if saved.SnapshotID == "" || saved.ChunksWritten == 0 || saved.ChunksWritten != saved.ChunksTotal || saved.BytesSkippedZero == 0 || saved.ChunkSize != 65536 {
		t.Errorf("save report %+v: want a snapshot id, every chunk newly written, zeros skipped", saved)
	}
	// Saving the same data again stores no new chunk.
	out, _ = run(t, false, append(keyArgs(cacheDir), "save", "--json", "--chunk-size", "65536", "--chunked", "mem.img="+filepath.Join(dir, "mem.img"))...)
	var again report
	if err := json.Unmarshal([]byte(out), &again); err != nil {
		t.Fatal(err)
	}
	if again.ChunksWritten != 0 || again.ChunksTotal != saved.ChunksTotal {
		t.Errorf("second save of the same file wrote %d of %d chunks, want 0", again.ChunksWritten, again.ChunksTotal)
	}

	restored := filepath.Join(dir, "out")
	out, _ = run(t, false, append(keyArgs(cacheDir), "restore", "--json", "--out", restored)...)
	var rep report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Source != "local" || rep.FallbackIndex != 0 || rep.SnapshotID != again.SnapshotID {
		t.Errorf("restore report %+v: want the latest snapshot from the local tier, branch key", rep)
	}
	got, err := os.ReadFile(filepath.Join(restored, "mem.img"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, mem) {
		t.Error("restored chunked file differs")
	}
	out, _ = run(t, false, append(keyArgs(cacheDir), "inspect")...)
	if !strings.Contains(out, again.SnapshotID) || !strings.Contains(out, `"chunk_size"`) {
		t.Errorf("inspect output lacks the snapshot: %s", out)
	}
	out, _ = run(t, false, "ls", "--cache-dir", cacheDir)
	if !strings.Contains(out, saved.SnapshotID) || !strings.Contains(out, again.SnapshotID) || !strings.Contains(out, "3.0 MiB") {
		t.Errorf("ls output lacks the snapshots or their 3 MiB size: %s", out)
	}
	run(t, false, append(keyArgs(cacheDir), "verify")...)

	// A fallback: a new branch restores main's snapshot only if main has one.
	other := []string{"--cache-dir", cacheDir, "--instance", "ci", "--platform", "os=linux,arch=amd64", "--config-hash", "c0ffee", "--ref", "feat2", "--default-ref", "feat"}
	out, _ = run(t, false, append(other, "restore", "--json", "--out", filepath.Join(dir, "out2"))...)
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.FallbackIndex != 1 {
		t.Errorf("fallback_index = %d, want 1", rep.FallbackIndex)
	}

	// Corrupt one chunk: verify fails and names it.
	var victim string
	filepath.Walk(filepath.Join(cacheDir), func(p string, info os.FileInfo, err error) error {
		if err == nil && victim == "" && info.Mode().IsRegular() && info.Size() == 65536 && strings.Contains(p, "cas") {
			victim = p
		}
		return nil
	})
	if victim == "" {
		t.Fatal("found no chunk file to corrupt")
	}
	b, _ := os.ReadFile(victim)
	b[0] ^= 1
	os.WriteFile(victim, b, 0o644)
	out, _ = run(t, true, append(keyArgs(cacheDir), "verify")...)
	if !strings.Contains(out, "BAD") {
		t.Errorf("verify output does not flag the corrupt chunk: %s", out)
	}

	// Invalidation: nothing is returned any more.
	run(t, false, append(keyArgs(cacheDir), "invalidate")...)
	_, stderr = run(t, true, append(keyArgs(cacheDir), "restore", "--out", filepath.Join(dir, "out3"))...)
	if !strings.Contains(stderr, "NotFound") {
		t.Errorf("restore after invalidate: stderr %q, want a NotFound error", stderr)
	}
}

// A save killed at any moment leaves the previous snapshot loadable and
// no manifest naming missing blobs.
func TestKilledSaveLosesNothing(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	v1 := writeRandom(t, filepath.Join(dir, "v1.img"), 8<<20, 1)
	run(t, false, append(keyArgs(cacheDir), "save", "--chunk-size", "65536", "--chunked", "mem.img="+filepath.Join(dir, "v1.img"))...)
	v2 := writeRandom(t, filepath.Join(dir, "v2.img"), 48<<20, 2)
	for i, delay := range []time.Duration{5 * time.Millisecond, 40 * time.Millisecond, 120 * time.Millisecond, 300 * time.Millisecond} {
		cmd := exec.Command(binary, append(keyArgs(cacheDir), "save", "--chunk-size", "65536", "--chunked", "mem.img="+filepath.Join(dir, "v2.img"))...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		out := filepath.Join(dir, fmt.Sprintf("out%d", i))
		run(t, false, append(keyArgs(cacheDir), "restore", "--out", out)...)
		got, err := os.ReadFile(filepath.Join(out, "mem.img"))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, v1) && !bytes.Equal(got, v2) {
			t.Fatalf("after a save killed at %v the restored file is neither the old nor the new snapshot", delay)
		}
		run(t, false, append(keyArgs(cacheDir), "verify")...)
	}
}

// Restoring a chunked file never clobbers an artifact file of the same
// snapshot, whatever its name.
func TestRestoreKeepsEveryFile(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	mem := writeRandom(t, filepath.Join(dir, "mem"), 1<<20, 3)
	if err := os.WriteFile(filepath.Join(dir, "state"), []byte("state"), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, false, append(keyArgs(cacheDir), "save", "--chunk-size", "65536",
		"--file", "mem.partial="+filepath.Join(dir, "state"), "--chunked", "mem="+filepath.Join(dir, "mem"))...)
	out := filepath.Join(dir, "out")
	run(t, false, append(keyArgs(cacheDir), "restore", "--out", out)...)
	if b, err := os.ReadFile(filepath.Join(out, "mem.partial")); err != nil || string(b) != "state" {
		t.Errorf("artifact file mem.partial: %q, %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(out, "mem")); err != nil || !bytes.Equal(b, mem) {
		t.Errorf("chunked file mem differs (err %v)", err)
	}
	if fi, err := os.Stat(filepath.Join(out, "mem")); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("restored file mode %v, want 0644 (err %v)", fi.Mode(), err)
	}
}
