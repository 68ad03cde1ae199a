package s3cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/minio/minio-go/v7"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/zstdio"
)

// Range reads. A raw object serves a range with one ranged GET of exactly
// those bytes; a compressed object in the seekable layout (see
// zstdio.EncodeSeekable) with one ranged GET of the frames holding the
// range, once its index is known; a compressed object written before the
// seekable layout (one zstd stream) by decoding its stream from the start.
//
// What an object's first bytes say (raw or compressed, the index) is
// learned by the first range read of it and kept (layoutCacheSize
// objects), tied to the object's ETag: a later read of an object replaced
// meanwhile gets PreconditionFailed and learns again. A first read, not
// knowing where its frames lie, fetches the object's prefix that can hold
// them, in up to maxColdParts ranged GETs at once, so that it still takes
// one round trip; the parts past what the index then says are needed are
// cancelled. The bytes returned are not verified: the caller checks them
// against the blob's outboard.
const (
	layoutCacheSize = 1 << 16
	maxColdParts    = 4
	minColdPart     = 512 << 10
)

type layoutKind int

const (
	layoutRaw layoutKind = iota
	layoutSeekable
	layoutStream
)

// layout is what the tier knows of one object.
type layout struct {
	etag string
	kind layoutKind
	idx  *zstdio.SeekIndex // layoutSeekable
}

// layouts is a bounded map of object layouts; the oldest are forgotten
// first.
type layouts struct {
	mu    sync.Mutex
	m     map[string]*layout
	order []string // keys in insertion order (ring of len max)
	next  int
	max   int
}

func newLayouts(n int) *layouts { return &layouts{m: map[string]*layout{}, max: n} }

func (l *layouts) get(key string) *layout {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.m[key]
}

func (l *layouts) put(key string, v *layout) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.m[key]; ok {
		l.m[key] = v
		return
	}
	if len(l.order) < l.max {
		l.order = append(l.order, key)
	} else {
		delete(l.m, l.order[l.next])
		l.order[l.next] = key
		l.next = (l.next + 1) % l.max
	}
	l.m[key] = v
}

func (l *layouts) forget(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.m, key) // its slot in order is reused in turn
}

// ReadRange returns the n bytes of blob d from off (fewer at its end),
// fetching only what they need from the bucket (see above). They are not
// verified here: a caller checks them against the blob's outboard. A range
// starting outside the blob is InvalidArgument; a missing blob is
// NotFound.
func (c *Cache) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	fn, err := checkDigest(ns, d, "reading a range of a blob")
	if err != nil {
		return nil, err
	}
	size := d.SizeBytes
	if off < 0 || n < 0 || off > size {
		return nil, errkind.New(errkind.InvalidArgument, "s3 cache: blob %s at [%d, %d) (bucket %s): outside its %d bytes", digest.String(d), off, off+n, c.opts.Bucket, size)
	}
	end := size
	if n < size-off {
		end = off + n
	}
	if end == off || isEmpty(fn, d) {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	key := c.casKey(fn, d)
	var rc io.ReadCloser
	for range 3 {
		if l := c.layouts.get(key); l != nil {
			rc, err = c.readKnown(ctx, d, key, l, off, end)
		} else {
			rc, err = c.readCold(ctx, d, key, off, end)
		}
		if !preconditionFailed(err) && !errors.Is(err, errChanged) {
			break
		}
		// Replaced since its layout was learned: learn it again.
		c.layouts.forget(key)
	}
	if err != nil {
		if cache.IsCorrupt(err) {
			return nil, err
		}
		return nil, c.errorf(err, "reading blob %s at %s at [%d, %d)", digest.String(d), key, off, end)
	}
	return rc, nil
}

// readKnown reads [off, end) of an object whose layout is known.
func (c *Cache) readKnown(ctx context.Context, d *repb.Digest, key string, l *layout, off, end int64) (io.ReadCloser, error) {
	switch l.kind {
	case layoutRaw:
		sp, err := c.getRange(ctx, key, off, end, l.etag)
		if err != nil {
			return nil, err
		}
		c.warmRanges.Add(1)
		return io.NopCloser(bytes.NewReader(sp.data)), nil
	case layoutSeekable:
		first, _, cs, ce := l.idx.Frames(off, end)
		sp, err := c.getRange(ctx, key, cs, ce, l.etag)
		if err != nil {
			return nil, err
		}
		c.warmRanges.Add(1)
		return c.decodeFrames(d, key, sp.data, int64(first)*l.idx.FrameSize, off, end)
	}
	return c.readStreamRange(ctx, d, key, off, end)
}

