package localcache

import (
	"bytes"
	"context"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/digest"
)

const chunkSize = 4096000

// BenchmarkWrite stores distinct 4,096,000-byte random chunks (hashing,
// temp file, rename) under a bound that keeps ~256 MiB on disk.
func BenchmarkWrite(b *testing.B) {
	c := newCache(b, b.TempDir(), Options{MaxBytes: 256 << 20})
	data := content(1, chunkSize)
	ctx := context.Background()
	b.SetBytes(chunkSize)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		data[0], data[1], data[2], data[3] = byte(i), byte(i>>8), byte(i>>16), byte(i>>24)
		d := digest.Compute(digest.BLAKE3, data)
		if err := c.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkOpenReadAt opens a chunk and reads it whole with ReadAt, cycling
// over 32 chunks (page-cache hot). "trusted" blobs were written by this
// instance; "verify" opens each through a fresh instance, which hashes it.
func BenchmarkOpenReadAt(b *testing.B) {
	for _, mode := range []string{"trusted", "verify"} {
		b.Run(mode, func(b *testing.B) {
			dir := b.TempDir()
			c := newCache(b, dir, Options{})
			var ds []*repb.Digest
			for i := 0; i < 32; i++ {
				ds = append(ds, put(b, c, ns, content(uint64(i), chunkSize)))
			}
			buf := make([]byte, chunkSize)
			ctx := context.Background()
			b.SetBytes(chunkSize)
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				if mode == "verify" && i%len(ds) == 0 {
					b.StopTimer()
					c = newCache(b, dir, Options{})
					b.StartTimer()
				}
				blob, err := c.Open(ctx, ns, ds[i%len(ds)])
				if err != nil {
					b.Fatal(err)
				}
				if _, err := blob.ReadAt(buf, 0); err != nil {
					b.Fatal(err)
				}
				blob.Close()
			}
		})
	}
}
