package e2e

import (
	"bytes"
	"context"
	"debug/buildinfo"
	"encoding/json"
	"fmt"
	"html"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

// chromium runs headless Chromium with args and the page URL and returns
// its stdout.
func chromium(t *testing.T, bin, url string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	all := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
		"--disable-component-update", "--disable-sync", "--no-first-run", "--user-data-dir=" + t.TempDir()}, args...)
	cmd := exec.CommandContext(ctx, bin, append(all, url)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.Bytes()
}

// domRow is a snapshot row of the rendered page.
type domRow struct {
	group, state, lastRead, href string
	logical, stored, age         int64
}

var (
	rowRE  = regexp.MustCompile(`(?s)<tr class="snapshot" data-snapshot-id="([^"]+)" data-group="([^"]*)" data-logical-bytes="(\d+)" data-stored-bytes="(\d+)" data-age-seconds="(\d+)">(.*?)</tr>`)
	hrefRE = regexp.MustCompile(`<a class="snapshot-json" href="([^"]+)">`)
	cellRE = func(class string) *regexp.Regexp {
		return regexp.MustCompile(`(?s)<td class="[^"]*\b` + class + `\b[^"]*"[^>]*>(.*?)</td>`)
	}
	stateRE, lastReadRE = cellRE("state"), cellRE("last-read")
	tagRE               = regexp.MustCompile(`<[^>]+>`)
)

func domRows(t *testing.T, dom string) map[string]domRow {
	t.Helper()
	rows := map[string]domRow{}
	for _, m := range rowRE.FindAllStringSubmatch(dom, -1) {
		n := func(s string) int64 { v, _ := strconv.ParseInt(s, 10, 64); return v }
		r := domRow{group: m[2], logical: n(m[3]), stored: n(m[4]), age: n(m[5])}
		if h := hrefRE.FindStringSubmatch(m[6]); h != nil {
			r.href = html.UnescapeString(h[1])
		}
		if s := stateRE.FindStringSubmatch(m[6]); s != nil {
			r.state = strings.TrimSpace(tagRE.ReplaceAllString(s[1], ""))
		}
		if s := lastReadRE.FindStringSubmatch(m[6]); s != nil {
			r.lastRead = strings.TrimSpace(tagRE.ReplaceAllString(s[1], ""))
		}
		rows[m[1]] = r
	}
	return rows
}

