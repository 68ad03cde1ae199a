package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/remote"
)

// startServeUntil starts `snaploader serve` with args (which name where
// it listens) and waits until ready says it serves.
func startServeUntil(t *testing.T, env []string, ready func() bool, args ...string) *server {
	t.Helper()
	s := &server{args: args, env: env, log: &syncLog{}}
	cmd := exec.Command(binary, append([]string{"serve"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.cmd = cmd
	t.Cleanup(s.stop)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			s.log.WriteString(sc.Text() + "\n")
		}
	}()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if ready() {
			return s
		}
	}
	t.Fatalf("snaploader serve %s did not come up:\n%s", strings.Join(args, " "), s.log.String())
	return nil
}

func dials(network, addr string) func() bool {
	return func() bool {
		c, err := net.DialTimeout(network, addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	}
}

// roundTrip saves two snapshots through url and restores the second on a
// fresh host through url; extra are client flags (e.g. --ca-file).
func roundTrip(t *testing.T, url string, seed uint64, extra ...string) {
	t.Helper()
	p := saveTwo(t, nil, url, "main", seed, extra...)
	dir := t.TempDir()
	cli(t, nil, append([]string{"restore", "--cache-dir", filepath.Join(dir, "h"), "--out", filepath.Join(dir, "out")}, p.key...)...)
	if got, err := os.ReadFile(filepath.Join(dir, "out", "mem.img")); err != nil || !bytes.Equal(got, p.mem[1]) {
		t.Fatalf("the snapshot restored through %s differs (err %v)", url, err)
	}
	checkPair(t, lsJSON(t, nil, append([]string{"--remote", url}, extra...)...), p)
}

// Clients reach serve over TLS (grpcs:// with --ca-file, the server's
// certificate made here for 127.0.0.1) and over a Unix socket.
func TestServeTLSAndUnixSocket(t *testing.T) {
	t.Run("tls", func(t *testing.T) {
		f := testutil.NewTLSFiles(t, t.TempDir())
		srv := startServe(t, nil, "--cache-dir", t.TempDir(), "--tls-cert", f.ServerCert, "--tls-key", f.ServerKey)
		url := "grpcs://" + srv.addr
		roundTrip(t, url, 51, "--ca-file", f.CA)
		if !strings.Contains(srv.log.String(), "transport=TLS") {
			t.Errorf("serve does not say it serves TLS:\n%s", srv.log.String())
		}
		// Without the CA, or in plaintext, nothing is served.
		for _, args := range [][]string{{"--remote", url}, {"--remote", "grpc://" + srv.addr}} {
			r := run(ctxT(t), append([]string{"ls", "--remote-timeout", "5s"}, args...)...)
			if r.err == nil {
				t.Errorf("ls %s succeeded against a TLS server", strings.Join(args, " "))
			}
		}
	})
	t.Run("unix", func(t *testing.T) {
		dir, err := os.MkdirTemp("", "sl-sock-") // short: socket paths are limited to 108 bytes
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		sock := filepath.Join(dir, "serve.sock")
		// A socket left by a server that was killed is replaced.
		old, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		old.(*net.UnixListener).SetUnlinkOnClose(false)
		old.Close()
		srv := startServeUntil(t, nil, dials("unix", sock), "--listen", "unix://"+sock, "--cache-dir", t.TempDir())
		roundTrip(t, "unix://"+sock, 61)
		// A second server on the same socket is refused while the first
		// lives.
		r := run(ctxT(t), "serve", "--listen", "unix://"+sock, "--cache-dir", t.TempDir())
		if r.err == nil || !strings.Contains(r.stderr, "another server is listening") {
			t.Errorf("a second serve on a live socket: %v\n%s", r.err, r.stderr)
		}
		srv.stop()
	})
}

// With --tls-client-ca only clients presenting a certificate of that CA
// are served: the remote client's certificate options are accepted, the
// CLI without one is refused.
func TestServeMutualTLS(t *testing.T) {
	f := testutil.NewTLSFiles(t, t.TempDir())
	srv := startServe(t, nil, "--cache-dir", t.TempDir(), "--tls-cert", f.ServerCert, "--tls-key", f.ServerKey, "--tls-client-ca", f.CA)
	url := "grpcs://" + srv.addr
	dialCert := func(t *testing.T) *remote.Client {
		c, err := remote.Dial(ctxT(t), url, remote.Options{CAFile: f.CA, ClientCertFile: f.ClientCert, ClientKeyFile: f.ClientKey, MaxRetries: 1})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	dir := t.TempDir()
	want := writeVM(t, filepath.Join(dir, "mem.img"), 4<<20, 9)
	a := newHost(t, dialCert(t))
	a.saveFile(t, filepath.Join(dir, "mem.img"))
	b := newHost(t, dialCert(t))
	_, s := b.unpack(t)
	if !bytes.Equal(readAll(t, s), want) {
		t.Error("the memory restored over mutual TLS differs")
	}
	if r := run(ctxT(t), "ls", "--remote", url, "--ca-file", f.CA, "--remote-timeout", "5s"); r.err == nil {
		t.Error("a client without a certificate was served")
	}
	// The CLI presents its certificate with --tls-client-cert/--tls-client-key.
	tlsArgs := []string{"--remote", url, "--ca-file", f.CA, "--tls-client-cert", f.ClientCert, "--tls-client-key", f.ClientKey, "--remote-required",
		"--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main"}
	run(ctxT(t), append([]string{"save", "--cache-dir", filepath.Join(dir, "cli-a"), "--chunked", "mem.img=" + filepath.Join(dir, "mem.img"), "--save-policy", "always"}, tlsArgs...)...).must(t, "save over mutual TLS")
	out := filepath.Join(dir, "cli-out")
	r := run(ctxT(t), append([]string{"restore", "--json", "--cache-dir", filepath.Join(dir, "cli-b"), "--out", out}, tlsArgs...)...).must(t, "restore over mutual TLS")
	if rep := r.report(t); rep["source"] != "remote" {
		t.Errorf("restore over mutual TLS reported %v, want the remote", rep)
	}
	if got, err := os.ReadFile(filepath.Join(out, "mem.img")); err != nil || !bytes.Equal(got, want) {
		t.Errorf("the memory restored by the CLI over mutual TLS differs (%v)", err)
	}
	if _, err := remote.Dial(ctxT(t), url, remote.Options{CAFile: f.CA, MaxRetries: -1, CallTimeout: 5 * time.Second}); err == nil {
		t.Error("remote.Dial without a client certificate was served")
	}
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// accessLine is one access-log line of serve --log-format json.
type accessLine struct {
	Level      string  `json:"level"`
	Msg        string  `json:"msg"`
	Method     string  `json:"method"`
	Code       string  `json:"code"`
	Group      string  `json:"group"`
	Instance   string  `json:"instance"`
	Digest     string  `json:"digest"`
	Blobs      int     `json:"blobs"`
	BytesIn    int64   `json:"bytes_in"`
	BytesOut   int64   `json:"bytes_out"`
	DurationMS float64 `json:"duration_ms"`
	Peer       string  `json:"peer"`
}

func accessLines(t *testing.T, log string) []accessLine {
	t.Helper()
	var out []accessLine
	for _, raw := range strings.Split(strings.TrimSpace(log), "\n") {
		var l accessLine
		if err := json.Unmarshal([]byte(raw), &l); err != nil {
			t.Fatalf("a log line of --log-format json is not JSON: %q", raw)
		}
		if l.Msg == "rpc" {
			out = append(out, l)
		}
	}
	return out
}

// Health endpoints, the gRPC health service, API keys from a file and the
// environment, and the JSON access log of a save and a restore.
func TestServeHealthKeysAndAccessLog(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "api-keys")
	if err := os.WriteFile(keyFile, []byte("# writers\nk-file=team\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A key file others may read is refused.
	r := run(ctxT(t), "serve", "--listen", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "--cache-dir", t.TempDir(), "--api-key-file", keyFile)
	if r.err == nil || !strings.Contains(r.stderr, "chmod 600") {
		t.Fatalf("serve with a world-readable key file: %v\n%s", r.err, r.stderr)
	}
	os.Chmod(keyFile, 0o600)
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	srv := startServe(t, []string{"SNAPLOADER_API_KEYS=k-env=other:ro, k-env2=other"}, "--cache-dir", t.TempDir(), "--metrics-addr", metrics,
		"--api-key-file", keyFile, "--log-format", "json")
	if strings.Contains(srv.log.String(), "k-file") || strings.Contains(srv.log.String(), "k-env") {
		t.Errorf("serve logged an API key:\n%s", srv.log.String())
	}
	if code, body := httpGet(t, "http://"+metrics+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, body := httpGet(t, "http://"+metrics+"/readyz"); code != 200 || body != "ready\n" {
		t.Errorf("/readyz: %d %q", code, body)
	}
	conn, err := grpc.NewClient(srv.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := healthpb.NewHealthClient(conn).Check(ctxT(t), &healthpb.HealthCheckRequest{})
		if err == nil && resp.Status == healthpb.HealthCheckResponse_SERVING {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("gRPC health: %v %v, want SERVING", resp, err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Keys from the file and the environment both work, the
	// environment's read-only one cannot save.
	p := saveTwo(t, nil, srv.url(), "main", 81, "--api-key", "k-file")
	out := t.TempDir()
	cli(t, nil, append([]string{"restore", "--cache-dir", filepath.Join(out, "h"), "--out", filepath.Join(out, "out")}, p.key...)...)
	if ls := lsJSON(t, nil, "--remote", srv.url(), "--api-key", "k-env"); len(ls.Snapshots) != 0 {
		t.Errorf("group other sees %d snapshots of group team", len(ls.Snapshots))
	}
	if r := run(ctxT(t), "invalidate", "--remote", srv.url(), "--api-key", "k-env", "--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--cache-dir", t.TempDir()); r.err == nil {
		t.Error("a read-only key from $SNAPLOADER_API_KEYS could write")
	}
	run(ctxT(t), "ls", "--remote", srv.url(), "--api-key", "wrong")

	lines := accessLines(t, srv.log.String())
	seen := map[string]int{}
	for _, l := range lines {
		seen[l.Method+" "+l.Code]++
		if l.Level != "INFO" || l.Peer == "" || l.DurationMS < 0 {
			t.Errorf("access-log line %+v", l)
		}
		switch {
		case l.Code == "Unauthenticated":
			if l.Group != "" {
				t.Errorf("an unauthenticated call is logged with group %q", l.Group)
			}
		case l.Group != "team" && l.Group != "other":
			t.Errorf("an authenticated call is logged without its group: %+v", l)
		}
		if l.Method == "ByteStream/Write" && l.Code == "OK" && (l.Digest == "" || l.BytesIn == 0 || l.Instance != "ci") {
			t.Errorf("an upload's line lacks its digest, bytes or instance: %+v", l)
		}
		if l.Method == "ActionCache/GetActionResult" && l.Digest == "" {
			t.Errorf("an action-cache lookup's line lacks its digest: %+v", l)
		}
	}
	for _, want := range []string{"Capabilities/GetCapabilities OK", "ContentAddressableStorage/FindMissingBlobs OK",
		"ActionCache/UpdateActionResult OK", "ActionCache/GetActionResult OK", "Inventory/ListSnapshots OK", "Capabilities/GetCapabilities Unauthenticated"} {
		if seen[want] == 0 {
			t.Errorf("no access-log line for %s; lines: %v", want, seen)
		}
	}
	if seen["ByteStream/Write OK"]+seen["ContentAddressableStorage/BatchUpdateBlobs OK"] == 0 {
		t.Errorf("no access-log line for an upload; lines: %v", seen)
	}
	if strings.Contains(srv.log.String(), "Health/") {
		t.Error("health checks are in the access log at info level")
	}

	// --access-log=false: no line per RPC.
	quiet := startServe(t, nil, "--cache-dir", t.TempDir(), "--log-format", "json", "--access-log=false")
	lsJSON(t, nil, "--remote", quiet.url())
	if l := accessLines(t, quiet.log.String()); len(l) != 0 {
		t.Errorf("--access-log=false still logged %d RPCs", len(l))
	}
}

// A setting is taken from the command line, else from its SNAPLOADER_*
// variable, else from the --config file, else its default.
func TestServeConfigPrecedence(t *testing.T) {
	dir := t.TempDir()
	grpcAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	fileMetrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	envMetrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	config := filepath.Join(dir, "serve.yaml")
	if err := os.WriteFile(config, []byte(fmt.Sprintf(`# serve's settings
listen: %s
metrics-addr: %s
cache-dir: %s
max-bytes: 1073741824
max-read-memory: 33554432
log-format: json
api-key: [k1=team, k2=team:ro]
`, grpcAddr, fileMetrics, filepath.Join(dir, "cache"))), 0o600); err != nil {
		t.Fatal(err)
	}
	env := []string{"SNAPLOADER_CONFIG=" + config, "SNAPLOADER_METRICS_ADDR=" + envMetrics, "SNAPLOADER_MAX_BYTES=2147483648",
		"SNAPLOADER_LOG_FORMAT=json", "SNAPLOADER_API_KEY=a-client-key"}
	srv := startServeUntil(t, env, dials("tcp", envMetrics), "--log-format", "text", "--max-read-memory", "16777216")
	if !dials("tcp", grpcAddr)() || dials("tcp", fileMetrics)() {
		t.Fatalf("listen from the file, metrics from the environment: gRPC %s up %v, the file's metrics %s up %v\n%s",
			grpcAddr, dials("tcp", grpcAddr)(), fileMetrics, dials("tcp", fileMetrics)(), srv.log.String())
	}
	log := srv.log.String()
	if !strings.Contains(log, `level=INFO msg="serving REAPI cache"`) || strings.Contains(log, `{"time"`) {
		t.Errorf("--log-format text on the command line lost to the environment or the file:\n%s", log)
	}
	for _, want := range []string{"--listen from " + config, "--metrics-addr from $SNAPLOADER_METRICS_ADDR", "--max-bytes from $SNAPLOADER_MAX_BYTES", "api_keys=2"} {
		if !strings.Contains(log, want) {
			t.Errorf("the log does not say %q:\n%s", want, log)
		}
	}
	resp, err := http.Get("http://" + envMetrics + "/status?format=json")
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Capacity struct {
			MaxBytes int64 `json:"max_bytes"`
		} `json:"capacity"`
		Budgets []struct {
			Name     string `json:"name"`
			MaxBytes int64  `json:"max_bytes"`
		} `json:"budgets"`
	}
	json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if st.Capacity.MaxBytes != 2<<30 {
		t.Errorf("max bytes %d: want the environment's 2 GiB over the file's 1 GiB", st.Capacity.MaxBytes)
	}
	for _, b := range st.Budgets {
		if b.Name == "read memory" && b.MaxBytes != 16<<20 {
			t.Errorf("read memory budget %d: want the command line's 16 MiB over the file's 32", b.MaxBytes)
		}
		if b.Name == "upload memory" && b.MaxBytes != 256<<20 {
			t.Errorf("upload memory budget %d: want the default 256 MiB", b.MaxBytes)
		}
	}
	// The file's keys are in force ($SNAPLOADER_API_KEY, a client's
	// setting, is not read as one).
	if r := run(ctxT(t), "ls", "--remote", "grpc://"+grpcAddr); r.err == nil {
		t.Error("a call without a key was served")
	}
	lsJSON(t, nil, "--remote", "grpc://"+grpcAddr, "--api-key", "k2")

	// Keys in a config file others may read, a misspelt setting and a bad
	// value are refused.
	os.Chmod(config, 0o644)
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"SNAPLOADER_CONFIG=" + config}, "chmod 600"},
		{[]string{"SNAPLOADER_MAX_BYTES=lots"}, "$SNAPLOADER_MAX_BYTES"},
	} {
		cmd := exec.Command(binary, "serve", "--listen", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "--cache-dir", t.TempDir())
		cmd.Env = append(os.Environ(), tc.env...)
		outb, err := runBounded(cmd)
		if err == nil || !strings.Contains(outb, tc.want) {
			t.Errorf("serve with %v: %v, want an error saying %q\n%s", tc.env, err, tc.want, outb)
		}
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("max-byte: 1\n"), 0o600)
	cmd := exec.Command(binary, "serve", "--config", bad)
	if outb, err := runBounded(cmd); err == nil || !strings.Contains(outb, `"max-byte" is not a setting`) {
		t.Errorf("a misspelt setting: %v\n%s", err, outb)
	}
}

// runBounded runs cmd (expected to fail at once) for at most 30 s.
func runBounded(cmd *exec.Cmd) (string, error) {
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return b.String(), err
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		return b.String(), fmt.Errorf("still running after 30s")
	}
}
