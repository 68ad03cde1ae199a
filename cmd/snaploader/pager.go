package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.opentelemetry.io/otel/attribute"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/snapshot"
	"github.com/snaploader/snaploader/telemetry"
	"github.com/snaploader/snaploader/uffd"
)

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

func newPagerCmd() *cobra.Command {
	var (
		sf       snapshotFlags
		dir      string
		socket   string
		memName  string
		asJSON   bool
		prefetch bool
		replace  bool
	)
	cmd := &cobra.Command{
		Use:   "pager",
		Short: "Restore a snapshot and serve its guest memory lazily to one Firecracker-style VMM over userfaultfd",
		Long: `pager unpacks the snapshot's artifact files (VM state, kernel, ...) into --dir, then listens on
--socket for one VMM speaking Firecracker's page-fault handler handshake (Firecracker: mem_backend
{"backend_type": "Uffd", "backend_path": SOCKET}). Guest memory pages are served from the chunked
file --memory-file as the guest faults them in, fetching chunks from the local cache or the remote.
Regions the VMM announces with 2 MiB pages (hugetlbfs guest memory) are served in whole huge pages;
their chunk size must be a multiple of 2 MiB (save --page-size 2MiB --chunk-size 4194304).
It exits when the VMM does, printing the fault statistics.
--dir must not exist (it is created) or be empty, unless --replace; a socket
left at --socket is replaced, anything else there is refused.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			start := time.Now()
			if dir == "" || socket == "" {
				return usagef("--dir and --socket are required")
			}
			// Before the cache is opened or a snapshot looked up.
			if err := checkOutDir("--dir", dir, replace, restoreReplaceHint); err != nil {
				return err
			}
			if err := checkSocketPath("--socket", socket); err != nil {
				return err
			}
			e, snap, err := sf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			u, err := e.loader.UnpackSnapshot(ctx, snap, dir, snapshot.UnpackOptions{PrefetchWorkingSet: prefetch, OnFetch: e.metrics.Fetched, Replace: replace})
			if err != nil {
				return outDirError("--dir", err, restoreReplaceHint)
			}
			defer u.Close()
			if !asJSON {
				reportOthers(os.Stderr, dir, u.Others)
			}
			mem, ok := u.Stores[memName]
			if !ok {
				return fmt.Errorf("snapshot %s has no chunked file %q", snap.Manifest.GetVmMetadata().GetSnapshotId(), memName)
			}
			// Memory saved as huge-page backed is served in whole huge
			// pages, each inside one chunk (the page server also refuses
			// a region whose page size does not divide the chunk size).
			ps, err := recordedPageSize(snap.Manifest.GetVmConfiguration())
			if err != nil {
				return fmt.Errorf("snapshot %s: %w", snap.Manifest.GetVmMetadata().GetSnapshotId(), err)
			}
			if err := checkPageSize(fmt.Sprintf("guest memory %q of snapshot %s", memName, snap.Manifest.GetVmMetadata().GetSnapshotId()), mem.ChunkSize(), ps); err != nil {
				return err
			}
			if err := removeStaleSocket("--socket", socket); err != nil {
				return err
			}
			lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
			if err != nil {
				return fmt.Errorf("listening on %s: %w", socket, err)
			}
			defer lis.Close()
			if !asJSON {
				fmt.Fprintf(os.Stderr, "serving guest memory %q of snapshot %s on %s\n", memName, snap.Manifest.GetVmMetadata().GetSnapshotId(), socket)
			}
			srv := uffd.NewServer(mem, uffd.Options{ChunkSize: mem.ChunkSize()})
			_, span := telemetry.Start(ctx, "snaploader.uffd_serve", attribute.String("file", memName))
			serr := srv.Serve(ctx, lis)
			st, ms := srv.Stats(), mem.Stats()
			span.SetAttributes(attribute.Int64("faults", int64(st.Faults)), attribute.Int64("pages_copied", int64(st.PagesCopied)),
				attribute.Int64("zero_pages", int64(st.ZeroPages)), attribute.Int64("chunk_fetches", ms.Fetched),
				attribute.Int64("fetched_bytes", ms.FetchedBytes), attribute.Int64("fault_latency_p99_us", st.LatencyP99.Microseconds()))
			telemetry.End(span, serr)
			rep := pagerReport{
				SnapshotID:   snap.Manifest.GetVmMetadata().GetSnapshotId(),
				Source:       string(snap.Source),
				Socket:       socket,
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
			if asJSON {
				if err := printJSON(os.Stdout, rep); err != nil {
					return err
				}
			} else {
				fmt.Printf("served %d faults (%d pages copied, %d zero pages), %d chunks fetched (%s); fault latency p50 %dµs p99 %dµs\n",
					rep.Faults, rep.PagesCopied, rep.ZeroPages, rep.ChunkFetches, humanBytes(rep.FetchedBytes), rep.LatencyP50US, rep.LatencyP99US)
			}
			return serr
		},
	}
	sf.register(cmd, "serve this exact snapshot instead of the key set's newest")
	fl := cmd.Flags()
	fl.StringVar(&dir, "dir", "", "directory to unpack the snapshot's artifact files into: created if missing, else it must be empty (see --replace)")
	fl.BoolVar(&replace, "replace", false, "unpack into a --dir that already holds files: those with the snapshot's file names are replaced, all others are left as they are")
	fl.StringVar(&socket, "socket", "", "Unix socket the VMM connects to")
	fl.StringVar(&memName, "memory-file", "memory", "name of the chunked file holding guest memory")
	fl.BoolVar(&asJSON, "json", false, "print one JSON object when the VMM exits")
	fl.BoolVar(&prefetch, "prefetch-working-set", true, "prefetch the chunks the guest touched after its previous restore")
	return cmd
}

// checkSocketPath refuses a socket path that names something other than
// a Unix socket: the only thing a command may remove at that path is a
// socket, which holds no data. (Whether a process still listens on it is
// not probed: connecting would be taken for a client by a pager that
// serves one.)
func checkSocketPath(flag, path string) error {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("%s %s: %w", flag, path, err)
	case fi.Mode()&os.ModeSocket == 0:
		kind := "not a socket"
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			kind = fileio.Kind(st.Mode)
		}
		return status.Errorf(codes.InvalidArgument, "%s %s is %s, not a socket: refusing to replace it", flag, path, kind)
	}
	return nil
}

// removeStaleSocket removes the socket at path, if any, so that it can be
// listened on; anything else there is refused (checkSocketPath).
func removeStaleSocket(flag, path string) error {
	if err := checkSocketPath(flag, path); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s: removing the stale socket %s: %w", flag, path, err)
	}
	return nil
}
