package localcache

import (
	"context"
	"fmt"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
)

// OpenTier is Open; the blob comes from this tier (cache.TierLocal).
func (c *Cache) OpenTier(ctx context.Context, ns cache.Namespace, d *repb.Digest) (cache.Blob, string, error) {
	b, err := c.Open(ctx, ns, d)
	return b, cache.TierLocal, err
}

// ReadVerifiedRange wraps cache.ErrNoRange: a blob of this tier is at
// hand, so the caller opens it whole, once, instead of reading ranges.
func (c *Cache) ReadVerifiedRange(context.Context, cache.Namespace, *repb.Digest, *repb.Digest, []byte, int64) error {
	return fmt.Errorf("local cache %s: %w", c.dir, cache.ErrNoRange)
}

// Fetch makes sure the blob is stored and verified: there is nowhere else
// to fetch it from, so an absent blob is NotFound.
func (c *Cache) Fetch(ctx context.Context, ns cache.Namespace, d *repb.Digest) error {
	b, err := c.Open(ctx, ns, d)
	if err != nil {
		return err
	}
	return b.Close()
}

// WriteCompressed stores the content zstd frames from r decode to, checked
// against d as Write checks it (compressed again at rest when
// Options.Compression says so).
func (c *Cache) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	return cache.WriteDecoded(ctx, c, ns, d, r)
}

// Down is nil: the disk is this host's, never out of service as a whole.
func (c *Cache) Down() error { return nil }
