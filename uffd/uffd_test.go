package uffd

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// stubRegions mirrors how the stub splits memory into regions of pg-byte
// pages.
func stubRegions(size int64, n int, pg int64) [][2]int64 {
	per := size / int64(n) / pg * pg
	var out [][2]int64
	for i := 0; i < n; i++ {
		off, end := int64(i)*per, int64(i+1)*per
		if i == n-1 {
			end = size
		}
		out = append(out, [2]int64{off, end})
	}
	return out
}

// blockCounts returns how many blocks sequential touching faults, and how
// many of them hold data (are not entirely holes).
func blockCounts(size int64, nregions int, block int64, isHole func(off int64) bool) (blocks, dataBlocks int) {
	for _, r := range stubRegions(size, nregions, page) {
		for b := r[0] / block; b*block < r[1]; b++ {
			lo, hi := max(b*block, r[0]), min((b+1)*block, r[1])
			blocks++
			for off := lo; off < hi; off += page {
				if isHole == nil || !isHole(off) {
					dataBlocks++
					break
				}
			}
		}
	}
	return
}

func TestServeRestoresMemory(t *testing.T) {
	requireUffd(t)
	const mib = 1 << 20
	tests := []struct {
		name      string
		size      int64
		chunk     int64 // Options.ChunkSize
		holeChunk int64 // granularity of holes in the file
		holes     []int64
		checker   bool // Memory implements HoleChecker
		regions   int
		args      []string
	}{
		{name: "pages", size: 4 * mib, holeChunk: 256 << 10, holes: []int64{3, 9}, checker: true, regions: 2},
		{name: "256KiB blocks with holes", size: 6 * mib, chunk: 256 << 10, holeChunk: 256 << 10, holes: []int64{0, 5, 6, 23}, checker: true, regions: 2},
		{name: "store chunk size 4096000", size: 12 * mib, chunk: 4096000, holeChunk: 4096000, holes: []int64{1}, checker: true, regions: 2},
		{name: "chunk rounded up to pages", size: 3 * mib, chunk: 100000, holeChunk: 102400, holes: []int64{4}, checker: true, regions: 3},
		{name: "holes read without checker", size: 4 * mib, chunk: 512 << 10, holeChunk: 512 << 10, holes: []int64{2}, regions: 2},
		{name: "legacy page_size_kib", size: 2 * mib, chunk: 64 << 10, holeChunk: 64 << 10, regions: 2, args: []string{"-legacy"}},
		{name: "one region", size: 2 * mib, chunk: 128 << 10, holeChunk: 128 << 10, holes: []int64{1}, checker: true, regions: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path, _ := memFile(t, tc.size, tc.holeChunk, tc.holes...)
			fm := openMem(t, path)
			var mem Memory = fm
			var isHole func(int64) bool
			if tc.checker {
				hm := &holeMem{fileMem: fm, chunk: tc.holeChunk, holes: map[int64]bool{}}
				for _, h := range tc.holes {
					hm.holes[h] = true
				}
				mem, isHole = hm, hm.IsHole
			}
			s := serve(t, context.Background(), mem, Options{ChunkSize: tc.chunk})
			st := startStub(t, s.sock, path, append([]string{"-regions", fmt.Sprint(tc.regions)}, tc.args...)...)
			if err := st.finish(t, 60*time.Second); err != nil {
				t.Fatalf("stub: %v; stderr: %s", err, st.stderr.String())
			}
			if st.result == nil || st.result.Result != "ok" || st.result.Mismatches != 0 {
				t.Fatalf("stub result %+v", st.result)
			}
			totalPages := tc.size / page
			if st.result.Pages != int(totalPages) {
				t.Fatalf("stub checked %d pages, want %d", st.result.Pages, totalPages)
			}
			if err := s.wait(t, 10*time.Second); err != nil {
				t.Fatalf("Serve: %v", err)
			}

			stats := s.srv.Stats()
			var holePages uint64
			if isHole != nil {
				for off := int64(0); off < tc.size; off += page {
					if isHole(off) {
						holePages++
					}
				}
			}
			block := max((tc.chunk+page-1)/page*page, page)
			blocks, dataBlocks := blockCounts(tc.size, tc.regions, block, isHole)
			if got := stats.PagesCopied + stats.ZeroPages; got != uint64(totalPages) {
				t.Errorf("pages installed = %d copied + %d zero, want %d", stats.PagesCopied, stats.ZeroPages, totalPages)
			}
			if stats.ZeroPages != holePages {
				t.Errorf("ZeroPages = %d, want %d hole pages", stats.ZeroPages, holePages)
			}
			if stats.BytesCopied != stats.PagesCopied*page || stats.BytesRead != stats.BytesCopied {
				t.Errorf("BytesCopied %d, BytesRead %d, PagesCopied %d", stats.BytesCopied, stats.BytesRead, stats.PagesCopied)
			}
			if stats.Faults != uint64(blocks) {
				t.Errorf("Faults = %d, want one per block: %d", stats.Faults, blocks)
			}
			if stats.Fetches != uint64(dataBlocks) {
				t.Errorf("Fetches = %d, want %d blocks holding data", stats.Fetches, dataBlocks)
			}
			var hist uint64
			for _, b := range stats.Latency {
				hist += b.Count
			}
			if hist != stats.Faults || stats.LatencyP50 <= 0 || stats.LatencyP99 < stats.LatencyP50 || stats.LatencyMax < stats.LatencyP99 {
				t.Errorf("latency histogram holds %d faults (want %d), p50 %v p99 %v max %v", hist, stats.Faults, stats.LatencyP50, stats.LatencyP99, stats.LatencyMax)
			}
		})
	}
}

