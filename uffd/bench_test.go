package uffd

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// BenchmarkServe restores 256 MiB of guest memory from a file into the
// stand-in VMM, which reads every page once, at page and at chunk
// granularity.
func BenchmarkServe(b *testing.B) {
	requireUffd(b)
	const size = 256 << 20
	path, _ := memFile(b, size, 1)
	mem := openMem(b, path)
	for _, chunk := range []int64{0, 64 << 10, 4096000} {
		b.Run(fmt.Sprintf("chunk=%d", chunk), func(b *testing.B) {
			b.SetBytes(size)
			var faults uint64
			var touch time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				s := serve(b, context.Background(), mem, Options{ChunkSize: chunk})
				st := startStub(b, s.sock, path, "-verify=false")
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
			b.ReportMetric(float64(faults)/touch.Seconds(), "faults/s")
			b.ReportMetric(float64(size)*float64(b.N)/touch.Seconds()/1e6, "touch-MB/s")
		})
	}
}
