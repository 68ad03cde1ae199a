package failover_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/failover"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/cachecount"
	"github.com/snaploader/snaploader/internal/testserve"
	"github.com/snaploader/snaploader/internal/toxic"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

const mib = 1 << 20

var (
	ns    = cache.Namespace{Instance: "fleet", Function: digest.BLAKE3}
	quiet = slog.New(slog.DiscardHandler)
)

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 11))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// remoteServer is a real server (a local cache served over gRPC on
// loopback) behind a fault-injecting proxy, and a client of it through the
// proxy.
type remoteServer struct {
	lc     *localcache.Cache
	proxy  *toxic.Proxy
	client *remote.Client
	url    string
	dial   func(context.Context) (cache.Tier, error)
}

func startRemote(t testing.TB) *remoteServer {
	t.Helper()
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() }) // after the server has stopped
	p := toxic.Start(t, testserve.Serve(t, lc, server.Options{TempDir: lc.TempDir(), Logger: quiet}))
	url := "grpc://" + p.Addr()
	// The client's own retries are off: riding out faults is the
	// failover tier's job here.
	opts := remote.Options{MaxRetries: -1, CallTimeout: 10 * time.Second, DisableCompression: true}
	c, err := remote.Dial(context.Background(), url, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rs := &remoteServer{lc: lc, proxy: p, client: c, url: url}
	rs.dial = func(ctx context.Context) (cache.Tier, error) {
		c, err := remote.Dial(ctx, url, opts)
		if err == nil {
			t.Cleanup(func() { c.Close() })
		}
		return c, err
	}
	return rs
}

func (r *remoteServer) put(t testing.TB, data []byte) *repb.Digest {
	t.Helper()
	d := digest.Compute(ns.Function, data)
	if err := r.lc.Write(context.Background(), ns, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	return d
}

func (r *remoteServer) has(t testing.TB, d *repb.Digest) bool {
	t.Helper()
	missing, err := r.lc.FindMissing(context.Background(), ns, []*repb.Digest{d})
	if err != nil {
		t.Fatal(err)
	}
	return len(missing) == 0
}

// events collects OnRead events.
type events struct {
	mu sync.Mutex
	ev []failover.ReadEvent
}

func (e *events) add(ev failover.ReadEvent) {
	e.mu.Lock()
	e.ev = append(e.ev, ev)
	e.mu.Unlock()
}

func (e *events) last(t testing.TB) failover.ReadEvent {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.ev) == 0 {
		t.Fatal("no read was reported")
	}
	return e.ev[len(e.ev)-1]
}

func newTier(t testing.TB, opts failover.Options, ev *events, rs ...*remoteServer) *failover.Tier {
	t.Helper()
	var remotes []failover.Remote
	for _, r := range rs {
		remotes = append(remotes, failover.Remote{Tier: r.client, Name: r.url, Dial: r.dial})
	}
	if opts.Logger == nil {
		opts.Logger = quiet
	}
	if ev != nil {
		opts.OnRead = ev.add
	}
	ft, err := failover.New(remotes, opts)
	if err != nil {
		t.Fatal(err)
	}
	return ft
}

