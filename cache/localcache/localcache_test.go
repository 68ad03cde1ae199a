package localcache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

const mib = 1 << 20

var ns = cache.Namespace{Function: digest.BLAKE3}

// content returns size deterministic pseudo-random bytes for seed.
func content(seed uint64, size int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, size)
	for i := 0; i+8 <= size; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := size &^ 7; i < size; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

func newCache(t testing.TB, dir string, opts Options) *Cache {
	t.Helper()
	c, err := New(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func put(t testing.TB, c *Cache, ns cache.Namespace, data []byte) *repb.Digest {
	t.Helper()
	d := digest.Compute(ns.DigestFunction(), data)
	if err := c.Write(context.Background(), ns, d, bytes.NewReader(data)); err != nil {
		t.Fatalf("Write %s: %v", digest.String(d), err)
	}
	return d
}

func present(t testing.TB, c *Cache, ds ...*repb.Digest) []bool {
	t.Helper()
	missing, err := c.FindMissing(context.Background(), ns, ds)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]bool, len(ds))
	for i, d := range ds {
		out[i] = true
		for _, m := range missing {
			if digest.Equal(m, d) {
				out[i] = false
			}
		}
	}
	return out
}

func tmpEntries(t testing.TB, c *Cache) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(c.Dir(), tmpDir))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func TestSparseBlobsAreCheap(t *testing.T) {
	c := newCache(t, t.TempDir(), Options{})
	data := make([]byte, 4096000)
	copy(data[8192:], content(5, 4096))
	put(t, c, ns, data)
	if u := c.Usage(); u > 64<<10 {
		t.Errorf("Usage = %d for a blob with one data page, want a few KiB", u)
	}
}

// failingReader yields some bytes, then an error.
type failingReader struct {
	r   io.Reader
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if err == io.EOF {
		return n, f.err
	}
	return n, err
}

func TestWriteIsIdempotent(t *testing.T) {
	c := newCache(t, t.TempDir(), Options{})
	data := content(9, mib)
	d := put(t, c, ns, data)
	u := c.Usage()
	// Already present: the reader is not even consulted.
	if err := c.Write(context.Background(), ns, d, &failingReader{bytes.NewReader(nil), errors.New("must not be read")}); err != nil {
		t.Fatal(err)
	}
	if c.Usage() != u {
		t.Errorf("usage %d -> %d", u, c.Usage())
	}
}

// blobs returns n distinct 1 MiB blobs' data.
func blobs(n int, seed uint64) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		out[i] = content(seed+uint64(i), mib)
	}
	return out
}

func TestLRUEvictsOldestFirst(t *testing.T) {
	c := newCache(t, t.TempDir(), Options{MaxBytes: 4 * mib})
	var ds []*repb.Digest
	for _, b := range blobs(6, 100) {
		ds = append(ds, put(t, c, ns, b))
		if c.Usage() > 4*mib {
			t.Fatalf("usage %d over bound", c.Usage())
		}
	}
	want := []bool{false, false, true, true, true, true}
	if got := present(t, c, ds...); !equalBools(got, want) {
		t.Errorf("present = %v, want %v", got, want)
	}
	if got := diskUsage(t, c.Dir()); got > 4*mib {
		t.Errorf("disk usage %d over bound", got)
	}
}

func equalBools(a, b []bool) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// diskUsage sums st_blocks*512 of the files under cas/ and ac/.
func diskUsage(t testing.TB, dir string) int64 {
	t.Helper()
	var total int64
	for _, top := range []string{casDir, acDir} {
		filepath.WalkDir(filepath.Join(dir, top), func(p string, de fs.DirEntry, err error) error {
			if err == nil && !de.IsDir() && de.Name() != instFile {
				var st unix.Stat_t
				if unix.Stat(p, &st) == nil {
					total += st.Blocks * 512
				}
			}
			return nil
		})
	}
	return total
}

