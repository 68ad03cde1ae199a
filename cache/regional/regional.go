// Package regional is the cache tier a fleet puts between its hosts and
// the bucket: a bounded disk cache (the local cache of a `snaploader
// serve`) in front of an upstream tier (the S3 tier, or the REAPI client
// of another serve). *Regional is a cache.Backend, so a server serves it
// like any other tier.
//
// # Blobs
//
// The upstream is the source of truth; the disk only keeps copies.
//
//   - Reads are served from the disk when it holds the blob. On a miss the
//     blob is fetched from the upstream once, however many readers want it
//     (see fill.go): the fetch streams into a temporary file of the disk
//     cache, every waiting reader is served from that file as it grows,
//     and the whole blob is verified against its digest before any reader
//     gets its final bytes (a reader never sees a clean end of stream on
//     unverified content; a mismatch ends every reader with DataLoss).
//     The verified file then becomes the disk cache's entry.
//   - ReadRange and ReadCompressed are served from the disk when it holds
//     the blob, else from the fetch (a range's last bytes wait for the
//     whole blob to verify; a compressed read of a fetched blob is its
//     raw content).
//   - Writes go to the upstream first; only once the upstream holds the
//     blob does the disk keep a copy (a failure to keep it is logged, not
//     returned: the write is done).
//   - FindMissing asks the upstream. A blob present only on the disk is
//     reported missing, so a blob the upstream lost is uploaded again
//     rather than trusted: the disk never makes a blob look present. The
//     upstream's positive answers (and blobs just written to or fetched
//     from it) are remembered for Options.PresentTTL, which saves a round
//     trip per blob for the FindMissing calls of a restore; that is the
//     only window in which a blob the upstream lost can be reported
//     present. With a bucket collected by snaploader gc, PresentTTL adds
//     to the time a save may take between its FindMissing and its
//     manifest (keep it far below the collection's grace period).
//   - Discard drops the disk's copy only (and forgets a remembered
//     positive answer); the upstream's copy is the upstream's business.
//
// # Action cache
//
// Every action-cache read goes to the upstream, except that an entry
// recognised as a snapshot manifest (it carries the snapshot's VM metadata
// or, encrypted, a sealed entry) is kept in memory and answered from there
// for Options.ManifestTTL after it was read. Version entries (snapshot
// version ids, written by the loader under snapshot.VersionKey, a hash the
// key alone cannot be told apart from a manifest's) carry
// snapshotpb.SnapshotVersionMetadata once read, and are never kept: an
// invalidation is seen by the next read. Entries of any other form are
// not kept either. A manifest read within ManifestTTL of an earlier read
// may be the one a newer save has replaced since; a write through this
// tier drops its own kept copy at once. Writes go to the upstream only.
//
// # Groups
//
// Entries are kept per group, instance and digest function, as the
// server's namespace names them. An S3 upstream partitions action-cache
// entries by group itself; a REAPI upstream sees one group, the one of the
// credentials this tier dials it with, so a serve over a REAPI upstream
// should map all its API keys to one group.
//
// # Serving it
//
// A serve of a regional tier passes it to server.New as the backend, with
// server.Options.TempDir set to the local cache's TempDir (uploads are
// then renamed into the disk cache) and Inventory listing the upstream
// (gc.S3Group over an S3 upstream). The upstream is the S3 tier, or a
// REAPI client of another serve, best wrapped in a failover tier (package
// failover) so that a blip of the upstream is ridden out; StallTimeout
// then exceeds the failover tier's retry bound.
package regional

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// Local is what the regional tier needs of its disk: a backend (the local
// cache) that opens blobs for random reads and has a scratch directory on
// its filesystem for fetches in flight. *localcache.Cache is one.
type Local interface {
	cache.Backend
	cache.Opener
	TempDir() string
}

// Defaults of Options.
const (
	DefaultPresentTTL    = 10 * time.Second
	DefaultManifestTTL   = 5 * time.Second
	DefaultStallTimeout  = 30 * time.Second
	DefaultMaxRemembered = 1 << 20
)

// Options configure a Regional. The zero value gives the defaults.
type Options struct {
	// PresentTTL is how long an upstream's answer that a blob is present
	// is remembered (default DefaultPresentTTL; negative: never).
	PresentTTL time.Duration
	// ManifestTTL is how long a manifest read from the upstream is
	// answered from memory (default DefaultManifestTTL; negative: never).
	ManifestTTL time.Duration
	// StallTimeout fails a fetch from the upstream that receives no byte
	// for this long, as Unavailable (default DefaultStallTimeout). Over
	// an upstream that rides out outages itself (a failover tier), it
	// should exceed that tier's retry bound.
	StallTimeout time.Duration
	// MaxRemembered bounds the remembered positive answers and manifests
	// (each; default DefaultMaxRemembered).
	MaxRemembered int
	// Logger gets failures that are not returned (keeping a local copy of
	// a blob written upstream); nil = slog.Default().
	Logger *slog.Logger
	// Now is the clock of the TTLs (tests); nil = time.Now.
	Now func() time.Time
}

