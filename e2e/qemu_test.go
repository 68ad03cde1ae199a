package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/internal/cachecount"
	"github.com/snaploader/snaploader/internal/testguest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/qemu"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/snapshot"
	"github.com/snaploader/snaploader/vmm"
)

const (
	vmMemory    = 128 << 20
	vmDisk      = 32 << 20
	vmChunkSize = 512 << 10
)

var vmTask = snapshot.Task{InstanceName: "vms", PlatformHash: "x86_64-tcg", ConfigurationHash: "testguest",
	Env: map[string]string{snapshot.EnvBranch: "main", snapshot.EnvDefaultBranch: "main"}}

// guestBuild builds a test guest once per test binary (and once per
// machine thanks to its cache directory).
type guestBuild struct {
	once sync.Once
	tg   *testguest.TestGuest
	err  error
}

var smallGuest, fillGuest guestBuild

// get returns the guest build makes, skipping (failing under CI) where it
// cannot be had.
func (g *guestBuild) get(t testing.TB, what string, build func(context.Context, string) (*testguest.TestGuest, error)) *testguest.TestGuest {
	t.Helper()
	g.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		g.tg, g.err = build(ctx, "")
	})
	if status.Code(g.err) == codes.Unavailable {
		testutil.Unavailable(t, what+": "+g.err.Error())
	}
	if g.err != nil {
		t.Fatal(g.err)
	}
	return g.tg
}

// needGuest returns the busybox test guest, skipping (failing under CI)
// where QEMU or the guest's tools cannot be had.
func needGuest(t testing.TB) *testguest.TestGuest {
	t.Helper()
	testutil.LookPath(t, "qemu-system-x86_64")
	testutil.LookPath(t, "mkfs.ext4")
	testutil.LookPath(t, "debugfs")
	return smallGuest.get(t, "test guest", testguest.BuildTestGuest)
}

// serveProc is a `snaploader serve` process for tests and benchmarks.
func serveProc(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(binary, "serve", "--listen", addr, "--cache-dir", t.TempDir())
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			c.Close()
			return "grpc://" + addr
		}
	}
	t.Fatalf("snaploader serve did not listen on %s: %s", addr, stderr.String())
	return ""
}

// vmHost is one machine: an empty cache directory, the remote through a
// counter, and a vmm.Host over them.
type vmHost struct {
	local  *localcache.Cache
	remote *cachecount.Counting
	loader *snapshot.Loader
	vmm    *vmm.Host
}

func newVMHost(t testing.TB, url string) *vmHost {
	t.Helper()
	return newVMHostWith(t, url, nil)
}

// newVMHostWith is newVMHost with the remote tier wrapped by wrap (e.g. in
// client-side encryption); nil leaves it as it is.
func newVMHostWith(t testing.TB, url string, wrap func(cache.Tier) cache.Tier) *vmHost {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rc, err := remote.Dial(ctx, url, remote.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.Close() })
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 2 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	var tier cache.Tier = cache.Verifying(rc)
	if wrap != nil {
		tier = wrap(tier)
	}
	h := &vmHost{local: lc, remote: cachecount.NewCounting(tier)}
	if h.loader, err = snapshot.New(lc, h.remote, snapshot.Options{}); err != nil {
		t.Fatal(err)
	}
	if h.vmm, err = vmm.NewHost(vmm.Options{Loader: h.loader, Local: lc, ChunkSize: vmChunkSize}); err != nil {
		t.Fatal(err)
	}
	return h
}

