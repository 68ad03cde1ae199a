package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"go.opentelemetry.io/otel/attribute"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/telemetry"
)

// Source names the tier a manifest came from.
type Source string

const (
	SourceLocal  Source = "local"
	SourceRemote Source = "remote"
)

// Snapshot is a loaded manifest.
type Snapshot struct {
	// Key is the key the manifest was found under.
	Key *snapshotpb.SnapshotKey
	// FallbackIndex is 0 for the branch key, i for the i-th fallback key.
	FallbackIndex int
	// Source is the tier the manifest came from.
	Source Source
	// ManifestKey is the action-cache key the manifest was read from.
	ManifestKey *repb.Digest
	// Manifest is the decoded, validated manifest.
	Manifest *snapshotpb.SnapshotManifest
	// Function is the digest function of every blob of the snapshot.
	Function digest.Function
	// RemoteChunks is true when some blobs are only in the remote tier.
	RemoteChunks bool

	result *repb.ActionResult // the manifest as stored
}

// GetOptions configure GetSnapshot.
type GetOptions struct {
	// ReadPolicy is required.
	ReadPolicy ReadPolicy
	// MaxStaleFallbackAge bounds the age of a fallback key's local manifest
	// (default DefaultMaxStaleFallbackAge). The branch key is never subject
	// to it.
	MaxStaleFallbackAge time.Duration
}

// GetSnapshot finds the first usable manifest of the key set: the branch
// key's, else each fallback key's in order, looked up where the read
// policy allows.
func (l *Loader) GetSnapshot(ctx context.Context, keys *snapshotpb.SnapshotKeySet, opts GetOptions) (*Snapshot, error) {
	if keys.GetBranchKey() == nil {
		return nil, invalidf("key set has no branch key")
	}
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	ctx, span := telemetry.Start(ctx, "snaploader.get_snapshot", attribute.String("ref", keys.GetBranchKey().GetRef()),
		attribute.Int("fallbacks", len(keys.GetFallbackKeys())), attribute.String("read_policy", opts.ReadPolicy.String()))
	var last error
	all := AllKeys(keys)
	rl := newRemoteLookups(l, all)
	defer rl.close()
	for i, key := range all {
		snap, err := l.getKeyTraced(ctx, key, i, opts, rl)
		if err == nil {
			span.SetAttributes(attribute.String("source", string(snap.Source)), attribute.Int("fallback_index", i),
				attribute.String("snapshot_id", snap.Manifest.GetVmMetadata().GetSnapshotId()))
			telemetry.End(span, nil)
			return snap, nil
		}
		if ctx.Err() != nil {
			err = fmt.Errorf("looking up %s: %w", keyString(key), status.FromContextError(ctx.Err()).Err())
			telemetry.End(span, err)
			return nil, err
		}
		l.logRejected(key, i, err)
		last = errorsJoinLast(last, err)
	}
	err = fmt.Errorf("no snapshot for %s or its %d fallbacks: %w", keyString(keys.GetBranchKey()), len(keys.GetFallbackKeys()), last)
	span.SetAttributes(attribute.Bool("cold", true))
	telemetry.End(span, err)
	return nil, err
}

// getKeyTraced is getKey in a span of its own saying which tier served the
// key or why it was rejected.
func (l *Loader) getKeyTraced(ctx context.Context, key *snapshotpb.SnapshotKey, idx int, opts GetOptions, rl *remoteLookups) (*Snapshot, error) {
	ctx, span := telemetry.Start(ctx, "snaploader.get_key", attribute.String("ref", key.GetRef()), attribute.Int("fallback_index", idx))
	snap, err := l.getKey(ctx, key, idx, opts, rl)
	if err != nil {
		span.SetAttributes(attribute.String("rejected", rejection(err)), attribute.String("reason", err.Error()))
		span.End() // a rejected key is an answer, not a failure
		return nil, err
	}
	span.SetAttributes(attribute.String("tier", string(snap.Source)))
	span.End()
	return snap, nil
}

// rejection classifies why a key yielded no snapshot.
func rejection(err error) string {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "is stale") || strings.Contains(msg, "treated as stale"):
		return "stale"
	case strings.Contains(msg, "referenced blobs are missing") || strings.Contains(msg, "in neither tier"):
		return "incomplete"
	case status.Code(err) == codes.NotFound:
		return "absent"
	case cache.IsOutage(err):
		return "unavailable"
	case status.Code(err) == codes.FailedPrecondition:
		return "unreadable"
	}
	return "invalid"
}

