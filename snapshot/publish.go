package snapshot

import (
	"context"
	"fmt"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// publishBlobs copies to the remote every blob of m it lacks from the local
// cache: artifact files and trees (when they went to the local cache
// first) and chunks.
func (l *Loader) publishBlobs(ctx context.Context, ns cache.Namespace, m *snapshotpb.SnapshotManifest, trees map[string]*repb.Digest, fromLocal bool, res *SaveResult) error {
	if fromLocal {
		var ds []*repb.Digest
		for _, f := range m.GetFiles() {
			ds = append(ds, f.GetDigest())
		}
		for _, cf := range m.GetChunkedFiles() {
			ds = append(ds, trees[cf.GetName()])
		}
		if _, _, err := l.copyMissing(ctx, ns, ds, l.local, l.remote); err != nil {
			if c := status.Code(err); c == codes.InvalidArgument || c == codes.ResourceExhausted {
				big := int64(0)
				for _, f := range m.GetFiles() {
					big = max(big, f.GetDigest().GetSizeBytes())
				}
				return fmt.Errorf("artifact files and trees (the largest artifact file is %d bytes; if the remote limits blob sizes without saying so, pass --remote-max-blob-bytes with its limit and larger files are stored as chunks): %w", big, err)
			}
			return fmt.Errorf("artifact files and trees: %w", err)
		}
	}
	for i, cf := range m.GetChunkedFiles() {
		ds := make([]*repb.Digest, 0, len(cf.GetChunks()))
		for _, c := range cf.GetChunks() {
			ds = append(ds, c.GetDigest())
		}
		n, b, err := l.copyMissing(ctx, ns, ds, l.local, l.remote)
		if err != nil {
			return fmt.Errorf("chunked file %q: %w", cf.GetName(), err)
		}
		res.Files[i].RemoteChunksWritten += n
		res.Files[i].RemoteBytesWritten += b
		// Outboards only speed up first reads: one the local cache lost
		// (reads of its chunk verify the chunk whole) does not fail the save.
		var obs []*repb.Digest
		for _, c := range cf.GetChunks() {
			if ob := c.GetOutboard(); ob != nil {
				obs = append(obs, ob)
			}
		}
		if len(obs) > 0 {
			if _, _, err := l.copyMissing(ctx, ns, obs, l.local, l.remote); err != nil {
				if cache.IsOutage(err) {
					return fmt.Errorf("chunked file %q: outboards: %w", cf.GetName(), err)
				}
				l.opts.Logger.Warn("chunk outboards not uploaded; first reads of those chunks will verify them whole", "file", cf.GetName(), "err", err)
			}
		}
	}
	return nil
}

// repairRemote checks, once the remote manifest is written, that the remote
// still holds every blob it names, and uploads again from the local cache
// what it lost meanwhile: a collection of an S3 bucket may delete a blob
// between the moment FindMissing reported it present to this save and the
// manifest write; after this check the manifest protects it.
func (l *Loader) repairRemote(ctx context.Context, ns cache.Namespace, m *snapshotpb.SnapshotManifest, trees map[string]*repb.Digest) {
	var ds []*repb.Digest
	for _, f := range m.GetFiles() {
		ds = append(ds, f.GetDigest())
	}
	for _, cf := range m.GetChunkedFiles() {
		ds = append(ds, trees[cf.GetName()])
		for _, c := range cf.GetChunks() {
			ds = append(ds, c.GetDigest())
			if o := c.GetOutboard(); o != nil {
				ds = append(ds, o)
			}
		}
	}
	n, _, err := l.copyMissing(ctx, ns, ds, l.local, l.remote)
	switch {
	case err != nil:
		l.opts.Logger.Warn("checking the remote holds every blob of the new manifest", "snapshot_id", m.GetVmMetadata().GetSnapshotId(), "err", err)
	case n > 0:
		l.opts.Logger.Warn("blobs vanished from the remote while saving (a concurrent collection?); uploaded again",
			"snapshot_id", m.GetVmMetadata().GetSnapshotId(), "blobs", n)
	}
}

// writeManifests writes m under every key in keys to the remote tier
// (remote manifest keys) or the local one (local manifest keys) in the
// data's namespace ns, and records the write key's manifest key in res.
func (l *Loader) writeManifests(ctx context.Context, remote bool, ns cache.Namespace, m *snapshotpb.SnapshotManifest, trees map[string]*repb.Digest, keys []*snapshotpb.SnapshotKey, res *SaveResult) error {
	var inline []*snapshotpb.InlineBlob
	if remote {
		inline = l.inlineBlobs(ctx, ns, m, trees)
	}
	ar, err := ManifestActionResult(m, trees, inline...)
	if err != nil {
		return err
	}
	c, where := l.tier(remote), "local"
	if remote {
		where = "remote"
	}
	for i, k := range keys {
		var mk *repb.Digest
		if remote {
			mk, err = RemoteManifestKey(k)
		} else {
			mk, err = LocalManifestKey(l.opts.Group, k)
		}
		if err != nil {
			return err
		}
		err = c.UpdateActionResult(ctx, l.ns(k.GetInstanceName(), ns.Function), mk, ar)
		if err != nil && len(inline) > 0 && tooLarge(err) {
			// A cache that limits its entries below the copies: the
			// manifest alone, whose readers fetch the blobs.
			l.opts.Logger.Debug("the remote refused a manifest with copies of its small blobs; writing it without", "key", keyString(k), "err", err)
			inline = nil
			if ar, err = ManifestActionResult(m, trees); err != nil {
				return err
			}
			err = c.UpdateActionResult(ctx, l.ns(k.GetInstanceName(), ns.Function), mk, ar)
		}
		if err != nil {
			return fmt.Errorf("writing %s manifest of %s: %w", where, keyString(k), err)
		}
		if i == 0 {
			res.ManifestKey = mk
		}
	}
	return nil
}

// republishIfRaced keeps an acknowledged save reachable when the key's
// version id changed while it ran because another host or process created
// the first one at the same moment (the tier has no compare-and-swap, and
// the id stored last wins): the manifest is written again under the id
// that won, until the id read back is the one it is stored under. A change
// made by Invalidate is respected: the save is then not republished, and
// SaveResult.Invalidated says so.
func (l *Loader) republishIfRaced(ctx context.Context, ns cache.Namespace, m *snapshotpb.SnapshotManifest, trees map[string]*repb.Digest, keys []*snapshotpb.SnapshotKey, res *SaveResult) {
	key := keys[0]
	for range 5 {
		cur, invalidation, err := l.storedVersion(ctx, key)
		if err != nil {
			l.opts.Logger.Warn("checking the version id after saving", "key", keyString(key), "err", err)
			return
		}
		if cur == "" || cur == key.GetVersionId() {
			return
		}
		if invalidation {
			l.opts.Logger.Warn("the key was invalidated while this snapshot was saved; it will not be restored by key",
				"key", keyString(key), "snapshot_id", res.SnapshotID, "version_id", cur)
			res.Invalidated = true
			return
		}
		l.opts.Logger.Debug("version id created concurrently; republishing the manifest under it", "key", keyString(key), "version_id", cur)
		moved := make([]*snapshotpb.SnapshotKey, len(keys))
		for i, k := range keys {
			moved[i] = k
			if k.GetVersionId() != "" {
				moved[i] = proto.Clone(k).(*snapshotpb.SnapshotKey)
				moved[i].VersionId = cur
			}
		}
		m.VmMetadata.SnapshotKey = moved[0]
		if res.PublishedRemote {
			if err := l.writeManifests(ctx, true, ns, m, trees, moved, res); err != nil {
				l.opts.Logger.Warn("republishing under the current version id", "key", keyString(moved[0]), "err", err)
				return
			}
		}
		if res.PublishedLocal {
			if err := l.writeManifests(ctx, false, ns, m, trees, moved, res); err != nil {
				l.opts.Logger.Warn("republishing locally under the current version id", "key", keyString(moved[0]), "err", err)
				return
			}
		}
		keys, key = moved, moved[0]
		res.Key = key
	}
}

// copyMissing copies the blobs of all that dst lacks from src, with bounded
// parallelism; the first error cancels the rest. It returns the number of
// blobs and bytes dst stored.
func (l *Loader) copyMissing(ctx context.Context, ns cache.Namespace, all []*repb.Digest, src cache.Cache, dst cache.Tier) (int, int64, error) {
	ds := make([]*repb.Digest, 0, len(all))
	seen := map[string]bool{}
	for _, d := range all {
		if !seen[d.GetHash()] {
			seen[d.GetHash()] = true
			ds = append(ds, d)
		}
	}
	missing, err := dst.FindMissing(ctx, ns, ds)
	if err != nil {
		return 0, 0, fmt.Errorf("finding missing blobs: %w", err)
	}
	var mu sync.Mutex
	var blobs int
	var bytes int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(l.opts.Parallelism)
	for _, d := range missing {
		g.Go(func() error {
			rc, err := src.Read(gctx, ns, d)
			if err != nil {
				return fmt.Errorf("reading blob %s: %w", digest.String(d), err)
			}
			defer rc.Close()
			// The encrypted tier may find a blob's ciphertext already
			// stored, which FindMissing could not tell beforehand.
			stored, err := dst.WriteReporting(gctx, ns, d, rc)
			if err != nil {
				return fmt.Errorf("writing blob %s: %w", digest.String(d), err)
			}
			if stored {
				mu.Lock()
				blobs++
				bytes += d.SizeBytes
				mu.Unlock()
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return 0, 0, err
	}
	return blobs, bytes, nil
}

// PublishDecision is the remote save policy's answer for one save.
type PublishDecision struct {
	Publish bool
	// Reason says why not, when Publish is false; Label is a short
	// form of it for metrics.
	Reason, Label string
}

// DecidePublish applies the remote save policy like
// ShouldPublishRemote and says why a save is not published.
func DecidePublish(p SavePolicy, writeRef, defaultRef string, loaded *Snapshot) PublishDecision {
	if ShouldPublishRemote(p, writeRef, defaultRef, loaded) {
		return PublishDecision{Publish: true}
	}
	hint := ""
	if defaultRef == "" {
		hint = fmt.Sprintf("; no default ref was given (--default-ref or $%s), so ref %q is not known to be the default branch, whose runs always publish", EnvDefaultBranch, writeRef)
	}
	if p == NoneAvailable {
		return PublishDecision{Label: "snapshot_found", Reason: fmt.Sprintf("save policy none-available: this run started from a snapshot (key ref %q)%s", loaded.Key.GetRef(), hint)}
	}
	return PublishDecision{Label: "branch_key_has_snapshot", Reason: fmt.Sprintf("save policy first-non-default-ref: a snapshot already exists under the branch key (ref %q) and the ref is not the default ref%s; use --save-policy always to publish every run", writeRef, hint)}
}

// ShouldPublishRemote applies the remote save policy: runs on
// the default ref always publish; otherwise Always publishes, NoneAvailable
// only when nothing was loaded, FirstNonDefaultRef only when the run did not
// start from the branch key itself.
func ShouldPublishRemote(p SavePolicy, writeRef, defaultRef string, loaded *Snapshot) bool {
	if writeRef == defaultRef && defaultRef != "" {
		return true
	}
	switch p {
	case Always:
		return true
	case NoneAvailable:
		return loaded == nil
	default:
		return loaded == nil || loaded.FallbackIndex > 0
	}
}

// tooLarge reports whether a tier refused an entry for its size (or for
// content it does not take, which a size limit is reported as by some).
func tooLarge(err error) bool {
	switch status.Code(err) {
	case codes.InvalidArgument, codes.ResourceExhausted, codes.OutOfRange:
		return true
	}
	return false
}
