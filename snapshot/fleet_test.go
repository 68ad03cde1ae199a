package snapshot

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// racingVersions is a remote tier without compare-and-swap whose version
// lookups are held until n callers have all read "no version": the worst
// interleaving of n hosts saving a new key at once.
type racingVersions struct {
	cache.Tier
	n       int
	mu      sync.Mutex
	waiting int
	release chan struct{}
	raced   atomic.Bool
}

func newRacingVersions(c cache.Tier, n int) *racingVersions {
	return &racingVersions{Tier: c, n: n, release: make(chan struct{})}
}

func (r *racingVersions) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	ar, err := r.Tier.GetActionResult(ctx, ns, key)
	if !cache.IsNotFound(err) || key.GetHash() != VersionKey(&snapshotpb.SnapshotKey{InstanceName: testTask.InstanceName, PlatformHash: testTask.PlatformHash, ConfigurationHash: testTask.ConfigurationHash}).GetHash() || r.raced.Load() {
		return ar, err
	}
	r.mu.Lock()
	r.waiting++
	if r.waiting == r.n {
		r.raced.Store(true)
		close(r.release)
	}
	r.mu.Unlock()
	<-r.release
	return ar, err
}

// Hosts saving a new key at once, each on its own ref (a fleet's first run
// on new branches), all create a version id; the one stored last wins. Every
// save that returned must be reachable through the version id that won.
func TestConcurrentFirstSavesAreAllReachable(t *testing.T) {
	ctx := context.Background()
	const hosts = 4
	shared := newHost(t, nil, Options{}).local
	remote := newRacingVersions(shared, hosts)
	type saved struct {
		ref, id string
	}
	results := make([]saved, hosts)
	var wg sync.WaitGroup
	hs := make([]*host, hosts)
	for i := range hosts {
		hs[i] = newHost(t, remote, Options{})
	}
	for i := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := hs[i]
			ref := fmt.Sprintf("feature-%d", i)
			ks, err := h.loader.KeySet(ctx, taskOn(ref, "", "main"), KeySetOptions{})
			if err != nil {
				t.Error(err)
				return
			}
			mem, files := vmFiles(t, t.TempDir(), uint64(40+i), 256<<10)
			res := h.save(t, ks.GetWriteKey(), mem, files, true)
			results[i] = saved{ref, res.SnapshotID}
		}()
	}
	wg.Wait()
	if !remote.raced.Load() {
		t.Fatal("the hosts did not race on creating the version")
	}
	// Any host, even a new one, finds every ref's own snapshot.
	reader := newHost(t, shared, Options{})
	for _, r := range results {
		ks := reader.keys(t, taskOn(r.ref, "", ""))
		snap, err := reader.loader.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalFirst})
		if err != nil {
			t.Errorf("ref %s: saved snapshot %s is not reachable: %v", r.ref, r.id, err)
			continue
		}
		if got := snap.Manifest.GetVmMetadata().GetSnapshotId(); got != r.id {
			t.Errorf("ref %s: got snapshot %s, want %s", r.ref, got, r.id)
		}
	}
	// And every host agrees on the version id.
	want := reader.keys(t, taskOn("x", "", "")).GetBranchKey().GetVersionId()
	for i, h := range hs {
		if got := h.keys(t, taskOn("x", "", "")).GetBranchKey().GetVersionId(); got != want {
			t.Errorf("host %d: version %s, want %s", i, got, want)
		}
	}
}

