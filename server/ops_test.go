package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/server"
)

func TestAPIKeySources(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "keys")
	if err := os.WriteFile(file, []byte("# team keys\nk1=team\n\nk2=team:ro\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var ks server.APIKeys
	if err := ks.AddFile(file); err != nil {
		t.Fatal(err)
	}
	if err := ks.AddList("k3=other, k4=:rw k1=team", "$SNAPLOADER_API_KEYS"); err != nil {
		t.Fatal(err)
	}
	want := map[string]server.APIKey{"k1": {Group: "team"}, "k2": {Group: "team", ReadOnly: true}, "k3": {Group: "other"}, "k4": {}}
	if len(ks.Keys) != len(want) {
		t.Fatalf("keys %+v, want %+v", ks.Keys, want)
	}
	for k, v := range want {
		if ks.Keys[k] != v {
			t.Errorf("key %s: %+v, want %+v", k, ks.Keys[k], v)
		}
	}
	for _, tc := range []struct {
		name, spec, want string
	}{
		{"conflict", "k1=other", "another grant"},
		{"no group", "k9", "want KEY=GROUP"},
		{"bad mode", "k9=g:rx", "want ro or rw"},
	} {
		if err := ks.Add(tc.spec, "--api-key"); err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "k1=") {
			t.Errorf("%s: %v, want an error saying %q (and not the key)", tc.name, err, tc.want)
		}
	}
	if err := os.Chmod(file, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := (&server.APIKeys{}).AddFile(file); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("a group-readable key file: %v, want it refused", err)
	}
	if err := (&server.APIKeys{}).AddFile(dir); err == nil {
		t.Error("a directory was read as a key file")
	}
}

func TestListenUnixSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	// A socket left behind by a server that is gone.
	old, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	old.(*net.UnixListener).SetUnlinkOnClose(false)
	old.Close()
	lis, err := server.Listen("unix://" + path)
	if err != nil {
		t.Fatalf("a stale socket was not replaced: %v", err)
	}
	// A live one is not taken over.
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if l2, err := server.Listen("unix://" + path); err == nil || !strings.Contains(err.Error(), "another server") {
		if l2 != nil {
			l2.Close()
		}
		t.Errorf("listening on a live socket: %v", err)
	}
	lis.Close()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the socket outlived its listener: %v", err)
	}
	// Nor is a file that is no socket removed.
	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("data"), 0o644)
	if _, err := server.Listen("unix://" + file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("listening over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(file); string(b) != "data" {
		t.Error("the regular file was touched")
	}
	if _, err := server.Listen("unix://relative.sock"); err == nil {
		t.Error("a relative socket path was accepted")
	}
}

// flakyBackend is a local cache whose lookups can be made to fail.
type flakyBackend struct {
	*localcache.Cache
	down atomic.Bool
}

func (f *flakyBackend) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	if f.down.Load() {
		return nil, status.Error(codes.Unavailable, "backend down")
	}
	return f.Cache.FindMissing(ctx, ns, ds)
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func healthOf(t *testing.T, hc healthpb.HealthClient) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	r, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Status
}

func eventually(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if ok() {
			return
		}
	}
	t.Fatalf("%s: not within 10s", what)
}

