package uffd

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// BenchmarkServe restores 256 MiB of guest memory from a file into the
// stand-in VMM, which reads every 4 KiB of it once, with 4 KiB and with
// 2 MiB (MAP_HUGETLB) guest pages, at page and at chunk granularity. It
// reports the faults per restore and the time the VMM took to touch all
// of its memory.
func BenchmarkServe(b *testing.B) {
	requireUffd(b)
	const size = 256 << 20
	path, _ := memFile(b, size, 1)
	mem := openMem(b, path)
	for _, bc := range []struct {
		huge  bool
		chunk int64
	}{
		{false, 0}, {false, 64 << 10}, {false, 2 << 20}, {false, 4096000}, {false, 4 << 20},
		{true, 0}, {true, 4 << 20},
	} {
		name := fmt.Sprintf("page=4KiB/chunk=%d", bc.chunk)
		args := []string{"-verify=false"}
		if bc.huge {
			name = fmt.Sprintf("page=2MiB/chunk=%d", bc.chunk)
			args = append(args, "-huge")
		}
		b.Run(name, func(b *testing.B) {
			if bc.huge {
				reserveHugePages(b, size/hugePage)
			}
			b.SetBytes(size)
			var faults uint64
			var touch time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				s := serve(b, context.Background(), mem, Options{ChunkSize: bc.chunk})
				st := startStub(b, s.sock, path, args...)
				if err := st.finish(b, 5*time.Minute); err != nil || st.result == nil {
					b.Fatalf("stub: %v; stderr: %s", err, st.stderr.String())
				}
				if err := s.wait(b, time.Minute); err != nil {
					b.Fatal(err)
				}
				stats := s.srv.Stats()
				faults += stats.Faults
				touch += time.Duration(st.result.ElapsedNs)
				b.ReportMetric(float64(stats.LatencyP50)/1e3, "p50-µs")
				b.ReportMetric(float64(stats.LatencyP99)/1e3, "p99-µs")
			}
			b.ReportMetric(float64(faults)/float64(b.N), "faults/op")
			b.ReportMetric(float64(touch.Milliseconds())/float64(b.N), "touch-ms/op")
			b.ReportMetric(float64(faults)/touch.Seconds(), "faults/s")
			b.ReportMetric(float64(size)*float64(b.N)/touch.Seconds()/1e6, "touch-MB/s")
		})
	}
}
