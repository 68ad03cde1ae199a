package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

// TestPagerServesFirecrackerStyleVMM: a snapshot saved on host A is served
// by `snaploader pager` on host B (empty cache, remote = serve) to a
// separate VMM process that does exactly what Firecracker does (anonymous
// memory, userfaultfd, regions + fd over the socket) and then reads every
// page of guest memory.
func TestPagerServesFirecrackerStyleVMM(t *testing.T) {
	stub := vmmStub(t)

	srv := startServe(t, nil, "--cache-dir", t.TempDir())
	dir := t.TempDir()
	mem := filepath.Join(dir, "memory")
	data := writeVM(t, mem, 8<<20, 21)
	for _, hole := range []int{3, 9} { // two whole 256 KiB chunks of zeros
		clear(data[hole<<18 : (hole+1)<<18])
	}
	if err := os.WriteFile(mem, data, 0o644); err != nil {
		t.Fatal(err)
	}
	holes := 0
	for off := 0; off < len(data); off += 1 << 18 {
		if bytes.Count(data[off:off+1<<18], []byte{0}) == 1<<18 {
			holes++
		}
	}
	state := filepath.Join(dir, "vmstate")
	os.WriteFile(state, []byte("device state"), 0o644)
	key := []string{"--remote", srv.url(), "--instance", "fc", "--platform", "vmm=firecracker", "--config-hash", "c1", "--ref", "main"}
	cli(t, nil, append([]string{"save", "--cache-dir", filepath.Join(dir, "a"), "--chunk-size", "262144",
		"--chunked", "memory=" + mem, "--file", "vmstate=" + state}, key...)...)

	sock := filepath.Join(dir, "uffd.sock")
	unpacked := filepath.Join(dir, "vm")
	pager := exec.Command(binary, append([]string{"pager", "--json", "--cache-dir", filepath.Join(dir, "b"), "--dir", unpacked, "--socket", sock}, key...)...)
	var pout, perr bytes.Buffer
	pager.Stdout, pager.Stderr = &pout, &perr
	if err := pager.Start(); err != nil {
		t.Fatal(err)
	}
	defer pager.Process.Kill()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pager did not listen on %s; stderr: %s", sock, perr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}

	vm := exec.Command(stub, "-sock", sock, "-expect", mem, "-regions", "2")
	vm.Env = append(os.Environ(), "GODEBUG=asyncpreemptoff=1")
	out, err := vm.Output()
	if err != nil {
		t.Fatalf("VMM stand-in: %v; pager stderr: %s", err, perr.String())
	}
	var result struct {
		Result     string `json:"result"`
		Pages      int    `json:"pages"`
		Mismatches int    `json:"mismatches"`
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if strings.Contains(sc.Text(), `"result"`) {
			json.Unmarshal(sc.Bytes(), &result)
		}
	}
	if result.Result != "ok" || result.Mismatches != 0 || result.Pages != (8<<20)/4096 {
		t.Fatalf("VMM stand-in saw %+v, want every page equal to the snapshot", result)
	}
	if err := pager.Wait(); err != nil {
		t.Fatalf("pager: %v; stderr: %s", err, perr.String())
	}
	var rep pagerOutput
	if err := json.Unmarshal(pout.Bytes(), &rep); err != nil {
		t.Fatalf("pager output %q: %v", pout.String(), err)
	}
	if rep.Source != "remote" || rep.Faults == 0 || rep.ZeroPages != uint64(holes*64) || rep.ChunkFetches != int64(32-holes) {
		t.Errorf("pager report %+v: want a remote snapshot, the pages of the %d hole chunks as zero pages and one fetch per data chunk", rep, holes)
	}
	if b, err := os.ReadFile(rep.Files["vmstate"]); err != nil || string(b) != "device state" {
		t.Errorf("unpacked vmstate: %q, %v", b, err)
	}
}

// vmmStub builds the Firecracker-style VMM stand-in for t, skipping (failing
// under CI) without root or userfaultfd.
func vmmStub(t *testing.T) string {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireDevice(t, "/dev/userfaultfd")
	stub, cleanup, err := testutil.BuildMain("../uffd/internal/vmmstub", "vmmstub")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cleanup)
	return stub
}

type pagerOutput struct {
	Source       string            `json:"source"`
	Files        map[string]string `json:"files"`
	Faults       uint64            `json:"faults"`
	ZeroPages    uint64            `json:"zero_pages"`
	ChunkFetches int64             `json:"chunk_fetches"`
}
