package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"go.opentelemetry.io/otel/attribute"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/telemetry"
)

// MaxWorkingSetChunks bounds the working set recorded per chunked file: the
// chunks a restored VM touched first, in order, prefetched on the next
// restore.
const MaxWorkingSetChunks = 4096

// SaveRequest is what CacheSnapshot stores.
type SaveRequest struct {
	// Key is the write key; required.
	Key *snapshotpb.SnapshotKey
	// Config is the VM configuration, opaque to storage.
	Config *snapshotpb.VMConfiguration
	// Metadata is optional; snapshot id, key, digest function and (when
	// unset) the last task's completion time are filled in.
	Metadata *snapshotpb.VMMetadata
	// Files maps artifact file names to paths.
	Files map[string]string
	// Chunked are the chunked files' copy-on-write stores.
	Chunked []*cow.Store
	// Local stores blobs in the local cache; Remote publishes to the remote.
	// At least one is required.
	Local, Remote bool
	// LocalManifest writes the manifest to the local cache too.
	LocalManifest bool
	// AlsoKeys are further keys the manifest is published under, e.g. the
	// universal ref any branch may publish to (KeySetOptions.UniversalRef).
	AlsoKeys []*snapshotpb.SnapshotKey
}

// FileStats describes what saving one chunked file stored.
type FileStats struct {
	Name string
	cow.SaveStats
	// RemoteChunksWritten counts chunk blobs uploaded to the remote.
	RemoteChunksWritten int
	RemoteBytesWritten  int64
}

// SaveResult reports a save.
type SaveResult struct {
	SnapshotID      string
	Key             *snapshotpb.SnapshotKey
	ManifestKey     *repb.Digest // local key when written locally, else remote
	Manifest        *snapshotpb.SnapshotManifest
	Files           []FileStats
	ArtifactBytes   int64
	PublishedLocal  bool
	PublishedRemote bool
	// RemoteError is why a save asked to publish remotely did not (the
	// remote tier was down); the save completed locally.
	RemoteError error
	// Invalidated is true when the key was invalidated while the save
	// ran: the snapshot is stored but is not restored by key.
	Invalidated bool
	Duration    time.Duration
}

// Totals sums the chunked files' stats.
func (r *SaveResult) Totals() (t FileStats) {
	for _, f := range r.Files {
		t.ChunksTotal += f.ChunksTotal
		t.ChunksWritten += f.ChunksWritten
		t.ChunksDirty += f.ChunksDirty
		t.BytesWritten += f.BytesWritten
		t.BytesSkippedZero += f.BytesSkippedZero
		t.RemoteChunksWritten += f.RemoteChunksWritten
		t.RemoteBytesWritten += f.RemoteBytesWritten
	}
	return t
}

// CacheSnapshot saves a snapshot under the request's key. The manifest is written only
// after every blob it references is stored, so a crash never leaves a
// manifest naming missing data. Blobs go to the local cache first (when
// Local), then the remote gets what it lacks; a remote that is down or
// goes down before the remote manifest is written does not fail the save:
// it completes locally, with a local manifest, and SaveResult.RemoteError
// says why nothing was published.
func (l *Loader) CacheSnapshot(ctx context.Context, req *SaveRequest) (res *SaveResult, err error) {
	ctx, span := telemetry.Start(ctx, "snaploader.save", attribute.Bool("remote_requested", req.Remote), attribute.Bool("local", req.Local))
	defer func() {
		if res != nil {
			t := res.Totals()
			span.SetAttributes(attribute.String("snapshot_id", res.SnapshotID), attribute.String("ref", res.Key.GetRef()),
				attribute.Bool("published_remote", res.PublishedRemote), attribute.Bool("published_local", res.PublishedLocal),
				attribute.Int("chunks_total", t.ChunksTotal), attribute.Int("chunks_written", t.ChunksWritten),
				attribute.Int64("bytes_written", t.BytesWritten), attribute.Int("remote_chunks_written", t.RemoteChunksWritten))
			if res.RemoteError != nil {
				span.SetAttributes(attribute.String("remote_error", res.RemoteError.Error()))
			}
		}
		telemetry.End(span, err)
	}()
	return l.cacheSnapshot(ctx, req)
}

