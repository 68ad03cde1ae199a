package s3cache

import (
	"context"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/minio/minio-go/v7"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// maxCopySize is the largest object a single CopyObject request copies.
const maxCopySize = 5 << 30

// present reports whether the blob at key exists. A blob older than
// Options.RefreshAfter has its age refreshed first (a metadata-only copy
// onto itself, conditional on its ETag), so that a garbage collection
// running now or later treats it as just written; a blob that vanishes
// before the refresh (a collection deleted it) is reported absent, so the
// caller stores it again.
func (c *Cache) present(ctx context.Context, key string) (bool, error) {
	info, err := c.client.StatObject(ctx, c.opts.Bucket, key, minio.StatObjectOptions{})
	if code(err) == codes.NotFound {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	m, err := parseMeta(info.Metadata)
	if err != nil || age(info, m, c.opts.Now(), c.opts.ClockFromMetadata) <= c.opts.RefreshAfter || info.Size > maxCopySize {
		// An object of unknown encoding is present; reads report it.
		return true, nil
	}
	return c.refresh(ctx, key, info, m)
}

// refresh rewrites the metadata of the object at key with the current
// time; it reports whether the object still exists.
func (c *Cache) refresh(ctx context.Context, key string, info minio.ObjectInfo, m objectMeta) (bool, error) {
	_, err := c.client.CopyObject(ctx,
		minio.CopyDestOptions{Bucket: c.opts.Bucket, Object: key, ReplaceMetadata: true, UserMetadata: userMetadata(m.compressed, c.opts.Now())},
		minio.CopySrcOptions{Bucket: c.opts.Bucket, Object: key, MatchETag: info.ETag})
	switch {
	case err == nil:
		return true, nil
	case code(err) == codes.NotFound:
		return false, nil
	case minio.ToErrorResponse(err).Code == "PreconditionFailed":
		// Rewritten meanwhile (by a writer or another refresh): it is as
		// young as that write, if it still exists.
		_, err := c.client.StatObject(ctx, c.opts.Bucket, key, minio.StatObjectOptions{})
		if code(err) == codes.NotFound {
			return false, nil
		}
		return err == nil, err
	}
	return false, err
}

// FindMissing returns the digests in ds the bucket does not hold, each
// once, in the order of their first occurrence. It checks up to
// Options.Parallelism objects at a time. A blob reported present whose age
// is more than Options.RefreshAfter is refreshed first (see present), so
// that a save can name it in a manifest written up to a garbage
// collector's grace period later.
func (c *Cache) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	type entry struct {
		d       *repb.Digest
		missing bool
	}
	var uniq []*entry
	seen := make(map[string]bool, len(ds))
	var fn digest.Function
	for _, d := range ds {
		f, err := checkDigest(ns, d, "finding missing blobs")
		if err != nil {
			return nil, err
		}
		fn = f
		k := digest.String(d)
		if seen[k] {
			continue
		}
		seen[k] = true
		uniq = append(uniq, &entry{d: d})
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(c.opts.Parallelism)
	for _, e := range uniq {
		if isEmpty(fn, e.d) {
			continue // the empty blob is always present
		}
		g.Go(func() error {
			key := c.casKey(fn, e.d)
			ok, err := c.present(gctx, key)
			if err != nil {
				return c.errorf(err, "looking up blob %s at %s", digest.String(e.d), key)
			}
			e.missing = !ok
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	var missing []*repb.Digest
	for _, e := range uniq {
		if e.missing {
			missing = append(missing, e.d)
		}
	}
	if len(missing) > 0 {
		// A missing bucket holds nothing: that is the answer, not the blobs.
		if err := c.check.failed(); err != nil {
			return nil, errkind.New(errkind.Of(err), "s3 cache: finding missing blobs among %d (first %s): %w", len(ds), digest.String(missing[0]), err)
		}
	}
	return missing, nil
}
