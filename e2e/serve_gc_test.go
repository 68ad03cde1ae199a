package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/internal/testutil"
)

// statusJSON is what the tests read of /status?format=json.
type statusJSON struct {
	Snapshots []struct {
		Group        string     `json:"group"`
		Instance     string     `json:"instance"`
		Ref          string     `json:"ref"`
		SnapshotID   string     `json:"snapshot_id"`
		State        string     `json:"state"`
		AgeSeconds   int64      `json:"age_seconds"`
		LastRead     *time.Time `json:"last_read"`
		LogicalBytes int64      `json:"logical_bytes"`
		StoredBytes  int64      `json:"stored_bytes"`
	} `json:"snapshots"`
	ActionCache struct{ Hits, Misses int64 } `json:"action_cache"`
	GC          []struct {
		Started time.Time  `json:"started"`
		Report  *gc.Report `json:"report"`
		Error   string     `json:"error"`
	} `json:"gc"`
	GCInterval string `json:"gc_interval"`
}

func getStatus(t *testing.T, addr string) statusJSON {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/status?format=json")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st statusJSON
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatalf("/status?format=json: %v", err)
	}
	return st
}

func TestServeGCCollectsTheBucket(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	env := []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=" + m.SecretKey}
	s3url := fmt.Sprintf("s3://%s/snaps?endpoint=%s&secure=false", bucket, m.Endpoint)

	// Two snapshots under one key: the first is no longer the newest.
	one := startServe(t, env, "--s3", s3url)
	p := saveTwo(t, env, one.url(), "main", 41)
	one.stop()
	before := lsJSON(t, env, "--remote", s3url)

	// Ten days on (the collector's clock), the first has expired and the
	// blobs only it named are past the default grace of an hour.
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	two := startServe(t, env, "--s3", s3url, "--gc-interval", "400ms", "--gc-clock-offset", "240h", "--metrics-addr", metrics)
	var st statusJSON
	deadline := time.Now().Add(60 * time.Second)
	for {
		st = getStatus(t, metrics)
		if len(st.GC) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(st.GC) == 0 {
		t.Fatalf("no collection reported within a minute; serve log:\n%s", two.log)
	}
	if st.GCInterval != "400ms" {
		t.Errorf("gc_interval %q, want 400ms", st.GCInterval)
	}
	first := st.GC[len(st.GC)-1]
	if first.Error != "" || first.Report == nil {
		t.Fatalf("first collection: %+v", first)
	}
	r := first.Report
	if r.Snapshots != 2 || r.ExpiredSnapshots != 1 || r.Entries.Deleted != 1 || r.Blobs.Deleted == 0 || r.Retention != "168h0m0s" || r.Grace != "1h0m0s" {
		t.Errorf("first collection: %+v; want 1 of 2 snapshots expired, its entry and its own blobs deleted, retention 7d, grace 1h", r)
	}

	// The live snapshot still restores byte-for-byte; the expired one is gone.
	dir := t.TempDir()
	cli(t, env, append([]string{"restore", "--cache-dir", filepath.Join(dir, "b"), "--out", filepath.Join(dir, "out")}, p.keyVia(two.url())...)...)
	if got, err := os.ReadFile(filepath.Join(dir, "out", "mem.img")); err != nil || !bytes.Equal(got, p.mem[1]) {
		t.Errorf("the live snapshot restored after collection differs (err %v)", err)
	}
	cmd := exec.Command(binary, append([]string{"restore", "--snapshot-id", p.ids[0], "--cache-dir", filepath.Join(dir, "c"), "--out", filepath.Join(dir, "out2")}, p.keyVia(two.url())...)...)
	cmd.Env = append(os.Environ(), env...)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "NotFound") {
		t.Errorf("restore of the expired snapshot after collection: err %v, output %s; want NotFound", err, out)
	}
	after := lsJSON(t, env, "--remote", s3url)
	if len(after.Snapshots) != 1 || after.Snapshots[0].SnapshotID != p.ids[1] {
		t.Errorf("after collection the bucket lists %+v; want only %s", after.Snapshots, p.ids[1])
	}
	if int64(r.Blobs.Deleted) != before.Blobs-after.Blobs {
		t.Errorf("the report says %d blobs deleted, the bucket went from %d to %d", r.Blobs.Deleted, before.Blobs, after.Blobs)
	}
	if !strings.Contains(two.log.String(), "garbage collection") {
		t.Errorf("serve did not log its collection:\n%s", two.log)
	}
}

func TestServeGCRefusedOnDisk(t *testing.T) {
	for _, args := range [][]string{
		{"--cache-dir", t.TempDir(), "--gc-interval", "1m"},
		{"--gc-interval", "1m"},
	} {
		cmd := exec.Command(binary, append([]string{"serve", "--listen", "127.0.0.1:0"}, args...)...)
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "--gc-interval needs --s3") || !strings.Contains(string(out), "evicts") {
			t.Errorf("serve %v: err %v, output %s; want a refusal saying the disk backend evicts", args, err, out)
		}
	}
}
