package localcache

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

const (
	helperEnv     = "SNAPLOADER_LOCALCACHE_HELPER_DIR"
	helperSeedEnv = "SNAPLOADER_LOCALCACHE_HELPER_SEED"
	sharedBound   = 8 * mib
	sharedBlobs   = 40
	sharedSize    = 256 << 10
	sharedIters   = 400
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(helperEnv); dir != "" {
		seed, _ := strconv.ParseUint(os.Getenv(helperSeedEnv), 10, 64)
		if err := shareWorkload(dir, seed); err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// shareWorkload writes, reads and opens a fixed set of blobs in random order
// through a cache over dir shared with another process. Only NotFound is an
// acceptable error; any content mismatch is a failure.
func shareWorkload(dir string, seed uint64) error {
	ctx := context.Background()
	c, err := New(dir, Options{MaxBytes: sharedBound})
	if err != nil {
		return err
	}
	data := make([][]byte, sharedBlobs)
	for i := range data {
		data[i] = content(uint64(5000+i), sharedSize+i*4096)
	}
	r := rand.New(rand.NewPCG(seed, 11))
	for it := 0; it < sharedIters; it++ {
		i := r.IntN(sharedBlobs)
		d := digest.Compute(digest.BLAKE3, data[i])
		switch r.IntN(4) {
		case 0:
			if err := c.Write(ctx, ns, d, bytes.NewReader(data[i])); err != nil {
				return fmt.Errorf("write %d: %w", i, err)
			}
		case 1:
			got, err := cache.ReadAll(ctx, c, ns, d)
			if cache.IsNotFound(err) {
				continue
			}
			if err != nil {
				return fmt.Errorf("read %d: %w", i, err)
			}
			if !bytes.Equal(got, data[i]) {
				return fmt.Errorf("read %d: torn or wrong content", i)
			}
		case 2:
			b, err := c.Open(ctx, ns, d)
			if cache.IsNotFound(err) {
				continue
			}
			if err != nil {
				return fmt.Errorf("open %d: %w", i, err)
			}
			buf := make([]byte, len(data[i]))
			_, err = b.ReadAt(buf, 0)
			b.Close()
			if err != nil && err != io.EOF {
				return fmt.Errorf("readat %d: %w", i, err)
			}
			if !bytes.Equal(buf, data[i]) {
				return fmt.Errorf("readat %d: torn or wrong content", i)
			}
		case 3:
			if _, err := c.FindMissing(ctx, ns, []*repb.Digest{d}); err != nil {
				return fmt.Errorf("findmissing %d: %w", i, err)
			}
		}
	}
	return c.Close()
}

func TestTwoProcessesShareADirectory(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+dir, helperSeedEnv+"=2")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	inProc := shareWorkload(dir, 1)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("second process: %v: %s", err, stderr.String())
	}
	if inProc != nil {
		t.Fatalf("this process: %v", inProc)
	}
	if got := diskUsage(t, dir); got > sharedBound {
		t.Errorf("disk usage %d after both finished, bound %d", got, sharedBound)
	}
	if got := diskUsage(t, dir); got < sharedBound/2 {
		t.Errorf("disk usage %d: workload stored too little to test the bound", got)
	}
	c := newCache(t, dir, Options{MaxBytes: sharedBound})
	if len(tmpEntries(t, c)) != 0 {
		t.Errorf("temp files left: %v", tmpEntries(t, c))
	}
}
