package server_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"github.com/prometheus/client_golang/prometheus"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/server"
)

// unvouched is the local cache as a backend that does not vouch for the
// frames it stores: its compressed reads and ranges are not verified, and
// it takes uploads decoded.
type unvouched struct{ *localcache.Cache }

func (u unvouched) Traits() cache.Traits {
	t := u.Cache.Traits()
	t.VerifiesCompressedReads, t.VerifiesRanges, t.StoresCompressed = false, false, false
	return t
}

type compressedEnv struct {
	*env
	reg *prometheus.Registry
}

// startCompressed serves a local cache that compresses at rest, as
// `snaploader serve --cache-dir` does by default; vouched false serves it
// through unvouched.
func startCompressed(t *testing.T, vouched bool) compressedEnv {
	t.Helper()
	lc, err := localcache.New(t.TempDir(), localcache.Options{MaxBytes: 1 << 30, Compression: true})
	if err != nil {
		t.Fatal(err)
	}
	var backend cache.Backend = lc
	if !vouched {
		backend = unvouched{lc}
	}
	reg := prometheus.NewRegistry()
	return compressedEnv{serveOn(t, lc, backend, server.Options{TempDir: lc.TempDir(), Registry: reg}), reg}
}

// storedReads is how many compressed-blobs reads the server answered with
// stored frames.
func (e compressedEnv) storedReads(t *testing.T) string {
	t.Helper()
	rec := httptest.NewRecorder()
	e.srv.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, l := range strings.Split(rec.Body.String(), "\n") {
		if v, ok := strings.CutPrefix(l, "snaploader_server_stored_compressed_reads_total "); ok {
			return v
		}
	}
	t.Fatal("no stored compressed reads metric")
	return ""
}

func blobName(d *repb.Digest, compressed bool) string {
	if compressed {
		return fmt.Sprintf("compressed-blobs/zstd/%s/%d", d.Hash, d.SizeBytes)
	}
	return fmt.Sprintf("blobs/%s/%d", d.Hash, d.SizeBytes)
}

func zstdEncode(b []byte) []byte {
	enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
	return enc.EncodeAll(b, nil)
}

func zstdDecode(t *testing.T, z []byte) []byte {
	t.Helper()
	dec, _ := zstd.NewReader(nil, zstd.WithDecoderMaxWindow(localcache.MaxWindow))
	defer dec.Close()
	b, err := dec.DecodeAll(z, nil)
	if err != nil {
		t.Fatalf("decoding what the server sent: %v", err)
	}
	return b
}

