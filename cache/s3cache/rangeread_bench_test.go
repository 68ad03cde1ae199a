package s3cache

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/internal/toxic"
)

// BenchmarkRangeReadFrameSize measures, per frame size of the seekable
// layout, what a 16 KiB range read of a 4 MB chunk costs through the bucket
// model (MinIO behind toxiproxy: 50 ms to first byte, 100 MB/s per
// connection): the first read of a chunk (cold: its index unknown) and a
// later one (warm), p50 and p99 in ms, and the bytes stored per content
// byte, for the bucket image (30% zero MiBs, the rest half random, half
// one repeated byte) and for log-like text.
//
//	go test -run '^$' -bench RangeReadFrameSize -benchtime 5x ./cache/s3cache/
func BenchmarkRangeReadFrameSize(b *testing.B) {
	const chunk, chunks = 4096000, 4
	m := testutil.StartMinIO(b)
	p := toxic.Start(b, m.Endpoint)
	p.Add(b, "latency", "downstream", `"latency": 50`)
	p.Add(b, "bandwidth", "downstream", `"rate": 100000`)
	ns := cache.Namespace{Function: digest.BLAKE3}
	for _, data := range []struct {
		name string
		b    []byte
	}{{"image", testutil.BucketImage(3, chunk*chunks)}, {"text", testutil.TextLike(3, chunk*chunks)}} {
		for _, fs := range []int{64 << 10, 256 << 10, 1 << 20, 4 << 20} {
			b.Run(fmt.Sprintf("%s/frame=%dKiB", data.name, fs>>10), func(b *testing.B) {
				bucket := m.NewBucket(b)
				w := newCache(b, m, bucket, func(o *Options) { o.FrameSize = fs })
				var ds []*repb.Digest
				var stored int64
				for i := range chunks {
					c := data.b[i*chunk : (i+1)*chunk]
					d := digest.Compute(digest.BLAKE3, c)
					if err := w.Write(context.Background(), ns, d, bytes.NewReader(c)); err != nil {
						b.Fatal(err)
					}
					stored += storedObject(b, m, bucket, w.casKey(digest.BLAKE3, d)).Size
					ds = append(ds, d)
				}
				rng := rand.New(rand.NewPCG(1, 2))
				var cold, warm []time.Duration
				read := func(c *Cache, i int) time.Duration {
					off := rng.Int64N(chunk - 16<<10)
					t := time.Now()
					rc, err := c.ReadRange(context.Background(), ns, ds[i], off, 16<<10)
					if err != nil {
						b.Fatal(err)
					}
					got, err := io.ReadAll(rc)
					d := time.Since(t)
					if err != nil || !bytes.Equal(got, data.b[i*chunk+int(off):i*chunk+int(off)+16<<10]) {
						b.Fatalf("range read: %v", err)
					}
					return d
				}
				for b.Loop() {
					r := newCache(b, m, bucket, func(o *Options) { o.Endpoint = p.Addr(); o.FrameSize = fs })
					for i := range ds {
						cold = append(cold, read(r, i))
						warm = append(warm, read(r, i))
					}
				}
				for _, s := range []struct {
					name string
					ds   []time.Duration
				}{{"cold", cold}, {"warm", warm}} {
					slices.Sort(s.ds)
					b.ReportMetric(float64(s.ds[len(s.ds)/2].Microseconds())/1000, s.name+"-p50-ms")
					b.ReportMetric(float64(s.ds[len(s.ds)*99/100].Microseconds())/1000, s.name+"-p99-ms")
				}
				b.ReportMetric(float64(stored)/float64(len(data.b)), "stored/content")
			})
		}
	}
}
