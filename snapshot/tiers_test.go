package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/internal/cachecount"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// A third cache directory is a real second tier shared by hosts A and B.
func TestSecondTierReadPolicies(t *testing.T) {
	ctx := context.Background()
	shared := newHost(t, nil, Options{}).local
	a := newHost(t, shared, Options{})
	mem, files := vmFiles(t, t.TempDir(), 11, 2<<20)
	a.save(t, a.keys(t, taskOn("main", "", "main")).GetWriteKey(), mem, files, true)
	want := mustRead(t, mem)

	t.Run("local-only never reads the remote manifest", func(t *testing.T) {
		remote := cachecount.NewCounting(shared)
		b := newHost(t, remote, Options{})
		_, err := b.loader.GetSnapshot(ctx, b.keys(t, taskOn("main", "", "main")), GetOptions{ReadPolicy: LocalOnly})
		if status.Code(err) != codes.NotFound {
			t.Errorf("got %v, want NotFound", err)
		}
		// Only the (authoritative) version entry was read remotely.
		if st := remote.Stats(); st.ACGets != 1 {
			t.Errorf("remote action-cache reads = %d, want 1 (the version)", st.ACGets)
		}
	})

	t.Run("newest never pins the remote manifest", func(t *testing.T) {
		b := newHost(t, shared, Options{})
		ks := b.keys(t, taskOn("main", "", "main"))
		snap, err := b.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: Newest})
		if err != nil {
			t.Fatal(err)
		}
		if snap.Source != SourceRemote {
			t.Errorf("source %s, want remote", snap.Source)
		}
		if _, err := b.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly}); status.Code(err) != codes.NotFound {
			t.Errorf("after a newest read, the local manifest: got %v, want NotFound", err)
		}
	})

	t.Run("local-first pins the remote manifest and fetches only touched chunks", func(t *testing.T) {
		remote := cachecount.NewCounting(shared)
		b := newHost(t, remote, Options{})
		ks := b.keys(t, taskOn("main", "", "main"))
		snap, err := b.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalFirst})
		if err != nil {
			t.Fatal(err)
		}
		if snap.Source != SourceRemote {
			t.Fatalf("source %s, want remote", snap.Source)
		}
		u, err := b.loader.UnpackSnapshot(ctx, snap, t.TempDir(), UnpackOptions{ReadAhead: -1})
		if err != nil {
			t.Fatal(err)
		}
		readsBefore := remote.Stats().Reads
		s := u.Stores["memory.img"]
		got := make([]byte, 3*testChunk)
		if _, err := s.ReadAt(got, 4*testChunk); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[4*testChunk:7*testChunk]) {
			t.Error("lazily read bytes differ")
		}
		stored := 0
		for _, c := range snap.Manifest.GetChunkedFiles()[0].GetChunks() {
			if c.GetOffset() >= 4*testChunk && c.GetOffset() < 7*testChunk {
				stored++
			}
		}
		if n := remote.Stats().Reads - readsBefore; n != int64(stored) {
			t.Errorf("remote chunk reads = %d, want %d (the stored chunks among the 3 touched)", n, stored)
		}
		u.Close()

		// Now the local manifest is used; its missing chunks are confirmed
		// present remotely with one FindMissing call.
		fmBefore := remote.Stats().FindMissing
		snap2, err := b.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalFirst})
		if err != nil {
			t.Fatal(err)
		}
		if snap2.Source != SourceLocal || !snap2.RemoteChunks {
			t.Errorf("second read: source %s remoteChunks %v, want local manifest with remote chunks", snap2.Source, snap2.RemoteChunks)
		}
		if n := remote.Stats().FindMissing - fmBefore; n != 1 {
			t.Errorf("FindMissing calls on the remote = %d, want 1", n)
		}
		full, _ := b.restoreBytes(t, snap2)
		if !bytes.Equal(full, want) {
			t.Error("restore through the second tier differs")
		}
		// Under local-only the pinned manifest is usable only if every blob is
		// local: after the full read above, it is.
		if _, err := b.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly}); err != nil {
			t.Errorf("local-only after all chunks were fetched: %v", err)
		}
	})
}

func TestEvictedChunksFallThrough(t *testing.T) {
	ctx := context.Background()
	h := newHost(t, nil, Options{})
	memMain, files := vmFiles(t, t.TempDir(), 21, 1<<20)
	memFeat, _ := vmFiles(t, t.TempDir(), 22, 1<<20)
	h.save(t, h.keys(t, taskOn("main", "", "main")).GetWriteKey(), memMain, files, false)
	feat := h.keys(t, taskOn("feat", "", "main"))
	res := h.save(t, feat.GetWriteKey(), memFeat, files, false)

	// Evict one chunk only feat's snapshot has.
	ns := h.loader.Namespace(feat.GetWriteKey())
	var victim int64 = -1
	for _, c := range res.Manifest.GetChunkedFiles()[0].GetChunks() {
		if err := os.Remove(h.local.Path(ns, c.GetDigest())); err == nil {
			victim = c.GetOffset()
			break
		}
	}
	if victim < 0 {
		t.Fatal("no chunk file to remove")
	}
	if err := h.local.Rescan(ctx); err != nil {
		t.Fatal(err)
	}
	snap, err := h.loader.GetSnapshot(ctx, feat, GetOptions{ReadPolicy: LocalFirst})
	if err != nil {
		t.Fatal(err)
	}
	if snap.FallbackIndex != 1 || snap.Key.GetRef() != "main" {
		t.Errorf("got fallback %d ref %q, want the main fallback", snap.FallbackIndex, snap.Key.GetRef())
	}
	// With nothing else to serve, the error names the missing chunk.
	alone := h.keys(t, taskOn("feat", "", ""))
	_, err = h.loader.GetSnapshot(ctx, alone, GetOptions{ReadPolicy: LocalFirst})
	if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), `chunk of "memory.img" at offset`) {
		t.Errorf("got %v, want NotFound naming the missing chunk", err)
	}
}

