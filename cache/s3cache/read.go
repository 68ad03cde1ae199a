package s3cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/minio/minio-go/v7"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// Read opens the blob d for streaming. The stream is verified against d: a
// corrupt or truncated object ends in a DataLoss error instead of io.EOF.
// A blob stored compressed is decoded (with bounded memory) and its
// decoded bytes are verified. A missing blob is NotFound. ctx governs the
// whole stream.
func (c *Cache) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	fn, err := checkDigest(ns, d, "reading blob")
	if err != nil {
		return nil, err
	}
	if isEmpty(fn, d) {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	or, compressed, err := c.openBlob(ctx, fn, d)
	if err != nil {
		return nil, err
	}
	var src io.ReadCloser = or
	if compressed {
		dec, err := newBoundedDecoder(or, d, or.key)
		if err != nil {
			or.Close()
			return nil, err
		}
		src = &decodedReader{boundedDecoder: dec, obj: or}
	}
	// The bucket is not trusted: the stream is checked against d.
	rc, err := cache.NewVerifyingReader(src, fn, d)
	if err != nil {
		src.Close()
		return nil, err
	}
	return &dropCorrupt{ReadCloser: rc, c: c, ctx: ctx, key: or.key}, nil
}

// ReadCompressed opens the blob d as it is stored (cache.CompressedReader):
// when compressed is true the stream is the stored zstd frames, which
// decode to d's content, and is not verified here (the receiver decodes
// and verifies, or the caller wraps it in cache.NewZstdVerifyingReader);
// otherwise it is the raw content, verified as by Read.
func (c *Cache) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	fn, err := checkDigest(ns, d, "reading blob")
	if err != nil {
		return nil, false, err
	}
	if isEmpty(fn, d) {
		return io.NopCloser(bytes.NewReader(nil)), false, nil
	}
	or, compressed, err := c.openBlob(ctx, fn, d)
	if err != nil {
		return nil, false, err
	}
	if compressed {
		return or, true, nil
	}
	rc, err := cache.NewVerifyingReader(or, fn, d)
	if err != nil {
		or.Close()
		return nil, false, err
	}
	return &dropCorrupt{ReadCloser: rc, c: c, ctx: ctx, key: or.key}, false, nil
}

// openBlob opens the object of blob d and says whether it is stored
// compressed. A raw object must have d's size.
func (c *Cache) openBlob(ctx context.Context, fn digest.Function, d *repb.Digest) (*objectReader, bool, error) {
	key := c.casKey(fn, d)
	obj, err := c.client.GetObject(ctx, c.opts.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return nil, false, c.errorf(err, "reading blob %s at %s", digest.String(d), key)
	}
	info, err := obj.Stat()
	if err != nil {
		obj.Close()
		return nil, false, c.errorf(err, "reading blob %s at %s", digest.String(d), key)
	}
	m, err := parseMeta(info.Metadata)
	if err != nil {
		obj.Close()
		c.drop(ctx, key)
		return nil, false, cache.Corruptf("s3 cache: blob %s at %s (bucket %s): %v (deleted)", digest.String(d), key, c.opts.Bucket, err)
	}
	if !m.compressed && info.Size != d.SizeBytes {
		obj.Close()
		c.drop(ctx, key)
		return nil, false, cache.Corruptf("s3 cache: corrupt blob %s at %s (bucket %s): object has %d bytes (deleted)",
			digest.String(d), key, c.opts.Bucket, info.Size)
	}
	return &objectReader{c: c, obj: obj, d: d, key: key}, m.compressed, nil
}

// decodedReader is a compressed object's decoded stream.
type decodedReader struct {
	*boundedDecoder
	obj io.Closer
}

func (r *decodedReader) Close() error {
	r.release()
	return r.obj.Close()
}

// objectReader streams an object, naming the blob, key and offset in any
// transport error.
type objectReader struct {
	c   *Cache
	obj *minio.Object
	d   *repb.Digest
	key string
	n   int64
}

func (r *objectReader) Read(p []byte) (int, error) {
	n, err := r.obj.Read(p)
	r.n += int64(n)
	if err != nil && !errors.Is(err, io.EOF) {
		err = r.c.errorf(err, "reading blob %s at %s at offset %d", digest.String(r.d), r.key, r.n)
	}
	return n, err
}

func (r *objectReader) Close() error { return r.obj.Close() }

// drop deletes the object of a blob that failed verification, so that it
// is reported missing and stored again by the next Write; a failure to
// delete (a read-only key) leaves it for the next reader to find corrupt.
func (c *Cache) drop(ctx context.Context, key string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	c.client.RemoveObject(ctx, c.opts.Bucket, key, minio.RemoveObjectOptions{})
}

// dropCorrupt is a verified blob stream that deletes the blob's object
// when the stream fails verification (see drop).
type dropCorrupt struct {
	io.ReadCloser
	c       *Cache
	ctx     context.Context
	key     string
	dropped bool
}

func (r *dropCorrupt) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	if cache.IsCorrupt(err) && !r.dropped {
		r.dropped = true
		r.c.drop(r.ctx, r.key)
	}
	return n, err
}
