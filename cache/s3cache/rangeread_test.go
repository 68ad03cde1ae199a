package s3cache

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/internal/zstdio"
)

func readRange(t testing.TB, c *Cache, d *repb.Digest, off, n int64) ([]byte, error) {
	t.Helper()
	rc, err := c.ReadRange(ctxT(t), cache.Namespace{Function: digest.BLAKE3}, d, off, n)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

// TestRangeReadsFetchTheirFrames: a compressed chunk is stored in the
// seekable layout; a first range read of it fetches a prefix in one round
// of parallel GETs and learns the index, later ones fetch only the frames
// they need.
func TestRangeReadsFetchTheirFrames(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	c := newCache(t, m, bucket, nil)
	ns := cache.Namespace{Function: digest.BLAKE3}
	img, _ := vmLikeImage(4096000, 21)
	d := digest.Compute(digest.BLAKE3, img)
	if err := c.Write(ctxT(t), ns, d, bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	z := getObject(t, m, bucket, c.casKey(digest.BLAKE3, d))
	x, _, err := zstdio.ParseSeekIndex(z, d.SizeBytes)
	if err != nil || x.FrameSize != zstdio.DefaultFrameSize || x.ObjectSize() != int64(len(z)) {
		t.Fatalf("stored object: index %+v, %v; want the seekable layout with %d-byte frames", x, err, zstdio.DefaultFrameSize)
	}
	for i, tc := range []struct {
		name     string
		off, n   int64
		cold     bool
		maxBytes int64 // bytes the read may fetch
	}{
		{"first read: a prefix in parallel", 2 << 20, 16 << 10, true, int64(len(z))},
		{"known index: one frame", 3 << 20, 16 << 10, false, 2 * zstdio.DefaultFrameSize},
		{"known index: across a frame boundary", zstdio.DefaultFrameSize - 100, 200, false, 3 * zstdio.DefaultFrameSize},
		{"known index: the end", d.SizeBytes - 10, 100, false, 2 * zstdio.DefaultFrameSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := c.Stats()
			got, err := readRange(t, c, d, tc.off, tc.n)
			end := min(tc.off+tc.n, d.SizeBytes)
			if err != nil || !bytes.Equal(got, img[tc.off:end]) {
				t.Fatalf("ReadRange(%d, %d): %d bytes, %v; want the %d bytes there", tc.off, tc.n, len(got), err, end-tc.off)
			}
			after := c.Stats()
			if cold := after.ColdRanges - before.ColdRanges; (cold == 1) != tc.cold || after.ColdRanges+after.WarmRanges != int64(i+1) {
				t.Errorf("cold reads %d, warm %d after read %d; want this one cold=%v", after.ColdRanges, after.WarmRanges, i+1, tc.cold)
			}
			if fetched := after.Bytes - before.Bytes; fetched > tc.maxBytes {
				t.Errorf("the read fetched %d bytes, want at most %d", fetched, tc.maxBytes)
			}
			if !tc.cold && after.Gets-before.Gets != 1 {
				t.Errorf("the read sent %d GETs, want 1", after.Gets-before.Gets)
			}
		})
	}
}

func getObject(t testing.TB, m testutil.MinIO, bucket, key string) []byte {
	t.Helper()
	var z []byte
	m.Damage(t, bucket, key, func(b []byte) []byte { z = bytes.Clone(b); return b })
	return z
}

// TestRangeReadsOfEveryLayout: objects written raw, as one zstd stream
// (before the seekable layout), in the seekable layout with another frame
// size, and replaced by another layout after a first read, all serve
// ranges, read for the first time and again.
func TestRangeReadsOfEveryLayout(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	c := newCache(t, m, bucket, nil)
	img, _ := vmLikeImage(3<<20+777, 22)
	d := digest.Compute(digest.BLAKE3, img)
	key := c.casKey(digest.BLAKE3, d)
	ranges := [][2]int64{{1 << 20, 16 << 10}, {0, 1}, {d.SizeBytes - 5, 5}, {100, 3 << 20}}
	check := func(t *testing.T, what string) {
		t.Helper()
		for _, r := range ranges {
			got, err := readRange(t, c, d, r[0], r[1])
			end := min(r[0]+r[1], d.SizeBytes)
			if err != nil || !bytes.Equal(got, img[r[0]:end]) {
				t.Fatalf("%s: ReadRange(%d, %d): %d bytes, %v; want the %d bytes there", what, r[0], r[1], len(got), err, end-r[0])
			}
		}
	}
	for _, tc := range []struct {
		name   string
		object []byte
		meta   map[string]string
	}{
		{"raw", img, nil},
		{"one zstd stream", encoder.EncodeAll(img, nil), map[string]string{metaEncoding: encodingZstd}},
		{"seekable, 64 KiB frames", zstdio.EncodeSeekable(encoder, img, 64<<10), map[string]string{metaEncoding: encodingZstd}},
		{"seekable, 4 MiB frames", zstdio.EncodeSeekable(encoder, img, 4<<20), map[string]string{metaEncoding: encodingZstd}},
		{"seekable, 1 KiB frames (an index longer than the first part)", zstdio.EncodeSeekable(encoder, img, 1<<10), map[string]string{metaEncoding: encodingZstd}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			putWithMeta(t, m, bucket, key, tc.object, tc.meta)
			check(t, "object just replaced")
			check(t, "layout known")
		})
	}
	t.Run("empty and outside ranges", func(t *testing.T) {
		if got, err := readRange(t, c, d, d.SizeBytes, 10); err != nil || len(got) != 0 {
			t.Errorf("ReadRange at the end: %d bytes, %v; want none", len(got), err)
		}
		for _, r := range [][2]int64{{-1, 1}, {d.SizeBytes + 1, 1}, {0, -1}} {
			_, err := readRange(t, c, d, r[0], r[1])
			wantCode(t, err, codes.InvalidArgument, "a range outside the blob")
		}
	})
	t.Run("missing blob", func(t *testing.T) {
		other := digest.Compute(digest.BLAKE3, img[1:])
		_, err := readRange(t, c, other, 0, 10)
		wantCode(t, err, codes.NotFound, "a range of a missing blob")
		if !strings.Contains(err.Error(), other.Hash) {
			t.Errorf("error %q does not name the blob", err)
		}
	})
}

