package s3cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"github.com/minio/minio-go/v7"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/zstdio"
)

// Object metadata the tier writes (sent as X-Amz-Meta-<name>).
const (
	// metaEncoding is "zstd" on a blob stored compressed; absent on a raw
	// blob (and on every object written before compression at rest).
	metaEncoding = "Snaploader-Encoding"
	// metaTime is the writer's clock, Unix seconds, when the object was
	// written or its age was last refreshed (see FindMissing).
	metaTime = "Snaploader-Time"

	encodingZstd = "zstd"
	// minCompressSize is the smallest blob worth compressing.
	minCompressSize = 512
)

// encoder compresses blobs at rest; EncodeAll is safe for concurrent use.
var encoder = zstdio.NewEncoder()

// compress returns the zstd form of b in the seekable layout (frames of
// Options.FrameSize behind their index, see zstdio.EncodeSeekable) when it
// is worth storing instead of b (it saves at least 1/64 of the size), else
// nil.
func (c *Cache) compress(b []byte) []byte {
	if len(b) < minCompressSize {
		return nil
	}
	z := zstdio.EncodeSeekable(encoder, b, c.frameSize)
	if len(z) > len(b)-len(b)/64 {
		return nil
	}
	return z
}

var decoderPool sync.Pool

// boundedDecoder decodes the zstd stream r of a blob of size bytes: windows
// are capped by decoderWindow(size) and the output by size (one byte more
// is read to detect a longer stream, which the caller's verifier rejects),
// so a zstd bomb costs at most one window of memory.
type boundedDecoder struct {
	dec  *zstd.Decoder
	lim  io.Reader
	d    *repb.Digest
	key  string
	done bool
}

func newBoundedDecoder(r io.Reader, d *repb.Digest, key string) (*boundedDecoder, error) {
	var dec *zstd.Decoder
	opts := []zstd.DOption{zstd.WithDecoderMaxWindow(zstdio.Window(d.SizeBytes))}
	if p, ok := decoderPool.Get().(*zstd.Decoder); ok {
		if err := p.ResetWithOptions(r, opts...); err == nil {
			dec = p
		} else {
			p.Close()
		}
	}
	if dec == nil {
		var err error
		dec, err = zstdio.NewDecoder(r, zstdio.Window(d.SizeBytes))
		if err != nil {
			return nil, errkind.New(errkind.Internal, "s3 cache: decoder for blob %s at %s: %v", digest.String(d), key, err)
		}
	}
	return &boundedDecoder{dec: dec, lim: io.LimitReader(dec, d.SizeBytes+1), d: d, key: key}, nil
}

func (b *boundedDecoder) Read(p []byte) (int, error) {
	if b.done {
		return 0, io.EOF
	}
	n, err := b.lim.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		if status.Code(err) == codes.Unknown {
			// A decoding error: the stored bytes are not what was written.
			err = cache.Corruptf("s3 cache: corrupt compressed blob %s at %s: %v", digest.String(b.d), b.key, err)
		}
		b.release()
	}
	if errors.Is(err, io.EOF) {
		b.release()
	}
	return n, err
}

func (b *boundedDecoder) release() {
	if b.done {
		return
	}
	b.done = true
	if err := b.dec.Reset(nil); err == nil {
		decoderPool.Put(b.dec)
	} else {
		b.dec.Close()
	}
}

// objectMeta is what the tier reads back from an object's metadata.
type objectMeta struct {
	compressed bool
	// written is the writer's clock at write or last refresh; zero for
	// objects written before the tier recorded it.
	written time.Time
}

func parseMeta(h http.Header) (objectMeta, error) {
	var m objectMeta
	switch enc := h.Get("X-Amz-Meta-" + metaEncoding); enc {
	case "":
	case encodingZstd:
		m.compressed = true
	default:
		return m, fmt.Errorf("unknown encoding %q", enc)
	}
	if t := h.Get("X-Amz-Meta-" + metaTime); t != "" {
		if s, err := strconv.ParseInt(t, 10, 64); err == nil {
			m.written = time.Unix(s, 0)
		}
	}
	return m, nil
}

