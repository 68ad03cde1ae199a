// Package testutil holds helpers shared by snaploader's tests.
package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// InCI reports whether the tests run under CI (CI=true), where every
// facility the tests need is installed and a missing one is a failure.
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable skips the test with reason when a facility it needs is truly
// absent on this machine; under CI it fails instead, since .ci/run installs
// everything.
func Unavailable(t testing.TB, reason string) {
	t.Helper()
	if InCI() {
		t.Fatalf("required facility missing under CI: %s", reason)
	}
	t.Skip("skipping: " + reason)
}

// LookPath returns the path of a program the test needs, or calls
// Unavailable when it is not installed.
func LookPath(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Unavailable(t, name+" is not installed (LookPath: "+err.Error()+")")
	}
	return p
}

// RequireRoot calls Unavailable unless the test runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Getuid() != 0 {
		Unavailable(t, "needs root")
	}
}

// RequireDevice calls Unavailable unless path (e.g. /dev/fuse) can be opened.
func RequireDevice(t testing.TB, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		Unavailable(t, path+" is not usable: "+err.Error())
		return
	}
	f.Close()
}

// BuildMain builds the main package at pkgDir (a path relative to the
// calling test's package, e.g. "." or "../cmd/snaploader") into a fresh
// temporary directory and returns the binary's path and a cleanup func.
// It is meant for TestMain, so it reports errors instead of failing a test.
func BuildMain(pkgDir, name string) (string, func(), error) {
	dir, err := os.MkdirTemp("", "snaploader-bin-")
	if err != nil {
		return "", nil, err
	}
	bin := filepath.Join(dir, name)
	if out, err := exec.Command("go", "build", "-o", bin, pkgDir).CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("building %s: %v\n%s", pkgDir, err, out)
	}
	return bin, func() { os.RemoveAll(dir) }, nil
}

// BenchMiB is the benchmark file size in MiB from SNAPLOADER_BENCH_MIB,
// def when it is unset; a value that is not a positive integer fails b.
func BenchMiB(b testing.TB, def int64) int64 {
	b.Helper()
	v := os.Getenv("SNAPLOADER_BENCH_MIB")
	if v == "" {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 {
		b.Fatalf("bad SNAPLOADER_BENCH_MIB %q: want a positive number of MiB", v)
	}
	return n
}

// ExhaustDescriptors makes the next open of process pid (0: this process)
// fail with EMFILE, as on a busy server: it lowers the soft descriptor limit
// to the process's lowest free descriptor number (for this process, to
// just above its highest open one, then fills the holes below it). The
// returned function gives the old limit back; a cleanup of t does too.
func ExhaustDescriptors(t testing.TB, pid int) (restore func()) {
	t.Helper()
	dir := "/proc/self/fd"
	if pid != 0 {
		dir = fmt.Sprintf("/proc/%d/fd", pid)
	}
	var old unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &old); err != nil {
		t.Fatalf("reading the descriptor limit of pid %d: %v", pid, err)
	}
	fds, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("listing the descriptors of pid %d: %v", pid, err)
	}
	open := map[int]bool{}
	highest := 0
	for _, fd := range fds {
		n, _ := strconv.Atoi(fd.Name())
		open[n] = true
		highest = max(highest, n)
	}
	limit := highest + 1 // this process: the listing's own descriptor is closed by now
	if pid != 0 {
		limit = 0
		for open[limit] {
			limit++
		}
	}
	low := unix.Rlimit{Cur: uint64(limit), Max: old.Max}
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &low, nil); err != nil {
		t.Fatalf("lowering the descriptor limit of pid %d: %v", pid, err)
	}
	var fillers []int
	for pid == 0 {
		fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			break
		}
		fillers = append(fillers, fd)
	}
	var once sync.Once
	restore = func() {
		once.Do(func() {
			for _, fd := range fillers {
				unix.Close(fd)
			}
			if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &old, nil); err != nil {
				t.Errorf("restoring the descriptor limit of pid %d: %v", pid, err)
			}
		})
	}
	t.Cleanup(restore)
	return restore
}
