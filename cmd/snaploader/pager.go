package main

import (
	"context"
	"fmt"
	"net"
	"time"

	"go.opentelemetry.io/otel/attribute"

	"github.com/snaploader/snaploader/snapshot"
	"github.com/snaploader/snaploader/telemetry"
	"github.com/snaploader/snaploader/uffd"
)

// pagerOptions are what pager serves: the snapshot, the directory its
// artifact files are unpacked into, the socket a VMM connects to and the
// chunked file holding guest memory.
type pagerOptions struct {
	Snapshot   snapshotOptions
	Dir        string
	Socket     string
	MemoryFile string
	// JSON prints one object when the VMM exits; Prefetch prefetches the
	// working set; Replace lets Dir hold entries already.
	JSON, Prefetch, Replace bool
}

// pagerReport is the --json output of pager.
type pagerReport struct {
	SnapshotID   string            `json:"snapshot_id"`
	Source       string            `json:"source"`
	Socket       string            `json:"socket"`
	Files        map[string]string `json:"files"`
	PageSize     int64             `json:"page_size"` // 0: not huge-page memory
	Faults       uint64            `json:"faults"`
	PagesCopied  uint64            `json:"pages_copied"`
	ZeroPages    uint64            `json:"zero_pages"`
	ChunkFetches int64             `json:"chunk_fetches"`
	FetchedBytes int64             `json:"fetched_bytes"`
	LatencyP50US int64             `json:"fault_latency_p50_us"`
	LatencyP99US int64             `json:"fault_latency_p99_us"`
	DurationMS   int64             `json:"duration_ms"`
}

// runPager unpacks the snapshot o selects and serves its guest memory to
// one VMM over userfaultfd until the VMM exits.
func runPager(ctx context.Context, o pagerOptions, s streams) error {
	start := time.Now()
	e, snap, err := openSnapshot(ctx, o.Snapshot)
	if err != nil {
		return err
	}
	defer e.Close()
	u, err := e.loader.UnpackSnapshot(ctx, snap, o.Dir, snapshot.UnpackOptions{PrefetchWorkingSet: o.Prefetch, OnFetch: e.metrics.Fetched, Replace: o.Replace})
	if err != nil {
		return outDirError("--dir", err, restoreReplaceHint)
	}
	defer u.Close()
	if !o.JSON {
		reportOthers(s.Err, o.Dir, u.Others)
	}
	mem, ok := u.Stores[o.MemoryFile]
	if !ok {
		return fmt.Errorf("snapshot %s has no chunked file %q", snap.Manifest.GetVmMetadata().GetSnapshotId(), o.MemoryFile)
	}
	// Memory saved as huge-page backed is served in whole huge
	// pages, each inside one chunk (the page server also refuses
	// a region whose page size does not divide the chunk size).
	ps, err := recordedPageSize(snap.Manifest.GetVmConfiguration())
	if err != nil {
		return fmt.Errorf("snapshot %s: %w", snap.Manifest.GetVmMetadata().GetSnapshotId(), err)
	}
	if err := checkPageSize(fmt.Sprintf("guest memory %q of snapshot %s", o.MemoryFile, snap.Manifest.GetVmMetadata().GetSnapshotId()), mem.ChunkSize(), ps); err != nil {
		return err
	}
	if err := removeStaleSocket("--socket", o.Socket); err != nil {
		return err
	}
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: o.Socket, Net: "unix"})
	if err != nil {
		return fmt.Errorf("listening on %s: %w", o.Socket, err)
	}
	defer lis.Close()
	if !o.JSON {
		fmt.Fprintf(s.Err, "serving guest memory %q of snapshot %s on %s\n", o.MemoryFile, snap.Manifest.GetVmMetadata().GetSnapshotId(), o.Socket)
	}
	srv := uffd.NewServer(mem, uffd.Options{ChunkSize: mem.ChunkSize()})
	_, span := telemetry.Start(ctx, "snaploader.uffd_serve", attribute.String("file", o.MemoryFile))
	serr := srv.Serve(ctx, lis)
	st, ms := srv.Stats(), mem.Stats()
	span.SetAttributes(attribute.Int64("faults", int64(st.Faults)), attribute.Int64("pages_copied", int64(st.PagesCopied)),
		attribute.Int64("zero_pages", int64(st.ZeroPages)), attribute.Int64("chunk_fetches", ms.Fetched),
		attribute.Int64("fetched_bytes", ms.FetchedBytes), attribute.Int64("fault_latency_p99_us", st.LatencyP99.Microseconds()))
	telemetry.End(span, serr)
	rep := pagerReport{
		SnapshotID:   snap.Manifest.GetVmMetadata().GetSnapshotId(),
		Source:       string(snap.Source),
		Socket:       o.Socket,
		Files:        u.Files,
		PageSize:     ps,
		Faults:       st.Faults,
		PagesCopied:  st.PagesCopied,
		ZeroPages:    st.ZeroPages,
		ChunkFetches: ms.Fetched,
		FetchedBytes: ms.FetchedBytes,
		LatencyP50US: st.LatencyP50.Microseconds(),
		LatencyP99US: st.LatencyP99.Microseconds(),
		DurationMS:   time.Since(start).Milliseconds(),
	}
	if o.JSON {
		if err := printJSON(s.Out, rep); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(s.Out, "served %d faults (%d pages copied, %d zero pages), %d chunks fetched (%s); fault latency p50 %dµs p99 %dµs\n",
			rep.Faults, rep.PagesCopied, rep.ZeroPages, rep.ChunkFetches, humanBytes(rep.FetchedBytes), rep.LatencyP50US, rep.LatencyP99US)
	}
	return serr
}
