package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/remote"
)

// acEntry is an action-cache entry found in a serve cache directory.
type acEntry struct {
	ns  cache.Namespace
	key *repb.Digest
}

// acEntries lists the action-cache entries of the anonymous group in a
// serve cache directory (ac/<group>/<instance>/<function>/<xx>/<hash>-<size>).
func acEntries(t *testing.T, dir string) []acEntry {
	t.Helper()
	var out []acEntry
	root := filepath.Join(dir, "ac")
	err := filepath.WalkDir(root, func(p string, de os.DirEntry, err error) error {
		if err != nil || de.IsDir() {
			return err
		}
		h, s, ok := strings.Cut(de.Name(), "-")
		if !ok || len(h) != 64 {
			return nil
		}
		size, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return nil
		}
		fnDir := filepath.Dir(filepath.Dir(p))
		fn, err := digest.ParseFunction(filepath.Base(fnDir))
		if err != nil {
			return fmt.Errorf("digest function of %s: %w", p, err)
		}
		instDir := filepath.Dir(fnDir)
		inst, err := os.ReadFile(filepath.Join(instDir, "INSTANCE"))
		if err != nil {
			return fmt.Errorf("instance of %s: %w", p, err)
		}
		out = append(out, acEntry{ns: cache.Namespace{Instance: string(inst), Function: fn}, key: &repb.Digest{Hash: h, SizeBytes: size}})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestServeOutOfDescriptorsLosesNothing: a serve process whose descriptors
// run out (its limit lowered while it runs) answers reads of intact blobs
// and action-cache entries (version entries and manifests among them) with
// a retryable error, drops nothing and logs nothing as corrupt; once
// descriptors are back, every blob reads intact and every acknowledged
// snapshot of the key restores.
func TestServeOutOfDescriptorsLosesNothing(t *testing.T) {
	dir := t.TempDir()
	srvDir := filepath.Join(dir, "serve")
	srv := startServe(t, nil, "--cache-dir", srvDir)
	ctx := ctxT(t)
	key := []string{"--remote", srv.url(), "--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main", "--save-policy", "always"}

	// Two acknowledged snapshots of one key, saved through serve.
	type saved struct {
		id   string
		want []byte
	}
	var snaps []saved
	for i := range 2 {
		mem := filepath.Join(dir, fmt.Sprintf("mem%d.img", i))
		want := writeVM(t, mem, 1<<20, uint64(40+i))
		out := cli(t, nil, append([]string{"save", "--json", "--cache-dir", filepath.Join(dir, "host"), "--chunk-size", "65536", "--chunked", "mem.img=" + mem}, key...)...)
		var rep struct {
			SnapshotID      string `json:"snapshot_id"`
			PublishedRemote bool   `json:"published_remote"`
		}
		if err := json.Unmarshal([]byte(out), &rep); err != nil || rep.SnapshotID == "" || !rep.PublishedRemote {
			t.Fatalf("save %d: %s (%v): want a snapshot published to serve", i, out, err)
		}
		snaps = append(snaps, saved{rep.SnapshotID, want})
	}

	// Blobs of both transports: a batch read and a ByteStream read.
	c, err := remote.Dial(ctx, srv.url(), remote.Options{MaxRetries: 1, DigestFunction: repb.DigestFunction_SHA256})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ns := cache.Namespace{Function: repb.DigestFunction_SHA256}
	var blobs [][]byte
	var ds []*repb.Digest
	for _, n := range []int{20_000, 3 << 20} {
		b := randomBytes(n, uint64(n))
		d := digest.Compute(ns.Function, b)
		if err := c.Write(ctx, ns, d, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		blobs, ds = append(blobs, b), append(ds, d)
	}
	entries := acEntries(t, srvDir)
	if len(entries) < 3 { // the version entry and two manifests, at least
		t.Fatalf("found %d action-cache entries on serve, want at least 3", len(entries))
	}
	// The connection is up before descriptors run out: only the server's
	// file opens fail.
	for _, e := range entries {
		if _, err := c.GetActionResult(ctx, e.ns, e.key); err != nil {
			t.Fatalf("entry %s before: %v", digest.String(e.key), err)
		}
	}

	restore := testutil.ExhaustDescriptors(t, srv.cmd.Process.Pid)
	for i, d := range ds {
		_, err := cache.ReadAll(ctx, c, ns, d)
		if code := status.Code(err); code != codes.Unavailable {
			t.Errorf("blob %d (%s) read without descriptors: %v (%v), want Unavailable", i, digest.String(d), err, code)
		}
	}
	for _, e := range entries {
		_, err := c.GetActionResult(ctx, e.ns, e.key)
		if code := status.Code(err); code != codes.Unavailable {
			t.Errorf("entry %s read without descriptors: %v (%v), want Unavailable", digest.String(e.key), err, code)
		}
	}
	restore()

	for i, d := range ds {
		if got, err := cache.ReadAll(ctx, c, ns, d); err != nil || !bytes.Equal(got, blobs[i]) {
			t.Errorf("blob %d (%s) once descriptors are back: %v", i, digest.String(d), err)
		}
	}
	for _, e := range entries {
		if _, err := c.GetActionResult(ctx, e.ns, e.key); err != nil {
			t.Errorf("entry %s once descriptors are back: %v", digest.String(e.key), err)
		}
	}
	for i, s := range snaps {
		out := filepath.Join(dir, fmt.Sprintf("out%d", i))
		cli(t, nil, append([]string{"restore", "--cache-dir", filepath.Join(dir, fmt.Sprintf("cold%d", i)), "--out", out, "--snapshot-id", s.id}, key[:len(key)-2]...)...)
		if got, err := os.ReadFile(filepath.Join(out, "mem.img")); err != nil || !bytes.Equal(got, s.want) {
			t.Errorf("snapshot %d (%s) restored from serve differs (err %v)", i, s.id, err)
		}
	}
	if log := srv.log.String(); strings.Contains(strings.ToLower(log), "corrupt") {
		t.Errorf("serve logged corruption:\n%s", log)
	}
}