func (l *Loader) cacheSnapshot(ctx context.Context, req *SaveRequest) (*SaveResult, error) {
	start := time.Now()
	if req.Key == nil {
		return nil, invalidf("write key is nil")
	}
	if !req.Local && !req.Remote {
		return nil, invalidf("saving %s: neither local nor remote storage requested", keyString(req.Key))
	}
	if req.Remote && (l.remote == nil || l.opts.RemoteReadOnly) {
		return nil, invalidf("saving %s remotely: no writable remote tier", keyString(req.Key))
	}
	fn, err := saveFunction(l.opts.Function, req.Chunked)
	if err != nil {
		return nil, fmt.Errorf("saving %s: %w", keyString(req.Key), err)
	}
	ns := l.ns(req.Key.GetInstanceName(), fn)
	res := &SaveResult{Key: req.Key}
	publish := req.Remote
	if req.Remote && !l.remoteUp() {
		if !req.Local {
			return nil, status.Errorf(codes.Unavailable, "saving %s remotely: the remote tier is down: %v", keyString(req.Key), cache.TierDown(l.remote))
		}
		publish = false
	}
	primary := cache.Cache(l.local)
	if !req.Local {
		primary = l.remote
	}

	md := &snapshotpb.VMMetadata{}
	if req.Metadata != nil {
		md = proto.Clone(req.Metadata).(*snapshotpb.VMMetadata)
	}
	md.SnapshotId = NewSnapshotID()
	md.SnapshotKey = req.Key
	md.DigestFunction = digest.FunctionName(fn)
	if md.CreatedTimestamp == nil {
		md.CreatedTimestamp = timestamppb.New(l.opts.Now())
	}
	if md.LastExecutedTask == nil {
		md.LastExecutedTask = &snapshotpb.VMTask{}
	}
	if md.LastExecutedTask.CompletedTimestamp == nil {
		md.LastExecutedTask.CompletedTimestamp = timestamppb.New(l.opts.Now())
	}
	md.LastExecutedTask.SnapshotId = md.SnapshotId
	md.WorkingSets = nil
	for _, s := range req.Chunked {
		if t := s.Touched(); len(t) > 0 {
			md.WorkingSets = append(md.WorkingSets, &snapshotpb.WorkingSet{FileName: s.Name(), Offsets: t[:min(len(t), MaxWorkingSetChunks)]})
		}
	}
	res.SnapshotID = md.SnapshotId
	m := &snapshotpb.SnapshotManifest{VmConfiguration: req.Config, VmMetadata: md}
	if m.VmConfiguration == nil {
		m.VmConfiguration = &snapshotpb.VMConfiguration{}
	}

	// Artifact files, in parallel.
	names := make([]string, 0, len(req.Files))
	for name := range req.Files {
		if err := ValidateName(name); err != nil {
			return nil, fmt.Errorf("saving %s: artifact file: %w", keyString(req.Key), err)
		}
		names = append(names, name)
	}
	sort.Strings(names)
	for _, s := range req.Chunked {
		if err := ValidateName(s.Name()); err != nil {
			return nil, fmt.Errorf("saving %s: chunked file: %w", keyString(req.Key), err)
		}
	}
	// Artifact files larger than the remote takes as one blob become
	// chunked files marked as artifacts (restores give back the file).
	asChunks, names, err := l.artifactsAsChunks(ctx, ns, req, names, publish)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, s := range asChunks {
			s.Close()
		}
	}()
	files := make([]*repb.OutputFile, len(names))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(l.opts.Parallelism)
	for i, name := range names {
		g.Go(func() error {
			d, err := storeFile(gctx, ns, req.Files[name], primary)
			if err != nil {
				return fmt.Errorf("storing artifact file %q: %w", name, err)
			}
			files[i] = &repb.OutputFile{Path: name, Digest: d}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, fmt.Errorf("saving %s: %w", keyString(req.Key), err)
	}
	m.Files = files
	for _, f := range files {
		res.ArtifactBytes += f.Digest.SizeBytes
	}

	// Chunked files: dirty chunks and the tree into the first tier.
	trees := map[string]*repb.Digest{}
	for i, s := range append(append([]*cow.Store{}, req.Chunked...), asChunks...) {
		artifact := i >= len(req.Chunked)
		if _, dup := trees[s.Name()]; dup || (!artifact && req.Files[s.Name()] != "") {
			return nil, invalidf("saving %s: duplicate file name %q", keyString(req.Key), s.Name())
		}
		cf, st, err := s.Save(ctx, primary)
		if err != nil {
			return nil, fmt.Errorf("saving %s: chunked file %q: %w", keyString(req.Key), s.Name(), err)
		}
		cf.Artifact = artifact
		fs := FileStats{Name: s.Name(), SaveStats: st}
		if !req.Local {
			fs.RemoteChunksWritten, fs.RemoteBytesWritten = st.ChunksWritten, st.BytesWritten
		}
		res.Files = append(res.Files, fs)
		tb, err := proto.MarshalOptions{Deterministic: true}.Marshal(ChunkedFileTree(cf))
		if err != nil {
			return nil, fmt.Errorf("encoding tree of %q: %w", s.Name(), err)
		}
		td := digest.Compute(fn, tb)
		if err := writeIfMissing(ctx, primary, ns, td, tb); err != nil {
			return nil, fmt.Errorf("saving %s: storing tree of %q: %w", keyString(req.Key), s.Name(), err)
		}
		trees[s.Name()] = td
		m.ChunkedFiles = append(m.ChunkedFiles, cf)
	}

	// The remote gets every blob its manifest names, clean chunks included;
	// what it lacks comes from the local cache.
	if publish {
		if err := l.publishBlobs(ctx, ns, m, trees, req.Local, res); err != nil {
			if !req.Local || !l.degraded(err) {
				return nil, fmt.Errorf("saving %s: uploading to the remote: %w", keyString(req.Key), err)
			}
			publish = false
		}
	}
	if !publish {
		// A local manifest must name only chunks a reader can get.
		for _, cf := range m.ChunkedFiles {
			if err := l.checkAvailable(ctx, ns, cf); err != nil {
				return nil, fmt.Errorf("saving %s: chunked file %q: %w", keyString(req.Key), cf.GetName(), err)
			}
		}
	}

	// The manifest, last.
	idKey := SnapshotIDKey(req.Key.GetInstanceName(), md.SnapshotId)
	keys := append([]*snapshotpb.SnapshotKey{req.Key, idKey}, req.AlsoKeys...)
	writeLocal := req.LocalManifest || (req.Remote && !publish)
	if publish {
		if err := l.writeManifests(ctx, true, ns, m, trees, keys, res); err != nil {
			if !req.Local || !l.degraded(err) {
				return nil, fmt.Errorf("saving %s: %w", keyString(req.Key), err)
			}
			publish, writeLocal = false, true
		} else if req.Local {
			l.repairRemote(ctx, ns, m, trees)
		}
	}
	if writeLocal {
		if err := l.writeManifests(ctx, false, ns, m, trees, keys, res); err != nil {
			return nil, fmt.Errorf("saving %s: %w", keyString(req.Key), err)
		}
	}
	res.PublishedRemote, res.PublishedLocal = publish, writeLocal
	if req.Remote && !publish {
		res.RemoteError = l.RemoteDown()
	}
	l.republishIfRaced(ctx, ns, m, trees, keys, res)
	res.Manifest = m
	res.Duration = time.Since(start)
	return res, nil
}

// artifactsAsChunks splits the artifact files among names that are larger
// than the remote's largest blob (Options.RemoteMaxBlobBytes, from its
// capabilities) into chunked stores in the local cache, and returns them
// with the names left to store whole. Only a save that publishes from the
// local cache does so; without a limit nothing changes.
func (l *Loader) artifactsAsChunks(ctx context.Context, ns cache.Namespace, req *SaveRequest, names []string, publish bool) ([]*cow.Store, []string, error) {
	limit := l.opts.RemoteMaxBlobBytes
	if !publish || !req.Local || limit <= 0 {
		return nil, names, nil
	}
	// Room for what a wrapping tier adds (encryption: 16 bytes per 64 KiB
	// and a header).
	limit -= limit/512 + cow.PageSize
	cs := min(cow.DefaultChunkSize, limit/cow.PageSize*cow.PageSize)
	if cs <= 0 {
		return nil, nil, invalidf("saving %s: the remote takes blobs of at most %d bytes, less than a page", keyString(req.Key), limit)
	}
	var stores []*cow.Store
	var whole []string
	for _, name := range names {
		fi, err := os.Stat(req.Files[name])
		if err != nil || fi.Size() <= limit {
			whole = append(whole, name)
			continue
		}
		s, _, err := cow.FromFile(ctx, name, req.Files[name], l.local, l.local, cow.Options{Namespace: ns, ChunkSize: cs, TempDir: l.local.TempDir()})
		if err != nil {
			for _, s := range stores {
				s.Close()
			}
			return nil, nil, fmt.Errorf("saving %s: artifact file %q of %d bytes, larger than the remote's %d-byte blob limit, as chunks: %w", keyString(req.Key), name, fi.Size(), limit, err)
		}
		l.opts.Logger.Info("artifact file larger than the remote's blob limit stored as chunks", "file", name, "bytes", fi.Size(), "limit", limit)
		stores = append(stores, s)
	}
	return stores, whole, nil
}

// saveFunction is the digest function a save uses: that of the stores'
// chunks (a restored snapshot keeps its function), else def.
func saveFunction(def digest.Function, stores []*cow.Store) (digest.Function, error) {
	fn := repb.DigestFunction_UNKNOWN
	for _, s := range stores {
		sf := s.Namespace().Function
		if sf == repb.DigestFunction_UNKNOWN {
			continue
		}
		if fn != repb.DigestFunction_UNKNOWN && sf != fn {
			return 0, invalidf("chunked files use different digest functions (%s and %s)", digest.FunctionName(fn), digest.FunctionName(sf))
		}
		fn = sf
	}
	if fn == repb.DigestFunction_UNKNOWN {
		return def, nil
	}
	return fn, nil
}

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
	ar, err := ManifestActionResult(m, trees)
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
		if err := c.UpdateActionResult(ctx, l.ns(k.GetInstanceName(), ns.Function), mk, ar); err != nil {
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

// storeFile hashes the file at path and stores it in tier t unless t has it.
func storeFile(ctx context.Context, ns cache.Namespace, path string, t cache.Cache) (*repb.Digest, error) {
	// A FIFO or device given as an artifact file must not hang the save.
	f, err := fileio.OpenRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	d, err := digest.ComputeReaderContext(ctx, ns.Function, f)
	if err != nil {
		return nil, fmt.Errorf("hashing %s: %w", path, err)
	}
	missing, err := t.FindMissing(ctx, ns, []*repb.Digest{d})
	if err != nil || len(missing) == 0 {
		return d, err
	}
	if _, err := f.Seek(0, 0); err != nil {
		return nil, err
	}
	if err := t.Write(ctx, ns, d, fileio.Reader(ctx, f)); err != nil {
		return nil, err
	}
	return d, nil
}

func writeIfMissing(ctx context.Context, c cache.Cache, ns cache.Namespace, d *repb.Digest, b []byte) error {
	missing, err := c.FindMissing(ctx, ns, []*repb.Digest{d})
	if err != nil || len(missing) == 0 {
		return err
	}
	return c.Write(ctx, ns, d, bytes.NewReader(b))
}

// copyMissing copies the blobs of all that dst lacks from src, with bounded
// parallelism; the first error cancels the rest.
func (l *Loader) copyMissing(ctx context.Context, ns cache.Namespace, all []*repb.Digest, src, dst cache.Cache) (int, int64, error) {
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
			write := dst.Write
			if src == cache.Cache(l.local) {
				write = func(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
					return cache.WriteVerified(ctx, dst, ns, d, r) // local reads verify
				}
			}
			if err := write(gctx, ns, d, rc); err != nil {
				return fmt.Errorf("writing blob %s: %w", digest.String(d), err)
			}
			mu.Lock()
			bytes += d.SizeBytes
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return 0, 0, err
	}
	return len(missing), bytes, nil
}

// checkAvailable makes sure a local manifest will name only chunks that a
// reader can get: each is in the local cache or, when there is a remote,
// there. A chunk in neither fails the save before any manifest is written.
func (l *Loader) checkAvailable(ctx context.Context, ns cache.Namespace, cf *snapshotpb.ChunkedFile) error {
	ds := make([]*repb.Digest, 0, len(cf.GetChunks()))
	for _, c := range cf.GetChunks() {
		ds = append(ds, c.GetDigest())
	}
	missing, err := l.local.FindMissing(ctx, ns, ds)
	if err != nil || len(missing) == 0 {
		return err
	}
	if l.remote != nil {
		if missing, err = l.remote.FindMissing(ctx, ns, missing); err != nil || len(missing) == 0 {
			return err
		}
	}
	m := &snapshotpb.SnapshotManifest{ChunkedFiles: []*snapshotpb.ChunkedFile{cf}}
	return status.Errorf(codes.NotFound, "%d chunks are in no cache any more, e.g. %s", len(missing), describeBlob(m, missing[0]))
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
