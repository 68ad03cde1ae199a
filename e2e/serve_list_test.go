package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"

	"github.com/snaploader/snaploader/internal/testutil"
)

// lsRow is one row of ls --remote --json.
type lsRow struct {
	Instance          string   `json:"instance"`
	PlatformHash      string   `json:"platform_hash"`
	ConfigurationHash string   `json:"configuration_hash"`
	VersionID         string   `json:"version_id"`
	Ref               string   `json:"ref"`
	SnapshotID        string   `json:"snapshot_id"`
	DigestFunction    string   `json:"digest_function"`
	AgeSeconds        int64    `json:"age_seconds"`
	Newest            bool     `json:"newest"`
	Live              bool     `json:"live"`
	LogicalBytes      int64    `json:"logical_bytes"`
	StoredBytes       int64    `json:"stored_bytes"`
	Blobs             int      `json:"blobs"`
	MissingBlobs      int      `json:"missing_blobs"`
	PreviousID        string   `json:"previous_snapshot_id"`
	SharedChunks      *float64 `json:"shared_chunks_with_previous"`
}

type lsOut struct {
	Snapshots       []lsRow `json:"snapshots"`
	LiveStoredBytes int64   `json:"live_stored_bytes"`
	StoredBytes     int64   `json:"stored_bytes"`
	Blobs           int64   `json:"blobs"`
}

func lsJSON(t *testing.T, env []string, args ...string) lsOut {
	t.Helper()
	out := cli(t, env, append([]string{"ls", "--json"}, args...)...)
	var ls lsOut
	if err := json.Unmarshal([]byte(out), &ls); err != nil {
		t.Fatalf("ls --json: %v\n%s", err, out)
	}
	return ls
}

// savedPair is two snapshots saved under one key, the second changing the
// first 256 KiB of its 2 MiB memory file.
type savedPair struct {
	ids    [2]string
	mem    [2][]byte
	key    []string // the key flags
	ref    string
	dir    string
	memImg string
}

// saveTwo saves two snapshots through url (extra: e.g. --api-key).
func saveTwo(t *testing.T, env []string, url, ref string, seed uint64, extra ...string) *savedPair {
	t.Helper()
	p := &savedPair{dir: t.TempDir(), ref: ref}
	p.memImg = filepath.Join(p.dir, "mem.img")
	p.key = append([]string{"--remote", url, "--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", ref}, extra...)
	p.mem[0] = writeVM(t, p.memImg, 2<<20, seed)
	for i := range 2 {
		if i == 1 {
			b := append([]byte(nil), p.mem[0]...)
			copy(b, writeVM(t, filepath.Join(p.dir, "patch.img"), 256<<10, seed+100))
			if err := os.WriteFile(p.memImg, b, 0o644); err != nil {
				t.Fatal(err)
			}
			p.mem[1] = b
		}
		out := cli(t, env, append([]string{"save", "--json", "--save-policy", "always", "--cache-dir", filepath.Join(p.dir, "host"),
			"--chunk-size", "65536", "--chunked", "mem.img=" + p.memImg}, p.key...)...)
		var rep struct {
			SnapshotID string `json:"snapshot_id"`
		}
		if err := json.Unmarshal([]byte(out), &rep); err != nil || rep.SnapshotID == "" {
			t.Fatalf("save --json: %v\n%s", err, out)
		}
		p.ids[i] = rep.SnapshotID
	}
	return p
}

// keyVia is p's key flags with the remote replaced by url.
func (p *savedPair) keyVia(url string) []string {
	k := append([]string(nil), p.key...)
	k[1] = url
	return k
}

// checkPair checks that ls rows list p's snapshots as saved.
func checkPair(t *testing.T, ls lsOut, p *savedPair) {
	t.Helper()
	if len(ls.Snapshots) != 2 {
		t.Fatalf("ls lists %d snapshots, want 2: %+v", len(ls.Snapshots), ls.Snapshots)
	}
	for i, r := range ls.Snapshots {
		if r.SnapshotID != p.ids[i] || r.Instance != "ci" || r.ConfigurationHash != "c1" || r.Ref != p.ref || r.PlatformHash == "" || r.VersionID == "" {
			t.Errorf("row %d: %+v, want snapshot %s of instance ci, config c1, ref %s", i, r, p.ids[i], p.ref)
		}
		if r.LogicalBytes != 2<<20 || r.StoredBytes <= 0 || r.Blobs == 0 || r.MissingBlobs != 0 {
			t.Errorf("row %d: logical %d (want %d), stored %d, blobs %d, missing %d", i, r.LogicalBytes, 2<<20, r.StoredBytes, r.Blobs, r.MissingBlobs)
		}
		if r.AgeSeconds < 0 || r.AgeSeconds > 600 {
			t.Errorf("row %d: age %ds, want a few seconds", i, r.AgeSeconds)
		}
	}
	first, second := ls.Snapshots[0], ls.Snapshots[1]
	if first.Newest || !first.Live || !second.Newest {
		t.Errorf("states: first newest=%v live=%v, second newest=%v; want retained then newest", first.Newest, first.Live, second.Newest)
	}
	// 4 of the 32 chunks changed: 28 (minus the zero chunks they shared) are shared.
	if second.PreviousID != first.SnapshotID || second.SharedChunks == nil || *second.SharedChunks < 0.5 || *second.SharedChunks >= 1 {
		t.Errorf("second snapshot: previous %q (want %q), shared %v; want a partial share", second.PreviousID, first.SnapshotID, second.SharedChunks)
	}
}

