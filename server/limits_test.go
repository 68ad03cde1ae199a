package server_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/server"
)

// startBounded serves a local cache bounded to maxBytes whose scratch
// directory holds the uploads, as `snaploader serve --cache-dir` does.
func startBounded(t *testing.T, maxBytes int64, opts server.Options) *env {
	t.Helper()
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: maxBytes})
	if err != nil {
		t.Fatal(err)
	}
	if opts.TempDir == "" {
		opts.TempDir = lc.TempDir()
	}
	return serveOn(t, lc, lc, opts)
}

// scratchFiles lists the upload files in dir.
func scratchFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// inMessages splits an upload of b into messages of 1 MiB.
func inMessages(name string, b []byte) []*bspb.WriteRequest {
	var reqs []*bspb.WriteRequest
	for off := 0; off < len(b) || off == 0; off += 1 << 20 {
		end := min(len(b), off+1<<20)
		reqs = append(reqs, &bspb.WriteRequest{WriteOffset: int64(off), Data: b[off:end], FinishWrite: end == len(b)})
	}
	reqs[0].ResourceName = name
	return reqs
}

// openUpload starts an upload of d and sends its first n bytes (of b).
func (e *env) openUpload(t *testing.T, ctx context.Context, d *repb.Digest, uuid string, b []byte) bspb.ByteStream_WriteClient {
	t.Helper()
	stream, err := e.bs.Write(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&bspb.WriteRequest{ResourceName: uploadName(d, uuid), Data: b}); err != nil {
		t.Fatal(err)
	}
	return stream
}

func TestWriteClaimsBeyondServerBounds(t *testing.T) {
	const maxBytes = 64 << 20 // so at most 16 MiB per blob
	e := startBounded(t, maxBytes, server.Options{UploadTTL: 300 * time.Millisecond})
	scratch := e.lc.TempDir()
	for _, tc := range []struct {
		name  string
		claim int64
	}{
		{"1 TiB", 1 << 40},
		{"just over a quarter of the bound", maxBytes/4 + 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &repb.Digest{Hash: sha([]byte(tc.name)).Hash, SizeBytes: tc.claim}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			stream := e.openUpload(t, ctx, d, "big", data(1<<20))
			_, err := stream.CloseAndRecv()
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), d.Hash) || !strings.Contains(err.Error(), fmt.Sprint(maxBytes/4)) {
				t.Fatalf("claim of %d bytes: %v, want InvalidArgument naming the digest and the limit", tc.claim, err)
			}
			if strings.Contains(err.Error(), scratch) || strings.Contains(err.Error(), "/tmp") {
				t.Errorf("error names a server path: %v", err)
			}
			if got := e.lc.Reserved(); got != 0 {
				t.Errorf("%d bytes reserved after a refused claim", got)
			}
			if f := scratchFiles(t, scratch); len(f) != 0 {
				t.Errorf("scratch files after a refused claim: %v", f)
			}
		})
	}

	// Four stalled uploads of 16 MiB reserve the whole bound: a fifth is
	// refused, however little it has sent.
	ctx, cancel := context.WithCancel(context.Background())
	var streams []bspb.ByteStream_WriteClient
	for i := range 4 {
		b := data(16 << 20)
		b[0] = byte(i)
		streams = append(streams, e.openUpload(t, ctx, sha(b), fmt.Sprint("stall-", i), b[:1<<20]))
	}
	waitFor(t, "four reservations", func() bool { return e.lc.Reserved() == maxBytes })
	b := data(1 << 20)
	_, err := e.write(context.Background(), &bspb.WriteRequest{ResourceName: uploadName(sha(b), "fifth"), Data: b, FinishWrite: true})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("fifth upload with the bound reserved: %v, want ResourceExhausted", err)
	}
	if usage, res := e.lc.Usage(), e.lc.Reserved(); usage+res > maxBytes {
		t.Errorf("entries %d + reservations %d over the bound %d", usage, res, maxBytes)
	}
	// The clients go away: their partial uploads are kept for resumption,
	// then expire, and everything they held is freed.
	cancel()
	for _, s := range streams {
		s.CloseAndRecv()
	}
	waitFor(t, "interrupted uploads to expire", func() bool { return e.lc.Reserved() == 0 && len(scratchFiles(t, scratch)) == 0 })
	if _, err := e.write(context.Background(), &bspb.WriteRequest{ResourceName: uploadName(sha(b), "again"), Data: b, FinishWrite: true}); err != nil {
		t.Fatalf("upload after the others expired: %v", err)
	}
}

