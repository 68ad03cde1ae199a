package regional_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cache/regional"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/cachecount"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

const mib = 1 << 20

var ns = cache.Namespace{Instance: "fleet", Function: digest.BLAKE3}

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func newLocal(t testing.TB, maxBytes int64) *localcache.Cache {
	t.Helper()
	c, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: maxBytes})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// gated is an upstream whose reads pass the first open bytes of a blob,
// then wait for release.
type gated struct {
	cache.Tier
	open    int64
	release chan struct{}
}

func (g *gated) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	rc, err := g.Tier.Read(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	return &gatedReader{rc: rc, g: g, ctx: ctx}, nil
}

type gatedReader struct {
	rc  io.ReadCloser
	g   *gated
	ctx context.Context
	n   int64
}

func (r *gatedReader) Read(p []byte) (int, error) {
	if r.n >= r.g.open {
		select {
		case <-r.g.release:
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	} else {
		p = p[:min(int64(len(p)), r.g.open-r.n)]
	}
	n, err := r.rc.Read(p)
	r.n += int64(n)
	return n, err
}

func (r *gatedReader) Close() error { return r.rc.Close() }

// liar is an upstream whose reads return other bytes than the blob's.
type liar struct {
	cache.Tier
	data []byte
}

func (l *liar) Read(context.Context, cache.Namespace, *repb.Digest) (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(l.data)), nil
}

func put(t testing.TB, c cache.Cache, data []byte) *repb.Digest {
	t.Helper()
	d := digest.Compute(ns.Function, data)
	if err := c.Write(context.Background(), ns, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	return d
}

// Concurrent readers of a cold blob share one upstream read; each gets
// bytes while the fetch is still running, all get the blob, and the blob
// is on the disk afterwards.
func TestConcurrentColdReadersOneFetch(t *testing.T) {
	ctx := ctxT(t)
	store := newLocal(t, 1<<30)
	data := randBytes(1, 6*mib)
	d := put(t, store, data)
	count := cachecount.NewCounting(store)
	g := &gated{Tier: count, open: 2 * mib, release: make(chan struct{})}
	local := newLocal(t, 1<<30)
	r := regional.New(local, g, regional.Options{})
	t.Cleanup(func() { r.Close() })

	const readers = 8
	var wg sync.WaitGroup
	early := make(chan int, readers)
	got := make([][]byte, readers)
	errs := make([]error, readers)
	for i := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rc, err := r.Read(ctx, ns, d)
			if err != nil {
				errs[i] = err
				early <- 0
				return
			}
			defer rc.Close()
			buf := make([]byte, 256<<10)
			n, err := io.ReadFull(rc, buf)
			early <- n
			if err != nil {
				errs[i] = err
				return
			}
			rest, err := io.ReadAll(rc)
			got[i], errs[i] = append(buf, rest...), err
		}()
	}
	// Every reader has bytes while the upstream read is held mid-blob.
	for range readers {
		select {
		case n := <-early:
			if n != 256<<10 {
				t.Fatalf("a reader got %d bytes before the fetch completed, want 256 KiB", n)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("readers got no bytes while the fetch was in flight")
		}
	}
	close(g.release)
	wg.Wait()
	for i := range readers {
		if errs[i] != nil {
			t.Fatalf("reader %d: %v", i, errs[i])
		}
		if !bytes.Equal(got[i], data) {
			t.Fatalf("reader %d got %d bytes that differ from the blob", i, len(got[i]))
		}
	}
	if s := count.Stats(); s.Reads != 1 || s.ReadBytes != int64(len(data)) {
		t.Fatalf("upstream saw %d reads of %d bytes, want one read of %d", s.Reads, s.ReadBytes, len(data))
	}
	if st := r.Stats(); st.Fills != 1 || st.Joins != readers-1 {
		t.Fatalf("stats %+v: want 1 fill and %d joins", st, readers-1)
	}
	// Kept on the disk: the next read does not reach the upstream.
	b, err := cache.ReadAll(ctx, r, ns, d)
	if err != nil || !bytes.Equal(b, data) {
		t.Fatalf("warm read: %v", err)
	}
	if s := count.Stats(); s.Reads != 1 {
		t.Fatalf("warm read reached the upstream (%d reads)", s.Reads)
	}
	if missing, _ := local.FindMissing(ctx, ns, []*repb.Digest{d}); len(missing) != 0 {
		t.Fatal("the fetched blob is not on the disk")
	}
}

