package snapshot

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/internal/fileio"
)

// UnpackSnapshot writes only into a missing or empty directory, unless
// Replace: then it replaces the snapshot's own file names and lists every
// other entry, which it leaves alone. A dir that is not a directory is
// InvalidArgument. A refusal writes nothing.
func TestUnpackDir(t *testing.T) {
	h := newHost(t, nil, Options{})
	key := h.keys(t, taskOn("main", "", "main")).GetWriteKey()
	mem, files := vmFiles(t, t.TempDir(), 41, 5*testChunk)
	h.save(t, key, mem, files, false)
	snap, err := h.loader.GetSnapshot(context.Background(), h.keys(t, taskOn("main", "", "main")), GetOptions{ReadPolicy: LocalFirst})
	if err != nil {
		t.Fatal(err)
	}
	write := func(t *testing.T, dir string, names ...string) {
		t.Helper()
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			if err := os.WriteFile(filepath.Join(dir, n), []byte("user's "+n), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	tests := []struct {
		name       string
		setup      func(t *testing.T, dir string)
		replace    bool
		wantCode   codes.Code // OK = unpacked
		wantOthers []string
	}{
		{name: "missing", wantOthers: []string{}},
		{name: "empty", setup: func(t *testing.T, dir string) { write(t, dir) }, wantOthers: []string{}},
		{name: "a killed unpack's temporary file", setup: func(t *testing.T, dir string) {
			write(t, dir)
			f, err := fileio.CreateTemp(dir)
			if err != nil {
				t.Fatal(err)
			}
			f.Close()
		}, wantOthers: []string{}},
		{name: "foreign files", setup: func(t *testing.T, dir string) { write(t, dir, "notes", "vmstate.snap") }, wantCode: codes.FailedPrecondition},
		{name: "foreign files, replace", setup: func(t *testing.T, dir string) { write(t, dir, "notes", "vmstate.snap") }, replace: true, wantOthers: []string{"notes"}},
		{name: "a regular file", setup: func(t *testing.T, dir string) { os.WriteFile(dir, []byte("user's"), 0o644) }, wantCode: codes.InvalidArgument},
		{name: "a regular file, replace", setup: func(t *testing.T, dir string) { os.WriteFile(dir, []byte("user's"), 0o644) }, replace: true, wantCode: codes.InvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "out")
			if tc.setup != nil {
				tc.setup(t, dir)
			}
			u, err := h.loader.UnpackSnapshot(context.Background(), snap, dir, UnpackOptions{Replace: tc.replace})
			if tc.wantCode != codes.OK {
				if err == nil {
					u.Close()
					t.Fatalf("unpacked into %s, want %s", dir, tc.wantCode)
				}
				if status.Code(err) != tc.wantCode || !strings.Contains(err.Error(), dir) {
					t.Fatalf("error %v, want %s naming %s", err, tc.wantCode, dir)
				}
				var ne *DirNotEmptyError
				if tc.wantCode == codes.FailedPrecondition && (!errors.As(err, &ne) || !slices.Equal(ne.Entries, []string{"notes", "vmstate.snap"})) {
					t.Errorf("error %v: want a DirNotEmptyError listing notes and vmstate.snap", err)
				}
				if b, err := os.ReadFile(filepath.Join(dir, "vmstate.snap")); err == nil && string(b) != "user's vmstate.snap" {
					t.Errorf("a refused unpack wrote vmstate.snap")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			if !slices.Equal(u.Others, tc.wantOthers) {
				t.Errorf("Others = %q, want %q", u.Others, tc.wantOthers)
			}
			if b, err := os.ReadFile(filepath.Join(dir, "vmstate.snap")); err != nil || string(b) != "vm state 41" {
				t.Errorf("vmstate.snap = %q, %v", b, err)
			}
			for _, n := range tc.wantOthers {
				if b, err := os.ReadFile(filepath.Join(dir, n)); err != nil || string(b) != "user's "+n {
					t.Errorf("%s = %q, %v: want it left as it was", n, b, err)
				}
			}
		})
	}
}
