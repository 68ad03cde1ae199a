package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/errkind"
)

func TestClassify(t *testing.T) {
	rpcNotFound := status.Error(codes.NotFound, "blob abc not in the cache")
	for _, tc := range []struct {
		name        string
		err         error
		interrupted bool
		kind        string
		code        int
		msg         string // what the message must be, when set
	}{
		{"success", nil, false, "OK", exitOK, ""},
		{"usage", usagef("--out is required"), false, "InvalidArgument", exitUsage, "--out is required"},
		{"bad value from a package", status.Error(codes.InvalidArgument, "bad name"), false, "InvalidArgument", exitUsage, "bad name"},
		{"no snapshot", &noSnapshotError{cache.NotFoundf("no snapshot for key k")}, false, "NotFound", exitNoSnapshot, "no snapshot for key k"},
		{"no snapshot, wrapped", fmt.Errorf("restoring: %w", &noSnapshotError{rpcNotFound}), false, "NotFound", exitNoSnapshot, "restoring: blob abc not in the cache"},
		{"a missing file is no missing snapshot", errkind.IO(os.ErrNotExist, "opening mem.img"), false, "NotFound", exitFailure, ""},
		{"lookup failure of another kind", &noSnapshotError{status.Error(codes.Internal, "bug")}, false, "Internal", exitFailure, ""},
		{"required remote down", &remoteDownError{url: "grpc://h:1", err: status.Error(codes.Unavailable, "connection refused")}, false, "Unavailable", exitRemoteDown, "remote grpc://h:1 is unavailable: connection refused"},
		{"remote down, marked", remoteDown("grpc://h:1", fmt.Errorf("listing: %w", status.Error(codes.DeadlineExceeded, "slow"))), false, "Unavailable", exitRemoteDown, ""},
		{"remote failure that is no outage", remoteDown("grpc://h:1", status.Error(codes.PermissionDenied, "bad key")), false, "PermissionDenied", exitFailure, ""},
		{"transient local failure", status.Error(codes.Unavailable, "EIO"), false, "Unavailable", exitFailure, ""},
		{"corruption", errkind.DataLossf("chunk 3 hashes to x"), false, "DataLoss", exitDataLoss, ""},
		{"corruption, wrapped", fmt.Errorf("verifying: %w", cache.Corruptf("bad")), false, "DataLoss", exitDataLoss, ""},
		{"cancelled", fmt.Errorf("saving: %w", context.Canceled), false, "Canceled", exitInterrupted, "interrupted"},
		{"interrupted", nil, true, "Canceled", exitInterrupted, "interrupted"},
		{"interrupted while failing", errors.New("read: connection reset"), true, "Canceled", exitInterrupted, "interrupted"},
		{"full disk", errkind.IO(syscall.ENOSPC, "writing chunk"), false, "ResourceExhausted", exitFailure, ""},
		{"refused overwrite", status.Error(codes.FailedPrecondition, "--out holds files"), false, "FailedPrecondition", exitFailure, ""},
		{"exists", status.Error(codes.AlreadyExists, "key file exists"), false, "AlreadyExists", exitFailure, ""},
		{"bug", errors.New("nil map"), false, "Internal", exitFailure, ""},
		{"transport wording", fmt.Errorf("connecting: %w", status.Error(codes.Unavailable, `connection error: desc = "transport: Error while dialing: dial tcp 127.0.0.1:1: connect: connection refused"`)), false, "Unavailable", exitFailure,
			"connecting: dial tcp 127.0.0.1:1: connect: connection refused"},
		{"repeated prefix", fmt.Errorf("opening local cache d: %w", fmt.Errorf("opening local cache d: %w", syscall.ENOTDIR)), false, "Unavailable", exitFailure, "opening local cache d: not a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := classify(tc.err, tc.interrupted)
			if f.Kind != tc.kind || f.ExitCode != tc.code {
				t.Errorf("classify(%v) = kind %s exit %d, want %s exit %d", tc.err, f.Kind, f.ExitCode, tc.kind, tc.code)
			}
			if tc.msg != "" && f.Message != tc.msg {
				t.Errorf("message %q, want %q", f.Message, tc.msg)
			}
			if strings.Contains(f.Message, "rpc error") || strings.Contains(f.Message, "desc =") {
				t.Errorf("message %q has transport wording", f.Message)
			}
		})
	}
}

