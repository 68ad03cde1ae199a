package remote_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/prometheus/client_golang/prometheus"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

// env is a real cache server on a loopback port over a local disk cache.
type env struct {
	lc     *localcache.Cache
	srv    *server.Server
	reg    *prometheus.Registry
	addr   string
	target string
}

func start(t testing.TB, sopts server.Options, gopts ...grpc.ServerOption) *env {
	t.Helper()
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	sopts.Registry = reg
	sopts.TempDir = t.TempDir()
	srv, err := server.New(lc, sopts)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(append(srv.GRPCServerOptions(), gopts...)...)
	srv.Register(gs)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	return &env{lc: lc, srv: srv, reg: reg, addr: lis.Addr().String(), target: "grpc://" + lis.Addr().String()}
}

func (e *env) dial(t testing.TB, opts remote.Options) *remote.Client {
	t.Helper()
	if opts.RetryBackoff == 0 {
		opts.RetryBackoff = time.Millisecond
	}
	c, err := remote.Dial(context.Background(), e.target, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// calls is the number of requests of a method the server saw.
func (e *env) calls(method string) int {
	n := 0.0
	mfs, _ := e.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() != "snaploader_server_requests_total" {
			continue
		}
		for _, m := range mf.Metric {
			for _, l := range m.Label {
				if l.GetName() == "method" && l.GetValue() == method {
					n += m.GetCounter().GetValue()
				}
			}
		}
	}
	return int(n)
}

func (e *env) bytesIn() float64 {
	mfs, _ := e.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "snaploader_server_blob_bytes_total" {
			for _, m := range mf.Metric {
				if m.Label[0].GetValue() == "in" {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// blob is n bytes, half random and half zeros (so zstd has work to do).
func blob(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := mrand.New(mrand.NewPCG(seed, 1))
	for i := 0; i < n/2; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n/2; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

func readAll(t testing.TB, c cache.Tier, ns cache.Namespace, d *repb.Digest) []byte {
	t.Helper()
	b, err := cache.ReadAll(context.Background(), c, ns, d)
	if err != nil {
		t.Fatalf("reading %s: %v", digest.String(d), err)
	}
	return b
}

func TestRoundTrip(t *testing.T) {
	sizes := []int{0, 1000, 5<<20 + 123}
	for _, tc := range []struct {
		name        string
		fn          digest.Function
		serverFns   []digest.Function
		compression bool
	}{
		{"blake3-zstd", 0, nil, true},
		{"blake3-plain", 0, nil, false},
		{"sha256-only-server", 0, []digest.Function{digest.SHA256}, true},
		{"sha256-forced-plain", digest.SHA256, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := start(t, server.Options{DigestFunctions: tc.serverFns})
			c := e.dial(t, remote.Options{DigestFunction: tc.fn, DisableCompression: !tc.compression, Instance: "ci/main"})
			want := tc.fn
			if want == 0 {
				want = digest.BLAKE3
				if tc.serverFns != nil {
					want = digest.SHA256
				}
			}
			if c.DigestFunction() != want {
				t.Fatalf("digest function %v, want %v", c.DigestFunction(), want)
			}
			if c.Compression() != tc.compression {
				t.Fatalf("compression %v, want %v", c.Compression(), tc.compression)
			}
			ctx := context.Background()
			ns := cache.Namespace{}
			var ds []*repb.Digest
			for i, n := range sizes {
				data := blob(n, uint64(i))
				d := digest.Compute(want, data)
				ds = append(ds, d)
				if err := c.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
					t.Fatalf("write %d bytes: %v", n, err)
				}
				if got := readAll(t, c, ns, d); !bytes.Equal(got, data) {
					t.Fatalf("%d bytes: read back %d different bytes", n, len(got))
				}
				// Uploading stored data again succeeds (the server ends
				// the upload early).
				if err := c.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
					t.Fatalf("second write of %d bytes: %v", n, err)
				}
				// The server stored it under the chosen function.
				if n > 0 {
					if _, err := os.Stat(e.lc.Path(cache.Namespace{Function: want}, d)); err != nil {
						t.Fatalf("blob not on the server's disk: %v", err)
					}
				}
			}
			missing, err := c.FindMissing(ctx, ns, ds)
			if err != nil || len(missing) != 0 {
				t.Fatalf("FindMissing after writes = %v, %v", missing, err)
			}
			// Large blobs went over ByteStream, small ones in batches.
			if e.calls("Write") != 2 || e.calls("Read") != 1 || e.calls("BatchUpdateBlobs") != 2 || e.calls("BatchReadBlobs") != 1 {
				t.Fatalf("calls: Write %d Read %d BatchUpdate %d BatchRead %d", e.calls("Write"), e.calls("Read"), e.calls("BatchUpdateBlobs"), e.calls("BatchReadBlobs"))
			}
			// Compressed transfers move fewer bytes than the blob.
			if in := e.bytesIn(); tc.compression != (in < float64(sizes[2])) {
				t.Fatalf("compression %v but %v bytes went in for %d", tc.compression, in, sizes[2])
			}
			// An absent blob is NotFound on both paths.
			for _, n := range []int{10, 5 << 20} {
				_, err := c.Read(ctx, ns, digest.Compute(want, blob(n, 99)))
				if status.Code(err) != codes.NotFound {
					t.Fatalf("read of absent %d-byte blob: %v, want NotFound", n, err)
				}
			}
		})
	}
}

func TestUnixSocket(t *testing.T) {
	lc, err := localcache.New(t.TempDir(), localcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(lc, server.Options{})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "cache.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	c, err := remote.Dial(ctx, "unix://"+sock, remote.Options{})
	if err != nil {
		t.Fatal(err)
	}
	data := blob(6<<20, 3)
	d := digest.Compute(c.DigestFunction(), data)
	if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, c, cache.Namespace{}, d); !bytes.Equal(got, data) {
		t.Fatal("read back different data")
	}
	c.Close()
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve returned %v after cancel", err)
	}
}

func TestFindMissingBatching(t *testing.T) {
	e := start(t, server.Options{})
	c := e.dial(t, remote.Options{})
	ctx := context.Background()
	var ds, present []*repb.Digest
	for i := range 25000 {
		d := digest.Compute(c.DigestFunction(), []byte{byte(i), byte(i >> 8), 1})
		ds = append(ds, d)
		if i%5000 == 17 {
			if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader([]byte{byte(i), byte(i >> 8), 1})); err != nil {
				t.Fatal(err)
			}
			present = append(present, d)
		}
	}
	ds = append(ds, digest.Compute(c.DigestFunction(), nil)) // the empty blob is always present
	missing, err := c.FindMissing(ctx, cache.Namespace{}, ds)
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) != 25000-len(present) {
		t.Fatalf("%d missing, want %d", len(missing), 25000-len(present))
	}
	got := map[string]bool{}
	for _, d := range missing {
		got[d.Hash] = true
	}
	for _, d := range present {
		if got[d.Hash] {
			t.Fatalf("present blob %s reported missing", digest.String(d))
		}
	}
	if n := e.calls("FindMissingBlobs"); n != 3 {
		t.Fatalf("%d FindMissingBlobs calls for 25000 digests, want 3", n)
	}
}

