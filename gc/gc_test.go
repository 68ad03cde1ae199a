package gc

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/snapshot"
)

const (
	testChunk = 64 << 10
	imageSize = 2 << 20
)

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// bucket is a MinIO bucket the tests write snapshots to with clocks of
// their choosing.
type bucket struct {
	m    testutil.MinIO
	name string
}

func newBucket(t *testing.T) *bucket {
	m := testutil.StartMinIO(t)
	return &bucket{m: m, name: m.NewBucket(t)}
}

// tier opens the bucket with the writer's clock fixed at now; ages come
// from the recorded write times, so that tests set them without sleeping.
func (b *bucket) tier(t testing.TB, now time.Time, mod func(*s3cache.Options)) *s3cache.Cache {
	t.Helper()
	opts := s3cache.Options{
		Endpoint: b.m.Endpoint, Bucket: b.name, Prefix: "fleet", Region: "us-east-1",
		AccessKey: b.m.AccessKey, SecretKey: b.m.SecretKey,
		Now: func() time.Time { return now }, ClockFromMetadata: true,
	}
	if mod != nil {
		mod(&opts)
	}
	c, err := s3cache.New(ctxT(t), opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// host is one machine: its own local cache and a loader over the bucket.
type host struct {
	local  *localcache.Cache
	loader *snapshot.Loader
	remote cache.Tier
}

func newHost(t testing.TB, remote cache.Tier, now time.Time) *host {
	t.Helper()
	local, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { local.Close() })
	l, err := snapshot.New(local, remote, snapshot.Options{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	return &host{local: local, loader: l, remote: remote}
}

func task(config, ref string) snapshot.Task {
	return snapshot.Task{InstanceName: "ci", PlatformHash: "p1", ConfigurationHash: config,
		Env: map[string]string{snapshot.EnvBranch: ref, snapshot.EnvDefaultBranch: ref}}
}

// saved is a snapshot a test saved: its content and the blobs it names.
type saved struct {
	id      string
	config  string
	mem     []byte
	vmstate []byte
	blobs   []*repb.Digest
}

func (h *host) save(t testing.TB, tk snapshot.Task, mem, vmstate []byte) *saved {
	t.Helper()
	ctx := ctxT(t)
	dir := t.TempDir()
	memPath, statePath := filepath.Join(dir, "memory.img"), filepath.Join(dir, "vmstate")
	if err := os.WriteFile(memPath, mem, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(statePath, vmstate, 0o644); err != nil {
		t.Fatal(err)
	}
	keys, err := h.loader.KeySet(ctx, tk, snapshot.KeySetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ns := h.loader.Namespace(keys.GetWriteKey())
	s, _, err := cow.FromFile(ctx, "memory.img", memPath, h.local, h.local, cow.Options{Namespace: ns, ChunkSize: testChunk, TempDir: h.local.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	res, err := h.loader.CacheSnapshot(ctx, &snapshot.SaveRequest{
		Key: keys.GetWriteKey(), Files: map[string]string{"vmstate": statePath}, Chunked: []*cow.Store{s},
		Local: true, Remote: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if !res.PublishedRemote {
		t.Fatalf("save not published remotely: %v", res.RemoteError)
	}
	sv := &saved{id: res.SnapshotID, config: tk.ConfigurationHash, mem: mem, vmstate: vmstate}
	for _, f := range res.Manifest.GetFiles() {
		sv.blobs = append(sv.blobs, f.GetDigest())
	}
	for _, cf := range res.Manifest.GetChunkedFiles() {
		tb, err := proto.MarshalOptions{Deterministic: true}.Marshal(snapshot.ChunkedFileTree(cf))
		if err != nil {
			t.Fatal(err)
		}
		sv.blobs = append(sv.blobs, digest.Compute(digest.BLAKE3, tb))
		for _, c := range cf.GetChunks() {
			sv.blobs = append(sv.blobs, c.GetDigest())
			if o := c.GetOutboard(); o != nil {
				sv.blobs = append(sv.blobs, o)
			}
		}
	}
	return sv
}

// checkRestores restores sv on a fresh host and compares every byte, then
// reads every blob it names through the verifying tier (what verify does).
func checkRestores(t *testing.T, remote *s3cache.Cache, sv *saved) {
	t.Helper()
	ctx := ctxT(t)
	h := newHost(t, remote, time.Now())
	snap, err := h.loader.GetSnapshotByID(ctx, "ci", sv.id, snapshot.GetOptions{ReadPolicy: snapshot.Newest})
	if err != nil {
		t.Fatalf("snapshot %s: %v", sv.id, err)
	}
	u, err := h.loader.UnpackSnapshot(ctx, snap, t.TempDir(), snapshot.UnpackOptions{})
	if err != nil {
		t.Fatalf("unpacking %s: %v", sv.id, err)
	}
	defer u.Close()
	got := make([]byte, len(sv.mem))
	if _, err := u.Stores["memory.img"].ReadAt(got, 0); err != nil && err != io.EOF {
		t.Fatalf("reading memory of %s: %v", sv.id, err)
	}
	state, err := os.ReadFile(u.Files["vmstate"])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, sv.mem) || !bytes.Equal(state, sv.vmstate) {
		t.Errorf("snapshot %s does not restore byte for byte", sv.id)
	}
	for _, d := range sv.blobs {
		if _, err := cache.ReadAll(ctx, remote, cache.Namespace{Function: digest.BLAKE3}, d); err != nil {
			t.Errorf("snapshot %s: blob %s: %v", sv.id, digest.String(d), err)
		}
	}
}

// evolve returns mem with n random chunks rewritten and one zeroed.
func evolve(mem []byte, n int, rng *rand.Rand) []byte {
	out := bytes.Clone(mem)
	chunks := len(mem) / testChunk
	for range n {
		c := rng.IntN(chunks)
		for i := c * testChunk; i < (c+1)*testChunk; i++ {
			out[i] = byte(rng.Uint32())
		}
	}
	z := rng.IntN(chunks) * testChunk
	clear(out[z : z+testChunk])
	return out
}

func image(rng *rand.Rand) []byte {
	mem := make([]byte, imageSize)
	for i := range mem {
		if (i/testChunk)%5 != 0 {
			mem[i] = byte(rng.Uint32() % 7) // compressible, non-zero
		}
	}
	return mem
}

// objectKeys lists the bucket's objects under prefix.
func objectKeys(t testing.TB, c *s3cache.Cache) (entries, blobs map[string]bool) {
	t.Helper()
	entries, blobs = map[string]bool{}, map[string]bool{}
	if err := c.ListEntries(ctxT(t), func(o s3cache.EntryObject) error { entries[o.Key] = true; return nil }); err != nil {
		t.Fatal(err)
	}
	if err := c.ListBlobs(ctxT(t), func(o s3cache.BlobObject) error { blobs[o.Key] = true; return nil }); err != nil {
		t.Fatal(err)
	}
	return entries, blobs
}

func blobKeyOf(d *repb.Digest) string {
	return "fleet/cas/blake3/" + d.GetHash() + "-" + itoa(d.GetSizeBytes())
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func idEntryKey(t testing.TB, id string) string {
	k, err := snapshot.RemoteSnapshotIDManifestKey("ci", id)
	if err != nil {
		t.Fatal(err)
	}
	return "fleet/ac/_/" + sha256Hex("ci") + "/blake3/" + k.GetHash()
}

func sha256Hex(s string) string { return digest.Compute(digest.SHA256, []byte(s)).GetHash() }

func collect(t *testing.T, st Store, opts Options) (*Report, []string) {
	t.Helper()
	var mu sync.Mutex
	var deleted []string
	opts.OnDelete = func(_ Kind, id string, _ int64) {
		mu.Lock()
		deleted = append(deleted, id)
		mu.Unlock()
	}
	rep, err := Run(ctxT(t), st, opts)
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(deleted)
	return rep, deleted
}

// Five snapshots of one key and three of another, saved over ten days: a
// collection deletes exactly the expired snapshot-id entries and the blobs
// only expired snapshots named.
func TestCollectRetention(t *testing.T) {
	b := newBucket(t)
	base := time.Now().Truncate(time.Second)
	rng := rand.New(rand.NewPCG(1, 2))
	type plan struct {
		config string
		age    time.Duration
	}
	day := 24 * time.Hour
	plans := []plan{
		{"A", 10 * day}, {"B", 10 * day}, {"A", 9 * day}, {"B", 9 * day}, {"A", 8 * day},
		{"A", 2 * day}, {"A", 1 * day}, {"B", 1 * day},
	}
	mems := map[string][]byte{"A": image(rng), "B": image(rng)}
	var all []*saved
	for i, p := range plans {
		at := base.Add(-p.age).Add(time.Duration(i) * time.Minute)
		h := newHost(t, b.tier(t, at, nil), at)
		mems[p.config] = evolve(mems[p.config], 3, rng)
		all = append(all, h.save(t, task(p.config, "main"), mems[p.config], []byte("state "+itoa(int64(i)))))
	}
	newest := map[string]*saved{}
	for _, sv := range all {
		newest[sv.config] = sv
	}
	// Live: the newest of each key, and those younger than 7 days.
	var live, expired []*saved
	for i, sv := range all {
		if newest[sv.config] == sv || plans[i].age < 7*day {
			live = append(live, sv)
		} else {
			expired = append(expired, sv)
		}
	}
	if len(live) != 3 || len(expired) != 5 {
		t.Fatalf("plan: %d live, %d expired", len(live), len(expired))
	}
	liveBlobs := map[string]bool{}
	for _, sv := range live {
		for _, d := range sv.blobs {
			liveBlobs[blobKeyOf(d)] = true
		}
	}
	want := map[string]bool{}
	for _, sv := range expired {
		want[idEntryKey(t, sv.id)] = true
		for _, d := range sv.blobs {
			if k := blobKeyOf(d); !liveBlobs[k] {
				want[k] = true
			}
		}
	}
	wantList := slices.Sorted(func(yield func(string) bool) {
		for k := range want {
			if !yield(k) {
				return
			}
		}
	})
	viewer := b.tier(t, base, nil)
	st := S3(viewer)
	h := newHost(t, viewer, base)
	versionBefore, err := h.loader.CurrentVersion(ctxT(t), &snapshotpb.SnapshotKey{InstanceName: "ci", PlatformHash: "p1", ConfigurationHash: "A"})
	if err != nil {
		t.Fatal(err)
	}
	entriesBefore, blobsBefore := objectKeys(t, viewer)
	opts := Options{Retention: 7 * day, Grace: time.Hour, Now: func() time.Time { return base }, BatchSize: 7}

	dry, dryDeleted := collect(t, st, Options{Retention: opts.Retention, Grace: opts.Grace, Now: opts.Now, BatchSize: 7, DryRun: true})
	if !slices.Equal(dryDeleted, wantList) {
		t.Errorf("dry run would delete %d objects:\n%v\nwant %d:\n%v", len(dryDeleted), dryDeleted, len(wantList), wantList)
	}
	if e, bl := objectKeys(t, viewer); len(e) != len(entriesBefore) || len(bl) != len(blobsBefore) {
		t.Fatalf("the dry run deleted objects")
	}
	inv, err := List(ctxT(t), st, opts)
	if err != nil {
		t.Fatal(err)
	}
	if inv.LiveStoredBytes != dry.LiveBytes {
		t.Errorf("inventory's live stored bytes %d, dry run's %d", inv.LiveStoredBytes, dry.LiveBytes)
	}
	if n := len(inv.Snapshots); n != len(all) {
		t.Errorf("inventory lists %d snapshots, want %d", n, len(all))
	}

	rep, deleted := collect(t, st, opts)
	t.Logf("deleted %d entries and %d blobs (%d bytes) of %d blobs; kept %d live blobs", rep.Entries.Deleted, rep.Blobs.Deleted, rep.Blobs.DeletedBytes, rep.Blobs.Examined, rep.LiveBlobs)
	if !slices.Equal(deleted, dryDeleted) {
		t.Errorf("the real run deleted %v, the dry run listed %v", deleted, dryDeleted)
	}
	if rep.Blobs.DeletedBytes != dry.Blobs.DeletedBytes || rep.ExpiredSnapshots != 5 || rep.LiveSnapshots != 3 {
		t.Errorf("report %+v, dry run %+v", rep, dry)
	}
	if rep.Blobs.Examined != rep.Blobs.Kept+rep.Blobs.Deleted || rep.Blobs.ExaminedBytes != rep.Blobs.KeptBytes+rep.Blobs.DeletedBytes {
		t.Errorf("blob counts do not add up: %+v", rep.Blobs)
	}
	entriesAfter, blobsAfter := objectKeys(t, viewer)
	for k := range entriesBefore {
		if entriesAfter[k] == want[k] {
			t.Errorf("entry %s: present after gc %v, deleted wanted %v", k, entriesAfter[k], want[k])
		}
	}
	for k := range blobsBefore {
		if blobsAfter[k] == want[k] {
			t.Errorf("blob %s: present after gc %v, deleted wanted %v", k, blobsAfter[k], want[k])
		}
	}
	for _, sv := range live {
		checkRestores(t, viewer, sv)
	}
	for _, sv := range expired {
		if _, err := h.loader.GetSnapshotByID(ctxT(t), "ci", sv.id, snapshot.GetOptions{ReadPolicy: snapshot.Newest}); !cache.IsNotFound(err) {
			t.Errorf("expired snapshot %s: %v, want NotFound", sv.id, err)
		}
	}
	versionAfter, err := h.loader.CurrentVersion(ctxT(t), &snapshotpb.SnapshotKey{InstanceName: "ci", PlatformHash: "p1", ConfigurationHash: "A"})
	if err != nil || versionAfter != versionBefore {
		t.Errorf("version id %q before gc, %q after (%v)", versionBefore, versionAfter, err)
	}
	again, deletedAgain := collect(t, st, opts)
	if len(deletedAgain) != 0 || again.LiveBytes != rep.LiveBytes {
		t.Errorf("a second run deleted %v (live bytes %d, first run %d)", deletedAgain, again.LiveBytes, rep.LiveBytes)
	}
}

// hookTier runs a function before the first action-cache update: the
// moment between a save's FindMissing calls and its manifest write.
type hookTier struct {
	cache.Tier
	once sync.Once
	hook func()
}

func (h *hookTier) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	if _, err := snapshot.DecodeManifestEntry(ar); err == nil {
		h.once.Do(h.hook)
	}
	return h.Tier.UpdateActionResult(ctx, ns, key, ar)
}

// A collection that runs after a save found its clean chunks present and
// before it wrote its manifest keeps every blob the manifest names.
func TestCollectDuringSave(t *testing.T) {
	for _, tc := range []struct {
		name         string
		refreshAfter time.Duration
		wantMissing  bool
	}{
		{"present blobs refreshed", 0, false},
		// Without refreshing, the collection deletes the chunks the save
		// found present (the hook really runs in the window); the save
		// uploads them again once its manifest is written.
		{"no refresh: repaired by the save", 1000 * time.Hour, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBucket(t)
			base := time.Now().Truncate(time.Second)
			old := base.Add(-10 * 24 * time.Hour)
			rng := rand.New(rand.NewPCG(3, 4))
			mem := image(rng)
			first := newHost(t, b.tier(t, old, nil), old).save(t, task("C", "main"), mem, []byte("state 1"))
			// The first snapshot expires: its entries go (as an earlier
			// collection would delete them); its blobs stay, old and
			// unreferenced.
			viewer := b.tier(t, base, nil)
			entries, _ := objectKeys(t, viewer)
			var drop []string
			for k := range entries {
				ar, _, err := viewer.ReadEntryObject(ctxT(t), k)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := snapshot.DecodeManifestEntry(ar); err == nil {
					drop = append(drop, k)
				}
			}
			if _, err := viewer.DeleteObjects(ctxT(t), drop); err != nil {
				t.Fatal(err)
			}
			var rep *Report
			tier := &hookTier{Tier: b.tier(t, base, func(o *s3cache.Options) { o.RefreshAfter = tc.refreshAfter }), hook: func() {
				var err error
				rep, err = Run(context.Background(), S3(viewer), Options{Grace: time.Hour, Now: func() time.Time { return base }})
				if err != nil {
					t.Errorf("gc during the save: %v", err)
				}
			}}
			second := newHost(t, tier, base).save(t, task("D", "main"), evolve(mem, 2, rng), []byte("state 2"))
			if rep == nil || rep.Blobs.Deleted == 0 {
				t.Fatalf("the collection in the save's window deleted nothing: %+v", rep)
			}
			_, blobs := objectKeys(t, viewer)
			missing := 0
			for _, d := range second.blobs {
				if !blobs[blobKeyOf(d)] {
					missing++
				}
			}
			if (missing > 0) != tc.wantMissing {
				t.Fatalf("%d of the %d blobs the new manifest names are missing; want missing: %v", missing, len(second.blobs), tc.wantMissing)
			}
			if !tc.wantMissing {
				checkRestores(t, viewer, second)
			}
			_ = first
		})
	}
}
