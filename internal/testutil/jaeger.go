package testutil

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Jaeger is a Jaeger (v2) process started for one test by StartJaeger: an
// OTLP/gRPC receiver with in-memory storage and its query API, both on
// 127.0.0.1.
type Jaeger struct {
	// OTLP is the receiver's "127.0.0.1:PORT".
	OTLP string
	// Query is the query API's base URL, "http://127.0.0.1:PORT".
	Query string
}

// JaegerSpan is a span as the query API returns it.
type JaegerSpan struct {
	TraceID   string `json:"traceID"`
	SpanID    string `json:"spanID"`
	Operation string `json:"operationName"`
	ProcessID string `json:"processID"`
	Tags      []struct {
		Key   string `json:"key"`
		Value any    `json:"value"`
	} `json:"tags"`
	References []struct {
		RefType string `json:"refType"`
		SpanID  string `json:"spanID"`
	} `json:"references"`
}

// JaegerTrace is a trace as the query API returns it.
type JaegerTrace struct {
	TraceID   string       `json:"traceID"`
	Spans     []JaegerSpan `json:"spans"`
	Processes map[string]struct {
		ServiceName string `json:"serviceName"`
	} `json:"processes"`
}

// Service names the process a span came from.
func (t JaegerTrace) Service(s JaegerSpan) string { return t.Processes[s.ProcessID].ServiceName }

const jaegerConfig = `service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: mem
    http:
      endpoint: 127.0.0.1:%d
    grpc:
      endpoint: 127.0.0.1:%d
  jaeger_storage:
    backends:
      mem:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:%d
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: mem
`

// StartJaeger starts Jaeger on free 127.0.0.1 ports, stopped at the end of
// the test. Without a jaeger binary the test skips, or fails under CI.
func StartJaeger(t testing.TB) Jaeger {
	t.Helper()
	bin, err := serverBinary("jaeger", ".ci/jaeger.sh")
	if err != nil {
		Unavailable(t, err.Error())
	}
	var ports [3]int
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "jaeger.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(jaegerConfig, ports[0], ports[1], ports[2])), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "jaeger.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config=file:"+cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting jaeger: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		logf.Close()
	})
	j := Jaeger{OTLP: fmt.Sprintf("127.0.0.1:%d", ports[2]), Query: fmt.Sprintf("http://127.0.0.1:%d", ports[0])}
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", j.OTLP, 200*time.Millisecond)
		if err == nil {
			c.Close()
			if resp, err := http.Get(j.Query + "/api/services"); err == nil {
				resp.Body.Close()
				return j
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("jaeger did not listen on %s and %s:\n%s", j.OTLP, j.Query, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Traces returns the traces of service that the query API holds.
func (j Jaeger) Traces(t testing.TB, service string) []JaegerTrace {
	t.Helper()
	resp, err := http.Get(j.Query + "/api/traces?limit=100&service=" + url.QueryEscape(service))
	if err != nil {
		t.Fatalf("querying jaeger: %v", err)
	}
	defer resp.Body.Close()
	var out struct {
		Data []JaegerTrace `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatalf("decoding jaeger's answer: %v", err)
	}
	return out.Data
}