// snapshotEntry stores blobs and a tree and returns an ActionResult
// referencing them, like a snapshot manifest.
func snapshotEntry(t *testing.T, c cache.Tier, fn digest.Function) (*repb.ActionResult, []*repb.Digest) {
	t.Helper()
	ctx := context.Background()
	put := func(b []byte) *repb.Digest {
		d := digest.Compute(fn, b)
		if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		return d
	}
	artifact := put([]byte("vmstate"))
	var chunks []*repb.Digest
	tree := &repb.Tree{Root: &repb.Directory{}}
	for i := range 3 {
		d := put(blob(64<<10, uint64(100+i)))
		chunks = append(chunks, d)
		tree.Root.Files = append(tree.Root.Files, &repb.FileNode{Name: string(rune('0' + i)), Digest: d})
	}
	tb, _ := proto.Marshal(tree)
	td := put(tb)
	return &repb.ActionResult{
		OutputFiles:       []*repb.OutputFile{{Path: "vmstate", Digest: artifact}},
		OutputDirectories: []*repb.OutputDirectory{{Path: "mem", TreeDigest: td}},
	}, append([]*repb.Digest{artifact, td}, chunks...)
}

func TestActionCache(t *testing.T) {
	e := start(t, server.Options{})
	c := e.dial(t, remote.Options{Instance: "default"})
	ctx := context.Background()
	fn := c.DigestFunction()
	key := &repb.Digest{Hash: digest.StringListHash("k", ".manifest"), SizeBytes: 1}
	if _, err := c.GetActionResult(ctx, cache.Namespace{}, key); status.Code(err) != codes.NotFound {
		t.Fatalf("get before update: %v, want NotFound", err)
	}
	ar, refs := snapshotEntry(t, c, fn)
	if err := c.UpdateActionResult(ctx, cache.Namespace{}, key, ar); err != nil {
		t.Fatal(err)
	}
	got, err := c.GetActionResult(ctx, cache.Namespace{}, key)
	if err != nil || !proto.Equal(got, ar) {
		t.Fatalf("get = %v, %v", got, err)
	}
	// Another instance name is another namespace.
	if _, err := c.GetActionResult(ctx, cache.Namespace{Instance: "other"}, key); status.Code(err) != codes.NotFound {
		t.Fatalf("get under another instance: %v, want NotFound", err)
	}
	// Deleting any referenced blob behind the server (the tree, a file in
	// the tree, an output file) makes the entry NotFound.
	for _, d := range []*repb.Digest{refs[3], refs[1], refs[0]} {
		if err := os.Remove(e.lc.Path(cache.Namespace{Function: fn}, d)); err != nil {
			t.Fatal(err)
		}
		if _, err := c.GetActionResult(ctx, cache.Namespace{}, key); status.Code(err) != codes.NotFound {
			t.Fatalf("get with %s deleted: %v, want NotFound", digest.String(d), err)
		}
		ar2, _ := snapshotEntry(t, c, fn) // store everything again
		if _, err := c.GetActionResult(ctx, cache.Namespace{}, key); err != nil || !proto.Equal(ar2, ar) {
			t.Fatalf("get after restoring blobs: %v", err)
		}
	}
	hits := counter(t, e.reg, "snaploader_server_action_cache_lookups_total", "hit")
	misses := counter(t, e.reg, "snaploader_server_action_cache_lookups_total", "miss")
	if hits != 4 || misses != 5 {
		t.Fatalf("AC hits %v misses %v, want 4 and 5", hits, misses)
	}
}

