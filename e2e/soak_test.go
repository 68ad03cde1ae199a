package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/remote"
)

// Soak bounds. The server gets a 128 MiB disk bound (so 32 MiB per blob), a
// 96 MiB upload memory budget, a 2 s idle timeout and a 3 s upload TTL.
const (
	soakMaxBytes  = 128 << 20
	soakUploadMem = 96 << 20
	// Disk: stored blobs, uploads in flight and batch writes are all
	// counted against --max-bytes; what is not is the directories
	// (cas/<fn>/<hh>/: at most 2 x 256 of 4 KiB each) and the index files.
	soakDiskBound = soakMaxBytes + 4<<20
	// Memory: the upload budget, plus what is not charged to it: the Go
	// runtime, gRPC's connection buffers and the read streams' buffers
	// (about 2 MiB each, a few MiB with zstd) of the few readers, plus
	// garbage up to the soft memory limit serve sets (budget + 128 MiB).
	soakRSSBound = soakUploadMem + 128<<20
)

func TestSoakServe(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test")
	}
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", dir, "--max-bytes", fmt.Sprint(soakMaxBytes),
		"--max-upload-memory", fmt.Sprint(soakUploadMem), "--idle-timeout", "2s", "--upload-ttl", "3s")
	pid := srv.cmd.Process.Pid
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const load = 30 * time.Second
	loadCtx, stopLoad := context.WithTimeout(ctx, load)
	defer stopLoad()

	var (
		wg                    sync.WaitGroup
		mu                    sync.Mutex
		failures              []string
		completed, readBacks  atomic.Int64
		exhausted, refused    atomic.Int64
		stalled, disconnected atomic.Int64
		peakRSS, peakDisk     atomic.Int64
		probes                atomic.Int64
		maxProbe              atomic.Int64
		stored                []storedBlob
		bytesUp               atomic.Int64
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if len(failures) < 20 {
			failures = append(failures, fmt.Sprintf(format, args...))
		}
	}
	dialClient := func(compress bool) *remote.Client {
		c, err := remote.Dial(ctx, srv.url(), remote.Options{DisableCompression: !compress, CallTimeout: 30 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	rawConn := func() *grpc.ClientConn {
		conn, err := grpc.NewClient(srv.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		return conn
	}

	// Sampler: the server's RSS (and its high-water mark) and the cache
	// directory's disk usage, including scratch/ and tmp/.
	samplerDone := make(chan struct{})
	go func() {
		defer close(samplerDone)
		for {
			if rss, _ := procStatus(pid, "VmRSS"); rss > peakRSS.Load() {
				peakRSS.Store(rss)
			}
			if du := diskUsageOf(dir); du > peakDisk.Load() {
				peakDisk.Store(du)
			}
			select {
			case <-loadCtx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()

	// Prober: the server answers small calls throughout.
	wg.Add(1)
	go func() {
		defer wg.Done()
		conn := rawConn()
		defer conn.Close()
		caps := repb.NewCapabilitiesClient(conn)
		cas := repb.NewContentAddressableStorageClient(conn)
		for loadCtx.Err() == nil {
			start := time.Now()
			pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := caps.GetCapabilities(pctx, &repb.GetCapabilitiesRequest{})
			if err == nil {
				_, err = cas.FindMissingBlobs(pctx, &repb.FindMissingBlobsRequest{DigestFunction: digest.BLAKE3,
					BlobDigests: []*repb.Digest{digest.Compute(digest.BLAKE3, []byte("probe"))}})
			}
			pcancel()
			if err != nil {
				fail("probe: %v", err)
			}
			probes.Add(1)
			if ms := time.Since(start).Milliseconds(); ms > maxProbe.Load() {
				maxProbe.Store(ms)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()

	// Uploaders: blobs from 10 KB (batch calls) to 6 MiB (ByteStream),
	// half of the clients with zstd, each read back at once.
	for w := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dialClient(w%2 == 0)
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			for i := 0; loadCtx.Err() == nil; i++ {
				size := 10_000 + rng.IntN(6<<20)
				if rng.IntN(3) == 0 {
					size = 10_000 + rng.IntN(900_000)
				}
				seed := uint64(w)<<32 | uint64(i)
				data := soakData(size, seed)
				d := digest.Compute(c.DigestFunction(), data)
				err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data))
				switch {
				case status.Code(err) == codes.ResourceExhausted:
					exhausted.Add(1)
					continue
				case err != nil:
					fail("upload %s: %v", digest.String(d), err)
					continue
				}
				completed.Add(1)
				bytesUp.Add(int64(size))
				got, err := cache.ReadAll(ctx, c, cache.Namespace{}, d)
				if err != nil || !bytes.Equal(got, data) {
					fail("reading back %s just uploaded: %v (%d bytes)", digest.String(d), err, len(got))
					continue
				}
				readBacks.Add(1)
				mu.Lock()
				stored = append(stored, storedBlob{d: d, size: size, seed: seed})
				mu.Unlock()
			}
		}()
	}

	// Readers: earlier blobs, which may have been evicted since, but never
	// read back wrong.
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dialClient(w == 0)
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for loadCtx.Err() == nil {
				mu.Lock()
				var b storedBlob
				if len(stored) > 0 {
					b = stored[rng.IntN(len(stored))]
				}
				mu.Unlock()
				if b.d == nil {
					time.Sleep(50 * time.Millisecond)
					continue
				}
				got, err := cache.ReadAll(ctx, c, cache.Namespace{}, b.d)
				switch {
				case cache.IsNotFound(err):
				case err != nil:
					fail("reading %s: %v", digest.String(b.d), err)
				case !bytes.Equal(got, soakData(b.size, b.seed)):
					fail("reading %s: wrong bytes", digest.String(b.d))
				}
			}
		}()
	}

	// Hostile clients: uploads that stall until the idle timeout, that
	// disconnect mid-stream (cancelled, or the connection closed), that
	// claim sizes the server cannot store, and zstd bombs.
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 5))
			for i := 0; loadCtx.Err() == nil; i++ {
				conn := rawConn()
				bs := bspb.NewByteStreamClient(conn)
				claim := int64(8<<20 + rng.IntN(8<<20))
				d := &repb.Digest{Hash: digest.Compute(digest.BLAKE3, []byte(fmt.Sprint(w, i))).Hash, SizeBytes: claim}
				name := fmt.Sprintf("uploads/h%d-%d/blobs/blake3/%s/%d", w, i, d.Hash, d.SizeBytes)
				sctx, scancel := context.WithCancel(ctx)
				stream, err := bs.Write(sctx)
				if err == nil {
					err = stream.Send(&bspb.WriteRequest{ResourceName: name, Data: soakData(1<<20, uint64(i))})
				}
				switch mode := (i + w) % 4; {
				case err != nil:
					fail("hostile upload: %v", err)
				case mode == 0: // stall past the idle timeout
					if err := stream.RecvMsg(new(bspb.WriteResponse)); status.Code(err) != codes.DeadlineExceeded && status.Code(err) != codes.ResourceExhausted {
						fail("stalled upload: %v, want DeadlineExceeded", err)
					}
					stalled.Add(1)
				case mode == 1: // cancel mid-stream
					time.Sleep(time.Duration(rng.IntN(500)) * time.Millisecond)
					scancel()
					disconnected.Add(1)
				case mode == 2: // drop the connection mid-stream
					time.Sleep(time.Duration(rng.IntN(500)) * time.Millisecond)
					conn.Close()
					disconnected.Add(1)
				case mode == 3: // claims beyond the server's bounds, and a bomb
					for _, huge := range []int64{1 << 40, soakMaxBytes} {
						hd := &repb.Digest{Hash: d.Hash, SizeBytes: huge}
						hs, err := bs.Write(ctx)
						if err == nil {
							hs.Send(&bspb.WriteRequest{ResourceName: fmt.Sprintf("uploads/x%d/blobs/blake3/%s/%d", i, hd.Hash, huge), Data: soakData(1<<20, 1)})
							_, err = hs.CloseAndRecv()
						}
						if status.Code(err) != codes.InvalidArgument {
							fail("claim of %d bytes: %v, want InvalidArgument", huge, err)
						}
						refused.Add(1)
					}
					bomb := zstdBomb()
					small := &repb.Digest{Hash: d.Hash, SizeBytes: 1 << 20}
					bstream, err := bs.Write(ctx)
					if err == nil {
						bstream.Send(&bspb.WriteRequest{ResourceName: fmt.Sprintf("uploads/b%d/compressed-blobs/zstd/blake3/%s/%d", i, small.Hash, small.SizeBytes), Data: bomb, FinishWrite: true})
						_, err = bstream.CloseAndRecv()
					}
					if status.Code(err) != codes.InvalidArgument && status.Code(err) != codes.ResourceExhausted {
						fail("zstd bomb: %v, want InvalidArgument", err)
					}
					refused.Add(1)
				}
				scancel()
				conn.Close()
			}
		}()
	}

	wg.Wait()
	<-samplerDone
	hwm, err := procStatus(pid, "VmHWM")
	if err != nil {
		t.Fatalf("reading the server's VmHWM: %v", err)
	}
	peak := max(hwm, peakRSS.Load())
	t.Logf("soak: %d uploads completed (%d MiB) and read back, %d ResourceExhausted, %d refused claims/bombs, %d stalled, %d disconnected; %d probes, slowest %d ms",
		completed.Load(), bytesUp.Load()>>20, exhausted.Load(), refused.Load(), stalled.Load(), disconnected.Load(), probes.Load(), maxProbe.Load())
	t.Logf("soak: server peak RSS %.1f MiB (VmHWM; bound %d MiB), peak disk %.1f MiB (bound %d MiB)",
		float64(peak)/(1<<20), soakRSSBound>>20, float64(peakDisk.Load())/(1<<20), soakDiskBound>>20)
	for _, f := range failures {
		t.Error(f)
	}
	if peak > soakRSSBound {
		t.Errorf("server peak RSS %d MiB over the bound of %d MiB", peak>>20, soakRSSBound>>20)
	}
	if peakDisk.Load() > soakDiskBound {
		t.Errorf("peak disk usage %d MiB over the bound of %d MiB", peakDisk.Load()>>20, soakDiskBound>>20)
	}
	if completed.Load() < 20 || readBacks.Load() != completed.Load() {
		t.Errorf("%d uploads completed, %d read back", completed.Load(), readBacks.Load())
	}
	if stalled.Load() == 0 || disconnected.Load() == 0 || refused.Load() == 0 {
		t.Error("the hostile clients did not run")
	}
	// Interrupted uploads expire (idle timeout 2 s, TTL 3 s): nothing is
	// left in the scratch directory.
	deadline := time.Now().Add(15 * time.Second)
	for {
		left := uploadFiles(t, filepath.Join(dir, "scratch"))
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("upload files left after the TTL: %v", left)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

type storedBlob struct {
	d    *repb.Digest
	size int
	seed uint64
}

// soakData is half random, half repetitive: compressible, not trivially.
func soakData(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 3))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		if (i/4096)%2 == 1 {
			v = seed
		}
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

var zstdBomb = sync.OnceValue(func() []byte {
	enc, _ := zstd.NewWriter(nil)
	return enc.EncodeAll(make([]byte, 64<<20), nil)
})

// procStatus reads a kB field of /proc/PID/status, in bytes.
func procStatus(pid int, field string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New(field + " not in /proc status")
}

// diskUsageOf is du: the allocated bytes of every file under dir.
func diskUsageOf(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		var st syscall.Stat_t
		if syscall.Lstat(p, &st) == nil {
			n += st.Blocks * 512
		}
		return nil
	})
	return n
}

func uploadFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "upload-") {
			names = append(names, e.Name())
		}
	}
	return names
}
