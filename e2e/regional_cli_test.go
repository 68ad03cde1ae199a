package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/snaploader/snaploader/internal/testutil"
)

// A fleet deployed with the CLI: a regional serve (--cache-dir in front of
// --s3), a second-level serve (--cache-dir in front of --upstream, the
// regional one), and hosts. A save through the regional serve reaches the
// bucket (a host reading the bucket directly restores it), and cold hosts
// restore through either serve.
func TestServeAsRegionalTier(t *testing.T) {
	ctx := ctxT(t)
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	env := []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=" + m.SecretKey}
	s3url := fmt.Sprintf("s3://%s/fleet?endpoint=%s&secure=false", bucket, m.Endpoint)
	dir := t.TempDir()
	regional := startServe(t, env, "--cache-dir", filepath.Join(dir, "regional"), "--s3", s3url)
	edge := startServe(t, nil, "--cache-dir", filepath.Join(dir, "edge"), "--upstream", regional.url())

	mem := filepath.Join(dir, "mem.img")
	want := writeVM(t, mem, 4<<20, 41)
	key := []string{"--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main"}
	saved := runEnv(ctx, env, append([]string{"save", "--json", "--cache-dir", filepath.Join(dir, "a"), "--chunked", "mem.img=" + mem, "--chunk-size", "262144", "--remote", regional.url()}, key...)...).must(t, "save through the regional serve")
	if rep := saved.report(t); rep["published_remote"] != true {
		t.Fatalf("save reported %v, want it published", rep)
	}
	for _, tc := range []struct{ name, remote string }{
		{"bucket directly", s3url},
		{"regional serve", regional.url()},
		{"edge serve over the regional one", edge.url()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(dir, "out-"+tc.name)
			r := runEnv(ctx, env, append([]string{"restore", "--json", "--cache-dir", filepath.Join(dir, "cold-"+tc.name), "--out", out, "--remote", tc.remote}, key...)...).must(t, "restore through "+tc.name)
			if rep := r.report(t); rep["source"] != "remote" {
				t.Errorf("restore reported %v, want the remote", rep)
			}
			if got, err := os.ReadFile(filepath.Join(out, "mem.img")); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("restored bytes differ: %v", err)
			}
		})
	}
	// The regional serve kept what it served on its disk.
	var held int
	filepath.Walk(filepath.Join(dir, "regional", "cas"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			held++
		}
		return nil
	})
	if held == 0 {
		t.Error("the regional serve keeps no blob on its disk")
	}
}