// cliResult is how one run of the binary ended.
type cliResult struct {
	stdout, stderr string
	code           int
}

// cliEnv is the environment of the contract tests: none of the variables
// key flags default to.
func cliEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); k == "GIT_BRANCH" || k == "GIT_BASE_BRANCH" || k == "GIT_REPO_DEFAULT_BRANCH" {
			continue
		}
		env = append(env, kv)
	}
	return env
}

func runCLI(t *testing.T, args ...string) cliResult {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = cliEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("running snaploader %s: %v", strings.Join(args, " "), err)
	}
	return cliResult{stdout.String(), stderr.String(), cmd.ProcessState.ExitCode()}
}

// expect checks the exit code and that stderr says each of want.
func (r cliResult) expect(t *testing.T, code int, want ...string) {
	t.Helper()
	if r.code != code {
		t.Errorf("exit code %d, want %d\nstdout: %s\nstderr: %s", r.code, code, r.stdout, r.stderr)
	}
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("stderr does not say %q:\n%s", w, r.stderr)
		}
	}
	if strings.Contains(r.stderr, "rpc error") {
		t.Errorf("stderr has transport wording:\n%s", r.stderr)
	}
}

// saveOne saves a small snapshot into cacheDir under keyArgs and returns
// its id.
func saveOne(t *testing.T, dir, cacheDir string, extra ...string) string {
	t.Helper()
	mem := filepath.Join(dir, "mem.img")
	if _, err := os.Stat(mem); err != nil {
		writeRandom(t, mem, 1<<20, 5)
	}
	out, _ := run(t, false, append(append(keyArgs(cacheDir), "save", "--json", "--chunk-size", "64KiB", "--chunked", "mem.img="+mem), extra...)...)
	var r report
	if err := json.Unmarshal([]byte(out), &r); err != nil || r.SnapshotID == "" {
		t.Fatalf("save --json printed %q: %v", out, err)
	}
	return r.SnapshotID
}