// logRejected says why a key of the set was passed over: an absent key at
// debug level, anything else (stale, incomplete, corrupt, unreadable) as a
// notice naming the key and the reason.
func (l *Loader) logRejected(key *snapshotpb.SnapshotKey, idx int, err error) {
	why := rejection(err)
	if why == "absent" {
		l.opts.Logger.Debug("no snapshot under key", "key", keyString(key), "fallback_index", idx, "err", err)
		return
	}
	l.opts.Logger.Warn("snapshot under key rejected", "key", keyString(key), "fallback_index", idx, "reason", why, "err", err)
}

// GetSnapshotByID fetches one exact snapshot by id.
func (l *Loader) GetSnapshotByID(ctx context.Context, instance, snapshotID string, opts GetOptions) (*Snapshot, error) {
	if snapshotID == "" {
		return nil, invalidf("snapshot id is empty")
	}
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	return l.getKey(ctx, SnapshotIDKey(instance, snapshotID), 0, opts, nil)
}

// withDefaults checks the options and fills in the defaults.
func (o GetOptions) withDefaults() (GetOptions, error) {
	if o.ReadPolicy == ReadPolicyUnset {
		return o, invalidf("a read policy is required")
	}
	if o.MaxStaleFallbackAge <= 0 {
		o.MaxStaleFallbackAge = DefaultMaxStaleFallbackAge
	}
	return o, nil
}

// getKey finds key's snapshot; rl, when not nil, reads remote manifests
// for the whole key set at once.
func (l *Loader) getKey(ctx context.Context, key *snapshotpb.SnapshotKey, idx int, opts GetOptions, rl *remoteLookups) (*Snapshot, error) {
	useRemote := l.remoteUp() && opts.ReadPolicy != LocalOnly
	snap, localErr := l.getLocal(ctx, key, idx, opts, useRemote)
	if localErr != nil && useRemote && l.degraded(localErr) {
		// The remote went down while confirming blobs this host lacks:
		// the local manifest is still usable if the host has them all.
		useRemote = false
		snap, localErr = l.getLocal(ctx, key, idx, opts, false)
	}
	if localErr == nil {
		return snap, nil
	}
	if !useRemote {
		return nil, localErr
	}
	snap, err := l.getRemote(ctx, key, idx, rl)
	if err != nil {
		l.degraded(err)
		if status.Code(err) == codes.NotFound && status.Code(localErr) != codes.NotFound {
			return nil, fmt.Errorf("%w (local manifest: %v)", err, localErr)
		}
		return nil, err
	}
	if opts.ReadPolicy == LocalFirst {
		// Pin it so later runs on this host reuse the chunks they already have.
		lk, err := LocalManifestKey(l.opts.Group, key)
		if err == nil {
			err = l.local.UpdateActionResult(ctx, l.ns(key.GetInstanceName(), snap.Function), lk, snap.result)
		}
		if err != nil {
			l.opts.Logger.Warn("pinning remote manifest locally", "key", keyString(key), "err", err)
		}
	}
	return snap, nil
}

// getLocal reads and checks the local manifest of key.
func (l *Loader) getLocal(ctx context.Context, key *snapshotpb.SnapshotKey, idx int, opts GetOptions, remoteChunks bool) (*Snapshot, error) {
	mk, err := LocalManifestKey(l.opts.Group, key)
	if err != nil {
		return nil, err
	}
	ar, err := l.getManifest(ctx, false, key.GetInstanceName(), mk)
	if err != nil {
		return nil, fmt.Errorf("local manifest for %s: %w", keyString(key), err)
	}
	if idx > 0 && key.GetSnapshotId() == "" {
		// Checked before any blob is looked up, so that a stale snapshot
		// is neither fetched nor refreshed in the LRU.
		dm, err := decodeManifest(ar)
		if err != nil {
			return nil, fmt.Errorf("local manifest for %s: %w", keyString(key), err)
		}
		done := dm.metadata.GetLastExecutedTask().GetCompletedTimestamp()
		if done == nil {
			return nil, status.Errorf(codes.NotFound, "local manifest for fallback %s has no completion time; treated as stale", keyString(key))
		}
		if age := l.opts.Now().Sub(done.AsTime()); age > opts.MaxStaleFallbackAge {
			return nil, status.Errorf(codes.NotFound, "local manifest for fallback %s is stale: last task completed %s ago (limit %s)", keyString(key), age.Round(time.Second), opts.MaxStaleFallbackAge)
		}
	}
	var blobTier cache.Cache
	if remoteChunks {
		blobTier = l.remote
	}
	m, fn, onlyRemote, err := l.resolve(ctx, key.GetInstanceName(), ar, l.local, blobTier)
	if err != nil {
		return nil, fmt.Errorf("local manifest for %s: %w", keyString(key), err)
	}
	return &Snapshot{Key: key, FallbackIndex: idx, Source: SourceLocal, ManifestKey: mk, Manifest: m, Function: fn, RemoteChunks: onlyRemote}, nil
}