func TestLookupRefreshesRecency(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name  string
		touch func(c *Cache, d *repb.Digest) error
	}{
		{"FindMissing", func(c *Cache, d *repb.Digest) error {
			_, err := c.FindMissing(ctx, ns, []*repb.Digest{d})
			return err
		}},
		{"Read", func(c *Cache, d *repb.Digest) error {
			_, err := cache.ReadAll(ctx, c, ns, d)
			return err
		}},
		{"Open", func(c *Cache, d *repb.Digest) error {
			b, err := c.Open(ctx, ns, d)
			if err == nil {
				b.Close()
			}
			return err
		}},
		{"Pin", func(c *Cache, d *repb.Digest) error {
			c.Pin(ns, []*repb.Digest{d})()
			return nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCache(t, t.TempDir(), Options{MaxBytes: 4 * mib})
			bs := blobs(5, 200)
			var ds []*repb.Digest
			for _, b := range bs[:4] {
				ds = append(ds, put(t, c, ns, b))
			}
			if err := tt.touch(c, ds[0]); err != nil {
				t.Fatal(err)
			}
			ds = append(ds, put(t, c, ns, bs[4]))
			// The oldest, ds[0], was refreshed: ds[1] goes instead.
			want := []bool{true, false, true, true, true}
			if got := present(t, c, ds...); !equalBools(got, want) {
				t.Errorf("present = %v, want %v", got, want)
			}
		})
	}
	t.Run("GetActionResult", func(t *testing.T) {
		c := newCache(t, t.TempDir(), Options{MaxBytes: 4 * mib})
		key := digest.Compute(digest.BLAKE3, []byte("key"))
		if err := c.UpdateActionResult(ctx, ns, key, &repb.ActionResult{ExitCode: 3}); err != nil {
			t.Fatal(err)
		}
		bs := blobs(5, 300)
		var ds []*repb.Digest
		for _, b := range bs[:3] {
			ds = append(ds, put(t, c, ns, b))
		}
		if _, err := c.GetActionResult(ctx, ns, key); err != nil {
			t.Fatal(err)
		}
		ds = append(ds, put(t, c, ns, bs[3]))
		if _, err := c.GetActionResult(ctx, ns, key); err != nil {
			t.Fatalf("refreshed AC entry evicted: %v", err)
		}
		if present(t, c, ds[0])[0] {
			t.Error("oldest blob kept while the refreshed AC entry is older")
		}
	})
}

func TestPinnedAndOpenBlobsAreNotEvicted(t *testing.T) {
	ctx := context.Background()
	c := newCache(t, t.TempDir(), Options{MaxBytes: 3 * mib})
	bs := blobs(8, 400)
	pinned := put(t, c, ns, bs[0])
	release := c.Pin(ns, []*repb.Digest{pinned})
	opened := put(t, c, ns, bs[1])
	b, err := c.Open(ctx, ns, opened)
	if err != nil {
		t.Fatal(err)
	}
	var others []*repb.Digest
	for _, data := range bs[2:6] {
		others = append(others, put(t, c, ns, data))
	}
	if got := present(t, c, pinned, opened); !equalBools(got, []bool{true, true}) {
		t.Fatalf("pinned/open present = %v", got)
	}
	if c.Usage() > 3*mib {
		t.Errorf("usage %d over bound with only two pinned", c.Usage())
	}
	release()
	release() // idempotent
	b.Close()
	b.Close()
	// Both are now the oldest... except the lookups above refreshed them;
	// make them oldest again by touching the others.
	present(t, c, others[2:]...)
	put(t, c, ns, bs[6])
	put(t, c, ns, bs[7])
	if got := present(t, c, pinned, opened); !equalBools(got, []bool{false, false}) {
		t.Errorf("released blobs still present: %v", got)
	}
}

