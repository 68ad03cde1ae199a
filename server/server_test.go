package server_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"github.com/prometheus/client_golang/prometheus"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/proto/inventorypb"
	"github.com/snaploader/snaploader/server"
)

type env struct {
	lc  *localcache.Cache
	srv *server.Server
	cas repb.ContentAddressableStorageClient
	ac  repb.ActionCacheClient
	bs  bspb.ByteStreamClient
	cap repb.CapabilitiesClient
	inv inventorypb.InventoryClient
}

func start(t *testing.T, opts server.Options) *env {
	t.Helper()
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	if opts.TempDir == "" {
		opts.TempDir = t.TempDir()
	}
	return serveOn(t, lc, lc, opts)
}

// serveOn serves backend (over the local cache lc) until the test ends.
func serveOn(t *testing.T, lc *localcache.Cache, backend cache.Backend, opts server.Options) *env {
	t.Helper()
	if opts.Inventory == nil && backend == cache.Backend(lc) {
		opts.Inventory = func(group string) gc.Store { return gc.LocalCache(lc, group) }
	}
	srv, err := server.New(backend, opts)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &env{lc: lc, srv: srv,
		cas: repb.NewContentAddressableStorageClient(conn), ac: repb.NewActionCacheClient(conn),
		bs: bspb.NewByteStreamClient(conn), cap: repb.NewCapabilitiesClient(conn), inv: inventorypb.NewInventoryClient(conn)}
}

func sha(b []byte) *repb.Digest { return digest.Compute(digest.SHA256, b) }

func (e *env) present(t *testing.T, fn digest.Function, d *repb.Digest) bool {
	t.Helper()
	m, err := e.lc.FindMissing(context.Background(), cache.Namespace{Function: fn}, []*repb.Digest{d})
	if err != nil {
		t.Fatal(err)
	}
	return len(m) == 0
}

func data(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

func uploadName(d *repb.Digest, uuid string) string {
	return fmt.Sprintf("uploads/%s/blobs/%s/%d", uuid, d.Hash, d.SizeBytes)
}

// write sends reqs on one Write stream and returns the call's result.
func (e *env) write(ctx context.Context, reqs ...*bspb.WriteRequest) (*bspb.WriteResponse, error) {
	stream, err := e.bs.Write(ctx)
	if err != nil {
		return nil, err
	}
	for _, r := range reqs {
		if err := stream.Send(r); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, err
		}
	}
	return stream.CloseAndRecv()
}

func TestCapabilities(t *testing.T) {
	e := start(t, server.Options{MaxBatchBytes: 1 << 20})
	caps, err := e.cap.GetCapabilities(context.Background(), &repb.GetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	cc := caps.CacheCapabilities
	if len(cc.DigestFunctions) != 2 || cc.MaxBatchTotalSizeBytes != 1<<20 || !cc.ActionCacheUpdateCapabilities.UpdateEnabled ||
		len(cc.SupportedCompressors) != 1 || cc.SupportedCompressors[0] != repb.Compressor_ZSTD {
		t.Fatalf("capabilities %v", cc)
	}
}

func TestByteStreamRoundTrip(t *testing.T) {
	e := start(t, server.Options{})
	ctx := context.Background()
	b := data(3<<20 + 5)
	d := sha(b)
	resp, err := e.write(ctx,
		&bspb.WriteRequest{ResourceName: uploadName(d, "u1"), Data: b[:1<<20]},
		&bspb.WriteRequest{WriteOffset: 1 << 20, Data: b[1<<20:], FinishWrite: true})
	if err != nil || resp.CommittedSize != d.SizeBytes {
		t.Fatalf("write: %v %v", resp, err)
	}
	// A second upload of stored data ends at once with the full size.
	resp, err = e.write(ctx, &bspb.WriteRequest{ResourceName: uploadName(d, "u2"), Data: b[:10]})
	if err != nil || resp.CommittedSize != d.SizeBytes {
		t.Fatalf("repeated write: %v %v", resp, err)
	}
	for _, tc := range []struct {
		off, limit int64
		compressed bool
		code       codes.Code
	}{
		{0, 0, false, codes.OK},
		{12345, 0, false, codes.OK},
		{100, 1000, false, codes.OK},
		{d.SizeBytes, 0, false, codes.OK},
		{0, 0, true, codes.OK},
		{2 << 20, 0, true, codes.OK},
		{d.SizeBytes + 1, 0, false, codes.OutOfRange},
		{-1, 0, false, codes.OutOfRange},
		{0, 10, true, codes.InvalidArgument},
	} {
		name := fmt.Sprintf("blobs/%s/%d", d.Hash, d.SizeBytes)
		if tc.compressed {
			name = "compressed-blobs/zstd/" + name[len("blobs/"):]
		}
		stream, err := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: name, ReadOffset: tc.off, ReadLimit: tc.limit})
		if err != nil {
			t.Fatal(err)
		}
		var got []byte
		for {
			m, err := stream.Recv()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					got = nil
					if status.Code(err) != tc.code {
						t.Fatalf("%+v: %v", tc, err)
					}
				}
				break
			}
			got = append(got, m.Data...)
		}
		if tc.code != codes.OK {
			continue
		}
		if tc.compressed {
			dec, _ := zstd.NewReader(nil)
			got, err = dec.DecodeAll(got, nil)
			if err != nil {
				t.Fatal(err)
			}
		}
		want := b[tc.off:]
		if tc.limit > 0 {
			want = want[:tc.limit]
		}
		if string(got) != string(want) {
			t.Fatalf("%+v: got %d bytes, want %d", tc, len(got), len(want))
		}
	}
}

