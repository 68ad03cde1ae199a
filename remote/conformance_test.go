package remote_test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/minio/minio-go/v7"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/cachetest"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testserve"
	"github.com/snaploader/snaploader/internal/testutil"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
)

// TestConformance runs the tier suite on the client over a server on a
// loopback port, over a local disk cache (with and without zstd transfers)
// and over S3 on MinIO.
func TestConformance(t *testing.T) {
	for _, compression := range []bool{true, false} {
		t.Run(fmt.Sprintf("local/compression=%v", compression), func(t *testing.T) {
			cachetest.Run(t, localHarness(remote.Options{DisableCompression: !compression}))
		})
	}
	t.Run("s3", func(t *testing.T) {
		cachetest.Run(t, s3Harness(testutil.StartMinIO(t), remote.Options{}))
	})
}

// uploadTTL is how long the servers keep an interrupted upload for its
// client to resume it.
const uploadTTL = 100 * time.Millisecond

// serve starts a server over backend, its uploads in flight in tempDir,
// and returns a client of it.
func serve(t *testing.T, backend cache.Backend, tempDir string, opts remote.Options) *remote.Client {
	t.Helper()
	addr := testserve.Serve(t, backend, server.Options{TempDir: tempDir, UploadTTL: uploadTTL})
	opts.RetryBackoff = time.Millisecond
	c, err := remote.Dial(context.Background(), "grpc://"+addr, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func openLocal(t *testing.T, dir, boot string) *localcache.Cache {
	t.Helper()
	lc, err := localcache.New(dir, localcache.Options{MaxBytes: 1 << 30, BootID: boot})
	if err != nil {
		t.Fatal(err)
	}
	return lc
}

// localHarness serves local caches in fresh directories.
func localHarness(opts remote.Options) cachetest.Harness {
	return cachetest.Harness{
		GroupFromCredentials: true,
		New: func(t *testing.T) cachetest.Tier {
			dir := t.TempDir()
			lc := openLocal(t, dir, "")
			boots := 0
			return cachetest.Tier{
				Cache: serve(t, lc, lc.TempDir(), opts),
				// A server restarted after a crash over the same directory.
				Reopen: func(t *testing.T) cache.Cache {
					boots++
					lc := openLocal(t, dir, fmt.Sprintf("reopened-%d", boots))
					return serve(t, lc, lc.TempDir(), opts)
				},
				Corrupt: func(t *testing.T, ns cache.Namespace, d *repb.Digest, damage func([]byte) []byte) {
					cachetest.DamageFile(t, lc.Path(ns, d), damage)
				},
				CorruptActionResult: func(t *testing.T, ns cache.Namespace, key *repb.Digest) {
					damageEntryFiles(t, lc.Dir(), key)
				},
				// Temporary files of the cache and of the server's uploads;
				// the suite asks on a cache no write succeeded on, so any
				// blob is left over too.
				Leftovers: func(t *testing.T) []string {
					return settled(func() []string {
						return cachetest.FilesUnder(t, filepath.Join(lc.Dir(), "tmp"), filepath.Join(lc.Dir(), "cas"), lc.TempDir())
					})
				},
				Exhaust: cachetest.ExhaustDescriptors,
			}
		},
		Full: func(t *testing.T, size int64) (cache.Cache, func()) {
			fs := cachetest.SmallFilesystem(t, 4*size+1<<20)
			lc := openLocal(t, filepath.Join(fs, "cache"), "")
			return serve(t, lc, lc.TempDir(), opts), cachetest.Fill(t, fs, size/2)
		},
	}
}

// settled returns what list returns once it is empty, or after the
// server's uploads kept for resumption have had time to expire.
func settled(list func() []string) []string {
	deadline := time.Now().Add(uploadTTL + 5*time.Second)
	for {
		l := list()
		if len(l) == 0 || time.Now().After(deadline) {
			return l
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// damageEntryFiles flips a byte of every action-cache entry file under key
// in the local cache in dir (ac/<group>/<instance>/<fn>/<hh>/<hash>-<size>).
func damageEntryFiles(t *testing.T, dir string, key *repb.Digest) {
	t.Helper()
	n := 0
	for _, p := range cachetest.FilesUnder(t, filepath.Join(dir, "ac")) {
		if filepath.Base(p) == fmt.Sprintf("%s-%d", key.Hash, key.SizeBytes) {
			cachetest.DamageFile(t, p, func(b []byte) []byte {
				b[len(b)/2] ^= 0x40
				return b
			})
			n++
		}
	}
	if n == 0 {
		t.Fatalf("no entry %s under %s", digest.String(key), dir)
	}
}

// s3Harness serves S3 tiers over fresh buckets of m. Blobs up to 1 MiB
// are put in one request, larger ones uploaded in 5 MiB parts.
func s3Harness(m testutil.MinIO, opts remote.Options) cachetest.Harness {
	open := func(t *testing.T, bucket string) *s3cache.Cache {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := s3cache.New(ctx, s3cache.Options{
			Endpoint: m.Endpoint, Bucket: bucket, Region: "us-east-1",
			AccessKey: m.AccessKey, SecretKey: m.SecretKey,
			PartSize: s3cache.MinPartSize, SmallBlobLimit: 1 << 20,
		})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return cachetest.Harness{
		GroupFromCredentials: true,
		New: func(t *testing.T) cachetest.Tier {
			bucket := m.NewBucket(t)
			tmp := t.TempDir()
			// keys lists the bucket's objects under prefix.
			keys := func(t *testing.T, prefix string) []string {
				var keys []string
				for o := range m.Client.ListObjects(context.Background(), bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
					if o.Err != nil {
						t.Fatalf("listing %s: %v", bucket, o.Err)
					}
					keys = append(keys, o.Key)
				}
				return keys
			}
			return cachetest.Tier{
				Cache:  serve(t, open(t, bucket), tmp, opts),
				Reopen: func(t *testing.T) cache.Cache { return serve(t, open(t, bucket), t.TempDir(), opts) },
				// The tier's layout: cas/<fn>/<hash>-<size>.
				Corrupt: func(t *testing.T, ns cache.Namespace, d *repb.Digest, damage func([]byte) []byte) {
					m.Damage(t, bucket, fmt.Sprintf("cas/%s/%s-%d", digest.FunctionName(ns.Function), d.Hash, d.SizeBytes), damage)
				},
				// ac/<group>/<instance-hash>/<fn>/<hash>, stored bare: a
				// damaged first byte makes it unparsable.
				CorruptActionResult: func(t *testing.T, ns cache.Namespace, key *repb.Digest) {
					n := 0
					for _, k := range keys(t, "ac/") {
						if strings.HasSuffix(k, "/"+key.Hash) {
							m.Damage(t, bucket, k, func(b []byte) []byte {
								b[0] = 0xff
								return b
							})
							n++
						}
					}
					if n == 0 {
						t.Fatalf("no entry %s in bucket %s", digest.String(key), bucket)
					}
				},
				Leftovers: func(t *testing.T) []string {
					return settled(func() []string {
						left := append(keys(t, ""), cachetest.FilesUnder(t, tmp)...)
						for u := range m.Client.ListIncompleteUploads(context.Background(), bucket, "", true) {
							left = append(left, "incomplete upload of "+u.Key)
						}
						return left
					})
				},
			}
		},
	}
}