func TestExitCodes(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	saveOne(t, dir, cacheDir)

	t.Run("usage", func(t *testing.T) {
		runCLI(t, "save", "--chunk", "mem=x").expect(t, exitUsage, "unknown flag: --chunk", "did you mean --chunked", "error kind: InvalidArgument")
		runCLI(t, "restor").expect(t, exitUsage, `unknown command "restor"`)
		runCLI(t, "restore", "stray", "--out", filepath.Join(dir, "o")).expect(t, exitUsage, `"stray"`)
		runCLI(t, append(keyArgs(cacheDir), "save", "--chunk-size", "lots", "--chunked", "m=x")...).expect(t, exitUsage, "--chunk-size", "64MiB")
		runCLI(t, append(keyArgs(cacheDir), "restore")...).expect(t, exitUsage, "--out is required")
		runCLI(t, "save", "--cache-dir", cacheDir, "--config-hash", "c", "--ref", "main", "--chunked", "m=x").expect(t, exitUsage, "--instance")
		runCLI(t, "save", "--cache-dir", cacheDir, "--instance", "ci", "--ref", "main", "--chunked", "m=x").expect(t, exitUsage, "--config-hash")
		runCLI(t, "save", "--cache-dir", cacheDir, "--instance", "ci", "--config-hash", "c", "--chunked", "m=x").expect(t, exitUsage, "--ref or $GIT_BRANCH")
		runCLI(t, "restore", "--cache-dir", cacheDir, "--instance", "ci", "--config-hash", "c", "--out", filepath.Join(dir, "o")).expect(t, exitUsage, "--ref or $GIT_BRANCH")
		runCLI(t, "verify", "--cache-dir", cacheDir, "--config-hash", "c", "--ref", "main").expect(t, exitUsage, "--instance")
		runCLI(t, "inspect", "--cache-dir", cacheDir, "--snapshot-id", "X").expect(t, exitUsage, "--instance is required with --snapshot-id")
		runCLI(t, "invalidate", "--cache-dir", cacheDir, "--instance", "ci").expect(t, exitUsage, "--config-hash")
		runCLI(t, "ls", "--cache-dir", filepath.Join(dir, "mem.img")).expect(t, exitUsage, "--cache-dir", "not a directory")
		if _, err := os.Stat(filepath.Join(dir, "o")); err == nil {
			t.Error("a refused restore created its --out")
		}
	})
	t.Run("nothing to restore", func(t *testing.T) {
		other := []string{"--cache-dir", cacheDir, "--instance", "ci", "--config-hash", "c0ffee", "--ref", "nobody"}
		runCLI(t, append(other, "restore", "--out", filepath.Join(dir, "none"))...).expect(t, exitNoSnapshot, "error kind: NotFound")
		runCLI(t, append(other, "inspect")...).expect(t, exitNoSnapshot)
		runCLI(t, append(other, "verify")...).expect(t, exitNoSnapshot)
		runCLI(t, "restore", "--cache-dir", cacheDir, "--instance", "ci", "--snapshot-id", "NoSuchSnapshot", "--out", filepath.Join(dir, "none")).expect(t, exitNoSnapshot)
		// A missing input file is a bad argument, not a missing snapshot.
		runCLI(t, append(keyArgs(cacheDir), "save", "--chunked", "m="+filepath.Join(dir, "absent"))...).expect(t, exitUsage, "absent")
	})
	t.Run("required remote unavailable", func(t *testing.T) {
		dead := "grpc://" + closedPort(t)
		runCLI(t, append(keyArgs(cacheDir), "restore", "--remote", dead, "--remote-required", "--out", filepath.Join(dir, "r1"))...).expect(t, exitRemoteDown, "is unavailable", "error kind: Unavailable")
		// Without --remote-required the local cache serves.
		runCLI(t, append(keyArgs(cacheDir), "restore", "--remote", dead, "--out", filepath.Join(dir, "r2"))...).expect(t, exitOK)
		runCLI(t, "ls", "--remote", dead).expect(t, exitRemoteDown)
	})
	t.Run("integrity", func(t *testing.T) {
		c2 := filepath.Join(dir, "cache2")
		saveOne(t, dir, c2)
		corruptChunk(t, c2)
		runCLI(t, append(keyArgs(c2), "verify")...).expect(t, exitDataLoss, "error kind: DataLoss")
	})
}

// closedPort is a 127.0.0.1 address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// corruptChunk flips a bit of a 64 KiB chunk file of the local cache in
// place.
func corruptChunk(t *testing.T, cacheDir string) {
	t.Helper()
	var victim string
	filepath.Walk(cacheDir, func(p string, info os.FileInfo, err error) error {
		if err == nil && victim == "" && info.Mode().IsRegular() && info.Size() == 64<<10 && strings.Contains(p, "cas") {
			victim = p
		}
		return nil
	})
	if victim == "" {
		t.Fatal("found no chunk file to corrupt")
	}
	f, err := os.OpenFile(victim, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, 100); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 1
	if _, err := f.WriteAt(b, 100); err != nil {
		t.Fatal(err)
	}
}