func TestUniversalRef(t *testing.T) {
	ctx := context.Background()
	h := newHost(t, nil, Options{})
	mem, files := vmFiles(t, t.TempDir(), 51, 1<<20)
	opts := KeySetOptions{UniversalRef: "__universal"}
	feat, err := h.loader.KeySet(ctx, taskOn("feat", "", "main"), opts)
	if err != nil {
		t.Fatal(err)
	}
	universal := proto.Clone(feat.GetWriteKey()).(*snapshotpb.SnapshotKey)
	universal.Ref = "__universal"
	s, _, err := cow.FromFile(ctx, "memory.img", mem, h.local, h.local, cow.Options{Namespace: h.loader.Namespace(universal), ChunkSize: testChunk, TempDir: h.local.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	res, err := h.loader.CacheSnapshot(ctx, &SaveRequest{Key: feat.GetWriteKey(), Files: files, Chunked: []*cow.Store{s}, Local: true, LocalManifest: true, AlsoKeys: []*snapshotpb.SnapshotKey{universal}})
	if err != nil {
		t.Fatal(err)
	}
	// A branch whose repository never ran on main still starts warm.
	other, err := h.loader.KeySet(ctx, taskOn("other", "", "main"), opts)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := h.loader.GetSnapshot(ctx, other, GetOptions{ReadPolicy: LocalFirst})
	if err != nil {
		t.Fatal(err)
	}
	if snap.Key.GetRef() != "__universal" || snap.FallbackIndex != 2 || snap.Manifest.GetVmMetadata().GetSnapshotId() != res.SnapshotID {
		t.Errorf("got ref %q fallback %d, want the universal ref's snapshot as fallback 2", snap.Key.GetRef(), snap.FallbackIndex)
	}
	// Without the option nobody sees it.
	plain, err := h.loader.KeySet(ctx, taskOn("other", "", "main"), KeySetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.loader.GetSnapshot(ctx, plain, GetOptions{ReadPolicy: LocalFirst}); status.Code(err) != codes.NotFound {
		t.Errorf("without a universal ref: got %v, want NotFound", err)
	}
}

// TestWorkingSetPrefetch: chunks a restored VM touched are recorded by the
// next save and prefetched by the next restore, in place of blind
// read-ahead.
func TestWorkingSetPrefetch(t *testing.T) {
	ctx := context.Background()
	h := newHost(t, nil, Options{})
	mem, files := vmFiles(t, t.TempDir(), 71, 2<<20)
	ks := h.keys(t, taskOn("main", "", ""))
	h.save(t, ks.GetBranchKey(), mem, files, false)
	snap, err := h.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly})
	if err != nil {
		t.Fatal(err)
	}
	// First restore: the VM touches two stored chunks, in this order.
	var order []int64
	for _, c := range snap.Manifest.GetChunkedFiles()[0].GetChunks()[3:5] {
		order = append([]int64{c.GetOffset()}, order...)
	}
	u, err := h.loader.UnpackSnapshot(ctx, snap, t.TempDir(), UnpackOptions{ReadAhead: -1})
	if err != nil {
		t.Fatal(err)
	}
	s := u.Stores["memory.img"]
	buf := make([]byte, 10)
	for _, off := range order {
		if _, err := s.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	res, err := h.loader.CacheSnapshot(ctx, &SaveRequest{Key: ks.GetBranchKey(), Files: u.Files, Chunked: []*cow.Store{s}, Local: true, LocalManifest: true})
	u.Close()
	if err != nil {
		t.Fatal(err)
	}
	ws := res.Manifest.GetVmMetadata().GetWorkingSets()
	if len(ws) != 1 || fmt.Sprint(ws[0].GetOffsets()) != fmt.Sprint(order) {
		t.Fatalf("recorded working set %v, want memory.img %v", ws, order)
	}

	// Next restore prefetches exactly those chunks and reads ahead nothing.
	snap2, err := h.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly})
	if err != nil {
		t.Fatal(err)
	}
	u2, err := h.loader.UnpackSnapshot(ctx, snap2, t.TempDir(), UnpackOptions{PrefetchWorkingSet: true})
	if err != nil {
		t.Fatal(err)
	}
	defer u2.Close()
	s2 := u2.Stores["memory.img"]
	deadline := time.Now().Add(20 * time.Second)
	for s2.Stats().Prefetched < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	// A read of another stored chunk would schedule read-ahead if it were on.
	if _, err := s2.ReadAt(buf, snap2.Manifest.GetChunkedFiles()[0].GetChunks()[0].GetOffset()); err != nil {
		t.Fatal(err)
	}
	if st := s2.Stats(); st.Prefetched != 2 || st.PrefetchQueued != 2 {
		t.Errorf("prefetched %d, queued %d; want exactly the 2 working-set chunks and no read-ahead", st.Prefetched, st.PrefetchQueued)
	}
}