func TestHostileWrites(t *testing.T) {
	e := start(t, server.Options{})
	b := data(2<<20 + 1)
	d := sha(b)
	enc, _ := zstd.NewWriter(nil)
	big := data(8 << 20)
	bomb := enc.EncodeAll(big, nil) // decompresses to 8 MiB
	huge := &repb.Digest{Hash: d.Hash, SizeBytes: 2 << 30}
	for _, tc := range []struct {
		name   string
		stored *repb.Digest
		reqs   []*bspb.WriteRequest
		code   codes.Code
	}{
		{"wrong hash", d, []*bspb.WriteRequest{{ResourceName: uploadName(d, "a"), Data: append(data(2<<20), 1), FinishWrite: true}}, codes.InvalidArgument},
		{"size says more", d, []*bspb.WriteRequest{{ResourceName: uploadName(&repb.Digest{Hash: d.Hash, SizeBytes: d.SizeBytes + 1}, "b"), Data: b, FinishWrite: true}}, codes.InvalidArgument},
		{"size says less", d, []*bspb.WriteRequest{{ResourceName: uploadName(&repb.Digest{Hash: d.Hash, SizeBytes: d.SizeBytes - 1}, "c"), Data: b, FinishWrite: true}}, codes.InvalidArgument},
		{"2 GiB claimed, 10 bytes sent", huge, []*bspb.WriteRequest{{ResourceName: uploadName(huge, "d"), Data: b[:10], FinishWrite: true}}, codes.InvalidArgument},
		{"no finish_write", d, []*bspb.WriteRequest{{ResourceName: uploadName(d, "e"), Data: b}}, codes.InvalidArgument},
		{"half then close", d, []*bspb.WriteRequest{{ResourceName: uploadName(d, "f"), Data: b[:1<<20]}}, codes.InvalidArgument},
		{"offset gap", d, []*bspb.WriteRequest{{ResourceName: uploadName(d, "g"), Data: b[:10]}, {WriteOffset: 20, Data: b[20:], FinishWrite: true}}, codes.InvalidArgument},
		{"first offset beyond committed", d, []*bspb.WriteRequest{{ResourceName: uploadName(d, "h"), WriteOffset: 5, Data: b[5:], FinishWrite: true}}, codes.InvalidArgument},
		{"traversal", d, []*bspb.WriteRequest{{ResourceName: "../" + uploadName(d, "i"), Data: b, FinishWrite: true}}, codes.InvalidArgument},
		{"traversal in uuid", d, []*bspb.WriteRequest{{ResourceName: fmt.Sprintf("uploads/../blobs/%s/%d", d.Hash, d.SizeBytes), Data: b, FinishWrite: true}}, codes.InvalidArgument},
		{"malformed", d, []*bspb.WriteRequest{{ResourceName: "uploads/x/blobs/zz/1", Data: b, FinishWrite: true}}, codes.InvalidArgument},
		{"unsupported function", d, []*bspb.WriteRequest{{ResourceName: fmt.Sprintf("uploads/j/blobs/md5/%s/%d", d.Hash, d.SizeBytes), Data: b, FinishWrite: true}}, codes.InvalidArgument},
		{"resource renamed mid-stream", d, []*bspb.WriteRequest{{ResourceName: uploadName(d, "k"), Data: b[:10]}, {ResourceName: uploadName(d, "l"), WriteOffset: 10, Data: b[10:], FinishWrite: true}}, codes.InvalidArgument},
		{"garbage zstd", d, []*bspb.WriteRequest{{ResourceName: fmt.Sprintf("uploads/m/compressed-blobs/zstd/%s/%d", d.Hash, d.SizeBytes), Data: b[:4096], FinishWrite: true}}, codes.InvalidArgument},
		{"zstd bomb", d, []*bspb.WriteRequest{{ResourceName: fmt.Sprintf("uploads/n/compressed-blobs/zstd/%s/%d", d.Hash, d.SizeBytes), Data: bomb, FinishWrite: true}}, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var before runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := e.write(context.Background(), tc.reqs...)
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			if status.Code(err) != tc.code {
				t.Fatalf("got %v, want %v", err, tc.code)
			}
			if e.present(t, digest.SHA256, tc.stored) {
				t.Fatal("the blob was stored")
			}
			if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 256<<20 {
				t.Fatalf("the request made the server allocate %d MiB", alloc>>20)
			}
		})
	}
	// The half-way upload can still be completed (resumed); the data is
	// stored only then.
	ctx := context.Background()
	q, err := e.bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: uploadName(d, "f")})
	if err != nil || q.CommittedSize != 1<<20 || q.Complete {
		t.Fatalf("QueryWriteStatus of the half-way upload: %v %v", q, err)
	}
	resp, err := e.write(ctx, &bspb.WriteRequest{ResourceName: uploadName(d, "f"), WriteOffset: 1 << 20, Data: b[1<<20:], FinishWrite: true})
	if err != nil || resp.CommittedSize != d.SizeBytes || !e.present(t, digest.SHA256, d) {
		t.Fatalf("resuming: %v %v", resp, err)
	}
	q, err = e.bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: uploadName(d, "f")})
	if err != nil || !q.Complete {
		t.Fatalf("QueryWriteStatus after completion: %v %v", q, err)
	}
	if _, err := e.bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: uploadName(sha([]byte("x")), "zz")}); status.Code(err) != codes.NotFound {
		t.Fatalf("QueryWriteStatus of an unknown upload: %v", err)
	}
}