func TestHealthAndReadiness(t *testing.T) {
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	b := &flakyBackend{Cache: lc}
	srv, err := server.New(b, server.Options{TempDir: t.TempDir(), HealthInterval: 20 * time.Millisecond,
		APIKeys: map[string]server.APIKey{"k": {Group: "g"}}})
	if err != nil {
		t.Fatal(err)
	}
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	ml, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); srv.Serve(ctx, lis) }()
	go func() { defer wg.Done(); srv.ServeMetrics(ctx, ml) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	base := "http://" + ml.Addr().String()

	// Health needs no API key.
	eventually(t, "SERVING", func() bool { return healthOf(t, hc) == healthpb.HealthCheckResponse_SERVING })
	if code, body := httpGet(t, base+"/readyz"); code != 200 || body != "ready\n" {
		t.Errorf("/readyz: %d %q", code, body)
	}
	b.down.Store(true)
	if code, body := httpGet(t, base+"/readyz"); code != 503 || !strings.Contains(body, "backend down") {
		t.Errorf("/readyz with the backend down: %d %q", code, body)
	}
	if code, body := httpGet(t, base+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz with the backend down: %d %q; the process is up", code, body)
	}
	eventually(t, "NOT_SERVING", func() bool { return healthOf(t, hc) == healthpb.HealthCheckResponse_NOT_SERVING })
	b.down.Store(false)
	eventually(t, "SERVING again", func() bool { return healthOf(t, hc) == healthpb.HealthCheckResponse_SERVING })

	// Draining: an upload in flight holds the shutdown; meanwhile the
	// server is not ready, and the metrics server still says so.
	bs := bspb.NewByteStreamClient(conn)
	wctx := metadata.AppendToOutgoingContext(context.Background(), "x-api-key", "k")
	w, err := bs.Write(wctx)
	if err != nil {
		t.Fatal(err)
	}
	blob := data(1000)
	d := digest.Compute(digest.SHA256, blob)
	if err := w.Send(&bspb.WriteRequest{ResourceName: uploadName(d, "u1"), Data: blob[:10]}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the upload under way", func() bool {
		_, err := srv.Status(context.Background())
		return err == nil
	})
	time.Sleep(100 * time.Millisecond)
	cancel()
	eventually(t, "/readyz draining", func() bool {
		code, body := httpGet(t, base+"/readyz")
		return code == 503 && strings.Contains(body, "draining")
	})
	if err := w.Send(&bspb.WriteRequest{WriteOffset: 10, Data: blob[10:], FinishWrite: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.CloseAndRecv(); err != nil {
		t.Errorf("the upload in flight at shutdown: %v", err)
	}
	wg.Wait()
}

func TestAccessLog(t *testing.T) {
	var buf syncBuffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	e := start(t, server.Options{Logger: log, AccessLog: true, APIKeys: map[string]server.APIKey{"k": {Group: "team"}}})
	ctx := metadata.AppendToOutgoingContext(context.Background(), "x-api-key", "k")
	blob := data(100 << 10)
	d := sha(blob)
	if _, err := e.write(ctx, &bspb.WriteRequest{ResourceName: "ci/" + uploadName(d, "u1"), Data: blob, FinishWrite: true}); err != nil {
		t.Fatal(err)
	}
	rs, err := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: "ci/blobs/" + d.Hash + "/" + itoa(d.SizeBytes)})
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := rs.Recv(); err != nil {
			break
		}
	}
	if _, err := e.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{InstanceName: "ci", BlobDigests: []*repb.Digest{d, sha([]byte("x"))}}); err != nil {
		t.Fatal(err)
	}
	_, err = e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{InstanceName: "ci", ActionDigest: sha([]byte("action"))})
	if status.Code(err) != codes.NotFound {
		t.Fatal(err)
	}
	e.ac.GetActionResult(context.Background(), &repb.GetActionResultRequest{ActionDigest: sha([]byte("action"))})

	type line struct {
		Level, Msg, Method, Code, Group, Instance, Digest, Peer string
		BytesIn                                                 int64   `json:"bytes_in"`
		BytesOut                                                int64   `json:"bytes_out"`
		DurationMS                                              float64 `json:"duration_ms"`
		Blobs                                                   int
	}
	var lines []line
	for _, raw := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var l line
		if err := json.Unmarshal([]byte(raw), &l); err != nil {
			t.Fatalf("not JSON: %q", raw)
		}
		if l.Msg == "rpc" {
			lines = append(lines, l)
		}
	}
	want := []line{
		{Method: "ByteStream/Write", Code: "OK", Group: "team", Instance: "ci", Digest: d.Hash + "/102400"},
		{Method: "ByteStream/Read", Code: "OK", Group: "team", Instance: "ci", Digest: d.Hash + "/102400"},
		{Method: "ContentAddressableStorage/FindMissingBlobs", Code: "OK", Group: "team", Instance: "ci", Blobs: 2},
		{Method: "ActionCache/GetActionResult", Code: "NotFound", Group: "team", Instance: "ci", Digest: sha([]byte("action")).Hash + "/6"},
		{Method: "ActionCache/GetActionResult", Code: "Unauthenticated", Digest: sha([]byte("action")).Hash + "/6"},
	}
	if len(lines) != len(want) {
		t.Fatalf("%d access-log lines, want %d:\n%s", len(lines), len(want), buf.String())
	}
	for i, w := range want {
		l := lines[i]
		if l.Level != "INFO" || l.Method != w.Method || l.Code != w.Code || l.Group != w.Group || l.Instance != w.Instance ||
			!strings.HasPrefix(l.Digest, w.Digest) || l.Blobs != w.Blobs || l.Peer == "" || l.DurationMS <= 0 {
			t.Errorf("line %d: %+v, want %+v", i, l, w)
		}
	}
	if lines[0].BytesIn < 100<<10 || lines[1].BytesOut < 100<<10 {
		t.Errorf("bytes: write in %d, read out %d; want at least the blob's 100 KiB", lines[0].BytesIn, lines[1].BytesOut)
	}
	if strings.Contains(buf.String(), `"k"`) {
		t.Error("the access log shows the API key")
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestMutualTLS(t *testing.T) {
	files := testutil.NewTLSFiles(t, t.TempDir())
	cfg, err := server.TLSConfig(files.ServerCert, files.ServerKey, files.CA)
	if err != nil {
		t.Fatal(err)
	}
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(lc, server.Options{TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis, grpc.Creds(credentials.NewTLS(cfg))) }()
	defer func() { cancel(); <-done }()
	caPEM, _ := os.ReadFile(files.CA)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	call := func(certs []tls.Certificate) error {
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, Certificates: certs})))
		if err != nil {
			return err
		}
		defer conn.Close()
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err = repb.NewCapabilitiesClient(conn).GetCapabilities(c, &repb.GetCapabilitiesRequest{})
		return err
	}
	if err := call(nil); err == nil {
		t.Error("a client without a certificate was served")
	}
	cert, err := tls.LoadX509KeyPair(files.ClientCert, files.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := call([]tls.Certificate{cert}); err != nil {
		t.Errorf("a client with a certificate of the CA: %v", err)
	}
	// A certificate the CA did not sign is refused.
	other := testutil.NewTLSFiles(t, t.TempDir())
	foreign, _ := tls.LoadX509KeyPair(other.ClientCert, other.ClientKey)
	if err := call([]tls.Certificate{foreign}); err == nil {
		t.Error("a client certificate of another CA was accepted")
	}
	if _, err := server.TLSConfig(files.ServerCert, files.ClientKey, ""); err == nil {
		t.Error("a certificate with a key that is not its own was accepted")
	}
}