// Regional is a disk cache in front of an upstream tier (see the package
// documentation). It is safe for concurrent use.
type Regional struct {
	local Local
	up    cache.Tier
	opts  Options

	ctx    context.Context // fetches run under it; cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	closed    bool
	fills     map[string]*fill
	present   map[string]time.Time    // blob key -> expiry
	manifests map[string]manifestMemo // entry key -> memo

	stats struct {
		localHits, fills, joins, fillBytes, fillErrors atomic.Int64
		presentHits, upstreamAsked                     atomic.Int64
		manifestHits, acReads                          atomic.Int64
		localCopyErrors                                atomic.Int64
	}
}

type manifestMemo struct {
	ar      *repb.ActionResult
	expires time.Time
}

var _ cache.Backend = (*Regional)(nil)

// New returns a regional tier keeping copies in local of what upstream
// holds. Temporary files of fetches a killed process left in local's
// TempDir are removed.
func New(local Local, upstream cache.Tier, opts Options) *Regional {
	if opts.PresentTTL == 0 {
		opts.PresentTTL = DefaultPresentTTL
	}
	if opts.ManifestTTL == 0 {
		opts.ManifestTTL = DefaultManifestTTL
	}
	if opts.StallTimeout <= 0 {
		opts.StallTimeout = DefaultStallTimeout
	}
	if opts.MaxRemembered <= 0 {
		opts.MaxRemembered = DefaultMaxRemembered
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	fileio.RemoveStaleTemps(local.TempDir(), nil)
	ctx, cancel := context.WithCancel(context.Background())
	return &Regional{
		local: local, up: upstream, opts: opts, ctx: ctx, cancel: cancel,
		fills: map[string]*fill{}, present: map[string]time.Time{}, manifests: map[string]manifestMemo{},
	}
}

// Close stops the fetches in flight (their readers get Unavailable) and
// waits for them to end. It does not close the local cache or upstream.
func (r *Regional) Close() error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	r.wg.Wait()
	return nil
}

// Stats are a Regional's counters.
type Stats struct {
	LocalHits       int64 // reads served by the disk alone
	Fills           int64 // fetches from the upstream
	Joins           int64 // reads that joined a fetch in flight
	FillBytes       int64 // bytes fetched from the upstream
	FillErrors      int64 // fetches that failed
	PresentHits     int64 // FindMissing digests answered from remembered answers
	UpstreamAsked   int64 // FindMissing digests asked of the upstream
	ACReads         int64 // action-cache reads sent to the upstream
	ManifestHits    int64 // action-cache reads answered from remembered manifests
	LocalCopyErrors int64 // blobs written upstream whose local copy failed
}

// Stats returns the counters so far.
func (r *Regional) Stats() Stats {
	s := &r.stats
	return Stats{
		LocalHits: s.localHits.Load(), Fills: s.fills.Load(), Joins: s.joins.Load(),
		FillBytes: s.fillBytes.Load(), FillErrors: s.fillErrors.Load(),
		PresentHits: s.presentHits.Load(), UpstreamAsked: s.upstreamAsked.Load(),
		ACReads: s.acReads.Load(), ManifestHits: s.manifestHits.Load(), LocalCopyErrors: s.localCopyErrors.Load(),
	}
}

// Traits: ranges and compressed reads are verified (from the disk, or by
// the fetch before their last bytes); whole reads from the disk are
// verified once per boot, as the local cache does, so VerifiesReads is
// false (a server hashes whole reads itself). Storage is the disk's.
func (r *Regional) Traits() cache.Traits {
	lt := r.local.Traits()
	return cache.Traits{
		Description:             fmt.Sprintf("regional cache %s over %s", lt.Description, r.up.Traits().Description),
		VerifiesRanges:          true,
		ServesRanges:            true,
		VerifiesCompressedReads: lt.VerifiesCompressedReads,
		StoresCompressed:        lt.StoresCompressed,
		MaxBytes:                lt.MaxBytes,
		Dir:                     lt.Dir,
	}
}

// Down is the upstream's outage, when it knows of one.
func (r *Regional) Down() error { return r.up.Down() }

// Upstream is the upstream tier.
func (r *Regional) Upstream() cache.Tier { return r.up }

func blobKey(ns cache.Namespace, d *repb.Digest) string {
	return fmt.Sprintf("%d/%s/%s/%d", ns.DigestFunction(), ns.Instance, d.GetHash(), d.GetSizeBytes())
}

func entryKey(ns cache.Namespace, key *repb.Digest) string {
	return fmt.Sprintf("%q/%q/%d/%s/%d", ns.Group, ns.Instance, ns.DigestFunction(), key.GetHash(), key.GetSizeBytes())
}