// readCold reads [off, end) of an object whose layout is not known yet,
// and learns it.
func (c *Cache) readCold(ctx context.Context, d *repb.Digest, key string, off, end int64) (io.ReadCloser, error) {
	c.coldRanges.Add(1)
	size := d.SizeBytes
	if size > max(c.opts.SmallBlobLimit, DefaultSmallBlobLimit) {
		// Larger blobs are stored raw: ask for the range itself.
		sp, err := c.getRange(ctx, key, off, end, "")
		if err != nil {
			return nil, err
		}
		m, err := parseMeta(sp.info.Metadata)
		if err != nil {
			return nil, cache.Corruptf("s3 cache: blob %s at %s (bucket %s): %v", digest.String(d), key, c.opts.Bucket, err)
		}
		if !m.compressed {
			c.layouts.put(key, &layout{etag: sp.info.ETag, kind: layoutRaw})
			return io.NopCloser(bytes.NewReader(sp.data)), nil
		}
		c.layouts.put(key, &layout{etag: sp.info.ETag, kind: layoutStream})
		return c.readStreamRange(ctx, d, key, off, end)
	}
	// The prefix that can hold the frames of [off, end) in the seekable
	// layout of the default frame size, and [off, end) of a raw object.
	fs := int64(c.frameSize)
	covered := min(size, (end+fs-1)/fs*fs)
	frames := (covered + fs - 1) / fs
	bound := max(end, zstdio.SeekIndexLen(size, fs)+covered+frames*zstdio.MaxFrameOverhead(fs))
	parts := min(maxColdParts, max(1, bound/minColdPart))
	ps := c.fetchParts(ctx, key, bound, (bound+parts-1)/parts, "")
	defer cancelParts(ps)
	p0 := ps[0]
	<-p0.done
	if errors.Is(p0.err, errPastEnd) {
		return nil, cache.Corruptf("s3 cache: blob %s at %s (bucket %s): the object is empty", digest.String(d), key, c.opts.Bucket)
	}
	if p0.err != nil {
		return nil, p0.err
	}
	etag := p0.sp.info.ETag
	m, err := parseMeta(p0.sp.info.Metadata)
	if err != nil {
		return nil, cache.Corruptf("s3 cache: blob %s at %s (bucket %s): %v", digest.String(d), key, c.opts.Bucket, err)
	}
	if !m.compressed {
		c.layouts.put(key, &layout{etag: etag, kind: layoutRaw})
		data, err := gather(ps, off, end, etag)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(bytes.NewReader(data)), nil
	}
	x, need, err := zstdio.ParseSeekIndex(p0.sp.data, size)
	switch {
	case errors.Is(err, zstdio.ErrNotSeekable):
		c.layouts.put(key, &layout{etag: etag, kind: layoutStream})
		cancelParts(ps)
		return c.readStreamRange(ctx, d, key, off, end)
	case errors.Is(err, zstdio.ErrShortIndex):
		// An index longer than the first part (a tiny frame size).
		sp, err := c.getRange(ctx, key, 0, int64(need), etag)
		if err != nil {
			return nil, err
		}
		if x, _, err = zstdio.ParseSeekIndex(sp.data, size); err != nil {
			return nil, cache.Corruptf("s3 cache: blob %s at %s (bucket %s): %v", digest.String(d), key, c.opts.Bucket, err)
		}
	case err != nil:
		return nil, cache.Corruptf("s3 cache: blob %s at %s (bucket %s): %v", digest.String(d), key, c.opts.Bucket, err)
	}
	c.layouts.put(key, &layout{etag: etag, kind: layoutSeekable, idx: x})
	first, _, cs, ce := x.Frames(off, end)
	z, err := gather(ps, cs, ce, etag)
	if err != nil {
		return nil, err
	}
	if got := cs + int64(len(z)); got < ce {
		// Frames past the bound (a writer with larger frames).
		sp, err := c.getRange(ctx, key, got, ce, etag)
		if err != nil {
			return nil, err
		}
		z = append(z, sp.data...)
	}
	return c.decodeFrames(d, key, z, int64(first)*x.FrameSize, off, end)
}

// decodeFrames decodes frames z, whose content starts at blob offset at,
// and returns the content [off, end).
func (c *Cache) decodeFrames(d *repb.Digest, key string, z []byte, at, off, end int64) (io.ReadCloser, error) {
	dec, err := newBoundedDecoder(bytes.NewReader(z), d, key)
	if err != nil {
		return nil, err
	}
	defer dec.release()
	bad := func(err error) error {
		return cache.Corruptf("s3 cache: blob %s at %s (bucket %s): frames holding [%d, %d): %v", digest.String(d), key, c.opts.Bucket, off, end, err)
	}
	if _, err := io.CopyN(io.Discard, dec, off-at); err != nil {
		return nil, bad(err)
	}
	out := make([]byte, end-off)
	if _, err := io.ReadFull(dec, out); err != nil {
		return nil, bad(err)
	}
	// The rest of the last frame, so that its checksum is checked.
	if _, err := io.Copy(io.Discard, dec); err != nil {
		return nil, bad(err)
	}
	return io.NopCloser(bytes.NewReader(out)), nil
}

// readStreamRange reads [off, end) of a compressed object written as one
// zstd stream, decoding it from its start.
func (c *Cache) readStreamRange(ctx context.Context, d *repb.Digest, key string, off, end int64) (io.ReadCloser, error) {
	obj, err := c.client.GetObject(ctx, c.opts.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return nil, err
	}
	or := &objectReader{c: c, obj: obj, d: d, key: key}
	dec, err := newBoundedDecoder(or, d, key)
	if err != nil {
		or.Close()
		return nil, err
	}
	defer dec.release()
	defer or.Close()
	bad := func(err error) error {
		if cache.IsCorrupt(err) || status.Code(err) != codes.Unknown {
			return err
		}
		return cache.Corruptf("s3 cache: blob %s at %s (bucket %s): stream holding [%d, %d): %v", digest.String(d), key, c.opts.Bucket, off, end, err)
	}
	if _, err := io.CopyN(io.Discard, dec, off); err != nil {
		return nil, bad(err)
	}
	out := make([]byte, end-off)
	if _, err := io.ReadFull(dec, out); err != nil {
		return nil, bad(fmt.Errorf("at content offset %d: %w", off, err))
	}
	return io.NopCloser(bytes.NewReader(out)), nil
}