func TestRestartKeepsLRUOrder(t *testing.T) {
	dir := t.TempDir()
	c := newCache(t, dir, Options{MaxBytes: 4 * mib})
	bs := blobs(5, 500)
	var ds []*repb.Digest
	for _, b := range bs[:4] {
		ds = append(ds, put(t, c, ns, b))
	}
	present(t, c, ds[1]) // order, oldest first: 0 2 3 1
	present(t, c, ds[0]) // 2 3 1 0
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c2 := newCache(t, dir, Options{MaxBytes: 4 * mib})
	if c2.Usage() != c.Usage() {
		t.Errorf("rebuilt usage %d, had %d", c2.Usage(), c.Usage())
	}
	put(t, c2, ns, bs[4])
	if got, want := present(t, c2, ds...), []bool{true, true, false, true}; !equalBools(got, want) {
		t.Errorf("after restart present = %v, want %v", got, want)
	}
	// A smaller bound on restart evicts down to it, oldest first.
	c2.Close()
	c3 := newCache(t, dir, Options{MaxBytes: 2 * mib})
	if c3.Usage() > 2*mib || diskUsage(t, dir) > 2*mib {
		t.Errorf("usage %d / disk %d over the new bound", c3.Usage(), diskUsage(t, dir))
	}
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	f.ReadAt(b, off)
	b[0] ^= 0x40
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestCorruptBlobsAreDetected(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name   string
		damage func(t *testing.T, path string)
	}{
		{"flipped byte", func(t *testing.T, p string) { flipByte(t, p, 12345) }},
		{"truncated", func(t *testing.T, p string) { os.Truncate(p, 4096) }},
		{"extended", func(t *testing.T, p string) { os.Truncate(p, 2*mib) }},
	}
	for _, tt := range tests {
		for _, how := range []string{"Read", "Open"} {
			t.Run(tt.name+"/"+how, func(t *testing.T) {
				dir := t.TempDir()
				c1 := newCache(t, dir, Options{})
				data := content(600, mib)
				d := put(t, c1, ns, data)
				tt.damage(t, c1.Path(ns, d))
				// The damage is what a crash leaves: the next boot
				// trusts no verification marker of the last one.
				c2 := newCache(t, dir, Options{BootID: "after-a-crash"})
				var err error
				if how == "Read" {
					_, err = cache.ReadAll(ctx, c2, ns, d)
				} else {
					var b cache.Blob
					b, err = c2.Open(ctx, ns, d)
					if b != nil {
						b.Close()
					}
				}
				if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), "corrupt") || !strings.Contains(err.Error(), d.Hash) {
					t.Fatalf("%s: %v, want Internal corrupt naming the digest", how, err)
				}
				if _, err := os.Stat(c2.Path(ns, d)); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("corrupt file kept: %v", err)
				}
				if present(t, c2, d)[0] {
					t.Error("corrupt blob still reported present")
				}
				// A fresh write restores it.
				put(t, c2, ns, data)
				if got, err := cache.ReadAll(ctx, c2, ns, d); err != nil || !bytes.Equal(got, data) {
					t.Errorf("after rewrite: %v", err)
				}
			})
		}
	}
}

func TestUnverifiedBlobIsRewritten(t *testing.T) {
	dir := t.TempDir()
	c1 := newCache(t, dir, Options{})
	data := content(601, mib)
	d := put(t, c1, ns, data)
	flipByte(t, c1.Path(ns, d), 10)
	c2 := newCache(t, dir, Options{})
	// Present but unverified: a write replaces the file instead of trusting it.
	put(t, c2, ns, data)
	if got, err := cache.ReadAll(context.Background(), c2, ns, d); err != nil || !bytes.Equal(got, data) {
		t.Errorf("ReadAll: %v", err)
	}
}

func TestActionCache(t *testing.T) {
	ctx := context.Background()
	c := newCache(t, t.TempDir(), Options{})
	key := &repb.Digest{Hash: digest.StringListHash("k"), SizeBytes: 1}
	nsA := cache.Namespace{Group: "GR-a", Instance: "ci/main", Function: digest.BLAKE3}
	arA := &repb.ActionResult{ExitCode: 1}
	if err := c.UpdateActionResult(ctx, nsA, key, arA); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		ns   cache.Namespace
		code codes.Code
	}{
		{"same namespace", nsA, codes.OK},
		{"other group", cache.Namespace{Group: "GR-b", Instance: nsA.Instance, Function: digest.BLAKE3}, codes.NotFound},
		{"anonymous group", cache.Namespace{Instance: nsA.Instance, Function: digest.BLAKE3}, codes.NotFound},
		{"other instance", cache.Namespace{Group: nsA.Group, Instance: "ci/other", Function: digest.BLAKE3}, codes.NotFound},
		{"other function", cache.Namespace{Group: nsA.Group, Instance: nsA.Instance, Function: digest.SHA256}, codes.NotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ar, err := c.GetActionResult(ctx, tt.ns, key)
			if status.Code(err) != tt.code {
				t.Fatalf("GetActionResult: %v, want %v", err, tt.code)
			}
			if err == nil && ar.ExitCode != 1 {
				t.Errorf("got %v", ar)
			}
			if err != nil && !strings.Contains(err.Error(), key.Hash) {
				t.Errorf("error %q does not name the key", err)
			}
		})
	}
	// Replace, then list.
	if err := c.UpdateActionResult(ctx, nsA, key, &repb.ActionResult{ExitCode: 2}); err != nil {
		t.Fatal(err)
	}
	nsB := cache.Namespace{Group: "GR-b", Instance: "../../../etc/x", Function: digest.SHA256}
	if err := c.UpdateActionResult(ctx, nsB, key, &repb.ActionResult{ExitCode: 9}); err != nil {
		t.Fatal(err)
	}
	list, err := c.ListActionResults(ctx, "GR-a")
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Result.ExitCode != 2 || list[0].Namespace != nsA || !digest.Equal(list[0].Key, key) {
		t.Fatalf("ListActionResults(GR-a) = %+v", list)
	}
	list, err = c.ListActionResults(ctx, "GR-b")
	if err != nil || len(list) != 1 || list[0].Namespace != nsB || list[0].Result.ExitCode != 9 {
		t.Fatalf("ListActionResults(GR-b) = %+v, %v", list, err)
	}
	if list, err := c.ListActionResults(ctx, ""); err != nil || len(list) != 0 {
		t.Errorf("anonymous listing = %+v, %v", list, err)
	}
	// Restart: entries survive.
	c2 := newCache(t, c.Dir(), Options{})
	if ar, err := c2.GetActionResult(ctx, nsA, key); err != nil || ar.ExitCode != 2 {
		t.Errorf("after restart: %v, %v", ar, err)
	}
}