// Processes sharing one cache directory and no remote create the version
// atomically: all agree at once, and every save is reachable.
func TestConcurrentFirstSavesOnOneCacheDirectory(t *testing.T) {
	ctx := context.Background()
	base := newHost(t, nil, Options{})
	const procs = 4
	ids := make([]string, procs)
	versions := make([]string, procs)
	var wg sync.WaitGroup
	for i := range procs {
		h := reopen(t, base)
		wg.Add(1)
		go func() {
			defer wg.Done()
			ks, err := h.loader.KeySet(ctx, taskOn(fmt.Sprintf("b%d", i), "", ""), KeySetOptions{})
			if err != nil {
				t.Error(err)
				return
			}
			versions[i] = ks.GetWriteKey().GetVersionId()
			mem, files := vmFiles(t, t.TempDir(), uint64(60+i), 256<<10)
			ids[i] = h.save(t, ks.GetWriteKey(), mem, files, false).SnapshotID
		}()
	}
	wg.Wait()
	for i := range procs {
		if versions[i] != versions[0] {
			t.Fatalf("processes created different version ids: %v", versions)
		}
		snap, err := base.loader.GetSnapshot(ctx, base.keys(t, taskOn(fmt.Sprintf("b%d", i), "", "")), GetOptions{ReadPolicy: LocalOnly})
		if err != nil || snap.Manifest.GetVmMetadata().GetSnapshotId() != ids[i] {
			t.Errorf("ref b%d: got %v, %v; want snapshot %s", i, snap, err, ids[i])
		}
	}
}

// invalidatingTier invalidates the key (as another host would) just before
// the first manifest is written to it.
type invalidatingTier struct {
	cache.Tier
	once  sync.Once
	other *Loader
	key   *snapshotpb.SnapshotKey
}

func (t *invalidatingTier) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	if t.key != nil && key.GetHash() != VersionKey(t.key).GetHash() {
		t.once.Do(func() {
			if _, err := t.other.Invalidate(ctx, t.key); err != nil {
				panic(err)
			}
		})
	}
	return t.Tier.UpdateActionResult(ctx, ns, key, ar)
}

// A save that an invalidation overtakes is not republished under the new
// version: invalidation wins, and the save says so.
func TestSaveOvertakenByInvalidation(t *testing.T) {
	ctx := context.Background()
	shared := newHost(t, nil, Options{}).local
	other := newHost(t, shared, Options{})
	tier := &invalidatingTier{Tier: shared, other: other.loader}
	h := newHost(t, tier, Options{})
	ks := h.keys(t, taskOn("main", "", "main"))
	tier.key = ks.GetWriteKey()
	mem, files := vmFiles(t, t.TempDir(), 70, 256<<10)
	res := h.save(t, ks.GetWriteKey(), mem, files, true)
	if !res.Invalidated {
		t.Error("SaveResult.Invalidated is false, want true")
	}
	if _, err := other.loader.GetSnapshot(ctx, other.keys(t, taskOn("main", "", "main")), GetOptions{ReadPolicy: Newest}); status.Code(err) != codes.NotFound {
		t.Errorf("after invalidation: %v, want NotFound", err)
	}
}

// One version per key whatever the digest function: an invalidation by a
// host using the default function covers snapshots saved with SHA-256, and
// a host using BLAKE3 restores a SHA-256 snapshot.
func TestVersionsAndManifestsIgnoreTheDigestFunction(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		entry digest.Function // the remote's entry function
	}{
		{"blake3 remote", digest.BLAKE3},
		{"sha256-only remote", digest.SHA256},
	} {
		t.Run(tc.name, func(t *testing.T) {
			shared := newHost(t, nil, Options{}).local
			shaHost := newHost(t, shared, Options{Function: digest.SHA256, RemoteEntryFunction: tc.entry})
			b3Host := newHost(t, shared, Options{RemoteEntryFunction: tc.entry})
			ks := shaHost.keys(t, taskOn("main", "", "main"))
			mem, files := vmFiles(t, t.TempDir(), 80, 256<<10)
			res := shaHost.save(t, ks.GetWriteKey(), mem, files, true)

			b3Keys := b3Host.keys(t, taskOn("main", "", "main"))
			if b3Keys.GetBranchKey().GetVersionId() != ks.GetBranchKey().GetVersionId() {
				t.Fatalf("the BLAKE3 host sees version %s, the SHA-256 host %s", b3Keys.GetBranchKey().GetVersionId(), ks.GetBranchKey().GetVersionId())
			}
			snap, err := b3Host.loader.GetSnapshot(ctx, b3Keys, GetOptions{ReadPolicy: LocalFirst})
			if err != nil {
				t.Fatalf("BLAKE3 host restoring a SHA-256 snapshot: %v", err)
			}
			if snap.Function != digest.SHA256 || snap.Manifest.GetVmMetadata().GetSnapshotId() != res.SnapshotID {
				t.Fatalf("got snapshot %s with function %v", snap.Manifest.GetVmMetadata().GetSnapshotId(), snap.Function)
			}
			mb, _ := b3Host.restoreBytes(t, snap)
			if want, _ := shaHost.restoreBytes(t, snap); string(mb) != string(want) {
				t.Fatal("restored bytes differ")
			}

			if _, err := b3Host.loader.Invalidate(ctx, b3Keys.GetBranchKey()); err != nil {
				t.Fatal(err)
			}
			for _, h := range []*host{shaHost, b3Host} {
				if _, err := h.loader.GetSnapshot(ctx, h.keys(t, taskOn("main", "", "main")), GetOptions{ReadPolicy: LocalFirst}); status.Code(err) != codes.NotFound {
					t.Errorf("after invalidation by the BLAKE3 host, a %v host got %v, want NotFound", h.loader.opts.Function, err)
				}
			}
		})
	}
}