func TestCancelledWriteStoresNothing(t *testing.T) {
	e := start(t, server.Options{})
	b := data(3 << 20)
	d := sha(b)
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := e.bs.Write(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&bspb.WriteRequest{ResourceName: uploadName(d, "c"), Data: b[:2<<20]}); err != nil {
		t.Fatal(err)
	}
	// Wait until the server has the bytes, then cancel.
	for {
		q, err := e.bs.QueryWriteStatus(context.Background(), &bspb.QueryWriteStatusRequest{ResourceName: uploadName(d, "c")})
		if err == nil && q.CommittedSize == 2<<20 {
			break
		}
		runtime.Gosched()
	}
	cancel()
	if _, err := stream.CloseAndRecv(); status.Code(err) != codes.Canceled {
		t.Fatalf("cancelled write: %v", err)
	}
	if e.present(t, digest.SHA256, d) {
		t.Fatal("a cancelled upload was stored")
	}
}

func TestHostileBatches(t *testing.T) {
	e := start(t, server.Options{MaxBatchBytes: 1 << 20})
	ctx := context.Background()
	good, bad := []byte("good"), []byte("bad!")
	lying := &repb.Digest{Hash: sha(bad).Hash, SizeBytes: 5}
	resp, err := e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{Requests: []*repb.BatchUpdateBlobsRequest_Request{
		{Digest: sha(good), Data: good},
		{Digest: lying, Data: bad},
		{Digest: sha(good), Data: bad},
		{Digest: sha(bad), Data: bad, Compressor: repb.Compressor_ZSTD},
	}})
	if err != nil {
		t.Fatal(err)
	}
	want := []codes.Code{codes.OK, codes.InvalidArgument, codes.InvalidArgument, codes.InvalidArgument}
	for i, r := range resp.Responses {
		if codes.Code(r.Status.Code) != want[i] {
			t.Errorf("entry %d: %v, want %v", i, r.Status, want[i])
		}
	}
	if !e.present(t, digest.SHA256, sha(good)) || e.present(t, digest.SHA256, sha(bad)) || e.present(t, digest.SHA256, lying) {
		t.Fatal("stored the wrong blobs")
	}
	for name, req := range map[string]*repb.BatchUpdateBlobsRequest{
		"too big":              {Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: sha(data(1<<20 + 1)), Data: data(1<<20 + 1)}}},
		"unsupported function": {Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: sha(good), Data: good}}, DigestFunction: repb.DigestFunction_MD5},
		"bad instance":         {InstanceName: "a/../b", Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: sha(good), Data: good}}},
	} {
		if _, err := e.cas.BatchUpdateBlobs(ctx, req); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v", name, err)
		}
	}
	// Reads: a 2 GiB claim is refused before anything is read or allocated.
	for name, req := range map[string]*repb.BatchReadBlobsRequest{
		"2 GiB":         {Digests: []*repb.Digest{{Hash: sha(good).Hash, SizeBytes: 2 << 30}}},
		"sum too big":   {Digests: []*repb.Digest{sha(data(600 << 10)), sha(data(600<<10 + 1))}},
		"malformed":     {Digests: []*repb.Digest{{Hash: "../../etc/passwd", SizeBytes: 1}}},
		"negative size": {Digests: []*repb.Digest{{Hash: sha(good).Hash, SizeBytes: -1}}},
	} {
		if _, err := e.cas.BatchReadBlobs(ctx, req); status.Code(err) != codes.InvalidArgument {
			t.Errorf("batch read %s: %v", name, err)
		}
	}
	rr, err := e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{sha(good), sha(bad)}})
	if err != nil || string(rr.Responses[0].Data) != "good" || codes.Code(rr.Responses[1].Status.Code) != codes.NotFound {
		t.Fatalf("batch read: %v %v", rr, err)
	}
	if _, err := e.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{{Hash: "zz", SizeBytes: 1}}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("FindMissing of a malformed digest: %v", err)
	}
	// Reading a blob by a lying size is NotFound, not a partial read.
	stream, _ := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: fmt.Sprintf("blobs/%s/%d", sha(good).Hash, 2<<30)})
	if _, err := stream.Recv(); status.Code(err) != codes.NotFound {
		t.Errorf("read with a lying size: %v", err)
	}
	for _, name := range []string{"../blobs/x/1", "blobs/" + sha(good).Hash + "/4/../../x", "blobs/md5/" + sha(good).Hash + "/4"} {
		stream, _ := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: name})
		if _, err := stream.Recv(); status.Code(err) != codes.InvalidArgument {
			t.Errorf("read %q: %v", name, err)
		}
	}
}

