// Package statuspage renders the status page of `snaploader serve`: the
// snapshots its backend holds (by group, instance, key and ref, newest
// first, with sizes, ages and the last time each was read), its
// action-cache and CAS hit rates, and the reports of its recent garbage
// collections. The page is plain server-rendered HTML (html/template, no
// scripts); the same data is served as JSON.
//
// Handler serves, under the path it is mounted at (e.g. /status):
//
//	/status                         the page (JSON with ?format=json or Accept: application/json)
//	/status/snapshot?group=G&id=ID  one snapshot as JSON
//
// The data comes from a Source, so the page is testable without a server.
package statuspage

import (
	"context"
	"embed"
	"encoding/json"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/snaploader/snaploader/gc"
)

// Source is what the page shows.
type Source interface {
	Status(ctx context.Context) (*Status, error)
}

// Status is a snapshot of a server's state.
type Status struct {
	// Generated is when the data was taken; ages are as of then.
	Generated time.Time `json:"generated"`
	// Backend describes the store (e.g. "directory /var/cache/x").
	Backend   string     `json:"backend"`
	Snapshots []Snapshot `json:"snapshots"`
	// ActionCache counts GetActionResult outcomes, CAS the blobs
	// FindMissingBlobs was asked about.
	ActionCache Lookups `json:"action_cache"`
	CAS         Lookups `json:"cas"`
	// GC are the recent collections, newest first; GCInterval is 0 when
	// the server does not collect.
	GC         []GCRun `json:"gc"`
	GCInterval string  `json:"gc_interval,omitempty"`
	// Errors are parts of the data that could not be read (e.g. one
	// group's listing), shown on the page.
	Errors []string `json:"errors,omitempty"`
	// Server is the build and uptime of the server process.
	Server ServerInfo `json:"server"`
	// Capacity is the backend's use of this host's disk against its bound.
	Capacity Capacity `json:"capacity"`
	// Budgets are the server's own resource bounds in use: the memory of
	// uploads and reads in flight, and (S3) their scratch disk.
	Budgets []Budget `json:"budgets"`
}

// ServerInfo says which build runs and since when.
type ServerInfo struct {
	// Version is the main module's version ("(devel)" for a build from a
	// work tree), Revision and RevisionTime the commit it was built from
	// and Modified whether the tree had uncommitted changes (empty when
	// the build recorded no version control information).
	Version       string    `json:"version"`
	Revision      string    `json:"revision,omitempty"`
	RevisionTime  string    `json:"revision_time,omitempty"`
	Modified      bool      `json:"modified,omitempty"`
	GoVersion     string    `json:"go_version"`
	Started       time.Time `json:"started"`
	UptimeSeconds int64     `json:"uptime_seconds"`
}

// Capacity is the backend's disk use.
type Capacity struct {
	// OnDisk is false for a backend that keeps nothing on this host (S3):
	// the other fields are then 0.
	OnDisk bool `json:"on_disk"`
	// UsedBytes is what the entries occupy, MaxBytes the bound.
	UsedBytes int64 `json:"used_bytes"`
	MaxBytes  int64 `json:"max_bytes"`
	// Evictions counts the entries evicted to stay under the bound since
	// the server started.
	Evictions int64 `json:"evictions"`
}

// UsedFraction is UsedBytes over MaxBytes (0 without a bound).
func (c Capacity) UsedFraction() float64 {
	if c.MaxBytes <= 0 {
		return 0
	}
	return float64(c.UsedBytes) / float64(c.MaxBytes)
}

// Budget is one resource bound and what is in use of it.
type Budget struct {
	// Name is "upload memory", "read memory" or "scratch disk".
	Name       string `json:"name"`
	InUseBytes int64  `json:"in_use_bytes"`
	MaxBytes   int64  `json:"max_bytes"`
}

// UsedFraction is InUseBytes over MaxBytes.
func (b Budget) UsedFraction() float64 {
	if b.MaxBytes <= 0 {
		return 0
	}
	return float64(b.InUseBytes) / float64(b.MaxBytes)
}

// Snapshot is one snapshot of the store.
type Snapshot struct {
	Group             string     `json:"group"`
	Instance          string     `json:"instance"`
	PlatformHash      string     `json:"platform_hash"`
	ConfigurationHash string     `json:"configuration_hash"`
	Runner            string     `json:"runner,omitempty"`
	VersionID         string     `json:"version_id"`
	Ref               string     `json:"ref"`
	SnapshotID        string     `json:"snapshot_id"`
	DigestFunction    string     `json:"digest_function"`
	Completed         time.Time  `json:"completed"`
	AgeSeconds        int64      `json:"age_seconds"`
	LastRead          *time.Time `json:"last_read,omitempty"`
	// State is newest, retained, expired, invalidated or broken.
	State        string   `json:"state"`
	LogicalBytes int64    `json:"logical_bytes"`
	StoredBytes  int64    `json:"stored_bytes"`
	Blobs        int      `json:"blobs"`
	MissingBlobs int      `json:"missing_blobs,omitempty"`
	PreviousID   string   `json:"previous_snapshot_id,omitempty"`
	SharedChunks *float64 `json:"shared_chunks_with_previous,omitempty"`
}

