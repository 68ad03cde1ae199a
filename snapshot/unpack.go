package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"go.opentelemetry.io/otel/attribute"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/telemetry"
)

// UnpackOptions configure UnpackSnapshot.
type UnpackOptions struct {
	// ReadAhead is how many following chunks a touch schedules for
	// background fetch (0 = the store's default, negative = off).
	ReadAhead int
	// PrefetchWorkingSet prefetches the chunks the VM touched after its
	// previous restore, recorded in the manifest. A file with a recorded
	// working set then gets no blind read-ahead unless ReadAhead asks for
	// it explicitly: on a restored QEMU guest the working set alone reached
	// the guest's first output sooner and fetched a quarter fewer bytes.
	PrefetchWorkingSet bool
	// OnFetch, when set, observes every chunk opened from a tier (see
	// cow.Options.OnFetch).
	OnFetch func(cow.FetchEvent)
	// Replace lets dir hold entries already: files named like the
	// snapshot's are replaced, every other entry is left as it is and
	// listed in Unpacked.Others. Without it, a dir that holds any entry
	// (besides the temporary files of snaploader's own writes) is refused
	// before anything is written, with a *DirNotEmptyError.
	Replace bool
}

// Unpacked is a restored snapshot: artifact files on disk and a lazy
// copy-on-write store per chunked file.
type Unpacked struct {
	Dir string
	// Files maps artifact file names to their paths in Dir.
	Files map[string]string
	// Stores maps chunked file names to their lazy stores.
	Stores map[string]*cow.Store
	// Others lists, sorted, the entries Dir held that are not the
	// snapshot's files, left as they were (only UnpackOptions.Replace lets
	// there be any). Temporary files of snaploader's own writes are not
	// listed.
	Others []string

	release func()
}

// Close closes every store and releases the blobs pinned for them.
func (u *Unpacked) Close() error {
	var first error
	for _, s := range u.Stores {
		if err := s.Close(); err != nil && first == nil {
			first = err
		}
	}
	if u.release != nil {
		u.release()
	}
	return first
}

// DirNotEmptyError is the refusal of a directory that already holds
// entries, by UnpackSnapshot without UnpackOptions.Replace and by
// CheckUnpackDir. Its gRPC code is FailedPrecondition.
type DirNotEmptyError struct {
	Dir string
	// Entries are the names Dir holds, sorted; snaploader's own temporary
	// files are not counted.
	Entries []string
}

func (e *DirNotEmptyError) Error() string {
	what := "entries"
	if len(e.Entries) == 1 {
		what = "entry"
	}
	return fmt.Sprintf("%s already holds %d %s: %s", e.Dir, len(e.Entries), what, fileio.NameList(e.Entries, 5))
}

// GRPCStatus gives the error its code.
func (e *DirNotEmptyError) GRPCStatus() *status.Status {
	return status.New(codes.FailedPrecondition, e.Error())
}

// CheckUnpackDir checks, writing nothing, that dir can receive an unpack:
// it does not exist (an unpack creates it, parents included), or it is a
// directory holding no entry besides the temporary files of snaploader's
// own writes, or, when replace is set, any directory. A dir that names
// something other than a directory, or lies under one, is InvalidArgument;
// a directory holding entries without replace is a *DirNotEmptyError. It
// returns the entries dir holds, sorted, those temporary files left out.
func CheckUnpackDir(dir string, replace bool) ([]string, error) {
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if _, lerr := os.Lstat(dir); lerr == nil {
			return nil, status.Errorf(codes.InvalidArgument, "%s is a symbolic link to nothing, not a directory", dir)
		}
		return nil, nil
	case errors.Is(err, syscall.ENOTDIR):
		return nil, status.Errorf(codes.InvalidArgument, "%s: a parent of it is not a directory", dir)
	case err != nil:
		return nil, fmt.Errorf("checking %s: %w", dir, err)
	case !fi.IsDir():
		kind := "not a directory"
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			kind = fileio.Kind(st.Mode)
		}
		return nil, status.Errorf(codes.InvalidArgument, "%s is %s, not a directory", dir, kind)
	}
	entries, err := fileio.UserEntries(dir)
	if err != nil {
		return nil, err
	}
	if len(entries) > 0 && !replace {
		return nil, &DirNotEmptyError{Dir: dir, Entries: entries}
	}
	return entries, nil
}

