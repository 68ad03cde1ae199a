package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// startServeProc starts `snaploader serve` over a fresh directory on a free
// 127.0.0.1 port and returns its grpc:// URL.
func startServeProc(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(binary, "serve", "--listen", addr, "--cache-dir", filepath.Join(t.TempDir(), "served"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return "grpc://" + addr
		}
	}
	t.Fatalf("serve did not listen on %s", addr)
	return ""
}

func TestBenchCommand(t *testing.T) {
	url := startServeProc(t)
	work := t.TempDir()
	cacheDir := filepath.Join(work, "cache")
	size := int64(3*4096000 + 8192) // a short last chunk
	benchKey := []string{"--remote", url, "--instance", "snaploader-bench", "--config-hash", fmt.Sprintf("bench-v1-%d", size), "--ref", "snaploader-bench"}
	// Without --keep a run invalidates the snapshot it saved, so the
	// server never gives it out again and the next run saves afresh; with
	// --keep the snapshot stays for later runs, which reuse it and leave
	// it alone.
	var ids []string
	for i, tc := range []struct {
		keep, saved, invalidated bool
	}{{false, true, true}, {true, true, false}, {false, false, false}} {
		args := []string{"bench", "--remote", url, "--cache-dir", cacheDir, "--size", fmt.Sprint(size), "--runs", "1", "--json"}
		if tc.keep {
			args = append(args, "--keep")
		}
		out, _ := run(t, false, args...)
		var r benchReport
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("run %d: bench --json printed %q: %v", i, out, err)
		}
		if r.Saved != tc.saved || r.Invalidated != tc.invalidated {
			t.Errorf("run %d (--keep=%v): saved %v, invalidated %v; want %v, %v", i, tc.keep, r.Saved, r.Invalidated, tc.saved, tc.invalidated)
		}
		ids = append(ids, r.SnapshotID)
		_, stderr := run(t, !tc.keep && tc.saved, append([]string{"inspect", "--cache-dir", t.TempDir()}, benchKey...)...)
		if !tc.keep && tc.saved && !strings.Contains(stderr, "NotFound") && !strings.Contains(strings.ToLower(stderr), "no snapshot") {
			t.Errorf("run %d: after the invalidation, inspect says %q; want no snapshot found", i, stderr)
		}
		if r.SizeBytes != size || r.ChunkSize != 4096000 || r.Chunks < 1 || r.Chunks > 4 || r.Runs != 1 {
			t.Errorf("run %d: size %d, chunk size %d, chunks %d, runs %d", i, r.SizeBytes, r.ChunkSize, r.Chunks, r.Runs)
		}
		for name, v := range map[string]float64{
			"cp_ms": r.CpMS, "cp_mb_s": r.CpMBs, "cold_read_ms": r.ColdReadMS, "cold_read_mb_s": r.ColdReadMBs, "cold_read_x_cp": r.ColdReadXCp,
			"warm_read_ms": r.WarmReadMS, "warm_read_mb_s": r.WarmReadMBs, "warm_read_x_cp": r.WarmReadXCp,
			"cold_first_byte_p50_us": r.ColdFirstByteP50US, "cold_first_byte_p99_us": r.ColdFirstByteP99US,
			"warm_first_byte_p50_us": r.WarmFirstByteP50US, "warm_first_byte_p99_us": r.WarmFirstByteP99US,
		} {
			if !(v > 0) {
				t.Errorf("run %d: %s = %v, want a positive figure", i, name, v)
			}
		}
		if r.ColdFirstByteP50US > r.ColdFirstByteP99US || r.WarmFirstByteP50US > r.WarmFirstByteP99US {
			t.Errorf("run %d: p50 above p99: %+v", i, r)
		}
		// Reading one byte of a chunk cannot take longer than reading the
		// whole file (which fetches that chunk and all the others).
		if r.ColdFirstByteP50US > r.ColdReadMS*1e3 || r.WarmFirstByteP50US > r.WarmReadMS*1e3 {
			t.Errorf("run %d: first byte slower than the whole read: %+v", i, r)
		}
		if want := float64(size) / 1e6 / (r.ColdReadMS / 1e3); r.ColdReadMBs < want*0.99 || r.ColdReadMBs > want*1.01 {
			t.Errorf("run %d: cold read %v MB/s does not match %d bytes in %v ms", i, r.ColdReadMBs, size, r.ColdReadMS)
		}
		if want := r.ColdReadMBs / r.CpMBs; r.ColdReadXCp < want*0.99 || r.ColdReadXCp > want*1.01 {
			t.Errorf("run %d: cold_read_x_cp %v, want %v", i, r.ColdReadXCp, want)
		}
	}
	if ids[0] == ids[1] || ids[1] != ids[2] {
		t.Errorf("snapshots %v: want a fresh one after the invalidation, then the kept one reused", ids)
	}
	// Scratch files are gone; the host's cache directory was never used.
	ents, err := os.ReadDir(work)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		t.Errorf("left behind in the work directory: %s", e.Name())
	}
	// The human-readable form names the figures.
	out, _ := run(t, false, "bench", "--remote", url, "--cache-dir", cacheDir, "--size", fmt.Sprint(size), "--runs", "1")
	for _, want := range []string{"cp of the same file", "lazy read, cold", "lazy read, warm", "first byte"} {
		if !strings.Contains(out, want) {
			t.Errorf("bench output lacks %q:\n%s", want, out)
		}
	}
	// Without a remote it refuses, saying why.
	_, stderr := run(t, true, "bench", "--cache-dir", cacheDir, "--size", "1MiB")
	if !strings.Contains(stderr, "--remote") {
		t.Errorf("bench without --remote: %q", stderr)
	}
}
