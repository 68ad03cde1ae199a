package localcache

import (
	"bytes"
	"context"
	"io"
	"os"
	"runtime"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
	"golang.org/x/sys/unix"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
)

const chunk = 4096000

// fileSize is the size of d's file.
func fileSize(t *testing.T, c *Cache, d *repb.Digest) (size, blocks int64) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(c.Path(ns, d), &st); err != nil {
		t.Fatal(err)
	}
	return st.Size, st.Blocks * 512
}

// readAllForms reads d through Read, Open/ReadAt and ReadCompressed
// (decoding zstd streams) and fails unless each gives want.
func readAllForms(t *testing.T, c *Cache, d *repb.Digest, want []byte) (zst bool) {
	t.Helper()
	ctx := context.Background()
	got, err := cache.ReadAll(ctx, c, ns, d)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("Read: %d bytes, err %v; want %d bytes", len(got), err, len(want))
	}
	b, err := c.Open(ctx, ns, d)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	buf := make([]byte, len(want))
	if n, err := b.ReadAt(buf, 0); n != len(want) || !bytes.Equal(buf, want) {
		t.Fatalf("ReadAt: %d bytes, err %v", n, err)
	}
	if len(want) > 10 {
		part := make([]byte, 7)
		if _, err := b.ReadAt(part, int64(len(want)/2)); err != nil || !bytes.Equal(part, want[len(want)/2:][:7]) {
			t.Fatalf("ReadAt in the middle: err %v", err)
		}
	}
	b.Close()
	rc, zst, err := c.ReadCompressed(ctx, ns, d)
	if err != nil {
		t.Fatalf("ReadCompressed: %v", err)
	}
	raw, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatalf("ReadCompressed stream: %v", err)
	}
	if zst {
		dec, _ := zstd.NewReader(nil, zstd.WithDecoderMaxWindow(MaxWindow))
		defer dec.Close()
		if raw, err = dec.DecodeAll(raw, nil); err != nil {
			t.Fatalf("decoding ReadCompressed's frames: %v", err)
		}
	}
	if !bytes.Equal(raw, want) {
		t.Fatalf("ReadCompressed (zstd %v) gives %d bytes that differ from the %d stored", zst, len(raw), len(want))
	}
	return zst
}

// TestCompressionAtRest: VM-like chunks stored with Compression take less
// than 0.6x their non-zero bytes, whichever way they are written, and read
// back the same through every read path, in this process and in a fresh
// one that has not verified them.
func TestCompressionAtRest(t *testing.T) {
	const size = 24 * mib
	img := testutil.VMImage(1, size)
	nonZero := testutil.VMImageNonZero(1, size)
	ctx := context.Background()
	for _, how := range []string{"Write", "PutHashed", "PutFile"} {
		t.Run(how, func(t *testing.T) {
			c := newCache(t, t.TempDir(), Options{Compression: true})
			var ds []*repb.Digest
			var chunks [][]byte
			for off := 0; off < size; off += chunk {
				b := img[off:min(off+chunk, size)]
				d := digest.Compute(ns.Function, b)
				var err error
				switch how {
				case "Write":
					err = c.Write(ctx, ns, d, bytes.NewReader(b))
				case "PutHashed":
					err = c.PutHashed(ctx, ns, d, b)
				case "PutFile":
					f, ferr := os.CreateTemp(c.TempDir(), "put-")
					if ferr != nil {
						t.Fatal(ferr)
					}
					f.Write(b)
					err = c.PutFile(ctx, ns, d, f, nil)
					f.Close()
				}
				if err != nil {
					t.Fatal(err)
				}
				ds, chunks = append(ds, d), append(chunks, b)
			}
			stored := diskUsage(t, c.Dir())
			if stored != c.Usage() {
				t.Errorf("Usage %d, files take %d", c.Usage(), stored)
			}
			if stored*10 >= nonZero*6 {
				t.Errorf("stored %d bytes for %d non-zero bytes (%.2fx), want < 0.6x", stored, nonZero, float64(stored)/float64(nonZero))
			}
			for i, d := range ds {
				if !readAllForms(t, c, d, chunks[i]) {
					t.Errorf("chunk %d is not stored compressed", i)
				}
			}
			c2 := newCache(t, c.Dir(), Options{})
			for i, d := range ds {
				readAllForms(t, c2, d, chunks[i])
			}
		})
	}
}

