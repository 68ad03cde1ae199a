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

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/zstdio"
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
	or, key, compressed, err := c.openBlob(ctx, fn, d)
	if err != nil {
		return nil, err
	}
	src := or
	if compressed {
		dec, err := newBoundedDecoder(or, d, key)
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
	return &dropCorrupt{ReadCloser: rc, c: c, ctx: ctx, key: key}, nil
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
	or, key, compressed, err := c.openBlob(ctx, fn, d)
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
	return &dropCorrupt{ReadCloser: rc, c: c, ctx: ctx, key: key}, false, nil
}

// maxParallelRead is the largest object fetched in parallel parts into
// memory; a larger one (always stored raw) streams from one GET.
const maxParallelRead = 64 << 20

// openBlob opens the object of blob d and says whether it is stored
// compressed. A raw object must have d's size. An object up to
// maxParallelRead comes in parts of Options.ReadPartSize fetched at once
// (each hedged); a larger one streams.
func (c *Cache) openBlob(ctx context.Context, fn digest.Function, d *repb.Digest) (io.ReadCloser, string, bool, error) {
	key := c.casKey(fn, d)
	if d.SizeBytes > maxParallelRead {
		or, compressed, err := c.openStream(ctx, d, key)
		return or, key, compressed, err
	}
	var (
		rc         io.ReadCloser
		compressed bool
		err        error
	)
	for range 2 {
		rc, compressed, err = c.openParts(ctx, d, key)
		if !errors.Is(err, errChanged) {
			break
		}
	}
	if err != nil && !cache.IsCorrupt(err) {
		err = c.errorf(err, "reading blob %s at %s", digest.String(d), key)
	}
	return rc, key, compressed, err
}

// openParts fetches the object of blob d in parts at once. Every object
// the tier writes is at most the blob's size (compressed only when that
// saves a 64th); a smaller one answers the parts past its end with 416.
func (c *Cache) openParts(ctx context.Context, d *repb.Digest, key string) (io.ReadCloser, bool, error) {
	bound := max(1, d.SizeBytes)
	if l := c.layouts.get(key); l != nil && l.kind == layoutSeekable {
		bound = l.idx.ObjectSize()
	}
	ps := c.fetchParts(ctx, key, bound, c.opts.ReadPartSize, "")
	defer cancelParts(ps)
	p0 := ps[0]
	<-p0.done
	corrupt := func(format string, args ...any) error {
		c.drop(ctx, key)
		return cache.Corruptf("s3 cache: blob %s at %s (bucket %s): %s (deleted)", digest.String(d), key, c.opts.Bucket, fmt.Sprintf(format, args...))
	}
	if errors.Is(p0.err, errPastEnd) {
		return nil, false, corrupt("the object is empty")
	}
	if p0.err != nil {
		return nil, false, p0.err
	}
	m, err := parseMeta(p0.sp.info.Metadata)
	if err != nil {
		return nil, false, corrupt("%v", err)
	}
	total := p0.sp.total
	if !m.compressed && total != d.SizeBytes {
		return nil, false, corrupt("object has %d bytes", total)
	}
	if total > bound {
		// Larger than any object the tier writes: read it as it is, and
		// let decoding and verification judge it.
		cancelParts(ps)
		or, compressed, err := c.openStream(ctx, d, key)
		return or, compressed, err
	}
	data, err := gather(ps, 0, total, p0.sp.info.ETag)
	if err != nil {
		return nil, false, err
	}
	if int64(len(data)) != total {
		return nil, false, errChanged
	}
	if m.compressed {
		// Decoders skip the index: check that it describes the frames,
		// so that range reads of the object find them.
		if err := zstdio.CheckSeekable(data, d.SizeBytes); err != nil {
			return nil, false, corrupt("%v", err)
		}
	}
	return io.NopCloser(bytes.NewReader(data)), m.compressed, nil
}

// openStream opens the object of blob d as one streamed GET.
func (c *Cache) openStream(ctx context.Context, d *repb.Digest, key string) (*objectReader, bool, error) {
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
