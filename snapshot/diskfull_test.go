package snapshot

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/internal/testutil"
)

// TestDiskFullLosesNothing runs a cache on a 6 MiB tmpfs: a save that
// does not fit fails with an error saying so, leaves no temporary files,
// and the snapshot saved before it still restores.
func TestDiskFullLosesNothing(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=6m"); err != nil {
		testutil.Unavailable(t, "cannot mount a tmpfs: "+err.Error())
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	lc, err := localcache.New(filepath.Join(dir, "cache"), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	defer lc.Close()
	l, err := New(lc, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	h := &host{dir: dir, local: lc, loader: l}
	ks := h.keys(t, taskOn("main", "", ""))
	small, files := vmFiles(t, t.TempDir(), 61, 1<<20)
	h.save(t, ks.GetBranchKey(), small, files, false)

	big, _ := vmFiles(t, t.TempDir(), 62, 12<<20)
	s, _, err := cow.FromFile(context.Background(), "memory.img", big, lc, lc, cow.Options{Namespace: l.Namespace(ks.GetBranchKey()), ChunkSize: testChunk, TempDir: lc.TempDir()})
	if err == nil {
		s.Close()
		t.Fatal("splitting 12 MiB into a 6 MiB filesystem succeeded")
	}
	if !strings.Contains(err.Error(), "no space left") {
		t.Errorf("error %q does not say the disk is full", err)
	}
	if tmp, _ := os.ReadDir(filepath.Join(dir, "cache", "tmp")); len(tmp) != 0 {
		t.Errorf("%d temporary files left behind", len(tmp))
	}
	snap, err := l.GetSnapshot(context.Background(), ks, GetOptions{ReadPolicy: LocalOnly})
	if err != nil {
		t.Fatalf("the earlier snapshot is gone: %v", err)
	}
	got, _ := h.restoreBytes(t, snap)
	if !bytes.Equal(got, mustRead(t, small)) {
		t.Error("the earlier snapshot no longer restores intact")
	}
}
