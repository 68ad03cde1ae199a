package snapshot

import (
	"context"
	"time"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
)

// Listing describes one manifest in the local cache.
type Listing struct {
	SnapshotID   string
	Ref          string
	Instance     string
	Files        int
	ChunkedFiles int
	// Bytes is the logical size of every file of the snapshot (chunked
	// files whose tree is not in the local cache count as 0).
	Bytes     int64
	Completed time.Time
}

// ListLocal lists the distinct snapshots whose manifests the local cache
// holds for group (a snapshot is stored under its key and its id).
func ListLocal(ctx context.Context, local *localcache.Cache, group string) ([]Listing, error) {
	entries, err := local.ListActionResults(ctx, group)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []Listing
	for _, e := range entries {
		dm, err := decodeManifest(e.Result)
		if err != nil {
			continue // version entries and foreign results
		}
		id := dm.metadata.GetSnapshotId()
		if seen[id] {
			continue
		}
		seen[id] = true
		l := Listing{
			SnapshotID:   id,
			Ref:          dm.metadata.GetSnapshotKey().GetRef(),
			Instance:     dm.metadata.GetSnapshotKey().GetInstanceName(),
			Files:        len(dm.files),
			ChunkedFiles: len(dm.trees),
			Completed:    dm.metadata.GetLastExecutedTask().GetCompletedTimestamp().AsTime(),
		}
		for _, f := range dm.files {
			l.Bytes += f.GetDigest().GetSizeBytes()
		}
		ns := cache.Namespace{Group: group, Instance: e.Namespace.Instance, Function: dm.function}
		for _, d := range dm.trees {
			if b, err := cache.ReadAll(ctx, local, ns, d.GetTreeDigest()); err == nil {
				if cf, err := decodeTree(d.GetPath(), b); err == nil {
					l.Bytes += cf.GetSize()
				}
			}
		}
		out = append(out, l)
	}
	return out, nil
}