// switchable is a remote tier that can be taken down.
type switchable struct {
	cache.Tier
	down atomic.Bool
}

func (s *switchable) check() error {
	if s.down.Load() {
		return status.Error(codes.Unavailable, "connection refused")
	}
	return nil
}

func (s *switchable) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	return s.Tier.FindMissing(ctx, ns, ds)
}

func (s *switchable) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	return s.Tier.GetActionResult(ctx, ns, key)
}

func (s *switchable) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	if err := s.check(); err != nil {
		return err
	}
	return s.Tier.UpdateActionResult(ctx, ns, key, ar)
}

func (s *switchable) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	if err := s.check(); err != nil {
		return err
	}
	return s.Tier.Write(ctx, ns, d, r)
}

func (s *switchable) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	return s.Tier.Read(ctx, ns, d)
}

// A remote outage degrades to the local tier: the host restores what it
// holds under the last version id it saw, saves locally, and when the
// remote is back follows its version again (an invalidation made while
// the host was cut off is seen).
func TestRemoteOutageDegradesToLocal(t *testing.T) {
	ctx := context.Background()
	shared := newHost(t, nil, Options{}).local
	remote := &switchable{Tier: shared}
	h := newHost(t, cache.WithBreaker(remote, cache.BreakerOptions{Name: "test remote"}), Options{})
	ks := h.keys(t, taskOn("main", "", "main"))
	mem, files := vmFiles(t, t.TempDir(), 90, 256<<10)
	saved := h.save(t, ks.GetWriteKey(), mem, files, true)
	if !saved.PublishedRemote {
		t.Fatal("the first save did not publish")
	}

	remote.down.Store(true)
	down := &host{dir: h.dir, local: h.local}
	down.loader, _ = New(h.local, cache.WithBreaker(remote, cache.BreakerOptions{Name: "test remote"}), Options{})
	ks2 := down.keys(t, taskOn("main", "", "main"))
	if ks2.GetBranchKey().GetVersionId() != ks.GetBranchKey().GetVersionId() {
		t.Fatalf("with the remote down: version %s, want the last one seen %s", ks2.GetBranchKey().GetVersionId(), ks.GetBranchKey().GetVersionId())
	}
	snap, err := down.loader.GetSnapshot(ctx, ks2, GetOptions{ReadPolicy: LocalFirst})
	if err != nil || snap.Manifest.GetVmMetadata().GetSnapshotId() != saved.SnapshotID {
		t.Fatalf("with the remote down: %v, %v; want the local snapshot %s", snap, err, saved.SnapshotID)
	}
	if down.loader.RemoteDown() == nil {
		t.Error("RemoteDown is nil during an outage")
	}
	// Without --remote at all, the same host still has that version.
	alone := reopen(t, h)
	if v := alone.keys(t, taskOn("main", "", "main")).GetBranchKey().GetVersionId(); v != ks.GetBranchKey().GetVersionId() {
		t.Errorf("without a remote: version %s, want %s", v, ks.GetBranchKey().GetVersionId())
	}
	// A save during the outage completes locally.
	mem2, files2 := vmFiles(t, t.TempDir(), 91, 256<<10)
	res := down.save(t, ks2.GetWriteKey(), mem2, files2, true)
	if res.PublishedRemote || !res.PublishedLocal || res.RemoteError == nil {
		t.Errorf("save during outage: published remote %v, local %v, remote error %v", res.PublishedRemote, res.PublishedLocal, res.RemoteError)
	}
	snap, err = down.loader.GetSnapshot(ctx, ks2, GetOptions{ReadPolicy: LocalFirst})
	if err != nil || snap.Manifest.GetVmMetadata().GetSnapshotId() != res.SnapshotID {
		t.Fatalf("after a save during the outage: %v, %v; want %s", snap, err, res.SnapshotID)
	}

	// Meanwhile another host invalidates the key on the remote.
	remote.down.Store(false)
	other := newHost(t, shared, Options{})
	if _, err := other.loader.Invalidate(ctx, ks.GetBranchKey()); err != nil {
		t.Fatal(err)
	}
	back, _ := New(h.local, remote, Options{})
	bh := &host{dir: h.dir, local: h.local, loader: back}
	ks3 := bh.keys(t, taskOn("main", "", "main"))
	if ks3.GetBranchKey().GetVersionId() == ks.GetBranchKey().GetVersionId() {
		t.Fatal("the invalidation made during the outage is not seen when the remote is back")
	}
	if _, err := back.GetSnapshot(ctx, ks3, GetOptions{ReadPolicy: LocalFirst}); status.Code(err) != codes.NotFound {
		t.Errorf("after the invalidation: %v, want NotFound", err)
	}
}

