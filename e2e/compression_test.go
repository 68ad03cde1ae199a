package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
)

const chunkBytes = 4096000

// bsClient is a raw ByteStream client of a serve process, as a REAPI
// client streaming zstd frames uses it.
type bsClient struct {
	bs  bspb.ByteStreamClient
	enc *zstd.Encoder
	dec *zstd.Decoder
}

func newBSClient(t testing.TB, addr string) *bsClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	dec, _ := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(localcache.MaxWindow))
	t.Cleanup(dec.Close)
	return &bsClient{bs: bspb.NewByteStreamClient(conn), enc: enc, dec: dec}
}

func resource(d *repb.Digest, compressed bool) string {
	if compressed {
		return fmt.Sprintf("compressed-blobs/zstd/blake3/%s/%d", d.Hash, d.SizeBytes)
	}
	return fmt.Sprintf("blobs/blake3/%s/%d", d.Hash, d.SizeBytes)
}

// upload sends b over compressed-blobs/zstd in 1 MiB messages.
func (c *bsClient) upload(ctx context.Context, d *repb.Digest, b []byte) error {
	z := c.enc.EncodeAll(b, nil)
	stream, err := c.bs.Write(ctx)
	if err != nil {
		return err
	}
	for off := 0; off < len(z); off += 1 << 20 {
		end := min(len(z), off+1<<20)
		req := &bspb.WriteRequest{WriteOffset: int64(off), Data: z[off:end], FinishWrite: end == len(z)}
		if off == 0 {
			req.ResourceName = "uploads/e2e/" + resource(d, true)
		}
		if err := stream.Send(req); err != nil && err != io.EOF {
			return err
		}
	}
	_, err = stream.CloseAndRecv()
	return err
}

// read reads d whole, over compressed-blobs or not, and returns the content
// (decoded) and the bytes received.
func (c *bsClient) read(ctx context.Context, d *repb.Digest, compressed bool) ([]byte, int, error) {
	stream, err := c.bs.Read(ctx, &bspb.ReadRequest{ResourceName: resource(d, compressed)})
	if err != nil {
		return nil, 0, err
	}
	var got []byte
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, 0, err
		}
		got = append(got, m.Data...)
	}
	n := len(got)
	if compressed {
		if got, err = c.dec.DecodeAll(got, make([]byte, 0, d.SizeBytes)); err != nil {
			return nil, n, err
		}
	}
	if !digest.Equal(digest.Compute(digest.BLAKE3, got), d) {
		return nil, n, fmt.Errorf("blob %s: wrong content", digest.String(d))
	}
	return got, n, nil
}

// vmChunks splits a VM-like image into its chunks that are not all zero.
func vmChunks(img []byte) (ds []*repb.Digest, chunks [][]byte) {
	for off := 0; off < len(img); off += chunkBytes {
		b := img[off:min(off+chunkBytes, len(img))]
		if digest.IsZero(b) {
			continue
		}
		ds, chunks = append(ds, digest.Compute(digest.BLAKE3, b)), append(chunks, b)
	}
	return ds, chunks
}

// casUsage sums st_blocks*512 of the blob files under dir/cas.
func casUsage(t testing.TB, dir string) int64 {
	t.Helper()
	var total int64
	filepath.WalkDir(filepath.Join(dir, "cas"), func(p string, de fs.DirEntry, err error) error {
		var st unix.Stat_t
		if err == nil && !de.IsDir() && unix.Stat(p, &st) == nil {
			total += st.Blocks * 512
		}
		return nil
	})
	return total
}

