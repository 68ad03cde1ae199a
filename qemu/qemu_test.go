package qemu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testguest"
	"github.com/snaploader/snaploader/internal/testutil"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const testMemory = 128 * mib

var (
	testGuestOnce sync.Once
	testGuestVal  *testguest.TestGuest
	testGuestErr  error
)

// needTestGuest returns the test guest, building it once per test binary
// (and once per machine thanks to the cache directory).
func needTestGuest(t testing.TB) *testguest.TestGuest {
	t.Helper()
	testutil.LookPath(t, "qemu-system-x86_64")
	testGuestOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		testGuestVal, testGuestErr = testguest.BuildTestGuest(ctx, "")
	})
	if status.Code(testGuestErr) == codes.Unavailable {
		testutil.Unavailable(t, "test guest kernel cannot be obtained: "+testGuestErr.Error())
	}
	if testGuestErr != nil {
		t.Fatal(testGuestErr)
	}
	return testGuestVal
}

// guestConfig returns a Config booting the test guest; callers add memory,
// disks, serial log and sockets.
func guestConfig(tg *testguest.TestGuest) Config {
	return Config{Kernel: tg.Kernel, Initrd: tg.Initrd, Append: tg.Append}
}

func TestConfigArgs(t *testing.T) {
	base := Config{SerialLog: "/s.log", QMPSocket: "/q.sock", Kernel: "/k"}
	tests := []struct {
		name    string
		mod     func(*Config)
		want    []string // substrings that must appear as whole arguments
		wantErr codes.Code
	}{
		{"defaults", func(*Config) {}, []string{"tcg", "256M", "q35"}, codes.OK},
		{"memory file shared", func(c *Config) { c.MemPath, c.MemShare, c.MemoryBytes = "/m", true, 128*mib },
			[]string{"q35,memory-backend=mem", "memory-backend-file,id=mem,size=134217728,mem-path=/m,share=on", "128M"}, codes.OK},
		{"memory file private", func(c *Config) { c.MemPath = "/a,b" },
			[]string{"memory-backend-file,id=mem,size=268435456,mem-path=/a,,b,share=off"}, codes.OK},
		{"nbd disk", func(c *Config) { c.Disks = []Disk{{Path: "nbd:unix:/x.sock:exportname=root"}} },
			[]string{"file=nbd:unix:/x.sock:exportname=root,format=raw,if=virtio,id=disk0"}, codes.OK},
		{"incoming", func(c *Config) { c.Incoming = true }, []string{"defer"}, codes.OK},
		{"kvm", func(c *Config) { c.Accel = "kvm" }, []string{"kvm", "host"}, codes.OK},
		{"bad accel", func(c *Config) { c.Accel = "hvf" }, nil, codes.InvalidArgument},
		{"odd memory", func(c *Config) { c.MemoryBytes = mib + 1 }, nil, codes.InvalidArgument},
		{"no sockets", func(c *Config) { c.QMPSocket = "" }, nil, codes.InvalidArgument},
		{"empty disk", func(c *Config) { c.Disks = []Disk{{}} }, nil, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := base
			tt.mod(&cfg)
			args, err := cfg.Args()
			if status.Code(err) != tt.wantErr {
				t.Fatalf("Args() error = %v, want code %v", err, tt.wantErr)
			}
			have := map[string]bool{}
			for _, a := range args {
				have[a] = true
			}
			for _, w := range tt.want {
				if !have[w] {
					t.Errorf("Args() = %q lacks %q", args, w)
				}
			}
		})
	}
}

