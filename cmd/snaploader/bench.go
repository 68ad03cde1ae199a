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

// benchKeys is the key of the benchmark snapshot of a given size: the same
// as the flags --instance snaploader-bench --config-hash bench-v1-SIZE
// --ref snaploader-bench give any other command.
func benchKeys(size int64) (keyOptions, error) {
	ph, err := snapshot.PlatformHash(map[string]string{})
	if err != nil {
		return keyOptions{}, err
	}
	return keyOptions{Task: snapshot.Task{
		InstanceName:      "snaploader-bench",
		PlatformHash:      ph,
		ConfigurationHash: fmt.Sprintf("bench-v1-%d", size),
		Env: map[string]string{
			snapshot.EnvBranch:        "snaploader-bench",
			snapshot.EnvBaseBranch:    "",
			snapshot.EnvDefaultBranch: "",
		},
	}}, nil
}

// benchOptions are what bench measures: a synthetic file of Size bytes,
// saved to the remote of Cache (unless it holds it already), read Runs
// times after a warm-up, with scratch files in a new directory under
// WorkDir. Keep leaves the benchmark snapshot on the remote.
type benchOptions struct {
	Cache   cacheOptions
	Size    int64
	Runs    int
	WorkDir string
	Keep    bool
	JSON    bool
}

// runBench measures cold and warm lazy reads against cp and prints the
// report.
func runBench(ctx context.Context, o benchOptions, s streams) error {
	rep, err := measureBench(ctx, o.Cache, o.Size, o.Runs, o.WorkDir, o.Keep)
	if err != nil {
		return err
	}
	if o.JSON {
		return printJSON(s.Out, rep)
	}
	printBench(s.Out, rep)
	return nil
}

// measureBench measures, in a scratch directory under workDir, what
// bench reports.
func measureBench(ctx context.Context, co cacheOptions, size int64, runs int, workDir string, keep bool) (_ *benchReport, err error) {
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
	rep := &benchReport{Remote: co.Remote.primary(), SizeBytes: size, Runs: runs}
	if err := ensureBenchSnapshot(ctx, co, filepath.Join(work, "seed-cache"), src, rep); err != nil {
		return nil, err
	}
	if rep.Saved && !keep {
		// Also when a measurement fails: the snapshot is this run's own.
		defer func() {
			if ierr := invalidateBench(ctx, co, filepath.Join(work, "invalidate-cache"), size); ierr != nil {
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

		// The cold first bytes come first, each from an empty cache: the
		// chunks behind their range reads are not all fetched when the
		// store closes. The cold read then fills the cache that both warm
		// phases read.
		dir := filepath.Join(work, fmt.Sprintf("cache-%d", round))
		cfb, err := benchFirstBytes(ctx, co, dir, true, size)
		if err != nil {
			return nil, fmt.Errorf("cold first bytes: %w", err)
		}
		os.RemoveAll(dir)
		coldT, err := benchRead(ctx, co, dir, true, size)
		if err != nil {
			return nil, fmt.Errorf("cold lazy read: %w", err)
		}
		warmT, err := benchRead(ctx, co, dir, false, size)
		if err != nil {
			return nil, fmt.Errorf("warm lazy read: %w", err)
		}
		wfb, err := benchFirstBytes(ctx, co, dir, false, size)
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
func openBench(ctx context.Context, co cacheOptions, dir string, remote bool) (*env, error) {
	co.Dir = dir
	if !remote {
		co.Remote.URLs = nil
	}
	e, err := openEnv(ctx, co)
	if err != nil {
		return nil, err
	}
	if remote && e.loader.RemoteDown() != nil {
		e.Close()
		return nil, fmt.Errorf("remote %s: %w", co.Remote.primary(), e.loader.RemoteDown())
	}
	return e, nil
}

// ensureBenchSnapshot finds the benchmark snapshot of rep.SizeBytes on the
// remote, or saves src there.
func ensureBenchSnapshot(ctx context.Context, co cacheOptions, dir, src string, rep *benchReport) error {
	defer os.RemoveAll(dir)
	e, err := openBench(ctx, co, dir, true)
	if err != nil {
		return err
	}
	defer e.Close()
	k, err := benchKeys(rep.SizeBytes)
	if err != nil {
		return err
	}
	ks, err := e.keySet(ctx, k)
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
		return fmt.Errorf("remote %s: %w", co.Remote.primary(), err)
	}
	s, _, err := cow.FromFile(ctx, benchFile, src, e.local, e.local, cow.Options{Namespace: e.loader.Namespace(ks.GetWriteKey()), TempDir: e.local.TempDir()})
	if err != nil {
		return fmt.Errorf("splitting %s: %w", src, err)
	}
	defer s.Close()
	res, err := e.loader.CacheSnapshot(ctx, &snapshot.SaveRequest{Key: ks.GetWriteKey(), Chunked: []*cow.Store{s}, Local: true, Remote: true})
	if err != nil {
		return fmt.Errorf("saving the benchmark snapshot to %s: %w", co.Remote.primary(), err)
	}
	if !res.PublishedRemote {
		return fmt.Errorf("saving the benchmark snapshot to %s: not published (%v)", co.Remote.primary(), res.RemoteError)
	}
	rep.Saved, rep.SnapshotID = true, res.SnapshotID
	rep.ChunkSize, rep.Chunks = s.ChunkSize(), len(s.ChunkedFile().GetChunks())
	return nil
}

// invalidateBench gives the benchmark key of size bytes a fresh version
// id on the remote, so that the snapshot saved under the old one is never
// given out again.
func invalidateBench(ctx context.Context, co cacheOptions, dir string, size int64) error {
	defer os.RemoveAll(dir)
	e, err := openBench(ctx, co, dir, true)
	if err != nil {
		return err
	}
	defer e.Close()
	k, err := benchKeys(size)
	if err != nil {
		return err
	}
	ks, err := e.keySet(ctx, k)
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
func benchOpen(ctx context.Context, co cacheOptions, dir string, remote bool, size int64, readAhead int) (*env, *snapshot.Unpacked, *cow.Store, error) {
	e, err := openBench(ctx, co, dir, remote)
	if err != nil {
		return nil, nil, nil, err
	}
	fail := func(err error) (*env, *snapshot.Unpacked, *cow.Store, error) {
		e.Close()
		return nil, nil, nil, err
	}
	k, err := benchKeys(size)
	if err != nil {
		return fail(err)
	}
	ks, err := e.keySet(ctx, k)
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
func benchRead(ctx context.Context, co cacheOptions, dir string, cold bool, size int64) (time.Duration, error) {
	e, u, s, err := benchOpen(ctx, co, dir, cold, size, 0)
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
func benchFirstBytes(ctx context.Context, co cacheOptions, dir string, cold bool, size int64) ([]time.Duration, error) {
	e, u, s, err := benchOpen(ctx, co, dir, cold, size, -1)
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
