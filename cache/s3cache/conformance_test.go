package s3cache

import (
	"fmt"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/cachetest"
	"github.com/snaploader/snaploader/internal/testutil"
)

// TestConformance runs the tier suite on MinIO. Blobs up to 1 MiB are put
// in one request (compressed when that shrinks them), larger ones go
// through the verified multipart upload in 5 MiB parts.
func TestConformance(t *testing.T) {
	m := testutil.StartMinIO(t)
	cachetest.Run(t, harness(m, func(o *Options) { o.PartSize = MinPartSize; o.SmallBlobLimit = mib }))
}

// harness makes caches over fresh buckets of m.
func harness(m testutil.MinIO, mod func(*Options)) cachetest.Harness {
	return cachetest.Harness{
		New: func(t *testing.T) cachetest.Tier {
			bucket := m.NewBucket(t)
			c := newCache(t, m, bucket, mod)
			return cachetest.Tier{
				Cache:  c,
				Reopen: func(t *testing.T) cache.Cache { return newCache(t, m, bucket, mod) },
				Corrupt: func(t *testing.T, ns cache.Namespace, d *repb.Digest, damage func([]byte) []byte) {
					fn, err := ns.CheckFunction()
					if err != nil {
						t.Fatal(err)
					}
					m.Damage(t, bucket, c.casKey(fn, d), damage)
				},
				// The suite asks on a bucket no write succeeded on: any
				// object is left over.
				Leftovers: func(t *testing.T) []string {
					keys := listKeys(t, m, bucket)
					if n := incompleteUploads(t, m, bucket); n > 0 {
						keys = append(keys, fmt.Sprintf("%d incomplete uploads", n))
					}
					return keys
				},
				// Entries are stored bare, without a checksum: a flipped
				// byte that still parses as an ActionResult cannot be
				// told from the entry written. A damaged first byte
				// makes the entry unparsable (wire type 7).
				CorruptActionResult: func(t *testing.T, ns cache.Namespace, key *repb.Digest) {
					fn, err := ns.CheckFunction()
					if err != nil {
						t.Fatal(err)
					}
					m.Damage(t, bucket, c.acKey(ns, fn, key), func(b []byte) []byte {
						b[0] = 0xff
						return b
					})
				},
			}
		},
	}
}
