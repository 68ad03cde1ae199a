package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// cliResult is one finished snaploader process.
type cliResult struct {
	stdout, stderr string
	err            error
}

// run runs snaploader with args and returns what it printed.
func run(ctx context.Context, args ...string) cliResult {
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return cliResult{out.String(), errb.String(), err}
}

func (r cliResult) must(t *testing.T, what string) cliResult {
	t.Helper()
	if r.err != nil {
		t.Fatalf("%s: %v\nstderr:\n%s", what, r.err, r.stderr)
	}
	return r
}

// jsonReport decodes a --json report.
func (r cliResult) report(t *testing.T) map[string]any {
	t.Helper()
	m := map[string]any{}
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		t.Fatalf("decoding --json output %q: %v", r.stdout, err)
	}
	return m
}

func keyArgs(ref string) []string {
	return []string{"--instance", "fleet", "--platform", "arch=x86_64", "--config-hash", "cfg1", "--ref", ref, "--default-ref", "main"}
}

// A host whose shared cache is down still starts what it holds: restore
// with --remote falls back to its local cache under the last version id it
// saw, so does restore without --remote, saves complete locally and say
// why nothing was published, and when the remote is back an invalidation
// made meanwhile is seen.
func TestRemoteOutageDegradesToLocalCLI(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(dir, "server"))
	cacheDir := filepath.Join(dir, "host")
	mem := filepath.Join(dir, "mem")
	want := writeVM(t, mem, 2<<20, 1)
	common := append([]string{"--cache-dir", cacheDir, "--remote-timeout", "2s"}, keyArgs("main")...)
	run(ctx, append([]string{"save", "--chunked", "mem=" + mem, "--chunk-size", "65536", "--remote", srv.url(), "--json"}, common...)...).must(t, "save with the remote up")

	srv.stop()
	out := filepath.Join(dir, "out1")
	start := time.Now()
	r := run(ctx, append([]string{"restore", "--out", out, "--remote", srv.url(), "--json"}, common...)...).must(t, "restore with the remote down")
	if took := time.Since(start); took > 60*time.Second {
		t.Errorf("restore with the remote down took %s", took)
	}
	if n := strings.Count(r.stderr, "remote tier unavailable"); n != 1 {
		t.Errorf("warned %d times that the remote is down, want once:\n%s", n, r.stderr)
	}
	if got, err := os.ReadFile(filepath.Join(out, "mem")); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("restored file differs (%v)", err)
	}
	if rep := r.report(t); rep["source"] != "local" || rep["remote_error"] == nil || rep["remote_error"] == "" {
		t.Errorf("restore with the remote down reported %v, want source local and a remote_error", rep)
	}
	// Without --remote, the same host finds the same snapshot.
	run(ctx, append([]string{"restore", "--out", filepath.Join(dir, "out2")}, common...)...).must(t, "restore without --remote")

	// A save while the remote is down completes locally and says why.
	mem2 := filepath.Join(dir, "mem2")
	want2 := writeVM(t, mem2, 2<<20, 2)
	r = run(ctx, append([]string{"save", "--chunked", "mem=" + mem2, "--chunk-size", "65536", "--remote", srv.url(), "--save-policy", "always", "--json"}, common...)...).must(t, "save with the remote down")
	rep := r.report(t)
	if rep["published_remote"] == true || rep["published_local"] != true || rep["remote_error"] == nil || rep["remote_error"] == "" {
		t.Errorf("save during the outage reported %v", rep)
	}
	r = run(ctx, append([]string{"restore", "--out", filepath.Join(dir, "out3"), "--remote", srv.url()}, common...)...).must(t, "restore of the outage save")
	if got, _ := os.ReadFile(filepath.Join(dir, "out3", "mem")); !bytes.Equal(got, want2) {
		t.Error("the save made during the outage does not restore")
	}

	// The remote comes back; another host invalidates the key there.
	srv.start(t)
	run(ctx, append([]string{"invalidate", "--cache-dir", filepath.Join(dir, "other"), "--remote", srv.url()}, keyArgs("main")...)...).must(t, "invalidate on another host")
	r = run(ctx, append([]string{"restore", "--out", filepath.Join(dir, "out4"), "--remote", srv.url()}, common...)...)
	if r.err == nil || !strings.Contains(r.stderr, "NotFound") {
		t.Errorf("after an invalidation made while cut off: %v\n%s", r.err, r.stderr)
	}
	// ... and the local-only view follows it too.
	r = run(ctx, append([]string{"restore", "--out", filepath.Join(dir, "out5")}, common...)...)
	if r.err == nil {
		t.Error("restore without --remote after the invalidation still restored the invalidated snapshot")
	}
}