func TestOnlySHA256Server(t *testing.T) {
	e := start(t, server.Options{DigestFunctions: []digest.Function{digest.SHA256}})
	b := []byte("blob")
	d := digest.Compute(digest.BLAKE3, b)
	resp, err := e.cas.BatchUpdateBlobs(context.Background(), &repb.BatchUpdateBlobsRequest{
		Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: d, Data: b}}, DigestFunction: digest.BLAKE3})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("BLAKE3 on a SHA-256 server: %v %v", resp, err)
	}
}

func withKey(key string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "x-api-key", key)
}

func TestAuthAndIsolation(t *testing.T) {
	e := start(t, server.Options{APIKeys: map[string]server.APIKey{
		"ka": {Group: "a"}, "kb": {Group: "b"}, "kro": {Group: "a", ReadOnly: true},
	}})
	key := sha([]byte("action"))
	ar := &repb.ActionResult{ExitCode: 3}
	for name, ctx := range map[string]context.Context{"none": context.Background(), "unknown": withKey("x")} {
		if _, err := e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: key}); status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s key, get: %v", name, err)
		}
		if _, err := e.cap.GetCapabilities(ctx, &repb.GetCapabilitiesRequest{}); status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s key, capabilities: %v", name, err)
		}
		stream, _ := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: fmt.Sprintf("blobs/%s/%d", key.Hash, key.SizeBytes)})
		if _, err := stream.Recv(); status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s key, read: %v", name, err)
		}
	}
	if _, err := e.ac.UpdateActionResult(withKey("ka"), &repb.UpdateActionResultRequest{InstanceName: "i", ActionDigest: key, ActionResult: ar}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.ac.UpdateActionResult(withKey("kro"), &repb.UpdateActionResultRequest{InstanceName: "i", ActionDigest: key, ActionResult: ar}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("read-only update: %v", err)
	}
	b := data(100)
	if _, err := e.write(withKey("kro"), &bspb.WriteRequest{ResourceName: uploadName(sha(b), "u"), Data: b, FinishWrite: true}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("read-only ByteStream write: %v", err)
	}
	if _, err := e.cas.BatchUpdateBlobs(withKey("kro"), &repb.BatchUpdateBlobsRequest{Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: sha(b), Data: b}}}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("read-only batch update: %v", err)
	}
	bearer := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer kro")
	if got, err := e.ac.GetActionResult(bearer, &repb.GetActionResultRequest{InstanceName: "i", ActionDigest: key}); err != nil || !proto.Equal(got, ar) {
		t.Errorf("group a via bearer token: %v %v", got, err)
	}
	if _, err := e.ac.GetActionResult(withKey("kb"), &repb.GetActionResultRequest{InstanceName: "i", ActionDigest: key}); status.Code(err) != codes.NotFound {
		t.Errorf("group b saw group a's entry: %v", err)
	}
	// A blob uploaded by group a's half-way upload cannot be finished by b.
	big := data(3 << 20)
	e.write(withKey("ka"), &bspb.WriteRequest{ResourceName: uploadName(sha(big), "shared"), Data: big[:1<<20]})
	if _, err := e.bs.QueryWriteStatus(withKey("kb"), &bspb.QueryWriteStatusRequest{ResourceName: uploadName(sha(big), "shared")}); status.Code(err) != codes.NotFound {
		t.Errorf("group b saw group a's partial upload: %v", err)
	}
}

