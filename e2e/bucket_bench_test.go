package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/internal/toxic"
	"github.com/snaploader/snaploader/internal/zstdio"
	"github.com/snaploader/snaploader/snapshot"
)

// The bucket model: 50 ms to first byte, 100 MB/s per connection.
const (
	bucketLatencyMs = 50
	bucketKBps      = 100000
)

// bucketLink is MinIO behind a proxy with the bucket model's toxics
// (latency 0: the bandwidth cap alone).
func bucketLink(b *testing.B, m testutil.MinIO, latencyMs int) string {
	p := toxic.Start(b, m.Endpoint)
	if latencyMs > 0 {
		p.Add(b, "latency", "downstream", fmt.Sprintf(`"latency": %d`, latencyMs))
	}
	p.Add(b, "bandwidth", "downstream", fmt.Sprintf(`"rate": %d`, bucketKBps))
	return p.Addr()
}

// bucketTier is the S3 tier over bucket at endpoint; old gives the tier as
// it was before range reads: no ranges, one GET per object, no hedging.
func bucketTier(b *testing.B, m testutil.MinIO, endpoint, bucket string, old bool) cache.Tier {
	opts := s3cache.Options{Endpoint: endpoint, Bucket: bucket, Region: "us-east-1", AccessKey: m.AccessKey, SecretKey: m.SecretKey}
	if old {
		opts.ReadPartSize = 1 << 40
		opts.HedgeAfter = -1
	}
	c, err := s3cache.New(context.Background(), opts)
	if err != nil {
		b.Fatal(err)
	}
	if old {
		return noRanges{c}
	}
	return c
}

// noRanges is a tier that declares no range reads.
type noRanges struct{ cache.Tier }

func (n noRanges) Traits() cache.Traits {
	t := n.Tier.Traits()
	t.ServesRanges = false
	return t
}

// bucketHost is a host with a fresh local cache over tier.
func bucketHost(b *testing.B, tier cache.Tier) (*localcache.Cache, *snapshot.Loader) {
	lc, err := localcache.New(b.TempDir(), localcache.Options{MaxBytes: 16 << 30})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { lc.Close() })
	l, err := snapshot.New(lc, tier, snapshot.Options{})
	if err != nil {
		b.Fatal(err)
	}
	return lc, l
}

// saveToBucket saves path as one chunked file to tier.
func saveToBucket(b *testing.B, tier cache.Tier, path string) {
	lc, l := bucketHost(b, tier)
	saveFile(b, lc, l, path)
}

