package localcache

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/zstdio"
)

// Compressed blobs at rest (Options.Compression).
//
// A compressed blob lives under the same name as a raw one. Its file holds
// zstd frames that decode to the blob's content, followed by a trailer: a
// zstd skippable frame (so the whole file is still a valid zstd stream)
// carrying a tag and the BLAKE3 hash of the frames before it. A raw blob's
// file is exactly the blob's size; a compressed one is shorter and ends
// with a valid trailer. Files of any other shape are read as raw files and
// fail verification as they always did, so a directory written before
// compression existed needs no migration.
//
// The trailer's hash lets a compressed blob this process has verified (by
// writing it, or by decoding it once and checking the digest) be checked
// again on every later read by hashing its frames, which costs a fraction
// of decoding them: a flipped bit in the frames or the trailer is caught
// without decoding, and the blob is removed as corrupt.

const (
	// trailerLen is the trailer's size: skippable frame magic and length,
	// tag, BLAKE3-256 of the frames.
	trailerLen   = 48 // 8 + len(trailerTag) + 32
	trailerTag   = "SLZSTD01"
	trailerMagic = 0x184D2A5B // one of the zstd skippable frame magics

	// MaxWindow bounds the window of the zstd frames the cache decodes
	// (and of those it writes): frames asking for more are corrupt. It is
	// also what a frame of the reference encoder's levels 1-19 asks for at
	// most, and what serve accepts in uploads.
	MaxWindow = zstdio.MinWindow
	// encWindow is the window of the frames the cache writes: a default
	// chunk (4,096,000 bytes) fits in it. An encoder holds about this much
	// history.
	encWindow = 4 << 20

	// minCompressed: blobs smaller than this are always stored raw (a
	// 4 KiB disk block cannot shrink).
	minCompressed = 8 << 10
	// probeBytes: a streaming compression gives up once this much content
	// has gone in without shrinking enough (random data).
	probeBytes = 2 << 20
)

// worthCompressing reports whether a compressed file of n bytes (trailer
// included) is worth storing in place of raw content that takes raw bytes:
// it must save at least a sixteenth.
func worthCompressing(n, raw int64) bool { return n*16 <= raw*15 }

var encPool = sync.Pool{New: func() any {
	return zstdio.NewEncoder(zstd.WithWindowSize(encWindow), zstd.WithLowerEncoderMem(true), zstd.WithEncoderCRC(true))
}}

var decPool = sync.Pool{New: func() any {
	d, err := zstdio.NewDecoder(nil, MaxWindow)
	if err != nil {
		panic(err)
	}
	return d
}}

func putDecoder(d *zstd.Decoder) {
	d.Reset(nil)
	decPool.Put(d)
}

func trailer(sum []byte) []byte {
	t := make([]byte, 0, trailerLen)
	t = binary.LittleEndian.AppendUint32(t, trailerMagic)
	t = binary.LittleEndian.AppendUint32(t, uint32(trailerLen-8))
	t = append(t, trailerTag...)
	return append(t, sum...)
}

// parseTrailer returns the frames' hash recorded in t.
func parseTrailer(t []byte) (sum [32]byte, ok bool) {
	if len(t) != trailerLen || binary.LittleEndian.Uint32(t) != trailerMagic ||
		binary.LittleEndian.Uint32(t[4:]) != uint32(trailerLen-8) || string(t[8:8+len(trailerTag)]) != trailerTag {
		return sum, false
	}
	copy(sum[:], t[8+len(trailerTag):])
	return sum, true
}

// form is how a blob's file stores it.
type form struct {
	zst    bool
	frames int64    // length of the zstd frames (compressed)
	sum    [32]byte // their hash (compressed)
}

// formOf tells a compressed blob's file (shorter than the blob, ending
// with a trailer) from a raw one; size is the file's size.
func formOf(f *os.File, d *repb.Digest, size int64) form {
	if size >= d.SizeBytes || size < trailerLen {
		return form{}
	}
	var t [trailerLen]byte
	if _, err := f.ReadAt(t[:], size-trailerLen); err != nil {
		return form{}
	}
	sum, ok := parseTrailer(t[:])
	if !ok {
		return form{}
	}
	return form{zst: true, frames: size - trailerLen, sum: sum}
}

// countingWriter counts and hashes what it passes to w.
type countingWriter struct {
	w io.Writer
	h *blake3.Hasher
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.h.Write(p[:n])
	c.n += int64(n)
	return n, err
}

var errNotWorth = errors.New("does not shrink")

// compressInto writes size bytes of content read from src into dst (empty,
// at offset 0) as zstd frames plus the trailer, and returns dst's length.
// It returns errNotWorth as soon as the output is not going to be worth
// storing in place of raw bytes of disk.
func (c *Cache) compressInto(ctx context.Context, dst *os.File, src io.Reader, size, raw int64) (int64, error) {
	if err := c.acquireEncoder(ctx); err != nil {
		return 0, err
	}
	defer func() { <-c.encoders }()
	bw := bufio.NewWriterSize(dst, 256<<10)
	cw := &countingWriter{w: bw, h: blake3.New()}
	enc := encPool.Get().(*zstd.Encoder)
	defer func() {
		enc.Reset(nil)
		encPool.Put(enc)
	}()
	enc.ResetContentSize(cw, size)
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := *bp
	var in int64
	for {
		if err := ctx.Err(); err != nil {
			return 0, status.FromContextError(err).Err()
		}
		n, rerr := io.ReadFull(src, buf)
		if n > 0 {
			if _, err := enc.Write(buf[:n]); err != nil {
				return 0, fmt.Errorf("compressing: %w", err)
			}
			in += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return 0, fmt.Errorf("reading content at offset %d: %w", in, rerr)
		}
		if in >= probeBytes && !worthCompressing(cw.n, in) {
			return 0, errNotWorth
		}
	}
	if in != size {
		return 0, status.Errorf(codes.InvalidArgument, "content is %d bytes, want %d", in, size)
	}
	if err := enc.Close(); err != nil {
		return 0, fmt.Errorf("compressing: %w", err)
	}
	n := cw.n + trailerLen
	if n >= size || !worthCompressing(n, raw) {
		return 0, errNotWorth
	}
	if _, err := bw.Write(trailer(cw.h.Sum(nil))); err != nil {
		return 0, errkind.IO(errnoOf(err), "writing compressed content")
	}
	if err := bw.Flush(); err != nil {
		return 0, errkind.IO(errnoOf(err), "writing compressed content")
	}
	return n, nil
}

// compressBytes returns data as zstd frames plus trailer, or nil when that
// is not worth storing.
func (c *Cache) compressBytes(ctx context.Context, data []byte) []byte {
	if len(data) < minCompressed || c.acquireEncoder(ctx) != nil {
		return nil
	}
	defer func() { <-c.encoders }()
	enc := encPool.Get().(*zstd.Encoder)
	out := enc.EncodeAll(data, make([]byte, 0, len(data)/2))
	encPool.Put(enc)
	n := int64(len(out) + trailerLen)
	if n >= int64(len(data)) || !worthCompressing(n, int64(len(data))) {
		return nil
	}
	sum := blake3.Sum256(out)
	return append(out, trailer(sum[:])...)
}

// acquireEncoder waits for one of the cache's encoder slots, which bound
// the memory compression takes whatever the number of writers.
func (c *Cache) acquireEncoder(ctx context.Context) error {
	select {
	case c.encoders <- struct{}{}:
		return nil
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	}
}

// Compression reports whether the cache stores new blobs compressed when
// that shrinks them (Options.Compression).
func (c *Cache) Compression() bool { return c.opts.Compression }