func TestStatusPageInChromium(t *testing.T) {
	bin := testutil.LookPath(t, "chromium")
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	started := time.Now()
	srv := startServe(t, nil, "--cache-dir", t.TempDir(), "--metrics-addr", metrics, "--max-bytes", "1073741824",
		"--api-key", "k-team=team", "--api-key", "k-other=other")
	team := saveTwo(t, nil, srv.url(), "main", 51, "--api-key", "k-team")
	other := saveTwo(t, nil, srv.url(), "dev", 61, "--api-key", "k-other")
	dir := t.TempDir()
	cli(t, nil, append([]string{"restore", "--cache-dir", filepath.Join(dir, "h"), "--out", filepath.Join(dir, "out")}, team.key...)...)
	if got, err := os.ReadFile(filepath.Join(dir, "out", "mem.img")); err != nil || !bytes.Equal(got, team.mem[1]) {
		t.Fatalf("restore differs (err %v)", err)
	}
	// What each group's listing says, to compare the page with.
	want := map[string]lsRow{}
	for _, g := range []struct {
		key string
		p   *savedPair
	}{{"k-team", team}, {"k-other", other}} {
		ls := lsJSON(t, nil, "--remote", srv.url(), "--api-key", g.key)
		checkPair(t, ls, g.p)
		for _, r := range ls.Snapshots {
			want[r.SnapshotID] = r
		}
	}

	page := "http://" + metrics + "/status"
	dom := string(chromium(t, bin, page, "--dump-dom"))
	if !strings.Contains(dom, "<h1>snaploader serve</h1>") {
		t.Fatalf("chromium did not render the status page:\n%s", dom)
	}
	rows := domRows(t, dom)
	if len(rows) != 4 {
		t.Errorf("the page lists %d snapshots, want 4:\n%s", len(rows), dom)
	}
	for id, w := range want {
		r, ok := rows[id]
		if !ok {
			t.Errorf("snapshot %s is not on the page", id)
			continue
		}
		if r.logical != 2<<20 || r.logical != w.LogicalBytes || r.stored != w.StoredBytes {
			t.Errorf("snapshot %s: logical %d, stored %d on the page; ls says %d and %d", id, r.logical, r.stored, w.LogicalBytes, w.StoredBytes)
		}
		if r.age < 0 || r.age > w.AgeSeconds+120 {
			t.Errorf("snapshot %s: age %ds on the page, ls says %ds", id, r.age, w.AgeSeconds)
		}
		wantState := "retained"
		if w.Newest {
			wantState = "newest"
		}
		if r.state != wantState {
			t.Errorf("snapshot %s: state %q, want %q", id, r.state, wantState)
		}
		// The row links to its JSON, which names it with the same sizes.
		if !strings.HasPrefix(r.href, "status/snapshot?") {
			t.Errorf("snapshot %s links to %q", id, r.href)
			continue
		}
		resp, err := http.Get("http://" + metrics + "/" + r.href)
		if err != nil {
			t.Fatal(err)
		}
		var js struct {
			SnapshotID   string `json:"snapshot_id"`
			Group        string `json:"group"`
			StoredBytes  int64  `json:"stored_bytes"`
			LogicalBytes int64  `json:"logical_bytes"`
		}
		err = json.NewDecoder(resp.Body).Decode(&js)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || js.SnapshotID != id || js.Group != r.group || js.StoredBytes != r.stored || js.LogicalBytes != r.logical {
			t.Errorf("the JSON of snapshot %s (%s): %d %+v (err %v)", id, r.href, resp.StatusCode, js, err)
		}
	}
	if r := rows[team.ids[1]]; r.group != "team" || r.lastRead == "never" || !strings.HasSuffix(r.lastRead, "ago") {
		t.Errorf("the restored snapshot: group %q, last read %q; want team, read a moment ago", r.group, r.lastRead)
	}
	if r := rows[other.ids[1]]; r.group != "other" || r.lastRead != "never" {
		t.Errorf("the never-restored snapshot of group other: group %q, last read %q; want never", r.group, r.lastRead)
	}
	if !regexp.MustCompile(`<tr id="lookups-ac"><th>[^<]*</th><td class="num">[1-9]\d*</td>`).MatchString(dom) {
		t.Errorf("the page shows no action-cache hit after a restore:\n%s", dom)
	}
	// The JSON twin agrees with the page.
	st := getStatus(t, metrics)
	if len(st.Snapshots) != 4 || st.ActionCache.Hits == 0 {
		t.Errorf("status JSON: %d snapshots, %d action-cache hits", len(st.Snapshots), st.ActionCache.Hits)
	}
	req, _ := http.NewRequest("GET", page, nil)
	req.Header.Set("Accept", "application/json")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.Header.Get("Content-Type") != "application/json" {
		t.Errorf("/status with Accept: application/json: %v %v", err, resp.Header)
	} else {
		resp.Body.Close()
	}

	checkCapacityAndBuild(t, dom, metrics, started)

	// Invalidating team's key: its snapshots are never given to a client
	// again, and the page says so; group other's are as they were.
	cli(t, nil, append([]string{"invalidate", "--cache-dir", filepath.Join(dir, "inv")}, team.key...)...)
	dom = string(chromium(t, bin, page, "--dump-dom"))
	rows = domRows(t, dom)
	for _, id := range team.ids {
		if r := rows[id]; r.state != "invalidated" {
			t.Errorf("snapshot %s of the invalidated key: state %q, want invalidated", id, r.state)
		}
	}
	if r := rows[other.ids[1]]; r.state != "newest" {
		t.Errorf("the newest snapshot of group other: state %q after another group's invalidation", r.state)
	}

	shot := filepath.Join(t.TempDir(), "status.png")
	chromium(t, bin, page, "--screenshot="+shot, "--window-size=1280,900", "--hide-scrollbars")
	png, err := os.ReadFile(shot)
	if err != nil || len(png) < 1000 || !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
		t.Fatalf("screenshot %s: %d bytes (err %v); want a PNG", shot, len(png), err)
	}
	t.Logf("status page screenshot: %s (%d bytes)", shot, len(png))
}

