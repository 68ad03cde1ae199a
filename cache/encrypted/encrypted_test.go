package encrypted

import (
	"bytes"
	"context"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

const marker = "PLAINTEXT-MARKER-7f3a"

var ns = cache.Namespace{Instance: "ci", Function: digest.BLAKE3}

func ring(t testing.TB, n int) *Keyring {
	t.Helper()
	var keys []Key
	for i := range n {
		k, err := NewKey(time.Unix(int64(1000+i), 0))
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	r, err := NewKeyring(keys...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func newInner(t testing.TB) *localcache.Cache {
	t.Helper()
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	return lc
}

func wrap(t testing.TB, inner cache.Tier, r *Keyring) *Cache {
	t.Helper()
	c, err := New(inner, Options{Keys: r, TempDir: t.TempDir(), MemoryLimit: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// blobWith makes n bytes of pseudo-random data containing the marker.
func blobWith(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	if n > len(marker) {
		copy(b[n/2:], marker)
	}
	return b
}

func put(t testing.TB, c cache.Tier, b []byte) *repb.Digest {
	t.Helper()
	d := digest.Compute(ns.Function, b)
	if err := c.Write(context.Background(), ns, d, bytes.NewReader(b)); err != nil {
		t.Fatalf("writing %s: %v", digest.String(d), err)
	}
	return d
}

// snapshotLike stores an artifact file, two chunks and a tree listing them,
// and a manifest-like entry naming the artifact and the tree.
func snapshotLike(t testing.TB, c cache.Tier, seed uint64, name string) (*repb.Digest, *repb.ActionResult, map[*repb.Digest][]byte) {
	t.Helper()
	blobs := map[*repb.Digest][]byte{}
	art := blobWith(seed, 1000)
	c1, c2 := blobWith(seed+1, 300<<10), blobWith(seed+2, segmentSize)
	da, d1, d2 := put(t, c, art), put(t, c, c1), put(t, c, c2)
	tree := &repb.Tree{Root: &repb.Directory{Files: []*repb.FileNode{{Name: "0", Digest: d1}, {Name: "4096000", Digest: d2}}}}
	tb, _ := proto.Marshal(tree)
	dt := put(t, c, tb)
	for d, b := range map[*repb.Digest][]byte{da: art, d1: c1, d2: c2, dt: tb} {
		blobs[d] = b
	}
	md, _ := anypb.New(&snapshotpb.VMMetadata{SnapshotId: "snap-" + marker})
	ar := &repb.ActionResult{
		OutputFiles:       []*repb.OutputFile{{Path: "vmstate-" + marker, Digest: da}},
		OutputDirectories: []*repb.OutputDirectory{{Path: "memory-" + marker, TreeDigest: dt}},
		ExecutionMetadata: &repb.ExecutedActionMetadata{AuxiliaryMetadata: []*anypb.Any{md}},
	}
	key := &repb.Digest{Hash: digest.StringListHash("manifest", name), SizeBytes: 1}
	if err := c.UpdateActionResult(context.Background(), ns, key, ar); err != nil {
		t.Fatal(err)
	}
	return key, ar, blobs
}

// scan returns every regular file under dir that contains s.
func scan(t testing.TB, dir, s string) []string {
	t.Helper()
	var hits []string
	filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil || !de.Type().IsRegular() {
			return nil
		}
		b, _ := os.ReadFile(p)
		if bytes.Contains(b, []byte(s)) {
			hits = append(hits, p)
		}
		return nil
	})
	return hits
}

func TestRoundTripThroughAFreshProcess(t *testing.T) {
	ctx := context.Background()
	inner := newInner(t)
	r := ring(t, 1)
	key, want, blobs := snapshotLike(t, wrap(t, inner, r), 1, "m1")
	if hits := scan(t, inner.Dir(), marker); len(hits) > 0 {
		t.Fatalf("plaintext marker found in stored files %v", hits)
	}
	// A new process knows nothing but the key file.
	c := wrap(t, inner, r)
	got, err := c.GetActionResult(ctx, ns, key)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, want) {
		t.Fatalf("entry read back as %v, want %v", got, want)
	}
	for d, b := range blobs {
		rb, err := cache.ReadAll(ctx, cache.Verifying(c), ns, d)
		if err != nil || !bytes.Equal(rb, b) {
			t.Fatalf("blob %s: %v", digest.String(d), err)
		}
	}
	missing, err := c.FindMissing(ctx, ns, []*repb.Digest{want.OutputFiles[0].Digest})
	if err != nil || len(missing) != 0 {
		t.Fatalf("FindMissing of a stored blob: %v, %v", missing, err)
	}
	// The stored entry names the ciphertexts of the artifact and the tree
	// as output files, so caches checking completeness check them.
	stored, err := inner.GetActionResult(ctx, ns, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(stored.OutputFiles) != 2 || len(stored.OutputDirectories) != 0 {
		t.Fatalf("stored entry lists %d files and %d directories", len(stored.OutputFiles), len(stored.OutputDirectories))
	}
}

func TestDeduplicationWithinAGroupOnly(t *testing.T) {
	inner := newInner(t)
	r := ring(t, 1)
	b := blobWith(7, 1<<20)
	put(t, wrap(t, inner, r), b)
	before := inner.Usage()
	put(t, wrap(t, inner, r), b) // the same group, another process
	if inner.Usage() != before {
		t.Errorf("the same blob saved twice by one group grew the tier from %d to %d bytes", before, inner.Usage())
	}
	put(t, wrap(t, inner, ring(t, 1)), b) // another group
	if inner.Usage() < before*2-4096 {
		t.Errorf("another group's copy shares storage: %d bytes after, %d before", inner.Usage(), before)
	}
}

// redirect serves the content of one blob for another: a lying tier.
type redirect struct {
	cache.Tier
	from, to *repb.Digest
}

func (r *redirect) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	if digest.Equal(d, r.from) {
		d = r.to
	}
	return r.Tier.Read(ctx, ns, d)
}

func TestTamperingIsDetected(t *testing.T) {
	ctx := context.Background()
	r := ring(t, 1)
	for _, tc := range []struct {
		name string
		mod  func(t *testing.T, sealed []byte) []byte
	}{
		{"flipped byte in the header", func(t *testing.T, b []byte) []byte { b[2] ^= 1; return b }},
		{"flipped byte in the data", func(t *testing.T, b []byte) []byte { b[len(b)/2] ^= 0x40; return b }},
		{"flipped byte in the last tag", func(t *testing.T, b []byte) []byte { b[len(b)-1] ^= 1; return b }},
		{"truncated at a segment boundary", func(t *testing.T, b []byte) []byte {
			return b[:len(blobMagic)+1+len(r.Current().ID)+segmentSize+tagSize]
		}},
		{"truncated in a segment", func(t *testing.T, b []byte) []byte { return b[:len(b)-100] }},
		{"extended", func(t *testing.T, b []byte) []byte { return append(b, make([]byte, tagSize)...) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inner := newInner(t)
			w := wrap(t, inner, r)
			key, ar, _ := snapshotLike(t, w, 2, "m2")
			// The chunk of 300 KiB: find its ciphertext.
			c := wrap(t, inner, r)
			if _, err := c.GetActionResult(ctx, ns, key); err != nil {
				t.Fatal(err)
			}
			tb, _ := cache.ReadAll(ctx, c, ns, ar.OutputDirectories[0].TreeDigest)
			tree := &repb.Tree{}
			proto.Unmarshal(tb, tree)
			plain := tree.Root.Files[0].Digest
			sealed := c.lookupAny(ns.Function, plain)
			raw, err := cache.ReadAll(ctx, inner, ns, sealed)
			if err != nil {
				t.Fatal(err)
			}
			bad := tc.mod(t, append([]byte(nil), raw...))
			// Store the altered ciphertext at its own address and point the
			// lying tier's answer for the real one at it.
			bd := digest.Compute(ns.Function, bad)
			if err := inner.Write(ctx, ns, bd, bytes.NewReader(bad)); err != nil {
				t.Fatal(err)
			}
			liar := wrap(t, &redirect{Tier: inner, from: sealed, to: bd}, r)
			if _, err := liar.GetActionResult(ctx, ns, key); err != nil {
				t.Fatal(err)
			}
			got, err := cache.ReadAll(ctx, cache.Verifying(liar), ns, plain)
			if err == nil {
				t.Fatalf("an altered ciphertext opened (%d bytes)", len(got))
			}
			if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), plain.GetHash()) {
				t.Fatalf("got %v, want Internal naming %s", err, plain.GetHash())
			}
		})
	}
}

func TestSwappedCiphertextAndEntryDoNotOpen(t *testing.T) {
	ctx := context.Background()
	r := ring(t, 1)
	inner := newInner(t)
	key, ar, _ := snapshotLike(t, wrap(t, inner, r), 3, "m3")
	c := wrap(t, inner, r)
	if _, err := c.GetActionResult(ctx, ns, key); err != nil {
		t.Fatal(err)
	}
	art := ar.OutputFiles[0].Digest
	tree := ar.OutputDirectories[0].TreeDigest
	// The tier answers the artifact's ciphertext with the tree's: both
	// are valid ciphertexts of this group.
	liar := wrap(t, &redirect{Tier: inner, from: c.lookupAny(ns.Function, art), to: c.lookupAny(ns.Function, tree)}, r)
	liar.GetActionResult(ctx, ns, key)
	if _, err := cache.ReadAll(ctx, liar, ns, art); status.Code(err) != codes.DataLoss {
		t.Errorf("a swapped ciphertext: %v, want Internal", err)
	}
	// An entry moved to another key does not open.
	stored, _ := inner.GetActionResult(ctx, ns, key)
	other := &repb.Digest{Hash: digest.StringListHash("elsewhere"), SizeBytes: 1}
	inner.UpdateActionResult(ctx, ns, other, stored)
	if _, err := c.GetActionResult(ctx, ns, other); status.Code(err) != codes.DataLoss {
		t.Errorf("a moved entry: %v, want Internal", err)
	}
}

func TestKeyRotation(t *testing.T) {
	ctx := context.Background()
	inner := newInner(t)
	k1 := ring(t, 1)
	oldKey, _, oldBlobs := snapshotLike(t, wrap(t, inner, k1), 4, "m4")
	k2key, _ := NewKey(time.Now())
	both, _ := NewKeyring(append(k1.Keys(), k2key)...)
	// Old snapshots open with both keys; new saves use key 2.
	c := wrap(t, inner, both)
	if _, err := c.GetActionResult(ctx, ns, oldKey); err != nil {
		t.Fatalf("old entry after adding key 2: %v", err)
	}
	for d := range oldBlobs {
		if _, err := cache.ReadAll(ctx, c, ns, d); err != nil {
			t.Fatalf("old blob after adding key 2: %v", err)
		}
	}
	newKey, _, newBlobs := snapshotLike(t, c, 4, "resaved") // the same data, resaved
	se, _ := inner.GetActionResult(ctx, ns, newKey)
	if e, ok := SealedEntryOf(se); !ok || e.KeyId != k2key.ID {
		t.Fatalf("a new save is sealed under %v, want key 2 %s", e.GetKeyId(), k2key.ID)
	}
	// Removing key 1 breaks only the old snapshot, naming key 1.
	only2, _ := NewKeyring(k2key)
	c2 := wrap(t, inner, only2)
	if _, err := c2.GetActionResult(ctx, ns, newKey); err != nil {
		t.Fatalf("new entry with key 2 only: %v", err)
	}
	for d := range newBlobs {
		if _, err := cache.ReadAll(ctx, c2, ns, d); err != nil {
			t.Fatalf("new blob with key 2 only: %v", err)
		}
	}
	_, err := wrap(t, inner, only2).GetActionResult(ctx, ns, oldKey)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), k1.Current().ID) {
		t.Errorf("old entry with key 1 removed: %v, want FailedPrecondition naming %s", err, k1.Current().ID)
	}
	// Old blobs name key 1 too.
	c3 := wrap(t, inner, both)
	c3.GetActionResult(ctx, ns, oldKey)
	for d := range oldBlobs {
		s := c3.lookup(k1.Current().ID, ns.Function, d)
		raw, _ := cache.ReadAll(ctx, inner, ns, s)
		if _, err := openReader(bytes.NewReader(raw), only2, ns.Function, d); err == nil || !strings.Contains(err.Error(), k1.Current().ID) {
			t.Errorf("an old blob with key 1 removed: %v, want an error naming %s", err, k1.Current().ID)
		}
	}
}