// Reads go to the first remote holding the blob; with the first remote
// down they come from the second, and writes and entries go there too.
func TestFirstRemoteDeadSecondServes(t *testing.T) {
	ctx := ctxT(t)
	a, b := startRemote(t), startRemote(t)
	ev := &events{}
	countA := cachecount.NewCounting(a.client)
	ft, err := failover.New([]failover.Remote{{Tier: countA, Name: a.url}, {Tier: b.client, Name: b.url}},
		failover.Options{RetryFor: 10 * time.Second, BreakerRetryAfter: 5 * time.Second, Logger: quiet, OnRead: ev.add})
	if err != nil {
		t.Fatal(err)
	}
	data := randBytes(1, 3*mib)
	d := a.put(t, data)
	b.put(t, data)
	onlyB := b.put(t, randBytes(2, mib))

	rc, from, err := ft.ReadFrom(ctx, ns, d)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) || from != a.url {
		t.Fatalf("read with both up: from %s, %v", from, err)
	}
	if e := ev.last(t); !e.Complete || len(e.Remotes) != 1 || e.Remotes[0] != a.url {
		t.Fatalf("read event %+v: want a complete read served by %s", e, a.url)
	}
	// NotFound on the first goes on to the second.
	if _, from, err := ft.ReadFrom(ctx, ns, onlyB); err != nil || from != b.url {
		t.Fatalf("blob only on the second remote: from %q, %v", from, err)
	}

	a.proxy.Disable()
	start := time.Now()
	rc, from, err = ft.ReadFrom(ctx, ns, d)
	if err != nil {
		t.Fatal(err)
	}
	got, err = io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) || from != b.url {
		t.Fatalf("read with the first remote down: from %s, %v", from, err)
	}
	if e := ev.last(t); !e.Complete || len(e.Remotes) != 1 || e.Remotes[0] != b.url || e.Bytes != int64(len(data)) {
		t.Fatalf("read event %+v: want a complete read served by %s", e, b.url)
	}
	t.Logf("failed over in %v", time.Since(start).Round(time.Millisecond))
	// The breaker keeps the next calls off the dead remote.
	for range 3 {
		if _, err := cache.ReadAll(ctx, ft, ns, d); err != nil {
			t.Fatal(err)
		}
	}
	st := ft.Stats()
	if st[0].Down == nil || st[1].Reads < 4 {
		t.Fatalf("stats %+v: want the first remote down and the second serving", st)
	}
	if n := countA.Stats().Reads; n != 3 {
		t.Fatalf("the first remote got %d reads, want 3 (two while up, one that found it down): its breaker did not keep calls off it", n)
	}

	// Other calls fail over too.
	if missing, err := ft.FindMissing(ctx, ns, []*repb.Digest{d, onlyB}); err != nil || len(missing) != 0 {
		t.Fatalf("FindMissing with the first remote down: %v %v", missing, err)
	}
	w := randBytes(3, 2*mib)
	wd := digest.Compute(ns.Function, w)
	if err := ft.Write(ctx, ns, wd, bytes.NewReader(w)); err != nil {
		t.Fatal(err)
	}
	if !b.has(t, wd) {
		t.Fatal("a write with the first remote down did not reach the second")
	}
	key := &repb.Digest{Hash: digest.StringListHash("entry"), SizeBytes: 1}
	ar := &repb.ActionResult{ExitCode: 7}
	if err := ft.UpdateActionResult(ctx, ns, key, ar); err != nil {
		t.Fatal(err)
	}
	if got, err := ft.GetActionResult(ctx, ns, key); err != nil || got.ExitCode != 7 {
		t.Fatalf("entry read back: %v %v", got, err)
	}
	// An entry no remote that answers holds is NotFound, at once.
	if _, err := ft.GetActionResult(ctx, ns, &repb.Digest{Hash: digest.StringListHash("none"), SizeBytes: 1}); !cache.IsNotFound(err) {
		t.Fatalf("absent entry: %v, want NotFound", err)
	}
	// With the first remote back, reads return to it (once its breaker
	// lets a probe through).
	a.proxy.Enable(t)
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, from, err := ft.ReadFrom(ctx, ns, d)
		if err == nil && from == a.url {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("reads did not return to the first remote once it was back (last from %s, %v)", from, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// readSome opens d on ft and reads its first n bytes.
func readSome(t testing.TB, ctx context.Context, ft *failover.Tier, d *repb.Digest, n int) (io.ReadCloser, []byte) {
	t.Helper()
	rc, err := ft.Read(ctx, ns, d)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(rc, buf); err != nil {
		t.Fatal(err)
	}
	return rc, buf
}

// A connection reset again and again for two seconds in the middle of a
// multi-MiB read: the read resumes where it was cut and completes with
// the blob's bytes.
func TestResetsMidReadAreRiddenOut(t *testing.T) {
	ctx := ctxT(t)
	r := startRemote(t)
	ev := &events{}
	ft := newTier(t, failover.Options{RetryFor: 15 * time.Second}, ev, r)
	data := randBytes(4, 8*mib)
	d := r.put(t, data)
	r.proxy.Add(t, "bandwidth", "downstream", `"rate":4096`)
	start := time.Now()
	rc, head := readSome(t, ctx, ft, d, mib)
	defer rc.Close()
	reset := r.proxy.Add(t, "reset_peer", "downstream", `"timeout":0`)
	time.AfterFunc(2*time.Second, func() { r.proxy.Remove(t, reset) })
	rest, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read across resets: %v", err)
	}
	if !bytes.Equal(append(head, rest...), data) {
		t.Fatal("the bytes of a read across resets differ from the blob")
	}
	e := ev.last(t)
	if !e.Complete || e.Attempts < 2 {
		t.Fatalf("read event %+v: want a complete read over several attempts", e)
	}
	t.Logf("read of %d MiB across 2 s of resets took %v in %d attempts", len(data)/mib, time.Since(start).Round(time.Millisecond), e.Attempts)
}

// A stream that stalls (no byte for 3 s) in the middle of a read is cut
// after AttemptTimeout and resumed: the read completes.
func TestStallMidReadIsRiddenOut(t *testing.T) {
	ctx := ctxT(t)
	r := startRemote(t)
	ev := &events{}
	ft := newTier(t, failover.Options{RetryFor: 15 * time.Second, AttemptTimeout: time.Second}, ev, r)
	data := randBytes(5, 8*mib)
	d := r.put(t, data)
	r.proxy.Add(t, "bandwidth", "downstream", `"rate":4096`)
	rc, head := readSome(t, ctx, ft, d, mib)
	defer rc.Close()
	stall := r.proxy.Add(t, "timeout", "downstream", `"timeout":0`)
	time.AfterFunc(3*time.Second, func() { r.proxy.Remove(t, stall) })
	start := time.Now()
	rest, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read across a stall: %v", err)
	}
	if !bytes.Equal(append(head, rest...), data) {
		t.Fatal("the bytes of a read across a stall differ from the blob")
	}
	if e := ev.last(t); !e.Complete || e.Attempts < 2 {
		t.Fatalf("read event %+v: want a complete read over several attempts", e)
	}
	t.Logf("rest of the read across a 3 s stall took %v", time.Since(start).Round(time.Millisecond))
}

