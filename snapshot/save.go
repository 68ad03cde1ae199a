package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sort"
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
	// ChunkedFiles are files to split into the local cache and save as
	// chunked files, before Chunked, in this order: a booted VM's memory
	// and disks. ChunkSize splits them (0: cow.DefaultChunkSize, or the
	// chunk size of the chunked files restored from, which a split file
	// need not share); Progress, when set, is told of every byte split.
	// The split's own stats are the files' FileStats.
	ChunkedFiles []NamedFile
	ChunkSize    int64
	Progress     func(n int64)
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
	// ArtifactsAsChunks names the artifact files stored as chunked files
	// (restored as the same files) because the remote takes no blob that
	// large: above its stated limit, or refused by it during this save.
	ArtifactsAsChunks []string
	Duration          time.Duration
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
	if len(req.ChunkedFiles) > 0 {
		split, stats, err := l.splitFiles(ctx, l.ns(req.Key.GetInstanceName(), fn), req)
		if err != nil {
			return nil, fmt.Errorf("saving %s: %w", keyString(req.Key), err)
		}
		defer func() {
			for _, s := range split {
				s.Close()
			}
		}()
		r := *req
		r.ChunkedFiles, r.Chunked = nil, append(split, req.Chunked...)
		res, err := l.cacheSnapshot(ctx, &r)
		if err != nil {
			return nil, err
		}
		// The split stored the chunks; the stores' own saves found them
		// clean.
		for i := range stats {
			res.Files[i].SaveStats = stats[i]
		}
		return res, nil
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
	primary := cache.Tier(l.local)
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
	// Large artifact files go to the remote now: one it refuses as too
	// large a blob is saved as chunks with the chunked files below.
	if publish && req.Local {
		var more []*cow.Store
		files, more, err = l.uploadLargeArtifacts(ctx, ns, req, files)
		asChunks = append(asChunks, more...)
		if err != nil {
			if !l.degraded(err) {
				return nil, fmt.Errorf("saving %s: uploading to the remote: %w", keyString(req.Key), err)
			}
			publish = false
		}
	}
	m.Files = files
	for _, f := range files {
		res.ArtifactBytes += f.Digest.SizeBytes
	}
	for _, s := range asChunks {
		res.ArtifactsAsChunks = append(res.ArtifactsAsChunks, s.Name())
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

// NamedFile is a file to save under a name.
type NamedFile struct{ Name, Path string }

// splitFiles splits req.ChunkedFiles into the local cache under ns.
func (l *Loader) splitFiles(ctx context.Context, ns cache.Namespace, req *SaveRequest) ([]*cow.Store, []cow.SaveStats, error) {
	var stores []*cow.Store
	var stats []cow.SaveStats
	for _, f := range req.ChunkedFiles {
		s, st, err := cow.FromFile(ctx, f.Name, f.Path, l.local, l.local, cow.Options{
			Namespace: ns, ChunkSize: req.ChunkSize, TempDir: l.local.TempDir(), Progress: req.Progress,
		})
		if err != nil {
			for _, s := range stores {
				s.Close()
			}
			return nil, nil, err // it names the file and the chunked file
		}
		stores = append(stores, s)
		stats = append(stats, st)
	}
	return stores, stats, nil
}
