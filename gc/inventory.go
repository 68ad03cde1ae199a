package gc

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/snapshot"
)

// Snapshot is one snapshot of a store, found through its manifest entries.
type Snapshot struct {
	// Scope is the partition (group, instance) of its entries.
	Scope      string
	SnapshotID string
	// Key is the snapshot key it was saved under (ref and version
	// included).
	Key      *snapshotpb.SnapshotKey
	Function digest.Function
	// Created is the completion time the manifest records.
	Created time.Time
	// IDEntry is its snapshot-id entry, and IDWritten when that was
	// written; nil when there is none.
	IDEntry   *Entry
	IDWritten time.Time
	// KeyEntries are the snapshot-key entries whose manifest it is (it is
	// the newest snapshot under each).
	KeyEntries []Entry
	// Invalidated says that it was saved under a version id that is no
	// longer its key's current one (the key was invalidated, or another
	// host's version won a race since): no up-to-date client is ever
	// given it again.
	Invalidated bool
	// Live says whether collection keeps it (SPEC §9): it is the newest
	// under some key, or its snapshot-id entry is younger than the
	// retention.
	Live bool

	manifest *snapshot.ManifestInfo
}

// Options configure a collection or an inventory.
type Options struct {
	// Retention is how long a snapshot-id manifest that is no longer the
	// newest under any key stays live; 0 means DefaultRetention.
	Retention time.Duration
	// Grace is the age below which an unreferenced blob is never deleted
	// (a save in progress may be about to name it); 0 means DefaultGrace.
	Grace time.Duration
	// DryRun deletes nothing and reports what a real run would delete.
	DryRun bool
	// Now is the collector's clock; nil means time.Now.
	Now func() time.Time
	// Parallelism bounds concurrent reads and age checks; 0 means 16.
	Parallelism int
	// BatchSize is the number of unreferenced old blobs checked and
	// deleted together; 0 means 1000.
	BatchSize int
	// BatchPause is waited between deletion batches (0: none).
	BatchPause time.Duration
	// OnDelete, when set, is called for every entry or blob deleted (or,
	// in a dry run, that would be), with its stored size.
	OnDelete func(kind Kind, id string, storedBytes int64)
	// Progress, when set, is called with the number of objects examined
	// so far.
	Progress func(examined int64)
	// Logger receives warnings (broken manifests); nil means slog.Default.
	Logger *slog.Logger
}

// Kind says what an object is.
type Kind string

// Kinds of objects.
const (
	KindEntry Kind = "entry"
	KindBlob  Kind = "blob"
)

// Defaults of Options.
const (
	DefaultRetention = 7 * 24 * time.Hour
	DefaultGrace     = time.Hour
)