// FindMissing asks the upstream about every digest whose presence it did
// not confirm within PresentTTL (see the package documentation): the disk
// alone never makes a blob present. An upstream failure is returned with
// its kind.
func (r *Regional) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	now := r.opts.Now()
	var ask []*repb.Digest
	r.mu.Lock()
	for _, d := range ds {
		if d.GetSizeBytes() == 0 {
			continue
		}
		if exp, ok := r.present[blobKey(ns, d)]; ok && now.Before(exp) {
			continue
		}
		ask = append(ask, d)
	}
	r.mu.Unlock()
	r.stats.presentHits.Add(int64(len(ds) - len(ask)))
	if len(ask) == 0 {
		return nil, nil
	}
	r.stats.upstreamAsked.Add(int64(len(ask)))
	missing, err := r.up.FindMissing(ctx, ns, ask)
	if err != nil {
		return nil, fmt.Errorf("regional cache: asking upstream %s: %w", r.up.Traits().Description, err)
	}
	gone := make(map[string]bool, len(missing))
	for _, d := range missing {
		gone[blobKey(ns, d)] = true
	}
	var have []*repb.Digest
	for _, d := range ask {
		if !gone[blobKey(ns, d)] {
			have = append(have, d)
		}
	}
	r.remember(ns, have...)
	return missing, nil
}

// remember records that the upstream holds ds.
func (r *Regional) remember(ns cache.Namespace, ds ...*repb.Digest) {
	if r.opts.PresentTTL < 0 || len(ds) == 0 {
		return
	}
	now := r.opts.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.present)+len(ds) > r.opts.MaxRemembered {
		for k, exp := range r.present {
			if !now.Before(exp) {
				delete(r.present, k)
			}
		}
		for k := range r.present {
			if len(r.present)+len(ds) <= r.opts.MaxRemembered {
				break
			}
			delete(r.present, k)
		}
	}
	for _, d := range ds {
		r.present[blobKey(ns, d)] = now.Add(r.opts.PresentTTL)
	}
}

func (r *Regional) forget(ns cache.Namespace, d *repb.Digest) {
	r.mu.Lock()
	delete(r.present, blobKey(ns, d))
	r.mu.Unlock()
}

// Discard drops the disk's copy of d (after a read found it corrupt) and
// forgets that the upstream had it; the upstream's copy stays.
func (r *Regional) Discard(ctx context.Context, ns cache.Namespace, d *repb.Digest) error {
	r.forget(ns, d)
	return r.local.Discard(ctx, ns, d)
}

// Reserve promises space of the disk cache to an upload in flight.
func (r *Regional) Reserve(n int64) (cache.Reservation, error) { return r.local.Reserve(n) }

// Usage is the disk cache's usage.
func (r *Regional) Usage() int64 { return r.local.Usage() }

// Evictions is the disk cache's evictions.
func (r *Regional) Evictions() int64 { return r.local.Evictions() }

// GetActionResult reads the entry from the upstream, or, for a manifest
// read from it less than ManifestTTL ago, from memory (see the package
// documentation).
func (r *Regional) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	k := entryKey(ns, key)
	now := r.opts.Now()
	r.mu.Lock()
	m, ok := r.manifests[k]
	if ok && !now.Before(m.expires) {
		delete(r.manifests, k)
		ok = false
	}
	r.mu.Unlock()
	if ok {
		r.stats.manifestHits.Add(1)
		return proto.Clone(m.ar).(*repb.ActionResult), nil
	}
	r.stats.acReads.Add(1)
	ar, err := r.up.GetActionResult(ctx, ns, key)
	if err != nil {
		return nil, fmt.Errorf("regional cache: reading action result %s from upstream %s: %w", digest.String(key), r.up.Traits().Description, err)
	}
	if r.opts.ManifestTTL > 0 && IsManifest(ar) {
		r.mu.Lock()
		if len(r.manifests) >= r.opts.MaxRemembered {
			for k, m := range r.manifests {
				if !now.Before(m.expires) || len(r.manifests) >= r.opts.MaxRemembered {
					delete(r.manifests, k)
				}
			}
		}
		r.manifests[k] = manifestMemo{ar: proto.Clone(ar).(*repb.ActionResult), expires: now.Add(r.opts.ManifestTTL)}
		r.mu.Unlock()
	}
	return ar, nil
}

// UpdateActionResult writes the entry to the upstream and drops any copy
// of it kept in memory.
func (r *Regional) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	k := entryKey(ns, key)
	r.mu.Lock()
	delete(r.manifests, k)
	r.mu.Unlock()
	err := r.up.UpdateActionResult(ctx, ns, key, ar)
	r.mu.Lock()
	delete(r.manifests, k) // a read racing the write may have kept the old one
	r.mu.Unlock()
	if err != nil {
		return fmt.Errorf("regional cache: writing action result %s to upstream %s: %w", digest.String(key), r.up.Traits().Description, err)
	}
	return nil
}

// IsManifest reports whether ar is a snapshot manifest, plain (it carries
// the VM metadata) or encrypted (it carries a sealed entry), and not a
// version entry (snapshotpb.SnapshotVersionMetadata): only such entries
// may be answered from memory.
func IsManifest(ar *repb.ActionResult) bool {
	manifest := false
	for _, a := range ar.GetExecutionMetadata().GetAuxiliaryMetadata() {
		switch {
		case a.MessageIs((*snapshotpb.SnapshotVersionMetadata)(nil)):
			return false
		case a.MessageIs((*snapshotpb.VMMetadata)(nil)), a.MessageIs((*snapshotpb.SealedEntry)(nil)):
			manifest = true
		}
	}
	return manifest
}
