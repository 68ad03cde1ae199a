package gc

import (
	"testing"
	"time"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/snapshot"
)

// A snapshot saved under a version id its key no longer has is listed as
// invalidated; the one saved after the invalidation is not.
func TestListInvalidated(t *testing.T) {
	ctx := ctxT(t)
	remote, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { remote.Close() })
	h := newHost(t, remote, time.Now())
	mem := make([]byte, 4*testChunk)
	mem[0] = 1
	old := h.save(t, task("c1", "main"), mem, []byte("state 1"))
	other := h.save(t, task("c2", "main"), mem, []byte("state 2"))
	keys, err := h.loader.KeySet(ctx, task("c1", "main"), snapshot.KeySetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.loader.Invalidate(ctx, keys.GetBranchKey()); err != nil {
		t.Fatal(err)
	}
	mem[1] = 2
	cur := h.save(t, task("c1", "main"), mem, []byte("state 3"))
	inv, err := List(ctx, LocalCache(remote, ""), Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{old.id: true, other.id: false, cur.id: false}
	if len(inv.Snapshots) != len(want) {
		t.Fatalf("%d snapshots listed, want %d", len(inv.Snapshots), len(want))
	}
	for _, l := range inv.Snapshots {
		if w, ok := want[l.Snapshot.SnapshotID]; !ok || l.Snapshot.Invalidated != w {
			t.Errorf("snapshot %s (config %s): invalidated %v, want %v", l.Snapshot.SnapshotID, l.Snapshot.Key.GetConfigurationHash(), l.Snapshot.Invalidated, w)
		}
	}
}