// counter is the value of one labelled sample of a counter.
func counter(t *testing.T, g prometheus.Gatherer, name, label string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.Metric {
			for _, l := range m.Label {
				if l.GetValue() == label {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s{%s}", name, label)
	return 0
}

// failWrites makes the first Write call fail with UNAVAILABLE after the
// server has received at least after bytes.
type failWrites struct {
	after int
	fired atomic.Bool
}

func (f *failWrites) intercept(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if info.FullMethod != "/google.bytestream.ByteStream/Write" || f.fired.Load() {
		return handler(srv, ss)
	}
	return handler(srv, &failingStream{ServerStream: ss, f: f})
}

type failingStream struct {
	grpc.ServerStream
	f *failWrites
	n int
}

func (s *failingStream) RecvMsg(m any) error {
	if s.n >= s.f.after && s.f.fired.CompareAndSwap(false, true) {
		return status.Error(codes.Unavailable, "injected: connection lost")
	}
	err := s.ServerStream.RecvMsg(m)
	if wr, ok := m.(*bspb.WriteRequest); ok && err == nil {
		s.n += len(wr.Data)
	}
	return err
}

func TestResumableWrite(t *testing.T) {
	f := &failWrites{after: 3 << 20}
	e := start(t, server.Options{}, grpc.ChainStreamInterceptor(f.intercept))
	ctx := context.Background()
	for i, tc := range []struct {
		name string
		r    func([]byte) io.Reader
	}{
		{"seekable", func(b []byte) io.Reader { return bytes.NewReader(b) }},
		{"oneshot-buffered", func(b []byte) io.Reader { return io.MultiReader(bytes.NewReader(b)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f.fired.Store(false)
			before, beforeQ := e.bytesIn(), e.calls("QueryWriteStatus")
			c := e.dial(t, remote.Options{DisableCompression: true})
			data := blob(8<<20, uint64(i))
			d := digest.Compute(c.DigestFunction(), data)
			if err := c.Write(ctx, cache.Namespace{}, d, tc.r(data)); err != nil {
				t.Fatal(err)
			}
			if !f.fired.Load() {
				t.Fatal("the write was never interrupted")
			}
			if got := readAll(t, c, cache.Namespace{}, d); !bytes.Equal(got, data) {
				t.Fatal("resumed upload stored different data")
			}
			if e.calls("QueryWriteStatus") != beforeQ+1 {
				t.Fatal("the client did not ask where to resume")
			}
			// Resumed, not restarted: the server received each byte once.
			if in := e.bytesIn() - before; in != float64(len(data)) {
				t.Fatalf("server received %v bytes for an %d-byte blob", in, len(data))
			}
		})
	}
}

// flaky fails the first n calls of a method with code, counting calls.
type flaky struct {
	method string
	code   codes.Code
	n      atomic.Int32
	calls  atomic.Int32
	block  bool
}

func (f *flaky) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if info.FullMethod != f.method {
		return handler(ctx, req)
	}
	f.calls.Add(1)
	if f.block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if f.n.Add(-1) >= 0 {
		return nil, status.Error(f.code, "injected")
	}
	return handler(ctx, req)
}

func TestRetries(t *testing.T) {
	const get = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult"
	for _, tc := range []struct {
		code      codes.Code
		failures  int32
		wantCalls int32
		wantCode  codes.Code
	}{
		{codes.Unavailable, 2, 3, codes.NotFound},       // retried, then the real answer
		{codes.ResourceExhausted, 2, 3, codes.NotFound}, // retried
		{codes.Unavailable, 100, 5, codes.Unavailable},  // 1 + MaxRetries(4) attempts
		{codes.InvalidArgument, 1, 1, codes.InvalidArgument},
		{codes.NotFound, 1, 1, codes.NotFound},
		{codes.PermissionDenied, 1, 1, codes.PermissionDenied},
	} {
		t.Run(tc.code.String(), func(t *testing.T) {
			f := &flaky{method: get, code: tc.code}
			f.n.Store(tc.failures)
			e := start(t, server.Options{}, grpc.ChainUnaryInterceptor(f.unary))
			c := e.dial(t, remote.Options{})
			_, err := c.GetActionResult(context.Background(), cache.Namespace{}, &repb.Digest{Hash: strings.Repeat("a", 64), SizeBytes: 1})
			if status.Code(err) != tc.wantCode || f.calls.Load() != tc.wantCalls {
				t.Fatalf("err %v after %d calls; want %v after %d", err, f.calls.Load(), tc.wantCode, tc.wantCalls)
			}
		})
	}
}

func TestDeadline(t *testing.T) {
	f := &flaky{method: "/build.bazel.remote.execution.v2.ActionCache/GetActionResult", block: true}
	e := start(t, server.Options{}, grpc.ChainUnaryInterceptor(f.unary))
	c := e.dial(t, remote.Options{CallTimeout: 200 * time.Millisecond})
	_, err := c.GetActionResult(context.Background(), cache.Namespace{}, &repb.Digest{Hash: strings.Repeat("a", 64), SizeBytes: 1})
	if status.Code(err) != codes.DeadlineExceeded || f.calls.Load() != 1 {
		t.Fatalf("err %v after %d calls; want DeadlineExceeded after 1", err, f.calls.Load())
	}
	// The per-call deadline does not cut a healthy call short: other
	// calls on the same client still work.
	if _, err := c.FindMissing(context.Background(), cache.Namespace{}, []*repb.Digest{{Hash: strings.Repeat("b", 64), SizeBytes: 3}}); err != nil {
		t.Fatal(err)
	}
}

// failReads breaks the first ByteStream Read after it has sent one message.
type failReads struct{ fired atomic.Bool }

func (f *failReads) intercept(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if info.FullMethod != "/google.bytestream.ByteStream/Read" || f.fired.Load() {
		return handler(srv, ss)
	}
	return handler(srv, &breakingSender{ServerStream: ss, f: f})
}

type breakingSender struct {
	grpc.ServerStream
	f    *failReads
	sent int
}

func (s *breakingSender) SendMsg(m any) error {
	if s.sent == 2 && s.f.fired.CompareAndSwap(false, true) {
		return status.Error(codes.Unavailable, "injected: connection lost")
	}
	s.sent++
	return s.ServerStream.SendMsg(m)
}

func TestReadResumes(t *testing.T) {
	for _, compression := range []bool{false, true} {
		f := &failReads{}
		e := start(t, server.Options{}, grpc.ChainStreamInterceptor(f.intercept))
		c := e.dial(t, remote.Options{DisableCompression: !compression})
		data := blob(6<<20, 11)
		for i := 0; i < len(data)/2; i += 997 {
			data[i] = 0 // compressible, but more than one message
		}
		d := digest.Compute(c.DigestFunction(), data)
		if err := c.Write(context.Background(), cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, c, cache.Namespace{}, d); !bytes.Equal(got, data) {
			t.Fatalf("compression=%v: resumed read returned different data", compression)
		}
		if !f.fired.Load() || e.calls("Read") != 2 {
			t.Fatalf("compression=%v: fired %v, %d Read calls; want an interrupted read and one resumption", compression, f.fired.Load(), e.calls("Read"))
		}
	}
}

func TestAuth(t *testing.T) {
	e := start(t, server.Options{APIKeys: map[string]server.APIKey{
		"key-a":    {Group: "a"},
		"key-b":    {Group: "b"},
		"key-a-ro": {Group: "a", ReadOnly: true},
	}})
	ctx := context.Background()
	for _, opts := range []remote.Options{{}, {APIKey: "nope"}, {BearerToken: "nope"}, {APIKey: "key-a", APIKeyHeader: "x-other"}} {
		if _, err := remote.Dial(ctx, e.target, opts); status.Code(err) != codes.Unauthenticated {
			t.Fatalf("dial with %+v: %v, want Unauthenticated", opts, err)
		}
	}
	a := e.dial(t, remote.Options{APIKey: "key-a", Instance: "shared"})
	b := e.dial(t, remote.Options{BearerToken: "key-b", Instance: "shared"})
	ro := e.dial(t, remote.Options{APIKey: "key-a-ro", Instance: "shared"})
	if !a.CanUpdateActionCache() || ro.CanUpdateActionCache() {
		t.Fatal("capabilities do not reflect the read-only key")
	}
	ar, _ := snapshotEntry(t, a, a.DigestFunction())
	key := &repb.Digest{Hash: digest.StringListHash("manifest"), SizeBytes: 1}
	if err := a.UpdateActionResult(ctx, cache.Namespace{}, key, ar); err != nil {
		t.Fatal(err)
	}
	// Same instance, same key digest: group b sees nothing.
	if _, err := b.GetActionResult(ctx, cache.Namespace{}, key); status.Code(err) != codes.NotFound {
		t.Fatalf("group b read group a's entry: %v", err)
	}
	// The read-only key of group a reads it but cannot write.
	if got, err := ro.GetActionResult(ctx, cache.Namespace{}, key); err != nil || !proto.Equal(got, ar) {
		t.Fatalf("read-only get: %v", err)
	}
	if err := ro.UpdateActionResult(ctx, cache.Namespace{}, key, ar); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("read-only update: %v, want PermissionDenied", err)
	}
	for _, n := range []int{10, 5 << 20} {
		data := blob(n, 77)
		d := digest.Compute(ro.DigestFunction(), data)
		if err := ro.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("read-only write of %d bytes: %v, want PermissionDenied", n, err)
		}
	}
	// b's own entry is separate from a's.
	ar2 := &repb.ActionResult{ExitCode: 7}
	if err := b.UpdateActionResult(ctx, cache.Namespace{}, key, ar2); err != nil {
		t.Fatal(err)
	}
	if got, err := a.GetActionResult(ctx, cache.Namespace{}, key); err != nil || got.ExitCode != 0 {
		t.Fatalf("group a's entry changed: %v %v", got, err)
	}
}

// selfSignedCA writes a CA certificate and returns it with a server
// certificate for 127.0.0.1 signed by it.
func selfSignedCA(t *testing.T) (caFile string, serverCert tls.Certificate) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caFile = filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		t.Fatal(err)
	}
	return caFile, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func TestTLS(t *testing.T) {
	caFile, cert := selfSignedCA(t)
	e := start(t, server.Options{APIKeys: map[string]server.APIKey{"k": {Group: "g"}}},
		grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})))
	target := "grpcs://" + e.addr
	ctx := context.Background()
	c, err := remote.Dial(ctx, target, remote.Options{CAFile: caFile, APIKey: "k", MaxRetries: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	data := blob(5<<20, 9)
	d := digest.Compute(c.DigestFunction(), data)
	if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, c, cache.Namespace{}, d); !bytes.Equal(got, data) {
		t.Fatal("read back different data over TLS")
	}
	// System roots do not trust the test CA: a configuration error that
	// says so (Dial probes what the endpoint answered), never an outage.
	if _, err := remote.Dial(ctx, target, remote.Options{APIKey: "k", MaxRetries: -1}); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "does not trust") {
		t.Fatalf("dial %s without the CA: %v, want InvalidArgument saying the certificate is not trusted", target, err)
	}
	// Plaintext against the TLS server: the answer says to use grpcs://.
	if _, err := remote.Dial(ctx, e.target, remote.Options{APIKey: "k", MaxRetries: -1}); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "use grpcs://") {
		t.Fatalf("dial %s in plaintext: %v, want InvalidArgument saying to use grpcs://", e.target, err)
	}
}

