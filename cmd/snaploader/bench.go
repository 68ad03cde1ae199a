package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/snapshot"
)

// benchFile is the chunked file of the benchmark snapshot.
const benchFile = "memory.img"

// benchReport is what `snaploader bench` measures, each figure the median
// of --runs alternated runs after one warm-up run.
type benchReport struct {
	Remote     string `json:"remote"`
	SnapshotID string `json:"snapshot_id"`
	// Saved is true when this run published the benchmark snapshot; false
	// when the remote already held it.
	Saved bool `json:"saved"`
	// Invalidated is true when this run invalidated the key of the
	// snapshot it saved (no --keep), so the remote never gives it out
	// again and the next run saves afresh.
	Invalidated bool  `json:"invalidated"`
	SizeBytes   int64 `json:"size_bytes"`
	ChunkSize   int64 `json:"chunk_size"`
	Chunks      int   `json:"chunks"`
	Runs        int   `json:"runs"`
	// CpMBs is `cp` of the same file on the same disk: the baseline.
	CpMS  float64 `json:"cp_ms"`
	CpMBs float64 `json:"cp_mb_s"`
	// Cold: a lazy sequential read of the whole file into an empty local
	// cache, every chunk fetched from the remote (with read-ahead).
	ColdReadMS  float64 `json:"cold_read_ms"`
	ColdReadMBs float64 `json:"cold_read_mb_s"`
	ColdReadXCp float64 `json:"cold_read_x_cp"` // throughput ratio to cp
	// Warm: the same read from the local cache the cold read filled,
	// opened again (blobs verified on first read, as after a restart).
	WarmReadMS  float64 `json:"warm_read_ms"`
	WarmReadMBs float64 `json:"warm_read_mb_s"`
	WarmReadXCp float64 `json:"warm_read_x_cp"`
	// First byte of each chunk not yet fetched, read-ahead off: from the
	// remote into an empty cache, and from the warm local cache.
	ColdFirstByteP50US float64 `json:"cold_first_byte_p50_us"`
	ColdFirstByteP99US float64 `json:"cold_first_byte_p99_us"`
	WarmFirstByteP50US float64 `json:"warm_first_byte_p50_us"`
	WarmFirstByteP99US float64 `json:"warm_first_byte_p99_us"`
}