func TestReservationsEvictStoredBlobs(t *testing.T) {
	const maxBytes = 32 << 20
	e := startBounded(t, maxBytes, server.Options{})
	ctx := context.Background()
	// Fill the cache with 7 MiB blobs, then hold an 8 MiB upload open: the
	// stored blobs make room for it, least recently used first.
	var stored []*repb.Digest
	for i := range 4 {
		b := data(7 << 20)
		b[1] = byte(i)
		d := sha(b)
		if _, err := e.write(ctx, inMessages(uploadName(d, fmt.Sprint("s", i)), b)...); err != nil {
			t.Fatal(err)
		}
		stored = append(stored, d)
	}
	b := data(8 << 20)
	b[2] = 9
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream := e.openUpload(t, sctx, sha(b), "held", b[:1<<20])
	waitFor(t, "the reservation", func() bool { return e.lc.Reserved() == 8<<20 })
	if usage, res := e.lc.Usage(), e.lc.Reserved(); usage+res > maxBytes {
		t.Fatalf("entries %d + reservations %d over the bound %d", usage, res, maxBytes)
	}
	if e.present(t, digest.SHA256, stored[0]) || !e.present(t, digest.SHA256, stored[3]) {
		t.Error("the reservation did not evict the least recently used blob")
	}
	for _, r := range inMessages("", b[1<<20:]) {
		r.WriteOffset += 1 << 20
		if err := stream.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	if e.lc.Reserved() != 0 || !e.present(t, digest.SHA256, sha(b)) {
		t.Fatalf("after the upload: %d reserved, stored %v", e.lc.Reserved(), e.present(t, digest.SHA256, sha(b)))
	}
	if f := scratchFiles(t, e.lc.TempDir()); len(f) != 0 {
		t.Errorf("scratch files after a completed upload: %v", f)
	}
}

func TestUploadMemoryBudgetAndIdleStreams(t *testing.T) {
	// Room for two uncompressed upload streams (4 MiB window + 2 MiB of
	// messages each).
	const perStream = 6 << 20
	e := startBounded(t, 1<<30, server.Options{MaxUploadMemory: 2 * perStream, IdleTimeout: 700 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var streams []bspb.ByteStream_WriteClient
	for i := range 2 {
		b := data(4 << 20)
		b[0] = byte(i)
		streams = append(streams, e.openUpload(t, ctx, sha(b), fmt.Sprint("m", i), b[:1<<20]))
	}
	waitFor(t, "two uploads in flight", func() bool { return len(scratchFiles(t, e.lc.TempDir())) == 2 })
	// Both trickle a byte at a time, never idle, while a third tries.
	stop := make(chan struct{})
	trickled := make(chan struct{})
	go func() {
		defer close(trickled)
		for off := int64(1 << 20); ; off++ {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			for _, s := range streams {
				s.Send(&bspb.WriteRequest{WriteOffset: off, Data: []byte{byte(off*7 + off/251)}})
			}
		}
	}()
	b := data(2 << 20)
	_, err := e.write(context.Background(), inMessages(uploadName(sha(b), "third"), b)...)
	close(stop)
	<-trickled
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "memory") {
		t.Fatalf("third upload with the memory budget in use: %v, want ResourceExhausted", err)
	}
	// Now stalled, the streams are aborted at the idle timeout and their
	// partial uploads deleted: the budget is free again.
	start := time.Now()
	for i, s := range streams {
		if err := s.RecvMsg(new(bspb.WriteResponse)); status.Code(err) != codes.DeadlineExceeded {
			t.Errorf("stalled stream %d: %v, want DeadlineExceeded", i, err)
		}
	}
	if waited := time.Since(start); waited > 5*time.Second {
		t.Errorf("stalled streams were aborted after %v", waited)
	}
	waitFor(t, "the stalled uploads' files to go", func() bool { return len(scratchFiles(t, e.lc.TempDir())) == 0 })
	if _, err := e.write(context.Background(), inMessages(uploadName(sha(b), "fourth"), b)...); err != nil {
		t.Fatalf("upload after the stalled ones were aborted: %v", err)
	}
}

func TestWriteErrorsNameNoServerPaths(t *testing.T) {
	b := data(2 << 20)
	d := sha(b)
	e := startBounded(t, 1<<30, server.Options{})
	scratch := e.lc.TempDir()
	missing := filepath.Join(t.TempDir(), "gone")
	broken := startBounded(t, 1<<30, server.Options{TempDir: missing})
	ctx := context.Background()
	// A half-way upload, so that an offset below what is committed means
	// truncating its file.
	e.write(ctx, &bspb.WriteRequest{ResourceName: uploadName(d, "half"), Data: b[:1<<20]})
	for _, tc := range []struct {
		name string
		e    *env
		req  *bspb.WriteRequest
		code codes.Code
	}{
		{"negative write_offset, fresh upload", e, &bspb.WriteRequest{ResourceName: uploadName(d, "neg"), WriteOffset: -1, Data: b[:10]}, codes.InvalidArgument},
		{"negative write_offset, resumed upload", e, &bspb.WriteRequest{ResourceName: uploadName(d, "half"), WriteOffset: -5, Data: b[:10]}, codes.InvalidArgument},
		{"write_offset beyond the size", e, &bspb.WriteRequest{ResourceName: uploadName(d, "beyond"), WriteOffset: d.SizeBytes + 1, Data: b[:10]}, codes.InvalidArgument},
		{"scratch directory gone", broken, &bspb.WriteRequest{ResourceName: uploadName(d, "x"), Data: b, FinishWrite: true}, codes.Unavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.e.write(ctx, tc.req)
			if status.Code(err) != tc.code || !strings.Contains(err.Error(), d.Hash) {
				t.Fatalf("%v, want %v naming the digest", err, tc.code)
			}
			for _, p := range []string{scratch, missing, "/tmp", os.TempDir()} {
				if strings.Contains(status.Convert(err).Message(), p) {
					t.Errorf("error names server path %s: %v", p, err)
				}
			}
		})
	}
	// The resumable upload survived the rejected requests.
	q, err := e.bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: uploadName(d, "half")})
	if err != nil || q.CommittedSize != 1<<20 {
		t.Fatalf("QueryWriteStatus of the half-way upload: %v %v", q, err)
	}
}

