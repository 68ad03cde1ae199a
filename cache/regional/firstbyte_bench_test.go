package regional_test

import (
	"bytes"
	"context"
	"io"
	"slices"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/internal/toxic"
)

// firstByte reads d from t and returns how long its first byte took; it
// reads the rest too (so a cold read completes and fills its tier).
func firstByte(ctx context.Context, t cache.Tier, d *repb.Digest) (time.Duration, error) {
	start := time.Now()
	rc, err := t.Read(ctx, ns, d)
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	var one [1]byte
	if _, err := io.ReadFull(rc, one[:]); err != nil {
		return 0, err
	}
	took := time.Since(start)
	n, err := io.Copy(io.Discard, rc)
	if err == nil && n+1 != d.SizeBytes {
		err = io.ErrUnexpectedEOF
	}
	return took, err
}

// percentile is the p-th percentile (0 < p <= 1) of xs, nearest rank.
func percentile(xs []time.Duration, p float64) time.Duration {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	i := int(float64(len(s))*p+0.999999) - 1
	return s[max(0, min(i, len(s)-1))]
}

// BenchmarkLazyReadFirstByte: what a host's lazy chunk fetch (one chunk of
// the default size, 4,096,000 bytes) waits for its first byte from a
// regional serve over MinIO whose answers come 50 ms late (a toxiproxy
// latency toxic), when the serve is cold (it fetches from the bucket) and
// when it is warm (another host read the chunk a moment before), with the
// bucket read directly for reference. Each chunk is read cold, warm and
// directly in turn, so load on the machine falls on all three alike. It
// reports p50 and p99 in milliseconds over every chunk of every round.
//
//	go test -run '^$' -bench LazyReadFirstByte -benchtime 4x ./cache/regional/
func BenchmarkLazyReadFirstByte(b *testing.B) {
	const nblobs = 16
	ctx := context.Background()
	m := testutil.StartMinIO(b)
	name := m.NewBucket(b)
	seed := bucket(b, m, name, m.Endpoint)
	var ds []*repb.Digest
	for i := range nblobs {
		data := randBytes(uint64(300+i), cow.DefaultChunkSize)
		d := digest.Compute(ns.Function, data)
		if err := seed.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, d)
	}
	proxy := toxic.Start(b, m.Endpoint)
	proxy.Add(b, "latency", "downstream", `"latency":50`)
	slow := bucket(b, m, name, proxy.Addr())
	var cold, warm, direct []time.Duration
	for b.Loop() {
		_, url := regionalServe(b, slow)
		first, second := dial(b, url), dial(b, url)
		for _, d := range ds {
			for _, r := range []struct {
				tier cache.Tier
				into *[]time.Duration
			}{{first, &cold}, {second, &warm}, {slow, &direct}} {
				took, err := firstByte(ctx, r.tier, d)
				if err != nil {
					b.Fatalf("reading %s: %v", digest.String(d), err)
				}
				*r.into = append(*r.into, took)
			}
		}
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(percentile(warm, 0.5)), "warm-p50-ms")
	b.ReportMetric(ms(percentile(warm, 0.99)), "warm-p99-ms")
	b.ReportMetric(ms(percentile(cold, 0.5)), "cold-p50-ms")
	b.ReportMetric(ms(percentile(cold, 0.99)), "cold-p99-ms")
	b.ReportMetric(ms(percentile(direct, 0.5)), "bucket-p50-ms")
	b.ReportMetric(ms(percentile(direct, 0.99)), "bucket-p99-ms")
}