// userMetadata is the metadata of an object written at now.
func userMetadata(compressed bool, now time.Time) map[string]string {
	m := map[string]string{metaTime: strconv.FormatInt(now.Unix(), 10)}
	if compressed {
		m[metaEncoding] = encodingZstd
	}
	return m
}

// age is how old an object is at now: from the later of its LastModified
// and its recorded write time, or, with clockFromMetadata, from the
// recorded write time alone when there is one.
func age(info minio.ObjectInfo, m objectMeta, now time.Time, clockFromMetadata bool) time.Duration {
	t := info.LastModified
	if !m.written.IsZero() && (clockFromMetadata || m.written.After(t)) {
		t = m.written
	}
	return now.Sub(t)
}

// maxCompressedSize bounds the zstd form of a blob of size bytes accepted
// by WriteCompressed: incompressible data grows by a few bytes per block.
func maxCompressedSize(size int64) int64 { return size + size/64 + 64<<10 }

// WriteCompressed stores blob d from the zstd stream r
// (cache.CompressedWriter). The stream is decoded to verify it; a blob up
// to Options.SmallBlobLimit is stored as Write stores it, in the seekable
// layout when that is smaller than the content (else raw), so that range
// reads of it fetch only their frames: the frames received are kept as
// they are when they already are in that layout, and encoded again
// otherwise. A larger blob is stored raw, as Write stores it. Content not matching d is InvalidArgument and nothing is
// stored; a blob already present is not read.
func (c *Cache) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	fn, err := checkDigest(ns, d, "writing blob")
	if err != nil {
		return err
	}
	key := c.casKey(fn, d)
	if d.SizeBytes > c.opts.SmallBlobLimit || isEmpty(fn, d) {
		dec, err := newBoundedDecoder(r, d, key)
		if err != nil {
			return err
		}
		defer dec.release()
		return c.Write(ctx, ns, d, &uploadDecoder{dec: dec, d: d})
	}
	ok, err := c.present(ctx, key)
	if err != nil {
		return c.errorf(err, "looking up blob %s at %s", digest.String(d), key)
	}
	if ok {
		return nil
	}
	limit := maxCompressedSize(d.SizeBytes)
	z, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return fmt.Errorf("s3 cache: reading compressed content of blob %s: %w", digest.String(d), err)
	}
	if int64(len(z)) > limit {
		return mismatchf(d, "compressed content is larger than %d bytes", limit)
	}
	dec, err := newBoundedDecoder(bytes.NewReader(z), d, key)
	if err != nil {
		return err
	}
	raw := make([]byte, d.SizeBytes)
	err = fill(&uploadDecoder{dec: dec, d: d}, raw, d, 0)
	if err == nil {
		err = c.checkEnd(&uploadDecoder{dec: dec, d: d}, d, d.SizeBytes)
	}
	dec.release()
	if err != nil {
		return err
	}
	if got := digest.Compute(fn, raw); got.Hash != d.Hash {
		return mismatchf(d, "content hashes to %s", got.Hash)
	}
	if x, _, err := zstdio.ParseSeekIndex(z, d.SizeBytes); err != nil || x.ObjectSize() != int64(len(z)) ||
		int64(len(z)) > d.SizeBytes-d.SizeBytes/64 {
		z = nil
		if !c.opts.DisableCompression {
			z = c.compress(raw)
		}
	}
	return c.putBlob(ctx, d, key, raw, z)
}

// uploadDecoder turns decoding errors of an uploaded stream into
// InvalidArgument: the client sent bad data.
type uploadDecoder struct {
	dec *boundedDecoder
	d   *repb.Digest
}

func (u *uploadDecoder) Read(p []byte) (int, error) {
	n, err := u.dec.Read(p)
	if err != nil && !errors.Is(err, io.EOF) && cache.IsCorrupt(err) {
		err = mismatchf(u.d, "undecodable zstd stream: %v", err)
	}
	return n, err
}
