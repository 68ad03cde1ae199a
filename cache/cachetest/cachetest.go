// Package cachetest is a conformance suite for snaploader's cache tiers, in
// the spirit of testing/fstest: a tier's tests call Run with a Harness that
// makes fresh instances of the tier, and Run checks what cache.Cache and
// the optional interfaces the tier implements promise:
//
//   - blobs (empty, small, multi-MiB with zero pages, under every digest
//     function the tier takes) read back as written through Read and, for
//     a cache.Opener, Open and ReadAt, also after the tier is reopened;
//     FindMissing reports them missing before and present after;
//   - an absent blob or action-cache entry is NotFound naming it;
//   - a write whose bytes do not match its digest (other content, short,
//     long, a size that says more) is InvalidArgument naming the digest
//     and stores nothing, leaving nothing behind; a write whose source
//     fails keeps the source's error kind; a malformed digest or an
//     unknown digest function is InvalidArgument;
//   - stored bytes damaged behind the tier's back (a flipped byte,
//     truncated, extended, emptied, replaced) are a DataLoss error naming
//     the digest (cache.IsCorrupt), never served as good, and writing the
//     blob again repairs it;
//   - range reads (cache.RangeReader), compressed reads and writes
//     (cache.CompressedReader, cache.CompressedWriter);
//   - the action cache: round trip (also after the tier is reopened),
//     replace, namespaces (instances, groups, digest functions) that do
//     not see each other's entries, damaged entries that are DataLoss
//     naming the key and repaired by the next update;
//   - concurrent writers of one blob and of different blobs;
//   - I/O failures that are not corruption: with no file descriptors left
//     a read of an intact blob or entry is Unavailable and leaves it
//     intact; on a full disk a write is ResourceExhausted naming the
//     digest, leaves nothing behind, and succeeds once there is room.
//
// A cache.Tier declares every capability the suite checks; since the suite
// also runs against compositions that are only a cache.Cache (the
// read-through layer), it looks for those parts by type assertion, and a
// subtest whose capability or hook the instance lacks is skipped, saying
// why. The
// package also has the helpers the harnesses of tiers on local disks share
// (ExhaustDescriptors, SmallFilesystem, Fill, DamageFile, FilesUnder).
//
// cachetest imports no tier package, so that every tier's tests can use
// it.
package cachetest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// Harness makes instances of one tier for Run.
type Harness struct {
	// New returns a fresh, empty tier, with t.Cleanup releasing it. Run
	// calls it once per subtest.
	New func(t *testing.T) Tier
	// Functions are the digest functions the tier takes; the first is
	// the one most subtests use. Default BLAKE3 and SHA-256.
	Functions []digest.Function
	// GroupFromCredentials says that the tier acts for the group its
	// credentials name and ignores Namespace.Group (a REAPI client), so
	// that groups cannot be told apart through the namespace.
	GroupFromCredentials bool
	// Full returns a fresh tier whose storage has no room left for a blob
	// of size bytes, and free, which makes room for it (by removing what
	// filled the storage). Nil when the harness cannot fill the storage.
	Full func(t *testing.T, size int64) (c cache.Cache, free func())
}

// Tier is one instance of the tier under test, with the hooks the harness
// can offer for it; a nil hook skips the subtests that need it.
type Tier struct {
	// Cache is the tier. Its optional interfaces (cache.Opener,
	// cache.RangeReader, cache.CompressedReader, cache.CompressedWriter)
	// are found by type assertion.
	Cache cache.Cache
	// Reopen returns the tier over the same storage as a new process sees
	// it after a crash: it trusts nothing it has not verified itself.
	Reopen func(t *testing.T) cache.Cache
	// Corrupt replaces the stored bytes of blob d by damage(them) behind
	// the tier's back, as a failing disk, a crash or a stray writer
	// leaves them (a flipped byte, a truncated or extended file, other
	// content). Run reads the blob through a reopened tier when there is
	// Reopen, since a tier may trust what it wrote itself until it
	// restarts. DamageFile does it for a file.
	Corrupt func(t *testing.T, ns cache.Namespace, d *repb.Digest, damage func([]byte) []byte)
	// CorruptActionResult damages the stored action-cache entry under key
	// behind the tier's back.
	CorruptActionResult func(t *testing.T, ns cache.Namespace, key *repb.Digest)
	// Leftovers lists what the tier's storage holds besides complete
	// blobs and entries: temporary files, incomplete uploads. Run calls it
	// after writes that failed, on a tier no write has succeeded on, and
	// wants nothing listed. FilesUnder lists the files of directories.
	Leftovers func(t *testing.T) []string
	// Exhaust makes the tier's next file opens fail for want of file
	// descriptors (EMFILE) until restore is called (see
	// ExhaustDescriptors).
	Exhaust func(t *testing.T) (restore func())
}

