package e2e

import (
	"bufio"
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/internal/toxic"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/remote"
)

// The emulated link of BenchmarkFaultsUnderReadAhead: 1 ms each way, and
// 1 Gbit/s shared by every connection unless SNAPLOADER_BENCH_LINK_MBIT
// says otherwise (for a machine where the proxy cannot keep up).
const linkLatencyMs = 1

// linkKBs is the emulated link's rate in KB/s, each direction.
func linkKBs(b *testing.B) int64 {
	v := os.Getenv("SNAPLOADER_BENCH_LINK_MBIT")
	if v == "" {
		return 125000
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 {
		b.Fatalf("bad SNAPLOADER_BENCH_LINK_MBIT %q: want a positive number of Mbit/s", v)
	}
	return n * 125
}

// startLink puts the emulated link w in front of upstream and returns its
// address: a proxy in the benchmark's process, or, with
// SNAPLOADER_BENCH_LINK=pinned, a linkproxy process pinned to serverCPU
// beside serve (on two CPUs it then shares serve's CPU with one thread,
// and measured a longer fault tail than the proxy in this process).
func startLink(b *testing.B, upstream string, w toxic.Wire) string {
	b.Helper()
	switch mode := os.Getenv("SNAPLOADER_BENCH_LINK"); mode {
	case "", "inprocess":
		p := toxic.Start(b, upstream)
		if err := p.Emulate(w); err != nil {
			b.Fatal(err)
		}
		return p.Addr()
	case "pinned":
	default:
		b.Fatalf("bad SNAPLOADER_BENCH_LINK %q: want inprocess (the default) or pinned", mode)
	}
	bin, cleanup, err := testutil.BuildMain("../internal/toxic/linkproxy", "linkproxy")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(cleanup)
	cmd := pinned(serverCPU, bin, "-upstream", upstream, "-rate", strconv.FormatInt(w.RateKBs, 10), "-latency", strconv.FormatInt(w.LatencyMs, 10))
	stdin, err := cmd.StdinPipe() // linkproxy exits when it closes
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { stdin.Close(); cmd.Wait() })
	addr, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		b.Fatalf("linkproxy to %s did not say where it listens: %v\n%s", upstream, err, stderr.String())
	}
	return strings.TrimSpace(addr)
}

// faultChunk is the content of chunk i of the benchmark image: random
// bytes (incompressible, so that the bytes on the link are the bytes read).
func faultChunk(i int) []byte {
	data := make([]byte, cow.DefaultChunkSize)
	r := rand.NewChaCha8([32]byte{byte(i), byte(i >> 8), byte(i >> 16), 7})
	r.Read(data)
	return data
}

