package gc

import (
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/snaploader/snaploader/proto/inventorypb"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

func TestRowOf(t *testing.T) {
	completed := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	now := completed.Add(90 * time.Second)
	key := &snapshotpb.SnapshotKey{InstanceName: "ci", PlatformHash: "p", ConfigurationHash: "c", RunnerId: "r", VersionId: "v", Ref: "main"}
	for _, tc := range []struct {
		name       string
		l          *inventorypb.SnapshotListing
		wantState  string
		wantShared *float64
	}{
		{"first of its key", &inventorypb.SnapshotListing{Key: key, SnapshotId: "a", Newest: true, Live: true, SharedChunks: 0.5}, "newest", nil},
		{"with a previous", &inventorypb.SnapshotListing{Key: key, SnapshotId: "b", Live: true, PreviousSnapshotId: "a", SharedChunks: 0.25}, "retained", ptr(0.25)},
		{"broken wins", &inventorypb.SnapshotListing{Key: key, SnapshotId: "c", Broken: true, Invalidated: true, Newest: true}, "broken", nil},
		{"invalidated", &inventorypb.SnapshotListing{Key: key, SnapshotId: "d", Invalidated: true, Newest: true}, "invalidated", nil},
		{"expired", &inventorypb.SnapshotListing{Key: key, SnapshotId: "e"}, "expired", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.l.Completed = timestamppb.New(completed)
			tc.l.LogicalBytes, tc.l.StoredBytes, tc.l.Blobs, tc.l.MissingBlobs = 4<<20, 1<<20, 7, 2
			r := RowOf(tc.l, now)
			if r.State != tc.wantState {
				t.Errorf("State = %q, want %q", r.State, tc.wantState)
			}
			if (r.SharedChunks == nil) != (tc.wantShared == nil) || (r.SharedChunks != nil && *r.SharedChunks != *tc.wantShared) {
				t.Errorf("SharedChunks = %v, want %v", r.SharedChunks, tc.wantShared)
			}
			if r.Instance != "ci" || r.PlatformHash != "p" || r.ConfigurationHash != "c" || r.Runner != "r" || r.VersionID != "v" || r.Ref != "main" || r.SnapshotID != tc.l.SnapshotId {
				t.Errorf("key fields = %+v", r)
			}
			if !r.Completed.Equal(completed) || r.AgeSeconds != 90 {
				t.Errorf("Completed, AgeSeconds = %v, %d; want %v, 90", r.Completed, r.AgeSeconds, completed)
			}
			if r.LogicalBytes != 4<<20 || r.StoredBytes != 1<<20 || r.Blobs != 7 || r.MissingBlobs != 2 {
				t.Errorf("sizes = %d, %d, %d, %d", r.LogicalBytes, r.StoredBytes, r.Blobs, r.MissingBlobs)
			}
		})
	}
}

func ptr(f float64) *float64 { return &f }