// A remote that is down when a read starts and back within the bound: the
// read does not fail while its breaker is open, it waits for the remote.
func TestReadWaitsForRemoteWithinBound(t *testing.T) {
	ctx := ctxT(t)
	r := startRemote(t)
	ft := newTier(t, failover.Options{RetryFor: 15 * time.Second}, nil, r)
	data := randBytes(6, 2*mib)
	d := r.put(t, data)
	r.proxy.Disable()
	time.AfterFunc(2*time.Second, func() { r.proxy.Enable(t) })
	start := time.Now()
	got, err := cache.ReadAll(ctx, ft, ns, d)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read of a remote back within the bound: %v", err)
	}
	if el := time.Since(start); el < 2*time.Second {
		t.Fatalf("the read succeeded after %v, before the remote was back", el)
	}
}

// Past the bound, a read fails as Unavailable, naming the blob, the
// remotes tried and the last cause.
func TestBoundExceeded(t *testing.T) {
	ctx := ctxT(t)
	a, b := startRemote(t), startRemote(t)
	ft := newTier(t, failover.Options{RetryFor: 1500 * time.Millisecond}, nil, a, b)
	data := randBytes(7, mib)
	d := a.put(t, data)
	a.proxy.Disable()
	b.proxy.Disable()
	start := time.Now()
	_, err := ft.Read(ctx, ns, d)
	el := time.Since(start)
	if !errkind.Is(err, errkind.Unavailable) {
		t.Fatalf("read with every remote down: %v, want Unavailable", err)
	}
	msg := err.Error()
	for _, want := range []string{digest.String(d), a.url, b.url, "connection refused", "1.5s"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not name %q", msg, want)
		}
	}
	if el < 1500*time.Millisecond || el > 6*time.Second {
		t.Errorf("the read failed after %v; the bound is 1.5s", el)
	}
	// The same for a read cut in the middle that cannot resume.
	c := startRemote(t)
	ev := &events{}
	ft = newTier(t, failover.Options{RetryFor: 1500 * time.Millisecond}, ev, c)
	big := randBytes(8, 8*mib)
	bd := c.put(t, big)
	c.proxy.Add(t, "bandwidth", "downstream", `"rate":4096`)
	rc, _ := readSome(t, ctx, ft, bd, mib)
	defer rc.Close()
	c.proxy.Disable()
	b2, err := io.ReadAll(rc)
	if !errkind.Is(err, errkind.Unavailable) || !strings.Contains(err.Error(), digest.String(bd)) {
		t.Fatalf("read cut for good: %v, want Unavailable naming the blob", err)
	}
	if e := ev.last(t); e.Complete || e.Err == nil || e.Bytes != int64(mib+len(b2)) {
		t.Fatalf("read event %+v after a failed read of %d bytes", e, mib+len(b2))
	}
}

