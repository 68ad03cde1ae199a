package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

// rssBytes is the resident set of process pid (/proc/PID/status VmRSS).
func rssBytes(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// peakRSS samples pid's resident set every 5 ms until stop is closed and
// returns the largest.
func peakRSS(pid int, stop <-chan struct{}) <-chan int64 {
	out := make(chan int64, 1)
	go func() {
		var peak int64
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			peak = max(peak, rssBytes(pid))
			select {
			case <-stop:
				out <- peak
				return
			case <-t.C:
			}
		}
	}()
	return out
}

// BenchmarkFleetRestore has cold hosts restore one snapshot from one
// `serve` at once: serve pinned to CPU 1 (with memory budgets of 64 MiB for
// uploads and 64 MiB for reads, so a soft memory limit of 256 MiB), every client `snaploader restore` (own empty cache
// directory) pinned to CPU 0. It reports the throughput of one host alone
// and the aggregate of eight together (bytes restored over wall time), and
// serve's peak RSS in each phase, sampled every 5 ms, with its RSS when
// idle and after the snapshot's save.
// SNAPLOADER_BENCH_COMPRESSION=0 runs serve without zstd at rest.
//
//	SNAPLOADER_BENCH_MIB=256 go test -run '^$' -bench FleetRestore -benchtime 3x ./e2e/
func BenchmarkFleetRestore(b *testing.B) {
	if runtime.NumCPU() < 2 {
		b.Skip("needs two CPUs to pin the server and the clients apart")
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		b.Skip("taskset not installed")
	}
	size := testutil.BenchMiB(b, 256) << 20
	url, srv := startPinnedServeWith(b, append(benchServeFlags(), "--max-upload-memory", fmt.Sprint(64<<20), "--max-read-memory", fmt.Sprint(64<<20))...)
	work := b.TempDir()
	idle := rssBytes(srv.Process.Pid)
	// Seed the remote with bench's snapshot (one short run).
	runPinned(b, binary, "bench", "--remote", url, "--work-dir", work, "--cache-dir", filepath.Join(work, "unused"),
		"--size", fmt.Sprint(size), "--runs", "1", "--json", "--keep")
	key := []string{"--instance", "snaploader-bench", "--config-hash", fmt.Sprintf("bench-v1-%d", size), "--ref", "snaploader-bench", "--remote", url}
	seeded := rssBytes(srv.Process.Pid)

	round := 0
	restoreAll := func(hosts int) (time.Duration, int64) {
		round++
		stop := make(chan struct{})
		peak := peakRSS(srv.Process.Pid, stop)
		var wg sync.WaitGroup
		errs := make(chan error, hosts)
		t := time.Now()
		for h := range hosts {
			dir := filepath.Join(work, fmt.Sprintf("r%d-h%d", round, h))
			wg.Add(1)
			go func() {
				defer wg.Done()
				cmd := pinned(clientCPU, binary, append([]string{"restore", "--cache-dir", filepath.Join(dir, "cache"), "--out", filepath.Join(dir, "out")}, key...)...)
				if out, err := cmd.CombinedOutput(); err != nil {
					errs <- fmt.Errorf("host %d: %v\n%s", h, err, out)
				}
			}()
		}
		wg.Wait()
		d := time.Since(t)
		close(stop)
		close(errs)
		for err := range errs {
			b.Fatal(err)
		}
		for h := range hosts {
			dir := filepath.Join(work, fmt.Sprintf("r%d-h%d", round, h))
			if fi, err := os.Stat(filepath.Join(dir, "out", "memory.img")); err != nil || fi.Size() != size {
				b.Fatalf("host %d restored %v (%v), want %d bytes", h, fi, err, size)
			}
			os.RemoveAll(dir)
		}
		return d, <-peak
	}
	restoreAll(1) // warm-up
	var one, eight []time.Duration
	var rss1, rss8 int64
	b.SetBytes(size * 9)
	for b.Loop() {
		d1, p1 := restoreAll(1)
		d8, p8 := restoreAll(8)
		one, eight = append(one, d1), append(eight, d8)
		rss1, rss8 = max(rss1, p1), max(rss8, p8)
	}
	mib := float64(size) / (1 << 20)
	b.ReportMetric(mib/median(one).Seconds(), "one-host-MiB/s")
	b.ReportMetric(8*mib/median(eight).Seconds(), "eight-hosts-aggregate-MiB/s")
	b.ReportMetric(float64(idle)/1e6, "serve-idle-RSS-MB")
	b.ReportMetric(float64(seeded)/1e6, "serve-RSS-after-save-MB")
	b.ReportMetric(float64(rss1)/1e6, "serve-peak-RSS-one-MB")
	b.ReportMetric(float64(rss8)/1e6, "serve-peak-RSS-eight-MB")
}
