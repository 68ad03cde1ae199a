package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/cachecount"
	"github.com/snaploader/snaploader/internal/testguest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/snapshot"
	"github.com/snaploader/snaploader/tierurl"
	"github.com/snaploader/snaploader/vmm"
)

// needFillGuest returns the fill variant of the test guest (see
// testguest.BuildFillGuest), skipping (failing under CI) where it cannot be
// built.
func needFillGuest(t testing.TB) *testguest.TestGuest {
	t.Helper()
	needGuest(t)
	return fillGuest.get(t, "fill guest", testguest.BuildFillGuest)
}

// fillMachine describes a fill guest run.
type fillMachine struct {
	memory, chunk int64
	fillMiB       int
}

// openRemote opens the remote tier url names: a REAPI cache through its
// client, an s3:// bucket as the commands open one (tierurl: verified,
// behind a breaker). Both verify what they read; counting must not hide
// that, or the read-through tier would hash every chunk again.
func openRemote(ctx context.Context, t testing.TB, url string) cache.Tier {
	t.Helper()
	if strings.HasPrefix(url, "s3://") {
		o, err := tierurl.Open(ctx, []string{url}, digest.BLAKE3, tierurl.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return o.Tier
	}
	rc, err := remote.Dial(ctx, url, remote.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// newHostIn is newVMHost with its local cache in dir and booted guests
// split into chunk-sized chunks; close releases it (the caller removes
// dir).
func newHostIn(ctx context.Context, t testing.TB, url, dir string, chunk int64) (*vmHost, func()) {
	t.Helper()
	rc := openRemote(ctx, t, url)
	lc, err := localcache.New(dir, localcache.Options{MaxBytes: 4 << 30})
	if err != nil {
		rc.Close()
		t.Fatal(err)
	}
	closeAll := func() { lc.Close(); rc.Close() }
	h := &vmHost{local: lc, remote: cachecount.NewCounting(rc)}
	if h.loader, err = snapshot.New(lc, h.remote, snapshot.Options{}); err != nil {
		closeAll()
		t.Fatal(err)
	}
	if h.vmm, err = vmm.NewHost(vmm.Options{Loader: h.loader, Local: lc, ChunkSize: chunk}); err != nil {
		closeAll()
		t.Fatal(err)
	}
	return h, closeAll
}

// bootFill boots the fill guest on h with a disk, waits for COUNTER >= 3
// (the area is filled and read back twice) and saves it locally and
// remotely. It returns the last counter before the snapshot.
func bootFill(ctx context.Context, t testing.TB, h *vmHost, m fillMachine) int {
	t.Helper()
	tg := needFillGuest(t)
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	if err := testguest.MakeTestDisk(ctx, disk, vmDisk); err != nil {
		t.Fatal(err)
	}
	mc := vmm.Machine{MemoryBytes: m.memory, Kernel: tg.Kernel, Initrd: tg.Initrd, Append: testguest.FillAppend(tg, m.fillMiB), Disks: []vmm.Disk{{Name: "root", Path: disk}}}
	v, err := h.vmm.Boot(ctx, mc, vmm.BootOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	nextCounter(ctx, t, v.Guest(), 3)
	serialLog := v.Guest().Config().SerialLog
	h.save(ctx, t, v)
	serial := readFile(t, serialLog)
	checkFillSerial(t, "booted fill guest", serial, m.fillMiB)
	nums := testguest.ParseCounters(serial)
	contiguous(t, "booted fill guest's counters", nums)
	return nums[len(nums)-1]
}

// checkFillSerial fails if the fill guest did not fill fillMiB MiB or found
// a page it wrote changed.
func checkFillSerial(t testing.TB, what string, serial []byte, fillMiB int) {
	t.Helper()
	if bytes.Contains(serial, []byte("FILL BAD")) || bytes.Contains(serial, []byte("FAILED")) {
		t.Fatalf("%s reports a failure:\n%s", what, serial)
	}
	if fillMiB > 0 && !bytes.Contains(serial, []byte(fmt.Sprintf("FILLED %d MiB", fillMiB))) {
		t.Fatalf("%s did not fill %d MiB:\n%s", what, fillMiB, serial)
	}
}

// coldWarmRun is one restore measured until the guest's first new counter.
type coldWarmRun struct {
	vm           *vmm.VM
	dir          string
	first        int
	toRunning    time.Duration
	toCounter    time.Duration
	blocking     int64 // fetches a VMM read or write waited for
	ranges       int64 // reads served by a range read of an unfetched chunk
	yields       int64 // background fetches that waited for a fault first
	opened       int64 // bytes of chunks opened from the host's tiers
	remote       int64 // bytes fetched from the remote
	touched      int64 // bytes of the chunks the guest touched
	memPrefetchQ int64 // memory chunks queued for prefetch
	saved        *vmm.SaveStats
}

// saveAfterCounter saves r's guest on h as soon as it prints a counter line
// newer than any so far, so that the guest is paused between reading back
// its filled area and its next read: the next restore reads all of it
// before its first new counter. It returns the last counter printed.
func saveAfterCounter(ctx context.Context, t testing.TB, h *vmHost, r *coldWarmRun) int {
	t.Helper()
	serial := filepath.Join(r.dir, "serial.log")
	nums := testguest.ParseCounters(readFile(t, serial))
	nextCounter(ctx, t, r.vm.Guest(), nums[len(nums)-1]+1)
	r.saved = h.save(ctx, t, r.vm)
	nums = testguest.ParseCounters(readFile(t, serial))
	return nums[len(nums)-1]
}

// measureRestore restores snap on h and waits for its first new counter;
// the caller closes the VM and removes dir.
func measureRestore(ctx context.Context, t testing.TB, h *vmHost, snap *snapshot.Snapshot, dir string, unpack snapshot.UnpackOptions) *coldWarmRun {
	t.Helper()
	r := &coldWarmRun{dir: dir}
	before := h.remote.Stats()
	start := time.Now()
	v, err := h.vmm.Restore(ctx, snap, vmm.RestoreOptions{Dir: dir, SerialLog: filepath.Join(dir, "serial.log"), Unpack: unpack})
	if err != nil {
		t.Fatal(err)
	}
	r.vm = v
	r.toRunning = time.Since(start)
	r.first = nextCounter(ctx, t, v.Guest(), 1)
	r.toCounter = time.Since(start)
	r.remote = h.remote.Stats().ReadBytes - before.ReadBytes
	for name, s := range v.Stores() {
		st := s.Stats()
		r.blocking += st.ForegroundFetches
		r.ranges += st.RangeReads
		r.yields += st.PrefetchYields
		r.opened += st.FetchedBytes
		r.touched += s.AccessedBytes()
		if name == vmm.MemoryFile {
			r.memPrefetchQ = st.PrefetchQueued
		}
	}
	return r
}

// TestQEMUFillGuestRestored boots the fill guest (a userland holding a
// filled area it reads back before every counter line), saves it, restores
// it on a host with an empty cache and checks that the guest continues
// counting with its memory intact, that the working set the restored guest
// recorded ended once its touches settled and is what the next save
// records, and that a restore prefetching it continues too, with the disk
// log gap-free.
func TestQEMUFillGuestRestored(t *testing.T) {
	needFillGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	url := serveProc(t)
	m := fillMachine{memory: 128 << 20, chunk: vmChunkSize, fillMiB: 48}
	a, closeA := newHostIn(ctx, t, url, t.TempDir(), m.chunk)
	defer closeA()
	last := bootFill(ctx, t, a, m)

	b, closeB := newHostIn(ctx, t, url, t.TempDir(), m.chunk)
	defer closeB()
	r := measureRestore(ctx, t, b, b.get(ctx, t), t.TempDir(), snapshot.UnpackOptions{})
	defer r.vm.Close()
	if r.first != last+1 && r.first != last+2 {
		t.Errorf("first counter after restore is %d, want %d (or %d)", r.first, last+1, last+2)
	}
	if fill := int64(m.fillMiB) << 20; r.touched < fill {
		t.Errorf("guest touched %d bytes before its first counter, less than the %d it reads back", r.touched, fill)
	}
	mem := r.vm.Stores()[vmm.MemoryFile]
	await := func(what string, cond func() bool) {
		for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	await("the memory working set to settle", mem.WorkingSetEnded)
	ws := mem.Touched()
	nextCounter(ctx, t, r.vm.Guest(), r.first+2)
	lastB := saveAfterCounter(ctx, t, b, r)
	saveB := r.saved
	var recorded []int64
	for _, w := range saveB.Result.Manifest.GetVmMetadata().GetWorkingSets() {
		if w.GetFileName() == vmm.MemoryFile {
			recorded = w.GetOffsets()
		}
	}
	if len(ws) == 0 || !slices.Equal(recorded, ws[:min(len(ws), snapshot.MaxWorkingSetChunks)]) {
		t.Errorf("saved working set has %d chunks, want the %d recorded until the touches settled", len(recorded), len(ws))
	}
	checkFillSerial(t, "restored fill guest", readFile(t, filepath.Join(r.dir, "serial.log")), 0)
	r.vm.Close()

	c, closeC := newHostIn(ctx, t, url, t.TempDir(), m.chunk)
	defer closeC()
	rc := measureRestore(ctx, t, c, c.get(ctx, t), t.TempDir(), snapshot.UnpackOptions{PrefetchWorkingSet: true})
	defer rc.vm.Close()
	if rc.first != lastB+1 && rc.first != lastB+2 {
		t.Errorf("host C: first counter %d, want %d (or %d)", rc.first, lastB+1, lastB+2)
	}
	if rc.memPrefetchQ == 0 {
		t.Error("host C queued nothing of the working set for prefetch")
	}
	final := nextCounter(ctx, t, rc.vm.Guest(), rc.first+2)
	if _, err := rc.vm.Save(ctx, vmm.SaveOptions{Key: c.keys(ctx, t).GetWriteKey(), Local: true}); err != nil {
		t.Fatal(err)
	}
	checkFillSerial(t, "fill guest restored with prefetch", readFile(t, filepath.Join(rc.dir, "serial.log")), 0)
	diskImg := filepath.Join(t.TempDir(), "disk.img")
	if err := vmm.WriteFile(ctx, rc.vm.Stores()[vmm.DiskPrefix+"root"], diskImg); err != nil {
		t.Fatal(err)
	}
	log, err := testguest.ReadTestLog(ctx, diskImg)
	if err != nil {
		t.Fatal(err)
	}
	contiguous(t, "disk log across two restores", log)
	if len(log) < final-1 {
		t.Errorf("disk log ends at %d, want at least %d", len(log), final-1)
	}
	t.Logf("restore on an empty cache: running %v, first counter %v, %d blocking fetches, %.1f MiB fetched, %.1f MiB touched; working set %d chunks; with prefetch: first counter %v, %d blocking fetches",
		r.toRunning, r.toCounter, r.blocking, float64(r.remote)/(1<<20), float64(r.touched)/(1<<20), len(ws), rc.toCounter, rc.blocking)
}

// pinProcess pins every thread of this process (and so the QEMU processes
// and threads it starts later) to cpu; the returned function lets them run
// anywhere again.
func pinProcess(t testing.TB, cpu int) func() {
	t.Helper()
	setAll := func(set *unix.CPUSet) error {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		for _, e := range tasks {
			tid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			if err := unix.SchedSetaffinity(tid, set); err != nil && err != unix.ESRCH {
				return fmt.Errorf("pinning thread %d: %w", tid, err)
			}
		}
		return nil
	}
	var one unix.CPUSet
	one.Set(cpu)
	if err := setAll(&one); err != nil {
		t.Fatal(err)
	}
	return func() {
		var all unix.CPUSet
		for i := range runtime.NumCPU() {
			all.Set(i)
		}
		if err := setAll(&all); err != nil {
			t.Error(err)
		}
	}
}

func envInt(t testing.TB, name string, def int64) int64 {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// warmCache reads every chunk of snap's stores on h, so that its local
// cache holds them all.
func warmCache(ctx context.Context, t testing.TB, h *vmHost, snap *snapshot.Snapshot) {
	t.Helper()
	u, err := h.loader.UnpackSnapshot(ctx, snap, t.TempDir(), snapshot.UnpackOptions{ReadAhead: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for _, s := range u.Stores {
		buf := make([]byte, s.ChunkSize())
		for off := int64(0); off < s.Size(); off += s.ChunkSize() {
			if _, err := s.ReadAt(buf[:min(s.ChunkSize(), s.Size()-off)], off); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func median[T int64 | time.Duration](xs []T) T {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// coldWarmRemote starts the remote SNAPLOADER_BENCH_REMOTE names for
// BenchmarkQEMUColdWarm and returns what it is, the URL every measured
// restore reads through and the URL of the set-up (boot, saves, the
// recording restore, filling the warm cache):
//
//   - serve (the default): `snaploader serve` pinned to serverCPU, both
//     URLs its own;
//   - bucket: a MinIO bucket, MinIO pinned to serverCPU, restores reading
//     it through the bucket model (bucketModel: 50 ms to first byte,
//     100 MB/s per connection), the set-up directly.
func coldWarmRemote(b *testing.B) (kind, restore, setup string) {
	b.Helper()
	switch kind = os.Getenv("SNAPLOADER_BENCH_REMOTE"); kind {
	case "", "serve":
		u := startPinnedServe(b)
		return "serve", u, u
	case "bucket":
		m := testutil.StartMinIO(b)
		if out, err := exec.Command("taskset", "-a", "-p", "-c", serverCPU, strconv.Itoa(m.Pid())).CombinedOutput(); err != nil {
			b.Fatalf("pinning minio to CPU %s: %v\n%s", serverCPU, err, out)
		}
		for _, kv := range bucketEnv(m) {
			k, v, _ := strings.Cut(kv, "=")
			b.Setenv(k, v)
		}
		bucket := m.NewBucket(b)
		url := func(endpoint string) string {
			return fmt.Sprintf("s3://%s/qemu?endpoint=%s&secure=false&region=us-east-1", bucket, endpoint)
		}
		return kind, url(bucketModel(b, m).Addr()), url(m.Endpoint)
	}
	b.Fatalf("SNAPLOADER_BENCH_REMOTE=%q: want serve or bucket", kind)
	return "", "", ""
}

// BenchmarkQEMUColdWarm restores one snapshot of the fill guest (by default
// 512 MiB of RAM, 320 MiB of it filled and read back before every counter
// line) on a warm host, whose local cache holds every chunk, and on cold
// hosts with empty caches fetching from a `snaploader serve` pinned to CPU 1
// (this process, its FUSE server and QEMU run on CPU 0, as on two hosts),
// or with SNAPLOADER_BENCH_REMOTE=bucket from a MinIO bucket (pinned to
// CPU 1) through the bucket model, 50 ms to first byte and 100 MB/s per
// connection (its proxy runs in this process, on CPU 0; see
// coldWarmRemote), each with and without prefetching the working set an earlier restore
// recorded. Runs alternate between the four cases; medians are reported:
// restore to running, to the first new counter, blocking fetches, range
// reads of chunks not yet in, background fetches that yielded to a fault
// first, bytes fetched before the counter (from the remote for cold hosts, opened from
// the local cache for the warm one) and bytes of the chunks the guest
// touched until then, plus the cold/warm ratios.
//
//	go test ./e2e -run XXX -bench QEMUColdWarm -benchtime 5x -timeout 60m -v
//
// Knobs: SNAPLOADER_BENCH_MEM_MIB (512), SNAPLOADER_BENCH_FILL_MIB (320),
// SNAPLOADER_BENCH_CHUNK (524288 bytes), SNAPLOADER_BENCH_REMOTE (serve or
// bucket; serve).
func BenchmarkQEMUColdWarm(b *testing.B) {
	needFillGuest(b)
	testutil.LookPath(b, "taskset")
	if runtime.NumCPU() < 2 {
		b.Skip("needs 2 CPUs: one for serve, one for the restoring host")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	m := fillMachine{
		memory:  envInt(b, "SNAPLOADER_BENCH_MEM_MIB", 512) << 20,
		chunk:   envInt(b, "SNAPLOADER_BENCH_CHUNK", 512<<10),
		fillMiB: int(envInt(b, "SNAPLOADER_BENCH_FILL_MIB", 320)),
	}
	remoteKind, url, setupURL := coldWarmRemote(b)
	cpu, _ := strconv.Atoi(clientCPU)
	defer pinProcess(b, cpu)()

	// Boot and save; restore once on an empty cache to record the working
	// set (until the guest's touches settle), and save again: that
	// snapshot is what every case restores.
	a, closeA := newHostIn(ctx, b, setupURL, b.TempDir(), m.chunk)
	defer closeA()
	bootFill(ctx, b, a, m)
	rec, closeRec := newHostIn(ctx, b, setupURL, b.TempDir(), m.chunk)
	defer closeRec()
	rr := measureRestore(ctx, b, rec, rec.get(ctx, b), b.TempDir(), snapshot.UnpackOptions{})
	mem := rr.vm.Stores()[vmm.MemoryFile]
	for deadline := time.Now().Add(2 * time.Minute); !mem.WorkingSetEnded(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			b.Fatal("the recording restore's working set did not settle")
		}
	}
	last := saveAfterCounter(ctx, b, rec, rr)
	rr.vm.Close()
	b.Logf("recording restore: working set of %d memory chunks (%d touched by the save)", len(mem.Touched()), len(mem.Accessed()))

	warmDir := b.TempDir()
	warm, closeWarm := newHostIn(ctx, b, setupURL, warmDir, m.chunk)
	snapWarm := warm.get(ctx, b)
	warmCache(ctx, b, warm, snapWarm)
	if setupURL != url {
		// The warm host's cache is filled; it restores with the remote
		// the cold hosts have.
		closeWarm()
		warm, closeWarm = newHostIn(ctx, b, url, warmDir, m.chunk)
		snapWarm = warm.get(ctx, b)
	}
	defer func() { closeWarm() }()

	type kase struct {
		name      string
		cold, ws  bool
		toRunning []time.Duration
		toCounter []time.Duration
		blocking  []int64
		ranges    []int64
		yields    []int64
		fetched   []int64
		touched   []int64
	}
	cases := []*kase{{name: "warm", ws: false}, {name: "cold", cold: true}, {name: "warm+ws", ws: true}, {name: "cold+ws", cold: true, ws: true}}
	one := func(k *kase) {
		opts := snapshot.UnpackOptions{PrefetchWorkingSet: k.ws}
		h, snap, closeH := warm, snapWarm, func() {}
		cacheDir := ""
		if k.cold {
			cacheDir = filepath.Join(b.TempDir(), "cache")
			h, closeH = newHostIn(ctx, b, url, cacheDir, m.chunk)
			snap = h.get(ctx, b)
		}
		dir, err := os.MkdirTemp(b.TempDir(), "vm")
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		r := measureRestore(ctx, b, h, snap, dir, opts)
		b.StopTimer()
		if r.first != last+1 && r.first != last+2 {
			b.Errorf("%s: first counter %d, want %d (or %d)", k.name, r.first, last+1, last+2)
		}
		r.vm.Close()
		checkFillSerial(b, k.name+" restore", readFile(b, filepath.Join(dir, "serial.log")), 0)
		closeH()
		os.RemoveAll(dir)
		if cacheDir != "" {
			os.RemoveAll(cacheDir)
		}
		fetched := r.remote
		if !k.cold {
			fetched = r.opened
		}
		k.toRunning = append(k.toRunning, r.toRunning)
		k.toCounter = append(k.toCounter, r.toCounter)
		k.blocking = append(k.blocking, r.blocking)
		k.ranges = append(k.ranges, r.ranges)
		k.yields = append(k.yields, r.yields)
		k.fetched = append(k.fetched, fetched)
		k.touched = append(k.touched, r.touched)
	}
	// Warm-up: one untimed run of each case.
	b.StopTimer()
	for _, k := range cases {
		one(k)
		k.toRunning, k.toCounter, k.blocking, k.ranges, k.yields, k.fetched, k.touched = nil, nil, nil, nil, nil, nil, nil
	}
	b.ResetTimer()
	b.StopTimer()
	for i := 0; i < b.N; i++ {
		for j := range cases {
			one(cases[(i+j)%len(cases)]) // rotate which case goes first
		}
	}
	const mb = 1 << 20
	var table strings.Builder
	fmt.Fprintf(&table, "\n| host | restore to running | first counter | blocking fetches | range reads | prefetch yields | fetched before counter | touched before counter | fetched/touched |\n|---|---|---|---|---|---|---|---|---|\n")
	med := map[string]*kase{}
	for _, k := range cases {
		med[k.name] = k
		f, tch := median(k.fetched), median(k.touched)
		fmt.Fprintf(&table, "| %s | %v | %v | %d | %d | %d | %.1f MiB | %.1f MiB | %.2f |\n", k.name, median(k.toRunning).Round(time.Millisecond),
			median(k.toCounter).Round(time.Millisecond), median(k.blocking), median(k.ranges), median(k.yields), float64(f)/mb, float64(tch)/mb, float64(f)/float64(max(tch, 1)))
		b.ReportMetric(float64(median(k.toCounter).Milliseconds()), k.name+"-ms-to-counter")
		b.ReportMetric(float64(median(k.toRunning).Milliseconds()), k.name+"-ms-to-running")
		b.ReportMetric(float64(median(k.blocking)), k.name+"-blocking-fetches")
		b.ReportMetric(float64(f)/mb, k.name+"-MiB-fetched")
		b.ReportMetric(float64(tch)/mb, k.name+"-MiB-touched")
	}
	ratio := func(cold, warm string) float64 {
		return float64(median(med[cold].toCounter)) / float64(median(med[warm].toCounter))
	}
	// Per-iteration ratios (runs of one iteration are adjacent in time).
	var perIter []int64
	for i := range med["cold+ws"].toCounter {
		perIter = append(perIter, int64(1000*float64(med["cold+ws"].toCounter[i])/float64(med["warm+ws"].toCounter[i])))
	}
	b.Logf("cold/warm first counter: without working set %.2fx, with %.2fx (vs warm without: %.2fx; median of per-iteration ratios %.2fx); cold+ws fetched/touched %.2f; %d runs per case, %s RAM, %d MiB filled, %d-byte chunks, remote %s",
		ratio("cold", "warm"), ratio("cold+ws", "warm+ws"), ratio("cold+ws", "warm"), float64(median(perIter))/1000,
		float64(median(med["cold+ws"].fetched))/float64(max(median(med["cold+ws"].touched), 1)), b.N, strconv.FormatInt(m.memory>>20, 10)+" MiB", m.fillMiB, m.chunk, remoteKind)
	b.ReportMetric(ratio("cold", "warm"), "cold/warm-counter")
	b.ReportMetric(ratio("cold+ws", "warm+ws"), "cold+ws/warm+ws-counter")
	b.ReportMetric(float64(median(med["cold+ws"].fetched))/float64(max(median(med["cold+ws"].touched), 1)), "cold+ws-fetched/touched")
	b.Log(table.String())
}