func TestMetricsHandler(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := start(t, server.Options{Registry: reg})
	ctx := context.Background()
	key := sha([]byte("k"))
	e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: key})
	e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{ActionDigest: key, ActionResult: &repb.ActionResult{}})
	e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{ActionDigest: key})
	b := data(1 << 20)
	e.write(ctx, &bspb.WriteRequest{ResourceName: uploadName(sha(b), "m"), Data: b, FinishWrite: true})
	if _, err := e.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{BlobDigests: []*repb.Digest{sha(b), sha([]byte("absent"))}}); err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	e.srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	body := rec.Body.String()
	for _, want := range []string{
		`snaploader_server_requests_total{code="NotFound",method="GetActionResult"} 1`,
		`snaploader_server_requests_total{code="OK",method="GetActionResult"} 1`,
		`snaploader_server_requests_total{code="OK",method="Write"} 1`,
		`snaploader_server_action_cache_lookups_total{result="hit"} 1`,
		`snaploader_server_action_cache_lookups_total{result="miss"} 1`,
		`snaploader_server_blob_bytes_total{direction="in"} 1.048576e+06`,
		`snaploader_server_request_duration_seconds_count{method="Write"} 1`,
		`snaploader_server_cas_lookups_total{result="hit"} 1`,
		`snaploader_server_cas_lookups_total{result="miss"} 1`,
		`snaploader_server_evictions_total 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// Registering a second server on the same registry is an error.
	if _, err := server.New(e.lc, server.Options{Registry: reg}); err == nil {
		t.Error("duplicate metrics registration succeeded")
	}
}
