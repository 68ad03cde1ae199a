package fileio

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/internal/testutil"
)

func TestOpenRegular(t *testing.T) {
	dir := t.TempDir()
	reg := filepath.Join(dir, "reg")
	if err := os.WriteFile(reg, []byte("content"), 0o644); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	link := filepath.Join(dir, "link")
	if err := os.Symlink(reg, link); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, path string
		wantKind   string // "" = opens
	}{
		{"regular", reg, ""},
		{"symlink-to-regular", link, ""},
		{"fifo", fifo, "a FIFO"},
		{"dev-zero", "/dev/zero", "a character device"},
		{"dev-null", "/dev/null", "a character device"},
		{"directory", dir, "a directory"},
		{"socket", sock, "a socket"},
		{"missing", filepath.Join(dir, "nope"), "no such file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			done := make(chan struct{})
			var f *os.File
			var err error
			go func() {
				defer close(done)
				f, err = OpenRegular(tc.path)
			}()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatalf("OpenRegular(%s) blocked", tc.path)
			}
			if tc.wantKind == "" {
				if err != nil {
					t.Fatalf("OpenRegular(%s): %v", tc.path, err)
				}
				defer f.Close()
				b, err := io.ReadAll(f)
				if err != nil || string(b) != "content" {
					t.Fatalf("reading %s: %q, %v", tc.path, b, err)
				}
				return
			}
			if err == nil {
				f.Close()
				t.Fatalf("OpenRegular(%s) opened it, want an error saying %q", tc.path, tc.wantKind)
			}
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.path) || !strings.Contains(err.Error(), tc.wantKind) {
				t.Fatalf("OpenRegular(%s) = %v, want InvalidArgument naming the path and %q", tc.path, err, tc.wantKind)
			}
		})
	}
}

// The file OpenRegular returns is blocking again: a read that has to wait
// (here, none does) must not fail with EAGAIN.
func TestOpenRegularClearsNonblock(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := OpenRegular(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fl, err := fcntlFlags(f)
	if err != nil {
		t.Fatal(err)
	}
	if fl&syscall.O_NONBLOCK != 0 {
		t.Fatalf("flags %#x still have O_NONBLOCK", fl)
	}
}

func fcntlFlags(f *os.File) (int, error) {
	var fl int
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var ferr error
	rc.Control(func(fd uintptr) {
		r, _, e := syscall.Syscall(syscall.SYS_FCNTL, fd, syscall.F_GETFL, 0)
		fl = int(r)
		if e != 0 {
			ferr = e
		}
	})
	return fl, ferr
}

// Reading through Reader stops at the first read after cancellation, even
// from a source that never ends.
func TestReaderStopsOnCancel(t *testing.T) {
	testutil.RequireDevice(t, "/dev/zero")
	zero, err := os.Open("/dev/zero")
	if err != nil {
		t.Fatal(err)
	}
	defer zero.Close()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, Reader(ctx, zero))
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("copy ended with %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("copy from /dev/zero did not stop after cancellation")
	}
	ra := ReaderAt(ctx, zero)
	if _, err := ra.ReadAt(make([]byte, 1), 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("ReadAt after cancellation: %v", err)
	}
}

func TestRemoveStaleTemps(t *testing.T) {
	dir := t.TempDir()
	// A live temporary file: created and still open (locked).
	live, err := CreateTemp(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	if n := filepath.Base(live.Name()); len(n) != TempNameLen || !IsTempName(n) {
		t.Fatalf("temporary name %q: want %d bytes with prefix %q", n, TempNameLen, TempPrefix)
	}
	// A stale one: its writer closed it (as a killed process does).
	stale, err := CreateTemp(dir)
	if err != nil {
		t.Fatal(err)
	}
	stale.Close()
	// Files that are not ours, whatever they look like.
	others := []string{"mem", TempPrefix + "artifact", ".snaploader-tmp-zzzzzzzzzzzzzzzz", "x" + filepath.Base(stale.Name())}
	for _, n := range others {
		if err := os.WriteFile(filepath.Join(dir, n), []byte("keep"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A directory with a temporary file's name is not a file to remove.
	var r [16]byte
	copy(r[:], "0123456789abcdef")
	if err := os.Mkdir(filepath.Join(dir, TempPrefix+string(r[:])), 0o755); err != nil {
		t.Fatal(err)
	}

	// A stale-looking file the caller says to keep.
	kept, err := CreateTemp(dir)
	if err != nil {
		t.Fatal(err)
	}
	kept.Close()

	removed, err := RemoveStaleTemps(dir, map[string]bool{filepath.Base(kept.Name()): true})
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || removed[0] != stale.Name() {
		t.Fatalf("removed %q, want only the stale %s", removed, stale.Name())
	}
	if _, err := os.Stat(stale.Name()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale temporary file still there: %v", err)
	}
	if _, err := os.Stat(live.Name()); err != nil {
		t.Fatalf("live temporary file removed: %v", err)
	}
	if _, err := os.Stat(kept.Name()); err != nil {
		t.Fatalf("temporary file named in keep removed: %v", err)
	}
	for _, n := range others {
		if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
			t.Fatalf("%s removed: %v", n, err)
		}
	}
	// The live file stays usable and can be renamed into place.
	if _, err := live.WriteString("data"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(live.Name(), filepath.Join(dir, "done")); err != nil {
		t.Fatal(err)
	}
	if removed, err := RemoveStaleTemps(filepath.Join(dir, "missing"), nil); err != nil || len(removed) != 0 {
		t.Fatalf("missing directory: %v, %v", removed, err)
	}
}

// UserEntries leaves out only CreateTemp's files, live or stale; a file
// that merely starts like one is someone else's.
func TestUserEntries(t *testing.T) {
	dir := t.TempDir()
	if got, err := UserEntries(filepath.Join(dir, "missing")); err != nil || len(got) != 0 {
		t.Fatalf("UserEntries(missing) = %q, %v; want none", got, err)
	}
	live, err := CreateTemp(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	stale, err := CreateTemp(dir)
	if err != nil {
		t.Fatal(err)
	}
	stale.Close()
	for _, name := range []string{"b", "a", TempPrefix + "notes.txt"} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, TempPrefix+"0123456789abcdef"), 0o755); err != nil {
		t.Fatal(err)
	}
	got, err := UserEntries(dir)
	want := []string{TempPrefix + "0123456789abcdef", TempPrefix + "notes.txt", "a", "b"}
	if err != nil || strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("UserEntries = %q, %v; want %q", got, err, want)
	}
}

func TestNameList(t *testing.T) {
	for _, tc := range []struct {
		names []string
		want  string
	}{
		{nil, ""},
		{[]string{"a"}, `"a"`},
		{[]string{"a", "b c"}, `"a", "b c"`},
		{[]string{"1", "2", "3"}, `"1", "2", "3"`},
		{[]string{"1", "2", "3", "4"}, `"1", "2", "3" and 1 more`},
		{[]string{"1", "2", "3", "4", "5", "6"}, `"1", "2", "3" and 3 more`},
	} {
		if got := NameList(tc.names, 3); got != tc.want {
			t.Errorf("NameList(%q, 3) = %s, want %s", tc.names, got, tc.want)
		}
	}
}
