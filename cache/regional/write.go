package regional

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/fileio"
)

// upstreamWrite stores d, read from r, in the upstream.
func (r *Regional) upstreamWrite(ctx context.Context, ns cache.Namespace, d *repb.Digest, src io.Reader) error {
	if err := r.up.Write(ctx, ns, d, src); err != nil {
		return fmt.Errorf("regional cache: writing blob %s to upstream %s: %w", digest.String(d), r.up.Traits().Description, err)
	}
	r.remember(ns, d)
	return nil
}

// keepCopy logs the failure to keep a local copy of a blob the upstream
// holds: the write itself is done.
func (r *Regional) keepCopy(d *repb.Digest, err error) {
	if err != nil {
		r.stats.localCopyErrors.Add(1)
		r.opts.Logger.Warn("regional cache: keeping a local copy of a blob written upstream", "digest", digest.String(d), "err", err)
	}
}

// Write stores the blob read from r in the upstream, then keeps a copy on
// the disk. The content is verified while it is spooled to a temporary
// file of the disk cache (a mismatch is InvalidArgument and nothing is
// stored); when the disk has no room for it, it streams to the upstream
// alone.
func (r *Regional) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, src io.Reader) error {
	if err := digest.Validate(d); err != nil {
		return err
	}
	res, err := r.local.Reserve(d.GetSizeBytes())
	if err != nil {
		return r.upstreamWrite(ctx, ns, d, src)
	}
	defer release(res)
	tmp, err := fileio.CreateTemp(r.local.TempDir())
	if err != nil {
		return errkind.IO(err, "regional cache: writing blob %s", digest.String(d))
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name())
	}()
	v, err := digest.NewVerifier(ns.DigestFunction(), d)
	if err != nil {
		return errkind.New(errkind.InvalidArgument, "regional cache: writing blob %s: %v", digest.String(d), err)
	}
	n, err := io.Copy(tmp, io.TeeReader(io.LimitReader(src, d.GetSizeBytes()+1), v))
	if err != nil {
		return fmt.Errorf("regional cache: writing blob %s: %w", digest.String(d), err)
	}
	if n != d.GetSizeBytes() {
		return errkind.New(errkind.InvalidArgument, "regional cache: writing blob %s: got %d bytes", digest.String(d), n)
	}
	if err := v.Check(); err != nil {
		return errkind.New(errkind.InvalidArgument, "regional cache: writing blob %s: content does not match digest: %v", digest.String(d), err)
	}
	if err := r.upstreamWrite(ctx, ns, d, io.NewSectionReader(tmp, 0, n)); err != nil {
		return err
	}
	r.keepCopy(d, r.local.PutFile(ctx, ns, d, tmp, res))
	return nil
}

// WriteReporting is Write; the blob is stored (or was already) when it
// returns nil.
func (r *Regional) WriteReporting(ctx context.Context, ns cache.Namespace, d *repb.Digest, src io.Reader) (bool, error) {
	return true, r.Write(ctx, ns, d, src)
}

// PutFile stores f's content (verified by the caller) in the upstream,
// then renames f into the disk cache with res.
func (r *Regional) PutFile(ctx context.Context, ns cache.Namespace, d *repb.Digest, f *os.File, res cache.Reservation) error {
	if err := r.upstreamWrite(ctx, ns, d, io.NewSectionReader(f, 0, d.GetSizeBytes())); err != nil {
		return err
	}
	if err := r.local.PutFile(ctx, ns, d, f, res); err != nil {
		r.keepCopy(d, err)
		release(res)
		os.Remove(f.Name())
	}
	return nil
}

// PutCompressedFile stores the n bytes of zstd frames in f (verified by
// the caller to decode to d) in the upstream, as its WriteCompressed takes
// them (kept as frames by a tier that stores blobs compressed, else
// decoded); then the disk keeps them.
func (r *Regional) PutCompressedFile(ctx context.Context, ns cache.Namespace, d *repb.Digest, f *os.File, n int64, res cache.Reservation) error {
	if err := r.up.WriteCompressed(ctx, ns, d, io.NewSectionReader(f, 0, n)); err != nil {
		return fmt.Errorf("regional cache: writing blob %s to upstream %s: %w", digest.String(d), r.up.Traits().Description, err)
	}
	r.remember(ns, d)
	if err := r.local.PutCompressedFile(ctx, ns, d, f, n, res); err != nil {
		r.keepCopy(d, err)
		release(res)
		os.Remove(f.Name())
	}
	return nil
}

// PutHashed stores data (hashed by the caller to d) in the upstream, then
// on the disk.
func (r *Regional) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	if int64(len(data)) != d.GetSizeBytes() {
		return errkind.New(errkind.InvalidArgument, "regional cache: blob %s: %d bytes", digest.String(d), len(data))
	}
	if err := r.upstreamWrite(ctx, ns, d, bytes.NewReader(data)); err != nil {
		return err
	}
	r.keepCopy(d, r.local.PutHashed(ctx, ns, d, data))
	return nil
}

// WriteCompressed decodes the zstd frames of r and stores the content as
// Write does (the server's compressed uploads come through
// PutCompressedFile, which keeps the frames).
func (r *Regional) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, src io.Reader) error {
	return cache.WriteDecoded(ctx, r, ns, d, src)
}

func release(res cache.Reservation) {
	if res != nil {
		res.Release()
	}
}