func (o *Options) fill() {
	if o.Retention <= 0 {
		o.Retention = DefaultRetention
	}
	if o.Grace <= 0 {
		o.Grace = DefaultGrace
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Parallelism <= 0 {
		o.Parallelism = 16
	}
	if o.BatchSize <= 0 {
		o.BatchSize = 1000
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
}

// scan is what the action-cache entries of a store say.
type scan struct {
	snapshots []*Snapshot
	// kept are entries that are not manifests (version entries, foreign
	// action results): never deleted.
	kept []Entry
	// foreign are the blobs foreign entries name: never deleted.
	foreign keySet
	entries Counts
}

// scanEntries reads every action-cache entry and groups the manifests by
// snapshot. Entries that vanish meanwhile (another collection) are
// skipped; any other read failure stops the scan, since an entry not read
// could be the only one naming live blobs.
func scanEntries(ctx context.Context, st Store, opts *Options, progress func()) (*scan, error) {
	var all []Entry
	if err := st.ListEntries(ctx, func(e Entry) error {
		all = append(all, e)
		progress()
		return nil
	}); err != nil {
		return nil, fmt.Errorf("listing action-cache entries: %w", err)
	}
	type read struct {
		ar      *repb.ActionResult
		written time.Time
		ok      bool
	}
	reads := make([]read, len(all))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(opts.Parallelism)
	for i, e := range all {
		g.Go(func() error {
			ar, w, err := st.ReadEntry(gctx, e)
			switch {
			case cache.IsNotFound(err):
				return nil
			case cache.IsCorrupt(err):
				opts.Logger.Warn("undecodable action-cache entry kept as it is", "entry", e.ID, "err", err)
				ar = &repb.ActionResult{}
			case err != nil:
				return fmt.Errorf("reading action-cache entry %s: %w", e.ID, err)
			}
			reads[i] = read{ar: ar, written: w, ok: true}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	sc := &scan{}
	byID := map[[2]string]*Snapshot{}
	// versions are the version ids of the version entries, by scope and
	// entry hash.
	versions := map[[2]string]string{}
	for i, e := range all {
		r := reads[i]
		if !r.ok {
			continue
		}
		sc.entries.Examined++
		sc.entries.ExaminedBytes += e.Size
		m, err := snapshot.DecodeManifestEntry(r.ar)
		if err != nil {
			if cache.IsCorrupt(err) {
				opts.Logger.Warn("corrupt manifest kept as it is; its blobs are not kept for it", "entry", e.ID, "err", err)
			}
			sc.kept = append(sc.kept, e)
			markForeign(&sc.foreign, r.ar)
			if v, _ := snapshot.VersionOfEntry(r.ar); v != "" {
				versions[[2]string{e.Scope, e.Hash}] = v
			}
			continue
		}
		md := m.Metadata
		id := md.GetSnapshotId()
		s := byID[[2]string{e.Scope, id}]
		if s == nil {
			s = &Snapshot{Scope: e.Scope, SnapshotID: id, Key: md.GetSnapshotKey(), Function: m.Function,
				Created: md.GetLastExecutedTask().GetCompletedTimestamp().AsTime(), manifest: m}
			byID[[2]string{e.Scope, id}] = s
			sc.snapshots = append(sc.snapshots, s)
		}
		idKey, err := snapshot.RemoteSnapshotIDManifestKey(md.GetSnapshotKey().GetInstanceName(), id)
		if err == nil && idKey.GetHash() == e.Hash {
			e := e
			s.IDEntry, s.IDWritten = &e, r.written
		} else {
			s.KeyEntries = append(s.KeyEntries, e)
		}
	}
	sc.foreign.freeze()
	for _, s := range sc.snapshots {
		cur, ok := versions[[2]string{s.Scope, snapshot.VersionKey(s.Key).GetHash()}]
		s.Invalidated = ok && s.Key.GetVersionId() != cur
	}
	sort.Slice(sc.snapshots, func(i, j int) bool {
		a, b := sc.snapshots[i], sc.snapshots[j]
		if !a.Created.Equal(b.Created) {
			return a.Created.Before(b.Created)
		}
		return a.SnapshotID < b.SnapshotID
	})
	return sc, nil
}

// decide sets every snapshot's Live as of now.
func (sc *scan) decide(now time.Time, retention time.Duration) {
	for _, s := range sc.snapshots {
		s.Live = len(s.KeyEntries) > 0 || (s.IDEntry != nil && now.Sub(s.IDWritten) < retention)
	}
}

// markForeign adds the blobs an action result that is not a manifest names
// (outputs, logs, trees), so that collecting a bucket shared with other
// action-cache users never deletes theirs. Their trees' contents are not
// read: such a bucket should not be collected by this tool.
func markForeign(set *keySet, ar *repb.ActionResult) {
	for _, fn := range []digest.Function{digest.BLAKE3, digest.SHA256} {
		add := func(d *repb.Digest) {
			if k, ok := keyOf(fn, d); ok {
				set.add(k)
			}
		}
		for _, f := range ar.GetOutputFiles() {
			add(f.GetDigest())
		}
		for _, d := range ar.GetOutputDirectories() {
			add(d.GetTreeDigest())
		}
		if ar.GetStdoutDigest() != nil {
			add(ar.GetStdoutDigest())
		}
		if ar.GetStderrDigest() != nil {
			add(ar.GetStderrDigest())
		}
	}
}

// fileBlobs are the blobs one snapshot names and its logical size.
type fileBlobs struct {
	keys    []blobKey
	chunks  []blobKey // the chunks alone, for sharing ratios
	logical int64
	broken  bool // a tree is missing or corrupt: the snapshot cannot restore
}

// blobsOf lists the blobs s names: artifact files, trees, and the chunks
// (with their outboards) the trees list. A tree that is missing or corrupt makes the snapshot broken
// (it can no longer restore, so its chunks need not be kept); any other
// read failure is an error.
func blobsOf(ctx context.Context, st Store, s *Snapshot, log *slog.Logger) (*fileBlobs, error) {
	m := s.manifest
	fb := &fileBlobs{}
	add := func(d *repb.Digest, chunk bool) {
		if k, ok := keyOf(m.Function, d); ok {
			fb.keys = append(fb.keys, k)
			if chunk {
				fb.chunks = append(fb.chunks, k)
			}
		}
	}
	for _, f := range m.Files {
		add(f.GetDigest(), false)
		fb.logical += f.GetDigest().GetSizeBytes()
	}
	for _, t := range m.Trees {
		add(t.GetTreeDigest(), false)
		b, err := readBlob(ctx, st, m.Function, t.GetTreeDigest())
		var cf *snapshotpb.ChunkedFile
		if err == nil {
			cf, err = snapshot.DecodeTree(t.GetPath(), b)
		}
		if err != nil {
			if cache.IsNotFound(err) || cache.IsCorrupt(err) || status.Code(err) == codes.InvalidArgument {
				log.Warn("snapshot has a missing or corrupt tree; it can no longer be restored",
					"snapshot_id", s.SnapshotID, "file", t.GetPath(), "tree", digest.String(t.GetTreeDigest()), "err", err)
				fb.broken = true
				continue
			}
			return nil, fmt.Errorf("reading tree %s of chunked file %q of snapshot %s: %w", digest.String(t.GetTreeDigest()), t.GetPath(), s.SnapshotID, err)
		}
		fb.logical += cf.GetSize()
		for _, c := range cf.GetChunks() {
			add(c.GetDigest(), true)
			if o := c.GetOutboard(); o != nil {
				add(o, false) // the chunk's verified-streaming outboard
			}
		}
	}
	return fb, nil
}

func readBlob(ctx context.Context, st Store, fn digest.Function, d *repb.Digest) ([]byte, error) {
	rc, err := st.ReadBlob(ctx, fn, d)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, d.GetSizeBytes()+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) != d.GetSizeBytes() {
		return nil, cache.Corruptf("blob %s has %d bytes", digest.String(d), len(b))
	}
	return b, nil
}

// forEachBlobs calls fn with the blobs of every snapshot in ss, reading
// trees in parallel; fn is called from one goroutine at a time.
func forEachBlobs(ctx context.Context, st Store, ss []*Snapshot, opts *Options, fn func(*Snapshot, *fileBlobs)) error {
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(opts.Parallelism)
	for _, s := range ss {
		g.Go(func() error {
			fb, err := blobsOf(gctx, st, s, opts.Logger)
			if err != nil {
				return err
			}
			mu.Lock()
			defer mu.Unlock()
			fn(s, fb)
			return nil
		})
	}
	return g.Wait()
}

// Listing is one snapshot of an inventory.
type Listing struct {
	Snapshot *Snapshot
	// LogicalBytes is the size of its files (chunked files at full size).
	LogicalBytes int64
	// StoredBytes is what its blobs occupy at rest (compressed or raw),
	// each blob once.
	StoredBytes int64
	// Blobs counts its distinct blobs, Missing those not in the store.
	Blobs, Missing int
	// Broken is true when a tree is missing or corrupt.
	Broken bool
	// PreviousID is the snapshot saved before it under the same key
	// (empty for the first), and SharedChunks the fraction of its chunks
	// that snapshot has too.
	PreviousID   string
	SharedChunks float64
}

// Inventory sums up an inventory.
type Inventory struct {
	Snapshots []Listing
	// LiveStoredBytes is what the blobs of live snapshots occupy, each
	// once: what a collection keeps as live.
	LiveStoredBytes int64
	// ReferencedStoredBytes is what the blobs of every snapshot occupy,
	// each once.
	ReferencedStoredBytes int64
	// StoredBytes and Blobs are the whole blob store's.
	StoredBytes int64
	Blobs       int64
}

// List takes the inventory of a store: every snapshot (oldest first) with
// its sizes, liveness under opts.Retention, and the chunks it shares with
// the snapshot saved before it under the same key.
func List(ctx context.Context, st Store, opts Options) (*Inventory, error) {
	opts.fill()
	sc, err := scanEntries(ctx, st, &opts, func() {})
	if err != nil {
		return nil, err
	}
	sc.decide(opts.Now(), opts.Retention)
	blobs := make(map[*Snapshot]*fileBlobs, len(sc.snapshots))
	var all keySet
	if err := forEachBlobs(ctx, st, sc.snapshots, &opts, func(s *Snapshot, fb *fileBlobs) {
		sortKeys(&fb.keys)
		sortKeys(&fb.chunks)
		blobs[s] = fb
		for _, k := range fb.keys {
			all.add(k)
		}
	}); err != nil {
		return nil, err
	}
	all.freeze()
	stored := make([]int64, all.len())
	for i := range stored {
		stored[i] = -1
	}
	inv := &Inventory{}
	if err := st.ListBlobs(ctx, func(b Blob) error {
		inv.Blobs++
		inv.StoredBytes += b.StoredSize
		if k, ok := keyOf(b.Function, b.Digest); ok {
			if i := all.index(k); i >= 0 {
				stored[i] = b.StoredSize
			}
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("listing blobs: %w", err)
	}
	live := make([]bool, all.len())
	counted := make([]bool, all.len())
	prev := map[string]*fileBlobs{}
	prevID := map[string]string{}
	for _, s := range sc.snapshots {
		fb := blobs[s]
		l := Listing{Snapshot: s, LogicalBytes: fb.logical, Blobs: len(fb.keys), Broken: fb.broken}
		for _, k := range fb.keys {
			i := all.index(k)
			if stored[i] < 0 {
				l.Missing++
				continue
			}
			l.StoredBytes += stored[i]
			if !counted[i] {
				counted[i] = true
				inv.ReferencedStoredBytes += stored[i]
			}
			if s.Live && !live[i] {
				live[i] = true
				inv.LiveStoredBytes += stored[i]
			}
		}
		kh, err := snapshot.KeyHash(s.Key)
		if err != nil {
			kh = ""
		}
		kh = s.Scope + "/" + kh
		if p := prev[kh]; p != nil {
			l.PreviousID = prevID[kh]
			l.SharedChunks = sharedFraction(fb.chunks, p.chunks)
		}
		prev[kh], prevID[kh] = fb, s.SnapshotID
		inv.Snapshots = append(inv.Snapshots, l)
	}
	return inv, nil
}

func sortKeys(ks *[]blobKey) {
	s := keySet{keys: *ks}
	s.freeze()
	*ks = s.keys
}

// sharedFraction is the fraction of the sorted keys a also in sorted b.
func sharedFraction(a, b []blobKey) float64 {
	if len(a) == 0 {
		return 0
	}
	n, j := 0, 0
	for _, k := range a {
		for j < len(b) && compareKeys(b[j], k) < 0 {
			j++
		}
		if j < len(b) && b[j] == k {
			n++
		}
	}
	return float64(n) / float64(len(a))
}
