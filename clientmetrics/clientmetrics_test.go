package clientmetrics

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/snapshot"
)

func TestMetricsServedAndWritten(t *testing.T) {
	m := New()
	m.Lookup(&snapshot.Snapshot{Source: snapshot.SourceRemote, FallbackIndex: 1}, nil)
	m.Lookup(nil, errors.New("no snapshot"))
	m.Fetched(cow.FetchEvent{Bytes: 4096000, Foreground: true, Wait: 3 * time.Millisecond, Tier: "remote"})
	m.Fetched(cow.FetchEvent{Bytes: 100, Tier: "local"})
	m.Saved(&snapshot.SaveResult{PublishedLocal: true, Files: []snapshot.FileStats{{SaveStats: cow.SaveStats{ChunksWritten: 3, BytesWritten: 300}}}})
	m.PublishSkipped("branch_key_has_snapshot")
	want := []string{
		`snaploader_snapshot_hits_total{fallback_index="1",tier="remote"} 1`,
		`snaploader_cold_starts_total 1`,
		`snaploader_chunk_bytes_fetched_total{tier="remote"} 4.096e+06`,
		`snaploader_chunk_bytes_fetched_total{tier="local"} 100`,
		`snaploader_chunk_fetches_total{kind="foreground",tier="remote"} 1`,
		`snaploader_chunk_fetches_total{kind="prefetch",tier="local"} 1`,
		`snaploader_chunk_wait_seconds_count{tier="remote"} 1`,
		`snaploader_save_chunks_written_total 3`,
		`snaploader_saves_total{published="local"} 1`,
		`snaploader_publish_skipped_total{reason="branch_key_has_snapshot"} 1`,
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, err := m.Serve(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	path := filepath.Join(t.TempDir(), "host.prom")
	if err := m.WriteTextfile(path); err != nil {
		t.Fatal(err)
	}
	file, _ := os.ReadFile(path)
	for name, text := range map[string]string{"/metrics": string(body), "textfile": string(file)} {
		for _, w := range want {
			if !strings.Contains(text, w+"\n") {
				t.Errorf("%s lacks %q:\n%s", name, w, text)
			}
		}
	}
}
