package s3cache

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"github.com/minio/minio-go/v7"
	"google.golang.org/grpc/codes"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/internal/zstdio"
)

// vmLikeImage is size bytes in 64 KiB blocks: 30% zero, 35% a repeated
// 256-byte pattern, 35% random, as guest memory and disks look.
func vmLikeImage(size int, seed uint64) (img []byte, nonZero int) {
	rng := rand.New(rand.NewPCG(seed, 3))
	img = make([]byte, size)
	for off := 0; off < size; off += 64 << 10 {
		blk := img[off:min(size, off+64<<10)]
		switch k := rng.IntN(100); {
		case k < 30:
			continue
		case k < 65:
			pat := make([]byte, 256)
			for i := range pat {
				pat[i] = byte(rng.Uint32())
			}
			for i := range blk {
				blk[i] = pat[i%256]
			}
		default:
			for i := range blk {
				blk[i] = byte(rng.Uint32())
			}
		}
		nonZero += len(blk)
	}
	return img, nonZero
}

func storedObject(t testing.TB, m testutil.MinIO, bucket, key string) minio.ObjectInfo {
	t.Helper()
	info, err := m.Client.StatObject(ctxT(t), bucket, key, minio.StatObjectOptions{})
	if err != nil {
		t.Fatalf("stat %s: %v", key, err)
	}
	return info
}

func readBack(t testing.TB, c *Cache, fn digest.Function, d *repb.Digest) ([]byte, error) {
	t.Helper()
	return cache.ReadAll(ctxT(t), c, cache.Namespace{Function: fn}, d)
}

