package localcache

import (
	"context"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/fileio"
)

// Verify hashes the stored content of blob d whatever this process or an
// earlier one of this boot has verified, and removes the blob (and with its
// file, its verification marker) when it does not match: a DataLoss error
// naming d. The next read of d is then a miss, fetched again from another
// tier, instead of the same wrong bytes served on the strength of a
// marker. A failure to read keeps the blob and keeps its cause.
func (c *Cache) Verify(ctx context.Context, ns cache.Namespace, d *repb.Digest) error {
	f, e, size, err := c.openFile(ctx, ns, d)
	if err != nil {
		return err
	}
	defer c.unpin(e)
	defer f.Close()
	if size != d.SizeBytes {
		if fm := formOf(f, d, size); fm.zst {
			if err := c.verifyCompressed(f, fm, ns, d, c.badFunc(e, f)); err != nil {
				return err
			}
			c.setVerified(e)
			return nil
		}
	}
	v, err := digest.NewVerifier(ns.DigestFunction(), d)
	if err != nil {
		return errkind.New(errkind.InvalidArgument, "verifying blob %s: %w", digest.String(d), err)
	}
	bp := copyBufs.Get().(*[]byte)
	_, err = io.CopyBuffer(v, fileio.Reader(ctx, io.NewSectionReader(f, 0, 1<<62)), *bp)
	copyBufs.Put(bp)
	if err != nil {
		return errkind.IO(errnoOf(err), "verifying blob %s", digest.String(d))
	}
	if cerr := v.Check(); cerr != nil {
		c.removeCorrupt(e, f)
		return cache.Corruptf("corrupt blob %s in local cache: %v (removed)", digest.String(d), cerr)
	}
	c.setVerified(e)
	c.markVerified(f, e.rel)
	return nil
}
