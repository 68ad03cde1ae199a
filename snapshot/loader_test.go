package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/cachecount"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// testChunk is the chunk size of test files: small so MiB files have many
// chunks.
const testChunk = 64 << 10

// host is one machine's cache and loader.
type host struct {
	dir    string
	local  *localcache.Cache
	loader *Loader
}

func newHost(t *testing.T, remote cache.Tier, opts Options) *host {
	t.Helper()
	dir := t.TempDir()
	lc, err := localcache.New(dir, localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	l, err := New(lc, remote, opts)
	if err != nil {
		t.Fatal(err)
	}
	return &host{dir: dir, local: lc, loader: l}
}

var testTask = Task{InstanceName: "ci", PlatformHash: "plat", ConfigurationHash: "conf"}

func taskOn(branch, base, def string) Task {
	t := testTask
	t.Env = map[string]string{EnvBranch: branch, EnvBaseBranch: base, EnvDefaultBranch: def}
	return t
}

// vmFiles writes a small VM: random data with zero runs and a sparse hole.
func vmFiles(t *testing.T, dir string, seed uint64, size int) (mem string, files map[string]string) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, seed+1))
	b := make([]byte, size)
	for off := 0; off < size; off += testChunk {
		if rng.IntN(4) == 0 {
			continue // zero chunk
		}
		for i := off; i < min(off+testChunk, size); i++ {
			b[i] = byte(rng.Uint32())
		}
	}
	mem = filepath.Join(dir, "memory.img")
	if err := os.WriteFile(mem, b, 0o644); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "vmstate.snap")
	if err := os.WriteFile(state, []byte(fmt.Sprintf("vm state %d", seed)), 0o644); err != nil {
		t.Fatal(err)
	}
	return mem, map[string]string{"vmstate.snap": state}
}