// zstdCLI compresses b with the reference encoder reading a pipe, so the
// frames carry no content size (and windows sized for a stream).
func zstdCLI(t *testing.T, b []byte, args ...string) []byte {
	t.Helper()
	bin := testutil.LookPath(t, "zstd")
	cmd := exec.Command(bin, append([]string{"-c", "-q"}, args...)...)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		for p := b; len(p) > 0; p = p[min(len(p), 4096):] {
			if _, err := in.Write(p[:min(len(p), 4096)]); err != nil {
				break
			}
		}
		in.Close()
	}()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("zstd %v: %v\n%s", args, err, stderr.String())
	}
	return out.Bytes()
}

// compressible is n bytes of text-like data.
func compressible(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	words := []string{"snapshot ", "chunk ", "memory ", "disk ", "zstd ", "blake3 ", "\n", "restore "}
	var buf bytes.Buffer
	for buf.Len() < n {
		buf.WriteString(words[rng.IntN(len(words))])
		if rng.IntN(8) == 0 {
			fmt.Fprintf(&buf, "%d ", rng.Uint64())
		}
	}
	return buf.Bytes()[:n]
}

func TestZstdUploadsFromTheReferenceEncoder(t *testing.T) {
	e := startBounded(t, 1<<30, server.Options{})
	ctx := context.Background()
	for _, tc := range []struct {
		size int
		args []string
	}{
		{100, nil},
		{900, nil},
		{200_000, nil},
		{3<<20 + 17, nil},
		{900, []string{"-19"}},
		{3<<20 + 17, []string{"-19"}},
		{200_000, []string{"--fast=3"}},
	} {
		t.Run(fmt.Sprintf("%d bytes %v", tc.size, tc.args), func(t *testing.T) {
			b := compressible(tc.size, uint64(tc.size)+uint64(len(tc.args)))
			d := digest.Compute(digest.BLAKE3, b)
			z := zstdCLI(t, b, tc.args...)
			name := fmt.Sprintf("uploads/z%d/compressed-blobs/zstd/blake3/%s/%d", len(tc.args), d.Hash, d.SizeBytes)
			var reqs []*bspb.WriteRequest
			for off := 0; off < len(z) || off == 0; off += 64 << 10 {
				end := min(len(z), off+64<<10)
				r := &bspb.WriteRequest{WriteOffset: int64(off), Data: z[off:end], FinishWrite: end == len(z)}
				if off == 0 {
					r.ResourceName = name
				}
				reqs = append(reqs, r)
			}
			resp, err := e.write(ctx, reqs...)
			if err != nil {
				t.Fatalf("uploading %d compressed bytes: %v", len(z), err)
			}
			if resp.CommittedSize != int64(len(z)) && resp.CommittedSize != -1 {
				t.Errorf("committed %d of %d compressed bytes", resp.CommittedSize, len(z))
			}
			for _, compressed := range []bool{false, true} {
				rname := fmt.Sprintf("blobs/blake3/%s/%d", d.Hash, d.SizeBytes)
				if compressed {
					rname = fmt.Sprintf("compressed-blobs/zstd/blake3/%s/%d", d.Hash, d.SizeBytes)
				}
				got := readStream(t, e, rname)
				if compressed {
					dec, _ := zstd.NewReader(nil)
					if got, err = dec.DecodeAll(got, nil); err != nil {
						t.Fatal(err)
					}
				}
				if !bytes.Equal(got, b) {
					t.Fatalf("read back (compressed %v): %d bytes differ from the %d uploaded", compressed, len(got), len(b))
				}
			}
		})
	}
	// A frame that decodes to more than the claimed size is still refused.
	big := compressible(4<<20, 7)
	z := zstdCLI(t, big)
	d := digest.Compute(digest.BLAKE3, big[:1<<20])
	_, err := e.write(ctx, &bspb.WriteRequest{ResourceName: fmt.Sprintf("uploads/bomb/compressed-blobs/zstd/blake3/%s/%d", d.Hash, d.SizeBytes), Data: z, FinishWrite: true})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("frame decoding beyond the claimed size: %v, want InvalidArgument", err)
	}
	if e.present(t, digest.BLAKE3, d) {
		t.Error("the over-long upload was stored")
	}
}

