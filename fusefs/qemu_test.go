package fusefs

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

// qmp is a QMP session over a QEMU's stdin/stdout.
type qmp struct {
	t   testing.TB
	in  io.Writer
	out *bufio.Scanner
}

func (q *qmp) run(cmd string, args any) json.RawMessage {
	q.t.Helper()
	m := map[string]any{"execute": cmd}
	if args != nil {
		m["arguments"] = args
	}
	b, _ := json.Marshal(m)
	if _, err := q.in.Write(append(b, '\n')); err != nil {
		q.t.Fatalf("QMP %s: %v", cmd, err)
	}
	for q.out.Scan() {
		var r struct {
			Return json.RawMessage `json:"return"`
			Error  *struct{ Desc string }
		}
		if err := json.Unmarshal(q.out.Bytes(), &r); err != nil {
			q.t.Fatalf("QMP %s: %v in %q", cmd, err, q.out.Text())
		}
		if r.Error != nil {
			q.t.Fatalf("QMP %s: %s", cmd, r.Error.Desc)
		}
		if r.Return != nil {
			return r.Return
		}
	}
	q.t.Fatalf("QMP %s: QEMU went away: %v", cmd, q.out.Err())
	return nil
}

// TestQEMUMemoryBackend gives QEMU its guest RAM as a mounted file
// (memory-backend-file, share=on): QEMU sees the File's bytes, and bytes
// QEMU writes into guest RAM (a generic loader blob, copied at reset)
// reach File.WriteAt.
func TestQEMUMemoryBackend(t *testing.T) {
	qemuBin := testutil.LookPath(t, "qemu-system-x86_64")
	const size = 64 << 20
	dir := t.TempDir()
	mem := make([]byte, size)
	copy(mem[3<<20:], "snaploader-memory-pattern")
	df := newDiskFile(t, dir, mem)
	blob := randomBytes(64 << 10)
	blobPath := filepath.Join(dir, "blob")
	if err := os.WriteFile(blobPath, blob, 0o644); err != nil {
		t.Fatal(err)
	}
	s := mount(t, map[string]File{"mem": df}, Options{})

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemuBin,
		"-accel", "tcg", "-M", "q35,memory-backend=mem", "-m", "64M",
		"-object", "memory-backend-file,id=mem,size=64M,share=on,mem-path="+filepath.Join(s.Dir(), "mem"),
		"-device", fmt.Sprintf("loader,file=%s,addr=0x200000,force-raw=on", blobPath),
		"-display", "none", "-nodefaults", "-S", "-qmp", "stdio")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	q := &qmp{t: t, in: stdin, out: bufio.NewScanner(stdout)}
	q.out.Buffer(make([]byte, 1<<20), 1<<20)
	if !q.out.Scan() { // greeting
		cmd.Wait()
		t.Fatalf("no QMP greeting: %s", stderr.String())
	}
	q.run("qmp_capabilities", nil)
	var seen string
	json.Unmarshal(q.run("human-monitor-command", map[string]any{"command-line": "xp /4xb 0x300000"}), &seen)
	if !strings.Contains(seen, "0x73 0x6e 0x61 0x70") { // "snap"
		t.Errorf("guest memory at 3 MiB reads %q, want the File's bytes \"snap\"", seen)
	}
	q.run("quit", nil)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("qemu: %v\n%s", err, stderr.String())
	}
	if df.writes.Load() == 0 {
		t.Fatal("QEMU's writes to guest RAM did not reach WriteAt")
	}
	got := df.contents(t)
	if !bytes.Equal(got[2<<20:2<<20+len(blob)], blob) {
		t.Fatal("the loader blob QEMU wrote at 2 MiB is not in the File")
	}
	if !bytes.Equal(got[3<<20:3<<20+25], mem[3<<20:3<<20+25]) {
		t.Fatal("bytes QEMU did not write changed")
	}
}
