package e2e

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/remote"
)

// smallDisk mounts a tmpfs of size (e.g. "2m") at a new directory; grow
// frees space by remounting it with a larger size.
func smallDisk(t *testing.T, size string) (dir string, grow func()) {
	t.Helper()
	testutil.RequireRoot(t)
	dir = t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		testutil.Unavailable(t, "cannot mount a tmpfs: "+err.Error())
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir, func() {
		if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_REMOUNT, "size=256m"); err != nil {
			t.Fatalf("growing the tmpfs at %s: %v", dir, err)
		}
	}
}

// noPartials fails when temporary files remain under dir/tmp (a blob cut
// short by the full disk is never renamed into place).
func noPartials(t *testing.T, dir string) {
	t.Helper()
	if tmp, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(tmp) != 0 {
		t.Errorf("%d temporary files left in %s", len(tmp), filepath.Join(dir, "tmp"))
	}
}

// TestFullDiskIsResourceExhausted: a save into a local cache on a full
// filesystem, an upload to a serve whose disk is full and a restore into a
// full output directory each fail with ResourceExhausted naming the blob
// or file and the place, leave nothing partial, and succeed once space is
// freed.
func TestFullDiskIsResourceExhausted(t *testing.T) {
	work := t.TempDir()
	mem := filepath.Join(work, "mem.img")
	want := writeVM(t, mem, 4<<20, 21)
	key := []string{"--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main"}

	t.Run("save", func(t *testing.T) {
		disk, grow := smallDisk(t, "2m")
		cacheDir := filepath.Join(disk, "cache")
		save := append([]string{"save", "--cache-dir", cacheDir, "--chunk-size", "65536", "--chunked", "mem.img=" + mem}, key...)
		r := run(context.Background(), save...)
		stderr, err := r.stderr, r.err
		if err == nil || !strings.Contains(stderr, "ResourceExhausted") || !strings.Contains(stderr, "blob ") || !strings.Contains(stderr, cacheDir) {
			t.Fatalf("save onto a full disk: %v\n%s\nwant ResourceExhausted naming a blob and %s", err, stderr, cacheDir)
		}
		if strings.Contains(stderr, "rpc error") {
			t.Errorf("a local error in transport wording: %s", stderr)
		}
		noPartials(t, cacheDir)
		grow()
		cli(t, nil, save...)
		out := filepath.Join(work, "out-save")
		cli(t, nil, append([]string{"restore", "--cache-dir", cacheDir, "--out", out}, key...)...)
		if got, err := os.ReadFile(filepath.Join(out, "mem.img")); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("restore after space was freed differs (err %v)", err)
		}
	})

	t.Run("serve receiving an upload", func(t *testing.T) {
		disk, grow := smallDisk(t, "2m")
		srv := startServe(t, nil, "--cache-dir", filepath.Join(disk, "serve"), "--compression=false")
		ctx := ctxT(t)
		c, err := remote.Dial(ctx, srv.url(), remote.Options{MaxRetries: 1, DisableCompression: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ns := cache.Namespace{}
		data := randomBytes(3<<20, 5)
		d := digest.Compute(c.DigestFunction(), data)
		err = c.Write(ctx, ns, d, bytes.NewReader(data))
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), d.Hash) {
			t.Fatalf("upload onto a full disk: %v, want ResourceExhausted naming %s", err, digest.String(d))
		}
		if missing, err := c.FindMissing(ctx, ns, []*repb.Digest{d}); err != nil || len(missing) != 1 {
			t.Fatalf("FindMissing after the failed upload: %v %v, want it missing", missing, err)
		}
		noPartials(t, filepath.Join(disk, "serve"))
		grow()
		if err := c.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
			t.Fatalf("upload once space is freed: %v", err)
		}
		if got, err := cache.ReadAll(ctx, c, ns, d); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("reading the uploaded blob: %v", err)
		}
	})

	t.Run("restore output directory", func(t *testing.T) {
		cacheDir := filepath.Join(work, "cache-restore")
		cli(t, nil, append([]string{"save", "--cache-dir", cacheDir, "--chunk-size", "65536", "--chunked", "mem.img=" + mem}, key...)...)
		disk, grow := smallDisk(t, "1m")
		out := filepath.Join(disk, "out")
		restore := append([]string{"restore", "--cache-dir", cacheDir, "--out", out}, key...)
		r := run(context.Background(), restore...)
		stderr, err := r.stderr, r.err
		if err == nil || !strings.Contains(stderr, "ResourceExhausted") || !strings.Contains(stderr, "mem.img") {
			t.Fatalf("restore into a full directory: %v\n%s\nwant ResourceExhausted naming mem.img", err, stderr)
		}
		if left, _ := os.ReadDir(out); len(left) != 0 {
			var names []string
			for _, e := range left {
				names = append(names, e.Name())
			}
			t.Errorf("the failed restore left %v in %s", names, out)
		}
		grow()
		cli(t, nil, restore...)
		if got, err := os.ReadFile(filepath.Join(out, "mem.img")); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("restore once space is freed differs (err %v)", err)
		}
	})
}
