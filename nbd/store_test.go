package nbd

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/internal/testutil"
)

// TestExportCopyOnWriteStore exports a real lazy copy-on-write store (as a
// restored disk is exported to QEMU): qemu-img reads the snapshot back,
// qemu-io writes become dirty chunks, and saving stores exactly those.
func TestExportCopyOnWriteStore(t *testing.T) {
	qemuImg := testutil.LookPath(t, "qemu-img")
	const chunk = 256 << 10
	dir := t.TempDir()
	src, data := sourceFile(t, dir, testSize)
	lc, err := localcache.New(filepath.Join(dir, "cache"), localcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer lc.Close()
	ctx := context.Background()
	first, _, err := cow.FromFile(ctx, "disk", src, lc, lc, cow.Options{ChunkSize: chunk, TempDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	cf := first.ChunkedFile()
	first.Close()
	st, err := cow.Open("disk", cf, lc, cow.Options{ChunkSize: chunk, TempDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	srv := NewServer(Options{})
	if err := srv.AddExport("disk", st, false); err != nil {
		t.Fatal(err)
	}
	uri := fmt.Sprintf("nbd+unix:///disk?socket=%s", serve(t, srv))
	out := filepath.Join(dir, "out.raw")
	run(t, qemuImg, "convert", "-f", "raw", "-O", "raw", uri, out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("qemu-img read of the exported store differs from the snapshot")
	}
	if d := st.Dirty(); len(d) != 0 {
		t.Fatalf("reads dirtied chunks %v", d)
	}

	// Two writes: 4 KiB in chunk 3, and 512 KiB filling chunks 21 and 22
	// with the same pattern.
	qemuIO(t, uri, "write -P 0xab 786432 4096", "write -P 0xcd 5505024 524288", "read -P 0xab 786432 4096", "read -P 0xcd 5505024 524288")
	dirty := st.Dirty()
	sort.Slice(dirty, func(i, j int) bool { return dirty[i] < dirty[j] })
	if want := []int64{3 * chunk, 21 * chunk, 22 * chunk}; fmt.Sprint(dirty) != fmt.Sprint(want) {
		t.Errorf("dirty chunks %v, want %v", dirty, want)
	}
	_, stats, err := st.Save(ctx, lc)
	if err != nil {
		t.Fatal(err)
	}
	if stats.ChunksDirty != 3 || stats.ChunksWritten != 2 {
		t.Errorf("save after the writes: %d dirty, %d stored; want 3 dirty and 2 stored (chunks 21 and 22 are identical)", stats.ChunksDirty, stats.ChunksWritten)
	}
}
