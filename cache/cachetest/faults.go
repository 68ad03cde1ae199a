package cachetest

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/testutil"
)

func (s *suite) descriptorsExhausted(t *testing.T) {
	tier := s.h.New(t)
	if tier.Exhaust == nil {
		t.Skip("the harness cannot exhaust the tier's file descriptors")
	}
	c := tier.Cache
	ns := s.ns()
	data := random(80, mib+5)
	d := write(t, c, ns, data)
	key := entryKey("manifest")
	ar := entry(t, c, ns, "stored")
	update(t, c, ns, key, ar)

	restore := tier.Exhaust(t)
	ctx := ctxT(t)
	type failure struct {
		what string
		err  error
	}
	var fails []failure
	_, err := readAll(ctx, c, ns, d)
	fails = append(fails, failure{"Read", err})
	if o, ok := c.(cache.Opener); ok {
		_, err := openAll(ctx, o, ns, d)
		fails = append(fails, failure{"Open", err})
	}
	_, err = c.GetActionResult(ctx, ns, key)
	fails = append(fails, failure{"GetActionResult", err})
	restore()

	for _, f := range fails {
		switch {
		case f.err == nil:
			t.Errorf("%s with no descriptors left succeeded: the harness did not exhaust them", f.what)
		case cache.IsCorrupt(f.err), cache.IsNotFound(f.err):
			t.Errorf("%s with no descriptors left: %v error (%v): an I/O failure is neither corruption nor absence", f.what, errkind.Of(f.err), f.err)
		case errkind.Of(f.err) != errkind.Unavailable:
			t.Errorf("%s with no descriptors left: %v error (%v), want Unavailable", f.what, errkind.Of(f.err), f.err)
		}
	}
	// Nothing was dropped.
	if missing(t, c, ns, d) {
		t.Fatalf("%s is missing after reads failed for want of descriptors", digest.String(d))
	}
	mustRead(t, c, ns, d, data)
	mustGet(t, c, ns, key, ar)
}

func (s *suite) diskFull(t *testing.T) {
	if s.h.Full == nil {
		t.Skip("the harness cannot fill the tier's storage")
	}
	const size = 2 * mib
	c, free := s.h.Full(t, size)
	ns := s.ns()
	data := random(90, size)
	d := digest.Compute(s.fn, data)
	err := c.Write(ctxT(t), ns, d, bytes.NewReader(data))
	wantKind(t, err, errkind.ResourceExhausted, "Write to a full disk", d.Hash)
	if !missing(t, c, ns, d) {
		t.Errorf("a write that failed on a full disk left %s present", digest.String(d))
	}
	_, err = c.Read(ctxT(t), ns, d)
	wantKind(t, err, errkind.NotFound, "Read after a write failed on a full disk", d.Hash)
	free()
	write(t, c, ns, data)
	mustRead(t, c, ns, d, data)
}

// ExhaustDescriptors lowers the process's soft limit on open files
// (RLIMIT_NOFILE) to its lowest free descriptor number, found in
// /proc/self/fd, so that the next file the process opens fails with
// EMFILE; restore (also run when t ends) raises it back. It acts on the
// whole process: tests using it must not run in parallel with others.
func ExhaustDescriptors(t *testing.T) (restore func()) {
	t.Helper()
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatalf("getting RLIMIT_NOFILE: %v", err)
	}
	open, err := openDescriptors()
	if err != nil {
		testutil.Unavailable(t, "listing open descriptors: "+err.Error())
	}
	lowest := 0
	for open[lowest] {
		lowest++
	}
	lim := old
	lim.Cur = uint64(lowest)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("lowering RLIMIT_NOFILE to %d: %v", lowest, err)
	}
	var once sync.Once
	restore = func() {
		once.Do(func() {
			if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
				t.Errorf("restoring RLIMIT_NOFILE to %d: %v", old.Cur, err)
			}
		})
	}
	t.Cleanup(restore)
	return restore
}

// openDescriptors returns the process's open file descriptors, without
// the one used to list them.
func openDescriptors() (map[int]bool, error) {
	f, err := os.Open("/proc/self/fd")
	if err != nil {
		return nil, err
	}
	own := int(f.Fd())
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return nil, err
	}
	open := map[int]bool{}
	for _, n := range names {
		if fd, err := strconv.Atoi(n); err == nil && fd != own {
			open[fd] = true
		}
	}
	return open, nil
}

// SmallFilesystem mounts a tmpfs of size bytes on a fresh directory and
// returns the directory; it is unmounted when t ends. Mounting needs root:
// without it (or without the right to mount) the test is skipped, and
// fails under CI.
func SmallFilesystem(t *testing.T, size int64) string {
	t.Helper()
	if os.Getuid() != 0 {
		testutil.Unavailable(t, "a full disk is a small tmpfs, and mounting one needs root")
	}
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%d", size)); err != nil {
		testutil.Unavailable(t, fmt.Sprintf("mounting a %d-byte tmpfs on %s: %v", size, dir, err))
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting the tmpfs on %s: %v", dir, err)
		}
	})
	return dir
}

// Fill fills the filesystem holding dir with a file in dir, leaving about
// room bytes free, and returns free, which removes the file.
func Fill(t *testing.T, dir string, room int64) (free func()) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatalf("statfs %s: %v", dir, err)
	}
	n := int64(st.Bavail)*st.Bsize - room
	if n <= 0 {
		t.Fatalf("filling %s: only %d bytes are free, fewer than the %d to leave", dir, int64(st.Bavail)*st.Bsize, room)
	}
	path := filepath.Join(dir, "filler")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), 0, 0, n); err != nil {
		t.Fatalf("filling %s with %d bytes: %v", dir, n, err)
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			if err := os.Remove(path); err != nil {
				t.Errorf("freeing %s: %v", dir, err)
			}
		})
	}
}

// DamageFile replaces the content of the file at path by damage(it),
// behind the back of whatever stored it.
func DamageFile(t *testing.T, path string, damage func([]byte) []byte) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("damaging %s: %v", path, err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("damaging %s: %v", path, err)
	}
	if err := os.WriteFile(path, damage(b), fi.Mode().Perm()); err != nil {
		t.Fatalf("damaging %s: %v", path, err)
	}
}

// FilesUnder lists the files (anything but directories) under dirs; a
// directory that does not exist holds none.
func FilesUnder(t *testing.T, dirs ...string) []string {
	t.Helper()
	var files []string
	for _, dir := range dirs {
		err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			if err == nil && !de.IsDir() {
				files = append(files, p)
			}
			return err
		})
		if err != nil {
			t.Fatalf("listing %s: %v", dir, err)
		}
	}
	return files
}
