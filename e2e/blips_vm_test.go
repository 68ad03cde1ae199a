package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testguest"
	"github.com/snaploader/snaploader/internal/toxic"
)

// blipFor is how long each blip of the blip tests lasts: as long as a
// remote's restart or a reset storm in a fleet (5 s), so that fetches and
// faults wait on it through several retries and breaker periods.
const blipFor = 5 * time.Second

// chunkFetchesSample matches every sample of the chunk fetch counter.
var chunkFetchesSample = regexp.MustCompile(`(?m)^snaploader_chunk_fetches_total\{[^}]*\} ([0-9.e+]+)$`)

// scrape returns the text of http://addr/metrics ("" while it does not
// answer).
func scrape(addr string) string {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// waitChunkFetched waits until the process serving metrics on addr has
// fetched at least one chunk: its lazy restore is under way. exited, when
// it receives, means the process ended first (nil: not watched).
func waitChunkFetched(ctx context.Context, t *testing.T, addr string, exited <-chan error, what func() string) {
	t.Helper()
	for {
		total := 0.0
		for _, m := range chunkFetchesSample.FindAllStringSubmatch(scrape(addr), -1) {
			v, _ := strconv.ParseFloat(m[1], 64)
			total += v
		}
		if total > 0 {
			return
		}
		select {
		case err := <-exited:
			t.Fatalf("exited (%v) before fetching a chunk: %s", err, what())
		case <-ctx.Done():
			t.Fatalf("no chunk fetched: %v: %s", ctx.Err(), what())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// A lazy `snaploader pager` restore serving a Firecracker-style VMM
// stand-in through a slow link to its serve, disturbed in the middle for a
// few seconds: the serve killed and restarted, its connections reset, or
// the link stalled. The VMM's faults wait out the blip (they are never
// failed while --remote-retry-for holds): it stays alive and reads every
// page of guest memory equal to the snapshot.
func TestPagerRidesOutBlips(t *testing.T) {
	stub := vmmStub(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(dir, "serve"))
	mem := filepath.Join(dir, "memory")
	writeVM(t, mem, 6<<20, 41)
	state := filepath.Join(dir, "vmstate")
	if err := os.WriteFile(state, []byte("device state"), 0o644); err != nil {
		t.Fatal(err)
	}
	key := []string{"--instance", "fc", "--platform", "vmm=firecracker", "--config-hash", "blips", "--ref", "main"}
	run(ctx, append([]string{"save", "--cache-dir", filepath.Join(dir, "a"), "--chunk-size", "262144", "--remote", srv.url(),
		"--chunked", "memory=" + mem, "--file", "vmstate=" + state}, key...)...).must(t, "save through serve")

	proxy := toxic.Start(t, srv.addr)
	// About 2 MB/s: fetching the memory takes about 3 s at least, so the
	// blip, started after the first chunk arrived, lands in the middle.
	proxy.Add(t, "bandwidth", "downstream", `"rate":2000`)
	for _, tc := range blipKinds(srv, proxy) {
		t.Run(tc.name, func(t *testing.T) {
			p := startPagerVM(ctx, t, stub, mem, filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")), proxy, "30s", key)
			end := tc.start(t)
			select {
			case err := <-p.vmDone:
				end()
				t.Fatalf("the VMM stand-in ended (%v) as the blip began: the blip did not land mid-restore; stdout %s", err, p.vout.String())
			case <-time.After(blipFor):
			}
			end()
			if err := <-p.vmDone; err != nil {
				t.Fatalf("VMM stand-in across the blip: %v\nstdout %s\nstderr %s\npager stderr %s", err, p.vout.String(), p.verr.String(), p.perr.String())
			}
			var res struct {
				Result     string `json:"result"`
				Pages      int    `json:"pages"`
				Mismatches int    `json:"mismatches"`
			}
			sc := bufio.NewScanner(bytes.NewReader(p.vout.Bytes()))
			for sc.Scan() {
				if strings.Contains(sc.Text(), `"result"`) {
					json.Unmarshal(sc.Bytes(), &res)
				}
			}
			if res.Result != "ok" || res.Mismatches != 0 || res.Pages != (6<<20)/4096 {
				t.Fatalf("VMM stand-in saw %+v, want every page equal to the snapshot", res)
			}
			if err := p.pager.Wait(); err != nil {
				t.Fatalf("pager: %v; stderr: %s", err, p.perr.String())
			}
			var rep pagerOutput
			if err := json.Unmarshal(p.pout.Bytes(), &rep); err != nil {
				t.Fatalf("pager output %q: %v", p.pout.String(), err)
			}
			if rep.Source != "remote" || rep.ChunkFetches == 0 {
				t.Errorf("pager report %+v: want a remote snapshot fetched chunk by chunk", rep)
			}
		})
	}

	// Past --remote-retry-for the fault fails: the pager says which chunk,
	// which remotes it tried and why, and ends the VMM (a guest must not
	// run on with a page it cannot have).
	t.Run("remote gone past the bound", func(t *testing.T) {
		p := startPagerVM(ctx, t, stub, mem, filepath.Join(dir, "gone"), proxy, "2s", key)
		srv.stop()
		if err := <-p.vmDone; err == nil {
			t.Fatalf("the VMM stand-in completed with its remote gone: stdout %s", p.vout.String())
		}
		err := p.pager.Wait()
		msg := p.perr.String()
		if err == nil {
			t.Fatalf("pager succeeded with its remote gone; stderr %s", msg)
		}
		for _, want := range []string{"chunk at offset", `chunked file "memory"`, "grpc://" + proxy.Addr(), "within 2s", "failed attempts", "last error"} {
			if !strings.Contains(msg, want) {
				t.Errorf("pager's error lacks %q:\n%s", want, msg)
			}
		}
	})
}

// pagerVM is a `snaploader pager` serving a VMM stand-in, both running.
type pagerVM struct {
	pager, vm  *exec.Cmd
	pout       bytes.Buffer
	perr       *syncLog
	vout, verr bytes.Buffer
	vmDone     chan error
}

// startPagerVM starts a pager restoring key lazily into dir through proxy
// (riding out failures for retryFor) and the VMM stand-in checking memory
// against mem, and returns once the pager has fetched a chunk for it.
func startPagerVM(ctx context.Context, t *testing.T, stub, mem, dir string, proxy *toxic.Proxy, retryFor string, key []string) *pagerVM {
	t.Helper()
	sock, metrics := dir+".sock", fmt.Sprintf("127.0.0.1:%d", freePort(t))
	p := &pagerVM{perr: &syncLog{}, vmDone: make(chan error, 1)}
	p.pager = exec.Command(binary, append([]string{"pager", "--json", "--cache-dir", dir + "-cache", "--dir", dir, "--socket", sock,
		"--remote", "grpc://" + proxy.Addr(), "--remote-retry-for", retryFor, "--metrics-addr", metrics}, key...)...)
	p.pager.Stdout = &p.pout
	p.pager.Stderr = writerFunc(func(b []byte) (int, error) { return p.perr.WriteString(string(b)) })
	if err := p.pager.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.pager.Process.Kill() })
	waitPath(ctx, t, sock, p.perr.String)

	p.vm = exec.Command(stub, "-sock", sock, "-expect", mem, "-regions", "2")
	p.vm.Env = append(os.Environ(), "GODEBUG=asyncpreemptoff=1")
	p.vm.Stdout, p.vm.Stderr = &p.vout, &p.verr
	if err := p.vm.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.vm.Process.Kill() })
	go func() { p.vmDone <- p.vm.Wait() }()
	waitChunkFetched(ctx, t, metrics, p.vmDone, p.perr.String)
	return p
}

// writerFunc is an io.Writer.
type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

// waitPath waits until path exists (a socket a process listens on).
func waitPath(ctx context.Context, t *testing.T, path string, what func() string) {
	t.Helper()
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s did not appear: %s", path, what())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// A QEMU guest restored lazily by `snaploader qemu restore` (memory
// through FUSE, disk through NBD) through a slow link to its serve,
// disturbed in the middle for a few seconds: the serve killed and
// restarted, its connections reset, or the link stalled. The guest's
// memory faults and disk reads wait out the blip: it stays alive and
// keeps counting, without a gap, after it.
func TestQEMURestoreRidesOutBlips(t *testing.T) {
	tg := needGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(dir, "serve"))
	disk := filepath.Join(dir, "disk.img")
	if err := testguest.MakeTestDisk(ctx, disk, vmDisk); err != nil {
		t.Fatal(err)
	}
	key := []string{"--instance", "vms", "--platform", "arch=x86_64", "--config-hash", "blips", "--ref", "main"}
	serialA := filepath.Join(dir, "serial-a.log")
	_, stopA := startCLI(t, append([]string{"qemu", "boot", "--cache-dir", filepath.Join(dir, "cache-a"), "--dir", filepath.Join(dir, "vm-a"),
		"--serial-log", serialA, "--memory-bytes", strconv.Itoa(vmMemory), "--kernel", tg.Kernel, "--initrd", tg.Initrd, "--append", tg.Append,
		"--disk", "root=" + disk, "--chunk-size", strconv.Itoa(vmChunkSize), "--save-on-exit", "--remote", srv.url()}, key...)...)
	waitSerial(ctx, t, serialA, 3)
	if out := stopA(); !strings.Contains(out, "remote: true") {
		t.Fatalf("qemu boot did not save remotely:\n%s", out)
	}
	before := testguest.ParseCounters(readFile(t, serialA))
	last := before[len(before)-1]

	proxy := toxic.Start(t, srv.addr)
	// About 8 MB/s: the guest's first faults and the read-ahead take
	// seconds, so the blip, started after the first chunk arrived, lands
	// in the middle of the restore.
	proxy.Add(t, "bandwidth", "downstream", `"rate":8000`)
	for _, tc := range blipKinds(srv, proxy) {
		t.Run(tc.name, func(t *testing.T) {
			sub := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
			serial, metrics := sub+"-serial.log", fmt.Sprintf("127.0.0.1:%d", freePort(t))
			cmd := exec.Command(binary, append([]string{"qemu", "restore", "--cache-dir", sub + "-cache", "--dir", sub, "--serial-log", serial,
				"--read-policy", "newest", "--remote", "grpc://" + proxy.Addr(), "--remote-retry-for", "30s", "--metrics-addr", metrics}, key...)...)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Process.Kill()
			waitChunkFetched(ctx, t, metrics, nil, func() string { return "qemu restore" })
			end := tc.start(t)
			time.Sleep(blipFor)
			end()
			// Alive after the blip: it counts on from where it was saved,
			// a few more lines than it had printed when the blip ended.
			now := testguest.ParseCounters(readFileOrEmpty(serial))
			upTo := last
			if len(now) > 0 {
				upTo = now[len(now)-1]
			}
			waitSerial(ctx, t, serial, upTo+2)
			// Its metrics name the remote, and the failures it rode out.
			remote := `\{remote="` + regexp.QuoteMeta("grpc://"+proxy.Addr()) + `"\}`
			text := scrape(metrics)
			if v := metricValue(t, text, `snaploader_remote_blob_bytes_total`+remote); v <= 0 {
				t.Errorf("remote blob bytes %v, want > 0:\n%s", v, text)
			}
			if v := metricValue(t, text, `snaploader_remote_failures_total`+remote); tc.fails && v <= 0 {
				t.Errorf("remote failures %v, want the blip's failed calls counted:\n%s", v, text)
			}
			// Interrupted without --save-on-exit, it stops the guest and
			// says so.
			cmd.Process.Signal(os.Interrupt)
			cmd.Wait()
			if !strings.Contains(out.String(), "guest stopped") {
				t.Errorf("qemu restore did not stop the guest on an interrupt:\n%s", out.String())
			}
			all := testguest.ParseCounters(append(readFile(t, serialA), readFile(t, serial)...))
			contiguous(t, "serial across the restore and the blip", all)
			if all[len(all)-1] < last+2 {
				t.Fatalf("restored guest counted to %d, want past %d", all[len(all)-1], last+1)
			}
		})
	}
}

// readFileOrEmpty is the file's content, or nothing while it is missing.
func readFileOrEmpty(path string) []byte {
	b, _ := os.ReadFile(path)
	return b
}