func readStream(t *testing.T, e *env, name string) []byte {
	t.Helper()
	stream, err := e.bs.Read(context.Background(), &bspb.ReadRequest{ResourceName: name})
	if err != nil {
		t.Fatal(err)
	}
	var got []byte
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			return got
		}
		if err != nil {
			t.Fatalf("reading %s: %v", name, err)
		}
		got = append(got, m.Data...)
	}
}

func TestReadsVerifyWhatIsServed(t *testing.T) {
	e := startBounded(t, 1<<30, server.Options{})
	ctx := context.Background()
	for _, n := range []int{5000, 3 << 20} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			b := compressible(n, uint64(n))
			d := sha(b)
			if _, err := e.write(ctx, &bspb.WriteRequest{ResourceName: uploadName(d, "v"), Data: b, FinishWrite: true}); err != nil {
				t.Fatal(err)
			}
			path := e.lc.Path(cache.Namespace{Function: digest.SHA256}, d)
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt([]byte{b[n/2] ^ 1}, int64(n/2))
			f.Close()
			for _, name := range []string{fmt.Sprintf("blobs/%s/%d", d.Hash, d.SizeBytes), fmt.Sprintf("compressed-blobs/zstd/%s/%d", d.Hash, d.SizeBytes)} {
				stream, _ := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: name})
				var got int
				for {
					m, err := stream.Recv()
					if err != nil {
						if status.Code(err) != codes.DataLoss && status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), d.Hash) {
							t.Fatalf("reading a corrupt blob: %v, want Internal (or NotFound once dropped) naming it", err)
						}
						break
					}
					got += len(m.Data)
				}
				if !strings.HasPrefix(name, "compressed") && got >= n {
					t.Errorf("the whole corrupt blob was served (%d bytes)", got)
				}
			}
			if e.present(t, digest.SHA256, d) {
				t.Fatal("the corrupt blob is still reported present")
			}
			if _, err := e.write(ctx, &bspb.WriteRequest{ResourceName: uploadName(d, "again"), Data: b, FinishWrite: true}); err != nil {
				t.Fatal(err)
			}
			if got := readStream(t, e, fmt.Sprintf("blobs/%s/%d", d.Hash, d.SizeBytes)); !bytes.Equal(got, b) {
				t.Fatal("re-uploaded blob reads back differently")
			}
			rr, err := e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{d}})
			if err != nil || !bytes.Equal(rr.Responses[0].Data, b) {
				t.Fatalf("batch read after repair: %v", err)
			}
		})
	}
	// Batch reads verify too.
	b := compressible(700, 3)
	d := sha(b)
	e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: d, Data: b}}})
	path := e.lc.Path(cache.Namespace{Function: digest.SHA256}, d)
	bad := bytes.Clone(b)
	bad[0] ^= 1
	os.WriteFile(path, bad, 0o644)
	rr, err := e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{d}})
	if err != nil || codes.Code(rr.Responses[0].Status.Code) != codes.DataLoss || !strings.Contains(rr.Responses[0].Status.Message, d.Hash) || len(rr.Responses[0].Data) != 0 {
		t.Fatalf("batch read of a corrupt blob: %v %v", rr, err)
	}
	if e.present(t, digest.SHA256, d) {
		t.Fatal("the corrupt blob is still reported present")
	}
}