var (
	diskRE   = regexp.MustCompile(`<tr id="disk" data-used-bytes="(\d+)" data-max-bytes="(\d+)" data-evictions="(\d+)">`)
	budgetRE = regexp.MustCompile(`<tr class="budget" data-name="([^"]+)" data-in-use-bytes="(\d+)" data-max-bytes="(\d+)">`)
	uptimeRE = regexp.MustCompile(`<span id="uptime" data-seconds="(\d+)"`)
	idRE     = func(id string) *regexp.Regexp { return regexp.MustCompile(`<code id="` + id + `"[^>]*>([^<]*)</code>`) }
)

// checkCapacityAndBuild checks the rendered page's disk use, budgets,
// version and uptime against the server's JSON, its flags and the binary.
func checkCapacityAndBuild(t *testing.T, dom, metrics string, started time.Time) {
	t.Helper()
	n := func(s string) int64 { v, _ := strconv.ParseInt(s, 10, 64); return v }
	var st struct {
		Capacity struct {
			UsedBytes int64 `json:"used_bytes"`
			MaxBytes  int64 `json:"max_bytes"`
		} `json:"capacity"`
	}
	resp, err := http.Get("http://" + metrics + "/status?format=json")
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	m := diskRE.FindStringSubmatch(dom)
	if m == nil {
		t.Fatalf("the page shows no disk use:\n%s", dom)
	}
	if used, bound := n(m[1]), n(m[2]); bound != 1<<30 || used <= 0 || used > bound || used != st.Capacity.UsedBytes {
		t.Errorf("disk: %d of %d bytes on the page, JSON says %d; want the stored snapshots' bytes of --max-bytes 1 GiB", used, bound, st.Capacity.UsedBytes)
	}
	if !strings.Contains(dom, `<span id="evictions">`+m[3]+`</span>`) {
		t.Errorf("the page does not say how many entries were evicted")
	}
	budgets := map[string][2]int64{}
	for _, b := range budgetRE.FindAllStringSubmatch(dom, -1) {
		budgets[b[1]] = [2]int64{n(b[2]), n(b[3])}
	}
	if b := budgets["upload memory"]; b[1] != 256<<20 || b[0] < 0 || b[0] > b[1] {
		t.Errorf("upload memory budget on the page: %v, want in use of the default 256 MiB", b)
	}
	if b := budgets["read memory"]; b[1] != 64<<20 || b[0] < 0 || b[0] > b[1] {
		t.Errorf("read memory budget on the page: %v, want in use of the default 64 MiB", b)
	}
	bi, err := buildinfo.ReadFile(binary)
	if err != nil {
		t.Fatal(err)
	}
	if v := idRE("version").FindStringSubmatch(dom); v == nil || v[1] != bi.Main.Version {
		t.Errorf("version on the page: %v, want the binary's %q", v, bi.Main.Version)
	}
	rev := ""
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			rev = s.Value
		}
	}
	if got := idRE("revision").FindStringSubmatch(dom); (rev == "") != (got == nil) || (got != nil && got[1] != rev) {
		t.Errorf("revision on the page: %v, want the binary's %q", got, rev)
	}
	if u := uptimeRE.FindStringSubmatch(dom); u == nil || n(u[1]) < 0 || float64(n(u[1])) > time.Since(started).Seconds()+1 {
		t.Errorf("uptime on the page: %v, want at most %v", u, time.Since(started))
	}
}