// TestIncompressibleStaysRaw: random data, with or without a zero run, is
// stored raw (exactly its size, zero runs as holes), never inflated.
func TestIncompressibleStaysRaw(t *testing.T) {
	holey := content(21, chunk)
	clear(holey[1<<20 : 2<<20])
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"random", content(20, chunk)},
		{"random with a 1 MiB zero run", holey},
		{"small", content(22, 4000)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCache(t, t.TempDir(), Options{Compression: true})
			d := put(t, c, ns, tc.data)
			size, blocks := fileSize(t, c, d)
			if size != int64(len(tc.data)) {
				t.Errorf("file holds %d bytes for %d raw ones", size, len(tc.data))
			}
			if blocks > int64(len(tc.data))+4096 {
				t.Errorf("file takes %d bytes of disk for %d", blocks, len(tc.data))
			}
			if tc.name == "random with a 1 MiB zero run" && blocks > int64(len(tc.data))-900<<10 {
				t.Errorf("file takes %d bytes of disk: the zero run is not a hole", blocks)
			}
			if readAllForms(t, c, d, tc.data) {
				t.Error("ReadCompressed says zstd for a raw blob")
			}
		})
	}
}

// TestUncompressedDirectoryStaysReadable: blobs written without compression
// read back through every path with compression on, and compressed ones
// written then read back with it off.
func TestUncompressedDirectoryStaysReadable(t *testing.T) {
	dir := t.TempDir()
	old := newCache(t, dir, Options{})
	img := testutil.VMImage(2, 2*chunk)
	a, b := img[:chunk], img[chunk:]
	da := put(t, old, ns, a)
	if size, _ := fileSize(t, old, da); size != chunk {
		t.Fatalf("compression off stored %d bytes", size)
	}
	on := newCache(t, dir, Options{Compression: true})
	if readAllForms(t, on, da, a) {
		t.Error("a raw blob read as zstd")
	}
	db := put(t, on, ns, b)
	if size, _ := fileSize(t, on, db); size >= chunk {
		t.Fatalf("compression on stored %d bytes", size)
	}
	off := newCache(t, dir, Options{})
	readAllForms(t, off, da, a)
	if !readAllForms(t, off, db, b) {
		t.Error("a compressed blob not read as zstd")
	}
}

// TestCorruptCompressedBlobIsDetected: a flipped byte in a compressed
// blob's frames or trailer fails every read path, in the process that
// wrote it and in a fresh one, and the blob is removed.
func TestCorruptCompressedBlobIsDetected(t *testing.T) {
	data := testutil.VMImage(3, chunk)
	ctx := context.Background()
	reads := map[string]func(c *Cache, d *repb.Digest) error{
		"Read": func(c *Cache, d *repb.Digest) error { _, err := readBlob(c, d); return err },
		"Open": func(c *Cache, d *repb.Digest) error {
			b, err := c.Open(ctx, ns, d)
			if err == nil {
				b.Close()
			}
			return err
		},
		"ReadCompressed": func(c *Cache, d *repb.Digest) error {
			rc, _, err := c.ReadCompressed(ctx, ns, d)
			if err != nil {
				return err
			}
			defer rc.Close()
			_, err = io.ReadAll(rc)
			return err
		},
	}
	for name, read := range reads {
		for _, where := range []string{"frames", "trailer"} {
			for _, fresh := range []bool{false, true} {
				t.Run(name+"/"+where+"/fresh="+map[bool]string{false: "no", true: "yes"}[fresh], func(t *testing.T) {
					c := newCache(t, t.TempDir(), Options{Compression: true})
					d := put(t, c, ns, data)
					size, _ := fileSize(t, c, d)
					if size >= chunk {
						t.Fatal("not stored compressed")
					}
					off := size / 2
					if where == "trailer" {
						off = size - 5
					}
					flipByte(t, c.Path(ns, d), off)
					if fresh {
						c = newCache(t, c.Dir(), Options{Compression: true})
					}
					err := read(c, d)
					if !cache.IsCorrupt(err) || !bytes.Contains([]byte(err.Error()), []byte(d.Hash)) {
						t.Fatalf("%s of the damaged blob: %v, want a corrupt error naming it", name, err)
					}
					if _, err := os.Stat(c.Path(ns, d)); !os.IsNotExist(err) {
						t.Errorf("the corrupt blob's file is still there (%v)", err)
					}
					if m, _ := c.FindMissing(ctx, ns, []*repb.Digest{d}); len(m) != 1 {
						t.Error("the corrupt blob is not missing")
					}
				})
			}
		}
	}
}