// Bytes that do not match the digest never end a read cleanly: every
// reader of the fetch gets DataLoss, the held-back final bytes are never
// delivered, and nothing is kept.
func TestCorruptUpstreamIsDataLossForEveryReader(t *testing.T) {
	ctx := ctxT(t)
	data := randBytes(2, 3*mib)
	d := digest.Compute(ns.Function, data)
	bad := bytes.Clone(data)
	bad[len(bad)-1] ^= 1
	local := newLocal(t, 1<<30)
	r := regional.New(local, &liar{Tier: newLocal(t, 1<<30), data: bad}, regional.Options{})
	t.Cleanup(func() { r.Close() })
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rc, err := r.Read(ctx, ns, d)
			if err == nil {
				var b []byte
				b, err = io.ReadAll(rc)
				rc.Close()
				if len(b) > len(data)-regional.Holdback {
					t.Errorf("a reader got %d bytes of a corrupt blob, more than all but the held-back %d", len(b), regional.Holdback)
				}
			}
			if !errkind.Is(err, errkind.DataLoss) {
				t.Errorf("read of a corrupt fetch: %v, want DataLoss", err)
			}
		}()
	}
	wg.Wait()
	if missing, _ := local.FindMissing(ctx, ns, []*repb.Digest{d}); len(missing) != 1 {
		t.Fatal("a corrupt fetch was kept on the disk")
	}
	// A range read of it is DataLoss too, not a clean end.
	rc, err := r.ReadRange(ctx, ns, d, mib, 64<<10)
	if err == nil {
		_, err = io.ReadAll(rc)
		rc.Close()
	}
	if !errkind.Is(err, errkind.DataLoss) {
		t.Fatalf("range read of a corrupt fetch: %v, want DataLoss", err)
	}
}

// A blob absent upstream is NotFound, when the read opens.
func TestAbsentUpstreamIsNotFound(t *testing.T) {
	r := regional.New(newLocal(t, 1<<30), newLocal(t, 1<<30), regional.Options{})
	t.Cleanup(func() { r.Close() })
	d := digest.Compute(ns.Function, []byte("absent"))
	if _, err := r.Read(ctxT(t), ns, d); !cache.IsNotFound(err) {
		t.Fatalf("read of an absent blob: %v, want NotFound", err)
	}
}

// FindMissing believes the upstream only: a blob the disk holds but the
// upstream lost is missing; positive answers are remembered for
// PresentTTL.
func TestFindMissingAsksUpstream(t *testing.T) {
	ctx := ctxT(t)
	store := newLocal(t, 1<<30)
	count := cachecount.NewCounting(store)
	local := newLocal(t, 1<<30)
	now := time.Unix(1000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	r := regional.New(local, count, regional.Options{PresentTTL: 10 * time.Second, Now: clock})
	t.Cleanup(func() { r.Close() })

	both := put(t, r, randBytes(3, 100<<10)) // written through: upstream and disk
	onlyLocal := put(t, local, randBytes(4, 100<<10))
	upOnly := put(t, store, randBytes(5, 100<<10))
	missing, err := r.FindMissing(ctx, ns, []*repb.Digest{both, onlyLocal, upOnly})
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) != 1 || !digest.Equal(missing[0], onlyLocal) {
		t.Fatalf("missing %v, want only the blob the upstream lacks (%s)", missing, digest.String(onlyLocal))
	}
	// The written blob was remembered; upOnly was just confirmed.
	if s := count.Stats(); s.FindMissingDigests != 2 {
		t.Fatalf("upstream asked about %d digests, want 2 (the written blob is remembered)", s.FindMissingDigests)
	}
	if _, err := r.FindMissing(ctx, ns, []*repb.Digest{both, upOnly}); err != nil {
		t.Fatal(err)
	}
	if s := count.Stats(); s.FindMissingDigests != 2 {
		t.Fatalf("remembered answers were asked again (%d digests)", s.FindMissingDigests)
	}
	// Past the TTL the upstream is asked again, and a blob it lost since
	// is missing.
	if err := store.Discard(ctx, ns, upOnly); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	now = now.Add(11 * time.Second)
	mu.Unlock()
	missing, err = r.FindMissing(ctx, ns, []*repb.Digest{both, upOnly})
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) != 1 || !digest.Equal(missing[0], upOnly) {
		t.Fatalf("missing %v after the upstream lost %s", missing, digest.String(upOnly))
	}
}

func versionEntry(t testing.TB, id string) *repb.ActionResult {
	a, err := anypb.New(&snapshotpb.SnapshotVersionMetadata{VersionId: id})
	if err != nil {
		t.Fatal(err)
	}
	return &repb.ActionResult{ExecutionMetadata: &repb.ExecutedActionMetadata{AuxiliaryMetadata: []*anypb.Any{a}}}
}

func manifestEntry(t testing.TB, snapshotID string) *repb.ActionResult {
	a, err := anypb.New(&snapshotpb.VMMetadata{SnapshotId: snapshotID})
	if err != nil {
		t.Fatal(err)
	}
	return &repb.ActionResult{ExecutionMetadata: &repb.ExecutedActionMetadata{AuxiliaryMetadata: []*anypb.Any{a}}}
}