func (h *vmHost) keys(ctx context.Context, t testing.TB) *snapshotpb.SnapshotKeySet {
	t.Helper()
	ks, err := h.loader.KeySet(ctx, vmTask, snapshot.KeySetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ks
}

func (h *vmHost) save(ctx context.Context, t testing.TB, v *vmm.VM) *vmm.SaveStats {
	t.Helper()
	st, err := v.Save(ctx, vmm.SaveOptions{Key: h.keys(ctx, t).GetWriteKey(), Local: true, Remote: true, LocalManifest: true})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func (h *vmHost) get(ctx context.Context, t testing.TB) *snapshot.Snapshot {
	t.Helper()
	snap, err := h.loader.GetSnapshot(ctx, h.keys(ctx, t), snapshot.GetOptions{ReadPolicy: snapshot.Newest})
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

// nextCounter waits for the next COUNTER line with a number >= min.
func nextCounter(ctx context.Context, t testing.TB, g *qemu.Guest, min int) int {
	t.Helper()
	for {
		m, err := g.Console.WaitFor(ctx, testguest.CounterPattern())
		if err != nil {
			out, _ := os.ReadFile(g.Console.Path())
			t.Fatalf("waiting for COUNTER >= %d: %v\nserial:\n%s\nqemu: %s", min, err, out, g.Stderr())
		}
		n, _ := strconv.Atoi(m[1])
		if n >= min {
			return n
		}
	}
}

// contiguous fails unless nums is exactly 1..len(nums).
func contiguous(t testing.TB, what string, nums []int) {
	t.Helper()
	if len(nums) == 0 {
		t.Fatalf("%s: empty", what)
	}
	for i, n := range nums {
		if n != i+1 {
			t.Fatalf("%s: entry %d is %d, want %d (gap or restart): %v", what, i, n, i+1, nums)
		}
	}
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// bootAndSave boots the test guest on host a, waits for COUNTER >= 3 and
// saves it locally and remotely. It returns the boot serial output.
func bootAndSave(ctx context.Context, t testing.TB, a *vmHost) ([]byte, *vmm.SaveStats) {
	t.Helper()
	tg := needGuest(t)
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	if err := testguest.MakeTestDisk(ctx, disk, vmDisk); err != nil {
		t.Fatal(err)
	}
	m := vmm.Machine{MemoryBytes: vmMemory, Kernel: tg.Kernel, Initrd: tg.Initrd, Append: tg.Append, Disks: []vmm.Disk{{Name: "root", Path: disk}}}
	v, err := a.vmm.Boot(ctx, m, vmm.BootOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	nextCounter(ctx, t, v.Guest(), 3)
	serial := v.Guest().Config().SerialLog
	st := a.save(ctx, t, v)
	return readFile(t, serial), st
}

// restoreRun is one lazy restore until its first new counter.
type restoreRun struct {
	vm          *vmm.VM
	serial      string
	first       int           // first counter printed after the restore
	toRunning   time.Duration // Restore call until the guest runs
	toCounter   time.Duration // Restore call until the first new counter
	remoteBytes int64         // fetched from the remote until then
	remoteReads int64
	fgFetches   int64 // fetches the VMM waited for, memory and disk
	prefetched  int64
}

func restoreLazily(ctx context.Context, t testing.TB, h *vmHost, snap *snapshot.Snapshot, opts snapshot.UnpackOptions) *restoreRun {
	t.Helper()
	dir := t.TempDir()
	r := &restoreRun{serial: filepath.Join(dir, "serial.log")}
	before := h.remote.Stats()
	start := time.Now()
	v, err := h.vmm.Restore(ctx, snap, vmm.RestoreOptions{Dir: dir, SerialLog: r.serial, Unpack: opts})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	r.vm = v
	r.toRunning = time.Since(start)
	r.first = nextCounter(ctx, t, v.Guest(), 1)
	r.toCounter = time.Since(start)
	after := h.remote.Stats()
	r.remoteBytes, r.remoteReads = after.ReadBytes-before.ReadBytes, after.Reads-before.Reads
	for _, s := range v.Stores() {
		st := s.Stats()
		r.fgFetches += st.ForegroundFetches
		r.prefetched += st.Prefetched
	}
	return r
}

// digestsOf returns the distinct chunk digests of a manifest.
func digestsOf(m *snapshotpb.SnapshotManifest) map[string]bool {
	ds := map[string]bool{}
	for _, cf := range m.GetChunkedFiles() {
		for _, c := range cf.GetChunks() {
			ds[c.GetDigest().GetHash()] = true
		}
	}
	return ds
}

func snapshotBytes(snap *snapshot.Snapshot) (chunked, artifacts int64) {
	for _, cf := range snap.Manifest.GetChunkedFiles() {
		for _, c := range cf.GetChunks() {
			chunked += c.GetDigest().GetSizeBytes()
		}
	}
	for _, f := range snap.Manifest.GetFiles() {
		artifacts += f.GetDigest().GetSizeBytes()
	}
	return chunked, artifacts
}

// TestQEMURestoredLazilyOnAnotherHost boots a guest on host A, saves it
// into A's cache and a `snaploader serve` remote, restores it lazily on
// host B (empty cache: memory through FUSE, disk through NBD, both fetched
// through B's cache), checks the guest continues where it stopped, saves it
// again incrementally and restores that on host C with working-set
// prefetch.
func TestQEMURestoredLazilyOnAnotherHost(t *testing.T) {
	needGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	url := serveProc(t)

	a := newVMHost(t, url)
	bootSerial, saveA := bootAndSave(ctx, t, a)
	before := testguest.ParseCounters(bootSerial)
	contiguous(t, "serial before snapshot", before)
	last := before[len(before)-1]
	ta := saveA.Result.Totals()
	t.Logf("host A: snapshot (pause to exit) %v, save %v; %d chunks stored, state %d bytes", saveA.Snapshot.Total, saveA.Save, ta.ChunksTotal, saveA.Snapshot.StateBytes)
	if n := len(digestsOf(saveA.Result.Manifest)); ta.RemoteChunksWritten != n {
		t.Errorf("first save uploaded %d chunks, want all %d distinct ones", ta.RemoteChunksWritten, n)
	}

	// Host B: empty cache, restore lazily from the remote.
	b := newVMHost(t, url)
	snap := b.get(ctx, t)
	if snap.Source != snapshot.SourceRemote {
		t.Errorf("host B found the snapshot in %s, want remote", snap.Source)
	}
	if cfg := snap.Manifest.GetVmConfiguration(); cfg.GetMemoryBytes() != vmMemory || len(cfg.GetDisks()) != 1 || cfg.GetDisks()[0].GetSizeBytes() != vmDisk || cfg.GetKernelCmdline() == "" {
		t.Errorf("recorded VM configuration %v, want %d bytes of memory, one %d-byte disk and a command line", cfg, vmMemory, vmDisk)
	}
	chunkedBytes, artifactBytes := snapshotBytes(snap)
	// On demand only: no read-ahead, no working set yet.
	r := restoreLazily(ctx, t, b, snap, snapshot.UnpackOptions{ReadAhead: -1})
	t.Logf("host B: restore to running %v (unpack %v, serve %v, resume %v); to first COUNTER %d: %v",
		r.toRunning, r.vm.RestoreStats().Unpack, r.vm.RestoreStats().Serve, r.vm.RestoreStats().Resume, r.first, r.toCounter)
	t.Logf("host B: fetched %d blobs, %.1f MiB from the remote before the counter resumed; snapshot holds %.1f MiB of chunks + %.1f MiB of files",
		r.remoteReads, float64(r.remoteBytes)/(1<<20), float64(chunkedBytes)/(1<<20), float64(artifactBytes)/(1<<20))
	if r.first != last+1 && r.first != last+2 {
		t.Errorf("first counter after restore is %d, want %d (or %d if a line was split)", r.first, last+1, last+2)
	}
	if blobs := int64(len(digestsOf(snap.Manifest)) + len(snap.Manifest.GetFiles())); r.remoteReads >= blobs || r.remoteBytes >= chunkedBytes+artifactBytes {
		t.Errorf("restore fetched %d blobs, %d bytes before the guest resumed counting: not lazy (snapshot: %d blobs, %d bytes)", r.remoteReads, r.remoteBytes, blobs, chunkedBytes+artifactBytes)
	}
	if r.fgFetches == 0 {
		t.Error("the restored guest fetched no chunk on demand")
	}
	final := nextCounter(ctx, t, r.vm.Guest(), last+4)

	// Save again from host B: only dirtied chunks are written.
	saveB := b.save(ctx, t, r.vm)
	restoredSerial := readFile(t, r.serial)
	if bytes.Contains(restoredSerial, []byte("GUEST READY")) {
		t.Errorf("restored guest booted again:\n%s", restoredSerial)
	}
	all := testguest.ParseCounters(append(append([]byte{}, bootSerial...), restoredSerial...))
	contiguous(t, "serial across the restore", all)
	lastB := all[len(all)-1]
	if lastB < final {
		t.Fatalf("last counter %d < %d seen", lastB, final)
	}
	prev := digestsOf(snap.Manifest)
	for i, f := range saveB.Result.Files {
		cf := saveB.Result.Manifest.GetChunkedFiles()[i]
		changed := 0 // distinct new contents, not in the restored snapshot
		for d := range digestsOf(&snapshotpb.SnapshotManifest{ChunkedFiles: []*snapshotpb.ChunkedFile{cf}}) {
			if !prev[d] {
				changed++
			}
		}
		zero := int(f.BytesSkippedZero / vmChunkSize)
		chunks := int((cf.GetSize() + vmChunkSize - 1) / vmChunkSize)
		t.Logf("host B incremental save of %s: %d chunks dirty (store had %d), %d with new content written, %d rewritten unchanged, %d now zero, %d uploaded; %d chunks stored of %d",
			f.Name, f.ChunksDirty, saveB.DirtyBefore[f.Name], f.ChunksWritten, f.ChunksDirty-f.ChunksWritten-zero, zero, f.RemoteChunksWritten, f.ChunksTotal, chunks)
		if f.ChunksDirty != saveB.DirtyBefore[f.Name] {
			t.Errorf("%s: save found %d dirty chunks, the store had %d", f.Name, f.ChunksDirty, saveB.DirtyBefore[f.Name])
		}
		if f.ChunksWritten != changed || f.ChunksWritten > f.ChunksDirty-zero {
			t.Errorf("%s: %d chunks written; want the %d new contents, at most the %d dirty ones less %d zero ones", f.Name, f.ChunksWritten, changed, f.ChunksDirty, zero)
		}
		if f.RemoteChunksWritten != f.ChunksWritten {
			t.Errorf("%s: uploaded %d chunks, want the %d written", f.Name, f.RemoteChunksWritten, f.ChunksWritten)
		}
		if f.ChunksDirty == 0 || f.ChunksDirty*4 > chunks {
			t.Errorf("%s: %d of %d chunks dirty; want some, and far fewer than the total", f.Name, f.ChunksDirty, chunks)
		}
	}
	t.Logf("host B: snapshot (pause to exit) %v, incremental save %v", saveB.Snapshot.Total, saveB.Save)

	// The disk, written through NBD into the store, logs every counter.
	diskImg := filepath.Join(t.TempDir(), "disk.img")
	if err := vmm.WriteFile(ctx, r.vm.Stores()[vmm.DiskPrefix+"root"], diskImg); err != nil {
		t.Fatal(err)
	}
	log, err := testguest.ReadTestLog(ctx, diskImg)
	if err != nil {
		t.Fatal(err)
	}
	contiguous(t, "disk log", log)
	if k := len(log); k < lastB-1 || k > lastB {
		t.Errorf("disk log ends at %d, want %d or %d (last printed)", k, lastB-1, lastB)
	}
	r.vm.Close()

	// Host C restores the incremental snapshot, prefetching B's working set.
	c := newVMHost(t, url)
	snapC := c.get(ctx, t)
	if snapC.Manifest.GetVmMetadata().GetSnapshotId() != saveB.Result.SnapshotID {
		t.Fatalf("host C found snapshot %s, want host B's %s", snapC.Manifest.GetVmMetadata().GetSnapshotId(), saveB.Result.SnapshotID)
	}
	if len(snapC.Manifest.GetVmMetadata().GetWorkingSets()) == 0 {
		t.Error("host B's snapshot records no working set")
	}
	rc := restoreLazily(ctx, t, c, snapC, snapshot.UnpackOptions{PrefetchWorkingSet: true})
	t.Logf("host C (prefetch): to first COUNTER %d: %v; %d on-demand fetches, %d prefetched", rc.first, rc.toCounter, rc.fgFetches, rc.prefetched)
	if rc.first != lastB+1 && rc.first != lastB+2 {
		t.Errorf("host C: first counter %d, want %d (or %d)", rc.first, lastB+1, lastB+2)
	}
	if rc.prefetched == 0 {
		t.Error("host C prefetched nothing of the working set")
	}
}

// BenchmarkQEMURestoreWorkingSet restores the same snapshot (one that
// carries a working set) on hosts with empty caches, with and without
// working-set prefetch, and reports the time to the guest's first counter
// line and the chunk fetches the VMM waited for.
//
//	go test ./e2e -run XXX -bench QEMURestoreWorkingSet -benchtime 3x
func BenchmarkQEMURestoreWorkingSet(b *testing.B) {
	needGuest(b)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	url := serveProc(b)
	a := newVMHost(b, url)
	bootSerial, _ := bootAndSave(ctx, b, a)
	before := testguest.ParseCounters(bootSerial)
	h := newVMHost(b, url)
	r := restoreLazily(ctx, b, h, h.get(ctx, b), snapshot.UnpackOptions{ReadAhead: -1})
	nextCounter(ctx, b, r.vm.Guest(), before[len(before)-1]+4)
	h.save(ctx, b, r.vm)
	r.vm.Close()

	// Read-ahead is asked for explicitly: with a working set prefetched, the
	// default is none.
	for _, readAhead := range []int{-1, cow.DefaultReadAhead} {
		for _, prefetch := range []bool{false, true} {
			opts := snapshot.UnpackOptions{ReadAhead: readAhead, PrefetchWorkingSet: prefetch}
			b.Run(fmt.Sprintf("readahead=%v/prefetch=%v", readAhead > 0, prefetch), func(b *testing.B) {
				var toCounter, toRunning time.Duration
				var fg, pf, remoteBytes int64
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					c := newVMHost(b, url)
					snap := c.get(ctx, b)
					b.StartTimer()
					rr := restoreLazily(ctx, b, c, snap, opts)
					b.StopTimer()
					toCounter += rr.toCounter
					toRunning += rr.toRunning
					fg += rr.fgFetches
					pf += rr.prefetched
					remoteBytes += rr.remoteBytes
					rr.vm.Close()
				}
				n := float64(b.N)
				b.ReportMetric(float64(toCounter.Milliseconds())/n, "ms-to-counter")
				b.ReportMetric(float64(toRunning.Milliseconds())/n, "ms-to-running")
				b.ReportMetric(float64(fg)/n, "ondemand-fetches")
				b.ReportMetric(float64(pf)/n, "prefetched")
				b.ReportMetric(float64(remoteBytes)/n/(1<<20), "remote-MiB")
			})
		}
	}
}

// startCLI starts the snaploader binary; the returned function sends
// SIGINT, waits for it to exit and returns its stdout.
func startCLI(t *testing.T, args ...string) (*exec.Cmd, func() string) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, func() string {
		cmd.Process.Signal(os.Interrupt)
		if err := cmd.Wait(); err != nil {
			t.Fatalf("snaploader %v: %v\nstdout:\n%s\nstderr:\n%s", args, err, stdout.String(), stderr.String())
		}
		return stdout.String()
	}
}

// waitSerial waits for a COUNTER >= min in a serial log written by another
// process.
func waitSerial(ctx context.Context, t *testing.T, path string, min int) int {
	t.Helper()
	c := qemu.NewConsole(path)
	for {
		m, err := c.WaitFor(ctx, testguest.CounterPattern())
		if err != nil {
			out, _ := os.ReadFile(path)
			t.Fatalf("waiting for COUNTER >= %d in %s: %v\n%s", min, path, err, out)
		}
		if n, _ := strconv.Atoi(m[1]); n >= min {
			return n
		}
	}
}

// TestQEMUCLIBootSaveRestore drives `snaploader qemu boot --save-on-exit`
// on host A and `snaploader qemu restore --save-on-exit` on host B with an
// empty cache: interrupted, each saves the guest, and the restored guest
// continues counting where the booted one stopped.
func TestQEMUCLIBootSaveRestore(t *testing.T) {
	tg := needGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	url := serveProc(t)
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	if err := testguest.MakeTestDisk(ctx, disk, vmDisk); err != nil {
		t.Fatal(err)
	}
	key := []string{"--remote", url, "--instance", "vms", "--platform", "arch=x86_64", "--config-hash", "cli", "--ref", "main"}

	serialA := filepath.Join(dir, "serial-a.log")
	_, stopA := startCLI(t, append([]string{"qemu", "boot", "--cache-dir", filepath.Join(dir, "cache-a"), "--dir", filepath.Join(dir, "vm-a"),
		"--serial-log", serialA, "--memory-bytes", strconv.Itoa(vmMemory), "--kernel", tg.Kernel, "--initrd", tg.Initrd, "--append", tg.Append,
		"--disk", "root=" + disk, "--chunk-size", strconv.Itoa(vmChunkSize), "--save-on-exit"}, key...)...)
	waitSerial(ctx, t, serialA, 3)
	outA := stopA()
	if !bytes.Contains([]byte(outA), []byte("saved snapshot")) || !bytes.Contains([]byte(outA), []byte("remote: true")) {
		t.Fatalf("qemu boot did not save remotely:\n%s", outA)
	}
	before := testguest.ParseCounters(readFile(t, serialA))
	last := before[len(before)-1]

	serialB := filepath.Join(dir, "serial-b.log")
	_, stopB := startCLI(t, append([]string{"qemu", "restore", "--cache-dir", filepath.Join(dir, "cache-b"), "--dir", filepath.Join(dir, "vm-b"),
		"--serial-log", serialB, "--read-policy", "newest", "--save-on-exit"}, key...)...)
	first := waitSerial(ctx, t, serialB, 1)
	if first != last+1 && first != last+2 {
		t.Errorf("restored guest's first counter is %d, want %d (or %d)", first, last+1, last+2)
	}
	waitSerial(ctx, t, serialB, last+3)
	outB := stopB()
	t.Logf("qemu boot:\n%s\nqemu restore:\n%s", outA, outB)
	if !bytes.Contains([]byte(outB), []byte("saved snapshot")) {
		t.Fatalf("qemu restore did not save on interrupt:\n%s", outB)
	}
	all := testguest.ParseCounters(append(readFile(t, serialA), readFile(t, serialB)...))
	contiguous(t, "serial across the CLI restore", all)
}

// TestQEMUCLISaveAttached snapshots a QEMU this test started with
// `snaploader qemu save --qmp`, then restores it with the vmm API on
// another host.
func TestQEMUCLISaveAttached(t *testing.T) {
	tg := needGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	url := serveProc(t)
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	if err := testguest.MakeTestDisk(ctx, disk, vmDisk); err != nil {
		t.Fatal(err)
	}
	cfg := qemu.Config{Kernel: tg.Kernel, Initrd: tg.Initrd, Append: tg.Append}
	cfg.MemoryBytes, cfg.MemPath, cfg.MemShare = vmMemory, filepath.Join(dir, "mem"), true
	cfg.Disks = []qemu.Disk{{Path: disk}}
	cfg.SerialLog, cfg.QMPSocket = filepath.Join(dir, "serial.log"), filepath.Join(dir, "qmp.sock")
	g, err := qemu.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	nextCounter(ctx, t, g, 3)
	g.QMP.Close() // QEMU serves one QMP client at a time
	out := cli(t, nil, "qemu", "save", "--cache-dir", filepath.Join(dir, "cache-a"), "--qmp", cfg.QMPSocket, "--mem-file", cfg.MemPath,
		"--kernel", tg.Kernel, "--initrd", tg.Initrd, "--append", tg.Append, "--disk", "root="+disk, "--chunk-size", strconv.Itoa(vmChunkSize),
		"--remote", url, "--instance", vmTask.InstanceName, "--platform", "arch=x86_64", "--config-hash", "attached", "--ref", "main")
	if err := g.Wait(ctx); err != nil {
		t.Fatalf("qemu after save: %v", err)
	}
	before := testguest.ParseCounters(readFile(t, cfg.SerialLog))
	last := before[len(before)-1]

	b := newVMHost(t, url)
	task := vmTask
	task.PlatformHash, _ = snapshot.PlatformHash(map[string]string{"arch": "x86_64"})
	task.ConfigurationHash = "attached"
	ks, err := b.loader.KeySet(ctx, task, snapshot.KeySetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	snap, err := b.loader.GetSnapshot(ctx, ks, snapshot.GetOptions{ReadPolicy: snapshot.Newest})
	if err != nil {
		t.Fatalf("%v\nsave output:\n%s", err, out)
	}
	r := restoreLazily(ctx, t, b, snap, snapshot.UnpackOptions{})
	if r.first != last+1 && r.first != last+2 {
		t.Errorf("first counter after restore is %d, want %d (or %d)", r.first, last+1, last+2)
	}
}
