package server

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/proto/inventorypb"
	"github.com/snaploader/snaploader/statuspage"
)

// inventoryStore is the Store one group's listing reads (Options.Inventory).
func (s *Server) inventoryStore(group string) (gc.Store, error) {
	if s.opts.Inventory != nil {
		return s.opts.Inventory(group), nil
	}
	return nil, status.Errorf(codes.Unimplemented, "this server's backend (%s) cannot list its contents", s.backend.Traits().Description)
}

// ListSnapshots lists the snapshots of the caller's group. Read-only keys
// may list.
func (s *Server) ListSnapshots(ctx context.Context, req *inventorypb.ListSnapshotsRequest) (_ *inventorypb.ListSnapshotsResponse, err error) {
	defer s.m.observe("ListSnapshots", time.Now(), &err)
	c, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	if req.GetRetentionSeconds() < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "retention_seconds %d: want a positive number or 0 for the default", req.GetRetentionSeconds())
	}
	opts := gc.Options{Retention: time.Duration(req.GetRetentionSeconds()) * time.Second, Logger: s.log}
	if req.Now != nil {
		now := req.Now.AsTime()
		opts.Now = func() time.Time { return now }
	}
	inv, err := s.list(ctx, c.group, opts)
	if err != nil {
		return nil, err
	}
	return InventoryResponse(inv), nil
}

// InventoryResponse is inv in the listing service's form.
func InventoryResponse(inv *gc.Inventory) *inventorypb.ListSnapshotsResponse {
	resp := &inventorypb.ListSnapshotsResponse{
		LiveStoredBytes: inv.LiveStoredBytes, ReferencedStoredBytes: inv.ReferencedStoredBytes,
		StoredBytes: inv.StoredBytes, Blobs: inv.Blobs,
	}
	for _, l := range inv.Snapshots {
		sn := l.Snapshot
		resp.Snapshots = append(resp.Snapshots, &inventorypb.SnapshotListing{
			Scope: sn.Scope, Key: sn.Key, SnapshotId: sn.SnapshotID, DigestFunction: digest.FunctionName(sn.Function),
			Completed: timestamppb.New(sn.Created), Newest: len(sn.KeyEntries) > 0, Live: sn.Live, Broken: l.Broken,
			LogicalBytes: l.LogicalBytes, StoredBytes: l.StoredBytes, Blobs: int64(l.Blobs), MissingBlobs: int64(l.Missing),
			PreviousSnapshotId: l.PreviousID, SharedChunks: l.SharedChunks, Invalidated: sn.Invalidated,
		})
	}
	return resp
}

// list takes the inventory of group's part of the backend. Failures are
// logged with their details and sent sanitized.
func (s *Server) list(ctx context.Context, group string, opts gc.Options) (*gc.Inventory, error) {
	st, err := s.inventoryStore(group)
	if err != nil {
		return nil, err
	}
	inv, err := gc.List(ctx, st, opts)
	if err != nil {
		return nil, fmt.Errorf("listing the snapshots of group %q: %w", group, err)
	}
	return inv, nil
}

// maxReadsTracked bounds the action-cache keys whose last read is kept.
const maxReadsTracked = 1 << 16

// readKey names an action-cache entry for read tracking.
type readKey struct{ group, instance, hash string }

// reads remembers when each action-cache entry was last returned by
// GetActionResult (in memory; a restarted server starts afresh).
type reads struct {
	mu   sync.Mutex
	last map[readKey]time.Time
}

func (r *reads) record(k readKey, t time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.last == nil {
		r.last = map[readKey]time.Time{}
	}
	if _, ok := r.last[k]; !ok && len(r.last) >= maxReadsTracked {
		var oldest readKey
		first := true
		for k2, t2 := range r.last {
			if first || t2.Before(r.last[oldest]) {
				oldest, first = k2, false
			}
		}
		delete(r.last, oldest)
	}
	r.last[k] = t
}

func (r *reads) get(k readKey) (time.Time, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t, ok := r.last[k]
	return t, ok
}

// lastRead is the last time any entry of sn was read.
func (s *Server) lastRead(group string, sn *gc.Snapshot) *time.Time {
	var best time.Time
	entries := sn.KeyEntries
	if sn.IDEntry != nil {
		entries = append(entries[:len(entries):len(entries)], *sn.IDEntry)
	}
	for _, e := range entries {
		if t, ok := s.reads.get(readKey{group, sn.Key.GetInstanceName(), e.Hash}); ok && t.After(best) {
			best = t
		}
	}
	if best.IsZero() {
		return nil
	}
	return &best
}

// groups are the groups the status page lists: those of the API keys, or
// the anonymous group when there are none.
func (s *Server) groups() []string {
	if len(s.opts.APIKeys) == 0 {
		return []string{""}
	}
	set := map[string]bool{}
	for _, k := range s.opts.APIKeys {
		set[k.Group] = true
	}
	out := make([]string, 0, len(set))
	for g := range set {
		out = append(out, g)
	}
	sort.Strings(out)
	return out
}

// Status is the data of the status page (statuspage.Source): every
// group's snapshots, lookup counts and recent collections.
func (s *Server) Status(ctx context.Context) (*statuspage.Status, error) {
	now := time.Now()
	st := &statuspage.Status{
		Generated:   now,
		Backend:     s.describe(),
		ActionCache: statuspage.Lookups{Hits: s.m.acHits.Load(), Misses: s.m.acMisses.Load()},
		CAS:         statuspage.Lookups{Hits: s.m.casHits.Load(), Misses: s.m.casMisses.Load()},
		GC:          s.collector.runs(),
		Snapshots:   []statuspage.Snapshot{},
		Server:      s.serverInfo(now),
		Budgets: []statuspage.Budget{
			{Name: "upload memory", InUseBytes: s.mem.inUse(), MaxBytes: s.mem.max},
			{Name: "read memory", InUseBytes: s.readMem.inUse(), MaxBytes: s.readMem.max},
		},
	}
	if mb := s.backend.Traits().MaxBytes; mb > 0 {
		st.Capacity = statuspage.Capacity{OnDisk: true, UsedBytes: s.backend.Usage(), MaxBytes: mb, Evictions: s.backend.Evictions()}
	} else {
		st.Budgets = append(st.Budgets, statuspage.Budget{Name: "scratch disk", InUseBytes: s.scratch.inUse(), MaxBytes: s.scratch.max})
	}
	if s.collector.every > 0 {
		st.GCInterval = s.collector.every.String()
	}
	for _, g := range s.groups() {
		inv, err := s.list(ctx, g, gc.Options{Retention: s.opts.Retention, Logger: s.log})
		if err != nil {
			s.log.Warn("status page: listing failed", "group", g, "err", err)
			st.Errors = append(st.Errors, s.san.clean(err).Error())
			continue
		}
		for i, l := range InventoryResponse(inv).GetSnapshots() {
			st.Snapshots = append(st.Snapshots, statuspage.SnapshotOf(g, gc.RowOf(l, now), s.lastRead(g, inv.Snapshots[i].Snapshot)))
		}
	}
	return st, nil
}

// State is how ls and the status page name a snapshot's state: broken
// (it cannot restore), invalidated (its key was invalidated since it was
// saved), newest (under some key), retained (kept for the retention) or
// expired.
func State(sn *gc.Snapshot, l gc.Listing) string {
	return gc.ListingState(l.Broken, sn.Invalidated, len(sn.KeyEntries) > 0, sn.Live)
}

func (s *Server) describe() string { return s.backend.Traits().Description }