// saveFile splits path into h's local cache and saves it under key.
func (h *host) save(t *testing.T, key *snapshotpb.SnapshotKey, mem string, files map[string]string, remote bool) *SaveResult {
	t.Helper()
	ctx := context.Background()
	s, _, err := cow.FromFile(ctx, "memory.img", mem, h.local, h.local, cow.Options{Namespace: h.loader.Namespace(key), ChunkSize: testChunk, TempDir: h.local.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	res, err := h.loader.CacheSnapshot(ctx, &SaveRequest{Key: key, Files: files, Chunked: []*cow.Store{s}, Local: true, Remote: remote, LocalManifest: true})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func (h *host) keys(t *testing.T, task Task) *snapshotpb.SnapshotKeySet {
	t.Helper()
	ks, err := h.loader.KeySet(context.Background(), task, KeySetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ks
}

// restoreBytes unpacks snap and returns the memory file's and vmstate's bytes.
func (h *host) restoreBytes(t *testing.T, snap *Snapshot) ([]byte, []byte) {
	t.Helper()
	u, err := h.loader.UnpackSnapshot(context.Background(), snap, t.TempDir(), UnpackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	s := u.Stores["memory.img"]
	b := make([]byte, s.Size())
	if _, err := s.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	st, err := os.ReadFile(u.Files["vmstate.snap"])
	if err != nil {
		t.Fatal(err)
	}
	return b, st
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRoundTripLocal(t *testing.T) {
	h := newHost(t, nil, Options{})
	mem, files := vmFiles(t, t.TempDir(), 1, 3<<20+12345)
	ks := h.keys(t, taskOn("main", "", "main"))
	res := h.save(t, ks.GetWriteKey(), mem, files, false)
	if res.Totals().ChunksTotal == 0 || res.Totals().ChunksTotal >= (3<<20)/testChunk+1 {
		t.Errorf("chunks total %d: zero chunks must not be listed", res.Totals().ChunksTotal)
	}
	snap, err := h.loader.GetSnapshot(context.Background(), ks, GetOptions{ReadPolicy: LocalFirst})
	if err != nil {
		t.Fatal(err)
	}
	if snap.Source != SourceLocal || snap.FallbackIndex != 0 {
		t.Errorf("got source %s fallback %d, want local 0", snap.Source, snap.FallbackIndex)
	}
	got, state := h.restoreBytes(t, snap)
	if !bytes.Equal(got, mustRead(t, mem)) {
		t.Error("restored memory differs")
	}
	if !bytes.Equal(state, mustRead(t, files["vmstate.snap"])) {
		t.Error("restored vmstate differs")
	}
	// The exact snapshot is reachable by id too.
	byID, err := h.loader.GetSnapshotByID(context.Background(), "ci", res.SnapshotID, GetOptions{ReadPolicy: LocalOnly})
	if err != nil {
		t.Fatal(err)
	}
	if byID.Manifest.GetVmMetadata().GetSnapshotId() != res.SnapshotID {
		t.Errorf("by id: got snapshot %s", byID.Manifest.GetVmMetadata().GetSnapshotId())
	}
}

func TestReadPolicyRequiredAndNilKey(t *testing.T) {
	h := newHost(t, nil, Options{})
	ks := h.keys(t, taskOn("main", "", ""))
	if _, err := h.loader.GetSnapshot(context.Background(), ks, GetOptions{}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("missing read policy: got %v, want InvalidArgument", err)
	}
	if _, err := h.loader.CacheSnapshot(context.Background(), &SaveRequest{Local: true}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("nil key: got %v, want InvalidArgument", err)
	}
	if _, err := h.loader.CacheSnapshot(context.Background(), &SaveRequest{Key: ks.GetWriteKey()}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("neither tier: got %v, want InvalidArgument", err)
	}
	_, err := h.loader.GetSnapshot(context.Background(), ks, GetOptions{ReadPolicy: LocalFirst})
	if status.Code(err) != codes.NotFound {
		t.Errorf("empty cache: got %v, want NotFound", err)
	}
}

func TestInvalidate(t *testing.T) {
	h := newHost(t, nil, Options{})
	mem, files := vmFiles(t, t.TempDir(), 2, 1<<20)
	ks := h.keys(t, taskOn("feat", "", "main"))
	h.save(t, ks.GetWriteKey(), mem, files, false)
	mainKs := h.keys(t, taskOn("main", "", "main"))
	h.save(t, mainKs.GetWriteKey(), mem, files, false)
	if _, err := h.loader.GetSnapshot(context.Background(), h.keys(t, taskOn("feat", "", "main")), GetOptions{ReadPolicy: LocalFirst}); err != nil {
		t.Fatalf("before invalidation: %v", err)
	}
	v, err := h.loader.Invalidate(context.Background(), ks.GetBranchKey())
	if err != nil {
		t.Fatal(err)
	}
	if v == ks.GetBranchKey().GetVersionId() {
		t.Fatal("invalidate returned the old version")
	}
	after := h.keys(t, taskOn("feat", "", "main"))
	if after.GetBranchKey().GetVersionId() != v {
		t.Errorf("key set version %q, want %q", after.GetBranchKey().GetVersionId(), v)
	}
	// Neither the branch nor its fallback (same version key) is returned.
	if _, err := h.loader.GetSnapshot(context.Background(), after, GetOptions{ReadPolicy: LocalFirst}); status.Code(err) != codes.NotFound {
		t.Errorf("after invalidation: got %v, want NotFound", err)
	}
}

// expiring hides version entries, as a cache that expired them would.
type expiring struct {
	cache.Tier
	hide atomic.Bool
}

func (e *expiring) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	if e.hide.Load() && key.GetHash() == VersionKey(&snapshotpb.SnapshotKey{InstanceName: testTask.InstanceName, PlatformHash: testTask.PlatformHash, ConfigurationHash: testTask.ConfigurationHash}).GetHash() {
		return nil, cache.NotFoundf("version entry expired")
	}
	return e.Tier.GetActionResult(ctx, ns, key)
}

func TestExpiredVersionNeverResurrectsOldSnapshot(t *testing.T) {
	remoteHost := newHost(t, nil, Options{})
	exp := &expiring{Tier: remoteHost.local}
	h := newHost(t, exp, Options{})
	mem, files := vmFiles(t, t.TempDir(), 3, 1<<20)
	ks := h.keys(t, taskOn("main", "", "main"))
	h.save(t, ks.GetWriteKey(), mem, files, true)
	exp.hide.Store(true)
	ks2 := h.keys(t, taskOn("main", "", "main"))
	if ks2.GetBranchKey().GetVersionId() == ks.GetBranchKey().GetVersionId() {
		t.Fatal("an expired version entry must yield a fresh version id")
	}
	if _, err := h.loader.GetSnapshot(context.Background(), ks2, GetOptions{ReadPolicy: LocalFirst}); status.Code(err) != codes.NotFound {
		t.Errorf("got %v, want NotFound: the old snapshot must not come back", err)
	}
}

func TestStaleFallback(t *testing.T) {
	now := time.Now()
	var clock atomic.Int64
	clock.Store(now.Add(-48 * time.Hour).UnixNano())
	h := newHost(t, nil, Options{Now: func() time.Time { return time.Unix(0, clock.Load()) }})
	mem, files := vmFiles(t, t.TempDir(), 4, 1<<20)
	// A snapshot on main, saved 48 h ago; one on feat-old saved 48 h ago.
	h.save(t, h.keys(t, taskOn("main", "", "main")).GetWriteKey(), mem, files, false)
	h.save(t, h.keys(t, taskOn("feat-old", "", "main")).GetWriteKey(), mem, files, false)
	clock.Store(now.UnixNano())
	ctx := context.Background()
	feat := h.keys(t, taskOn("feat", "", "main"))
	if _, err := h.loader.GetSnapshot(ctx, feat, GetOptions{ReadPolicy: LocalFirst}); err == nil || !strings.Contains(err.Error(), "stale") {
		t.Errorf("48 h old fallback with the 24 h default: got %v, want a stale rejection", err)
	}
	if snap, err := h.loader.GetSnapshot(ctx, feat, GetOptions{ReadPolicy: LocalFirst, MaxStaleFallbackAge: 72 * time.Hour}); err != nil || snap.FallbackIndex != 1 {
		t.Errorf("72 h limit: got %v, %v; want the main fallback", snap, err)
	}
	// The branch key itself is never subject to staleness.
	if snap, err := h.loader.GetSnapshot(ctx, h.keys(t, taskOn("feat-old", "", "main")), GetOptions{ReadPolicy: LocalFirst}); err != nil || snap.FallbackIndex != 0 {
		t.Errorf("old branch snapshot: got %v, %v; want it", snap, err)
	}
	// A fresh fallback is accepted.
	h.save(t, h.keys(t, taskOn("main", "", "main")).GetWriteKey(), mem, files, false)
	if snap, err := h.loader.GetSnapshot(ctx, feat, GetOptions{ReadPolicy: LocalFirst}); err != nil || snap.FallbackIndex != 1 || snap.Key.GetRef() != "main" {
		t.Errorf("fresh fallback: got %v, %v", snap, err)
	}
}

// failingManifests fails manifest writes, as a crash before the manifest
// would leave things.
type failingManifests struct{ cache.Tier }

func (f failingManifests) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	if len(ar.GetOutputDirectories()) > 0 {
		return status.Error(codes.Unavailable, "disk gone")
	}
	return f.Tier.UpdateActionResult(ctx, ns, key, ar)
}

func TestCrashBeforeManifestKeepsPreviousSnapshot(t *testing.T) {
	h := newHost(t, nil, Options{})
	dir := t.TempDir()
	mem, files := vmFiles(t, dir, 5, 1<<20)
	ks := h.keys(t, taskOn("main", "", "main"))
	first := h.save(t, ks.GetWriteKey(), mem, files, false)

	// Second save with the manifest write failing after every chunk landed.
	mem2, files2 := vmFiles(t, t.TempDir(), 6, 1<<20)
	broken, err := New(localWith{h.local, failingManifests{h.local}}, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s, _, err := cow.FromFile(context.Background(), "memory.img", mem2, h.local, h.local, cow.Options{Namespace: h.loader.Namespace(ks.GetWriteKey()), ChunkSize: testChunk, TempDir: h.local.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := broken.CacheSnapshot(context.Background(), &SaveRequest{Key: ks.GetWriteKey(), Files: files2, Chunked: []*cow.Store{s}, Local: true, LocalManifest: true}); err == nil {
		t.Fatal("save with a failing manifest write succeeded")
	}
	snap, err := h.loader.GetSnapshot(context.Background(), ks, GetOptions{ReadPolicy: LocalOnly})
	if err != nil {
		t.Fatal(err)
	}
	if snap.Manifest.GetVmMetadata().GetSnapshotId() != first.SnapshotID {
		t.Errorf("got snapshot %s, want the previous %s", snap.Manifest.GetVmMetadata().GetSnapshotId(), first.SnapshotID)
	}
	got, _ := h.restoreBytes(t, snap)
	if !bytes.Equal(got, mustRead(t, mem)) {
		t.Error("previous snapshot no longer restores")
	}
}

// localWith routes a local tier's Cache methods through c (a wrapper of
// the same cache).
type localWith struct {
	cache.Local
	c cache.Tier
}

func (l localWith) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	return l.c.FindMissing(ctx, ns, ds)
}

func (l localWith) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	return l.c.Read(ctx, ns, d)
}

func (l localWith) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	return l.c.Write(ctx, ns, d, r)
}

func (l localWith) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	return l.c.Write(ctx, ns, d, bytes.NewReader(data))
}

func (l localWith) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	return l.c.GetActionResult(ctx, ns, key)
}

func (l localWith) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	return l.c.UpdateActionResult(ctx, ns, key, ar)
}

func TestIncrementalSaveWritesOnlyDirtyChunks(t *testing.T) {
	h := newHost(t, nil, Options{})
	mem, files := vmFiles(t, t.TempDir(), 7, 2<<20)
	ks := h.keys(t, taskOn("main", "", "main"))
	h.save(t, ks.GetWriteKey(), mem, files, false)
	snap, err := h.loader.GetSnapshot(context.Background(), ks, GetOptions{ReadPolicy: LocalFirst})
	if err != nil {
		t.Fatal(err)
	}
	u, err := h.loader.UnpackSnapshot(context.Background(), snap, t.TempDir(), UnpackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	s := u.Stores["memory.img"]
	const k = 3
	for i := 0; i < k; i++ {
		if _, err := s.WriteAt([]byte(fmt.Sprintf("dirty %d", i)), int64(i*5)*testChunk+100); err != nil {
			t.Fatal(err)
		}
	}
	counting := cachecount.NewCounting(h.local)
	counted, err := New(localWith{h.local, counting}, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := counted.CacheSnapshot(context.Background(), &SaveRequest{Key: ks.GetWriteKey(), Files: u.Files, Chunked: []*cow.Store{s}, Local: true, LocalManifest: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := res.Totals().ChunksWritten; got != k {
		t.Errorf("incremental save wrote %d chunk blobs, want %d", got, k)
	}
	if st := counting.Stats(); st.Writes != 2*k+1 || st.ACPuts != 2 {
		t.Errorf("incremental save made %d blob writes and %d manifest writes, want %d (chunks, their outboards, tree) and 2 (key + snapshot id)", st.Writes, st.ACPuts, 2*k+1)
	}
	if got := res.Totals().ChunksDirty; got != k {
		t.Errorf("dirty chunks %d, want %d", got, k)
	}
	snap2, err := h.loader.GetSnapshot(context.Background(), ks, GetOptions{ReadPolicy: LocalFirst})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := h.restoreBytes(t, snap2)
	want := mustRead(t, mem)
	for i := 0; i < k; i++ {
		copy(want[int64(i*5)*testChunk+100:], fmt.Sprintf("dirty %d", i))
	}
	if !bytes.Equal(got, want) {
		t.Error("incremental snapshot content differs")
	}
}

// reopen opens h's cache directory again, as a new process would.
func reopen(t *testing.T, h *host) *host {
	t.Helper()
	return reopenBoot(t, h, "")
}

// reopenBoot is reopen by a process of the boot named boot ("" for this
// one): after a crash, no verification of the last boot is trusted.
func reopenBoot(t *testing.T, h *host, boot string) *host {
	t.Helper()
	lc, err := localcache.New(h.dir, localcache.Options{MaxBytes: 1 << 30, BootID: boot})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	l, err := New(lc, nil, h.loader.opts)
	if err != nil {
		t.Fatal(err)
	}
	return &host{dir: h.dir, local: lc, loader: l}
}

func TestEvictionSparesBlobsOfALoadInProgress(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const bound = 3 << 20
	lc, err := localcache.New(dir, localcache.Options{MaxBytes: bound})
	if err != nil {
		t.Fatal(err)
	}
	defer lc.Close()
	l, err := New(lc, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	h := &host{dir: dir, local: lc, loader: l}
	mem, files := vmFiles(t, t.TempDir(), 41, 1<<20)
	ks := h.keys(t, taskOn("main", "", ""))
	h.save(t, ks.GetBranchKey(), mem, files, false)
	snap, err := l.GetSnapshot(ctx, ks, GetOptions{ReadPolicy: LocalOnly})
	if err != nil {
		t.Fatal(err)
	}
	u, err := l.UnpackSnapshot(ctx, snap, t.TempDir(), UnpackOptions{ReadAhead: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	// Fill the cache with 4x its bound of other blobs.
	ns := l.Namespace(ks.GetBranchKey())
	rng := rand.New(rand.NewPCG(9, 9))
	blob := make([]byte, testChunk)
	for i := 0; i < 4*bound/testChunk; i++ {
		for j := range blob {
			blob[j] = byte(rng.Uint32())
		}
		d := digest.Compute(ns.Function, blob)
		if err := lc.Write(ctx, ns, d, bytes.NewReader(blob)); err != nil {
			t.Fatal(err)
		}
	}
	if usage := lc.Usage(); usage > bound+(2<<20) {
		t.Errorf("usage %d exceeds the bound %d by more than the pinned snapshot", usage, bound)
	}
	got := make([]byte, u.Stores["memory.img"].Size())
	if _, err := u.Stores["memory.img"].ReadAt(got, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("reading the pinned snapshot after eviction pressure: %v", err)
	}
	if !bytes.Equal(got, mustRead(t, mem)) {
		t.Error("pinned snapshot content changed")
	}
}