func TestServeListDisk(t *testing.T) {
	srv := startServe(t, nil, "--cache-dir", t.TempDir(), "--api-key", "k-rw=team", "--api-key", "k-ro=team:ro", "--api-key", "k-other=other")
	p := saveTwo(t, nil, srv.url(), "main", 21, "--api-key", "k-rw")
	for _, tc := range []struct {
		key   string
		count int
	}{{"k-rw", 2}, {"k-ro", 2}, {"k-other", 0}} {
		t.Run(tc.key, func(t *testing.T) {
			ls := lsJSON(t, nil, "--remote", srv.url(), "--api-key", tc.key)
			if tc.count == 0 {
				if len(ls.Snapshots) != 0 {
					t.Errorf("group other lists %d snapshots of group team", len(ls.Snapshots))
				}
				return
			}
			checkPair(t, ls, p)
			if ls.Blobs == 0 || ls.StoredBytes < ls.LiveStoredBytes || ls.LiveStoredBytes <= 0 {
				t.Errorf("totals: blobs %d, stored %d, live %d", ls.Blobs, ls.StoredBytes, ls.LiveStoredBytes)
			}
		})
	}
	// The table names the states; a missing key is refused.
	table := cli(t, nil, "ls", "--remote", srv.url(), "--api-key", "k-ro")
	if !strings.Contains(table, p.ids[1]) || !strings.Contains(table, "newest") || !strings.Contains(table, "retained") {
		t.Errorf("ls table:\n%s", table)
	}
	cmd := exec.Command(binary, "ls", "--remote", srv.url())
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "Unauthenticated") {
		t.Errorf("ls without an API key: err %v, output %s; want Unauthenticated", err, out)
	}
	// Judged ten days later, the first snapshot has expired.
	later := lsJSON(t, nil, "--remote", srv.url(), "--api-key", "k-ro", "--now", time.Now().Add(240*time.Hour).Format(time.RFC3339))
	if len(later.Snapshots) != 2 || later.Snapshots[0].Live || !later.Snapshots[1].Live {
		t.Errorf("ten days later: %+v; want the first expired, the newest live", later.Snapshots)
	}
}

func TestServeListS3(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	env := []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=" + m.SecretKey}
	s3url := fmt.Sprintf("s3://%s/snaps?endpoint=%s&secure=false", bucket, m.Endpoint)
	srv := startServe(t, env, "--s3", s3url, "--api-key", "k-ro=team:ro", "--api-key", "k-rw=team", "--api-key", "k-other=other")
	p := saveTwo(t, env, srv.url(), "main", 31, "--api-key", "k-rw")
	viaServe := lsJSON(t, env, "--remote", srv.url(), "--api-key", "k-ro")
	checkPair(t, viaServe, p)
	// The bucket read directly reports the same snapshots and sizes.
	direct := lsJSON(t, env, "--remote", s3url)
	checkPair(t, direct, p)
	for i := range direct.Snapshots {
		a, b := viaServe.Snapshots[i], direct.Snapshots[i]
		if a.LogicalBytes != b.LogicalBytes || a.StoredBytes != b.StoredBytes || a.Blobs != b.Blobs || *a.SharedChunksOr0() != *b.SharedChunksOr0() {
			t.Errorf("snapshot %s: serve lists %+v, the bucket %+v", a.SnapshotID, a, b)
		}
	}
	if viaServe.LiveStoredBytes != direct.LiveStoredBytes || viaServe.StoredBytes != direct.StoredBytes {
		t.Errorf("totals: serve live %d stored %d, bucket live %d stored %d", viaServe.LiveStoredBytes, viaServe.StoredBytes, direct.LiveStoredBytes, direct.StoredBytes)
	}
	if other := lsJSON(t, env, "--remote", srv.url(), "--api-key", "k-other"); len(other.Snapshots) != 0 {
		t.Errorf("group other lists %d snapshots of group team", len(other.Snapshots))
	}
}

// SharedChunksOr0 is the shared fraction, 0 when there is none.
func (r lsRow) SharedChunksOr0() *float64 {
	if r.SharedChunks == nil {
		z := 0.0
		return &z
	}
	return r.SharedChunks
}

// capsOnly is an REAPI cache that offers nothing beyond Capabilities, as a
// third-party cache offers no listing.
type capsOnly struct {
	repb.UnimplementedCapabilitiesServer
}

func (capsOnly) GetCapabilities(context.Context, *repb.GetCapabilitiesRequest) (*repb.ServerCapabilities, error) {
	return &repb.ServerCapabilities{CacheCapabilities: &repb.CacheCapabilities{DigestFunctions: []repb.DigestFunction_Value{repb.DigestFunction_SHA256}}}, nil
}

func TestServeListThirdPartyCache(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	repb.RegisterCapabilitiesServer(gs, capsOnly{})
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	for _, url := range []string{"grpc://" + lis.Addr().String(), "grpc://127.0.0.1:1"} {
		cmd := exec.Command(binary, "ls", "--remote", url, "--remote-timeout", "5s")
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "REAPI caches cannot list their contents") {
			t.Errorf("ls --remote %s: err %v, output %s; want the REAPI caches cannot list error", url, err, out)
		}
	}
}