// uploadFaultImage stores an image of n chunks and their outboards on the
// server at url (directly, not through the emulated link) and returns its
// chunked file.
func uploadFaultImage(b *testing.B, url string, n int) *snapshotpb.ChunkedFile {
	b.Helper()
	ctx := context.Background()
	c, err := remote.Dial(ctx, url, remote.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if c.DigestFunction() != digest.BLAKE3 {
		b.Fatalf("server offers %v, not BLAKE3: no outboards", c.DigestFunction())
	}
	ns := cache.Namespace{Function: digest.BLAKE3}
	cf := &snapshotpb.ChunkedFile{Name: "memory.img", Size: int64(n) * cow.DefaultChunkSize, ChunkSize: cow.DefaultChunkSize}
	for i := range n {
		data := faultChunk(i)
		ob, d := cache.Outboard(data)
		obd := digest.Compute(digest.BLAKE3, ob)
		if err := c.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
		if err := c.Write(ctx, ns, obd, bytes.NewReader(ob)); err != nil {
			b.Fatal(err)
		}
		cf.Chunks = append(cf.Chunks, &snapshotpb.Chunk{Offset: int64(i) * cow.DefaultChunkSize, Digest: d, Outboard: obd})
	}
	return cf
}

// faultRun is what one lazy open of the image measured.
type faultRun struct {
	faults   []time.Duration // first byte of faults on untouched chunks
	seqBytes int64
	seqTime  time.Duration
	remote   int64 // blobs fetched from the remote (chunks and outboards)
	stored   int64 // distinct blobs in the cache after the round
}

// faultRound opens the image lazily through the emulated link into an
// empty cache: a reader reads the first quarter in order (read-ahead
// runs), while page faults (4 KiB reads, one at a time, 5-25 ms apart)
// land on chunks beyond its read-ahead that nothing has touched or read
// ahead, and whose first bytes are timed.
func faultRound(b *testing.B, target string, cf *snapshotpb.ChunkedFile, seed uint64) faultRun {
	b.Helper()
	ctx := context.Background()
	lc, err := localcache.New(b.TempDir(), localcache.Options{MaxBytes: 4 << 30})
	if err != nil {
		b.Fatal(err)
	}
	rc, err := remote.Dial(ctx, target, remote.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer rc.Close()
	rt := cache.NewReadThrough(lc, rc)
	st, err := cow.Open("", cf, rt, cow.Options{Namespace: cache.Namespace{Function: digest.BLAKE3}, TempDir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	n := len(cf.Chunks)
	seqChunks := n / 4 // what the sequential reader reads
	var run faultRun
	done := make(chan struct{})
	var seqErr error
	go func() {
		defer close(done)
		buf := make([]byte, 1<<20)
		start := time.Now()
		for off := int64(0); off < int64(seqChunks)*cow.DefaultChunkSize; off += int64(len(buf)) {
			k, err := st.ReadAt(buf[:min(int64(len(buf)), int64(seqChunks)*cow.DefaultChunkSize-off)], off)
			if err != nil {
				seqErr = err
				return
			}
			run.seqBytes += int64(k)
		}
		run.seqTime = time.Since(start)
	}()
	r := rand.New(rand.NewPCG(seed, 1))
	// A fault's chunk is beyond the sequential reader's read-ahead, and not among the four chunks after an earlier
	// fault (which that fault read ahead).
	free := make([]bool, n)
	for i := seqChunks + cow.DefaultReadAhead + 1; i < n; i++ {
		free[i] = true
	}
	type fault struct {
		chunk int
		off   int64
		page  []byte
	}
	var faults []fault
	page := make([]byte, 4096)
loop:
	for {
		select {
		case <-done:
			break loop
		case <-time.After(time.Duration(5+r.IntN(20)) * time.Millisecond):
		}
		var cands []int
		for i, ok := range free {
			if ok {
				cands = append(cands, i)
			}
		}
		if len(cands) == 0 {
			break
		}
		ci := cands[r.IntN(len(cands))]
		for j := ci; j <= min(n-1, ci+4); j++ {
			free[j] = false
		}
		off := int64(ci)*cow.DefaultChunkSize + int64(r.IntN(cow.DefaultChunkSize/4096))*4096
		t0 := time.Now()
		if _, err := st.ReadAt(page, off); err != nil {
			b.Fatalf("fault at offset %d: %v", off, err)
		}
		run.faults = append(run.faults, time.Since(t0))
		faults = append(faults, fault{ci, off, slices.Clone(page)})
	}
	<-done
	if seqErr != nil {
		b.Fatalf("sequential read: %v", seqErr)
	}
	if err := st.Close(); err != nil {
		b.Fatal(err)
	}
	// Read-ahead cut short by Close finishes its fetches into the cache
	// in the background: count the blobs stored once that settles.
	var all []*repb.Digest
	for _, c := range cf.Chunks {
		all = append(all, c.Digest, c.Outboard)
	}
	for deadline, last := time.Now().Add(10*time.Second), int64(-1); ; time.Sleep(200 * time.Millisecond) {
		missing, err := lc.FindMissing(ctx, cache.Namespace{Function: digest.BLAKE3}, all)
		if err != nil {
			b.Fatal(err)
		}
		run.stored, run.remote = int64(len(all)-len(missing)), rt.Stats().RemoteFetches
		if (run.stored == last && run.stored >= run.remote) || time.Now().After(deadline) {
			break
		}
		last = run.stored
	}
	for _, f := range faults {
		in := f.off - int64(f.chunk)*cow.DefaultChunkSize
		if want := faultChunk(f.chunk)[in : in+4096]; !bytes.Equal(f.page, want) {
			b.Fatalf("fault at offset %d read wrong bytes", f.off)
		}
	}
	return run
}

// BenchmarkFaultsUnderReadAhead measures the first byte of page faults on
// unfetched chunks while a sequential reader keeps read-ahead busy, with
// `snaploader serve` (pinned to CPU 1) behind an emulated link of 1 Gbit/s
// shared by all connections and 1 ms each way (Toxiproxy in this process,
// with internal/toxic's shared bandwidth cap: its own bandwidth toxic caps
// each connection apart), into an empty cache each round. It reports the
// faults' first byte p50/p99 and the sequential reader's throughput
// against the link's. With 20 faults a round, p99 of 5 rounds or fewer is
// their maximum.
//
//	SNAPLOADER_BENCH_MIB=512 go test -run '^$' -bench FaultsUnderReadAhead -benchtime 5x ./e2e/
//
// SNAPLOADER_BENCH_LINK_MBIT sets another link rate (Mbit/s);
// SNAPLOADER_BENCH_LINK=pinned runs the proxy in a process of its own
// (internal/toxic's linkproxy) pinned to CPU 1 beside serve (see
// startLink).
func BenchmarkFaultsUnderReadAhead(b *testing.B) {
	if runtime.NumCPU() < 2 {
		b.Skip("needs two CPUs to pin the server apart")
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		b.Skip("taskset not installed")
	}
	n := int(testutil.BenchMiB(b, 512) << 20 / cow.DefaultChunkSize)
	if n/4+cow.DefaultReadAhead+20 > n {
		b.Fatalf("SNAPLOADER_BENCH_MIB too small: the image needs room for faults beyond the reader's read-ahead")
	}
	url, _ := startPinnedServeWith(b, "--compression=false", "--log-level=warn") // no line per call: the summary below stays in the log
	cf := uploadFaultImage(b, url, n)
	target := "grpc://" + startLink(b, strings.TrimPrefix(url, "grpc://"), toxic.Wire{RateKBs: linkKBs(b), LatencyMs: linkLatencyMs})
	faultRound(b, target, cf, 0) // warm-up
	var faults []time.Duration
	var seqRate []float64
	var remoteFetches, stored int64
	i := uint64(1)
	for b.Loop() {
		run := faultRound(b, target, cf, i)
		i++
		faults = append(faults, run.faults...)
		seqRate = append(seqRate, float64(run.seqBytes)/run.seqTime.Seconds()/1e6)
		remoteFetches += run.remote
		stored += run.stored
	}
	slices.Sort(faults)
	slices.Sort(seqRate)
	q := func(p float64) float64 {
		return float64(faults[min(len(faults)-1, int(p*float64(len(faults))))].Microseconds()) / 1000
	}
	b.ReportMetric(q(0.5), "fault-first-byte-p50-ms")
	b.ReportMetric(q(0.99), "fault-first-byte-p99-ms")
	b.ReportMetric(float64(len(faults))/float64(i-1), "faults/round")
	med := seqRate[len(seqRate)/2]
	b.ReportMetric(med, "seq-MB/s")
	b.ReportMetric(med/float64(linkKBs(b)/1000), "seq-x-link")
	// One fetch per blob (1.00): a fault and read-ahead never fetch one
	// chunk twice.
	b.ReportMetric(float64(remoteFetches)/float64(stored), "remote-fetches-per-blob")
	b.Logf("faults %d, first byte (ms): p50 %.2f p90 %.2f p99 %.2f max %.2f; sequential MB/s %v", len(faults), q(0.5), q(0.9), q(0.99), q(1), seqRate)
}