// bombFile returns zstd frames of data (encoded with window) plus a valid
// trailer.
func bombFile(t *testing.T, data []byte, window int) []byte {
	t.Helper()
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithWindowSize(window), zstd.WithSingleSegment(false))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	enc.Reset(&buf)
	enc.Write(data)
	enc.Close()
	frames := buf.Bytes()
	sum := blake3.Sum256(frames)
	return append(frames, trailer(sum[:])...)
}

// TestZstdBombInTheDirectory: compressed files placed in the directory
// that decode to far more than their digest's size, or ask for a huge
// window, fail every read as corrupt without the memory to hold them.
func TestZstdBombInTheDirectory(t *testing.T) {
	ctx := context.Background()
	huge := make([]byte, 512<<20)
	for _, tc := range []struct {
		name   string
		data   []byte
		window int
	}{
		{"decodes to 512 MiB", huge, 1 << 20},
		{"asks for a 256 MiB window", huge[:300<<20], 256 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			c := newCache(t, dir, Options{Compression: true})
			want := content(30, chunk) // the digest's claimed content
			d := digest.Compute(ns.Function, want)
			os.MkdirAll(dir+"/cas/blake3/"+d.Hash[:2], 0o755)
			bomb := bombFile(t, tc.data, tc.window)
			if len(bomb) >= chunk {
				t.Fatalf("the bomb is %d bytes", len(bomb))
			}
			place := func() {
				if err := os.WriteFile(c.Path(ns, d), bomb, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			place()
			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			for _, read := range []string{"Read", "Open", "ReadCompressed"} {
				c := newCache(t, dir, Options{Compression: true})
				var err error
				switch read {
				case "Read":
					_, err = readBlob(c, d)
				case "Open":
					var b cache.Blob
					if b, err = c.Open(ctx, ns, d); err == nil {
						b.Close()
					}
				case "ReadCompressed":
					var rc io.ReadCloser
					if rc, _, err = c.ReadCompressed(ctx, ns, d); err == nil {
						_, err = io.ReadAll(rc)
						rc.Close()
					}
				}
				if !cache.IsCorrupt(err) {
					t.Errorf("%s of the bomb: %v, want corrupt", read, err)
				}
				place() // removed as corrupt: put it back
			}
			runtime.ReadMemStats(&after)
			if grew := after.TotalAlloc - before.TotalAlloc; grew > 96<<20 {
				t.Errorf("reading the bomb allocated %d MiB", grew>>20)
			}
		})
	}
}

// TestPutCompressedFile: verified frames that shrink the blob are stored as
// they are; frames that do not are decoded and the content stored raw.
func TestPutCompressedFile(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		data []byte
		zst  bool
	}{
		{"VM-like", testutil.VMImage(4, chunk), true},
		{"random", content(40, chunk), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCache(t, t.TempDir(), Options{Compression: true})
			enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
			frames := enc.EncodeAll(tc.data, nil)
			f, err := os.CreateTemp(c.TempDir(), "up-")
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			f.Write(frames)
			d := digest.Compute(ns.Function, tc.data)
			if err := c.PutCompressedFile(ctx, ns, d, f, int64(len(frames)), nil); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(f.Name()); !os.IsNotExist(err) {
				t.Error("the upload file is still there")
			}
			stored, err := os.ReadFile(c.Path(ns, d))
			if err != nil {
				t.Fatal(err)
			}
			if tc.zst != bytes.HasPrefix(stored, frames) || tc.zst && len(stored) != len(frames)+trailerLen {
				t.Errorf("stored %d bytes for %d of frames, want them as they are: %v", len(stored), len(frames), tc.zst)
			}
			if got := readAllForms(t, c, d, tc.data); got != tc.zst {
				t.Errorf("ReadCompressed zstd %v, want %v", got, tc.zst)
			}
		})
	}
}