func TestServeDontneedServesZeros(t *testing.T) {
	requireUffd(t)
	const size = 4 << 20
	path, _ := memFile(t, size, 1)
	s := serve(t, context.Background(), openMem(t, path), Options{ChunkSize: 256 << 10})
	// 512 KiB straddling the boundary between the stub's two regions.
	lo, n := int64(size/2-256<<10), int64(512<<10)
	st := startStub(t, s.sock, path, "-dontneed", fmt.Sprintf("%d:%d", lo, n))
	if err := st.finish(t, 60*time.Second); err != nil {
		t.Fatalf("stub: %v (result %+v); stderr: %s", err, st.result, st.stderr.String())
	}
	if st.result.DontneedPages != int(n/page) || st.result.DontneedNonzero != 0 || st.result.Mismatches != 0 {
		t.Fatalf("stub result %+v", st.result)
	}
	if err := s.wait(t, 10*time.Second); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	stats := s.srv.Stats()
	if stats.Removes == 0 || stats.RemovedPages != uint64(n/page) {
		t.Errorf("Removes = %d, RemovedPages = %d, want > 0 and %d", stats.Removes, stats.RemovedPages, n/page)
	}
	if stats.ZeroPages != uint64(n/page) {
		t.Errorf("ZeroPages = %d, want the %d released pages", stats.ZeroPages, n/page)
	}
	if stats.PagesCopied != size/page {
		t.Errorf("PagesCopied = %d, want %d (released pages are not copied again)", stats.PagesCopied, size/page)
	}
}

func TestServeReadErrorKillsVMM(t *testing.T) {
	requireUffd(t)
	const size = 4 << 20
	const chunk = 256 << 10
	bad := int64(3*size/4 + 5*page + 17) // inside region 1
	badBlock := bad / chunk * chunk
	for _, opts := range []Options{{ChunkSize: chunk}, {}} {
		t.Run(fmt.Sprintf("chunk=%d", opts.ChunkSize), func(t *testing.T) {
			path, _ := memFile(t, size, 1)
			s := serve(t, context.Background(), &failMem{fileMem: openMem(t, path), bad: bad}, opts)
			st := startStub(t, s.sock, path)
			err := s.wait(t, 30*time.Second)
			if status.Code(err) != codes.DataLoss {
				t.Fatalf("Serve error %v (code %v), want Internal", err, status.Code(err))
			}
			wantOff := badBlock
			if opts.ChunkSize == 0 {
				wantOff = bad / page * page
			}
			if !strings.Contains(err.Error(), fmt.Sprintf("offset %d", wantOff)) {
				t.Errorf("Serve error %q does not name offset %d", err, wantOff)
			}
			werr := st.finish(t, 10*time.Second)
			var ee *exec.ExitError
			if !errors.As(werr, &ee) {
				t.Fatalf("stub exited with %v, want killed", werr)
			}
			ws := ee.Sys().(syscall.WaitStatus)
			if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
				t.Errorf("stub status %v, want killed by SIGKILL", ws)
			}
			if st.result != nil {
				t.Errorf("stub reported a result %+v though its memory could not be served", st.result)
			}
			if stats := s.srv.Stats(); stats.PagesCopied*page > uint64(bad) {
				t.Errorf("%d pages copied: pages at or beyond the bad offset were served", stats.PagesCopied)
			}
		})
	}
}

