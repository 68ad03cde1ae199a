package e2e

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

// writeMiBImage writes the image of the client CPU benchmark: MiBs of
// which 30% are zero and the rest half random, half one repeated byte.
func writeMiBImage(b *testing.B, path string, mib int) []byte {
	b.Helper()
	r := rand.New(rand.NewPCG(18, 5))
	img := make([]byte, mib<<20)
	for i := range mib {
		m := img[i<<20 : (i+1)<<20]
		switch x := r.IntN(100); {
		case x < 30:
		case x < 65:
			for j := range m {
				m[j] = byte(r.Uint32())
			}
		default:
			for j, v := 0, byte(1+r.IntN(255)); j < len(m); j++ {
				m[j] = v
			}
		}
	}
	if err := os.WriteFile(path, img, 0o644); err != nil {
		b.Fatal(err)
	}
	return img
}

// clientRun is one pinned client process: its wall time and CPU seconds
// (user plus system, from its rusage).
type clientRun struct {
	wall time.Duration
	cpu  float64
}

// runPinnedCPU is runPinned that also returns the client's CPU seconds.
func runPinnedCPU(b *testing.B, name string, args ...string) clientRun {
	b.Helper()
	cmd := pinned(clientCPU, name, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	t := time.Now()
	if err := cmd.Run(); err != nil {
		b.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	ps := cmd.ProcessState
	return clientRun{time.Since(t), (ps.UserTime() + ps.SystemTime()).Seconds()}
}

// BenchmarkColdRestoreCPU measures the client's CPU seconds per GiB of a
// full cold `snaploader restore` (empty cache, empty --out) through a
// `serve` on another CPU (the two-host emulation of BenchmarkColdHost),
// of an image of SNAPLOADER_BENCH_MIB MiB (default 512) that is 30% zero
// MiBs and half random, half repeated bytes in the rest. With
// SNAPLOADER_BENCH_OLD_BINARY naming another build (the previous commit's),
// every iteration runs both clients in turn, against the same serve, and
// the ratios of their medians are reported:
//
//	git -C /work/main archive 6a03955 | tar -x -C /tmp/old && (cd /tmp/old && go build -o /tmp/snaploader-old ./cmd/snaploader)
//	SNAPLOADER_BENCH_OLD_BINARY=/tmp/snaploader-old go test -run '^$' -bench ColdRestoreCPU -benchtime 3x ./e2e/
func BenchmarkColdRestoreCPU(b *testing.B) {
	if runtime.NumCPU() < 2 {
		b.Skip("needs two CPUs to pin the server and the client apart")
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		b.Skip("taskset not installed")
	}
	mib := int(testutil.BenchMiB(b, 512))
	gib := float64(mib) / 1024
	work := b.TempDir()
	src := filepath.Join(work, "memory.img")
	img := writeMiBImage(b, src, mib)
	url := startPinnedServe(b)
	key := []string{"--instance", "restore-cpu", "--config-hash", fmt.Sprintf("restore-cpu-%d", mib), "--ref", "main"}
	runPinnedCPU(b, binary, append([]string{"save", "--cache-dir", filepath.Join(work, "save-cache"), "--remote", url,
		"--chunked", "memory.img=" + src}, key...)...)
	os.RemoveAll(filepath.Join(work, "save-cache"))

	clients := []string{binary}
	if old := os.Getenv("SNAPLOADER_BENCH_OLD_BINARY"); old != "" {
		clients = append(clients, old)
	}
	runs := make([][]clientRun, len(clients))
	round := func(record bool) {
		for i, bin := range clients {
			cacheDir, out := filepath.Join(work, "cache"), filepath.Join(work, "out")
			os.RemoveAll(cacheDir)
			os.RemoveAll(out)
			r := runPinnedCPU(b, bin, append([]string{"restore", "--cache-dir", cacheDir, "--out", out, "--remote", url}, key...)...)
			got, err := os.ReadFile(filepath.Join(out, "memory.img"))
			if err != nil || !bytes.Equal(got, img) {
				b.Fatalf("%s restored other bytes (%v)", bin, err)
			}
			if record {
				runs[i] = append(runs[i], r)
			}
		}
	}
	round(false) // warm-up
	b.SetBytes(int64(mib) << 20)
	for b.Loop() {
		round(true)
	}
	med := func(rs []clientRun) (cpu, wall float64) {
		cs, ws := make([]float64, len(rs)), make([]float64, len(rs))
		for i, r := range rs {
			cs[i], ws[i] = r.cpu, r.wall.Seconds()
		}
		slices.Sort(cs)
		slices.Sort(ws)
		return cs[len(cs)/2], ws[len(ws)/2]
	}
	cpu, wall := med(runs[0])
	b.ReportMetric(cpu/gib, "client-CPU-s/GiB")
	b.ReportMetric(wall, "restore-s")
	if len(clients) > 1 {
		oldCPU, oldWall := med(runs[1])
		b.ReportMetric(oldCPU/gib, "old-client-CPU-s/GiB")
		b.ReportMetric(oldWall, "old-restore-s")
		b.ReportMetric(cpu/oldCPU, "CPU-x-old")
		b.ReportMetric(wall/oldWall, "time-x-old")
	}
}
