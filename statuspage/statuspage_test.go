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

func TestPageCapacityVersionAndInvalidated(t *testing.T) {
	st := sample()
	st.Server = ServerInfo{Version: "v1.2.3", Revision: "0123456789abcdef", Modified: true, GoVersion: "go1.99",
		Started: st.Generated.Add(-90 * time.Minute), UptimeSeconds: 5400}
	st.Capacity = Capacity{OnDisk: true, UsedBytes: 3 << 30, MaxBytes: 4 << 30, Evictions: 17}
	st.Budgets = []Budget{{Name: "upload memory", InUseBytes: 64 << 20, MaxBytes: 256 << 20}, {Name: "read memory", MaxBytes: 64 << 20}}
	st.Snapshots = append(st.Snapshots, Snapshot{Group: "team", Instance: "ci", Ref: "main", SnapshotID: "stale", State: "invalidated",
		Completed: st.Generated.Add(-5 * time.Hour), AgeSeconds: 5 * 3600})
	h := Handler(fakeSource{st: st})
	_, _, body := get(t, h, "/status")
	for _, want := range []string{
		`<code id="version">v1.2.3</code>`,
		`<code id="revision" title="">0123456789abcdef</code> <span id="modified">(modified)</span>`,
		`<span id="uptime" data-seconds="5400"`, `1h30m`,
		`data-used-bytes="3221225472" data-max-bytes="4294967296" data-evictions="17"`,
		`<td class="num">3.0 GiB</td><td class="num">4.0 GiB</td>`, `75.0%`,
		`<span id="evictions">17</span>`,
		`<tr class="budget" data-name="upload memory" data-in-use-bytes="67108864" data-max-bytes="268435456">`, `25.0%`,
		`<tr class="budget" data-name="read memory" data-in-use-bytes="0" data-max-bytes="67108864">`,
		`<td class="state state-invalidated">invalidated</td>`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("the page lacks %q", want)
		}
	}
	_, _, js := get(t, h, "/status?format=json")
	var back Status
	if err := json.Unmarshal([]byte(js), &back); err != nil {
		t.Fatal(err)
	}
	if back.Server.Revision != "0123456789abcdef" || back.Capacity.Evictions != 17 || len(back.Budgets) != 2 || back.Budgets[0].InUseBytes != 64<<20 {
		t.Errorf("JSON: %+v %+v %+v", back.Server, back.Capacity, back.Budgets)
	}
	// A backend that stores nothing on this host says so.
	st.Capacity = Capacity{}
	_, _, body = get(t, Handler(fakeSource{st: st}), "/status")
	if !strings.Contains(body, "nothing stored on this host") || strings.Contains(body, `id="evictions"`) {
		t.Error("a backend without disk is shown with a disk bound")
	}
}
