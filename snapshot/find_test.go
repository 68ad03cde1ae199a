package snapshot

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/cachecount"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// newRemoteLC is a local cache standing in for a remote tier.
func newRemoteLC(t *testing.T) *localcache.Cache {
	t.Helper()
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	return lc
}

// TestFindSnapshotReadsVersionWithLookups: a host that saw the key's
// version before reads the remote's version id and the manifests of the
// whole key set at once; a host that never saw it reads the version first.
// Either finds the snapshot under the fallback key.
func TestFindSnapshotReadsVersionWithLookups(t *testing.T) {
	ctx := context.Background()
	remoteLC := newRemoteLC(t)
	writer := newHost(t, remoteLC, Options{})
	mem, files := vmFiles(t, t.TempDir(), 91, 1<<20)
	saved := writer.save(t, writer.keys(t, taskOn("main", "", "")).GetBranchKey(), mem, files, true)
	task := taskOn("feat", "", "main") // the branch key misses

	for _, tc := range []struct {
		name       string
		seen       bool
		most, reqs int
	}{
		// One version read and two keys under two digest functions.
		{"host that saw the version", true, 5, 5},
		{"cold host", false, 4, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &lookupRecorder{Tier: remoteLC, grow: make(chan struct{})}
			h := newHost(t, rec, Options{})
			if tc.seen {
				h.keys(t, taskOn("other", "", ""))
			}
			rec.mu.Lock()
			rec.most, rec.calls = 0, 0
			rec.mu.Unlock()
			snap, keys, err := h.loader.FindSnapshot(ctx, task, KeySetOptions{}, GetOptions{ReadPolicy: LocalFirst})
			if err != nil {
				t.Fatal(err)
			}
			if snap.FallbackIndex != 1 || snap.Source != SourceRemote || snap.Manifest.GetVmMetadata().GetSnapshotId() != saved.SnapshotID {
				t.Fatalf("found snapshot %s at fallback %d in %s, want %s at 1 in the remote", snap.Manifest.GetVmMetadata().GetSnapshotId(), snap.FallbackIndex, snap.Source, saved.SnapshotID)
			}
			if got := keys.GetBranchKey().GetVersionId(); got != writer.keys(t, task).GetBranchKey().GetVersionId() {
				t.Errorf("key set under version %q, want the remote's", got)
			}
			rec.mu.Lock()
			most, calls := rec.most, rec.calls
			rec.mu.Unlock()
			if calls != tc.reqs || most != tc.most {
				t.Errorf("%d action-cache reads, at most %d at once; want %d, %d at once", calls, most, tc.reqs, tc.most)
			}
		})
	}
}

// TestFindSnapshotNeverReturnsAStaleVersion: a host that saw a version
// before an invalidation looks its key set up under the old id while it
// reads the new one; what it finds there (its own pinned copy of the old
// snapshot included) is never returned: the key set under the new id is.
func TestFindSnapshotNeverReturnsAStaleVersion(t *testing.T) {
	ctx := context.Background()
	remoteLC := newRemoteLC(t)
	writer := newHost(t, remoteLC, Options{})
	dir := t.TempDir()
	mem, files := vmFiles(t, dir, 92, 1<<20)
	task := taskOn("main", "", "")
	old := writer.save(t, writer.keys(t, task).GetBranchKey(), mem, files, true)

	h := newHost(t, remoteLC, Options{})
	snap, _, err := h.loader.FindSnapshot(ctx, task, KeySetOptions{}, GetOptions{ReadPolicy: LocalFirst})
	if err != nil || snap.Manifest.GetVmMetadata().GetSnapshotId() != old.SnapshotID {
		t.Fatalf("first restore: %v, want snapshot %s", err, old.SnapshotID)
	}
	h.restoreBytes(t, snap) // the host now holds the old snapshot and its pinned manifest

	if _, err := writer.loader.Invalidate(ctx, task2key(task)); err != nil {
		t.Fatal(err)
	}
	_, _, err = h.loader.FindSnapshot(ctx, task, KeySetOptions{}, GetOptions{ReadPolicy: LocalFirst})
	if !errkind.Is(err, errkind.NotFound) {
		t.Fatalf("after an invalidation: %v, want NotFound (the old snapshot must not come back)", err)
	}
	mem2, files2 := vmFiles(t, t.TempDir(), 93, 1<<20)
	fresh := writer.save(t, writer.keys(t, task).GetBranchKey(), mem2, files2, true)
	snap, keys, err := h.loader.FindSnapshot(ctx, task, KeySetOptions{}, GetOptions{ReadPolicy: LocalFirst})
	if err != nil || snap.Manifest.GetVmMetadata().GetSnapshotId() != fresh.SnapshotID {
		t.Fatalf("after a new save: %v, want snapshot %s", err, fresh.SnapshotID)
	}
	if keys.GetBranchKey().GetVersionId() == old.Key.GetVersionId() {
		t.Error("key set still under the invalidated version")
	}
}

