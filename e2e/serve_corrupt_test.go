package e2e

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/remote"
)

func randomBytes(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 11))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// TestServeDropsCorruptBlobs: a blob corrupted on serve's disk fails reads
// naming its digest, is reported missing from then on, and a re-upload
// repairs it, without restarting the server.
func TestServeDropsCorruptBlobs(t *testing.T) {
	dir := t.TempDir()
	srv := startServe(t, nil, "--cache-dir", dir)
	ctx := ctxT(t)
	for _, tc := range []struct {
		size       int
		compressed bool
	}{
		{20_000, false},       // batch calls
		{3 << 20, false},      // ByteStream
		{3<<20 + 5, true},     // ByteStream, zstd
		{2<<20 + 4096, false}, // corrupted near the end
	} {
		t.Run(fmt.Sprintf("%d bytes zstd %v", tc.size, tc.compressed), func(t *testing.T) {
			c, err := remote.Dial(ctx, srv.url(), remote.Options{MaxRetries: 1, DisableCompression: !tc.compressed})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ns := cache.Namespace{}
			data := randomBytes(tc.size, uint64(tc.size))
			d := digest.Compute(c.DigestFunction(), data)
			if err := c.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
				t.Fatal(err)
			}
			if got, err := cache.ReadAll(ctx, c, ns, d); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("reading the stored blob: %v", err)
			}
			path := filepath.Join(dir, "cas", digest.FunctionName(c.DigestFunction()), d.Hash[:2], fmt.Sprintf("%s-%d", d.Hash, d.SizeBytes))
			off := int64(tc.size / 2)
			if tc.size%4096 == 0 && tc.size > 1<<20 {
				off = int64(tc.size - 10)
			}
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatalf("the blob's file on the server: %v", err)
			}
			if _, err := f.WriteAt([]byte{data[off] ^ 0x20}, off); err != nil {
				t.Fatal(err)
			}
			f.Close()

			_, err = cache.ReadAll(ctx, c, ns, d)
			if err == nil || !strings.Contains(err.Error(), d.Hash) {
				t.Fatalf("reading the corrupted blob: %v, want an error naming %s", err, digest.String(d))
			}
			missing, err := c.FindMissing(ctx, ns, []*repb.Digest{d})
			if err != nil || len(missing) != 1 {
				t.Fatalf("FindMissing after the corrupt read: %v %v, want it missing", missing, err)
			}
			if err := c.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
				t.Fatalf("re-uploading: %v", err)
			}
			for range 2 {
				if got, err := cache.ReadAll(ctx, c, ns, d); err != nil || !bytes.Equal(got, data) {
					t.Fatalf("reading the repaired blob: %v", err)
				}
			}
			if missing, err := c.FindMissing(ctx, ns, []*repb.Digest{d}); err != nil || len(missing) != 0 {
				t.Fatalf("FindMissing after the repair: %v %v", missing, err)
			}
		})
	}
}
