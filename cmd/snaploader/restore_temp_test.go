package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/fileio"
)

// extraFiles lists the names in dir other than want: temporaries of a
// restore, whatever their naming.
func extraFiles(t *testing.T, dir string, want ...string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		keep := false
		for _, w := range want {
			keep = keep || e.Name() == w
		}
		if !keep {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out
}

// startRestore starts a restore process into out, which may hold files
// already (--replace).
func startRestore(t *testing.T, args []string, out string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(binary, append(args, "restore", "--replace", "--out", out)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd
}

// A restore killed while it writes leaves a temporary file in --out; the
// next restore removes it, and a completed restore leaves only the
// snapshot's files, byte-equal.
func TestKilledRestoreLeavesNoTemporaries(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	mem := writeRandom(t, filepath.Join(dir, "mem"), 48<<20, 11)
	if err := os.WriteFile(filepath.Join(dir, "state"), []byte("device state"), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, false, append(keyArgs(cacheDir), "save", "--chunk-size", "1048576",
		"--file", "state="+filepath.Join(dir, "state"), "--chunked", "mem="+filepath.Join(dir, "mem"))...)
	out := filepath.Join(dir, "out")
	hits := 0
	for i := range 5 {
		before := map[string]bool{}
		for _, n := range extraFiles(t, out, "mem", "state") {
			before[n] = true
		}
		cmd := startRestore(t, keyArgs(cacheDir), out)
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		// Wait until the restore is writing a temporary file with data in
		// it, then kill it.
		deadline := time.Now().Add(20 * time.Second)
		killed := false
	poll:
		for time.Now().Before(deadline) {
			select {
			case <-exited:
				break poll
			default:
			}
			for _, n := range extraFiles(t, out, "mem", "state") {
				if before[n] {
					continue // a previous restore's, not this one's
				}
				// The chunked file's temporary (sized at once), with data.
				var st syscall.Stat_t
				if syscall.Stat(filepath.Join(out, n), &st) == nil && st.Size == int64(len(mem)) && st.Blocks > 0 {
					cmd.Process.Signal(syscall.SIGKILL)
					killed = true
					break poll
				}
			}
			time.Sleep(200 * time.Microsecond)
		}
		<-exited
		left := extraFiles(t, out, "mem", "state")
		if killed && len(left) > 0 {
			hits++
		}
		t.Logf("restore %d: killed while writing: %v; left %q", i, killed, left)
		if len(left) > 1 {
			t.Errorf("after %d killed restores %d temporary files %q are left: each restore should remove those before it", i+1, len(left), left)
		}
	}
	if hits == 0 {
		t.Fatal("no killed restore left a temporary file; the test proved nothing")
	}
	run(t, false, append(keyArgs(cacheDir), "restore", "--replace", "--out", out)...)
	if left := extraFiles(t, out, "mem", "state"); len(left) != 0 {
		t.Errorf("after a complete restore %s still holds %q", out, left)
	}
	if got, err := os.ReadFile(filepath.Join(out, "mem")); err != nil || !bytes.Equal(got, mem) {
		t.Errorf("restored mem differs from the saved file (err %v)", err)
	}
	if got, err := os.ReadFile(filepath.Join(out, "state")); err != nil || string(got) != "device state" {
		t.Errorf("restored state = %q, %v", got, err)
	}
}

// A restore removes only temporaries no live process holds: the one a
// concurrent restore is writing stays, and that restore completes.
func TestRestoreKeepsLiveTemporaries(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	big := writeRandom(t, filepath.Join(dir, "big"), 48<<20, 12)
	run(t, false, append(keyArgs(cacheDir), "save", "--chunk-size", "1048576", "--chunked", "big="+filepath.Join(dir, "big"))...)
	small := []string{"--cache-dir", cacheDir, "--instance", "other", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main"}
	if err := os.WriteFile(filepath.Join(dir, "small"), []byte("small"), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, false, append(small, "save", "--file", "small="+filepath.Join(dir, "small"))...)
	out := filepath.Join(dir, "out")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}

	// Deterministic part: this process holds a temporary file exactly as a
	// live restore does; a stale one sits next to it; and an ordinary
	// file with a similar name is no temporary at all.
	live, err := fileio.CreateTemp(out)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	stale, err := fileio.CreateTemp(out)
	if err != nil {
		t.Fatal(err)
	}
	stale.Close()
	lookalike := filepath.Join(out, fileio.TempPrefix+"notes.txt")
	if err := os.WriteFile(lookalike, []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The temporary files are snaploader's own; the look-alike is not, so
	// the directory is not empty.
	_, stderr := run(t, true, append(small, "restore", "--out", out)...)
	if !strings.Contains(stderr, "1 entry") || !strings.Contains(stderr, filepath.Base(lookalike)) || !strings.Contains(stderr, "--replace") {
		t.Errorf("restore into a directory holding %s: %s; want a refusal naming only it", filepath.Base(lookalike), stderr)
	}
	run(t, false, append(small, "restore", "--replace", "--out", out)...)
	if _, err := os.Stat(live.Name()); err != nil {
		t.Errorf("a restore removed the temporary file a live process holds: %v", err)
	}
	if _, err := os.Stat(stale.Name()); !os.IsNotExist(err) {
		t.Errorf("stale temporary file %s not removed (stat: %v)", stale.Name(), err)
	}
	if _, err := os.Stat(lookalike); err != nil {
		t.Errorf("a restore removed %s, which is no temporary file of its own: %v", lookalike, err)
	}
	live.Close()

	// With real processes: while a restore writes the big file, another
	// restores a small snapshot into the same directory; the first still
	// completes (its temporary was not taken from under it).
	a := startRestore(t, keyArgs(cacheDir), out)
	aDone := make(chan error, 1)
	go func() { aDone <- a.Wait() }()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) && !strings.Contains(strings.Join(extraFiles(t, out, "small", "big", filepath.Base(live.Name()), filepath.Base(lookalike)), " "), fileio.TempPrefix) {
		time.Sleep(200 * time.Microsecond)
	}
	run(t, false, append(small, "restore", "--replace", "--out", out)...)
	overlapped := true
	var aErr error
	select {
	case aErr = <-aDone:
		overlapped = false
	default:
		aErr = <-aDone
	}
	if err := aErr; err != nil {
		t.Fatalf("restore running while another restored into the same directory failed: %v\n%s", err, a.Stderr.(*bytes.Buffer))
	}
	t.Logf("second restore ran while the first was writing: %v", overlapped)
	if got, err := os.ReadFile(filepath.Join(out, "big")); err != nil || !bytes.Equal(got, big) {
		t.Errorf("restored big differs (err %v)", err)
	}
}

// Names up to 200 bytes (the longest a snapshot accepts) restore: the
// temporary names a restore writes under do not grow with the file's name.
func TestRestoreLongNames(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	artifact := strings.Repeat("a", 200)
	chunked := strings.Repeat("m", 199) + "."
	mem := writeRandom(t, filepath.Join(dir, "mem"), 1<<20, 13)
	if err := os.WriteFile(filepath.Join(dir, "state"), []byte("state"), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, false, append(keyArgs(cacheDir), "save", "--chunk-size", "65536",
		"--file", artifact+"="+filepath.Join(dir, "state"), "--chunked", chunked+"="+filepath.Join(dir, "mem"))...)
	out := filepath.Join(dir, "out")
	run(t, false, append(keyArgs(cacheDir), "restore", "--out", out)...)
	if b, err := os.ReadFile(filepath.Join(out, artifact)); err != nil || string(b) != "state" {
		t.Errorf("artifact file with a 200-byte name: %q, %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(out, chunked)); err != nil || !bytes.Equal(b, mem) {
		t.Errorf("chunked file with a 200-byte name differs (err %v)", err)
	}
	if left := extraFiles(t, out, artifact, chunked); len(left) != 0 {
		t.Errorf("restore left %q", left)
	}
}