func task2key(t Task) *snapshotpb.SnapshotKey {
	return &snapshotpb.SnapshotKey{InstanceName: t.InstanceName, PlatformHash: t.PlatformHash, ConfigurationHash: t.ConfigurationHash}
}

// hiding is a remote tier that lost one blob: reads of it are NotFound.
type hiding struct {
	cache.Tier
	hash string
}

func (h hiding) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	if d.GetHash() == h.hash {
		return nil, errkind.New(errkind.NotFound, "blob %s: gone", d.GetHash())
	}
	return h.Tier.Read(ctx, ns, d)
}

// TestRemoteManifestCarriesSmallBlobs: a manifest written to the remote
// carries copies of its trees and small artifact files, so resolving it
// reads no blob and asks the remote only about the chunks; a larger file
// is fetched with the lookup, and a key whose file the remote lost is
// passed over; a copy that does not match its digest is not used; a
// remote that refuses entries that large gets the manifest without copies.
func TestRemoteManifestCarriesSmallBlobs(t *testing.T) {
	ctx := context.Background()
	remoteLC := newRemoteLC(t)
	writer := newHost(t, remoteLC, Options{})
	dir := t.TempDir()
	mem, files := vmFiles(t, dir, 94, 1<<20)
	withChunks := writer.save(t, writer.keys(t, taskOn("main", "", "")).GetBranchKey(), mem, files, true)
	saveFile := func(ref, name string, data []byte) *SaveResult {
		t.Helper()
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		res, err := writer.loader.CacheSnapshot(ctx, &SaveRequest{Key: writer.keys(t, taskOn(ref, "", "")).GetBranchKey(),
			Files: map[string]string{name: path}, Local: true, Remote: true})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	filesOnly := saveFile("files", "state.bin", []byte("a small file alone"))
	large := saveFile("large", "large.bin", make([]byte, maxInlineBlob+1))
	chunks := 0
	for _, cf := range withChunks.Manifest.GetChunkedFiles() {
		chunks += len(cf.GetChunks())
	}
	find := func(t *testing.T, remote cache.Tier, task Task) (*host, *Snapshot) {
		t.Helper()
		h := newHost(t, remote, Options{})
		snap, _, err := h.loader.FindSnapshot(ctx, task, KeySetOptions{}, GetOptions{ReadPolicy: LocalFirst})
		if err != nil {
			t.Fatal(err)
		}
		return h, snap
	}

	t.Run("trees and small files come with the manifest", func(t *testing.T) {
		remote := cachecount.NewCounting(remoteLC)
		h, snap := find(t, remote, taskOn("main", "", ""))
		st := remote.Stats()
		if st.FindMissing != 1 || st.FindMissingDigests != int64(chunks) {
			t.Errorf("%d lookups of %d blobs, want 1 of the %d chunks", st.FindMissing, st.FindMissingDigests, chunks)
		}
		if st.Reads != 0 {
			t.Errorf("%d blob reads, want none (the tree and vmstate.snap come with the manifest)", st.Reads)
		}
		if _, err := h.local.Open(ctx, h.loader.Namespace(snap.Key), snap.Manifest.GetFiles()[0].GetDigest()); err != nil {
			t.Errorf("the artifact file is not in the local cache after the lookup: %v", err)
		}
		got, st2 := h.restoreBytes(t, snap)
		if string(got) != string(mustRead(t, mem)) || string(st2) != string(mustRead(t, files["vmstate.snap"])) {
			t.Error("restored bytes differ")
		}
	})
	t.Run("a snapshot of small files alone reads and asks nothing more", func(t *testing.T) {
		remote := cachecount.NewCounting(remoteLC)
		h, snap := find(t, remote, taskOn("feat", "files", ""))
		wantSnapshot(t, snap, filesOnly.SnapshotID)
		if st := remote.Stats(); st.FindMissing != 0 || st.Reads != 0 {
			t.Errorf("%d lookups and %d blob reads, want none", st.FindMissing, st.Reads)
		}
		if got := restoreFile(t, h, snap, "state.bin"); got != "a small file alone" {
			t.Errorf("restored %q", got)
		}
	})
	t.Run("a larger file is fetched with the lookup", func(t *testing.T) {
		remote := cachecount.NewCounting(remoteLC)
		_, snap := find(t, remote, taskOn("large", "", ""))
		wantSnapshot(t, snap, large.SnapshotID)
		if st := remote.Stats(); st.FindMissing != 0 || st.Reads != 1 {
			t.Errorf("%d lookups and %d blob reads, want none and 1", st.FindMissing, st.Reads)
		}
	})
	t.Run("a file the remote lost passes the key over", func(t *testing.T) {
		lost := large.Manifest.GetFiles()[0].GetDigest().GetHash()
		_, snap := find(t, hiding{Tier: remoteLC, hash: lost}, taskOn("large", "", "main"))
		if snap.FallbackIndex != 1 || snap.Manifest.GetVmMetadata().GetSnapshotId() != withChunks.SnapshotID {
			t.Errorf("found %s at fallback %d, want %s at 1", snap.Manifest.GetVmMetadata().GetSnapshotId(), snap.FallbackIndex, withChunks.SnapshotID)
		}
	})
	t.Run("a copy that does not match its digest is not used", func(t *testing.T) {
		key := writer.keys(t, taskOn("files", "", "")).GetBranchKey()
		f := filesOnly.Manifest.GetFiles()[0]
		ar, err := ManifestActionResult(filesOnly.Manifest, nil, &snapshotpb.InlineBlob{Digest: f.GetDigest(), Data: []byte("a small file ALONE")})
		if err != nil {
			t.Fatal(err)
		}
		mk, err := RemoteManifestKey(key)
		if err != nil {
			t.Fatal(err)
		}
		if err := remoteLC.UpdateActionResult(ctx, writer.loader.Namespace(key), mk, ar); err != nil {
			t.Fatal(err)
		}
		remote := cachecount.NewCounting(remoteLC)
		h, snap := find(t, remote, taskOn("files", "", ""))
		if st := remote.Stats(); st.Reads != 1 {
			t.Errorf("%d blob reads, want 1 (the file, fetched)", st.Reads)
		}
		if got := restoreFile(t, h, snap, "state.bin"); got != "a small file alone" {
			t.Errorf("restored %q", got)
		}
	})
	t.Run("a remote that refuses large entries gets the manifest without copies", func(t *testing.T) {
		refusing := &refusingCopies{Tier: newRemoteLC(t)}
		w := newHost(t, refusing, Options{})
		saved := w.save(t, w.keys(t, taskOn("main", "", "")).GetBranchKey(), mem, files, true)
		if refusing.refused.Load() == 0 {
			t.Fatal("the save wrote no manifest with copies: nothing to test")
		}
		remote := cachecount.NewCounting(refusing.Tier)
		h, snap := find(t, remote, taskOn("main", "", ""))
		wantSnapshot(t, snap, saved.SnapshotID)
		if st := remote.Stats(); st.Reads != 2 {
			t.Errorf("%d blob reads, want 2 (the tree and vmstate.snap)", st.Reads)
		}
		got, st2 := h.restoreBytes(t, snap)
		if string(got) != string(mustRead(t, mem)) || string(st2) != string(mustRead(t, files["vmstate.snap"])) {
			t.Error("restored bytes differ")
		}
	})
}

// wantSnapshot fails the test unless snap is the snapshot id.
func wantSnapshot(t *testing.T, snap *Snapshot, id string) {
	t.Helper()
	if got := snap.Manifest.GetVmMetadata().GetSnapshotId(); got != id {
		t.Fatalf("found %s, want %s", got, id)
	}
}

// restoreFile restores snap on h into a new directory and returns the
// content of its file name.
func restoreFile(t *testing.T, h *host, snap *Snapshot, name string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "r")
	if _, err := h.loader.Restore(context.Background(), snap, out, RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	return string(mustRead(t, filepath.Join(out, name)))
}

// refusingCopies is a remote whose action cache refuses entries holding
// copies of blobs, as caches that limit an entry's size do.
type refusingCopies struct {
	cache.Tier
	refused atomic.Int32
}

func (r *refusingCopies) UpdateActionResult(ctx context.Context, ns cache.Namespace, d *repb.Digest, ar *repb.ActionResult) error {
	for _, a := range ar.GetExecutionMetadata().GetAuxiliaryMetadata() {
		if a.MessageIs((*snapshotpb.InlineBlobs)(nil)) {
			r.refused.Add(1)
			return status.Errorf(codes.InvalidArgument, "action result of %d bytes is over this cache's limit", proto.Size(ar))
		}
	}
	return r.Tier.UpdateActionResult(ctx, ns, d, ar)
}
