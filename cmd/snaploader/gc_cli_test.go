package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/snaploader/snaploader/internal/testutil"
)

// fleetBucket is a MinIO bucket holding three snapshots of one key saved
// through the CLI, each with mostly different memory: after 10 days the
// first two are expired garbage.
type fleetBucket struct {
	m      testutil.MinIO
	bucket string
	url    string
	dir    string
	newest []byte
}

func newFleetBucket(t *testing.T) *fleetBucket {
	t.Helper()
	m := testutil.StartMinIO(t)
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("MINIO_ROOT_USER", m.AccessKey)
	t.Setenv("MINIO_ROOT_PASSWORD", m.SecretKey)
	f := &fleetBucket{m: m, bucket: m.NewBucket(t), dir: t.TempDir()}
	f.url = "s3://" + f.bucket + "/fleet?endpoint=" + m.Endpoint + "&secure=false"
	for i := range 3 {
		mem := writeRandom(t, filepath.Join(f.dir, "mem.img"), 2<<20, uint64(100+i))
		os.WriteFile(filepath.Join(f.dir, "vmstate"), []byte{byte(i)}, 0o644)
		run(t, false, append(keyArgs(filepath.Join(f.dir, "cache")), "save", "--json", "--remote", f.url, "--save-policy", "always",
			"--chunk-size", "65536", "--file", "vmstate="+filepath.Join(f.dir, "vmstate"), "--chunked", "mem.img="+filepath.Join(f.dir, "mem.img"))...)
		f.newest = mem
	}
	return f
}

func (f *fleetBucket) objects(t *testing.T) []string {
	t.Helper()
	var keys []string
	for o := range f.m.Client.ListObjects(context.Background(), f.bucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		keys = append(keys, o.Key)
	}
	slices.Sort(keys)
	return keys
}

var tenDaysLater = time.Now().Add(240 * time.Hour).UTC().Format(time.RFC3339)

type gcJSON struct {
	DryRun    bool  `json:"dry_run"`
	LiveBytes int64 `json:"live_bytes"`
	Blobs     struct {
		Deleted int64 `json:"deleted"`
	} `json:"blobs"`
	Deleted []struct {
		Key string `json:"key"`
	} `json:"deleted"`
}

// dryRun returns what a collection ten days later would delete.
func (f *fleetBucket) dryRun(t *testing.T) (gcJSON, []string) {
	t.Helper()
	out, _ := run(t, false, "gc", "--remote", f.url, "--now", tenDaysLater, "--dry-run", "--json", "--list")
	var r gcJSON
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("gc --json: %v\n%s", err, out)
	}
	var keys []string
	for _, d := range r.Deleted {
		keys = append(keys, d.Key)
	}
	slices.Sort(keys)
	if len(keys) == 0 || !r.DryRun {
		t.Fatalf("the dry run would delete nothing: %s", out)
	}
	return r, keys
}

func without(all, drop []string) []string {
	var out []string
	for _, k := range all {
		if !slices.Contains(drop, k) {
			out = append(out, k)
		}
	}
	return out
}

// checkNewestRestores restores and verifies the live snapshot from the
// bucket alone.
func (f *fleetBucket) checkNewestRestores(t *testing.T) {
	t.Helper()
	out := t.TempDir()
	args := keyArgs(t.TempDir())
	run(t, false, append(args, "restore", "--remote", f.url, "--read-policy", "newest", "--out", out)...)
	got, err := os.ReadFile(filepath.Join(out, "mem.img"))
	if err != nil || !bytes.Equal(got, f.newest) {
		t.Fatalf("the live snapshot does not restore byte for byte (%v)", err)
	}
	stdout, _ := run(t, false, append(keyArgs(t.TempDir()), "verify", "--remote", f.url, "--read-policy", "newest")...)
	if !strings.Contains(stdout, "verified") {
		t.Errorf("verify: %s", stdout)
	}
}

