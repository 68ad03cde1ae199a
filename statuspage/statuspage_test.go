package statuspage

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/gc"
)

type fakeSource struct {
	st  *Status
	err error
}

func (f fakeSource) Status(context.Context) (*Status, error) {
	if f.err != nil {
		return nil, f.err
	}
	c := *f.st
	c.Snapshots = append([]Snapshot(nil), f.st.Snapshots...)
	return &c, nil
}

func sample() *Status {
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	read := now.Add(-90 * time.Second)
	shared := 0.75
	return &Status{
		Generated: now, Backend: "directory /srv/cache",
		ActionCache: Lookups{Hits: 3, Misses: 1}, CAS: Lookups{Hits: 10, Misses: 30},
		GC:         []GCRun{{Started: now.Add(-time.Hour), Report: &gc.Report{Snapshots: 2, ExpiredSnapshots: 1, Entries: gc.Counts{Deleted: 1}, Blobs: gc.Counts{Deleted: 7, DeletedBytes: 7 << 20}}}},
		GCInterval: "1h0m0s",
		Snapshots: []Snapshot{
			{Group: "team", Instance: "ci", Ref: "main", SnapshotID: "old", State: "retained", Completed: now.Add(-3 * time.Hour), AgeSeconds: 3 * 3600, LogicalBytes: 2 << 20, StoredBytes: 1 << 20},
			{Group: "team", Instance: "ci", Ref: "main", SnapshotID: "new", State: "newest", Completed: now.Add(-time.Minute), AgeSeconds: 60, LastRead: &read, LogicalBytes: 2 << 20, StoredBytes: 3 << 19, PreviousID: "old", SharedChunks: &shared},
			{Group: "", Instance: "ci", Ref: `<script>alert(1)</script>`, SnapshotID: "anon", State: "expired", Completed: now.Add(-10 * 24 * time.Hour), AgeSeconds: 10 * 86400, LogicalBytes: 100, StoredBytes: 4096},
		},
	}
}

func get(t *testing.T, h http.Handler, target string, header ...string) (int, string, string) {
	t.Helper()
	req := httptest.NewRequest("GET", target, nil)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	b, _ := io.ReadAll(w.Result().Body)
	return w.Code, w.Header().Get("Content-Type"), string(b)
}

func TestPage(t *testing.T) {
	h := Handler(fakeSource{st: sample()})
	code, ctype, body := get(t, h, "/status")
	if code != 200 || !strings.HasPrefix(ctype, "text/html") {
		t.Fatalf("GET /status: %d %s", code, ctype)
	}
	for _, want := range []string{
		`data-snapshot-id="new" data-group="team" data-logical-bytes="2097152" data-stored-bytes="1572864" data-age-seconds="60"`,
		`href="status/snapshot?group=team&amp;id=new"`,
		`<td class="num stored">1.5 MiB</td>`,
		`<td class="num age" title="2025-03-01T09:00:00Z">3h00m</td>`,
		`1m30s ago`,
		`75.0%`,                      // shared chunks
		`<td class="num">75.0%</td>`, // action-cache hit rate
		`<td class="num">25.0%</td>`, // CAS hit rate
		`<td class="num gc-blobs-deleted">7</td>`,
		`Every 1h0m0s.`,
		`&lt;script&gt;alert(1)&lt;/script&gt;`,
		`(anonymous)`,
		`10d00h`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("the page lacks %q", want)
		}
	}
	if strings.Contains(body, "<script>") {
		t.Error("a ref was rendered unescaped")
	}
	// Newest first within a key.
	if strings.Index(body, `data-snapshot-id="new"`) > strings.Index(body, `data-snapshot-id="old"`) {
		t.Error("the older snapshot of a key is listed before the newer")
	}
}

func TestJSON(t *testing.T) {
	h := Handler(fakeSource{st: sample()})
	for _, tc := range []struct {
		name   string
		target string
		header []string
	}{
		{"format", "/status?format=json", nil},
		{"accept", "/status", []string{"Accept", "application/json"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, ctype, body := get(t, h, tc.target, tc.header...)
			var st Status
			if err := json.Unmarshal([]byte(body), &st); err != nil || code != 200 || ctype != "application/json" {
				t.Fatalf("%d %s %v\n%s", code, ctype, err, body)
			}
			if len(st.Snapshots) != 3 || st.ActionCache.Hits != 3 || len(st.GC) != 1 || st.GC[0].Report.Blobs.Deleted != 7 {
				t.Errorf("JSON status: %+v", st)
			}
		})
	}
}

func TestSnapshotJSON(t *testing.T) {
	h := Handler(fakeSource{st: sample()})
	for _, tc := range []struct {
		target string
		code   int
		id     string
	}{
		{"/status/snapshot?group=team&id=new", 200, "new"},
		{"/status/snapshot?group=&id=anon", 200, "anon"},
		{"/status/snapshot?group=other&id=new", 404, ""},
		{"/status/snapshot?group=team&id=missing", 404, ""},
	} {
		code, _, body := get(t, h, tc.target)
		if code != tc.code {
			t.Errorf("%s: %d, want %d", tc.target, code, tc.code)
			continue
		}
		if tc.id == "" {
			continue
		}
		var s Snapshot
		if err := json.Unmarshal([]byte(body), &s); err != nil || s.SnapshotID != tc.id {
			t.Errorf("%s: %v %+v", tc.target, err, s)
		}
	}
}

func TestSourceFailure(t *testing.T) {
	code, _, body := get(t, Handler(fakeSource{err: errors.New("bucket unreachable")}), "/status")
	if code != 500 || !strings.Contains(body, "bucket unreachable") {
		t.Errorf("%d %s", code, body)
	}
	st := sample()
	st.Snapshots, st.GC = nil, nil
	_, _, body = get(t, Handler(fakeSource{st: st}), "/status")
	if !strings.Contains(body, `id="no-snapshots"`) {
		t.Error("an empty store does not say it has no snapshots")
	}
}
