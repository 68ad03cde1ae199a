package snapshot

import (
	"bytes"
	"context"
	"testing"

	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/testutil"
)

// TestLocalEntriesSurviveDescriptorExhaustion: a host whose process runs
// out of descriptors while it looks up a key gets a retryable error; its
// local version entry and manifests are kept, so every acknowledged
// snapshot of the key restores once descriptors are back (a version entry
// dropped on a failed read would make the loader create a new version and
// orphan them all).
func TestLocalEntriesSurviveDescriptorExhaustion(t *testing.T) {
	ctx := context.Background()
	h := newHost(t, nil, Options{})
	ks := h.keys(t, taskOn("main", "", ""))
	key := ks.GetBranchKey()
	var ids []string
	var mems [][]byte
	for i := range 2 {
		mem, files := vmFiles(t, t.TempDir(), uint64(70+i), 1<<20)
		ids = append(ids, h.save(t, key, mem, files, false).SnapshotID)
		mems = append(mems, mustRead(t, mem))
	}
	version, err := h.loader.CurrentVersion(ctx, key)
	if err != nil {
		t.Fatal(err)
	}

	restore := testutil.ExhaustDescriptors(t, 0)
	_, err = h.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly})
	restore()
	if !errkind.Is(err, errkind.Unavailable) {
		t.Fatalf("lookup without descriptors: %v (kind %v), want Unavailable", err, errkind.Of(err))
	}

	if v, err := h.loader.CurrentVersion(ctx, key); err != nil || v != version {
		t.Fatalf("version after the failed lookup: %q, %v; want %q", v, err, version)
	}
	for i, id := range ids {
		snap, err := h.loader.GetSnapshotByID(ctx, key.GetInstanceName(), id, GetOptions{ReadPolicy: LocalOnly})
		if err != nil {
			t.Fatalf("snapshot %d (%s) once descriptors are back: %v", i, id, err)
		}
		if got, _ := h.restoreBytes(t, snap); !bytes.Equal(got, mems[i]) {
			t.Errorf("snapshot %d (%s) restores different bytes", i, id)
		}
	}
}
