package regional_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/failover"
	"github.com/snaploader/snaploader/cache/regional"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/cachecount"
	"github.com/snaploader/snaploader/internal/testserve"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/internal/toxic"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

var quiet = slog.New(slog.DiscardHandler)

// bucket opens the S3 tier of a fresh bucket of m at endpoint (m's own,
// or a proxy in front of it).
func bucket(t testing.TB, m testutil.MinIO, name, endpoint string) *s3cache.Cache {
	t.Helper()
	c, err := s3cache.New(context.Background(), s3cache.Options{
		Endpoint: endpoint, Bucket: name, AccessKey: m.AccessKey, SecretKey: m.SecretKey,
		Region: "us-east-1", MaxRetries: 1,
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// serve serves backend on a loopback port until the test ends and returns
// its grpc:// URL.
func serve(t testing.TB, backend cache.Backend, tempDir string) string {
	t.Helper()
	return "grpc://" + testserve.Serve(t, backend, server.Options{TempDir: tempDir, Logger: quiet})
}

func dial(t testing.TB, url string) *remote.Client {
	t.Helper()
	c, err := remote.Dial(context.Background(), url, remote.Options{DisableCompression: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// regionalServe is a serve of a regional tier (a fresh disk cache) over
// up; it returns the tier and the serve's URL.
func regionalServe(t testing.TB, up cache.Tier) (*regional.Regional, string) {
	t.Helper()
	local := newLocal(t, 1<<30)
	r := regional.New(local, up, regional.Options{Logger: quiet})
	t.Cleanup(func() { r.Close() })
	return r, serve(t, r, local.TempDir())
}

// A regional serve over MinIO: a host's uploads reach the bucket; a cold
// read fills the disk from the bucket once, however many hosts ask at
// once; warm reads leave the bucket alone; with the bucket down, what the
// disk holds is still served and the rest fails as Unavailable.
func TestRegionalOverMinIO(t *testing.T) {
	ctx := ctxT(t)
	m := testutil.StartMinIO(t)
	name := m.NewBucket(t)
	s3 := bucket(t, m, name, m.Endpoint)

	// A host saves through one regional serve: the blobs are in the bucket.
	_, url := regionalServe(t, s3)
	saver := dial(t, url)
	blobs := map[string][]byte{}
	var ds []*repb.Digest
	for i := range 4 {
		data := randBytes(uint64(10+i), (3+i)*mib/2)
		d := digest.Compute(ns.Function, data)
		if err := saver.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		blobs[d.Hash], ds = data, append(ds, d)
	}
	if missing, err := s3.FindMissing(ctx, ns, ds); err != nil || len(missing) != 0 {
		t.Fatalf("after uploads through the regional serve, the bucket lacks %v (%v)", missing, err)
	}

	// A cold regional serve: six hosts read the first blob at once.
	count := cachecount.NewCounting(s3)
	r, url := regionalServe(t, count)
	var wg sync.WaitGroup
	for i := range 6 {
		h := dial(t, url)
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, err := cache.ReadAll(ctx, h, ns, ds[0])
			if err != nil || !bytes.Equal(b, blobs[ds[0].Hash]) {
				t.Errorf("host %d: cold read: %v (%d bytes)", i, err, len(b))
			}
		}()
	}
	wg.Wait()
	if s := count.Stats(); s.Reads != 1 || s.ReadBytes != ds[0].SizeBytes {
		t.Fatalf("six cold reads of one blob: the bucket saw %d reads of %d bytes, want one of %d", s.Reads, s.ReadBytes, ds[0].SizeBytes)
	}
	// Every blob once more, through a new host: only the others are
	// fetched, each once.
	h := dial(t, url)
	for round := range 2 {
		for _, d := range ds {
			b, err := cache.ReadAll(ctx, h, ns, d)
			if err != nil || !bytes.Equal(b, blobs[d.Hash]) {
				t.Fatalf("round %d: read of %s: %v", round, digest.String(d), err)
			}
		}
	}
	if s := count.Stats(); s.Reads != int64(len(ds)) {
		t.Fatalf("the bucket saw %d reads for %d blobs read twice each", s.Reads, len(ds))
	}
	if st := r.Stats(); st.Fills != int64(len(ds)) {
		t.Fatalf("regional stats %+v: want %d fills", st, len(ds))
	}

	// The bucket goes down: what the disk holds is still served.
	absent := randBytes(99, mib)
	ad := digest.Compute(ns.Function, absent)
	if err := s3.Write(ctx, ns, ad, bytes.NewReader(absent)); err != nil {
		t.Fatal(err)
	}
	m.Stop()
	for _, d := range ds {
		b, err := cache.ReadAll(ctx, h, ns, d)
		if err != nil || !bytes.Equal(b, blobs[d.Hash]) {
			t.Fatalf("with the bucket down, read of held blob %s: %v", digest.String(d), err)
		}
	}
	start := time.Now()
	_, err := cache.ReadAll(ctx, h, ns, ad)
	if !cache.IsOutage(err) {
		t.Fatalf("with the bucket down, read of a blob the disk lacks: %v, want Unavailable", err)
	}
	t.Logf("read of an unheld blob with the bucket down failed after %v: %v", time.Since(start).Round(time.Millisecond), err)
	// FindMissing cannot vouch for anything without the bucket (past the
	// remembered answers).
	if _, err := r.FindMissing(ctx, ns, []*repb.Digest{ad}); !cache.IsOutage(err) {
		t.Fatalf("FindMissing with the bucket down: %v, want Unavailable", err)
	}
}

// BenchmarkColdHostsThroughRegional: one, eight and 32 cold hosts restore
// the same blobs at once through one regional serve over MinIO, whose
// answers come 50 ms late (a toxiproxy latency toxic). It reports
// bucket_bytes/host, the bytes pulled from the bucket over one host's
// bytes (the goal is at most 1.1), the time the hosts took and their
// aggregate throughput (compare the hosts=8 and hosts=32 rows with
// hosts=1).
func BenchmarkColdHostsThroughRegional(b *testing.B) {
	for _, hosts := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("hosts=%d", hosts), func(b *testing.B) { benchColdHosts(b, hosts) })
	}
}

func benchColdHosts(b *testing.B, hosts int) {
	const nblobs, size = 12, 2 * mib
	m := testutil.StartMinIO(b)
	name := m.NewBucket(b)
	seed := bucket(b, m, name, m.Endpoint)
	var ds []*repb.Digest
	for i := range nblobs {
		data := randBytes(uint64(100+i), size)
		d := digest.Compute(ns.Function, data)
		if err := seed.Write(context.Background(), ns, d, bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, d)
	}
	proxy := toxic.Start(b, m.Endpoint)
	proxy.Add(b, "latency", "downstream", `"latency":50`)
	slow := bucket(b, m, name, proxy.Addr())
	var ratio, elapsed float64
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		count := cachecount.NewCounting(slow)
		_, url := regionalServe(b, count)
		clients := make([]*remote.Client, hosts)
		for h := range clients {
			clients[h] = dial(b, url)
		}
		b.StartTimer()
		start := time.Now()
		var wg sync.WaitGroup
		hostBytes := make([]int64, hosts)
		for h, c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// Each host walks the blobs from its own starting point,
				// as restores fault pages in different orders.
				for k := range ds {
					d := ds[(k+h*3)%len(ds)]
					data, err := cache.ReadAll(context.Background(), c, ns, d)
					if err != nil {
						b.Errorf("host %d: %v", h, err)
						return
					}
					hostBytes[h] += int64(len(data))
				}
			}()
		}
		wg.Wait()
		elapsed += time.Since(start).Seconds()
		b.StopTimer()
		ratio += float64(count.Stats().ReadBytes) / float64(hostBytes[0])
		b.StartTimer()
	}
	b.ReportMetric(ratio/float64(b.N), "bucket_bytes/host")
	b.ReportMetric(elapsed/float64(b.N), "s/fleet")
	b.ReportMetric(float64(hosts*nblobs*size)/(1<<20)/(elapsed/float64(b.N)), "fleet_MiB/s")
}