// TestCompressedAtRestServing: blobs uploaded plain or zstd-compressed to a
// compressing server are stored compressed when they shrink (a zstd
// upload's frames as they came) and raw when they do not; a plain read and
// a compressed-blobs read give the same content, the latter the stored
// frames as they are.
func TestCompressedAtRestServing(t *testing.T) {
	vm := testutil.VMImage(7, 3<<20+4096)
	random := make([]byte, 3<<20)
	rng := rand.New(rand.NewPCG(7, 7))
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	for _, tc := range []struct {
		name       string
		data       []byte
		compressed bool // uploaded over compressed-blobs
		storedZstd bool
	}{
		{"VM-like, plain upload", vm, false, true},
		{"VM-like, zstd upload", vm, true, true},
		{"random, plain upload", random, false, false},
		{"random, zstd upload", random, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startCompressed(t, true)
			ctx := context.Background()
			d := sha(tc.data)
			payload := tc.data
			name := uploadName(d, "u")
			if tc.compressed {
				payload = zstdEncode(tc.data)
				name = fmt.Sprintf("uploads/u/compressed-blobs/zstd/%s/%d", d.Hash, d.SizeBytes)
			}
			if _, err := e.write(ctx, inMessages(name, payload)...); err != nil {
				t.Fatalf("uploading: %v", err)
			}
			stored, err := os.ReadFile(e.lc.Path(cache.Namespace{Function: digest.SHA256}, d))
			if err != nil {
				t.Fatal(err)
			}
			if zst := len(stored) < len(tc.data); zst != tc.storedZstd {
				t.Fatalf("stored %d bytes for %d: compressed %v, want %v", len(stored), len(tc.data), zst, tc.storedZstd)
			}
			if tc.compressed && tc.storedZstd && !bytes.HasPrefix(stored, payload) {
				t.Error("the uploaded frames are not stored as they came")
			}
			if got := readStream(t, e.env, blobName(d, false)); !bytes.Equal(got, tc.data) {
				t.Fatalf("plain read: %d bytes differ from the %d uploaded", len(got), len(tc.data))
			}
			before := e.storedReads(t)
			z := readStream(t, e.env, blobName(d, true))
			if got := zstdDecode(t, z); !bytes.Equal(got, tc.data) {
				t.Fatalf("compressed read decodes to %d bytes that differ from the %d uploaded", len(got), len(tc.data))
			}
			if tc.storedZstd {
				if !bytes.HasPrefix(stored, z) || len(stored)-len(z) != 48 {
					t.Errorf("the compressed read sent %d bytes, not the %d stored frames", len(z), len(stored)-48)
				}
				if after := e.storedReads(t); after == before {
					t.Error("the stored-frames counter did not move")
				}
			}
		})
	}
}

// TestCorruptStoredFramesAreNeverServed: a byte flipped in a blob stored
// compressed fails compressed-blobs and plain reads with an Internal error
// naming the blob before its last message, drops it, and a re-upload
// repairs it, whether the backend vouches for its frames (checked against
// their recorded hash) or not (decoded alongside).
func TestCorruptStoredFramesAreNeverServed(t *testing.T) {
	b := testutil.VMImage(8, 4096000)
	d := sha(b)
	for _, tc := range []struct {
		vouched    bool
		compressed bool
	}{
		{true, true}, {false, true}, {true, false},
	} {
		t.Run(fmt.Sprintf("vouched=%v compressed=%v", tc.vouched, tc.compressed), func(t *testing.T) {
			e := startCompressed(t, tc.vouched)
			ctx := context.Background()
			if _, err := e.write(ctx, inMessages(uploadName(d, "a"), b)...); err != nil {
				t.Fatal(err)
			}
			path := e.lc.Path(cache.Namespace{Function: digest.SHA256}, d)
			st, err := os.Stat(path)
			if err != nil || st.Size() >= int64(len(b)) {
				t.Fatalf("not stored compressed: %v %v", st, err)
			}
			flip(t, path, st.Size()*3/4)
			stream, err := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: blobName(d, tc.compressed)})
			if err != nil {
				t.Fatal(err)
			}
			var got []byte
			for {
				m, err := stream.Recv()
				if err != nil {
					if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), d.Hash) {
						t.Fatalf("reading the corrupt blob: %v, want Internal naming it", err)
					}
					break
				}
				got = append(got, m.Data...)
			}
			if tc.compressed && int64(len(got)) >= st.Size()-48 || !tc.compressed && len(got) >= len(b) {
				t.Errorf("the whole corrupt blob was served (%d bytes)", len(got))
			}
			if e.present(t, digest.SHA256, d) {
				t.Fatal("the corrupt blob is still reported present")
			}
			if _, err := e.write(ctx, inMessages(uploadName(d, "again"), b)...); err != nil {
				t.Fatal(err)
			}
			if got := zstdDecode(t, readStream(t, e.env, blobName(d, true))); !bytes.Equal(got, b) {
				t.Fatal("the repaired blob reads back differently")
			}
		})
	}
}

func flip(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c := []byte{0}
	f.ReadAt(c, off)
	c[0] ^= 0x10
	if _, err := f.WriteAt(c, off); err != nil {
		t.Fatal(err)
	}
}