// UnpackSnapshot writes snap's artifact files into dir and opens a lazy
// store per chunked file; no chunk is read until touched. Every blob of
// the snapshot stays pinned in the local cache until Close. dir must not
// exist or be an empty directory unless opts.Replace (see
// CheckUnpackDir); it is checked before anything is written.
func (l *Loader) UnpackSnapshot(ctx context.Context, snap *Snapshot, dir string, opts UnpackOptions) (_ *Unpacked, err error) {
	ctx, span := telemetry.Start(ctx, "snaploader.unpack", attribute.String("snapshot_id", snap.Manifest.GetVmMetadata().GetSnapshotId()),
		attribute.Int("files", len(snap.Manifest.GetFiles())), attribute.Int("chunked_files", len(snap.Manifest.GetChunkedFiles())))
	defer func() { telemetry.End(span, err) }()
	m := snap.Manifest
	entries, err := CheckUnpackDir(dir, opts.Replace)
	if err != nil {
		return nil, fmt.Errorf("unpacking snapshot %s: %w", m.GetVmMetadata().GetSnapshotId(), err)
	}
	own := snapshotNames(m)
	others := []string{}
	for _, e := range entries {
		if !own[e] {
			others = append(others, e)
		}
	}
	ns := l.ns(snap.Key.GetInstanceName(), snap.Function)
	var all []*repb.Digest
	for _, f := range m.GetFiles() {
		all = append(all, f.GetDigest())
	}
	for _, cf := range m.GetChunkedFiles() {
		for _, c := range cf.GetChunks() {
			all = append(all, c.GetDigest())
		}
	}
	u := &Unpacked{Dir: dir, Files: map[string]string{}, Stores: map[string]*cow.Store{}, Others: others, release: l.local.Pin(ns, all)}
	fail := func(err error) (*Unpacked, error) {
		u.Close()
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fail(fmt.Errorf("unpacking snapshot %s: %w", snap.Manifest.GetVmMetadata().GetSnapshotId(), err))
	}
	l.removeStaleTemps(dir, m)
	for _, f := range m.GetFiles() {
		if err := ValidateName(f.GetPath()); err != nil {
			return fail(err)
		}
	}
	src := cache.NewReadThrough(l.local, l.remote)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(l.opts.Parallelism)
	paths := make([]string, len(m.GetFiles()))
	for i, f := range m.GetFiles() {
		paths[i] = filepath.Join(dir, f.GetPath())
		g.Go(func() error {
			if err := copyBlob(gctx, src, ns, f.GetDigest(), paths[i]); err != nil {
				return fmt.Errorf("unpacking artifact file %q: %w", f.GetPath(), err)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return fail(err)
	}
	for i, f := range m.GetFiles() {
		u.Files[f.GetPath()] = paths[i]
	}
	ws := map[string][]int64{}
	for _, w := range m.GetVmMetadata().GetWorkingSets() {
		ws[w.GetFileName()] = w.GetOffsets()
	}
	for _, cf := range m.GetChunkedFiles() {
		readAhead := opts.ReadAhead
		if opts.PrefetchWorkingSet && len(ws[cf.GetName()]) > 0 && readAhead == 0 {
			readAhead = -1
		}
		s, err := cow.Open(cf.GetName(), cf, src, cow.Options{
			Namespace: ns,
			ChunkSize: cf.GetChunkSize(),
			ReadAhead: readAhead,
			TempDir:   l.local.TempDir(),
			Parent:    ctx,
			OnFetch:   opts.OnFetch,
		})
		if err != nil {
			return fail(fmt.Errorf("opening chunked file %q: %w", cf.GetName(), err))
		}
		if cf.GetArtifact() {
			// An artifact file stored as chunks is given back as a file.
			path := filepath.Join(dir, cf.GetName())
			err := WriteStore(ctx, s, path, nil)
			s.Close()
			if err != nil {
				return fail(fmt.Errorf("unpacking artifact file %q (stored as chunks): %w", cf.GetName(), err))
			}
			u.Files[cf.GetName()] = path
			continue
		}
		u.Stores[cf.GetName()] = s
		if opts.PrefetchWorkingSet && len(ws[cf.GetName()]) > 0 {
			s.Prefetch(ctx, ws[cf.GetName()])
		}
	}
	return u, nil
}

// removeStaleTemps removes the temporary files that an unpack or restore
// killed while writing into dir left behind: those no live process holds
// locked. Names the manifest lists are never removed. Failures are logged,
// not fatal: a stale file only costs space.
func (l *Loader) removeStaleTemps(dir string, m *snapshotpb.SnapshotManifest) {
	removed, err := fileio.RemoveStaleTemps(dir, snapshotNames(m))
	if err != nil {
		l.opts.Logger.Warn("removing stale temporary files", "dir", dir, "err", err)
	}
	if len(removed) > 0 {
		l.opts.Logger.Debug("removed stale temporary files", "dir", dir, "files", removed)
	}
}

// snapshotNames is the set of file names m gives its files in a
// directory it is unpacked into.
func snapshotNames(m *snapshotpb.SnapshotManifest) map[string]bool {
	names := map[string]bool{}
	for _, f := range m.GetFiles() {
		names[f.GetPath()] = true
	}
	for _, cf := range m.GetChunkedFiles() {
		names[cf.GetName()] = true
	}
	return names
}

// copyBlob writes a blob to path atomically (temp file + rename).
func copyBlob(ctx context.Context, src *cache.ReadThrough, ns cache.Namespace, d *repb.Digest, path string) error {
	b, err := src.Open(ctx, ns, d)
	if err != nil {
		return err
	}
	defer b.Close()
	// Locked while written, so that a killed unpack's file is recognised
	// as stale by the next one (removeStaleTemps).
	tmp, err := fileio.CreateTemp(filepath.Dir(path))
	if err != nil {
		return errkind.IO(err, "unpacking blob %s to %s", digest.String(d), path)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if _, err := io.Copy(tmp, io.NewSectionReader(b, 0, b.Size())); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