// A regional serve whose upstream is another serve (over REAPI, through a
// failover tier of that one remote, as `serve --upstream` would build
// it): uploads reach the upstream serve, a cold read is fetched from it
// once, and version entries are read through.
func TestRegionalOverREAPIUpstream(t *testing.T) {
	ctx := ctxT(t)
	origin := newLocal(t, 1<<30)
	originURL := serve(t, origin, origin.TempDir())
	up, err := failover.New([]failover.Remote{{Tier: dial(t, originURL)}}, failover.Options{RetryFor: 5 * time.Second, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	count := cachecount.NewCounting(up)
	_, url := regionalServe(t, count)
	h := dial(t, url)
	data := randBytes(50, 5*mib)
	d := digest.Compute(ns.Function, data)
	if err := h.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if missing, _ := origin.FindMissing(ctx, ns, []*repb.Digest{d}); len(missing) != 0 {
		t.Fatal("an upload to the regional serve did not reach its upstream serve")
	}
	cold := randBytes(51, 3*mib)
	cd := put(t, origin, cold)
	for range 3 {
		b, err := cache.ReadAll(ctx, h, ns, cd)
		if err != nil || !bytes.Equal(b, cold) {
			t.Fatalf("read of a blob only the upstream serve had: %v", err)
		}
	}
	if s := count.Stats(); s.Reads != 1 {
		t.Fatalf("three reads of a cold blob reached the upstream serve %d times, want once", s.Reads)
	}
	vkey := &repb.Digest{Hash: digest.StringListHash("version"), SizeBytes: 1}
	for i, v := range []string{"v1", "v2"} {
		if err := origin.UpdateActionResult(ctx, ns, vkey, versionEntry(t, v)); err != nil {
			t.Fatal(err)
		}
		ar, err := h.GetActionResult(ctx, ns, vkey)
		if err != nil || !bytes.Contains(ar.GetExecutionMetadata().GetAuxiliaryMetadata()[0].GetValue(), []byte(v)) {
			t.Fatalf("version read %d through the regional serve: %v %v", i, ar, err)
		}
	}
}