func TestClearEntriesPassThrough(t *testing.T) {
	ctx := context.Background()
	inner := newInner(t)
	b := []byte("saved without encryption")
	d := put(t, inner, b)
	key := &repb.Digest{Hash: digest.StringListHash("clear"), SizeBytes: 1}
	ar := &repb.ActionResult{OutputFiles: []*repb.OutputFile{{Path: "f", Digest: d}}}
	inner.UpdateActionResult(ctx, ns, key, ar)
	c := wrap(t, inner, ring(t, 1))
	got, err := c.GetActionResult(ctx, ns, key)
	if err != nil || !proto.Equal(got, ar) {
		t.Fatalf("clear entry: %v, %v", got, err)
	}
	if rb, err := cache.ReadAll(ctx, c, ns, d); err != nil || !bytes.Equal(rb, b) {
		t.Fatalf("clear blob: %v", err)
	}
	// Version entries stay in the clear.
	v, _ := anypb.New(&snapshotpb.SnapshotVersionMetadata{VersionId: "v1"})
	var_ := &repb.ActionResult{ExecutionMetadata: &repb.ExecutedActionMetadata{AuxiliaryMetadata: []*anypb.Any{v}}}
	vk := &repb.Digest{Hash: digest.StringListHash("version"), SizeBytes: 1}
	if err := c.UpdateActionResult(ctx, ns, vk, var_); err != nil {
		t.Fatal(err)
	}
	if st, _ := inner.GetActionResult(ctx, ns, vk); !proto.Equal(st, var_) {
		t.Error("a version entry was sealed")
	}
}

