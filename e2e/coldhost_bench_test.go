package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// Two hosts on one machine: the server runs on serverCPU, every client
// process (snaploader and the cp baseline) on clientCPU.
const (
	serverCPU = "1"
	clientCPU = "0"
)

// pinned is exec.Command of name and args pinned to cpu with taskset.
func pinned(cpu, name string, args ...string) *exec.Cmd {
	return exec.Command("taskset", append([]string{"-c", cpu, name}, args...)...)
}

// startPinnedServe starts `snaploader serve` over a fresh directory, pinned
// to serverCPU, and returns its URL.
func startPinnedServe(b *testing.B) string {
	url, _ := startPinnedServeWith(b, benchServeFlags()...)
	return url
}

// benchServeFlags are the serve flags of the two-host benchmarks:
// SNAPLOADER_BENCH_COMPRESSION=0 turns off zstd at rest (on by default).
func benchServeFlags() []string {
	if os.Getenv("SNAPLOADER_BENCH_COMPRESSION") == "0" {
		return []string{"--compression=false"}
	}
	return nil
}

// startPinnedServeWith is startPinnedServe with extra serve flags; it also
// returns the process (taskset execs serve: its pid is serve's).
func startPinnedServeWith(b *testing.B, flags ...string) (string, *exec.Cmd) {
	b.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(b))
	cmd := pinned(serverCPU, binary, append([]string{"serve", "--listen", addr, "--cache-dir", b.TempDir()}, flags...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			b.Log("serve: " + sc.Text())
		}
	}()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return "grpc://" + addr, cmd
		}
	}
	b.Fatalf("pinned serve did not listen on %s", addr)
	return "", nil
}

// runPinned runs a client command on clientCPU and returns its duration.
func runPinned(b *testing.B, name string, args ...string) (time.Duration, []byte) {
	b.Helper()
	cmd := pinned(clientCPU, name, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	t := time.Now()
	out, err := cmd.Output()
	d := time.Since(t)
	if err != nil {
		b.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return d, out
}

// BenchmarkColdHost emulates two hosts on this machine: `snaploader serve`
// pinned to CPU 1, the client and the `cp` baseline pinned to CPU 0. It
// reports, as ratios to cp of the same file measured in the same run:
//
//   - `snaploader bench` run pinned (its own alternated medians): a cold
//     lazy sequential read into an empty cache (cold-read-x-cp, a
//     throughput ratio), time to first byte of unfetched chunks
//     (cold-first-byte-p50/p99-µs) and the same from the warm local cache;
//
//   - a full `snaploader restore` into files from serve into an empty cache
//     (cold-restore-x-cp-time: restore time over cp time), and from the
//     local cache it filled (warm-restore-x-cp-time); each iteration runs
//     cp, the cold restore and the warm restore in turn, after a warm-up
//     round, and the medians are reported.
//
//     SNAPLOADER_BENCH_MIB=1024 go test -run '^$' -bench ColdHost -benchtime 5x ./e2e/
//
// SNAPLOADER_BENCH_COMPRESSION=0 runs serve without zstd at rest.
func BenchmarkColdHost(b *testing.B) {
	if runtime.NumCPU() < 2 {
		b.Skip("needs two CPUs to pin the server and the client apart")
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		b.Skip("taskset not installed")
	}
	size := int64(benchMiB(b)) << 20
	url := startPinnedServe(b)
	work := b.TempDir()

	// Lazy reads and first bytes, measured by the operator's command.
	_, out := runPinned(b, binary, "bench", "--remote", url, "--work-dir", work, "--cache-dir", filepath.Join(work, "unused"),
		"--size", fmt.Sprint(size), "--runs", "3", "--json", "--keep")
	var rep struct {
		CpMBs              float64 `json:"cp_mb_s"`
		ColdReadMBs        float64 `json:"cold_read_mb_s"`
		ColdReadXCp        float64 `json:"cold_read_x_cp"`
		WarmReadXCp        float64 `json:"warm_read_x_cp"`
		ColdFirstByteP50US float64 `json:"cold_first_byte_p50_us"`
		ColdFirstByteP99US float64 `json:"cold_first_byte_p99_us"`
		WarmFirstByteP50US float64 `json:"warm_first_byte_p50_us"`
		WarmFirstByteP99US float64 `json:"warm_first_byte_p99_us"`
	}
	if err := json.Unmarshal(out, &rep); err != nil {
		b.Fatalf("bench --json: %v: %s", err, out)
	}

	// Full restores: the benchmark snapshot bench left on the remote.
	key := []string{"--instance", "snaploader-bench", "--config-hash", fmt.Sprintf("bench-v1-%d", size), "--ref", "snaploader-bench"}
	restore := func(cacheDir, outDir string, remote bool) time.Duration {
		args := append([]string{"restore", "--cache-dir", cacheDir, "--out", outDir}, key...)
		if remote {
			args = append(args, "--remote", url)
		} else {
			args = append(args, "--read-policy", "local-only")
		}
		d, _ := runPinned(b, binary, args...)
		return d
	}
	var cp, cold, warm []time.Duration
	src := filepath.Join(work, "baseline.img")
	round := func(i int, record bool) {
		cacheDir := filepath.Join(work, fmt.Sprintf("cache-%d", i))
		coldOut, warmOut := filepath.Join(work, "cold-out"), filepath.Join(work, "warm-out")
		for _, d := range []string{coldOut, warmOut} {
			os.RemoveAll(d)
			if err := os.MkdirAll(d, 0o755); err != nil {
				b.Fatal(err)
			}
		}
		c := restore(cacheDir, coldOut, true)
		if fi, err := os.Stat(filepath.Join(coldOut, "memory.img")); err != nil || fi.Size() != size {
			b.Fatalf("cold restore wrote %v (%v), want %d bytes", fi, err, size)
		}
		if !exists(src) {
			// The baseline file: the restored content with every zero run
			// a hole, whatever holes the restore itself left.
			runPinned(b, "cp", "--sparse=always", filepath.Join(coldOut, "memory.img"), src)
		}
		p, _ := runPinned(b, "cp", src, filepath.Join(work, "cp-copy"))
		os.Remove(filepath.Join(work, "cp-copy"))
		w := restore(cacheDir, warmOut, false)
		os.RemoveAll(cacheDir)
		if record {
			cp, cold, warm = append(cp, p), append(cold, c), append(warm, w)
		}
	}
	round(-1, false) // warm-up
	b.SetBytes(size)
	i := 0
	for b.Loop() {
		round(i, true)
		i++
	}
	mcp := median(cp).Seconds()
	b.ReportMetric(float64(size)/1e6/mcp, "cp-MB/s")
	b.ReportMetric(float64(size)/(1<<20)/median(cold).Seconds(), "cold-restore-MiB/s")
	b.ReportMetric(median(cold).Seconds()/mcp, "cold-restore-x-cp-time")
	b.ReportMetric(median(warm).Seconds()/mcp, "warm-restore-x-cp-time")
	b.ReportMetric(rep.ColdReadMBs, "cold-read-MB/s")
	b.ReportMetric(rep.ColdReadXCp, "cold-read-x-cp")
	b.ReportMetric(rep.WarmReadXCp, "warm-read-x-cp")
	b.ReportMetric(rep.ColdFirstByteP50US, "cold-first-byte-p50-µs")
	b.ReportMetric(rep.ColdFirstByteP99US, "cold-first-byte-p99-µs")
	b.ReportMetric(rep.WarmFirstByteP50US, "warm-first-byte-p50-µs")
	b.ReportMetric(rep.WarmFirstByteP99US, "warm-first-byte-p99-µs")
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