// toSingleStream rewrites every compressed object of bucket as one zstd
// stream: the layout the tier wrote before the seekable one.
func toSingleStream(b *testing.B, m testutil.MinIO, bucket string) {
	ctx := context.Background()
	enc := zstdio.NewEncoder()
	dec, err := zstdio.NewDecoder(nil, zstdio.MaxWindow)
	if err != nil {
		b.Fatal(err)
	}
	defer dec.Close()
	for o := range m.Client.ListObjects(ctx, bucket, minio.ListObjectsOptions{Recursive: true, WithMetadata: true}) {
		if o.Err != nil {
			b.Fatal(o.Err)
		}
		obj, err := m.Client.GetObject(ctx, bucket, o.Key, minio.GetObjectOptions{})
		if err != nil {
			b.Fatal(err)
		}
		info, err := obj.Stat()
		if err != nil {
			b.Fatal(err)
		}
		z, err := io.ReadAll(obj)
		obj.Close()
		if err != nil {
			b.Fatal(err)
		}
		if _, _, err := zstdio.ParseSeekIndex(z, 1<<40); err != nil {
			continue // raw, or an action-cache entry
		}
		raw, err := dec.DecodeAll(z, nil)
		if err != nil {
			b.Fatal(err)
		}
		single := enc.EncodeAll(raw, nil)
		if _, err := m.Client.PutObject(ctx, bucket, o.Key, bytes.NewReader(single), int64(len(single)), minio.PutObjectOptions{UserMetadata: info.UserMetadata}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBucketFaults measures lazy reads from the bucket through the
// bucket model (MinIO behind toxiproxy: 50 ms to first byte, 100 MB/s per
// connection), the tier as it is (seekable layout, range reads, parallel
// hedged parts) against the tier as it was (one zstd stream per object,
// whole-chunk faults, one GET per object), alternated in one run:
//
//   - first-byte: the time to read 16 KiB at a random offset of each chunk
//     of an unfetched file (read-ahead off), p50 and p99;
//   - restore: a full restore of the file into an empty cache, through
//     the bucket model and through the bandwidth cap alone, as MB/s and as
//     the ratio of the two.
//
// The image (SNAPLOADER_BENCH_MIB MiB, default 32) is 30% zero MiBs, the
// rest half random and half one repeated byte per MiB.
//
//	SNAPLOADER_BENCH_MIB=64 go test -run '^$' -bench BucketFaults -benchtime 3x ./e2e/
func BenchmarkBucketFaults(b *testing.B) {
	m, ok := tryMinIO(b)
	if !ok {
		b.Skip("minio not installed")
	}
	size := int(testutil.BenchMiB(b, 32)) << 20
	path := filepath.Join(b.TempDir(), "memory.img")
	if err := os.WriteFile(path, testutil.BucketImage(18, size), 0o644); err != nil {
		b.Fatal(err)
	}
	// The same snapshot in both layouts, each in its bucket.
	newBucket, oldBucket := m.NewBucket(b), m.NewBucket(b)
	saveToBucket(b, bucketTier(b, m, m.Endpoint, newBucket, false), path)
	saveToBucket(b, bucketTier(b, m, m.Endpoint, oldBucket, false), path)
	toSingleStream(b, m, oldBucket)
	slow, fast := bucketLink(b, m, bucketLatencyMs), bucketLink(b, m, 0)

	type variant struct {
		name   string
		bucket string
		old    bool
		first  []time.Duration
		slow   []time.Duration // restores through the bucket model
		fast   []time.Duration // and through the bandwidth cap alone
	}
	vs := []*variant{{name: "old", bucket: oldBucket, old: true}, {name: "new", bucket: newBucket}}
	ctx := context.Background()
	open := func(v *variant, endpoint string) (*snapshot.Loader, *snapshot.Snapshot) {
		_, l := bucketHost(b, bucketTier(b, m, endpoint, v.bucket, v.old))
		ks, _ := l.KeySet(ctx, task, snapshot.KeySetOptions{})
		snap, err := l.GetSnapshot(ctx, ks, snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst})
		if err != nil {
			b.Fatal(err)
		}
		return l, snap
	}
	rng := rand.New(rand.NewPCG(5, 5))
	buf := make([]byte, 16<<10)
	round := func(record bool) {
		for _, v := range vs {
			l, snap := open(v, slow)
			u, err := l.UnpackSnapshot(ctx, snap, b.TempDir(), snapshot.UnpackOptions{ReadAhead: -1})
			if err != nil {
				b.Fatal(err)
			}
			for _, c := range snap.Manifest.GetChunkedFiles()[0].GetChunks() {
				off := c.GetOffset() + rng.Int64N(max(1, c.GetDigest().GetSizeBytes()-int64(len(buf))))
				t := time.Now()
				if _, err := u.Stores["memory.img"].ReadAt(buf, off); err != nil && err != io.EOF {
					b.Fatal(err)
				}
				if record {
					v.first = append(v.first, time.Since(t))
				}
			}
			u.Close()
			for _, ep := range []string{slow, fast} {
				l, snap := open(v, ep)
				t := time.Now()
				if _, err := l.Restore(ctx, snap, b.TempDir(), snapshot.RestoreOptions{}); err != nil {
					b.Fatal(err)
				}
				if d := time.Since(t); record && ep == slow {
					v.slow = append(v.slow, d)
				} else if record {
					v.fast = append(v.fast, d)
				}
			}
		}
	}
	round(false) // warm-up
	for b.Loop() {
		round(true)
	}
	for _, v := range vs {
		sort.Slice(v.first, func(i, j int) bool { return v.first[i] < v.first[j] })
		if len(v.first) > 0 {
			b.ReportMetric(float64(v.first[len(v.first)/2].Milliseconds()), v.name+"-first-byte-p50-ms")
			b.ReportMetric(float64(v.first[len(v.first)*99/100].Milliseconds()), v.name+"-first-byte-p99-ms")
		}
		slowS, fastS := median(v.slow).Seconds(), median(v.fast).Seconds()
		b.ReportMetric(float64(size)/1e6/slowS, v.name+"-restore-MB/s")
		b.ReportMetric(float64(size)/1e6/fastS, v.name+"-restore-no-latency-MB/s")
		b.ReportMetric(fastS/slowS, v.name+"-restore-x-no-latency")
	}
}

// BenchmarkBucketBinaries runs `snaploader bench --remote s3://...` through
// the bucket model (50 ms to first byte, 100 MB/s per connection) with
// this binary and with SNAPLOADER_OLD_BINARY (a build of an earlier
// commit), alternated, each on a fresh bucket, and reports each binary's
// median first byte of an unfetched chunk (p50, p99) and lazy sequential
// read into an empty cache:
//
//	git archive OLD | tar -x -C /tmp/old && (cd /tmp/old && go build -o snaploader-old ./cmd/snaploader)
//	SNAPLOADER_OLD_BINARY=/tmp/old/snaploader-old go test -run '^$' -bench BucketBinaries -benchtime 3x ./e2e/
func BenchmarkBucketBinaries(b *testing.B) {
	old := os.Getenv("SNAPLOADER_OLD_BINARY")
	if old == "" {
		b.Skip("SNAPLOADER_OLD_BINARY not set")
	}
	m, ok := tryMinIO(b)
	if !ok {
		b.Skip("minio not installed")
	}
	size := testutil.BenchMiB(b, 64) << 20
	link := bucketLink(b, m, bucketLatencyMs)
	type report struct {
		ColdReadMBs        float64 `json:"cold_read_mb_s"`
		ColdFirstByteP50US float64 `json:"cold_first_byte_p50_us"`
		ColdFirstByteP99US float64 `json:"cold_first_byte_p99_us"`
	}
	bins := []struct{ name, path string }{{"old", old}, {"new", binary}}
	reps := map[string][]report{}
	for b.Loop() {
		for _, bin := range bins {
			work := b.TempDir()
			cmd := exec.Command(bin.path, "bench", "--remote", fmt.Sprintf("s3://%s?endpoint=%s&secure=false", m.NewBucket(b), link),
				"--work-dir", work, "--cache-dir", filepath.Join(work, "unused"), "--size", fmt.Sprint(size), "--runs", "1", "--json")
			cmd.Env = append(os.Environ(), "AWS_ACCESS_KEY_ID="+m.AccessKey, "AWS_SECRET_ACCESS_KEY="+m.SecretKey, "AWS_REGION=us-east-1")
			out, err := cmd.Output()
			if err != nil {
				b.Fatalf("%s bench: %v: %s", bin.name, err, out)
			}
			var r report
			if err := json.Unmarshal(out, &r); err != nil {
				b.Fatalf("%s bench --json: %v: %s", bin.name, err, out)
			}
			reps[bin.name] = append(reps[bin.name], r)
		}
	}
	for _, bin := range bins {
		var p50, p99, mbs []time.Duration
		for _, r := range reps[bin.name] {
			p50 = append(p50, time.Duration(r.ColdFirstByteP50US)*time.Microsecond)
			p99 = append(p99, time.Duration(r.ColdFirstByteP99US)*time.Microsecond)
			mbs = append(mbs, time.Duration(r.ColdReadMBs*1000))
		}
		b.ReportMetric(float64(median(p50).Microseconds())/1000, bin.name+"-first-byte-p50-ms")
		b.ReportMetric(float64(median(p99).Microseconds())/1000, bin.name+"-first-byte-p99-ms")
		b.ReportMetric(float64(median(mbs))/1000, bin.name+"-lazy-read-MB/s")
	}
}