func newBenchCmd() *cobra.Command {
	var (
		cf      cacheFlags
		size    string
		runs    int
		workDir string
		asJSON  bool
		keep    bool
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure cold and warm lazy reads through the remote and the local cache against cp of the same file",
		Long: `bench saves a synthetic VM-like file to --remote, then measures, against cp of
the same file on the same disk: a lazy sequential read into an empty local cache, the time to the first byte
of unfetched chunks (p50/p99), and the same from the local cache. Scratch files (the file, its copy and the
local caches) live in a fresh directory under --work-dir, removed at the end. The snapshot it saved is
invalidated at the end (its key gets a fresh version id, as snaploader invalidate does: the remote never
gives it out again, and its blobs go as the remote drops unused data) unless --keep, which leaves it for
later runs to reuse. Pin the command to a CPU
(taskset -c 0 snaploader bench ...) to keep it off the server's.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			n, err := parseBytes("--size", size)
			if err != nil {
				return err
			}
			if cf.remote.primary() == "" {
				return usagef("--remote is required")
			}
			cf.remote.required = true // what is measured is the remote
			if runs <= 0 {
				return usagef("--runs %d: want at least 1", runs)
			}
			rep, err := runBench(cmd.Context(), cf, n, runs, workDir, keep)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(os.Stdout, rep)
			}
			printBench(os.Stdout, rep)
			return nil
		},
	}
	cf.register(cmd)
	cmd.Flags().StringVar(&size, "size", "256MiB", "size of the synthetic file (bytes, or KiB/MiB/GiB)")
	cmd.Flags().IntVar(&runs, "runs", 3, "measured runs of each figure (after one warm-up run), alternated; medians are reported")
	cmd.Flags().StringVar(&workDir, "work-dir", "", "where scratch files go (default: the directory holding --cache-dir, i.e. the cache's disk)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	cmd.Flags().BoolVar(&keep, "keep", false, "keep the benchmark snapshot on the remote for later runs to reuse (default: invalidate its key at the end)")
	return cmd
}

// benchKeys is the key of the benchmark snapshot of a given size: the same
// as the flags --instance snaploader-bench --config-hash bench-v1-SIZE
// --ref snaploader-bench give any other command.
func benchKeys(size int64) keyFlags {
	return keyFlags{instance: "snaploader-bench", configHash: fmt.Sprintf("bench-v1-%d", size), ref: "snaploader-bench"}
}

func runBench(ctx context.Context, cf cacheFlags, size int64, runs int, workDir string, keep bool) (_ *benchReport, err error) {
	if workDir == "" {
		dir := cf.dir
		if dir == "" {
			var err error
			if dir, err = defaultCacheDir(); err != nil {
				return nil, err
			}
		}
		workDir = filepath.Dir(filepath.Clean(dir))
	}
	if err := os.MkdirAll(workDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating the scratch directory under %s: %w", workDir, err)
	}
	work, err := os.MkdirTemp(workDir, "snaploader-bench-")
	if err != nil {
		return nil, fmt.Errorf("creating the scratch directory: %w", err)
	}
	defer os.RemoveAll(work)
	src := filepath.Join(work, benchFile)
	if err := writeBenchFile(src, size); err != nil {
		return nil, fmt.Errorf("writing the synthetic file %s: %w", src, err)
	}
	rep := &benchReport{Remote: cf.remote.primary(), SizeBytes: size, Runs: runs}
	if err := ensureBenchSnapshot(ctx, cf, filepath.Join(work, "seed-cache"), src, rep); err != nil {
		return nil, err
	}
	if rep.Saved && !keep {
		// Also when a measurement fails: the snapshot is this run's own.
		defer func() {
			if ierr := invalidateBench(ctx, cf, filepath.Join(work, "invalidate-cache"), size); ierr != nil {
				err = errors.Join(err, fmt.Errorf("invalidating the benchmark snapshot %s (run with --keep to keep it): %w", rep.SnapshotID, ierr))
				return
			}
			rep.Invalidated = true
		}()
	}
	var cp, cold, warm []float64
	var coldFB, warmFB []time.Duration
	for round := range runs + 1 {
		dst := filepath.Join(work, "copy")
		t := time.Now()
		if out, err := exec.CommandContext(ctx, "cp", src, dst).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("cp %s: %v: %s", src, err, out)
		}
		cpT := time.Since(t)
		os.Remove(dst)

		dir := filepath.Join(work, fmt.Sprintf("cache-%d", round))
		coldT, err := benchRead(ctx, cf, dir, true, size)
		if err != nil {
			return nil, fmt.Errorf("cold lazy read: %w", err)
		}
		warmT, err := benchRead(ctx, cf, dir, false, size)
		if err != nil {
			return nil, fmt.Errorf("warm lazy read: %w", err)
		}
		os.RemoveAll(dir)
		cfb, err := benchFirstBytes(ctx, cf, dir, true, size)
		if err != nil {
			return nil, fmt.Errorf("cold first bytes: %w", err)
		}
		wfb, err := benchFirstBytes(ctx, cf, dir, false, size)
		if err != nil {
			return nil, fmt.Errorf("warm first bytes: %w", err)
		}
		os.RemoveAll(dir)
		if round == 0 {
			continue // warm-up
		}
		cp = append(cp, cpT.Seconds())
		cold = append(cold, coldT.Seconds())
		warm = append(warm, warmT.Seconds())
		coldFB = append(coldFB, cfb...)
		warmFB = append(warmFB, wfb...)
	}
	mbs := func(s float64) float64 { return float64(size) / 1e6 / s }
	rep.CpMS, rep.CpMBs = median(cp)*1e3, mbs(median(cp))
	rep.ColdReadMS, rep.ColdReadMBs = median(cold)*1e3, mbs(median(cold))
	rep.WarmReadMS, rep.WarmReadMBs = median(warm)*1e3, mbs(median(warm))
	rep.ColdReadXCp = rep.ColdReadMBs / rep.CpMBs
	rep.WarmReadXCp = rep.WarmReadMBs / rep.CpMBs
	rep.ColdFirstByteP50US, rep.ColdFirstByteP99US = percentileUS(coldFB, 50), percentileUS(coldFB, 99)
	rep.WarmFirstByteP50US, rep.WarmFirstByteP99US = percentileUS(warmFB, 50), percentileUS(warmFB, 99)
	return rep, nil
}

// writeBenchFile writes size bytes of VM-like content, the same for a given
// size: a quarter of the 64 KiB runs are zeros (holes inside chunks), one
// chunk in eight is all zeros, the rest is random.
func writeBenchFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(uint64(size), 9))
	buf := make([]byte, cow.DefaultChunkSize)
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		if rng.IntN(8) == 0 {
			continue
		}
		b := buf[:n]
		for r := 0; r < len(b); r += 64 << 10 {
			run := b[r:min(len(b), r+64<<10)]
			if rng.IntN(4) == 0 {
				clear(run)
				continue
			}
			fillRandom(run, rng)
		}
		if _, err := f.WriteAt(b, off); err != nil {
			return err
		}
	}
	return f.Close()
}

// openBench opens the caches with the local cache in dir; without remote
// it is the local cache alone.
func openBench(ctx context.Context, cf cacheFlags, dir string, remote bool) (*env, error) {
	cf.dir = dir
	cf.maxBytes = DefaultCacheBytes
	cf.metricsFile, cf.metricsAddr = "", ""
	if !remote {
		cf.remote.urls = nil
	}
	e, err := cf.open(ctx)
	if err != nil {
		return nil, err
	}
	if remote && e.loader.RemoteDown() != nil {
		e.Close()
		return nil, fmt.Errorf("remote %s: %w", cf.remote.primary(), e.loader.RemoteDown())
	}
	return e, nil
}

// ensureBenchSnapshot finds the benchmark snapshot of rep.SizeBytes on the
// remote, or saves src there.
func ensureBenchSnapshot(ctx context.Context, cf cacheFlags, dir, src string, rep *benchReport) error {
	defer os.RemoveAll(dir)
	e, err := openBench(ctx, cf, dir, true)
	if err != nil {
		return err
	}
	defer e.Close()
	kf := benchKeys(rep.SizeBytes)
	ks, err := kf.keySet(ctx, e)
	if err != nil {
		return err
	}
	snap, err := e.loader.GetSnapshot(ctx, ks, snapshot.GetOptions{ReadPolicy: snapshot.Newest})
	if err == nil && snap.Source == snapshot.SourceRemote && benchSnapshotFits(snap, rep.SizeBytes) {
		rep.SnapshotID = snap.Manifest.GetVmMetadata().GetSnapshotId()
		rep.ChunkSize, rep.Chunks = benchChunks(snap)
		return nil
	}
	if err := e.loader.RemoteDown(); err != nil {
		return fmt.Errorf("remote %s: %w", cf.remote.primary(), err)
	}
	s, _, err := cow.FromFile(ctx, benchFile, src, e.local, e.local, cow.Options{Namespace: e.loader.Namespace(ks.GetWriteKey()), TempDir: e.local.TempDir()})
	if err != nil {
		return fmt.Errorf("splitting %s: %w", src, err)
	}
	defer s.Close()
	res, err := e.loader.CacheSnapshot(ctx, &snapshot.SaveRequest{Key: ks.GetWriteKey(), Chunked: []*cow.Store{s}, Local: true, Remote: true})
	if err != nil {
		return fmt.Errorf("saving the benchmark snapshot to %s: %w", cf.remote.primary(), err)
	}
	if !res.PublishedRemote {
		return fmt.Errorf("saving the benchmark snapshot to %s: not published (%v)", cf.remote.primary(), res.RemoteError)
	}
	rep.Saved, rep.SnapshotID = true, res.SnapshotID
	rep.ChunkSize, rep.Chunks = s.ChunkSize(), len(s.ChunkedFile().GetChunks())
	return nil
}

// invalidateBench gives the benchmark key of size bytes a fresh version
// id on the remote, so that the snapshot saved under the old one is never
// given out again.
func invalidateBench(ctx context.Context, cf cacheFlags, dir string, size int64) error {
	defer os.RemoveAll(dir)
	e, err := openBench(ctx, cf, dir, true)
	if err != nil {
		return err
	}
	defer e.Close()
	kf := benchKeys(size)
	ks, err := kf.keySet(ctx, e)
	if err != nil {
		return err
	}
	_, err = e.loader.Invalidate(ctx, ks.GetBranchKey())
	return err
}

func benchSnapshotFits(snap *snapshot.Snapshot, size int64) bool {
	for _, cf := range snap.Manifest.GetChunkedFiles() {
		if cf.GetName() == benchFile {
			return cf.GetSize() == size
		}
	}
	return false
}

func benchChunks(snap *snapshot.Snapshot) (int64, int) {
	for _, cf := range snap.Manifest.GetChunkedFiles() {
		if cf.GetName() == benchFile {
			return cf.GetChunkSize(), len(cf.GetChunks())
		}
	}
	return 0, 0
}

// benchOpen finds the benchmark snapshot of size bytes through the caches
// in dir and opens its lazy store.
func benchOpen(ctx context.Context, cf cacheFlags, dir string, remote bool, size int64, readAhead int) (*env, *snapshot.Unpacked, *cow.Store, error) {
	e, err := openBench(ctx, cf, dir, remote)
	if err != nil {
		return nil, nil, nil, err
	}
	fail := func(err error) (*env, *snapshot.Unpacked, *cow.Store, error) {
		e.Close()
		return nil, nil, nil, err
	}
	kf := benchKeys(size)
	ks, err := kf.keySet(ctx, e)
	if err != nil {
		return fail(err)
	}
	policy := snapshot.LocalFirst
	if !remote {
		policy = snapshot.LocalOnly
	}
	snap, err := e.loader.GetSnapshot(ctx, ks, snapshot.GetOptions{ReadPolicy: policy})
	if err != nil {
		return fail(fmt.Errorf("finding the benchmark snapshot: %w", err))
	}
	out := filepath.Join(dir, "unpacked")
	if err := os.MkdirAll(out, 0o755); err != nil {
		return fail(err)
	}
	// The scratch directory is the benchmark's own: an earlier read may
	// have unpacked the same snapshot there.
	u, err := e.loader.UnpackSnapshot(ctx, snap, out, snapshot.UnpackOptions{ReadAhead: readAhead, Replace: true})
	if err != nil {
		return fail(err)
	}
	s := u.Stores[benchFile]
	if s == nil || s.Size() != size {
		u.Close()
		return fail(fmt.Errorf("benchmark snapshot %s has no chunked file %q of %d bytes", snap.Manifest.GetVmMetadata().GetSnapshotId(), benchFile, size))
	}
	return e, u, s, nil
}

// benchRead times a lazy sequential read of the whole benchmark file, 1 MiB
// at a time, through the caches in dir (from the remote when cold).
func benchRead(ctx context.Context, cf cacheFlags, dir string, cold bool, size int64) (time.Duration, error) {
	e, u, s, err := benchOpen(ctx, cf, dir, cold, size, 0)
	if err != nil {
		return 0, err
	}
	defer e.Close()
	defer u.Close()
	buf := make([]byte, 1<<20)
	t := time.Now()
	for off := int64(0); off < size; off += int64(len(buf)) {
		n, err := s.ReadAt(buf, off)
		if err != nil && err != io.EOF {
			return 0, err
		}
		if n == 0 {
			return 0, fmt.Errorf("reading %s at offset %d: no bytes", benchFile, off)
		}
	}
	return time.Since(t), nil
}

// benchFirstBytes reads the first byte of every chunk, in order, with
// read-ahead off, so that each read waits for its chunk alone; it returns
// each read's latency.
func benchFirstBytes(ctx context.Context, cf cacheFlags, dir string, cold bool, size int64) ([]time.Duration, error) {
	e, u, s, err := benchOpen(ctx, cf, dir, cold, size, -1)
	if err != nil {
		return nil, err
	}
	defer e.Close()
	defer u.Close()
	one := make([]byte, 1)
	var lat []time.Duration
	for _, c := range s.ChunkedFile().GetChunks() {
		t := time.Now()
		if _, err := s.ReadAt(one, c.GetOffset()); err != nil {
			return nil, err
		}
		lat = append(lat, time.Since(t))
	}
	if len(lat) == 0 {
		return nil, fmt.Errorf("benchmark file %s has no chunks", benchFile)
	}
	return lat, nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// percentileUS is the p-th percentile of lat in microseconds (nearest rank).
func percentileUS(lat []time.Duration, p int) float64 {
	if len(lat) == 0 {
		return 0
	}
	s := slices.Clone(lat)
	slices.Sort(s)
	i := min(len(s)-1, max(0, (len(s)*p+99)/100-1))
	return float64(s[i].Nanoseconds()) / 1e3
}

func printBench(w io.Writer, r *benchReport) {
	how := "reused"
	switch {
	case r.Invalidated:
		how = "saved, invalidated at the end"
	case r.Saved:
		how = "saved"
	}
	fmt.Fprintf(w, "benchmark snapshot %s (%s, %s in %d chunks of %d bytes) on %s; medians of %d runs\n",
		r.SnapshotID, how, humanBytes(r.SizeBytes), r.Chunks, r.ChunkSize, r.Remote, r.Runs)
	fmt.Fprintf(w, "%-36s %10s %10s %8s\n", "", "ms", "MB/s", "x cp")
	fmt.Fprintf(w, "%-36s %10.1f %10.0f %8.2f\n", "cp of the same file", r.CpMS, r.CpMBs, 1.0)
	fmt.Fprintf(w, "%-36s %10.1f %10.0f %8.2f\n", "lazy read, cold (from the remote)", r.ColdReadMS, r.ColdReadMBs, r.ColdReadXCp)
	fmt.Fprintf(w, "%-36s %10.1f %10.0f %8.2f\n", "lazy read, warm (local cache)", r.WarmReadMS, r.WarmReadMBs, r.WarmReadXCp)
	fmt.Fprintf(w, "first byte of an unfetched chunk: cold p50 %.0f µs, p99 %.0f µs; warm p50 %.0f µs, p99 %.0f µs\n",
		r.ColdFirstByteP50US, r.ColdFirstByteP99US, r.WarmFirstByteP50US, r.WarmFirstByteP99US)
}
