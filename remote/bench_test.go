package remote_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

const benchBlob = 4_096_000 // the default chunk size

// benchClient forces ByteStream for 4 MB blobs (the batch limit is set
// below them).
func benchClient(b *testing.B, zstd bool) (*env, *remote.Client) {
	e := start(b, server.Options{})
	return e, e.dial(b, remote.Options{MaxBatchBytes: batchLimit(), DisableCompression: !zstd})
}

func BenchmarkByteStreamUpload(b *testing.B) {
	for _, zstd := range []bool{false, true} {
		b.Run(fmt.Sprintf("zstd=%v", zstd), func(b *testing.B) {
			_, c := benchClient(b, zstd)
			data := blob(benchBlob, 1)
			ctx := context.Background()
			b.SetBytes(benchBlob)
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				b.StopTimer()
				binary.LittleEndian.PutUint64(data, uint64(i)) // a new blob each time
				d := digest.Compute(c.DigestFunction(), data)
				b.StartTimer()
				if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkByteStreamDownload(b *testing.B) {
	for _, zstd := range []bool{false, true} {
		b.Run(fmt.Sprintf("zstd=%v", zstd), func(b *testing.B) {
			_, c := benchClient(b, zstd)
			data := blob(benchBlob, 2)
			ctx := context.Background()
			d := digest.Compute(c.DigestFunction(), data)
			if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 1<<20)
			b.SetBytes(benchBlob)
			b.ResetTimer()
			for b.Loop() {
				rc, err := c.Read(ctx, cache.Namespace{}, d)
				if err != nil {
					b.Fatal(err)
				}
				n, err := io.CopyBuffer(io.Discard, rc, buf)
				rc.Close()
				if err != nil || n != benchBlob {
					b.Fatal(n, err)
				}
			}
		})
	}
}

// BenchmarkTimeToFirstByte reports p50 and p99 of the time from asking for
// a 4 MB blob to holding its first byte, over 200 reads per iteration.
func BenchmarkTimeToFirstByte(b *testing.B) {
	for _, zstd := range []bool{false, true} {
		b.Run(fmt.Sprintf("zstd=%v", zstd), func(b *testing.B) {
			_, c := benchClient(b, zstd)
			data := blob(benchBlob, 3)
			ctx := context.Background()
			d := digest.Compute(c.DigestFunction(), data)
			if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
				b.Fatal(err)
			}
			var lat []time.Duration
			one := make([]byte, 1)
			for b.Loop() {
				for range 200 {
					t0 := time.Now()
					rc, err := c.Read(ctx, cache.Namespace{}, d)
					if err != nil {
						b.Fatal(err)
					}
					if _, err := io.ReadFull(rc, one); err != nil {
						b.Fatal(err)
					}
					lat = append(lat, time.Since(t0))
					// Drain, so the server is idle before the next read.
					if _, err := io.Copy(io.Discard, rc); err != nil {
						b.Fatal(err)
					}
					rc.Close()
				}
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}

func batchLimit() int64 {
	if os.Getenv("BENCH_BATCH") != "" {
		return 0
	}
	return 1 << 20
}
