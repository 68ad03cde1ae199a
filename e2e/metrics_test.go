package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
)

// metricValue returns the value of the sample whose name and labels match
// the regular expression sample (e.g. `snaploader_cold_starts_total`), or
// -1 when there is none.
func metricValue(t *testing.T, text, sample string) float64 {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + sample + ` ([0-9.e+]+)$`).FindStringSubmatch(text)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// A cold and then a warm restore on one host, and a lookup that finds
// nothing, are told apart by the host's metrics textfile.
func TestRestoreMetricsTextfile(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", filepath.Join(dir, "serve"))
	mem := filepath.Join(dir, "mem")
	writeVM(t, mem, 1<<20, 7)
	key := []string{"--remote", srv.url(), "--instance", "m", "--config-hash", "c", "--ref", "main"}
	prom := filepath.Join(dir, "save.prom")
	run(ctx, append([]string{"save", "--cache-dir", filepath.Join(dir, "a"), "--chunk-size", "65536", "--chunked", "mem=" + mem, "--metrics-textfile", prom}, key...)...).must(t, "save")
	saved, _ := os.ReadFile(prom)
	if v := metricValue(t, string(saved), `snaploader_save_chunks_written_total`); v <= 0 {
		t.Errorf("save textfile: chunks written %v, want > 0:\n%s", v, saved)
	}

	restore := func(name string, args ...string) string {
		p := filepath.Join(dir, name+".prom")
		run(ctx, append(append([]string{"restore", "--cache-dir", filepath.Join(dir, "b"), "--out", filepath.Join(dir, name), "--metrics-textfile", p}, key...), args...)...)
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatalf("%s: no metrics textfile: %v", name, err)
		}
		return string(b)
	}
	cold := restore("cold")
	for _, c := range []struct {
		sample string
		want   func(float64) bool
	}{
		{`snaploader_snapshot_hits_total\{fallback_index="0",tier="remote"\}`, func(v float64) bool { return v == 1 }},
		{`snaploader_chunk_bytes_fetched_total\{tier="remote"\}`, func(v float64) bool { return v > 0 }},
		{`snaploader_chunk_bytes_fetched_total\{tier="local"\}`, func(v float64) bool { return v == -1 }},
		{`snaploader_chunk_wait_seconds_count\{tier="remote"\}`, func(v float64) bool { return v > 0 }},
		{`snaploader_cold_starts_total`, func(v float64) bool { return v == 0 }},
		// The remote that served, named by its URL.
		{`snaploader_remote_blob_reads_total\{remote="` + regexp.QuoteMeta(srv.url()) + `"\}`, func(v float64) bool { return v > 0 }},
		{`snaploader_remote_blob_bytes_total\{remote="` + regexp.QuoteMeta(srv.url()) + `"\}`, func(v float64) bool { return v > 0 }},
		{`snaploader_remote_up\{remote="` + regexp.QuoteMeta(srv.url()) + `"\}`, func(v float64) bool { return v == 1 }},
	} {
		if v := metricValue(t, cold, c.sample); !c.want(v) {
			t.Errorf("first restore on an empty cache: %s = %v\n%s", c.sample, v, cold)
		}
	}
	warm := restore("warm")
	for _, c := range []struct {
		sample string
		want   func(float64) bool
	}{
		{`snaploader_snapshot_hits_total\{fallback_index="0",tier="local"\}`, func(v float64) bool { return v == 1 }},
		{`snaploader_chunk_bytes_fetched_total\{tier="local"\}`, func(v float64) bool { return v > 0 }},
		{`snaploader_chunk_bytes_fetched_total\{tier="remote"\}`, func(v float64) bool { return v == -1 }},
		{`snaploader_remote_blob_bytes_total\{remote="` + regexp.QuoteMeta(srv.url()) + `"\}`, func(v float64) bool { return v == 0 }},
	} {
		if v := metricValue(t, warm, c.sample); !c.want(v) {
			t.Errorf("second restore on the same host: %s = %v\n%s", c.sample, v, warm)
		}
	}
	none := restore("none", "--config-hash", "other")
	if v := metricValue(t, none, `snaploader_cold_starts_total`); v != 1 {
		t.Errorf("a restore that finds nothing: cold starts %v, want 1\n%s", v, none)
	}
}