func TestDialErrors(t *testing.T) {
	for _, target := range []string{"127.0.0.1:1", "http://x:1", "grpc://nohost", "grpcs://"} {
		if _, err := remote.Dial(context.Background(), target, remote.Options{}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("Dial(%q): %v, want InvalidArgument", target, err)
		}
	}
	e := start(t, server.Options{DigestFunctions: []digest.Function{digest.SHA256}})
	if _, err := remote.Dial(context.Background(), e.target, remote.Options{DigestFunction: digest.BLAKE3}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("forcing an unoffered digest function: %v", err)
	}
	c := e.dial(t, remote.Options{})
	_, err := c.FindMissing(context.Background(), cache.Namespace{Function: digest.BLAKE3}, []*repb.Digest{{Hash: strings.Repeat("a", 64), SizeBytes: 1}})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("namespace with an unoffered function: %v", err)
	}
}

func TestResourceNames(t *testing.T) {
	d := &repb.Digest{Hash: strings.Repeat("a", 64), SizeBytes: 42}
	for _, tc := range []struct{ got, want string }{
		{remote.ReadResourceName("", digest.SHA256, d, false), "blobs/" + d.Hash + "/42"},
		{remote.ReadResourceName("a/b", digest.BLAKE3, d, false), "a/b/blobs/blake3/" + d.Hash + "/42"},
		{remote.ReadResourceName("i", digest.BLAKE3, d, true), "i/compressed-blobs/zstd/blake3/" + d.Hash + "/42"},
		{remote.WriteResourceName("", "u", digest.SHA256, d, true), "uploads/u/compressed-blobs/zstd/" + d.Hash + "/42"},
		{remote.WriteResourceName("i", "u", digest.BLAKE3, d, false), "i/uploads/u/blobs/blake3/" + d.Hash + "/42"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q want %q", tc.got, tc.want)
		}
	}
}

func TestUpdateEnabled(t *testing.T) {
	open := start(t, server.Options{})
	keyed := start(t, server.Options{APIKeys: map[string]server.APIKey{"rw": {Group: "a"}, "ro": {Group: "a", ReadOnly: true}}})
	for _, tc := range []struct {
		name string
		e    *env
		opts remote.Options
		want bool
	}{
		{"no auth", open, remote.Options{}, true},
		{"read-write key", keyed, remote.Options{APIKey: "rw"}, true},
		{"read-only key", keyed, remote.Options{APIKey: "ro"}, false},
		{"read-only bearer token", keyed, remote.Options{BearerToken: "ro"}, false},
	} {
		if got := tc.e.dial(t, tc.opts).UpdateEnabled(); got != tc.want {
			t.Errorf("%s: UpdateEnabled %v, want %v", tc.name, got, tc.want)
		}
	}
}