func TestServeSlowBlockDoesNotStallOthers(t *testing.T) {
	requireUffd(t)
	const size = 4 << 20
	const chunk = 256 << 10
	path, _ := memFile(t, size, 1)
	gm := &gateMem{fileMem: openMem(t, path), lo: 2 * chunk, hi: 3 * chunk, open: make(chan struct{}), blocked: make(chan struct{})}
	s := serve(t, context.Background(), gm, Options{ChunkSize: chunk, Parallelism: 4})
	st := startStub(t, s.sock, path, "-background", fmt.Sprint(2*chunk+page),
		"-touch", fmt.Sprintf("0:%d,%d:%d", 2*chunk, 3*chunk, size-3*chunk))
	select {
	case <-gm.blocked:
	case <-time.After(30 * time.Second):
		t.Fatal("the gated block was never read")
	}
	// Every other page is served while the gated block's read is stuck.
	st.waitEvent(t, "touched", 30*time.Second)
	close(gm.open)
	if err := st.finish(t, 30*time.Second); err != nil {
		t.Fatalf("stub: %v; stderr: %s", err, st.stderr.String())
	}
	if st.result == nil || st.result.Result != "ok" || !st.result.BackgroundChecked {
		t.Fatalf("stub result %+v", st.result)
	}
	if err := s.wait(t, 10*time.Second); err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

func waitGoroutines(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > want {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines, want <= %d:\n%s", runtime.NumGoroutine(), want, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestServeVMMExitMidRestore(t *testing.T) {
	requireUffd(t)
	const size = 8 << 20
	path, _ := memFile(t, size, 1)
	mem := openMem(t, path)
	for _, keep := range []bool{false, true} {
		t.Run(fmt.Sprintf("keepSocket=%v", keep), func(t *testing.T) {
			fds, gs := openFDs(t), runtime.NumGoroutine()
			s := serve(t, context.Background(), mem, Options{ChunkSize: 64 << 10})
			args := []string{"-exit-after", "300"}
			if keep {
				args = append(args, "-keep-socket")
			}
			st := startStub(t, s.sock, path, args...)
			if err := st.finish(t, 30*time.Second); err != nil {
				t.Fatalf("stub: %v; stderr: %s", err, st.stderr.String())
			}
			start := time.Now()
			if err := s.wait(t, 5*time.Second); err != nil {
				t.Fatalf("Serve: %v", err)
			}
			t.Logf("Serve returned %v after the VMM exited", time.Since(start))
			if got := s.srv.Stats().PagesCopied; got < 300 || got >= size/page {
				t.Errorf("PagesCopied = %d, want a partial restore", got)
			}
			s.lis.Close()
			waitGoroutines(t, gs)
			if got := openFDs(t); got != fds {
				t.Errorf("open fds: %d before, %d after", fds, got)
			}
		})
	}
}

func TestServeContextCancelKillsVMM(t *testing.T) {
	requireUffd(t)
	const size = 2 << 20
	const chunk = 128 << 10
	path, _ := memFile(t, size, 1)
	gm := &gateMem{fileMem: openMem(t, path), lo: 0, hi: chunk, open: make(chan struct{}), blocked: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := serve(t, ctx, gm, Options{ChunkSize: chunk})
	st := startStub(t, s.sock, path, "-background", "0", "-touch", "none")
	<-gm.blocked
	cancel()
	werr := st.finish(t, 10*time.Second)
	var ee *exec.ExitError
	if !errors.As(werr, &ee) || !ee.Sys().(syscall.WaitStatus).Signaled() {
		t.Fatalf("stub exited with %v, want killed", werr)
	}
	close(gm.open)
	if err := s.wait(t, 10*time.Second); !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve: %v, want context.Canceled", err)
	}
}

func TestServeCanceledBeforeConnect(t *testing.T) {
	path, _ := memFile(t, 1<<20, 1)
	ctx, cancel := context.WithCancel(context.Background())
	s := serve(t, ctx, openMem(t, path), Options{})
	time.Sleep(20 * time.Millisecond)
	cancel()
	if err := s.wait(t, 5*time.Second); !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve: %v, want context.Canceled", err)
	}
	if err := s.srv.Serve(context.Background(), nil); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("second Serve: %v, want FailedPrecondition", err)
	}
}
