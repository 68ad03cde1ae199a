package gc

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"golang.org/x/sync/errgroup"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
)

// vmHWM is the process's peak resident set in KiB (Linux).
func vmHWM() int64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return n
		}
	}
	return 0
}

// BenchmarkCollect100k collects a bucket of SNAPLOADER_BENCH_OBJECTS
// (default 100,000) small synthetic blobs, created once in parallel:
// "young" examines them all and keeps them (listing and marking), "old"
// (a dry run) also re-checks the age of every one as a deletion
// candidate.
func BenchmarkCollect100k(b *testing.B) {
	n := 100000
	if v, err := strconv.Atoi(os.Getenv("SNAPLOADER_BENCH_OBJECTS")); err == nil && v > 0 {
		n = v
	}
	m := testutil.StartMinIO(b)
	bk := &bucket{m: m, name: m.NewBucket(b)}
	start := time.Now()
	g, ctx := errgroup.WithContext(context.Background())
	g.SetLimit(64)
	for i := range n {
		g.Go(func() error {
			body := []byte(fmt.Sprintf("synthetic blob %d", i))
			d := digest.Compute(digest.BLAKE3, body)
			key := fmt.Sprintf("fleet/cas/blake3/%s-%d", d.GetHash(), d.GetSizeBytes())
			_, err := bk.m.Client.PutObject(ctx, bk.name, key, bytes.NewReader(body), int64(len(body)), minio.PutObjectOptions{})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	b.Logf("created %d objects in %s", n, time.Since(start).Round(time.Millisecond))
	st := S3(bk.tier(b, time.Now(), nil))
	for _, tc := range []struct {
		name string
		now  time.Time
	}{
		{"young", time.Now()},
		{"old", time.Now().Add(2 * time.Hour)},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				runtime.GC()
				rep, err := Run(context.Background(), st, Options{DryRun: true, Now: func() time.Time { return tc.now }})
				if err != nil {
					b.Fatal(err)
				}
				if rep.Blobs.Examined != int64(n) {
					b.Fatalf("examined %d blobs, want %d", rep.Blobs.Examined, n)
				}
			}
			b.ReportMetric(float64(int64(n)*int64(b.N))/b.Elapsed().Seconds(), "objects/s")
			b.ReportMetric(float64(vmHWM())/1024, "peak-RSS-MiB")
		})
	}
}
