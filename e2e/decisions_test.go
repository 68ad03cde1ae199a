package e2e

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A save the policy does not publish says why, on stderr and in --json; the
// case of a third-party cache user who gives no default ref.
func TestSkippedPublishSaysWhy(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(dir, "serve"))
	mem := filepath.Join(dir, "mem")
	writeVM(t, mem, 512<<10, 8)
	save := func(host string) cliResult {
		return run(ctx, "save", "--json", "--cache-dir", filepath.Join(dir, host), "--remote", srv.url(), "--chunk-size", "65536",
			"--chunked", "mem="+mem, "--instance", "i", "--config-hash", "c", "--ref", "main", "--default-ref", "")
	}
	first := save("a").must(t, "first save").report(t)
	if first["published_remote"] != true || first["remote_skipped"] != "" {
		t.Fatalf("first save: %v", first)
	}
	r := save("b").must(t, "second save")
	rep := r.report(t)
	why, _ := rep["remote_skipped"].(string)
	if rep["published_remote"] == true || !strings.Contains(why, "first-non-default-ref") || !strings.Contains(why, "no default ref") {
		t.Errorf("second save: published %v, remote_skipped %q; want a reason naming the policy and the missing default ref", rep["published_remote"], why)
	}
	if !strings.Contains(r.stderr, "not publishing to the remote") {
		t.Errorf("second save said nothing on stderr: %q", r.stderr)
	}
}

// A fallback passed over because it is stale is logged with its key and
// the reason.
func TestRejectedFallbackIsLogged(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	mem := filepath.Join(dir, "mem")
	writeVM(t, mem, 256<<10, 9)
	cache := filepath.Join(dir, "cache")
	run(ctx, "save", "--cache-dir", cache, "--chunk-size", "65536", "--chunked", "mem="+mem, "--instance", "i", "--config-hash", "c", "--ref", "main").must(t, "save on main")
	time.Sleep(20 * time.Millisecond) // older than the 10ms limit below
	r := run(ctx, "restore", "--cache-dir", cache, "--out", filepath.Join(dir, "out"), "--max-stale", "10ms",
		"--instance", "i", "--config-hash", "c", "--ref", "feature", "--default-ref", "main")
	if r.err == nil {
		t.Fatal("a stale fallback was restored")
	}
	if !strings.Contains(r.stderr, "rejected") || !strings.Contains(r.stderr, "reason=stale") || !strings.Contains(r.stderr, `ref=\"main\"`) {
		t.Errorf("the stale fallback's rejection is not logged with its key and reason:\n%s", r.stderr)
	}
}

// An artifact file larger than the largest blob the remote takes (serve
// with --max-blob-bytes, like a third-party cache with a small block size)
// is stored as chunks and restored as the same file, encrypted or not.
func TestOversizedArtifactStoredAsChunks(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(dir, "serve"), "--max-blob-bytes", "1048576")
	kernel := filepath.Join(dir, "kernel")
	want := writeVM(t, kernel, 3<<20+12345, 10)
	keys := keyFile(t, dir, "keys")
	for _, tc := range []struct {
		name  string
		extra []string
	}{{"plain", nil}, {"encrypted", []string{"--encryption-key-file", keys}}} {
		t.Run(tc.name, func(t *testing.T) {
			key := append([]string{"--remote", srv.url(), "--instance", "i-" + tc.name, "--config-hash", "c", "--ref", "main"}, tc.extra...)
			run(ctx, append([]string{"save", "--cache-dir", filepath.Join(dir, tc.name+"-a"), "--file", "kernel=" + kernel}, key...)...).must(t, "save of an oversized artifact")
			out := filepath.Join(dir, tc.name+"-out")
			r := run(ctx, append([]string{"restore", "--json", "--cache-dir", filepath.Join(dir, tc.name+"-b"), "--out", out}, key...)...).must(t, "restore")
			if rep := r.report(t); rep["source"] != "remote" {
				t.Errorf("restored from %v, want the remote", rep["source"])
			}
			got, err := os.ReadFile(filepath.Join(out, "kernel"))
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("restored artifact differs (%v)", err)
			}
			insp := run(ctx, append([]string{"inspect", "--cache-dir", filepath.Join(dir, tc.name+"-b")}, key...)...).must(t, "inspect")
			var m struct {
				ChunkedFiles []struct {
					Name     string `json:"name"`
					Artifact bool   `json:"artifact"`
				} `json:"chunked_files"`
			}
			if err := json.Unmarshal([]byte(insp.stdout), &m); err != nil {
				t.Fatal(err)
			}
			if len(m.ChunkedFiles) != 1 || m.ChunkedFiles[0].Name != "kernel" || !m.ChunkedFiles[0].Artifact {
				t.Errorf("the manifest does not say the artifact is stored as chunks:\n%s", insp.stdout)
			}
		})
	}
}