// An interrupted command exits 130 and says so, whatever it was doing.
func TestInterruptExits130(t *testing.T) {
	addr := closedPort(t)
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			cmd := exec.Command(binary, "serve", "--listen", addr, "--cache-dir", t.TempDir(), "--max-bytes", "2GiB", "--max-upload-memory", "64MiB")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Process.Kill()
			waitListening(t, addr)
			cmd.Process.Signal(sig)
			cmd.Wait()
			r := cliResult{stderr: stderr.String(), code: cmd.ProcessState.ExitCode()}
			r.expect(t, exitInterrupted, "snaploader: interrupted", "error kind: Canceled")
		})
	}
	// A save interrupted midway, when it is still running then.
	dir := t.TempDir()
	writeRandom(t, filepath.Join(dir, "big.img"), 64<<20, 9)
	cmd := exec.Command(binary, append(keyArgs(filepath.Join(dir, "cache")), "save", "--json", "--chunk-size", "64KiB", "--chunked", "mem="+filepath.Join(dir, "big.img"))...)
	cmd.Env = cliEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	cmd.Process.Signal(syscall.SIGINT)
	cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code == exitOK {
		t.Log("the save completed before the signal")
		return
	}
	r := cliResult{stdout.String(), stderr.String(), cmd.ProcessState.ExitCode()}
	r.expect(t, exitInterrupted, "interrupted", "error kind: Canceled")
	var obj map[string]map[string]any
	if err := json.Unmarshal(stdout.Bytes(), &obj); err != nil || obj["error"]["exit_code"] != float64(exitInterrupted) {
		t.Errorf("interrupted save --json printed %q (%v), want one error object with exit_code 130", stdout.String(), err)
	}
}

func waitListening(t *testing.T, addr string) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
	}
	t.Fatalf("nothing listens on %s", addr)
}

// A remote URL that answers another protocol is a configuration error
// saying what it answered, never an outage with a silent local fallback.
func TestRemoteThatSpeaksAnotherProtocol(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	saveOne(t, dir, cacheDir)
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "hello") }))
	defer web.Close()
	hello := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "hello") })
	tlsWeb := httptest.NewTLSServer(hello) // HTTPS, no HTTP/2
	defer tlsWeb.Close()
	tlsH2 := httptest.NewUnstartedServer(hello)
	tlsH2.EnableHTTP2 = true
	tlsH2.StartTLS()
	defer tlsH2.Close()
	grpcAddr := strings.TrimPrefix(startServeProc(t), "grpc://")
	host := func(u string) string { return strings.TrimPrefix(strings.TrimPrefix(u, "http://"), "https://") }
	for _, tc := range []struct {
		name, url string
		want      []string
	}{
		{"http port", "grpc://" + host(web.URL), []string{"HTTP/1", "not as a gRPC cache"}},
		{"tls against http", "grpcs://" + host(web.URL), []string{"without TLS"}},
		{"plaintext against tls", "grpc://" + host(tlsH2.URL), []string{"answered with TLS", "use grpcs://" + host(tlsH2.URL)}},
		{"plaintext against an https port", "grpc://" + host(tlsWeb.URL), []string{"HTTPS server without HTTP/2"}},
		{"tls against an https port", "grpcs://" + host(tlsWeb.URL), []string{"HTTPS server without HTTP/2"}},
		{"tls against plaintext grpc", "grpcs://" + grpcAddr, []string{"without TLS", "use grpc://" + grpcAddr}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, args := range [][]string{
				append(keyArgs(cacheDir), "restore", "--remote", tc.url, "--out", filepath.Join(dir, "out-"+strings.ReplaceAll(tc.name, " ", "-"))),
				{"ls", "--remote", tc.url},
			} {
				r := runCLI(t, args...)
				r.expect(t, exitUsage, append([]string{"--remote " + tc.url, "error kind: InvalidArgument"}, tc.want...)...)
				if strings.Contains(r.stderr, "continuing with the local cache") {
					t.Errorf("%s fell back to the local cache:\n%s", args[0], r.stderr)
				}
			}
		})
	}
}

