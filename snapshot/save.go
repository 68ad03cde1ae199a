package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
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
	Duration        time.Duration
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

// CacheSnapshot saves a snapshot (SPEC §4). The manifest is written only
// after every blob it references is stored, so a crash never leaves a
// manifest naming missing data.
func (l *Loader) CacheSnapshot(ctx context.Context, req *SaveRequest) (*SaveResult, error) {
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
	fn := l.opts.Function
	ns := l.ns(req.Key.GetInstanceName(), fn)
	var tiers []cache.Cache
	if req.Local {
		tiers = append(tiers, l.local)
	}
	if req.Remote {
		tiers = append(tiers, l.remote)
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
	res := &SaveResult{SnapshotID: md.SnapshotId, Key: req.Key}
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
	files := make([]*repb.OutputFile, len(names))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(l.opts.Parallelism)
	for i, name := range names {
		g.Go(func() error {
			d, err := storeFile(gctx, ns, req.Files[name], tiers)
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

	// Chunked files: dirty chunks into the first tier, then whatever the
	// other tier lacks.
	trees := map[string]*repb.Digest{}
	for _, s := range req.Chunked {
		if err := ValidateName(s.Name()); err != nil {
			return nil, fmt.Errorf("saving %s: chunked file: %w", keyString(req.Key), err)
		}
		if _, dup := trees[s.Name()]; dup || req.Files[s.Name()] != "" {
			return nil, invalidf("saving %s: duplicate file name %q", keyString(req.Key), s.Name())
		}
		cf, st, err := s.Save(ctx, tiers[0])
		if err != nil {
			return nil, fmt.Errorf("saving %s: chunked file %q: %w", keyString(req.Key), s.Name(), err)
		}
		fs := FileStats{Name: s.Name(), SaveStats: st}
		if req.Remote {
			// The remote must hold every chunk its manifest names, clean
			// ones included; what it lacks comes from the local cache.
			n, b, err := l.copyMissing(ctx, ns, cf, l.local, l.remote)
			if err != nil {
				return nil, fmt.Errorf("saving %s: uploading chunked file %q: %w", keyString(req.Key), s.Name(), err)
			}
			fs.RemoteChunksWritten, fs.RemoteBytesWritten = n, b
			if !req.Local {
				fs.RemoteChunksWritten += st.ChunksWritten
				fs.RemoteBytesWritten += st.BytesWritten
			}
		} else if err := l.checkAvailable(ctx, ns, cf); err != nil {
			return nil, fmt.Errorf("saving %s: chunked file %q: %w", keyString(req.Key), s.Name(), err)
		}
		res.Files = append(res.Files, fs)
		tb, err := proto.MarshalOptions{Deterministic: true}.Marshal(ChunkedFileTree(cf))
		if err != nil {
			return nil, fmt.Errorf("encoding tree of %q: %w", s.Name(), err)
		}
		td := digest.Compute(fn, tb)
		for _, t := range tiers {
			if err := writeIfMissing(ctx, t, ns, td, tb); err != nil {
				return nil, fmt.Errorf("saving %s: storing tree of %q: %w", keyString(req.Key), s.Name(), err)
			}
		}
		trees[s.Name()] = td
		m.ChunkedFiles = append(m.ChunkedFiles, cf)
	}

	// The manifest, last.
	ar, err := ManifestActionResult(m, trees)
	if err != nil {
		return nil, err
	}
	idKey := SnapshotIDKey(req.Key.GetInstanceName(), md.SnapshotId)
	keys := append([]*snapshotpb.SnapshotKey{req.Key, idKey}, req.AlsoKeys...)
	if req.Remote {
		for _, k := range keys {
			mk, err := RemoteManifestKey(k)
			if err != nil {
				return nil, err
			}
			if err := l.remote.UpdateActionResult(ctx, ns, mk, ar); err != nil {
				return nil, fmt.Errorf("saving %s: writing remote manifest: %w", keyString(k), err)
			}
			if k == req.Key {
				res.ManifestKey = mk
			}
		}
		res.PublishedRemote = true
	}
	if req.LocalManifest {
		for _, k := range keys {
			mk, err := LocalManifestKey(l.opts.Group, k)
			if err != nil {
				return nil, err
			}
			if err := l.local.UpdateActionResult(ctx, ns, mk, ar); err != nil {
				return nil, fmt.Errorf("saving %s: writing local manifest: %w", keyString(k), err)
			}
			if k == req.Key {
				res.ManifestKey = mk
			}
		}
		res.PublishedLocal = true
	}
	res.Manifest = m
	res.Duration = time.Since(start)
	return res, nil
}

// storeFile hashes the file at path and stores it in every tier lacking it.
func storeFile(ctx context.Context, ns cache.Namespace, path string, tiers []cache.Cache) (*repb.Digest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "opening %s: %v", path, err)
	}
	defer f.Close()
	d, err := digest.ComputeReader(ns.Function, f)
	if err != nil {
		return nil, fmt.Errorf("hashing %s: %w", path, err)
	}
	for _, t := range tiers {
		missing, err := t.FindMissing(ctx, ns, []*repb.Digest{d})
		if err != nil {
			return nil, err
		}
		if len(missing) == 0 {
			continue
		}
		if _, err := f.Seek(0, 0); err != nil {
			return nil, err
		}
		if err := t.Write(ctx, ns, d, f); err != nil {
			return nil, err
		}
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

// copyMissing copies the chunks of cf that dst lacks from src, with bounded
// parallelism; the first error cancels the rest.
func (l *Loader) copyMissing(ctx context.Context, ns cache.Namespace, cf *snapshotpb.ChunkedFile, src, dst cache.Cache) (int, int64, error) {
	ds := make([]*repb.Digest, 0, len(cf.GetChunks()))
	seen := map[string]bool{}
	for _, c := range cf.GetChunks() {
		if !seen[c.GetDigest().GetHash()] {
			seen[c.GetDigest().GetHash()] = true
			ds = append(ds, c.GetDigest())
		}
	}
	missing, err := dst.FindMissing(ctx, ns, ds)
	if err != nil {
		return 0, 0, fmt.Errorf("finding missing chunks: %w", err)
	}
	var mu sync.Mutex
	var bytes int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(l.opts.Parallelism)
	for _, d := range missing {
		g.Go(func() error {
			rc, err := src.Read(gctx, ns, d)
			if err != nil {
				return fmt.Errorf("reading chunk %s: %w", digest.String(d), err)
			}
			defer rc.Close()
			if err := dst.Write(gctx, ns, d, rc); err != nil {
				return fmt.Errorf("writing chunk %s: %w", digest.String(d), err)
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

// ShouldPublishRemote applies the remote save policy (SPEC §4): runs on
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
