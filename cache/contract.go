package cache

import (
	"context"
	"io"
	"os"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// Traits describe a tier: what it promises about the bytes it returns and
// how it stores them. A tier declares them; a wrapper passes them on,
// changing what it changes (Verifying makes reads verified).
type Traits struct {
	// Description names the tier for operators: a directory, a bucket, a
	// server address.
	Description string
	// VerifiesReads: Read returns only content verified against the digest
	// (a mismatch ends the stream with DataLoss), so a caller need not hash
	// it again.
	VerifiesReads bool
	// VerifiesRanges: ReadRange returns only content verified against the
	// digest, so a server may answer a read of part of a blob from that
	// range alone.
	VerifiesRanges bool
	// ServesRanges: ReadRange reads part of a blob; when false it is an
	// error wrapping ErrNoRange and the caller reads the whole blob.
	ServesRanges bool
	// VerifiesCompressedReads: the zstd streams of ReadCompressed are
	// checked as they are read (a stream whose bytes differ ends with
	// DataLoss), so a server may pass them on without decoding them.
	VerifiesCompressedReads bool
	// StoresCompressed: new blobs are stored zstd-compressed when that
	// shrinks them.
	StoresCompressed bool
	// MaxBytes is the bound on what the tier stores on this host's disk;
	// 0 when it keeps nothing on this host.
	MaxBytes int64
	// Dir is the directory holding the tier's files on this host ("" when
	// none): a server hides it from the errors it sends.
	Dir string
}

// Tier is the contract every tier fulfils (the local cache, the S3 tier,
// the REAPI client) and every wrapper over one (Verifying, the breaker,
// Counting, encryption): wrapping never hides a capability, since every
// method is part of the contract and a tier that cannot do something says
// so in its Traits and in the error of the call.
type Tier interface {
	Cache
	RangeReader
	CompressedReader
	CompressedWriter
	// PutHashed stores data that the caller has just hashed to d: a tier
	// may store it without hashing it again (one that cannot says so by
	// hashing it, as Write does).
	PutHashed(ctx context.Context, ns Namespace, d *repb.Digest, data []byte) error
	// WriteReporting is Write, also saying whether the tier stored the
	// blob (false: it found it already stored, in a form FindMissing could
	// not name beforehand, such as the encrypted tier's ciphertext). A
	// tier that cannot tell says true; a wrapper answers for what it wraps.
	WriteReporting(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) (stored bool, err error)
	// Traits describe the tier.
	Traits() Traits
	// Down is the error that put the tier out of service (an open
	// breaker, a remote that could not be reached), nil while it is up or
	// when it cannot tell.
	Down() error
	// Close releases what the tier holds (connections, files, work in
	// flight); the tier must not be used afterwards. A wrapper closes the
	// tier it wraps; a composition over tiers its caller keeps (the
	// regional tier) closes only what it made.
	Close() error
}

// Source is what the lazy copy-on-write store reads the blobs of clean
// chunks from: a host's own tier, or the read-through composition of it
// with a remote (ReadThrough).
type Source interface {
	Opener
	// OpenTier is Open, also naming the tier that served the blob
	// (TierLocal or TierRemote).
	OpenTier(ctx context.Context, ns Namespace, d *repb.Digest) (Blob, string, error)
	// ReadVerifiedRange fills p with the bytes of d at off, verified
	// against d before it returns, given the digest of d's outboard; an
	// error wrapping ErrNoRange means it cannot, and the caller opens the
	// whole blob instead.
	ReadVerifiedRange(ctx context.Context, ns Namespace, d, outboard *repb.Digest, p []byte, off int64) error
	// Fetch makes sure a verified copy of d is at hand, so that the next
	// Open is quick.
	Fetch(ctx context.Context, ns Namespace, d *repb.Digest) error
}

// Local is what the loader, the lazy copy-on-write store and the
// read-through layer need from a host's own tier (the local cache).
type Local interface {
	Tier
	Source
	// CreateActionResult stores ar under key only if no entry is there, as
	// one atomic step across processes; it returns the entry stored
	// afterwards and whether it was ar.
	CreateActionResult(ctx context.Context, ns Namespace, key *repb.Digest, ar *repb.ActionResult) (*repb.ActionResult, bool, error)
	// FindMissingIndexed is FindMissing answered from the tier's index
	// alone (a blob removed meanwhile is fetched again when opened).
	FindMissingIndexed(ctx context.Context, ns Namespace, ds []*repb.Digest) ([]*repb.Digest, error)
	// Pin keeps blobs from eviction until release is called.
	Pin(ns Namespace, ds []*repb.Digest) (release func())
	// TempDir is a directory on the tier's filesystem, for files renamed
	// into it.
	TempDir() string
}

// Backend is what a server needs from the tier it serves.
type Backend interface {
	Tier
	// Discard drops blob d after a read found it failed verification
	// (DataLoss), and only it. A blob that is absent is not an error.
	Discard(ctx context.Context, ns Namespace, d *repb.Digest) error
	// Reserve promises n bytes of the tier's disk to a write in flight,
	// counted with its entries against its bound. A tier that keeps
	// nothing on this host's disk returns nil and no error: the server
	// then bounds its scratch space itself.
	Reserve(n int64) (Reservation, error)
	// PutFile stores the content of f, verified by the caller to be d
	// (renaming f into place where it can), and carries res over to the
	// stored entry. Once it returns nil, f's path is the tier's: renamed
	// into place, or removed.
	PutFile(ctx context.Context, ns Namespace, d *repb.Digest, f *os.File, res Reservation) error
	// PutCompressedFile stores the n bytes of zstd frames in f, verified
	// by the caller to decode to d, as they are when the tier stores
	// compressed blobs (else decoded); res as for PutFile.
	PutCompressedFile(ctx context.Context, ns Namespace, d *repb.Digest, f *os.File, n int64, res Reservation) error
	// Usage is the bytes the tier's entries occupy on this host's disk
	// and Evictions how many entries it has evicted (both 0 for a tier
	// that keeps nothing on this host).
	Usage() int64
	Evictions() int64
}

// Reservation is disk space promised to a write in flight.
type Reservation interface {
	// Resize changes the reservation; growing it may be ResourceExhausted.
	Resize(n int64) error
	// Release gives the space back (a no-op once the write is stored).
	Release()
}

// ReadWhole is ReadCompressed of a tier that stores nothing compressed:
// the raw content, as Read returns it.
func ReadWhole(ctx context.Context, c Cache, ns Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	rc, err := c.Read(ctx, ns, d)
	return rc, false, err
}

// Contents says where an open blob's verified bytes are, for copies of
// the whole blob: in memory (Mem), or in a file holding them raw from
// offset 0 (File: the local cache's file, for in-kernel copies and
// SEEK_DATA/SEEK_HOLE). Neither is set when the bytes are reachable only
// through ReadAt. Both are lent for the call of Blob.WithContents alone:
// the callee must not write to them, keep them, or close File.
type Contents struct {
	Mem  []byte
	File *os.File
}