// --snapshot-id needs only --instance, for restore, inspect and verify
// alike, on a host that never saw the snapshot.
func TestSnapshotIDOnAnotherHost(t *testing.T) {
	url := startServeProc(t)
	dir := t.TempDir()
	id := saveOne(t, dir, filepath.Join(dir, "host-a"), "--remote", url)
	for _, c := range [][]string{
		{"restore", "--out", filepath.Join(dir, "out")},
		{"inspect"},
		{"verify"},
	} {
		args := append([]string{c[0], "--cache-dir", filepath.Join(dir, "host-b-"+c[0]), "--remote", url, "--instance", "ci", "--snapshot-id", id}, c[1:]...)
		r := runCLI(t, args...)
		r.expect(t, exitOK)
		if !strings.Contains(r.stdout, id) {
			t.Errorf("%s --snapshot-id %s: output does not name the snapshot:\n%s", c[0], id, r.stdout)
		}
	}
}

// keysOf is the sorted keys of a JSON object.
func keysOf(m map[string]any) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func sortedKeys(s string) []string {
	ks := strings.Fields(s)
	sort.Strings(ks)
	return ks
}

// Every --json output is one object of one shape per command: every
// documented field every time, snake_case, arrays never null.
func TestJSONShapes(t *testing.T) {
	url := startServeProc(t)
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	mem := filepath.Join(dir, "mem.img")
	writeRandom(t, mem, 1<<20, 5)
	common := "snapshot_id key manifest_digest source fallback_index chunk_size chunks_total chunks_written bytes_written bytes_skipped_zero duration_ms remote_error"
	saveKeys := sortedKeys(common + " remote_chunks_written published_local published_remote remote_skipped invalidated diff_base diff_bytes_read page_size artifacts_as_chunks")
	restoreKeys := sortedKeys(common + " files other_files remotes_served")
	lsKeys := sortedKeys("store location snapshots live_stored_bytes referenced_stored_bytes stored_bytes blobs")
	rowKeys := sortedKeys("instance scope platform_hash configuration_hash runner version_id ref snapshot_id digest_function completed age_seconds state newest live broken invalidated logical_bytes stored_bytes blobs missing_blobs previous_snapshot_id shared_chunks_with_previous")
	errorKeys := sortedKeys("kind message exit_code")
	versionKeys := sortedKeys("module version revision time modified go_version")
	emptyCache := filepath.Join(dir, "empty")
	for _, tc := range []struct {
		name string
		args []string
		code int
		keys []string
		// check looks further into the object.
		check func(t *testing.T, obj map[string]any)
	}{
		{"ls of an empty cache", []string{"ls", "--json", "--cache-dir", emptyCache}, exitOK, lsKeys, func(t *testing.T, obj map[string]any) {
			if s, ok := obj["snapshots"].([]any); !ok || len(s) != 0 {
				t.Errorf("snapshots = %#v, want []", obj["snapshots"])
			}
		}},
		{"save, local", append(keyArgs(cacheDir), "save", "--json", "--chunk-size", "64KiB", "--chunked", "mem.img="+mem), exitOK, saveKeys, nil},
		{"save, remote", append(keyArgs(filepath.Join(dir, "remote-host")), "save", "--json", "--remote", url, "--chunk-size", "64KiB", "--chunked", "mem.img="+mem), exitOK, saveKeys, nil},
		{"restore", append(keyArgs(cacheDir), "restore", "--json", "--out", filepath.Join(dir, "out")), exitOK, restoreKeys, func(t *testing.T, obj map[string]any) {
			if o, ok := obj["other_files"].([]any); !ok || len(o) != 0 {
				t.Errorf("other_files = %#v, want []", obj["other_files"])
			}
			if o, ok := obj["remotes_served"].([]any); !ok || len(o) != 0 {
				t.Errorf("remotes_served = %#v, want [] for a restore from the local cache", obj["remotes_served"])
			}
		}},
		{"restore, a miss", append(keyArgs(filepath.Join(dir, "nothing")), "restore", "--json", "--out", filepath.Join(dir, "out2")), exitNoSnapshot, []string{"error"}, func(t *testing.T, obj map[string]any) {
			e, _ := obj["error"].(map[string]any)
			if got := keysOf(e); !slices.Equal(got, errorKeys) {
				t.Errorf("error object keys %q, want %q", got, errorKeys)
			}
			if e["kind"] != "NotFound" || e["exit_code"] != float64(exitNoSnapshot) || e["message"] == "" {
				t.Errorf("error object %v", e)
			}
		}},
		{"save, a usage error", []string{"save", "--json", "--chunky"}, exitUsage, []string{"error"}, nil},
		{"ls, local", []string{"ls", "--json", "--cache-dir", cacheDir}, exitOK, lsKeys, nil},
		{"ls, remote", []string{"ls", "--json", "--remote", url}, exitOK, lsKeys, nil},
		{"version", []string{"version", "--json"}, exitOK, versionKeys, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := runCLI(t, tc.args...)
			if r.code != tc.code {
				t.Fatalf("exit code %d, want %d\nstdout: %s\nstderr: %s", r.code, tc.code, r.stdout, r.stderr)
			}
			dec := json.NewDecoder(strings.NewReader(r.stdout))
			var obj map[string]any
			if err := dec.Decode(&obj); err != nil {
				t.Fatalf("stdout is no JSON object: %v\n%s", err, r.stdout)
			}
			if dec.More() {
				t.Errorf("stdout has more than one JSON value:\n%s", r.stdout)
			}
			if got := keysOf(obj); !slices.Equal(got, tc.keys) {
				t.Errorf("keys %q, want %q", got, tc.keys)
			}
			if rows, ok := obj["snapshots"].([]any); ok {
				for i, row := range rows {
					if got := keysOf(row.(map[string]any)); !slices.Equal(got, rowKeys) {
						t.Errorf("snapshot %d keys %q, want %q", i, got, rowKeys)
					}
				}
			}
			if tc.check != nil {
				tc.check(t, obj)
			}
		})
	}
}

