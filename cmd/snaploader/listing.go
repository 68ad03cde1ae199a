package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/proto/inventorypb"
	"github.com/snaploader/snaploader/snapshot"
)

// localListing is the local cache as a store to list: gc.LocalCache, with
// each snapshot-id manifest entry named as the remote names it, so that
// the listing tells a snapshot's id entry from the entries of its keys
// (the local cache keys its manifests by group too).
func localListing(c *localcache.Cache, group string) gc.Store {
	return &localIDs{Store: gc.LocalCache(c, group), group: group}
}

type localIDs struct {
	gc.Store
	group string
}

func (s *localIDs) ListEntries(ctx context.Context, fn func(gc.Entry) error) error {
	var all []gc.Entry
	if err := s.Store.ListEntries(ctx, func(e gc.Entry) error {
		all = append(all, e)
		return nil
	}); err != nil {
		return err
	}
	for _, e := range all {
		if ar, _, err := s.Store.ReadEntry(ctx, e); err == nil {
			if m, err := snapshot.DecodeManifestEntry(ar); err == nil {
				inst, id := m.Metadata.GetSnapshotKey().GetInstanceName(), m.Metadata.GetSnapshotId()
				lk, err1 := snapshot.LocalManifestKey(s.group, snapshot.SnapshotIDKey(inst, id))
				rk, err2 := snapshot.RemoteSnapshotIDManifestKey(inst, id)
				if err1 == nil && err2 == nil && lk.GetHash() == e.Hash {
					e.Hash = rk.GetHash()
				}
			}
		}
		if err := fn(e); err != nil {
			return err
		}
	}
	return nil
}

// lsRow is one snapshot of ls --json, local or remote alike: a gc.Row
// (same fields, same order) with its JSON names. Every field is always
// present; shared_chunks_with_previous is null for the first snapshot of
// a key.
type lsRow struct {
	Instance          string    `json:"instance"`
	Scope             string    `json:"scope"`
	PlatformHash      string    `json:"platform_hash"`
	ConfigurationHash string    `json:"configuration_hash"`
	Runner            string    `json:"runner"`
	VersionID         string    `json:"version_id"`
	Ref               string    `json:"ref"`
	SnapshotID        string    `json:"snapshot_id"`
	DigestFunction    string    `json:"digest_function"`
	Completed         time.Time `json:"completed"`
	AgeSeconds        int64     `json:"age_seconds"`
	// State is newest, invalidated, retained, expired or broken.
	State        string   `json:"state"`
	Newest       bool     `json:"newest"`
	Live         bool     `json:"live"`
	Broken       bool     `json:"broken"`
	Invalidated  bool     `json:"invalidated"`
	LogicalBytes int64    `json:"logical_bytes"`
	StoredBytes  int64    `json:"stored_bytes"`
	Blobs        int      `json:"blobs"`
	MissingBlobs int      `json:"missing_blobs"`
	PreviousID   string   `json:"previous_snapshot_id"`
	SharedChunks *float64 `json:"shared_chunks_with_previous"`
}

// listing is the --json output of ls, local or remote alike.
type listing struct {
	// Store is "local" or "remote"; Location the cache directory or the
	// remote's URL.
	Store     string  `json:"store"`
	Location  string  `json:"location"`
	Snapshots []lsRow `json:"snapshots"`
	// LiveStoredBytes is what the blobs of live snapshots occupy, each
	// once; ReferencedStoredBytes what the blobs of every snapshot occupy;
	// StoredBytes and Blobs the whole blob store's.
	LiveStoredBytes       int64 `json:"live_stored_bytes"`
	ReferencedStoredBytes int64 `json:"referenced_stored_bytes"`
	StoredBytes           int64 `json:"stored_bytes"`
	Blobs                 int64 `json:"blobs"`
}

// printListing prints ls's table (or JSON) on out; store names the blob store in
// the totals line.
func printListing(out io.Writer, lt *listing, asJSON bool, store string) error {
	if asJSON {
		return printJSON(out, lt)
	}
	rows := lt.Snapshots
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "INSTANCE\tPLATFORM\tCONFIG\tRUNNER\tVERSION\tREF\tSNAPSHOT\tAGE\tLOGICAL\tSTORED\tSHARED\tSTATE")
	for _, r := range rows {
		shared := "-"
		if r.SharedChunks != nil {
			shared = fmt.Sprintf("%.0f%%", 100**r.SharedChunks)
		}
		fmt.Fprintf(w, "%s\t%.12s\t%.12s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Instance, r.PlatformHash, r.ConfigurationHash, r.Runner,
			r.VersionID, r.Ref, r.SnapshotID, (time.Duration(r.AgeSeconds) * time.Second).String(), humanBytes(r.LogicalBytes), humanBytes(r.StoredBytes), shared, r.State)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(out, "%d snapshots; stored, each blob once: %s for live snapshots, %s for all; %s: %d, %s\n",
		len(rows), humanBytes(lt.LiveStoredBytes), humanBytes(lt.ReferencedStoredBytes), store, lt.Blobs, humanBytes(lt.StoredBytes))
	return nil
}

func isREAPI(url string) bool {
	return strings.HasPrefix(url, "grpc://") || strings.HasPrefix(url, "grpcs://") || strings.HasPrefix(url, "unix://")
}

// listingOfServer is the ls listing of an inventory in the listing
// service's form, ages as of now.
func listingOfServer(resp *inventorypb.ListSnapshotsResponse, now time.Time) *listing {
	lt := &listing{Snapshots: make([]lsRow, 0, len(resp.GetSnapshots())), LiveStoredBytes: resp.GetLiveStoredBytes(),
		ReferencedStoredBytes: resp.GetReferencedStoredBytes(), StoredBytes: resp.GetStoredBytes(), Blobs: resp.GetBlobs()}
	for _, l := range resp.GetSnapshots() {
		lt.Snapshots = append(lt.Snapshots, lsRow(gc.RowOf(l, now)))
	}
	return lt
}
