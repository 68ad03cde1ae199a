package s3cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/minio/minio-go/v7"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// Write stores the blob d read from r. r must yield exactly the content d
// names, else the error is InvalidArgument and nothing is stored. When the
// blob is already present Write returns nil without reading r.
func (c *Cache) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	fn, err := checkDigest(ns, d, "writing blob")
	if err != nil {
		return err
	}
	if isEmpty(fn, d) {
		return c.checkEnd(r, d, 0)
	}
	key := c.casKey(fn, d)
	ok, err := c.present(ctx, key)
	if err != nil {
		return c.errorf(err, "looking up blob %s at %s", digest.String(d), key)
	}
	if ok {
		return nil
	}
	if d.SizeBytes <= c.opts.SmallBlobLimit {
		return c.writeSmall(ctx, fn, d, key, r)
	}
	return c.writeMultipart(ctx, fn, d, key, r)
}

// WriteReporting is Write; the blob is stored (or was already) when it
// returns nil.
func (c *Cache) WriteReporting(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) (bool, error) {
	return true, c.Write(ctx, ns, d, r)
}

func mismatchf(d *repb.Digest, format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, "s3 cache: writing blob %s: %s", digest.String(d), fmt.Sprintf(format, args...))
}

// fill reads len(buf) bytes of the content of d from r, which is then at
// offset off of the blob.
func fill(r io.Reader, buf []byte, d *repb.Digest, off int64) error {
	n, err := io.ReadFull(r, buf)
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return mismatchf(d, "content ends after %d bytes", off+int64(n))
	case err != nil:
		return fmt.Errorf("s3 cache: reading content of blob %s at offset %d: %w", digest.String(d), off+int64(n), err)
	}
	return nil
}

// checkEnd checks that r has nothing after the size bytes already read.
func (c *Cache) checkEnd(r io.Reader, d *repb.Digest, size int64) error {
	var one [1]byte
	n, err := io.ReadFull(r, one[:])
	switch {
	case n > 0:
		return mismatchf(d, "content is longer than %d bytes", size)
	case errors.Is(err, io.EOF):
		return nil
	}
	return fmt.Errorf("s3 cache: reading content of blob %s at offset %d: %w", digest.String(d), size, err)
}

func (c *Cache) writeSmall(ctx context.Context, fn digest.Function, d *repb.Digest, key string, r io.Reader) error {
	buf := make([]byte, d.SizeBytes)
	if err := fill(r, buf, d, 0); err != nil {
		return err
	}
	if err := c.checkEnd(r, d, d.SizeBytes); err != nil {
		return err
	}
	if got := digest.Compute(fn, buf); got.Hash != d.Hash {
		return mismatchf(d, "content hashes to %s", got.Hash)
	}
	var z []byte
	if !c.opts.DisableCompression {
		z = c.compress(buf)
	}
	return c.putBlob(ctx, d, key, buf, z)
}

// putBlob stores a verified blob: its zstd form z when there is one, else
// its raw content raw.
func (c *Cache) putBlob(ctx context.Context, d *repb.Digest, key string, raw, z []byte) error {
	body := raw
	if z != nil {
		body = z
	}
	_, err := c.client.PutObject(ctx, c.opts.Bucket, key, bytes.NewReader(body), int64(len(body)), minio.PutObjectOptions{
		ContentType:  "application/octet-stream",
		PartSize:     c.opts.PartSize,
		UserMetadata: userMetadata(z != nil, c.opts.Now()),
	})
	if err != nil {
		return c.errorf(err, "writing blob %s at %s", digest.String(d), key)
	}
	return nil
}

// writeMultipart uploads a large blob in parts while hashing it and
// completes the upload (making the object visible) only when the content
// matched d; otherwise it aborts the upload.
func (c *Cache) writeMultipart(ctx context.Context, fn digest.Function, d *repb.Digest, key string, r io.Reader) (err error) {
	v, err := digest.NewVerifier(fn, d)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "s3 cache: writing blob %s: %v", digest.String(d), err)
	}
	partSize := max(int64(c.opts.PartSize), (d.SizeBytes+maxParts-1)/maxParts)
	nParts := int((d.SizeBytes + partSize - 1) / partSize)
	uploadID, err := c.core.NewMultipartUpload(ctx, c.opts.Bucket, key, minio.PutObjectOptions{
		ContentType:  "application/octet-stream",
		UserMetadata: userMetadata(false, c.opts.Now()),
	})
	if err != nil {
		return c.errorf(err, "starting upload of blob %s at %s", digest.String(d), key)
	}
	completed := false
	defer func() {
		if completed {
			return
		}
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if aerr := c.core.AbortMultipartUpload(actx, c.opts.Bucket, key, uploadID); aerr != nil && code(aerr) != codes.NotFound {
			err = errors.Join(err, c.errorf(aerr, "aborting upload %s of blob %s at %s", uploadID, digest.String(d), key))
		}
	}()

	parts := make([]minio.CompletePart, nParts)
	streams := min(maxUploadStreams, nParts)
	bufs := make(chan []byte, streams)
	for range streams {
		bufs <- nil // allocated on first use
	}
	g, gctx := errgroup.WithContext(ctx)
	var readErr error
	for i := range nParts {
		off := int64(i) * partSize
		n := min(partSize, d.SizeBytes-off)
		var buf []byte
		select {
		case buf = <-bufs:
		case <-gctx.Done():
		}
		if gctx.Err() != nil {
			break
		}
		if int64(cap(buf)) < n {
			buf = make([]byte, partSize)
		}
		buf = buf[:n]
		if readErr = fill(r, buf, d, off); readErr != nil {
			break
		}
		v.Write(buf)
		g.Go(func() error {
			defer func() { bufs <- buf }()
			p, err := c.core.PutObjectPart(gctx, c.opts.Bucket, key, uploadID, i+1, bytes.NewReader(buf), n, minio.PutObjectPartOptions{})
			if err != nil {
				return c.errorf(err, "uploading blob %s at %s: part %d at offset %d", digest.String(d), key, i+1, off)
			}
			parts[i] = minio.CompletePart{
				PartNumber: i + 1, ETag: p.ETag,
				ChecksumCRC32: p.ChecksumCRC32, ChecksumCRC32C: p.ChecksumCRC32C,
				ChecksumSHA1: p.ChecksumSHA1, ChecksumSHA256: p.ChecksumSHA256,
				ChecksumCRC64NVME: p.ChecksumCRC64NVME,
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if readErr != nil {
		return readErr
	}
	if err := ctx.Err(); err != nil {
		return c.errorf(err, "uploading blob %s at %s", digest.String(d), key)
	}
	if err := c.checkEnd(r, d, d.SizeBytes); err != nil {
		return err
	}
	if err := v.Check(); err != nil {
		return mismatchf(d, "%v", err)
	}
	if _, err := c.core.CompleteMultipartUpload(ctx, c.opts.Bucket, key, uploadID, parts, minio.PutObjectOptions{}); err != nil {
		return c.errorf(err, "completing upload of blob %s at %s", digest.String(d), key)
	}
	completed = true
	return nil
}