func TestCapabilitiesUpdateEnabled(t *testing.T) {
	open := startBounded(t, 1<<30, server.Options{})
	keyed := startBounded(t, 1<<30, server.Options{APIKeys: map[string]server.APIKey{"rw": {Group: "a"}, "ro": {Group: "a", ReadOnly: true}}})
	for _, tc := range []struct {
		name string
		e    *env
		key  string
		want bool
	}{
		{"no auth", open, "", true},
		{"read-write key", keyed, "rw", true},
		{"read-only key", keyed, "ro", false},
	} {
		ctx := context.Background()
		if tc.key != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "x-api-key", tc.key)
		}
		caps, err := tc.e.cap.GetCapabilities(ctx, &repb.GetCapabilitiesRequest{})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := caps.GetCacheCapabilities().GetActionCacheUpdateCapabilities().GetUpdateEnabled(); got != tc.want {
			t.Errorf("%s: update_enabled %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestReadMemoryBudget checks that reads in flight share one memory
// budget: with room for one read, a second read waits while the first is
// stalled by its client, is ResourceExhausted after the idle timeout, and
// a read after the first has ended goes through.
func TestReadMemoryBudget(t *testing.T) {
	e := startBounded(t, 1<<30, server.Options{MaxReadMemory: 3 << 20, IdleTimeout: 300 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b := data(16 << 20)
	d := sha(b)
	var reqs []*bspb.WriteRequest
	for off := 0; off < len(b); off += 1 << 20 {
		reqs = append(reqs, &bspb.WriteRequest{ResourceName: uploadName(d, "m"), WriteOffset: int64(off), Data: b[off : off+1<<20], FinishWrite: off+1<<20 == len(b)})
	}
	if _, err := e.write(ctx, reqs...); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("blobs/%s/%d", d.Hash, d.SizeBytes)
	first, err := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: name})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.Recv(); err != nil { // the first read holds the budget, stalled
		t.Fatal(err)
	}
	second, err := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: name})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := second.Recv(); status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "read memory budget") {
		t.Fatalf("a read beyond the budget: %v, want ResourceExhausted naming the read memory budget", err)
	}
	got := 0
	for {
		m, err := first.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got += len(m.Data)
	}
	if got < len(b)-(1<<20) {
		t.Fatalf("first read got %d bytes", got)
	}
	if got := readStream(t, e, name); !bytes.Equal(got, b) {
		t.Fatal("a read after the budget freed returned wrong bytes")
	}
}