func TestSealedSize(t *testing.T) {
	r := ring(t, 1)
	for _, n := range []int{0, 1, segmentSize - 1, segmentSize, segmentSize + 1, 3 * segmentSize, 4096000} {
		d := digest.Compute(digest.BLAKE3, make([]byte, n))
		var buf bytes.Buffer
		if err := sealBlob(&buf, r.Current(), digest.BLAKE3, d, bytes.NewReader(make([]byte, n))); err != nil {
			t.Fatal(err)
		}
		if got, want := int64(buf.Len()), sealedSize(int64(n), len(r.Current().ID)); got != want {
			t.Errorf("%d bytes: sealed to %d, sealedSize says %d", n, got, want)
		}
		o, err := openReader(&buf, r, digest.BLAKE3, d)
		if err != nil {
			t.Fatal(err)
		}
		if b, err := io.ReadAll(o); err != nil || len(b) != n {
			t.Errorf("%d bytes: opened %d, %v", n, len(b), err)
		}
	}
}

func TestKeyFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keys")
	r := ring(t, 2)
	if err := WriteKeyFile(path, r); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %04o, want 0600", fi.Mode().Perm())
	}
	got, err := ReadKeyFile(path)
	if err != nil || got.Current().ID != r.Current().ID || len(got.Keys()) != 2 || got.Current().Secret != r.Current().Secret {
		t.Fatalf("read back %v, %v", got, err)
	}
	for _, tc := range []struct {
		name string
		mode os.FileMode
		body string
		want string
	}{
		{"group-readable", 0o640, FormatKey(r.Current()), "chmod 600"},
		{"world-readable", 0o604, FormatKey(r.Current()), "chmod 600"},
		{"empty", 0o600, "# nothing\n", "holds no key"},
		{"bad base64", 0o600, "snaploader-key-v1 abc !!! 2026-01-01T00:00:00Z\n", "base64"},
		{"duplicate id", 0o600, FormatKey(r.Current()) + FormatKey(r.Current()), "twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name)
			os.WriteFile(p, []byte(tc.body), tc.mode)
			os.Chmod(p, tc.mode)
			if _, err := ReadKeyFile(p); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