// Processes saving a new key at once, on one cache directory or against
// one serve, all end on one version id and every save that exited 0 is
// reachable by its key.
func TestConcurrentFirstSavesCLI(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(dir, "server"))
	mem := filepath.Join(dir, "mem")
	writeVM(t, mem, 256<<10, 3)
	for _, mode := range []string{"one cache directory", "one serve", "same key, one cache directory"} {
		const rounds, procs = 4, 4
		for round := range rounds {
			cfg := fmt.Sprintf("cfg-%s-%d", strings.ReplaceAll(mode, " ", ""), round)
			shared := filepath.Join(dir, cfg)
			type result struct {
				ref string
				id  string
				r   cliResult
			}
			res := make([]result, procs)
			var wg sync.WaitGroup
			for i := range procs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ref := fmt.Sprintf("feature-%d", i)
					if strings.HasPrefix(mode, "same key") {
						ref = "main"
					}
					args := []string{"save", "--chunked", "mem=" + mem, "--chunk-size", "65536", "--json",
						"--instance", "fleet", "--config-hash", cfg, "--ref", ref, "--default-ref", "main", "--save-policy", "always"}
					if mode == "one serve" {
						args = append(args, "--cache-dir", filepath.Join(shared, ref), "--remote", srv.url())
					} else {
						args = append(args, "--cache-dir", shared)
					}
					r := run(ctx, args...)
					res[i] = result{ref: ref, r: r}
					if r.err == nil {
						res[i].id, _ = r.report(t)["snapshot_id"].(string)
					}
				}()
			}
			wg.Wait()
			if strings.HasPrefix(mode, "same key") {
				// Every save exited 0 under one version id; the key gives
				// the one written last.
				ids := map[any]bool{}
				versions := map[any]bool{}
				for _, x := range res {
					rep := x.r.must(t, mode+": concurrent save").report(t)
					ids[rep["snapshot_id"]] = true
					versions[rep["key"].(map[string]any)["version_id"]] = true
				}
				if len(versions) != 1 {
					t.Errorf("%s, round %d: saves ended under %d version ids %v", mode, round, len(versions), versions)
				}
				r := run(ctx, "restore", "--out", t.TempDir(), "--json", "--instance", "fleet", "--config-hash", cfg, "--ref", "main", "--cache-dir", shared).must(t, "restoring the key")
				if id := r.report(t)["snapshot_id"]; !ids[id] {
					t.Errorf("%s, round %d: restored %v, not one of the saved %v", mode, round, id, ids)
				}
				continue
			}
			for _, x := range res {
				x.r.must(t, mode+": concurrent save of "+x.ref)
				args := []string{"restore", "--out", t.TempDir(), "--json", "--instance", "fleet", "--config-hash", cfg, "--ref", x.ref}
				if mode == "one serve" {
					args = append(args, "--cache-dir", filepath.Join(dir, "reader-"+cfg), "--remote", srv.url())
				} else {
					args = append(args, "--cache-dir", shared)
				}
				r := run(ctx, args...).must(t, fmt.Sprintf("%s, round %d: restoring %s", mode, round, x.ref))
				if got := r.report(t)["snapshot_id"]; got != x.id {
					t.Errorf("%s, round %d: ref %s restored snapshot %v, want %s", mode, round, x.ref, got, x.id)
				}
			}
		}
	}
}

// One version per key whatever the digest function: invalidating with the
// default function covers a SHA-256 snapshot, and a BLAKE3 host restores a
// SHA-256 snapshot.
func TestDigestFunctionsShareOneVersionCLI(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(dir, "server"))
	mem := filepath.Join(dir, "mem")
	want := writeVM(t, mem, 512<<10, 4)
	host := func(name string) []string {
		return append([]string{"--cache-dir", filepath.Join(dir, name), "--remote", srv.url()}, keyArgs("main")...)
	}
	run(ctx, append([]string{"save", "--digest-function", "sha256", "--chunked", "mem=" + mem, "--chunk-size", "65536"}, host("a")...)...).must(t, "sha256 save")
	out := filepath.Join(dir, "out")
	run(ctx, append([]string{"restore", "--out", out}, host("b")...)...).must(t, "default-function restore of a sha256 snapshot")
	if got, _ := os.ReadFile(filepath.Join(out, "mem")); !bytes.Equal(got, want) {
		t.Fatal("restored bytes differ")
	}
	run(ctx, append([]string{"invalidate"}, host("c")...)...).must(t, "invalidate with the default function")
	for _, h := range []string{"a", "b"} {
		r := run(ctx, append([]string{"restore", "--digest-function", "sha256", "--out", filepath.Join(dir, "after-"+h)}, host(h)...)...)
		if r.err == nil {
			t.Errorf("host %s restored an invalidated sha256 snapshot", h)
		}
	}
}

