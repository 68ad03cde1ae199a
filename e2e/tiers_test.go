package e2e

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/failover"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cache/regional"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/cachecount"
	"github.com/snaploader/snaploader/internal/testserve"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/internal/toxic"
	"github.com/snaploader/snaploader/remote"
	snapserver "github.com/snaploader/snaploader/server"
)

var tierNS = cache.Namespace{Instance: "fleet", Function: digest.BLAKE3}

// readEvents collects a failover tier's read reports.
type readEvents struct {
	mu sync.Mutex
	ev []failover.ReadEvent
}

func (r *readEvents) add(e failover.ReadEvent) { r.mu.Lock(); r.ev = append(r.ev, e); r.mu.Unlock() }

func (r *readEvents) last(t testing.TB) failover.ReadEvent {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.ev) == 0 {
		t.Fatal("no read was reported")
	}
	return r.ev[len(r.ev)-1]
}

// grpcRemote is a failover remote for a REAPI URL, its client's own
// retries off, dialled again after a stall.
func grpcRemote(t testing.TB, url string) failover.Remote {
	t.Helper()
	opts := remote.Options{MaxRetries: -1, CallTimeout: 10 * time.Second, DisableCompression: true}
	dial := func(ctx context.Context) (cache.Tier, error) {
		c, err := remote.Dial(ctx, url, opts)
		if err == nil {
			t.Cleanup(func() { c.Close() })
		}
		return c, err
	}
	c, err := dial(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	return failover.Remote{Tier: c, Name: url, Dial: dial}
}

// A `snaploader serve` killed in the middle of a host's 16 MiB read and
// started again two seconds later: the read resumes where it was cut and
// completes with the blob's bytes, well within the bound.
func TestServeRestartMidRead(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", dir)
	data := randBytes(t, 16<<20, 21)
	d := digest.Compute(tierNS.Function, data)
	if err := dial(t, srv.url()).Write(ctx, tierNS, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	// A slow link, so that the read is in flight when the serve dies.
	proxy := toxic.Start(t, srv.addr)
	proxy.Add(t, "bandwidth", "downstream", `"rate":4096`)
	ev := &readEvents{}
	ft, err := failover.New([]failover.Remote{grpcRemote(t, "grpc://"+proxy.Addr())},
		failover.Options{RetryFor: 20 * time.Second, AttemptTimeout: 2 * time.Second, OnRead: ev.add, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	rc, err := ft.Read(ctx, tierNS, d)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	head := make([]byte, 2<<20)
	if _, err := io.ReadFull(rc, head); err != nil {
		t.Fatal(err)
	}
	srv.stop()
	restarted := make(chan struct{})
	go func() {
		defer close(restarted)
		time.Sleep(2 * time.Second)
		srv.start(t)
	}()
	rest, err := io.ReadAll(rc)
	<-restarted
	if err != nil {
		t.Fatalf("read across a restart of the serve: %v", err)
	}
	if !bytes.Equal(append(head, rest...), data) {
		t.Fatal("the bytes of a read across a restart differ from the blob")
	}
	e := ev.last(t)
	if !e.Complete || e.Attempts < 2 {
		t.Fatalf("read event %+v: want a complete read over several attempts", e)
	}
	t.Logf("16 MiB read across a restart of the serve: %v, %d attempts", time.Since(start).Round(time.Millisecond), e.Attempts)
}

func randBytes(t testing.TB, n int, seed byte) []byte {
	t.Helper()
	b := make([]byte, n)
	x := uint64(seed)*0x9E3779B97F4A7C15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}

// serveBackend serves backend on loopback until the test ends; it
// returns the address.
func serveBackend(t testing.TB, backend cache.Backend, tempDir string) string {
	t.Helper()
	return testserve.Serve(t, backend, snapserver.Options{TempDir: tempDir})
}

// A fleet's tiers: hosts read through a regional serve (a disk cache over
// the bucket, MinIO) and then the bucket itself. With the regional serve
// down the bucket serves; with the bucket down the regional serve serves
// what it holds; a blob neither can serve fails once the bound has passed,
// naming the blob, both remotes and the cause.
func TestFleetTiersFailover(t *testing.T) {
	ctx := ctxT(t)
	m := testutil.StartMinIO(t)
	name := m.NewBucket(t)
	s3opts := s3cache.Options{Endpoint: m.Endpoint, Bucket: name, AccessKey: m.AccessKey, SecretKey: m.SecretKey, Region: "us-east-1", MaxRetries: 1}
	bucket, err := s3cache.New(ctx, s3opts)
	if err != nil {
		t.Fatal(err)
	}
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	upstream := cachecount.NewCounting(bucket)
	reg := regional.New(lc, upstream, regional.Options{Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(func() { reg.Close() })
	addr := serveBackend(t, reg, lc.TempDir())
	proxy := toxic.Start(t, addr)
	regionalURL := "grpc://" + proxy.Addr()

	hostBucket, err := s3cache.New(ctx, s3opts)
	if err != nil {
		t.Fatal(err)
	}
	ev := &readEvents{}
	newHostTier := func(retryFor time.Duration) *failover.Tier {
		ft, err := failover.New([]failover.Remote{
			grpcRemote(t, regionalURL),
			{Tier: hostBucket, Name: "bucket"},
		}, failover.Options{RetryFor: retryFor, AttemptTimeout: 2 * time.Second, OnRead: ev.add, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		return ft
	}
	host := newHostTier(10 * time.Second)

	// Saves go through the regional serve to the bucket.
	blobs := map[string][]byte{}
	var ds []*repb.Digest
	for i := range 3 {
		data := randBytes(t, (2+i)<<20, byte(30+i))
		d := digest.Compute(tierNS.Function, data)
		if err := host.Write(ctx, tierNS, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		blobs[d.Hash], ds = data, append(ds, d)
	}
	if missing, err := bucket.FindMissing(ctx, tierNS, ds); err != nil || len(missing) != 0 {
		t.Fatalf("the bucket lacks %v after saves through the regional serve (%v)", missing, err)
	}
	readAll := func(ft *failover.Tier, d *repb.Digest) (string, error) {
		rc, from, err := ft.ReadFrom(ctx, tierNS, d)
		if err != nil {
			return "", err
		}
		defer rc.Close()
		b, err := io.ReadAll(rc)
		if err == nil && !bytes.Equal(b, blobs[d.Hash]) {
			t.Fatalf("read of %s from %s: wrong bytes", digest.String(d), from)
		}
		return from, err
	}
	// Two blobs saved by another fleet, straight into the bucket.
	var cold []*repb.Digest
	for i := range 2 {
		data := randBytes(t, 3<<20, byte(40+i))
		d := digest.Compute(tierNS.Function, data)
		if err := bucket.Write(ctx, tierNS, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		blobs[d.Hash], cold = data, append(cold, d)
	}
	// Reads come from the regional serve, which kept copies of the saves.
	for _, d := range ds {
		if from, err := readAll(host, d); err != nil || from != regionalURL {
			t.Fatalf("read of %s: from %q, %v", digest.String(d), from, err)
		}
	}
	if n := upstream.Stats().Reads; n != 0 {
		t.Fatalf("the regional serve read %d blobs from the bucket; it holds them all", n)
	}

	// The regional serve goes down: the bucket serves.
	proxy.Disable()
	for _, d := range append(ds, cold...) {
		if from, err := readAll(host, d); err != nil || from != "bucket" {
			t.Fatalf("with the regional serve down, read of %s: from %q, %v", digest.String(d), from, err)
		}
	}
	// Once it is back, reads return to it.
	proxy.Enable(t)
	deadline := time.Now().Add(15 * time.Second)
	for {
		from, err := readAll(host, ds[0])
		if err == nil && from == regionalURL {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("reads did not return to the regional serve (last from %q, %v)", from, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// A blob it lacks is fetched from the bucket once.
	for range 2 {
		if from, err := readAll(host, cold[0]); err != nil || from != regionalURL {
			t.Fatalf("read of %s: from %q, %v", digest.String(cold[0]), from, err)
		}
	}
	if n := upstream.Stats().Reads; n != 1 {
		t.Fatalf("the regional serve read %d blobs from the bucket, want 1", n)
	}

	// The bucket goes down: the regional serve serves what it holds.
	m.Stop()
	for _, d := range append(ds, cold[0]) {
		if from, err := readAll(host, d); err != nil || from != regionalURL {
			t.Fatalf("with the bucket down, read of %s: from %q, %v", digest.String(d), from, err)
		}
	}
	// What it does not hold cannot be served by anyone: after the bound,
	// an error naming the blob, both remotes and the cause.
	short := newHostTier(2 * time.Second)
	start := time.Now()
	_, err = readAll(short, cold[1])
	if !cache.IsOutage(err) {
		t.Fatalf("read of a blob only the dead bucket has: %v, want Unavailable", err)
	}
	t.Logf("after %v: %v", time.Since(start).Round(time.Millisecond), err)
	for _, want := range []string{digest.String(cold[1]), regionalURL, "bucket", "connection refused"} {
		if !bytes.Contains([]byte(err.Error()), []byte(want)) {
			t.Errorf("error does not name %q: %v", want, err)
		}
	}
}