// collecting is a remote tier from which a collection deletes blobs right
// after FindMissing reported them present to a save: the window between a
// save's FindMissing and its manifest write.
type collecting struct {
	cache.Tier
	lc interface {
		Discard(context.Context, cache.Namespace, *repb.Digest) error
	}
	once sync.Once
	lost atomic.Int64
}

func (c *collecting) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	missing, err := c.Tier.FindMissing(ctx, ns, ds)
	if err != nil || len(missing) == len(ds) {
		return missing, err
	}
	c.once.Do(func() {
		gone := map[string]bool{}
		for _, d := range missing {
			gone[d.GetHash()] = true
		}
		for _, d := range ds {
			if !gone[d.GetHash()] {
				c.lc.Discard(ctx, ns, d)
				c.lost.Add(1)
			}
		}
	})
	return missing, err
}

// A blob collected after FindMissing said it was present is uploaded again
// once the manifest is written: the manifest never names a missing blob.
func TestSaveRepairsBlobsCollectedMeanwhile(t *testing.T) {
	ctx := context.Background()
	shared := newHost(t, nil, Options{}).local
	mem, files := vmFiles(t, t.TempDir(), 95, 256<<10)
	first := newHost(t, shared, Options{})
	ks := first.keys(t, taskOn("main", "", "main"))
	first.save(t, ks.GetWriteKey(), mem, files, true)
	// A second host saves the same data: every blob is present remotely,
	// and a collection removes them just after FindMissing said so.
	tier := &collecting{Tier: shared, lc: shared}
	h := newHost(t, tier, Options{})
	res := h.save(t, ks.GetWriteKey(), mem, files, true)
	if tier.lost.Load() == 0 {
		t.Fatal("no blob was collected during the save")
	}
	reader := newHost(t, shared, Options{})
	snap, err := reader.loader.GetSnapshot(ctx, reader.keys(t, taskOn("main", "", "main")), GetOptions{ReadPolicy: Newest})
	if err != nil || snap.Manifest.GetVmMetadata().GetSnapshotId() != res.SnapshotID {
		t.Fatalf("after a collection during the save: %v, %v; want snapshot %s with every blob", snap, err, res.SnapshotID)
	}
	reader.restoreBytes(t, snap)
}