// Bad input is refused before any work: a name too long to restore, a zero
// chunk size, a zero cache bound, and a save with a read-only key.
func TestBadSaveInputIsRefusedEarly(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srvDir := filepath.Join(dir, "server")
	srv := startServe(t, nil, "--cache-dir", srvDir, "--api-key", "rw=team", "--api-key", "ro=team:ro")
	mem := filepath.Join(dir, "mem")
	writeVM(t, mem, 256<<10, 5)
	base := append([]string{"save", "--cache-dir", filepath.Join(dir, "host")}, keyArgs("main")...)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"300-byte name", []string{"--chunked", strings.Repeat("m", 300) + "=" + mem}, "limited to 200 bytes"},
		{"zero chunk size", []string{"--chunked", "mem=" + mem, "--chunk-size", "0"}, "--chunk-size 0"},
		{"negative cache bound", []string{"--chunked", "mem=" + mem, "--cache-max-bytes", "-1"}, "--cache-max-bytes -1"},
		{"zero cache bound", []string{"--chunked", "mem=" + mem, "--cache-max-bytes", "0"}, "--cache-max-bytes 0"},
		{"read-only key", []string{"--chunked", "mem=" + mem, "--remote", srv.url(), "--api-key", "ro"}, "read-only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(ctx, append(append([]string{}, base...), tc.args...)...)
			if r.err == nil || !strings.Contains(r.stderr, tc.want) {
				t.Errorf("got %v, stderr %q; want an error containing %q", r.err, r.stderr, tc.want)
			}
		})
	}
	// The refused read-only save uploaded nothing.
	var blobs int
	filepath.Walk(filepath.Join(srvDir, "cas"), func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			blobs++
		}
		return nil
	})
	if blobs != 0 {
		t.Errorf("the server holds %d blobs after a refused read-only save", blobs)
	}
}

// Bad flags and files are refused at once with a clear error, never a hang
// or a silent default: FIFOs as key and CA files, non-positive bounds,
// malformed URLs and endpoints, nothing to save.
func TestBadFlagsAreRefused(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	mem := filepath.Join(dir, "mem")
	writeVM(t, mem, 64<<10, 14)
	host := []string{"--cache-dir", filepath.Join(dir, "host"), "--instance", "i", "--config-hash", "c", "--ref", "main"}
	save := append([]string{"save", "--chunked", "mem=" + mem}, host...)
	restore := append([]string{"restore", "--out", filepath.Join(dir, "out")}, host...)
	serve := []string{"serve", "--listen", "127.0.0.1:0", "--cache-dir", filepath.Join(dir, "serve")}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"key file is a FIFO (save)", append(append([]string{}, save...), "--encryption-key-file", fifo), "not a regular file"},
		{"key file is a FIFO (restore)", append(append([]string{}, restore...), "--encryption-key-file", fifo), "not a regular file"},
		{"keygen --add-to a FIFO", []string{"keygen", "--add-to", fifo, "--out", filepath.Join(dir, "k")}, "not a regular file"},
		{"CA file is a FIFO", append(append([]string{}, save...), "--remote", "grpcs://127.0.0.1:1", "--ca-file", fifo), "not a regular file"},
		{"port out of range", append(append([]string{}, save...), "--remote", "grpc://127.0.0.1:99999"), "1-65535"},
		{"host with a space", append(append([]string{}, save...), "--remote", "grpc://a b:1"), "not a host name"},
		{"zero remote timeout", append(append([]string{}, save...), "--remote-timeout", "0s"), "--remote-timeout"},
		{"negative remote timeout", append(append([]string{}, save...), "--remote-timeout", "-1s"), "--remote-timeout"},
		{"negative max stale", append(append([]string{}, restore...), "--max-stale", "-1h"), "--max-stale"},
		{"garbage trace endpoint", append(append([]string{}, restore...), "--trace-endpoint", "garbage:::"), "trace endpoint"},
		{"nothing to save", append([]string{"save"}, host...), "nothing to save"},
		{"serve --max-bytes 0", append(append([]string{}, serve...), "--max-bytes", "0"), "--max-bytes"},
		{"serve --max-bytes -1", append(append([]string{}, serve...), "--max-bytes", "-1"), "--max-bytes"},
		{"serve --max-blob-bytes -1", append(append([]string{}, serve...), "--max-blob-bytes", "-1"), "--max-blob-bytes"},
		{"serve --max-upload-memory 0", append(append([]string{}, serve...), "--max-upload-memory", "0"), "--max-upload-memory"},
		{"serve --idle-timeout 0s", append(append([]string{}, serve...), "--idle-timeout", "0s"), "--idle-timeout"},
		{"serve --upload-ttl -1s", append(append([]string{}, serve...), "--upload-ttl", "-1s"), "--upload-ttl"},
		{"serve --max-scratch-bytes -1", append(append([]string{}, serve...), "--max-scratch-bytes", "-1"), "--max-scratch-bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			r := run(ctx, tc.args...)
			if ctx.Err() != nil {
				t.Fatalf("still running after 15s")
			}
			if r.err == nil || !strings.Contains(r.stderr, tc.want) || !strings.Contains(r.stderr, "error kind") {
				t.Errorf("got %v, stderr %q; want an error containing %q and its kind", r.err, r.stderr, tc.want)
			}
		})
	}
}