func TestReadOnlyRemoteVersions(t *testing.T) {
	ctx := context.Background()
	shared := newHost(t, nil, Options{}).local
	ro := newHost(t, shared, Options{RemoteReadOnly: true})
	// Nothing published: the read-only host keeps one version of its own.
	v1 := ro.keys(t, taskOn("main", "", "")).GetBranchKey().GetVersionId()
	v2 := ro.keys(t, taskOn("main", "", "")).GetBranchKey().GetVersionId()
	if v1 == "" || v1 != v2 {
		t.Errorf("read-only host versions %q then %q, want one stable id", v1, v2)
	}
	// It may not invalidate what it cannot write.
	if _, err := ro.loader.Invalidate(ctx, ro.keys(t, taskOn("main", "", "")).GetBranchKey()); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Invalidate on a read-only remote: %v, want FailedPrecondition", err)
	}
	// Once a writer publishes a version, the read-only host follows it.
	w := newHost(t, shared, Options{})
	pub := w.keys(t, taskOn("main", "", "")).GetBranchKey().GetVersionId()
	if got := ro.keys(t, taskOn("main", "", "")).GetBranchKey().GetVersionId(); got != pub {
		t.Errorf("read-only host version %q, want the published %q", got, pub)
	}
}

// A save makes every chunk its manifest names present where readers of
// that manifest look: clean chunks the remote lacks are uploaded, and a
// chunk no tier has any more fails the save before the manifest.
func TestSaveCompletesEveryTier(t *testing.T) {
	ctx := context.Background()
	shared := newHost(t, nil, Options{}).local
	h := newHost(t, shared, Options{})
	mem, files := vmFiles(t, t.TempDir(), 81, 2<<20)
	ks := h.keys(t, taskOn("main", "", ""))
	h.save(t, ks.GetBranchKey(), mem, files, false) // local only
	snap, err := h.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("remote-only save uploads the clean chunks too", func(t *testing.T) {
		u, err := h.loader.UnpackSnapshot(ctx, snap, t.TempDir(), UnpackOptions{ReadAhead: -1})
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		s := u.Stores["memory.img"]
		if _, err := s.WriteAt([]byte("dirty"), 0); err != nil {
			t.Fatal(err)
		}
		res, err := h.loader.CacheSnapshot(ctx, &SaveRequest{Key: ks.GetBranchKey(), Files: u.Files, Chunked: []*cow.Store{s}, Remote: true})
		if err != nil {
			t.Fatal(err)
		}
		var ds []*repb.Digest
		for _, c := range res.Manifest.GetChunkedFiles()[0].GetChunks() {
			ds = append(ds, c.GetDigest())
		}
		if missing, err := shared.FindMissing(ctx, h.loader.Namespace(ks.GetBranchKey()), ds); err != nil || len(missing) != 0 {
			t.Errorf("remote lacks %d of the %d chunks its manifest names (err %v)", len(missing), len(ds), err)
		}
	})

	t.Run("a chunk in no tier fails the save", func(t *testing.T) {
		alone := newHost(t, nil, Options{})
		alone.save(t, ks.GetBranchKey(), mem, files, false)
		snap, err := alone.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly})
		if err != nil {
			t.Fatal(err)
		}
		u, err := alone.loader.UnpackSnapshot(ctx, snap, t.TempDir(), UnpackOptions{ReadAhead: -1})
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		chunks := snap.Manifest.GetChunkedFiles()[0].GetChunks()
		ns := alone.loader.Namespace(ks.GetBranchKey())
		if err := os.Remove(alone.local.Path(ns, chunks[len(chunks)-1].GetDigest())); err != nil {
			t.Fatal(err)
		}
		alone.local.Rescan(ctx)
		s := u.Stores["memory.img"]
		if _, err := s.WriteAt([]byte("dirty"), chunks[0].GetOffset()); err != nil {
			t.Fatal(err)
		}
		_, err = alone.loader.CacheSnapshot(ctx, &SaveRequest{Key: ks.GetBranchKey(), Files: u.Files, Chunked: []*cow.Store{s}, Local: true, LocalManifest: true})
		if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), "in no cache") {
			t.Fatalf("save naming a lost chunk: %v, want NotFound", err)
		}
		again, err := alone.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly})
		if err == nil && again.Manifest.GetVmMetadata().GetSnapshotId() != snap.Manifest.GetVmMetadata().GetSnapshotId() {
			t.Error("a manifest was written by the failed save")
		}
	})
}