func TestCorruptActionResult(t *testing.T) {
	ctx := context.Background()
	c := newCache(t, t.TempDir(), Options{})
	key := &repb.Digest{Hash: digest.StringListHash("k"), SizeBytes: 1}
	if err := c.UpdateActionResult(ctx, ns, key, &repb.ActionResult{ExitCode: 1}); err != nil {
		t.Fatal(err)
	}
	rel, _ := acRel(ns, key)
	if err := os.WriteFile(filepath.Join(c.Dir(), rel), []byte{0xff, 0xff, 0xff}, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetActionResult(ctx, ns, key); status.Code(err) != codes.DataLoss {
		t.Fatalf("GetActionResult of garbage: %v, want Internal", err)
	}
	if _, err := c.GetActionResult(ctx, ns, key); status.Code(err) != codes.NotFound {
		t.Errorf("garbage entry not removed: %v", err)
	}
}

func TestHostileNames(t *testing.T) {
	ctx := context.Background()
	parent := t.TempDir()
	dir := filepath.Join(parent, "cache")
	c := newCache(t, dir, Options{})
	key := &repb.Digest{Hash: digest.StringListHash("k"), SizeBytes: 1}
	for _, g := range []string{"..", ".", "../x", "a/b", "/abs", "x\x00y", "-rf", "a b", strings.Repeat("a", 129), "ünicode"} {
		t.Run("group "+g, func(t *testing.T) {
			ns := cache.Namespace{Group: g}
			if err := c.UpdateActionResult(ctx, ns, key, &repb.ActionResult{}); status.Code(err) != codes.InvalidArgument {
				t.Errorf("Update: %v, want InvalidArgument", err)
			}
			if _, err := c.GetActionResult(ctx, ns, key); status.Code(err) != codes.InvalidArgument {
				t.Errorf("Get: %v, want InvalidArgument", err)
			}
			if _, err := c.ListActionResults(ctx, g); status.Code(err) != codes.InvalidArgument {
				t.Errorf("List: %v, want InvalidArgument", err)
			}
		})
	}
	for _, inst := range []string{"../../..", "/etc/passwd", "a/../../b", "x\x00y", strings.Repeat("../", 300)} {
		t.Run("instance "+inst, func(t *testing.T) {
			ns := cache.Namespace{Group: "g", Instance: inst}
			if err := c.UpdateActionResult(ctx, ns, key, &repb.ActionResult{ExitCode: 5}); err != nil {
				t.Fatal(err)
			}
			if ar, err := c.GetActionResult(ctx, ns, key); err != nil || ar.ExitCode != 5 {
				t.Fatalf("Get: %v, %v", ar, err)
			}
		})
	}
	// Nothing was created outside the cache directory.
	ents, _ := os.ReadDir(parent)
	if len(ents) != 1 {
		t.Errorf("entries beside the cache dir: %v", ents)
	}
	if _, err := c.GetActionResult(ctx, ns, &repb.Digest{Hash: "../../../../etc/passwd", SizeBytes: 1}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("hostile key hash: %v", err)
	}
	if p := c.Path(ns, &repb.Digest{Hash: "../x"}); p != "" {
		t.Errorf("Path of a hostile digest = %q", p)
	}
	if _, err := c.Read(ctx, cache.Namespace{Function: digest.Function(99)}, key); status.Code(err) != codes.InvalidArgument {
		t.Errorf("unknown digest function: %v", err)
	}
}

func TestStaleTempFilesAreCleaned(t *testing.T) {
	dir := t.TempDir()
	newCache(t, dir, Options{}) // creates the layout
	stale := filepath.Join(dir, tmpDir, "stale.tmp")
	live := filepath.Join(dir, tmpDir, "live.tmp")
	os.WriteFile(stale, []byte("x"), 0o644)
	os.WriteFile(live, []byte("y"), 0o644)
	fresh := filepath.Join(dir, tmpDir, "fresh.tmp") // created, not yet locked
	os.WriteFile(fresh, []byte("z"), 0o644)
	old := time.Now().Add(-2 * tempGrace)
	os.Chtimes(stale, old, old)
	os.Chtimes(live, old, old)
	f, err := os.Open(live)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	newCache(t, dir, Options{})
	if _, err := os.Stat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stale temp file kept: %v", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("a live writer's temp file was removed: %v", err)
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Errorf("a temp file younger than the grace period was removed: %v", err)
	}
}

