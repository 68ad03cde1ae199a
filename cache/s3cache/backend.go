package s3cache

import (
	"bytes"
	"context"
	"io"
	"os"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// Traits: reads are verified (raw and decoded content alike); a
// compressed read passes the stored frames on unverified; range reads
// fetch only the bytes or frames they need and are not verified (see
// ReadRange); nothing is kept on this host's disk.
func (c *Cache) Traits() cache.Traits {
	return cache.Traits{
		Description:      c.String(),
		VerifiesReads:    true,
		ServesRanges:     true,
		StoresCompressed: !c.opts.DisableCompression,
	}
}

// Discard deletes the object of blob d after a read found it failed
// verification. An object already gone is not an error.
func (c *Cache) Discard(ctx context.Context, ns cache.Namespace, d *repb.Digest) error {
	fn, err := checkDigest(ns, d, "discarding blob")
	if err != nil {
		return err
	}
	_, err = c.DeleteObjects(ctx, []string{c.casKey(fn, d)})
	return err
}

// Reserve is nil: the bucket keeps nothing on this host's disk.
func (c *Cache) Reserve(int64) (cache.Reservation, error) { return nil, nil }

// PutFile uploads the content of f (verified by the caller to be d); res
// is released, since the bucket takes no space on this host.
func (c *Cache) PutFile(ctx context.Context, ns cache.Namespace, d *repb.Digest, f *os.File, res cache.Reservation) error {
	release(res)
	if err := c.Write(ctx, ns, d, io.NewSectionReader(f, 0, d.GetSizeBytes())); err != nil {
		return err
	}
	os.Remove(f.Name())
	return nil
}

// PutCompressedFile uploads the n bytes of zstd frames in f (verified by
// the caller to decode to d) as WriteCompressed does.
func (c *Cache) PutCompressedFile(ctx context.Context, ns cache.Namespace, d *repb.Digest, f *os.File, n int64, res cache.Reservation) error {
	release(res)
	if err := c.WriteCompressed(ctx, ns, d, io.NewSectionReader(f, 0, n)); err != nil {
		return err
	}
	os.Remove(f.Name())
	return nil
}

// PutHashed uploads data, which the caller has hashed to d.
func (c *Cache) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	if int64(len(data)) != d.GetSizeBytes() {
		return errkind.New(errkind.InvalidArgument, "s3 cache: blob %s: %d bytes", digest.String(d), len(data))
	}
	return c.Write(ctx, ns, d, bytes.NewReader(data))
}

// Usage is 0: the bucket keeps nothing on this host's disk.
func (c *Cache) Usage() int64 { return 0 }

// Evictions is 0: a bucket does not evict (gc deletes what is not live).
func (c *Cache) Evictions() int64 { return 0 }

// Down is nil: a bucket's outages are the errors of its calls (a breaker
// in front of it tells).
func (c *Cache) Down() error { return nil }

// Close is nil: the tier holds no connection of its own beyond the HTTP
// client's idle ones.
func (c *Cache) Close() error { return nil }

func release(res cache.Reservation) {
	if res != nil {
		res.Release()
	}
}

var _ cache.Backend = (*Cache)(nil)