func TestGCKilledMidSweepThenRerun(t *testing.T) {
	f := newFleetBucket(t)
	before := f.objects(t)
	_, doomed := f.dryRun(t)
	cmd := exec.Command(binary, "gc", "--remote", f.url, "--now", tenDaysLater, "--batch-size", "2", "--batch-pause", "300ms")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for len(f.objects(t)) > len(before)-len(doomed)/3 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	mid := f.objects(t)
	if len(mid) <= len(before)-len(doomed) || len(mid) >= len(before) {
		t.Fatalf("killed with %d objects left of %d (%d to delete): not mid-sweep\n%s", len(mid), len(before), len(doomed), stderr.String())
	}
	for _, k := range without(before, doomed) {
		if !slices.Contains(mid, k) {
			t.Errorf("live object %s deleted by the killed run", k)
		}
	}
	f.checkNewestRestores(t)
	run(t, false, "gc", "--remote", f.url, "--now", tenDaysLater)
	if after := f.objects(t); !slices.Equal(after, without(before, doomed)) {
		t.Errorf("after the re-run: %d objects, want the %d the dry run said would stay", len(after), len(without(before, doomed)))
	}
	f.checkNewestRestores(t)
}

func TestTwoGCsAtOnce(t *testing.T) {
	f := newFleetBucket(t)
	before := f.objects(t)
	_, doomed := f.dryRun(t)
	var wg sync.WaitGroup
	outs := make([]string, 2)
	errs := make([]error, 2)
	for i := range 2 {
		wg.Go(func() {
			cmd := exec.Command(binary, "gc", "--remote", f.url, "--now", tenDaysLater, "--batch-size", "3")
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			errs[i] = cmd.Run()
			outs[i] = out.String()
		})
	}
	wg.Wait()
	for i := range 2 {
		if errs[i] != nil {
			t.Errorf("gc %d: %v\n%s", i, errs[i], outs[i])
		}
	}
	if after := f.objects(t); !slices.Equal(after, without(before, doomed)) {
		t.Errorf("after two gcs at once: %d objects, want %d", len(after), len(without(before, doomed)))
	}
	f.checkNewestRestores(t)
}

func TestLsRemote(t *testing.T) {
	f := newFleetBucket(t)
	rep, _ := f.dryRun(t)
	out, _ := run(t, false, "ls", "--remote", f.url, "--now", tenDaysLater, "--json")
	var inv struct {
		Snapshots []struct {
			SnapshotID   string   `json:"snapshot_id"`
			Ref          string   `json:"ref"`
			Live         bool     `json:"live"`
			Newest       bool     `json:"newest"`
			LogicalBytes int64    `json:"logical_bytes"`
			StoredBytes  int64    `json:"stored_bytes"`
			Shared       *float64 `json:"shared_chunks_with_previous"`
		} `json:"snapshots"`
		LiveStoredBytes int64 `json:"live_stored_bytes"`
	}
	if err := json.Unmarshal([]byte(out), &inv); err != nil {
		t.Fatalf("ls --json: %v\n%s", err, out)
	}
	if len(inv.Snapshots) != 3 {
		t.Fatalf("ls lists %d snapshots, want 3:\n%s", len(inv.Snapshots), out)
	}
	for i, s := range inv.Snapshots {
		wantLive := i == 2
		if s.Live != wantLive || s.Newest != wantLive || s.Ref != "feat" || s.LogicalBytes != 2<<20+1 || s.StoredBytes <= 0 || (i > 0) != (s.Shared != nil) {
			t.Errorf("snapshot %d: %+v", i, s)
		}
	}
	if inv.LiveStoredBytes != rep.LiveBytes {
		t.Errorf("ls says live snapshots store %d bytes, gc --dry-run %d", inv.LiveStoredBytes, rep.LiveBytes)
	}
	table, _ := run(t, false, "ls", "--remote", f.url)
	if !strings.Contains(table, inv.Snapshots[2].SnapshotID) || !strings.Contains(table, "newest") {
		t.Errorf("ls table:\n%s", table)
	}
	_, stderr := run(t, true, "ls", "--remote", "grpc://127.0.0.1:1")
	if !strings.Contains(stderr, "REAPI caches cannot list") {
		t.Errorf("ls --remote grpc://: %s", stderr)
	}
	_, stderr = run(t, true, "gc", "--remote", "grpc://127.0.0.1:1")
	if !strings.Contains(stderr, "REAPI caches cannot list") {
		t.Errorf("gc --remote grpc://: %s", stderr)
	}
}