// getRemote reads the remote manifest of key and confirms every blob it
// references exists remotely.
func (l *Loader) getRemote(ctx context.Context, key *snapshotpb.SnapshotKey, idx int, rl *remoteLookups) (*Snapshot, error) {
	mk, err := RemoteManifestKey(key)
	if err != nil {
		return nil, err
	}
	var ar *repb.ActionResult
	if rl != nil {
		ar, err = rl.get(ctx, idx, mk)
	} else {
		ar, err = l.getManifest(ctx, true, key.GetInstanceName(), mk)
	}
	if err != nil {
		return nil, fmt.Errorf("remote manifest for %s: %w", keyString(key), err)
	}
	m, fn, _, err := l.resolve(ctx, key.GetInstanceName(), ar, l.remote, nil)
	if err != nil {
		return nil, fmt.Errorf("remote manifest for %s: %w", keyString(key), err)
	}
	return &Snapshot{Key: key, FallbackIndex: idx, Source: SourceRemote, ManifestKey: mk, Manifest: m, Function: fn, RemoteChunks: true, result: ar}, nil
}

// resolve decodes a manifest, reads its trees and checks that every blob it
// names is in primary, or else confirmed present in secondary by one
// FindMissing call. Lookups refresh LRU recency in the local cache.
//
// A manifest read from the remote (primary the remote, no secondary) is
// resolved in fewer round trips: its trees and its small artifact files
// are fetched into the local cache together, which proves them present
// (the restore that follows finds them there), and only the rest (chunks,
// large files) is looked up; a snapshot of small files alone needs no
// lookup at all.
func (l *Loader) resolve(ctx context.Context, instance string, ar *repb.ActionResult, primary, secondary cache.Cache) (*snapshotpb.SnapshotManifest, digest.Function, bool, error) {
	dm, err := decodeManifest(ar)
	if err != nil {
		return nil, 0, false, err
	}
	ns := l.ns(instance, dm.function)
	m := &snapshotpb.SnapshotManifest{VmConfiguration: dm.config, VmMetadata: dm.metadata, Files: dm.files}
	fromRemote := primary != cache.Cache(l.local) && secondary == nil
	var copies map[string][]byte // the manifest's copies of its small blobs
	if fromRemote {
		copies = inlineCopies(ar, dm.function)
	}
	var blobs, fetch, kept []*repb.Digest
	for _, f := range dm.files {
		if _, ok := copies[digest.String(f.GetDigest())]; ok {
			kept = append(kept, f.GetDigest())
			continue
		}
		if fromRemote && f.GetDigest().GetSizeBytes() <= maxFetchedWithManifest {
			fetch = append(fetch, f.GetDigest())
			continue
		}
		blobs = append(blobs, f.GetDigest())
	}
	// The trees (and a remote snapshot's small files) are read together:
	// one round trip for all of a cold snapshot's chunked files, none for
	// those the manifest carries.
	trees := make([]*snapshotpb.ChunkedFile, len(dm.trees))
	g, gctx := errgroup.WithContext(ctx)
	for i, d := range dm.trees {
		g.Go(func() error {
			b, ok := copies[digest.String(d.GetTreeDigest())]
			if ok {
				l.keepCopy(gctx, ns, d.GetTreeDigest(), b)
			} else {
				var err error
				if b, err = l.readTree(gctx, ns, d.GetTreeDigest(), primary != l.local || secondary != nil); err != nil {
					return fmt.Errorf("reading tree of chunked file %q: %w", d.GetPath(), err)
				}
			}
			var err error
			trees[i], err = decodeTree(d.GetPath(), b)
			return err
		})
	}
	for _, d := range kept {
		g.Go(func() error {
			if err := l.local.PutHashed(gctx, ns, d, copies[digest.String(d)]); err != nil {
				return fmt.Errorf("keeping %s from the manifest: %w", describeBlob(m, d), err)
			}
			return nil
		})
	}
	if len(fetch) > 0 {
		rt := cache.NewReadThrough(l.local, l.remote)
		for _, d := range fetch {
			g.Go(func() error {
				err := rt.Fetch(gctx, ns, d)
				if cache.IsNotFound(err) {
					return status.Errorf(codes.NotFound, "referenced blobs are missing, e.g. %s: %v", describeBlob(m, d), err)
				}
				if err != nil {
					return fmt.Errorf("fetching %s: %w", describeBlob(m, d), err)
				}
				return nil
			})
		}
	}
	if err := g.Wait(); err != nil {
		return nil, 0, false, err
	}
	for i, d := range dm.trees {
		cf := trees[i]
		m.ChunkedFiles = append(m.ChunkedFiles, cf)
		if !fromRemote { // a tree just read from the remote is there
			blobs = append(blobs, d.GetTreeDigest())
		}
		for _, c := range cf.GetChunks() {
			blobs = append(blobs, c.GetDigest())
		}
	}
	if len(blobs) == 0 {
		return m, dm.function, false, nil
	}
	find := primary.FindMissing
	if primary == cache.Cache(l.local) {
		find = l.local.FindMissingIndexed
	}
	missing, err := find(ctx, ns, blobs)
	if err != nil {
		return nil, 0, false, fmt.Errorf("checking %d blobs: %w", len(blobs), err)
	}
	if len(missing) == 0 {
		return m, dm.function, false, nil
	}
	if secondary == nil {
		return nil, 0, false, status.Errorf(codes.NotFound, "%d of %d referenced blobs are missing, e.g. %s", len(missing), len(blobs), describeBlob(m, missing[0]))
	}
	still, err := secondary.FindMissing(ctx, ns, missing)
	if err != nil {
		return nil, 0, false, fmt.Errorf("checking %d blobs missing locally against the remote: %w", len(missing), err)
	}
	if len(still) > 0 {
		return nil, 0, false, status.Errorf(codes.NotFound, "%d referenced blobs are in neither tier, e.g. %s", len(still), describeBlob(m, still[0]))
	}
	return m, dm.function, true, nil
}

