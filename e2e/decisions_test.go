package e2e

import (
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
	if first["published_remote"] != true || first["remote_skipped"] != nil {
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