// Version entries are read through every time; manifests are answered
// from memory for ManifestTTL, and a write through the tier is seen at
// once.
func TestActionCacheReadThrough(t *testing.T) {
	ctx := ctxT(t)
	store := newLocal(t, 1<<30)
	count := cachecount.NewCounting(store)
	now := time.Unix(1000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	r := regional.New(newLocal(t, 1<<30), count, regional.Options{ManifestTTL: 5 * time.Second, Now: clock})
	t.Cleanup(func() { r.Close() })
	vkey := &repb.Digest{Hash: digest.StringListHash("v"), SizeBytes: 1}
	mkey := &repb.Digest{Hash: digest.StringListHash("m"), SizeBytes: 1}
	if err := store.UpdateActionResult(ctx, ns, vkey, versionEntry(t, "v1")); err != nil {
		t.Fatal(err)
	}
	if err := store.UpdateActionResult(ctx, ns, mkey, manifestEntry(t, "s1")); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := r.GetActionResult(ctx, ns, vkey); err != nil {
			t.Fatal(err)
		}
		if _, err := r.GetActionResult(ctx, ns, mkey); err != nil {
			t.Fatal(err)
		}
	}
	if s := count.Stats(); s.ACGets != 4 {
		t.Fatalf("upstream got %d entry reads, want 4: three of the version entry, one of the manifest", s.ACGets)
	}
	// An invalidation upstream is seen by the next read of the version.
	if err := store.UpdateActionResult(ctx, ns, vkey, versionEntry(t, "v2")); err != nil {
		t.Fatal(err)
	}
	ar, err := r.GetActionResult(ctx, ns, vkey)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(ar.GetExecutionMetadata().GetAuxiliaryMetadata()[0].GetValue(), []byte("v2")) {
		t.Fatal("a version entry was answered from memory")
	}
	// A save through the tier replaces the kept manifest at once.
	if err := r.UpdateActionResult(ctx, ns, mkey, manifestEntry(t, "s2")); err != nil {
		t.Fatal(err)
	}
	ar, err = r.GetActionResult(ctx, ns, mkey)
	if err != nil || !bytes.Contains(ar.GetExecutionMetadata().GetAuxiliaryMetadata()[0].GetValue(), []byte("s2")) {
		t.Fatalf("manifest after a write through the tier: %v %v", ar, err)
	}
	// One written elsewhere is seen once the TTL has passed.
	if err := store.UpdateActionResult(ctx, ns, mkey, manifestEntry(t, "s3")); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	now = now.Add(6 * time.Second)
	mu.Unlock()
	ar, err = r.GetActionResult(ctx, ns, mkey)
	if err != nil || !bytes.Contains(ar.GetExecutionMetadata().GetAuxiliaryMetadata()[0].GetValue(), []byte("s3")) {
		t.Fatalf("manifest after its TTL: %v %v", ar, err)
	}
	if !regional.IsManifest(manifestEntry(t, "x")) || regional.IsManifest(versionEntry(t, "x")) || regional.IsManifest(&repb.ActionResult{}) {
		t.Fatal("IsManifest misclassifies entries")
	}
}

// Writes reach the upstream before the disk keeps a copy; a write the
// upstream refuses keeps nothing.
func TestWriteGoesUpstreamFirst(t *testing.T) {
	ctx := ctxT(t)
	store := newLocal(t, 1<<30)
	local := newLocal(t, 1<<30)
	r := regional.New(local, store, regional.Options{})
	t.Cleanup(func() { r.Close() })
	data := randBytes(6, 2*mib)
	d := put(t, r, data)
	for name, c := range map[string]cache.Cache{"upstream": store, "disk": local} {
		if missing, _ := c.FindMissing(ctx, ns, []*repb.Digest{d}); len(missing) != 0 {
			t.Fatalf("the written blob is not on the %s", name)
		}
	}
	// Wrong content is refused before anything is stored.
	other := randBytes(7, mib)
	od := digest.Compute(ns.Function, other)
	err := r.Write(ctx, ns, od, bytes.NewReader(data[:mib]))
	if !errkind.Is(err, errkind.InvalidArgument) {
		t.Fatalf("write of wrong content: %v, want InvalidArgument", err)
	}
	// An upstream that fails the write: nothing kept on the disk.
	down := regional.New(local, cache.Unreachable("bucket", errors.New("connection refused")), regional.Options{})
	t.Cleanup(func() { down.Close() })
	if err := down.Write(ctx, ns, od, bytes.NewReader(other)); !cache.IsOutage(err) {
		t.Fatalf("write with the upstream down: %v, want Unavailable", err)
	}
	if missing, _ := local.FindMissing(ctx, ns, []*repb.Digest{od}); len(missing) != 1 {
		t.Fatal("a blob the upstream refused was kept on the disk")
	}
}