// TestRangeReadOfDamagedFrames: a damaged frame is a DataLoss error naming
// the blob and range, and the object is left for a whole read to judge.
func TestRangeReadOfDamagedFrames(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	c := newCache(t, m, bucket, nil)
	ns := cache.Namespace{Function: digest.BLAKE3}
	img := bytes.Repeat([]byte("range reads of damaged frames "), 100000)
	d := digest.Compute(digest.BLAKE3, img)
	if err := c.Write(ctxT(t), ns, d, bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	key := c.casKey(digest.BLAKE3, d)
	x, _, err := zstdio.ParseSeekIndex(getObject(t, m, bucket, key), d.SizeBytes)
	if err != nil {
		t.Fatal(err)
	}
	m.Damage(t, bucket, key, func(b []byte) []byte { b[(x.Offsets[2]+x.Offsets[3])/2] ^= 0x55; return b })
	_, err = readRange(t, c, d, 2*x.FrameSize+10, 100)
	wantCode(t, err, codes.DataLoss, "a range read of a damaged frame")
	if !strings.Contains(err.Error(), d.Hash) {
		t.Errorf("error %q does not name the blob", err)
	}
	if ok, err := c.present(ctxT(t), key); !ok || err != nil {
		t.Errorf("the range read deleted the object (%v)", err)
	}
	// Frames the damage did not touch still serve.
	if got, err := readRange(t, c, d, 0, 100); err != nil || !bytes.Equal(got, img[:100]) {
		t.Errorf("range before the damage: %v", err)
	}
}

// stallingProxy forwards requests to MinIO, holding the first GET of each
// range until the client gives up on it.
func stallingProxy(t *testing.T, m testutil.MinIO) (addr string, stalled *atomic.Int32) {
	u, err := url.Parse("http://" + m.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	seen := map[string]bool{}
	var mu = make(chan struct{}, 1)
	stalled = new(atomic.Int32)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if rg := r.Header.Get("Range"); r.Method == http.MethodGet && rg != "" {
			mu <- struct{}{}
			first := !seen[r.URL.Path+rg]
			seen[r.URL.Path+rg] = true
			<-mu
			if first {
				stalled.Add(1)
				<-r.Context().Done()
				return
			}
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), stalled
}

// TestHedgedReads: every first request of a range stalls; reads complete
// through their hedges, whole and ranged.
func TestHedgedReads(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	w := newCache(t, m, bucket, nil)
	ns := cache.Namespace{Function: digest.BLAKE3}
	img, _ := vmLikeImage(3<<20, 23)
	d := digest.Compute(digest.BLAKE3, img)
	if err := w.Write(ctxT(t), ns, d, bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	addr, stalled := stallingProxy(t, m)
	c := newCache(t, m, bucket, func(o *Options) { o.Endpoint = addr; o.HedgeAfter = 20 * time.Millisecond })
	got, err := readBack(t, c, digest.BLAKE3, d)
	if err != nil || !bytes.Equal(got, img) {
		t.Fatalf("whole read through stalling requests: %v (equal %v)", err, bytes.Equal(got, img))
	}
	if got, err := readRange(t, c, d, 2<<20, 16<<10); err != nil || !bytes.Equal(got, img[2<<20:2<<20+16<<10]) {
		t.Fatalf("range read through stalling requests: %v", err)
	}
	st := c.Stats()
	// Parts past the object's end are answered 416 by their hedge.
	if st.Hedges == 0 || st.HedgeWins == 0 || int64(stalled.Load()) != st.Hedges {
		t.Errorf("%d requests stalled, %d hedged, %d hedges answered first; want every stalled one hedged", stalled.Load(), st.Hedges, st.HedgeWins)
	}
	t.Logf("%d GETs answered, %d hedged, %d hedges answered with data", st.Gets, st.Hedges, st.HedgeWins)
}