// maxFetchedWithManifest is the largest artifact file a lookup of a remote
// manifest fetches instead of asking whether the remote holds it: the
// fetch takes as many round trips as the question, and the restore that
// follows needs the file anyway.
const maxFetchedWithManifest = 4 << 20

// readTree reads a tree blob from the local cache, else (when allowed) from
// the remote, keeping a local copy: trees are small and every later lookup
// of the snapshot needs them.
func (l *Loader) readTree(ctx context.Context, ns cache.Namespace, d *repb.Digest, remoteOK bool) ([]byte, error) {
	b, err := cache.ReadAll(ctx, l.local, ns, d)
	if err == nil || !remoteOK || l.remote == nil {
		return b, err
	}
	b, rerr := cache.ReadAll(ctx, l.remote, ns, d)
	if rerr != nil {
		return nil, errorsJoinLast(err, rerr)
	}
	// The copy read from the remote is already verified; a local cache
	// that cannot keep it (full disk) must not fail the load.
	if werr := l.local.Write(ctx, ns, d, bytes.NewReader(b)); werr != nil {
		if !digest.Equal(digest.Compute(ns.Function, b), d) {
			return nil, cache.Corruptf("tree %s from the remote is corrupt: %v", digest.String(d), werr)
		}
		l.opts.Logger.Warn("keeping a local copy of a tree", "digest", digest.String(d), "err", werr)
	}
	return b, nil
}

// keepCopy stores a tree the manifest carried in the local cache; a local
// cache that cannot keep it (full disk) must not fail the load.
func (l *Loader) keepCopy(ctx context.Context, ns cache.Namespace, d *repb.Digest, b []byte) {
	if err := l.local.PutHashed(ctx, ns, d, b); err != nil {
		l.opts.Logger.Warn("keeping a local copy of a tree", "digest", digest.String(d), "err", err)
	}
}

// describeBlob names where a digest is used in a manifest.
func describeBlob(m *snapshotpb.SnapshotManifest, d *repb.Digest) string {
	for _, f := range m.GetFiles() {
		if digest.Equal(f.GetDigest(), d) {
			return fmt.Sprintf("artifact file %q (blob %s)", f.GetPath(), digest.String(d))
		}
	}
	for _, cf := range m.GetChunkedFiles() {
		for _, c := range cf.GetChunks() {
			if digest.Equal(c.GetDigest(), d) {
				return fmt.Sprintf("chunk of %q at offset %d (blob %s)", cf.GetName(), c.GetOffset(), digest.String(d))
			}
		}
	}
	return "blob " + digest.String(d)
}