func TestCompressionAtRest(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	c := newCache(t, m, bucket, nil)
	ns := cache.Namespace{Function: digest.BLAKE3}

	t.Run("VM-like image shrinks below 0.6x its non-zero bytes", func(t *testing.T) {
		const chunk = 4096000
		img, _ := vmLikeImage(6*chunk, 11)
		var nonZero, stored int64
		for off := 0; off < len(img); off += chunk {
			b := img[off:min(len(img), off+chunk)]
			if bytes.Count(b, []byte{0}) == len(b) {
				continue
			}
			for _, x := range b {
				if x != 0 {
					nonZero++
				}
			}
			d := digest.Compute(digest.BLAKE3, b)
			if err := c.Write(ctxT(t), ns, d, bytes.NewReader(b)); err != nil {
				t.Fatal(err)
			}
			info := storedObject(t, m, bucket, c.casKey(digest.BLAKE3, d))
			stored += info.Size
			got, err := readBack(t, c, digest.BLAKE3, d)
			if err != nil || !bytes.Equal(got, b) {
				t.Fatalf("chunk at %d read back: %v (equal %v)", off, err, bytes.Equal(got, b))
			}
		}
		ratio := float64(stored) / float64(nonZero)
		t.Logf("stored %d bytes for %d non-zero bytes: %.3fx", stored, nonZero, ratio)
		if ratio >= 0.6 {
			t.Errorf("stored/non-zero = %.3f, want < 0.6", ratio)
		}
	})

	t.Run("random data stored raw, not inflated", func(t *testing.T) {
		b := randomBytes(t, 4096000)
		d := digest.Compute(digest.BLAKE3, b)
		if err := c.Write(ctxT(t), ns, d, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		info := storedObject(t, m, bucket, c.casKey(digest.BLAKE3, d))
		if info.Size != int64(len(b)) || info.Metadata.Get("X-Amz-Meta-"+metaEncoding) != "" {
			t.Errorf("random blob stored as %d bytes, encoding %q; want %d raw", info.Size, info.Metadata.Get("X-Amz-Meta-"+metaEncoding), len(b))
		}
		rc, compressed, err := c.ReadCompressed(ctxT(t), ns, d)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || compressed || !bytes.Equal(got, b) {
			t.Errorf("ReadCompressed of a raw blob: compressed=%v err=%v equal=%v", compressed, err, bytes.Equal(got, b))
		}
	})

	t.Run("compression disabled stores raw", func(t *testing.T) {
		raw := newCache(t, m, bucket, func(o *Options) { o.DisableCompression = true })
		b := bytes.Repeat([]byte("abcdefgh"), 1<<17)
		d := digest.Compute(digest.SHA256, b)
		if err := raw.Write(ctxT(t), cache.Namespace{Function: digest.SHA256}, d, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		if info := storedObject(t, m, bucket, c.casKey(digest.SHA256, d)); info.Size != int64(len(b)) {
			t.Errorf("stored %d bytes with compression disabled, want %d", info.Size, len(b))
		}
	})
}

func TestCompressedReadsAndWrites(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	c := newCache(t, m, bucket, nil)
	ns := cache.Namespace{Function: digest.BLAKE3}
	img, _ := vmLikeImage(3<<20, 5)
	d := digest.Compute(digest.BLAKE3, img)
	if err := c.Write(ctxT(t), ns, d, bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	key := c.casKey(digest.BLAKE3, d)
	info := storedObject(t, m, bucket, key)
	if info.Metadata.Get("X-Amz-Meta-"+metaEncoding) != encodingZstd || info.Size >= int64(len(img)) {
		t.Fatalf("blob stored as %d bytes, encoding %q: want zstd and smaller than %d", info.Size, info.Metadata.Get("X-Amz-Meta-"+metaEncoding), len(img))
	}

	t.Run("plain and compressed reads give the same verified content", func(t *testing.T) {
		rc, compressed, err := c.ReadCompressed(ctxT(t), ns, d)
		if err != nil || !compressed {
			t.Fatalf("ReadCompressed: compressed=%v err=%v", compressed, err)
		}
		vr, err := cache.NewZstdVerifyingReader(rc, digest.BLAKE3, d)
		if err != nil {
			t.Fatal(err)
		}
		z, err := io.ReadAll(vr)
		vr.Close()
		if err != nil || int64(len(z)) != info.Size {
			t.Fatalf("verified compressed stream: %d bytes, %v; want the %d stored bytes", len(z), err, info.Size)
		}
		dec, _ := zstd.NewReader(nil)
		defer dec.Close()
		plain, err := dec.DecodeAll(z, nil)
		if err != nil || !bytes.Equal(plain, img) {
			t.Fatalf("decoded compressed stream: %v, equal %v", err, bytes.Equal(plain, img))
		}
		got, err := readBack(t, c, digest.BLAKE3, d)
		if err != nil || !bytes.Equal(got, img) {
			t.Fatalf("plain read: %v, equal %v", err, bytes.Equal(got, img))
		}
	})

	t.Run("a flipped byte in a compressed object is never served", func(t *testing.T) {
		obj, err := m.Client.GetObject(ctxT(t), bucket, key, minio.GetObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		z, err := io.ReadAll(obj)
		obj.Close()
		if err != nil {
			t.Fatal(err)
		}
		for _, at := range []int{len(z) / 2, len(z) - 3, 40} {
			bad := bytes.Clone(z)
			bad[at] ^= 0x20
			putWithMeta(t, m, bucket, key, bad, map[string]string{metaEncoding: encodingZstd})
			got, err := readBack(t, c, digest.BLAKE3, d)
			wantCode(t, err, codes.DataLoss, "plain read of a corrupt compressed object")
			if bytes.Equal(got, img) {
				t.Errorf("flip at %d: the full content was returned along with the error", at)
			}
			if ok, err := c.present(ctxT(t), key); ok || err != nil {
				t.Errorf("flip at %d: the corrupt object was kept (%v)", at, err)
			}
			// The stored frames are not decoded by the tier: a
			// verifying reader over them fails. Only a seek index not
			// describing its frames (flip at 40) is refused by the tier.
			putWithMeta(t, m, bucket, key, bad, map[string]string{metaEncoding: encodingZstd})
			rc, compressed, err := c.ReadCompressed(ctxT(t), ns, d)
			if err == nil {
				if !compressed {
					t.Fatal("ReadCompressed of a compressed object: raw")
				}
				vr, _ := cache.NewZstdVerifyingReader(rc, digest.BLAKE3, d)
				_, err = io.ReadAll(vr)
				vr.Close()
			}
			wantCode(t, err, codes.DataLoss, "verified compressed read of a corrupt object")
		}
		putWithMeta(t, m, bucket, key, z, map[string]string{metaEncoding: encodingZstd})
	})

	t.Run("WriteCompressed stores a reference-encoder stream after verifying it", func(t *testing.T) {
		img2, _ := vmLikeImage(2<<20, 6)
		d2 := digest.Compute(digest.BLAKE3, img2)
		var z bytes.Buffer
		w, _ := zstd.NewWriter(&z, zstd.WithEncoderLevel(zstd.SpeedDefault))
		w.Write(img2)
		w.Close()
		wrong := digest.Compute(digest.BLAKE3, img2[1:])
		wrong.SizeBytes = d2.SizeBytes
		err := c.WriteCompressed(ctxT(t), ns, wrong, bytes.NewReader(z.Bytes()))
		wantCode(t, err, codes.InvalidArgument, "WriteCompressed of content not matching the digest")
		if ok, _ := c.present(ctxT(t), c.casKey(digest.BLAKE3, wrong)); ok {
			t.Error("a mismatching compressed upload was stored")
		}
		if err := c.WriteCompressed(ctxT(t), ns, d2, bytes.NewReader(z.Bytes())); err != nil {
			t.Fatal(err)
		}
		// Stored in the seekable layout, so that range reads fetch only
		// their frames.
		stored := getObject(t, m, bucket, c.casKey(digest.BLAKE3, d2))
		if x, _, err := zstdio.ParseSeekIndex(stored, d2.SizeBytes); err != nil || x.ObjectSize() != int64(len(stored)) || len(stored) >= len(img2) {
			t.Errorf("stored %d bytes (index %v): want the seekable layout, smaller than the %d-byte content", len(stored), err, len(img2))
		}
		// An upload already in that layout is stored as it is.
		img3, _ := vmLikeImage(1<<20, 7)
		d3 := digest.Compute(digest.BLAKE3, img3)
		z3 := zstdio.EncodeSeekable(encoder, img3, 64<<10)
		if err := c.WriteCompressed(ctxT(t), ns, d3, bytes.NewReader(z3)); err != nil {
			t.Fatal(err)
		}
		if got := getObject(t, m, bucket, c.casKey(digest.BLAKE3, d3)); !bytes.Equal(got, z3) {
			t.Errorf("a seekable upload was stored as %d other bytes, want its %d bytes as they are", len(got), len(z3))
		}
		got, err := readBack(t, c, digest.BLAKE3, d2)
		if err != nil || !bytes.Equal(got, img2) {
			t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, img2))
		}
	})
}

func putWithMeta(t testing.TB, m testutil.MinIO, bucket, key string, b []byte, meta map[string]string) {
	t.Helper()
	if _, err := m.Client.PutObject(ctxT(t), bucket, key, bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{UserMetadata: meta}); err != nil {
		t.Fatal(err)
	}
}

func TestZstdBomb(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	c := newCache(t, m, bucket, nil)
	// 1 GiB of zeros, streamed (windowed frames) and one-shot (a frame
	// whose window is its whole claimed content).
	var streamed bytes.Buffer
	w, _ := zstd.NewWriter(&streamed, zstd.WithEncoderLevel(zstd.SpeedFastest))
	zeros := make([]byte, 1<<20)
	for range 1024 {
		w.Write(zeros)
	}
	w.Close()
	oneShot := encoder.EncodeAll(make([]byte, 256<<20), nil)
	claimed := bytes.Repeat([]byte{0}, 4096000)
	d := digest.Compute(digest.BLAKE3, claimed)
	for name, bomb := range map[string][]byte{"streamed": streamed.Bytes(), "one-shot": oneShot} {
		t.Run(name, func(t *testing.T) {
			putWithMeta(t, m, bucket, c.casKey(digest.BLAKE3, d), bomb, map[string]string{metaEncoding: encodingZstd})
			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := readBack(t, c, digest.BLAKE3, d)
			runtime.ReadMemStats(&after)
			wantCode(t, err, codes.DataLoss, "reading a zstd bomb")
			if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 96<<20 {
				t.Errorf("reading a %d-byte bomb allocated %d MiB", len(bomb), alloc>>20)
			}
		})
	}
}

func TestUncompressedBucketStillReads(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	c := newCache(t, m, bucket, nil)
	// Objects as the tier wrote them before compression at rest: raw
	// bytes, no metadata.
	for _, size := range []int{1, 4096000, 20 << 20} {
		b := bytes.Repeat([]byte("old-blob"), size/8+1)[:size]
		d := digest.Compute(digest.SHA256, b)
		m.PutRaw(t, bucket, c.casKey(digest.SHA256, d), b)
		ns := cache.Namespace{Function: digest.SHA256}
		missing, err := c.FindMissing(ctxT(t), ns, []*repb.Digest{d})
		if err != nil || len(missing) != 0 {
			t.Fatalf("FindMissing of an old object: %v %v", missing, err)
		}
		got, err := readBack(t, c, digest.SHA256, d)
		if err != nil || !bytes.Equal(got, b) {
			t.Fatalf("size %d: reading an old raw object: %v, equal %v", size, err, bytes.Equal(got, b))
		}
	}
}

func TestFindMissingRefreshesOldBlobs(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	base := time.Now().Add(-48 * time.Hour).Truncate(time.Second)
	clock := base
	opts := func(o *Options) { o.Now = func() time.Time { return clock }; o.ClockFromMetadata = true }
	c := newCache(t, m, bucket, opts)
	ns := cache.Namespace{Function: digest.BLAKE3}
	b := bytes.Repeat([]byte("chunk"), 100000)
	d := digest.Compute(digest.BLAKE3, b)
	if err := c.Write(ctxT(t), ns, d, bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
	key := c.casKey(digest.BLAKE3, d)
	written := func() time.Time {
		w, ok, err := c.ObjectWritten(ctxT(t), key)
		if err != nil || !ok {
			t.Fatalf("ObjectWritten: %v %v", ok, err)
		}
		return w
	}
	if w := written(); !w.Equal(base) {
		t.Fatalf("written at %v, want the writer's clock %v", w, base)
	}
	tests := []struct {
		name    string
		advance time.Duration
		want    time.Time
	}{
		{"younger than RefreshAfter: untouched", DefaultRefreshAfter / 2, base},
		{"older than RefreshAfter: refreshed", 3 * time.Hour, base.Add(DefaultRefreshAfter/2 + 3*time.Hour)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clock = clock.Add(tc.advance)
			missing, err := c.FindMissing(ctxT(t), ns, []*repb.Digest{d})
			if err != nil || len(missing) != 0 {
				t.Fatalf("FindMissing: %v %v", missing, err)
			}
			if w := written(); !w.Equal(tc.want) {
				t.Errorf("written at %v, want %v", w, tc.want)
			}
		})
	}
	// The refresh keeps the encoding, so the blob still reads.
	if got, err := readBack(t, c, digest.BLAKE3, d); err != nil || !bytes.Equal(got, b) {
		t.Fatalf("read after refresh: %v", err)
	}
	// A blob deleted before its refresh is reported missing.
	if _, err := c.DeleteObjects(ctxT(t), []string{key}); err != nil {
		t.Fatal(err)
	}
	info := minio.ObjectInfo{ETag: "x"}
	if ok, err := c.refresh(ctxT(t), key, info, objectMeta{}); ok || err != nil {
		t.Errorf("refresh of a deleted blob: present=%v err=%v, want absent", ok, err)
	}
}

// BenchmarkFindMissingRefresh measures what FindMissing costs on present
// 4 MB blobs that need no refresh and that are refreshed every time.
func BenchmarkFindMissingRefresh(b *testing.B) {
	m := testutil.StartMinIO(b)
	bucket := m.NewBucket(b)
	img, _ := vmLikeImage(16*4096000, 9)
	var ds []*repb.Digest
	clock := time.Now()
	c := newCache(b, m, bucket, func(o *Options) { o.Now = func() time.Time { return clock } })
	ns := cache.Namespace{Function: digest.BLAKE3}
	for off := 0; off < len(img); off += 4096000 {
		d := digest.Compute(digest.BLAKE3, img[off:off+4096000])
		if err := c.Write(context.Background(), ns, d, bytes.NewReader(img[off:off+4096000])); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, d)
	}
	for _, refresh := range []bool{false, true} {
		name := map[bool]string{false: "fresh", true: "refreshed"}[refresh]
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				if refresh {
					clock = clock.Add(2 * DefaultRefreshAfter)
				}
				if _, err := c.FindMissing(context.Background(), ns, ds); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N*len(ds)), "µs/blob")
		})
	}
}
