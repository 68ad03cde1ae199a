package main

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/internal/testutil"
)

// chunkyVM is 3 default chunks and a short last one: chunk 1 is all zeros
// (a hole), the others have 64 KiB and single-page zero runs inside.
func chunkyVM(t *testing.T, path string) (data []byte, innerHoles []int64) {
	t.Helper()
	const cs = 4096000
	data = make([]byte, 3*cs+600001)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	clear(data[cs : 2*cs])
	for _, c := range []int64{0, 2, 3} {
		z := c*cs + 256<<10 // a 128 KiB zero run, page-aligned inside the chunk
		clear(data[z : z+128<<10])
		innerHoles = append(innerHoles, z)
		clear(data[c*cs+8192 : c*cs+12288]) // one zero page
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return data, innerHoles
}

// checkRestored: the file equals want byte for byte and is sparse at each
// of holes (zero runs inside data chunks) and at the all-zero chunk.
func checkRestored(t *testing.T, path string, want []byte, holes []int64) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s differs from the saved file (%d vs %d bytes)", path, len(got), len(want))
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, h := range append(holes, 4096000) {
		next, err := unix.Seek(int(f.Fd()), h, unix.SEEK_DATA)
		if err != nil || next <= h {
			t.Errorf("%s: offset %d is data (next data at %d, %v), want a hole", path, h, next, err)
		}
	}
}

// Restores from the local cache (raw and compressed at rest) and from a
// real serve process into an empty cache are byte-for-byte equal to the
// saved file, a short last chunk included, and keep zero runs inside
// chunks as holes.
func TestRestoreCopiesSparse(t *testing.T) {
	url := startServeProc(t)
	for _, compress := range []bool{false, true} {
		t.Run("compression="+strconv.FormatBool(compress), func(t *testing.T) {
			dir := t.TempDir()
			data, holes := chunkyVM(t, filepath.Join(dir, "mem"))
			args := func(cache, cmd string) []string {
				a := append(keyArgs(cache), "--remote", url, "--instance", "sparse-"+strconv.FormatBool(compress), cmd)
				if compress {
					a = append(a, "--cache-compression")
				}
				return a
			}
			run(t, false, append(args(filepath.Join(dir, "a"), "save"), "--chunked", "mem="+filepath.Join(dir, "mem"))...)
			for _, tc := range []struct{ name, cache string }{
				{"local", filepath.Join(dir, "a")},
				{"cold", filepath.Join(dir, "b")}, // empty: every chunk from serve
				{"warm", filepath.Join(dir, "b")}, // what the cold restore cached
			} {
				out := filepath.Join(dir, "out-"+tc.name)
				run(t, false, append(args(tc.cache, "restore"), "--out", out)...)
				checkRestored(t, filepath.Join(out, "mem"), data, holes)
			}
		})
	}
}

// procIO returns this process's rchar and wchar: the bytes its read and
// write system calls moved (page cache included).
func procIO(t *testing.T) (rchar, wchar int64) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		testutil.Unavailable(t, "/proc/self/io: "+err.Error())
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ": ")
		n, _ := strconv.ParseInt(v, 10, 64)
		switch k {
		case "rchar":
			rchar = n
		case "wchar":
			wchar = n
		}
	}
	return rchar, wchar
}

// A cold restore writes each fetched chunk once into the cache and once
// into the output, and never reads back what it just wrote: the client's
// write calls move at most the fetched bytes plus the output, and its read
// calls (the fetched stream included) about the fetched bytes, plus a
// little for framing, manifests and trees.
func TestColdRestoreWritesOnce(t *testing.T) {
	url := startServeProc(t)
	dir := t.TempDir()
	data := writeRandom(t, filepath.Join(dir, "mem"), 12*4096000+777, 21)
	run(t, false, append(keyArgs(filepath.Join(dir, "a")), "--remote", url, "save", "--chunked", "mem="+filepath.Join(dir, "mem"))...)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sf := snapshotFlags{
		cf: cacheFlags{dir: filepath.Join(dir, "b"), maxBytes: DefaultCacheBytes, function: "blake3",
			remote: remoteFlags{urls: []string{url}, timeout: time.Minute, apiKeyHdr: "x-api-key", noCompress: true}},
		kf: keyFlags{instance: "ci", platform: []string{"os=linux", "arch=amd64"}, configHash: "c0ffee", ref: "feat", defaultRef: "main"},
		gf: getFlags{policy: "local-first", maxStale: "24h"},
	}
	o, err := sf.options()
	if err != nil {
		t.Fatal(err)
	}
	e, snap, err := openSnapshot(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	var fetched int64
	for _, c := range snap.Manifest.GetChunkedFiles()[0].GetChunks() {
		fetched += c.GetDigest().GetSizeBytes()
	}
	out := filepath.Join(dir, "out")
	r0, w0 := procIO(t)
	if _, err := restoreTo(ctx, e, snap, out, restoreToOptions{}); err != nil {
		t.Fatal(err)
	}
	r1, w1 := procIO(t)
	const slack = 1 << 20
	if w := w1 - w0; w > 2*fetched+slack {
		t.Errorf("cold restore wrote %d bytes for %d fetched bytes: more than once into the cache and once into the output", w, fetched)
	}
	t.Logf("read %d, wrote %d bytes for %d fetched", r1-r0, w1-w0, fetched)
	// The stream's framing costs a few percent; reading back the chunks
	// would add their data bytes (two thirds of them here).
	if r := r1 - r0; r > fetched+fetched/10+slack {
		t.Errorf("cold restore read %d bytes for %d fetched bytes: it read back what it had just written", r, fetched)
	}
	got, err := os.ReadFile(filepath.Join(out, "mem"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("restored file differs (%v)", err)
	}
}