// corruptTier is a remote whose reads deliver other bytes than the blob's
// or, when early, report its copy corrupt before delivering any.
type corruptTier struct {
	cache.Tier
	data  []byte
	early bool
}

func (c *corruptTier) Read(_ context.Context, _ cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	if c.early {
		return nil, cache.Corruptf("blob %s is corrupt here", digest.String(d))
	}
	return io.NopCloser(bytes.NewReader(c.data)), nil
}

func (c *corruptTier) Traits() cache.Traits { return cache.Traits{Description: "corrupt"} }

// verifyingLiar is a remote that declares its reads verified and sends
// other bytes than the blob's, reporting DataLoss only where its stream
// ends, as a verifying client does.
type verifyingLiar struct {
	cache.Tier
	data []byte
}

func (v *verifyingLiar) Read(_ context.Context, _ cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	return io.NopCloser(io.MultiReader(bytes.NewReader(v.data), iotest.ErrReader(cache.Corruptf("blob %s: digest mismatch", digest.String(d))))), nil
}

func (v *verifyingLiar) Traits() cache.Traits {
	return cache.Traits{Description: "liar", VerifiesReads: true}
}

// A read from remotes whose reads verify is not hashed again, but their
// verdict still withholds the final bytes: a mismatch reported at the end
// of the remote's stream ends the read with DataLoss before them.
func TestVerifyingRemoteVerdict(t *testing.T) {
	ctx := ctxT(t)
	good := startRemote(t)
	data := randBytes(10, 2*mib)
	d := good.put(t, data)
	bad := bytes.Clone(data)
	bad[len(bad)-1] ^= 1
	ft, err := failover.New([]failover.Remote{{Tier: &verifyingLiar{Tier: good.client, data: bad}}}, failover.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	rc, err := ft.Read(ctx, ns, d)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if !errkind.Is(err, errkind.DataLoss) || len(got) >= len(data) {
		t.Fatalf("read of bytes its remote found corrupt at the end: %d bytes, %v; want DataLoss before the final bytes", len(got), err)
	}
	// An honest verifying remote: the whole blob.
	ft, err = failover.New([]failover.Remote{{Tier: good.client}}, failover.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := cache.ReadAll(ctx, ft, ns, d); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read from a verifying remote: %d bytes, %v", len(got), err)
	}
}

// Bytes that do not match the digest never end a read cleanly (the final
// bytes are withheld, the error is DataLoss); a remote that reports its
// copy corrupt before delivering anything is skipped for the next.
func TestCorruptRemote(t *testing.T) {
	ctx := ctxT(t)
	good := startRemote(t)
	data := randBytes(9, 2*mib)
	d := good.put(t, data)
	bad := bytes.Clone(data)
	bad[len(bad)-1] ^= 1
	liar, err := failover.New([]failover.Remote{{Tier: &corruptTier{Tier: good.client, data: bad}}, {Tier: good.client}}, failover.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	rc, err := liar.Read(ctx, ns, d)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if !errkind.Is(err, errkind.DataLoss) || len(got) >= len(data) {
		t.Fatalf("read of corrupt bytes: %d bytes, %v; want DataLoss before the final bytes", len(got), err)
	}
	skip, err := failover.New([]failover.Remote{{Tier: &corruptTier{Tier: good.client, early: true}}, {Tier: good.client, Name: "good"}}, failover.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	rc, from, err := skip.ReadFrom(ctx, ns, d)
	if err != nil || from != "good" {
		t.Fatalf("read past a remote whose copy is corrupt: from %q, %v", from, err)
	}
	got, err = io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read past a remote whose copy is corrupt: %v", err)
	}
}

// Ranges come from remotes that serve them, and resume across resets.
func TestRangeRead(t *testing.T) {
	ctx := ctxT(t)
	r := startRemote(t)
	ft := newTier(t, failover.Options{RetryFor: 10 * time.Second}, nil, r)
	data := randBytes(10, 4*mib)
	d := r.put(t, data)
	rc, err := ft.ReadRange(ctx, ns, d, mib+5, 2*mib)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data[mib+5:3*mib+5]) {
		t.Fatalf("range read: %d bytes, %v", len(got), err)
	}
	if !ft.Traits().ServesRanges || !ft.Traits().VerifiesReads {
		t.Fatalf("traits %+v", ft.Traits())
	}
	if _, err := ft.ReadRange(ctx, ns, d, 4*mib, 1); !errkind.Is(err, errkind.InvalidArgument) {
		t.Fatalf("range past the end: %v", err)
	}
	// No remote serving ranges: ErrNoRange.
	ct, _ := failover.New([]failover.Remote{{Tier: &corruptTier{Tier: r.client}}}, failover.Options{Logger: quiet})
	if _, err := ct.ReadRange(ctx, ns, d, 0, 10); !errors.Is(err, cache.ErrNoRange) {
		t.Fatalf("range read with no remote serving ranges: %v", err)
	}
}

// Writes skip a read-only remote; with every remote read-only they fail
// at once.
func TestReadOnlyRemote(t *testing.T) {
	ctx := ctxT(t)
	a, b := startRemote(t), startRemote(t)
	ft, err := failover.New([]failover.Remote{{Tier: a.client, ReadOnly: true}, {Tier: b.client}}, failover.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	data := randBytes(12, 100<<10)
	d := digest.Compute(ns.Function, data)
	if err := ft.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if a.has(t, d) || !b.has(t, d) {
		t.Fatal("a write reached the read-only remote, or not the writable one")
	}
	ro, err := failover.New([]failover.Remote{{Tier: a.client, ReadOnly: true}}, failover.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if err := ro.UpdateActionResult(ctx, ns, d, &repb.ActionResult{}); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("update with every remote read-only: %v", err)
	}
}

// A remote that could not be dialled when the host started is dialled
// again and used once it answers.
func TestRemoteDownAtStartIsDialledAgain(t *testing.T) {
	ctx := ctxT(t)
	r := startRemote(t)
	data := randBytes(13, mib)
	d := r.put(t, data)
	r.proxy.Disable()
	ft, err := failover.New([]failover.Remote{{Tier: cache.Unreachable(r.url, errkind.New(errkind.Unavailable, "connection refused")), Name: r.url, Dial: r.dial}},
		failover.Options{RetryFor: 10 * time.Second, AttemptTimeout: time.Second, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(time.Second, func() { r.proxy.Enable(t) })
	got, err := cache.ReadAll(ctx, ft, ns, d)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read from a remote down at start and back later: %v", err)
	}
}

// TestLookupsDoNotWaitOnDeadRemotes: with every remote down, a lookup (new
// work) fails after one pass over the remotes, so that a host goes on with
// its local cache, while a blob read keeps trying within RetryFor.
func TestLookupsDoNotWaitOnDeadRemotes(t *testing.T) {
	ctx := context.Background()
	down := func(name string) failover.Remote {
		return failover.Remote{Tier: cache.Unreachable(name, errkind.New(errkind.Unavailable, "connection refused")), Name: name}
	}
	ft, err := failover.New([]failover.Remote{down("a"), down("b")}, failover.Options{RetryFor: 300 * time.Millisecond, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer ft.Close()
	d := digest.Compute(digest.BLAKE3, []byte("entry"))
	if _, err := ft.GetActionResult(ctx, cache.Namespace{}, d); !errkind.Is(err, errkind.Unavailable) {
		t.Fatalf("lookup with every remote down: %v, want Unavailable", err)
	}
	lookupFailures := int64(0)
	for _, s := range ft.Stats() {
		lookupFailures += s.Failures
	}
	if lookupFailures != 2 {
		t.Errorf("a lookup failed %d times, want one pass over the two remotes", lookupFailures)
	}
	if _, err := ft.Read(ctx, cache.Namespace{}, d); !errkind.Is(err, errkind.Unavailable) {
		t.Fatalf("read with every remote down: %v, want Unavailable once the bound passed", err)
	}
	readFailures := int64(0)
	for _, s := range ft.Stats() {
		readFailures += s.Failures
	}
	if readFailures-lookupFailures <= 2 {
		t.Errorf("a read failed %d times, want several passes within its bound", readFailures-lookupFailures)
	}
}
