package server_test

import (
	"context"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/proto/inventorypb"
	"github.com/snaploader/snaploader/server"
)

func TestListSnapshotsAuth(t *testing.T) {
	e := start(t, server.Options{APIKeys: map[string]server.APIKey{"ka": {Group: "a"}, "kro": {Group: "a", ReadOnly: true}}})
	for _, tc := range []struct {
		name string
		ctx  context.Context
		req  *inventorypb.ListSnapshotsRequest
		code codes.Code
	}{
		{"no key", context.Background(), &inventorypb.ListSnapshotsRequest{}, codes.Unauthenticated},
		{"unknown key", withKey("x"), &inventorypb.ListSnapshotsRequest{}, codes.Unauthenticated},
		{"read-write key", withKey("ka"), &inventorypb.ListSnapshotsRequest{}, codes.OK},
		{"read-only key", withKey("kro"), &inventorypb.ListSnapshotsRequest{}, codes.OK},
		{"negative retention", withKey("ka"), &inventorypb.ListSnapshotsRequest{RetentionSeconds: -1}, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := e.inv.ListSnapshots(tc.ctx, tc.req)
			if status.Code(err) != tc.code {
				t.Fatalf("ListSnapshots: %v, want %v", err, tc.code)
			}
			if err == nil && len(resp.GetSnapshots()) != 0 {
				t.Errorf("an empty cache lists %d snapshots", len(resp.GetSnapshots()))
			}
		})
	}
}

func TestListSnapshotsCountsBlobs(t *testing.T) {
	e := start(t, server.Options{})
	b := data(100 << 10)
	d := sha(b)
	if _, err := e.cas.BatchUpdateBlobs(context.Background(), &repb.BatchUpdateBlobsRequest{
		Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: d, Data: b}}}); err != nil {
		t.Fatal(err)
	}
	resp, err := e.inv.ListSnapshots(context.Background(), &inventorypb.ListSnapshotsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// A blob that no snapshot names is counted in the store's totals only.
	if resp.GetBlobs() != 1 || resp.GetStoredBytes() < 100<<10 || resp.GetReferencedStoredBytes() != 0 || len(resp.GetSnapshots()) != 0 {
		t.Errorf("listing: %+v; want one unreferenced blob of at least 100 KiB on disk", resp)
	}
}

func TestListSnapshotsUnimplementedBackend(t *testing.T) {
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	e := serveOn(t, lc, unlisted{lc}, server.Options{TempDir: t.TempDir()})
	if _, err := e.inv.ListSnapshots(context.Background(), &inventorypb.ListSnapshotsRequest{}); status.Code(err) != codes.Unimplemented {
		t.Errorf("ListSnapshots over a backend that cannot list: %v, want Unimplemented", err)
	}
}

func TestLastReadTracked(t *testing.T) {
	e := start(t, server.Options{})
	st, err := e.srv.Status(context.Background())
	if err != nil || len(st.Snapshots) != 0 || st.ActionCache.Hits != 0 {
		t.Fatalf("status of an empty server: %+v, %v", st, err)
	}
	key := sha([]byte("action"))
	ctx := context.Background()
	if _, err := e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: key}); status.Code(err) != codes.NotFound {
		t.Fatal(err)
	}
	if _, err := e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: key, ActionResult: &repb.ActionResult{}}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: key}); err != nil {
		t.Fatal(err)
	}
	st, err = e.srv.Status(ctx)
	if err != nil || st.ActionCache.Hits != 1 || st.ActionCache.Misses != 1 {
		t.Errorf("status after a miss and a hit: %+v, %v", st.ActionCache, err)
	}
}

// slowStore is an empty gc.Store whose listing takes a while and counts
// the collections running at once.
type slowStore struct {
	running, most, runs atomic.Int64
}

func (s *slowStore) ListEntries(ctx context.Context, fn func(gc.Entry) error) error {
	n := s.running.Add(1)
	defer s.running.Add(-1)
	for {
		m := s.most.Load()
		if n <= m || s.most.CompareAndSwap(m, n) {
			break
		}
	}
	s.runs.Add(1)
	time.Sleep(20 * time.Millisecond)
	return nil
}
func (s *slowStore) ReadEntry(context.Context, gc.Entry) (*repb.ActionResult, time.Time, error) {
	return nil, time.Time{}, status.Error(codes.NotFound, "none")
}
func (s *slowStore) ListBlobs(context.Context, func(gc.Blob) error) error { return nil }
func (s *slowStore) ReadBlob(context.Context, digest.Function, *repb.Digest) (io.ReadCloser, error) {
	return nil, status.Error(codes.NotFound, "none")
}
func (s *slowStore) Written(context.Context, gc.Blob) (time.Time, bool, error) {
	return time.Time{}, false, nil
}
func (s *slowStore) Delete(context.Context, []string) (int, error) { return 0, nil }

func TestCollectEveryNeverOverlaps(t *testing.T) {
	e := start(t, server.Options{})
	st := &slowStore{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	returned := make(chan time.Time, 2)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := e.srv.CollectEvery(ctx, st, 5*time.Millisecond, gc.Options{}); err != nil {
				t.Errorf("CollectEvery: %v", err)
			}
			returned <- time.Now()
		}()
	}
	// The second call returns at once; the first keeps collecting.
	select {
	case <-returned:
	case <-time.After(5 * time.Second):
		t.Fatal("a second CollectEvery on one server did not return")
	}
	deadline := time.Now().Add(10 * time.Second)
	for st.runs.Load() < server.GCReportsKept+2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	wg.Wait()
	if st.most.Load() != 1 {
		t.Errorf("%d collections ran at once, want 1", st.most.Load())
	}
	status, err := e.srv.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(status.GC) != server.GCReportsKept || status.GCInterval != "5ms" {
		t.Errorf("status keeps %d reports (interval %q) after %d runs, want %d", len(status.GC), status.GCInterval, st.runs.Load(), server.GCReportsKept)
	}
	for i := 1; i < len(status.GC); i++ {
		if status.GC[i].Started.After(status.GC[i-1].Started) || status.GC[i].Report == nil {
			t.Errorf("report %d: %+v; want newest first, each with a report", i, status.GC[i])
		}
	}
}

// unlisted is the local cache as a backend the server has no inventory of.
type unlisted struct{ *localcache.Cache }
