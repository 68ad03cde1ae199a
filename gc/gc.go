// Package gc collects the garbage of a snapshot tier that has no eviction
// of its own (an S3 bucket) and takes its inventory: the snapshots of a
// tier with their sizes and states.
//
// # Live set
//
// Version entries are always live, and so is every action-cache entry that
// is not a snapshot manifest. A manifest stored under a snapshot key is
// the newest under that key (each save replaces it), so it is live; a
// snapshot-id manifest is live while it is younger than Options.Retention
// or while its snapshot is the newest under some key. Every blob a live
// manifest names is live: artifact files, trees and the chunks the trees
// list.
//
// # Collection
//
// Run first reads every entry and every live manifest's trees and builds
// the live set (a sorted array of 40-byte blob keys: memory grows with the
// live blobs, not with the bucket, whose listing is streamed). It then
// deletes the expired snapshot-id entries, and finally streams the blob
// listing: a blob not in the live set whose age exceeds Options.Grace is a
// candidate, and candidates are checked again (their age may have been
// refreshed since the listing) and deleted in batches.
//
// A save in progress is never broken: its new blobs are younger than the
// grace period; blobs it found present were refreshed by FindMissing when
// older than the store's refresh age (a fraction of the grace), and are
// checked again just before their batch is deleted; and a manifest written
// before the collection read the entries has its blobs marked. The grace
// period must therefore exceed the longest save plus the store's refresh
// age (s3cache.DefaultRefreshAfter). Every decision is taken from the
// collector's clock read once at the start.
//
// Collections are idempotent: two at once reach the same final state
// (deleting an object already gone is not an error), and one killed at any
// point loses nothing live (entries are deleted before the blobs they
// alone named, so a re-run finds those blobs unreferenced and finishes the
// job). A dry run takes every decision a real run takes, including the
// re-check, and deletes nothing.
package gc

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
)

// Counts sums the objects of one kind a collection examined, kept and
// deleted; bytes are stored bytes (at rest).
type Counts struct {
	Examined      int64 `json:"examined"`
	ExaminedBytes int64 `json:"examined_bytes"`
	Kept          int64 `json:"kept"`
	KeptBytes     int64 `json:"kept_bytes"`
	Deleted       int64 `json:"deleted"`
	DeletedBytes  int64 `json:"deleted_bytes"`
}

// Report is what a collection did (or, in a dry run, would do).
type Report struct {
	DryRun           bool   `json:"dry_run"`
	Retention        string `json:"retention"`
	Grace            string `json:"grace"`
	Snapshots        int    `json:"snapshots"`
	LiveSnapshots    int    `json:"live_snapshots"`
	ExpiredSnapshots int    `json:"expired_snapshots"`
	// BrokenSnapshots are live snapshots with a missing or corrupt tree.
	BrokenSnapshots int    `json:"broken_snapshots"`
	Entries         Counts `json:"entries"`
	Blobs           Counts `json:"blobs"`
	// LiveBlobs and LiveBytes are the kept blobs a live manifest names;
	// the other kept blobs are younger than the grace period (or were
	// refreshed by a save) or foreign.
	LiveBlobs  int64 `json:"live_blobs"`
	LiveBytes  int64 `json:"live_bytes"`
	DurationMS int64 `json:"duration_ms"`
}