func TestVanishedFileIsNotFound(t *testing.T) {
	ctx := context.Background()
	c := newCache(t, t.TempDir(), Options{})
	d := put(t, c, ns, content(700, mib))
	os.Remove(c.Path(ns, d)) // as if another process evicted it
	if _, err := c.Open(ctx, ns, d); !cache.IsNotFound(err) {
		t.Errorf("Open: %v, want NotFound", err)
	}
	if _, err := c.Read(ctx, ns, d); !cache.IsNotFound(err) {
		t.Errorf("Read: %v, want NotFound", err)
	}
	if present(t, c, d)[0] || c.Usage() != 0 {
		t.Errorf("vanished blob still indexed (usage %d)", c.Usage())
	}
}

func TestTempDirIsOnSameFilesystem(t *testing.T) {
	c := newCache(t, t.TempDir(), Options{})
	d := put(t, c, ns, content(800, 4096))
	dst := filepath.Join(c.TempDir(), "linked")
	if err := os.Link(c.Path(ns, d), dst); err != nil {
		t.Fatalf("hard link into TempDir: %v", err)
	}
}

func TestConcurrentUse(t *testing.T) {
	ctx := context.Background()
	c := newCache(t, t.TempDir(), Options{MaxBytes: 6 * mib})
	bs := blobs(12, 900)
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		go func(w int) {
			r := rand.New(rand.NewPCG(uint64(w), 1))
			for i := 0; i < 60; i++ {
				data := bs[r.IntN(len(bs))]
				d := digest.Compute(digest.BLAKE3, data)
				if r.IntN(2) == 0 {
					if err := c.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
						errs <- err
						return
					}
					continue
				}
				b, err := c.Open(ctx, ns, d)
				if cache.IsNotFound(err) {
					continue
				}
				if err != nil {
					errs <- err
					return
				}
				buf := make([]byte, len(data))
				_, err = b.ReadAt(buf, 0)
				b.Close()
				if err != nil && err != io.EOF || !bytes.Equal(buf, data) {
					errs <- errors.New("torn read")
					return
				}
			}
			errs <- nil
		}(w)
	}
	for w := 0; w < 8; w++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if c.Usage() > 6*mib || diskUsage(t, c.Dir()) > 6*mib {
		t.Errorf("usage %d / disk %d over bound", c.Usage(), diskUsage(t, c.Dir()))
	}
}

func TestEvictionsCounted(t *testing.T) {
	c := newCache(t, t.TempDir(), Options{MaxBytes: 256 << 10})
	var ds []*repb.Digest
	for i := 0; i < 8; i++ {
		ds = append(ds, put(t, c, cache.Namespace{}, content(uint64(100+i), 64<<10)))
	}
	gone := 0
	for _, p := range present(t, c, ds...) {
		if !p {
			gone++
		}
	}
	if gone == 0 || c.Evictions() != int64(gone) {
		t.Errorf("Evictions() = %d, want the %d blobs no longer present (> 0)", c.Evictions(), gone)
	}
}