// An invalidated snapshot is listed as such, locally and on the remote.
func TestLsShowsInvalidated(t *testing.T) {
	url := startServeProc(t)
	dir := t.TempDir()
	for _, where := range []struct {
		name   string
		remote []string
	}{{"local", nil}, {"remote", []string{"--remote", url}}} {
		t.Run(where.name, func(t *testing.T) {
			cacheDir := filepath.Join(dir, where.name)
			id := saveOne(t, dir, cacheDir, where.remote...)
			state := func() string {
				args := append([]string{"ls", "--json", "--cache-dir", cacheDir}, where.remote...)
				out, _ := run(t, false, args...)
				var l listing
				if err := json.Unmarshal([]byte(out), &l); err != nil {
					t.Fatal(err)
				}
				for _, r := range l.Snapshots {
					if r.SnapshotID == id {
						if r.Invalidated != (r.State == "invalidated") {
							t.Errorf("row %+v: invalidated and state disagree", r)
						}
						return r.State
					}
				}
				t.Fatalf("ls does not list %s:\n%s", id, out)
				return ""
			}
			if s := state(); s != "newest" {
				t.Errorf("state before invalidate %q, want newest", s)
			}
			run(t, false, append(append(keyArgs(cacheDir), "invalidate"), where.remote...)...)
			if s := state(); s != "invalidated" {
				t.Errorf("state after invalidate %q, want invalidated", s)
			}
			table, _ := run(t, false, append([]string{"ls", "--cache-dir", cacheDir}, where.remote...)...)
			if !strings.Contains(table, "invalidated") {
				t.Errorf("ls table does not say invalidated:\n%s", table)
			}
		})
	}
}

func TestVersionCommand(t *testing.T) {
	out, _ := run(t, false, "version")
	if !strings.Contains(out, "github.com/snaploader/snaploader") || !strings.Contains(out, "go1.") {
		t.Errorf("version printed %q", out)
	}
}
