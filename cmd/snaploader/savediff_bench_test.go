package main

import (
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

// benchMiB is SNAPLOADER_BENCH_MIB (default 256).
func benchMiB(b *testing.B) int64 { return testutil.BenchMiB(b, 256) }

// benchMemory writes a memory file of VM-like pages: 30% zero pages, the
// rest random.
func benchMemory(b *testing.B, path string, size int64) {
	b.Helper()
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		for p := 0; p < len(buf); p += 4096 {
			page := buf[p : p+4096]
			if r.IntN(10) < 3 {
				clear(page)
				continue
			}
			for i := range page {
				page[i] = byte(r.Uint32())
			}
		}
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off); err != nil {
			b.Fatal(err)
		}
	}
}

// benchDirty dirties 1% of the chunks of the memory file at full: 16
// random pages in each (one of them zeroed), written both into full and
// into a fresh sparse diff file, as a VMM's diff snapshot holds them. It
// returns the dirty bytes.
func benchDirty(b *testing.B, full, diff string, size, cs int64, seed uint64) int64 {
	b.Helper()
	ff, err := os.OpenFile(full, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer ff.Close()
	df, err := os.Create(diff)
	if err != nil {
		b.Fatal(err)
	}
	defer df.Close()
	if err := df.Truncate(size); err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, 5))
	n := (size + cs - 1) / cs
	page := make([]byte, 4096)
	seen := map[int64]bool{}
	for range max(1, n/100) {
		c := r.Int64N(n)
		for i := range 16 {
			off := c*cs + r.Int64N(cs/4096)*4096
			if off+4096 > size || seen[off] {
				continue
			}
			seen[off] = true
			for j := range page {
				page[j] = byte(r.Uint32())
			}
			if i == 0 {
				clear(page)
			}
			if _, err := ff.WriteAt(page, off); err != nil {
				b.Fatal(err)
			}
			if _, err := df.WriteAt(page, off); err != nil {
				b.Fatal(err)
			}
		}
	}
	return int64(len(seen)) * 4096
}

// BenchmarkSaveDiff times the CLI saving a memory file of
// SNAPLOADER_BENCH_MIB MiB three ways: the first save into an empty
// cache; a diff snapshot with 1% of the chunks dirtied, merged over the
// first (save --diff); and the full memory file with the same changes
// saved again over the first (save --chunked, storing only changed
// chunks). It reports each one's milliseconds and how many times faster
// than the first save the diff and full saves are.
func BenchmarkSaveDiff(b *testing.B) {
	size := benchMiB(b) << 20
	dir := b.TempDir()
	mem := filepath.Join(dir, "mem")
	benchMemory(b, mem, size)
	diff := filepath.Join(dir, "mem.diff")
	timed := func(args ...string) (report, time.Duration) {
		cmd := exec.Command(binary, append(args, "--json")...)
		t0 := time.Now()
		out, err := cmd.Output()
		d := time.Since(t0)
		if err != nil {
			b.Fatalf("snaploader %v: %v", args, err)
		}
		var r report
		if err := json.Unmarshal(out, &r); err != nil {
			b.Fatal(err)
		}
		return r, d
	}
	var first, diffT, fullT time.Duration
	var dirty, diffRead int64
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		cacheDir := filepath.Join(dir, "cache")
		os.RemoveAll(cacheDir)
		k := keyArgs(cacheDir)
		b.StartTimer()
		base, d := timed(append(k, "save", "--chunked", "mem="+mem)...)
		first += d
		b.StopTimer()
		dirty += benchDirty(b, mem, diff, size, 4096000, uint64(i+10))
		// The VM runs between saves: the first save's writeback is done
		// by the time the next one starts.
		syscall.Sync()
		b.StartTimer()
		r, d := timed(append(k, "save", "--diff", "mem="+diff, "--diff-base", base.SnapshotID)...)
		diffT += d
		diffRead += r.DiffBytesRead
		b.StopTimer()
		syscall.Sync()
		b.StartTimer()
		_, d = timed(append(k, "save", "--chunked", "mem="+mem)...)
		fullT += d
	}
	n := float64(b.N)
	b.ReportMetric(float64(first.Milliseconds())/n, "first-save-ms")
	b.ReportMetric(float64(diffT.Milliseconds())/n, "diff-save-ms")
	b.ReportMetric(float64(fullT.Milliseconds())/n, "full-resave-ms")
	b.ReportMetric(float64(first)/float64(diffT), "diff-x-faster")
	b.ReportMetric(float64(first)/float64(fullT), "full-resave-x-faster")
	b.ReportMetric(float64(dirty)/n/(1<<20), "dirty-MiB")
	if diffRead != dirty {
		b.Errorf("diff saves read %d bytes, want the %d dirty bytes", diffRead, dirty)
	}
}