// Run runs the suite against the tier h makes. Its subtests run one at a
// time: Exhaust acts on the whole process, so a caller whose harness
// offers it must not run Run in parallel with other tests either.
func Run(t *testing.T, h Harness) {
	if h.New == nil {
		t.Fatal("cachetest: Harness.New is nil")
	}
	if len(h.Functions) == 0 {
		h.Functions = []digest.Function{digest.BLAKE3, digest.SHA256}
	}
	s := &suite{h: h, fn: h.Functions[0]}
	t.Run("RoundTrip", s.roundTrip)
	t.Run("Absent", s.absent)
	t.Run("WriteMismatch", s.writeMismatch)
	t.Run("WriteSourceFails", s.writeSourceFails)
	t.Run("MalformedDigest", s.malformedDigest)
	t.Run("Corruption", s.corruption)
	t.Run("RangeReads", s.rangeReads)
	t.Run("Compressed", s.compressed)
	t.Run("ActionCache", s.actionCache)
	t.Run("ConcurrentWriters", s.concurrentWriters)
	t.Run("DescriptorsExhausted", s.descriptorsExhausted)
	t.Run("DiskFull", s.diskFull)
}

type suite struct {
	h  Harness
	fn digest.Function // the first of h.Functions
}

const mib = 1 << 20

// ns is the namespace most subtests use.
func (s *suite) ns() cache.Namespace {
	return cache.Namespace{Group: "conformance", Instance: "ci/main", Function: s.fn}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// random returns n pseudo-random bytes for seed.
func random(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// vmLike returns n bytes that look like guest memory: 64 KiB blocks, a
// third of them zero, a third a repeated short pattern, a third random,
// so that they compress and have zero runs.
func vmLike(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0x7a11))
	b := make([]byte, n)
	for off := 0; off < n; off += 64 << 10 {
		blk := b[off:min(n, off+64<<10)]
		switch r.IntN(3) {
		case 0:
		case 1:
			pat := random(r.Uint64(), 512)
			for i := range blk {
				blk[i] = pat[i%len(pat)]
			}
		default:
			copy(blk, random(r.Uint64(), len(blk)))
		}
	}
	return b
}

func write(t *testing.T, c cache.Cache, ns cache.Namespace, data []byte) *repb.Digest {
	t.Helper()
	d := digest.Compute(ns.DigestFunction(), data)
	if err := c.Write(ctxT(t), ns, d, bytes.NewReader(data)); err != nil {
		t.Fatalf("Write %s: %v", digest.String(d), err)
	}
	return d
}

// missing reports whether FindMissing says d is missing.
func missing(t *testing.T, c cache.Cache, ns cache.Namespace, d *repb.Digest) bool {
	t.Helper()
	m, err := c.FindMissing(ctxT(t), ns, []*repb.Digest{d})
	if err != nil {
		t.Fatalf("FindMissing %s: %v", digest.String(d), err)
	}
	for _, x := range m {
		if !digest.Equal(x, d) {
			t.Fatalf("FindMissing of %s reports %s missing", digest.String(d), digest.String(x))
		}
	}
	return len(m) > 0
}

// readAll reads d through Read, to the end of the stream.
func readAll(ctx context.Context, c cache.Cache, ns cache.Namespace, d *repb.Digest) ([]byte, error) {
	rc, err := c.Read(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

// openAll reads d through Open and one ReadAt of the whole blob.
func openAll(ctx context.Context, o cache.Opener, ns cache.Namespace, d *repb.Digest) ([]byte, error) {
	b, err := o.Open(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	buf := make([]byte, b.Size())
	n, err := b.ReadAt(buf, 0)
	if n == len(buf) && errors.Is(err, io.EOF) {
		err = nil
	}
	return buf[:n], err
}

// mustRead fails t unless d reads back as want through Read and, for an
// Opener, Open.
func mustRead(t *testing.T, c cache.Cache, ns cache.Namespace, d *repb.Digest, want []byte) {
	t.Helper()
	got, err := readAll(ctxT(t), c, ns, d)
	if err != nil {
		t.Fatalf("Read %s: %v", digest.String(d), err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("Read %s: %d bytes that differ from the %d written", digest.String(d), len(got), len(want))
	}
	if o, ok := c.(cache.Opener); ok {
		got, err := openAll(ctxT(t), o, ns, d)
		if err != nil {
			t.Fatalf("Open %s: %v", digest.String(d), err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("Open %s: %d bytes that differ from the %d written", digest.String(d), len(got), len(want))
		}
	}
}

// wantKind fails t unless err is of kind k and names what (a hash).
func wantKind(t *testing.T, err error, k errkind.Kind, what, name string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: no error, want %v", what, k)
	}
	if got := errkind.Of(err); got != k {
		t.Fatalf("%s: %v error (%v), want %v", what, got, err, k)
	}
	if name != "" && !strings.Contains(err.Error(), name) {
		t.Errorf("%s: error %q does not name %s", what, err, name)
	}
}
