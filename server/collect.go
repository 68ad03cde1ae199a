package server

import (
	"context"
	"sync"
	"time"

	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/statuspage"
)

// GCReportsKept is how many collection reports the status page shows.
const GCReportsKept = 8

// collector runs the periodic collections of CollectEvery and keeps their
// recent reports.
type collector struct {
	mu      sync.Mutex
	every   time.Duration
	running bool
	recent  []statuspage.GCRun // newest first
}

func (c *collector) runs() []statuspage.GCRun {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]statuspage.GCRun(nil), c.recent...)
}

func (c *collector) add(r statuspage.GCRun) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.recent = append([]statuspage.GCRun{r}, c.recent[:min(len(c.recent), GCReportsKept-1)]...)
}

// CollectEvery runs gc.Run on st every interval until ctx is done, the
// first run one interval after the call; each report is logged and kept
// for the status page. A run never overlaps another: the next interval is
// counted from the end of the previous run, and a second CollectEvery on
// the same server returns at once. A failed run is logged and retried at
// the next interval. It returns nil when ctx is done.
func (s *Server) CollectEvery(ctx context.Context, st gc.Store, interval time.Duration, opts gc.Options) error {
	c := &s.collector
	c.mu.Lock()
	if c.running {
		c.mu.Unlock()
		s.log.Warn("garbage collection already scheduled on this server; not starting a second one")
		return nil
	}
	c.running, c.every = true, interval
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.running = false
		c.mu.Unlock()
	}()
	if opts.Logger == nil {
		opts.Logger = s.log
	}
	t := time.NewTimer(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		started := time.Now()
		rep, err := gc.Run(ctx, st, opts)
		if ctx.Err() != nil {
			return nil
		}
		run := statuspage.GCRun{Started: started, Report: rep}
		if err != nil {
			run.Error = err.Error()
			s.log.Error("garbage collection failed", "err", err)
		}
		if rep != nil {
			s.log.Info("garbage collection", "snapshots", rep.Snapshots, "live_snapshots", rep.LiveSnapshots,
				"expired_snapshots", rep.ExpiredSnapshots, "broken_snapshots", rep.BrokenSnapshots,
				"entries_deleted", rep.Entries.Deleted, "blobs_examined", rep.Blobs.Examined,
				"blobs_deleted", rep.Blobs.Deleted, "bytes_deleted", rep.Blobs.DeletedBytes,
				"live_bytes", rep.LiveBytes, "duration_ms", rep.DurationMS)
		}
		c.add(run)
		t.Reset(interval)
	}
}
