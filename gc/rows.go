package gc

import (
	"time"

	"github.com/snaploader/snaploader/proto/inventorypb"
)

// Row is one snapshot of a listing as `snaploader ls` and the status page
// show it: its key, id, state and sizes, its age as of some moment.
// SharedChunks is nil for the first snapshot of a key.
type Row struct {
	Instance          string
	Scope             string
	PlatformHash      string
	ConfigurationHash string
	Runner            string
	VersionID         string
	Ref               string
	SnapshotID        string
	DigestFunction    string
	Completed         time.Time
	AgeSeconds        int64
	// State is newest, invalidated, retained, expired or broken
	// (ListingState).
	State        string
	Newest       bool
	Live         bool
	Broken       bool
	Invalidated  bool
	LogicalBytes int64
	StoredBytes  int64
	Blobs        int
	MissingBlobs int
	PreviousID   string
	SharedChunks *float64
}

// RowOf is the row of l (a snapshot in the listing service's form), its
// age as of now.
func RowOf(l *inventorypb.SnapshotListing, now time.Time) Row {
	k, created := l.GetKey(), l.GetCompleted().AsTime()
	r := Row{
		Instance: k.GetInstanceName(), Scope: l.GetScope(), PlatformHash: k.GetPlatformHash(),
		ConfigurationHash: k.GetConfigurationHash(), Runner: k.GetRunnerId(), VersionID: k.GetVersionId(),
		Ref: k.GetRef(), SnapshotID: l.GetSnapshotId(), DigestFunction: l.GetDigestFunction(),
		Completed: created, AgeSeconds: int64(now.Sub(created).Seconds()), Newest: l.GetNewest(), Live: l.GetLive(),
		Broken: l.GetBroken(), Invalidated: l.GetInvalidated(), LogicalBytes: l.GetLogicalBytes(), StoredBytes: l.GetStoredBytes(),
		Blobs: int(l.GetBlobs()), MissingBlobs: int(l.GetMissingBlobs()), PreviousID: l.GetPreviousSnapshotId(),
		State: ListingState(l.GetBroken(), l.GetInvalidated(), l.GetNewest(), l.GetLive()),
	}
	if r.PreviousID != "" {
		shared := l.GetSharedChunks()
		r.SharedChunks = &shared
	}
	return r
}

// ListingState is how a listing names a snapshot's state from its flags:
// broken (it cannot restore), invalidated (its key was invalidated since
// it was saved), newest (under some key), retained (kept for the
// retention) or expired.
func ListingState(broken, invalidated, newest, live bool) string {
	switch {
	case broken:
		return "broken"
	case invalidated:
		return "invalidated"
	case newest:
		return "newest"
	case live:
		return "retained"
	}
	return "expired"
}