func TestQMPErrorMapping(t *testing.T) {
	testutil.LookPath(t, "qemu-system-x86_64")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// No kernel: the firmware finds nothing to boot, which is fine for QMP.
	g, err := Start(ctx, Config{MemoryBytes: 64 * mib, ExtraArgs: []string{"-S"}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()

	tests := []struct {
		cmd      string
		args     any
		wantCode codes.Code
		class    string
	}{
		{"query-status", nil, codes.OK, ""},
		{"no-such-command", nil, codes.Unimplemented, "CommandNotFound"},
		{"migrate", nil, codes.InvalidArgument, "GenericError"},
		{"query-status", map[string]any{"bogus": 1}, codes.InvalidArgument, "GenericError"},
		{"device_del", map[string]any{"id": "nothere"}, codes.NotFound, "DeviceNotFound"},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s/%v", tt.cmd, tt.args), func(t *testing.T) {
			_, err := g.QMP.Execute(ctx, tt.cmd, tt.args)
			var wrapped error
			if err != nil {
				wrapped = fmt.Errorf("wrapped: %w", err)
			}
			if got := status.Code(wrapped); got != tt.wantCode {
				t.Fatalf("Execute(%s) error = %v, code %v, want %v", tt.cmd, err, got, tt.wantCode)
			}
			var qe *QMPError
			if tt.class != "" && (!errors.As(err, &qe) || qe.Class != tt.class || qe.Command != tt.cmd) {
				t.Fatalf("Execute(%s) error = %#v, want QMPError class %s", tt.cmd, err, tt.class)
			}
		})
	}

	// Typed helpers and events on the same connection.
	st, err := g.QMP.QueryStatus(ctx)
	if err != nil || st.Status != "prelaunch" || st.Running {
		t.Fatalf("QueryStatus = %+v, %v; want prelaunch (started with -S)", st, err)
	}
	if err := g.QMP.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := g.QMP.WaitEvent(ctx, "RESUME"); err != nil {
		t.Fatal(err)
	}
	if err := g.QMP.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if ev, err := g.QMP.WaitEvent(ctx, "STOP"); err != nil || ev.Timestamp.IsZero() {
		t.Fatalf("WaitEvent(STOP) = %+v, %v", ev, err)
	}
	if st, err := g.QMP.WaitStatus(ctx, "paused"); err != nil || st.Running {
		t.Fatalf("WaitStatus(paused) = %+v, %v", st, err)
	}
	mi, err := g.QMP.QueryMigrate(ctx)
	if err != nil || mi.Status != "" && mi.Status != "none" {
		t.Fatalf("QueryMigrate = %+v, %v; want no migration", mi, err)
	}

	// An ended context is reported as such, not as a QEMU error.
	done, cancelDone := context.WithCancel(ctx)
	cancelDone()
	if _, err := g.QMP.Execute(done, "query-status", nil); status.Code(err) != codes.Canceled {
		t.Errorf("Execute with canceled ctx: %v, want Canceled", err)
	}

	if err := g.Quit(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := g.QMP.Execute(ctx, "query-status", nil); status.Code(err) != codes.Unavailable {
		t.Errorf("Execute after quit: %v, want Unavailable", err)
	}
}

func TestStartFailureReportsStderr(t *testing.T) {
	testutil.LookPath(t, "qemu-system-x86_64")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := Start(ctx, Config{MemoryBytes: 64 * mib, Kernel: filepath.Join(t.TempDir(), "missing-kernel")})
	if status.Code(err) != codes.Unavailable || !regexp.MustCompile(`missing-kernel`).MatchString(err.Error()) {
		t.Fatalf("Start with a missing kernel: %v; want Unavailable naming the kernel", err)
	}
	if _, err := Restore(ctx, Config{}, filepath.Join(t.TempDir(), "nostate")); status.Code(err) != codes.NotFound {
		t.Fatalf("Restore without state file: %v; want NotFound", err)
	}
}

func TestParseCountersAndConsole(t *testing.T) {
	out := "noise\r\nCOUNTER 1\r\nCOUNTER 2\r\nxCOUNTER 9\r\nCOUNTER 3\r\nCOUNTER 4"
	if got, want := fmt.Sprint(testguest.ParseCounters([]byte(out))), "[1 2 3]"; got != want {
		t.Fatalf("ParseCounters = %s, want %s (partial and embedded lines excluded)", got, want)
	}
	p := filepath.Join(t.TempDir(), "serial.log")
	if err := os.WriteFile(p, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	c := NewConsole(p)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, want := range []string{"1", "2", "3"} {
		m, err := c.WaitFor(ctx, testguest.CounterPattern())
		if err != nil || m[1] != want {
			t.Fatalf("WaitFor = %q, %v; want COUNTER %s", m, err, want)
		}
	}
	go func() {
		time.Sleep(100 * time.Millisecond)
		f, _ := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
		f.WriteString("\r\nCOUNTER 5\r\n")
		f.Close()
	}()
	m, err := c.WaitFor(ctx, testguest.CounterPattern())
	if err != nil || m[1] != "4" {
		t.Fatalf("WaitFor after append = %q, %v; want COUNTER 4 completed", m, err)
	}
	short, cancelShort := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancelShort()
	if _, err := c.WaitFor(short, regexp.MustCompile("never")); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("WaitFor(never) = %v; want DeadlineExceeded", err)
	}
}

// copySparse copies a file keeping its holes.
func copySparse(t testing.TB, src, dst string) {
	t.Helper()
	if b, err := exec.Command("cp", "--sparse=always", src, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp %s %s: %v: %s", src, dst, err, b)
	}
}

func fileHash(t testing.TB, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func allocated(t testing.TB, path string) (size, alloc int64) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size(), fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// waitCounter waits on c until a COUNTER line with a number >= min appears
// and returns that number.
func waitCounter(ctx context.Context, t testing.TB, g *Guest, min int) int {
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

// checkContiguous fails unless nums is exactly 1..len(nums).
func checkContiguous(t testing.TB, what string, nums []int) {
	t.Helper()
	for i, n := range nums {
		if n != i+1 {
			t.Fatalf("%s: entry %d is %d, want %d (gap or restart): %v", what, i, n, i+1, nums)
		}
	}
}

type flowTimes struct {
	boot, snapshot, restore time.Duration
	memSize, memAlloc       int64
	stateBytes              int64
}

// bootAndSnapshot boots the test guest with its RAM in dir/mem and its disk
// in dir/disk.img, waits for COUNTER >= 3, snapshots to dir/state.bin and
// returns the last counter printed before the snapshot.
func bootAndSnapshot(ctx context.Context, t testing.TB, tg *testguest.TestGuest, dir string) (int, flowTimes) {
	var ft flowTimes
	disk := filepath.Join(dir, "disk.img")
	if err := testguest.MakeTestDisk(ctx, disk, 32*mib); err != nil {
		if status.Code(err) == codes.Unavailable {
			testutil.Unavailable(t, err.Error())
		}
		t.Fatal(err)
	}
	cfg := guestConfig(tg)
	cfg.MemoryBytes = testMemory
	cfg.MemPath, cfg.MemShare = filepath.Join(dir, "mem"), true
	cfg.Disks = []Disk{{Path: disk}}
	cfg.SerialLog = filepath.Join(dir, "serial-boot.log")
	cfg.QMPSocket = filepath.Join(dir, "qmp-boot.sock")
	start := time.Now()
	g, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	waitCounter(ctx, t, g, 1)
	ft.boot = time.Since(start)
	waitCounter(ctx, t, g, 3)
	st, err := g.Snapshot(ctx, filepath.Join(dir, "state.bin"))
	if err != nil {
		t.Fatal(err)
	}
	ft.snapshot, ft.stateBytes = st.Total, st.StateBytes
	ft.memSize, ft.memAlloc = allocated(t, cfg.MemPath)
	select {
	case <-g.Exited():
	default:
		t.Fatal("QEMU still runs after Snapshot")
	}
	out, err := os.ReadFile(cfg.SerialLog)
	if err != nil {
		t.Fatal(err)
	}
	before := testguest.ParseCounters(out)
	checkContiguous(t, "serial before snapshot", before)
	if len(before) < 3 {
		t.Fatalf("serial before snapshot has %v, want >= 3 counters", before)
	}
	return before[len(before)-1], ft
}

func TestSnapshotRestore(t *testing.T) {
	tg := needTestGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	last, ft := bootAndSnapshot(ctx, t, tg, dir)
	t.Logf("boot to COUNTER 1: %v; snapshot: %v; state file %d bytes; memory file %d MiB, %d MiB allocated",
		ft.boot, ft.snapshot, ft.stateBytes, ft.memSize/mib, ft.memAlloc/mib)
	if ft.memSize != testMemory || ft.memAlloc == 0 || ft.memAlloc >= ft.memSize {
		t.Errorf("memory file: size %d, allocated %d; want size %d, sparse and non-empty", ft.memSize, ft.memAlloc, int64(testMemory))
	}
	if ft.stateBytes == 0 || ft.stateBytes > 8*mib {
		t.Errorf("state file is %d bytes; want device state only (RAM stays in the memory file)", ft.stateBytes)
	}
	bootSerial, _ := os.ReadFile(filepath.Join(dir, "serial-boot.log"))

	t.Run("broken", func(t *testing.T) { checkRestoreFailures(ctx, t, tg, dir) })

	modes := []struct {
		name  string
		share bool // memory file mapped shared (writes return) or private
		nbd   bool // disk served over NBD by qemu-nbd rather than a file
	}{
		{"file-disk/share=on", true, false},
		{"file-disk/share=off", false, false},
		{"nbd-disk/share=on", true, true},
	}
	for _, mode := range modes {
		share := mode.share
		t.Run(mode.name, func(t *testing.T) {
			// Restore only from copies: the snapshot is state.bin + mem + disk.
			rdir := t.TempDir()
			mem, disk := filepath.Join(rdir, "mem"), filepath.Join(rdir, "disk.img")
			copySparse(t, filepath.Join(dir, "mem"), mem)
			copySparse(t, filepath.Join(dir, "disk.img"), disk)
			memBefore := fileHash(t, mem)

			cfg := guestConfig(tg)
			cfg.MemoryBytes = testMemory
			cfg.MemPath, cfg.MemShare = mem, share
			cfg.Disks = []Disk{{Path: disk}}
			stopNBD := func() {}
			if mode.nbd {
				cfg.Disks[0].Path, stopNBD = serveNBD(t, disk, "root")
				defer stopNBD()
			}
			cfg.SerialLog = filepath.Join(rdir, "serial.log")
			cfg.QMPSocket = filepath.Join(rdir, "qmp.sock")
			start := time.Now()
			g, err := Restore(ctx, cfg, filepath.Join(dir, "state.bin"))
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			restored := time.Since(start)
			first := waitCounter(ctx, t, g, 1)
			firstAt := time.Since(start)
			final := waitCounter(ctx, t, g, last+4)
			t.Logf("restore to running: %v; to first COUNTER (%d): %v", restored, first, firstAt)
			if first > last+2 {
				t.Errorf("first counter after restore is %d, want %d (or %d if a line was split)", first, last+1, last+2)
			}
			// Settle: stop the vCPUs, then quit (QEMU flushes the disk).
			if err := g.QMP.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			if err := g.Quit(ctx); err != nil {
				t.Fatal(err)
			}

			stopNBD() // flushes the served disk
			restoredSerial, err := os.ReadFile(cfg.SerialLog)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(restoredSerial, []byte("GUEST READY")) {
				t.Errorf("restored guest booted again:\n%s", restoredSerial)
			}
			// The serial byte stream continues where it stopped: both logs
			// together count 1..M without gap or restart.
			all := testguest.ParseCounters(append(append([]byte{}, bootSerial...), restoredSerial...))
			checkContiguous(t, "serial across snapshot", all)
			m := all[len(all)-1]
			if m < final {
				t.Fatalf("last counter %d < %d seen", m, final)
			}

			log, err := testguest.ReadTestLog(ctx, disk)
			if err != nil {
				t.Fatal(err)
			}
			checkContiguous(t, "disk log", log)
			if k := len(log); k < m-1 || k > m {
				t.Errorf("disk log ends at %d, want %d or %d (last printed)", k, m-1, m)
			}
			memAfter := fileHash(t, mem)
			if share && memAfter == memBefore {
				t.Errorf("share=on: memory file unchanged after the guest ran")
			}
			if !share && memAfter != memBefore {
				t.Errorf("share=off: memory file was modified")
			}
		})
	}
}

// serveNBD exports the raw image at path over NBD on a unix socket with
// qemu-nbd and returns the QEMU block URL and a stop function (idempotent).
func serveNBD(t testing.TB, path, export string) (string, func()) {
	t.Helper()
	bin := testutil.LookPath(t, "qemu-nbd")
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	cmd := exec.Command(bin, "--format=raw", "--persistent", "--export-name="+export, "--socket="+sock, path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting qemu-nbd: %v", err)
	}
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i == 500 {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("qemu-nbd created no socket %s: %s", sock, stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		})
	}
	return "nbd:unix:" + sock + ":exportname=" + export, stop
}

// checkRestoreFailures restores the snapshot in dir with broken inputs and
// expects an error and no QEMU left running.
func checkRestoreFailures(ctx context.Context, t *testing.T, tg *testguest.TestGuest, dir string) {
	state, err := os.ReadFile(filepath.Join(dir, "state.bin"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		state  []byte
		memory int64
	}{
		{"truncated state", state[:len(state)/2], testMemory},
		{"garbage state", bytes.Repeat([]byte{0x5a}, 4096), testMemory},
		{"memory size differs", state, testMemory / 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rdir := t.TempDir()
			stateFile := filepath.Join(rdir, "state.bin")
			if err := os.WriteFile(stateFile, tt.state, 0o644); err != nil {
				t.Fatal(err)
			}
			disk := filepath.Join(rdir, "disk.img")
			copySparse(t, filepath.Join(dir, "disk.img"), disk)
			cfg := guestConfig(tg)
			cfg.MemoryBytes = tt.memory
			cfg.MemPath, cfg.MemShare = filepath.Join(rdir, "mem"), false
			cfg.Disks = []Disk{{Path: disk}}
			cfg.SerialLog = filepath.Join(rdir, "serial.log")
			cfg.QMPSocket = filepath.Join(rdir, "qmp.sock")
			g, err := Restore(ctx, cfg, stateFile)
			if err == nil {
				g.Close()
				t.Fatal("Restore succeeded, want an error")
			}
			if status.Code(err) != codes.Internal {
				t.Errorf("error %v: code %v, want Internal", err, status.Code(err))
			}
			if !regexp.MustCompile(regexp.QuoteMeta(stateFile)).MatchString(err.Error()) {
				t.Errorf("error %q does not name the state file", err)
			}
			t.Logf("error: %v", err)
		})
	}
}

func TestBuildTestGuestIsCached(t *testing.T) {
	tg := needTestGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	again, err := testguest.BuildTestGuest(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if *again != *tg {
		t.Fatalf("rebuild = %+v, want cached %+v", again, tg)
	}
	for _, p := range []string{tg.Kernel, tg.Initrd} {
		if fi, err := os.Stat(p); err != nil || fi.Size() == 0 {
			t.Fatalf("%s: %v", p, err)
		}
	}
	// The initramfs is a newc archive holding init and the modules.
	b, err := os.ReadFile(tg.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"070701", "init", "bin/busybox", "lib/modules/virtio_blk.ko"} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("initramfs lacks %q", want)
		}
	}
	t.Logf("cached lookup took %v; kernel package %s", time.Since(start), tg.KernelPackage)
}

// BenchmarkBootSnapshotRestore measures one full cycle per iteration: boot
// to the first counter, snapshot, restore to running.
func BenchmarkBootSnapshotRestore(b *testing.B) {
	tg := needTestGuest(b)
	ctx := context.Background()
	var boot, snap, restore time.Duration
	var alloc int64
	for i := 0; i < b.N; i++ {
		dir := b.TempDir()
		_, ft := bootAndSnapshot(ctx, b, tg, dir)
		cfg := guestConfig(tg)
		cfg.MemoryBytes = testMemory
		cfg.MemPath, cfg.MemShare = filepath.Join(dir, "mem"), true
		cfg.Disks = []Disk{{Path: filepath.Join(dir, "disk.img")}}
		cfg.SerialLog = filepath.Join(dir, "serial.log")
		cfg.QMPSocket = filepath.Join(dir, "qmp.sock")
		start := time.Now()
		g, err := Restore(ctx, cfg, filepath.Join(dir, "state.bin"))
		if err != nil {
			b.Fatal(err)
		}
		restore += time.Since(start)
		g.Close()
		boot += ft.boot
		snap += ft.snapshot
		alloc += ft.memAlloc
	}
	n := float64(b.N)
	b.ReportMetric(float64(boot.Milliseconds())/n, "boot-ms")
	b.ReportMetric(float64(snap.Milliseconds())/n, "snapshot-ms")
	b.ReportMetric(float64(restore.Milliseconds())/n, "restore-ms")
	b.ReportMetric(float64(alloc)/n/mib, "mem-alloc-MiB")
}