// SnapshotOf is the page's entry for row r of group's listing, lastRead
// when the snapshot was last read (nil when not known).
func SnapshotOf(group string, r gc.Row, lastRead *time.Time) Snapshot {
	return Snapshot{
		Group: group, Instance: r.Instance, PlatformHash: r.PlatformHash, ConfigurationHash: r.ConfigurationHash,
		Runner: r.Runner, VersionID: r.VersionID, Ref: r.Ref, SnapshotID: r.SnapshotID, DigestFunction: r.DigestFunction,
		Completed: r.Completed, AgeSeconds: r.AgeSeconds, LastRead: lastRead, State: r.State,
		LogicalBytes: r.LogicalBytes, StoredBytes: r.StoredBytes, Blobs: r.Blobs, MissingBlobs: r.MissingBlobs,
		PreviousID: r.PreviousID, SharedChunks: r.SharedChunks,
	}
}

// Lookups counts hits and misses.
type Lookups struct {
	Hits   int64 `json:"hits"`
	Misses int64 `json:"misses"`
}

// HitRate is the fraction of lookups that hit (0 when there were none).
func (l Lookups) HitRate() float64 {
	if l.Hits+l.Misses == 0 {
		return 0
	}
	return float64(l.Hits) / float64(l.Hits+l.Misses)
}

// GCRun is one collection.
type GCRun struct {
	Started time.Time  `json:"started"`
	Report  *gc.Report `json:"report,omitempty"`
	Error   string     `json:"error,omitempty"`
}

//go:embed status.html.tmpl
var templates embed.FS

var page = template.Must(template.New("status.html.tmpl").Funcs(template.FuncMap{
	"bytes":   humanBytes,
	"age":     func(s int64) string { return humanAge(time.Duration(s) * time.Second) },
	"since":   func(now time.Time, t *time.Time) string { return humanAge(now.Sub(*t)) },
	"percent": func(f float64) string { return fmt.Sprintf("%.1f%%", 100*f) },
	"link":    snapshotLink,
	"short":   func(s string) string { return s[:min(len(s), 12)] },
	"when":    func(t any) string { return when(t) },
	"deref":   func(f *float64) float64 { return *f },
}).ParseFS(templates, "status.html.tmpl"))

// Handler serves the page and its JSON at the path it is mounted at and
// below (see the package doc). Each request reads src anew.
func Handler(src Source) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "GET only", http.StatusMethodNotAllowed)
			return
		}
		st, err := src.Status(r.Context())
		if err != nil {
			http.Error(w, "reading the server's status: "+err.Error(), http.StatusInternalServerError)
			return
		}
		sortSnapshots(st.Snapshots)
		if strings.HasSuffix(r.URL.Path, "/snapshot") {
			q := r.URL.Query()
			for _, s := range st.Snapshots {
				if s.Group == q.Get("group") && s.SnapshotID == q.Get("id") {
					writeJSON(w, s)
					return
				}
			}
			http.Error(w, fmt.Sprintf("no snapshot %q in group %q", q.Get("id"), q.Get("group")), http.StatusNotFound)
			return
		}
		if wantsJSON(r) {
			writeJSON(w, st)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		if err := page.Execute(w, view{Status: st, Keys: keysOf(st.Snapshots)}); err != nil {
			http.Error(w, "rendering the status page: "+err.Error(), http.StatusInternalServerError)
		}
	})
}

func wantsJSON(r *http.Request) bool {
	if f := r.URL.Query().Get("format"); f != "" {
		return f == "json"
	}
	return strings.Contains(r.Header.Get("Accept"), "application/json")
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// snapshotLink is the path of a snapshot's JSON, relative to the page.
func snapshotLink(s Snapshot) string {
	return "status/snapshot?" + url.Values{"group": {s.Group}, "id": {s.SnapshotID}}.Encode()
}

// sortSnapshots orders by group, instance, key, ref, then newest first.
func sortSnapshots(ss []Snapshot) {
	sort.SliceStable(ss, func(i, j int) bool {
		a, b := ss[i], ss[j]
		if ka, kb := keyOf(a), keyOf(b); ka != kb {
			return ka.less(kb)
		}
		return a.Completed.After(b.Completed)
	})
}

// key is what snapshots are grouped by on the page.
type key struct{ Group, Instance, Platform, Config, Runner, Ref string }

func keyOf(s Snapshot) key {
	return key{s.Group, s.Instance, s.PlatformHash, s.ConfigurationHash, s.Runner, s.Ref}
}

func (a key) less(b key) bool {
	as := []string{a.Group, a.Instance, a.Platform, a.Config, a.Runner, a.Ref}
	bs := []string{b.Group, b.Instance, b.Platform, b.Config, b.Runner, b.Ref}
	for i := range as {
		if as[i] != bs[i] {
			return as[i] < bs[i]
		}
	}
	return false
}

// keyView is one key with its snapshots, newest first.
type keyView struct {
	key
	Snapshots []Snapshot
}

type view struct {
	*Status
	Keys []keyView
}

func keysOf(ss []Snapshot) []keyView {
	var out []keyView
	for _, s := range ss {
		k := keyOf(s)
		if len(out) == 0 || out[len(out)-1].key != k {
			out = append(out, keyView{key: k})
		}
		out[len(out)-1].Snapshots = append(out[len(out)-1].Snapshots, s)
	}
	return out
}

func when(t any) string {
	switch t := t.(type) {
	case time.Time:
		return t.UTC().Format(time.RFC3339)
	case *time.Time:
		return t.UTC().Format(time.RFC3339)
	}
	return ""
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func humanAge(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd%02dh", int(d.Hours())/24, int(d.Hours())%24)
}