// TestServeCompressionAtRest: a VM-like image uploaded over compressed-blobs
// takes less than 0.6x its non-zero bytes in `serve --cache-dir` (and about
// all of them with --compression=false); plain and compressed-blobs reads
// of every chunk give the verified content, also after a restart; a cache
// directory written with --compression=false reads back correctly when
// served with compression on; a flipped byte in a stored compressed chunk
// is never served and the chunk is dropped.
func TestServeCompressionAtRest(t *testing.T) {
	const size = 32 << 20
	img := testutil.VMImage(11, size)
	nonZero := testutil.VMImageNonZero(11, size)
	ds, chunks := vmChunks(img)
	ctx := ctxT(t)
	usage := map[bool]int64{}
	dirs := map[bool]string{}
	for _, on := range []bool{false, true} {
		dir := t.TempDir()
		srv := startServe(t, nil, "--cache-dir", dir, "--compression="+strconv.FormatBool(on))
		c := newBSClient(t, srv.addr)
		for i, d := range ds {
			if err := c.upload(ctx, d, chunks[i]); err != nil {
				t.Fatalf("compression %v: uploading chunk %d: %v", on, i, err)
			}
		}
		usage[on], dirs[on] = casUsage(t, dir), dir
		srv.stop()
	}
	t.Logf("stored %d bytes with compression, %d without, for %d non-zero bytes", usage[true], usage[false], nonZero)
	if usage[true]*10 >= nonZero*6 {
		t.Errorf("compression on: stored %d bytes for %d non-zero (%.2fx), want < 0.6x", usage[true], nonZero, float64(usage[true])/float64(nonZero))
	}
	if usage[false]*10 < nonZero*9 {
		t.Errorf("compression off: stored %d bytes for %d non-zero, want about all of them", usage[false], nonZero)
	}
	// Both directories served with compression on (the default): the one
	// written without compression needs no migration.
	for _, on := range []bool{false, true} {
		srv := startServe(t, nil, "--cache-dir", dirs[on])
		c := newBSClient(t, srv.addr)
		for i, d := range ds {
			for _, compressed := range []bool{false, true} {
				got, _, err := c.read(ctx, d, compressed)
				if err != nil || !bytes.Equal(got, chunks[i]) {
					t.Fatalf("directory written with compression %v: reading chunk %d (compressed-blobs %v): %v", on, i, compressed, err)
				}
			}
		}
		srv.stop()
	}

	// A flipped byte in a stored compressed chunk, found by a server that
	// verified it (it stored it) and by one that has not (restarted).
	for _, restart := range []bool{false, true} {
		dir := t.TempDir()
		srv := startServe(t, nil, "--cache-dir", dir)
		c := newBSClient(t, srv.addr)
		d, b := ds[0], chunks[0]
		if err := c.upload(ctx, d, b); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "cas", "blake3", d.Hash[:2], fmt.Sprintf("%s-%d", d.Hash, d.SizeBytes))
		st, err := os.Stat(path)
		if err != nil || st.Size() >= d.SizeBytes {
			t.Fatalf("chunk not stored compressed: %v %v", st, err)
		}
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		one := []byte{0}
		f.ReadAt(one, st.Size()/2)
		f.WriteAt([]byte{one[0] ^ 4}, st.Size()/2)
		f.Close()
		if restart {
			srv.stop()
			srv = startServe(t, nil, "--cache-dir", dir)
			c = newBSClient(t, srv.addr)
		}
		_, n, err := c.read(ctx, d, true)
		if err == nil || !strings.Contains(err.Error(), d.Hash) {
			t.Fatalf("restart %v: compressed read of the damaged chunk: %v, want an error naming it", restart, err)
		}
		if int64(n) >= st.Size()-48 {
			t.Errorf("restart %v: all %d stored bytes of the damaged chunk were served", restart, n)
		}
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Errorf("restart %v: the damaged chunk was not dropped (%v)", restart, err)
		}
		if err := c.upload(ctx, d, b); err != nil {
			t.Fatalf("re-uploading: %v", err)
		}
		if got, _, err := c.read(ctx, d, false); err != nil || !bytes.Equal(got, b) {
			t.Fatalf("reading the repaired chunk: %v", err)
		}
	}
}

// cpuSeconds is the user plus system CPU time of process pid.
func cpuSeconds(b testing.TB, pid int) float64 {
	b.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name (which may hold spaces) start at ')'.
	f := strings.Fields(string(raw[bytes.LastIndexByte(raw, ')')+2:]))
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / 100 // USER_HZ
}

// BenchmarkServeCompression measures, for `serve --cache-dir` with
// --compression=false (today's behaviour) and true: the disk a VM-like
// image (SNAPLOADER_BENCH_MIB MiB, default 1024; 30% zero, half the rest
// repetitive) takes once uploaded over compressed-blobs, and the CPU
// seconds per GiB the serve process spends answering a compressed-blobs
// read of every chunk (from /proc/PID/stat).
//
//	SNAPLOADER_BENCH_MIB=1024 go test -run '^$' -bench ServeCompression -benchtime 1x ./e2e/
func BenchmarkServeCompression(b *testing.B) {
	size := benchMiB(b) << 20
	img := testutil.VMImage(12, size)
	ds, chunks := vmChunks(img)
	var logical int64
	for _, c := range chunks {
		logical += int64(len(c))
	}
	for _, on := range []bool{false, true} {
		b.Run(fmt.Sprintf("compression=%v", on), func(b *testing.B) {
			ctx := context.Background()
			dir := b.TempDir()
			srv := startServe(b, nil, "--cache-dir", dir, "--max-bytes", strconv.Itoa(4*size), "--compression="+strconv.FormatBool(on))
			c := newBSClient(b, srv.addr)
			for i, d := range ds {
				if err := c.upload(ctx, d, chunks[i]); err != nil {
					b.Fatal(err)
				}
			}
			stored := casUsage(b, dir)
			pid := srv.cmd.Process.Pid
			var cpu, secs float64
			var sent int64
			for b.Loop() {
				t0, start := cpuSeconds(b, pid), time.Now()
				for _, d := range ds {
					_, n, err := c.read(ctx, d, true)
					if err != nil {
						b.Fatal(err)
					}
					sent += int64(n)
				}
				secs += time.Since(start).Seconds()
				cpu += cpuSeconds(b, pid) - t0
			}
			gib := float64(logical) * float64(b.N) / (1 << 30)
			b.ReportMetric(float64(stored)/(1<<20), "stored-MiB")
			b.ReportMetric(float64(stored)/float64(size), "stored/image")
			b.ReportMetric(cpu/gib, "serve-CPU-s/GiB")
			b.ReportMetric(float64(sent)/float64(b.N)/(1<<20), "sent-MiB")
			b.ReportMetric(gib/secs, "GiB/s")
		})
	}
}