// Run collects the garbage of st (see the package doc).
func Run(ctx context.Context, st Store, opts Options) (*Report, error) {
	opts.fill()
	start := time.Now()
	now := opts.Now()
	rep := &Report{DryRun: opts.DryRun, Retention: opts.Retention.String(), Grace: opts.Grace.String()}
	var examined atomic.Int64
	progress := func() {
		n := examined.Add(1)
		if opts.Progress != nil {
			opts.Progress(n)
		}
	}

	// Mark.
	sc, err := scanEntries(ctx, st, &opts, progress)
	if err != nil {
		return nil, err
	}
	sc.decide(now, opts.Retention)
	var live keySet
	var liveSnaps []*Snapshot
	var expired []Entry
	for _, s := range sc.snapshots {
		rep.Snapshots++
		if s.Live {
			rep.LiveSnapshots++
			liveSnaps = append(liveSnaps, s)
			continue
		}
		rep.ExpiredSnapshots++
		expired = append(expired, *s.IDEntry)
	}
	if err := forEachBlobs(ctx, st, liveSnaps, &opts, func(s *Snapshot, fb *fileBlobs) {
		if fb.broken {
			rep.BrokenSnapshots++
		}
		for _, k := range fb.keys {
			live.add(k)
		}
		if live.len() > 1<<20 && live.len() > 2*live.compacted {
			live.freeze()
			live.compacted = live.len()
		}
	}); err != nil {
		return nil, fmt.Errorf("marking live blobs: %w", err)
	}
	live.freeze()

	// Expired entries, before the blobs only they name.
	rep.Entries = sc.entries
	rep.Entries.Kept = rep.Entries.Examined - int64(len(expired))
	var expiredBytes int64
	for _, e := range expired {
		expiredBytes += e.Size
	}
	rep.Entries.KeptBytes = rep.Entries.ExaminedBytes - expiredBytes
	for i := 0; i < len(expired); i += opts.BatchSize {
		batch := expired[i:min(i+opts.BatchSize, len(expired))]
		ids := make([]string, len(batch))
		for j, e := range batch {
			ids[j] = e.ID
		}
		if !opts.DryRun {
			if _, err := st.Delete(ctx, ids); err != nil {
				return rep, fmt.Errorf("deleting expired snapshot-id entries: %w", err)
			}
		}
		for _, e := range batch {
			rep.Entries.Deleted++
			rep.Entries.DeletedBytes += e.Size
			if opts.OnDelete != nil {
				opts.OnDelete(KindEntry, e.ID, e.Size)
			}
		}
	}

	// Sweep.
	sw := &sweeper{st: st, opts: &opts, cutoff: now.Add(-opts.Grace), rep: rep}
	var batch []Blob
	err = st.ListBlobs(ctx, func(b Blob) error {
		progress()
		rep.Blobs.Examined++
		rep.Blobs.ExaminedBytes += b.StoredSize
		k, ok := keyOf(b.Function, b.Digest)
		switch {
		case !ok || sc.foreign.has(k):
			sw.keep(b)
			return nil
		case live.has(k):
			rep.LiveBlobs++
			rep.LiveBytes += b.StoredSize
			sw.keep(b)
			return nil
		case !b.Modified.IsZero() && !b.Modified.Before(sw.cutoff):
			sw.keep(b) // young
			return nil
		}
		batch = append(batch, b)
		if len(batch) < opts.BatchSize {
			return nil
		}
		err := sw.sweep(ctx, batch)
		batch = batch[:0]
		return err
	})
	if err == nil && len(batch) > 0 {
		err = sw.sweep(ctx, batch)
	}
	rep.DurationMS = time.Since(start).Milliseconds()
	if err != nil {
		return rep, fmt.Errorf("sweeping blobs: %w", err)
	}
	return rep, nil
}

type sweeper struct {
	st      Store
	opts    *Options
	cutoff  time.Time
	rep     *Report
	batches int
}

func (s *sweeper) keep(b Blob) {
	s.rep.Blobs.Kept++
	s.rep.Blobs.KeptBytes += b.StoredSize
}

// sweep checks the age of every candidate of batch again (a save may have
// refreshed it since the listing) and deletes those still older than the
// grace period.
func (s *sweeper) sweep(ctx context.Context, batch []Blob) error {
	if s.batches > 0 && s.opts.BatchPause > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(s.opts.BatchPause):
		}
	}
	s.batches++
	old := make([]bool, len(batch))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(s.opts.Parallelism)
	for i, b := range batch {
		g.Go(func() error {
			w, exists, err := s.st.Written(gctx, b)
			if err != nil {
				return fmt.Errorf("checking the age of blob %s: %w", b.ID, err)
			}
			old[i] = exists && w.Before(s.cutoff)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	var ids []string
	var del []Blob
	for i, b := range batch {
		if !old[i] {
			s.keep(b)
			continue
		}
		ids = append(ids, b.ID)
		del = append(del, b)
	}
	if len(ids) > 0 && !s.opts.DryRun {
		if _, err := s.st.Delete(ctx, ids); err != nil {
			return err
		}
	}
	for _, b := range del {
		s.rep.Blobs.Deleted++
		s.rep.Blobs.DeletedBytes += b.StoredSize
		if s.opts.OnDelete != nil {
			s.opts.OnDelete(KindBlob, b.ID, b.StoredSize)
		}
	}
	return nil
}
