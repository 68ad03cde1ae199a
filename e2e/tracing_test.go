package e2e

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

// runEnv is run with extra environment variables.
func runEnv(ctx context.Context, env []string, args ...string) cliResult {
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return cliResult{out.String(), errb.String(), err}
}

func tag(s testutil.JaegerSpan, key string) any {
	for _, t := range s.Tags {
		if t.Key == key {
			return t.Value
		}
	}
	return nil
}

// A cold restore through serve is one trace in a real Jaeger holding the
// client's spans (the command, the lookup with one span per key, the unpack,
// chunk fetches from the remote tier) and the serve process's RPC spans,
// children of the client's calls.
func TestColdRestoreIsOneTraceAcrossProcesses(t *testing.T) {
	ctx := ctxT(t)
	j := testutil.StartJaeger(t)
	env := []string{"OTEL_EXPORTER_OTLP_ENDPOINT=http://" + j.OTLP}
	dir := t.TempDir()
	srv := startServe(t, env, "--cache-dir", filepath.Join(dir, "serve"))
	mem := filepath.Join(dir, "mem")
	writeVM(t, mem, 1<<20, 12)
	key := []string{"--remote", srv.url(), "--instance", "tr", "--config-hash", "c", "--ref", "feature", "--default-ref", "main"}
	runEnv(ctx, nil, append(append([]string{"save", "--cache-dir", filepath.Join(dir, "a"), "--chunk-size", "65536", "--chunked", "mem=" + mem}, key...), "--ref", "main")...).must(t, "save on main")
	runEnv(ctx, env, append([]string{"restore", "--cache-dir", filepath.Join(dir, "b"), "--out", filepath.Join(dir, "out")}, key...)...).must(t, "traced cold restore")

	// Both processes export in batches: wait for the trace to hold the
	// restore's span and some of serve's.
	var found *testutil.JaegerTrace
	complete := func(tr testutil.JaegerTrace) bool {
		var restore, serve bool
		for _, s := range tr.Spans {
			restore = restore || s.Operation == "snaploader restore"
			serve = serve || tr.Service(s) == "snaploader-serve"
		}
		return restore && serve
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for _, tr := range j.Traces(t, "snaploader") {
			if complete(tr) {
				found = &tr
			}
		}
		if found != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if found == nil {
		t.Fatal("no trace holding the restore and serve's work reached jaeger")
	}
	ops := map[string]map[string]int{} // service -> operation -> count
	byID := map[string]testutil.JaegerSpan{}
	for _, s := range found.Spans {
		svc := found.Service(s)
		if ops[svc] == nil {
			ops[svc] = map[string]int{}
		}
		ops[svc][s.Operation]++
		byID[s.SpanID] = s
	}
	for _, want := range []string{"snaploader restore", "snaploader.get_snapshot", "snaploader.get_key", "snaploader.unpack", "snaploader.chunk_fetch"} {
		if ops["snaploader"][want] == 0 {
			t.Errorf("the restore's trace has no %q span (client spans: %v)", want, ops["snaploader"])
		}
	}
	// One span per key tried: the branch key (absent) and the fallback.
	if n := ops["snaploader"]["snaploader.get_key"]; n != 2 {
		t.Errorf("%d get_key spans, want 2 (branch key rejected, fallback used)", n)
	}
	remoteFetches, remoteReads := 0, 0
	for _, s := range found.Spans {
		if s.Operation == "snaploader.chunk_fetch" && tag(s, "tier") == "remote" {
			remoteFetches++
			// The fetch names the remote that served it.
			if got := tag(s, "remote"); got != srv.url() {
				t.Errorf("a chunk fetch from the remote tier says remote=%v, want %s", got, srv.url())
			}
		}
		if s.Operation == "snaploader.remote_read" {
			remoteReads++
			if got := tag(s, "remote"); got != srv.url() {
				t.Errorf("a remote_read span says remote=%v, want %s", got, srv.url())
			}
		}
		if s.Operation == "snaploader.get_key" && tag(s, "fallback_index") == float64(0) && tag(s, "rejected") != "absent" {
			t.Errorf("the branch key's span says rejected=%v, want absent", tag(s, "rejected"))
		}
	}
	if remoteFetches == 0 {
		t.Error("no chunk fetch span says tier=remote")
	}
	if remoteReads == 0 {
		t.Error("no remote_read span: the blob reads from the remotes are not traced")
	}
	serveSpans := 0
	for _, s := range found.Spans {
		if found.Service(s) != "snaploader-serve" {
			continue
		}
		serveSpans++
		parentFromClient := false
		for _, r := range s.References {
			if p, ok := byID[r.SpanID]; ok && found.Service(p) == "snaploader" {
				parentFromClient = true
			}
		}
		if !parentFromClient {
			t.Errorf("serve span %q is not a child of a client span", s.Operation)
		}
	}
	if serveSpans == 0 {
		t.Fatalf("the restore's trace holds no span of the serve process (services: %v)", ops)
	}
}

// With tracing off nothing is exported: not even a connection attempt to
// the default OTLP port.
func TestNoExporterTrafficWhenTracingIsOff(t *testing.T) {
	ctx := ctxT(t)
	l, err := net.Listen("tcp", "127.0.0.1:4317")
	if err != nil {
		testutil.Unavailable(t, "the default OTLP port 127.0.0.1:4317 is taken: "+err.Error())
	}
	defer l.Close()
	var conns atomic.Int64
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			c.Close()
		}
	}()
	dir := t.TempDir()
	off := []string{"OTEL_EXPORTER_OTLP_ENDPOINT=", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="}
	srv := startServe(t, off, "--cache-dir", filepath.Join(dir, "serve"))
	mem := filepath.Join(dir, "mem")
	writeVM(t, mem, 256<<10, 13)
	key := []string{"--remote", srv.url(), "--instance", "tr", "--config-hash", "c", "--ref", "main"}
	runEnv(ctx, off, append([]string{"save", "--cache-dir", filepath.Join(dir, "a"), "--chunk-size", "65536", "--chunked", "mem=" + mem}, key...)...).must(t, "save")
	runEnv(ctx, off, append([]string{"restore", "--cache-dir", filepath.Join(dir, "b"), "--out", filepath.Join(dir, "out")}, key...)...).must(t, "restore")
	time.Sleep(300 * time.Millisecond)
	if n := conns.Load(); n != 0 {
		t.Errorf("%d connections to the OTLP port with tracing off", n)
	}
}
