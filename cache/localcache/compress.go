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
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
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
	MaxWindow = 8 << 20
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
	e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1),
		zstd.WithWindowSize(encWindow), zstd.WithLowerEncoderMem(true), zstd.WithEncoderCRC(true))
	if err != nil {
		panic(err)
	}
	return e
}}

var decPool = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(MaxWindow), zstd.WithDecoderLowmem(true))
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

// frameReader reads a compressed blob's frames, hashing them; at their end
// it checks the hash against the trailer and returns a corrupt error
// naming the digest instead of io.EOF on a mismatch (after calling bad
// once), withholding the bytes of that last call.
type frameReader struct {
	r   *io.SectionReader
	h   *blake3.Hasher
	sum [32]byte
	d   *repb.Digest
	bad func()
	err error
}

func newFrameReader(f *os.File, fm form, d *repb.Digest, bad func()) *frameReader {
	return &frameReader{r: io.NewSectionReader(f, 0, fm.frames), h: blake3.New(), sum: fm.sum, d: d, bad: bad}
}

func (r *frameReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	n, err := r.r.Read(p)
	r.h.Write(p[:n])
	switch {
	case errors.Is(err, io.EOF):
		var got [32]byte
		r.h.Sum(got[:0])
		if got != r.sum {
			r.bad()
			r.err = cache.Corruptf("corrupt blob %s in local cache: its zstd frames do not match their recorded hash (removed)", digest.String(r.d))
			return 0, r.err
		}
		r.err = io.EOF
	case err != nil:
		r.err = errkind.IO(errnoOf(err), "reading blob %s", digest.String(r.d))
		return n, r.err
	}
	return n, err
}

// decodingReader decodes a compressed blob's frames, bounded by its size:
// output beyond it, a window beyond MaxWindow, bad frames or fewer bytes
// than its size are corrupt errors naming the digest (after calling bad
// once). Close releases the decoder and closes the file.
type decodingReader struct {
	fr  *frameReader
	dec *zstd.Decoder
	f   *os.File
	d   *repb.Digest
	n   int64
	bad func()
	err error
}

func newDecodingReader(f *os.File, fm form, d *repb.Digest, bad func()) (*decodingReader, error) {
	fr := newFrameReader(f, fm, d, bad)
	dec := decPool.Get().(*zstd.Decoder)
	if err := dec.Reset(fr); err != nil {
		putDecoder(dec)
		if fr.err != nil && !errors.Is(fr.err, io.EOF) {
			return nil, fr.err // a failure to read, or corruption already reported
		}
		bad()
		return nil, cache.Corruptf("corrupt blob %s in local cache: %v (removed)", digest.String(d), err)
	}
	return &decodingReader{fr: fr, dec: dec, f: f, d: d, bad: bad}, nil
}

func (r *decodingReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if rem := r.d.SizeBytes + 1 - r.n; int64(len(p)) > rem {
		p = p[:rem]
	}
	n, err := r.dec.Read(p)
	r.n += int64(n)
	switch {
	case r.n > r.d.SizeBytes:
		r.fail(fmt.Errorf("decodes to more than %d bytes", r.d.SizeBytes))
		return 0, r.err
	case errors.Is(err, io.EOF):
		if r.n != r.d.SizeBytes {
			r.fail(fmt.Errorf("decodes to %d of %d bytes", r.n, r.d.SizeBytes))
			return 0, r.err
		}
		r.err = io.EOF
	case err != nil:
		if r.fr.err != nil && !errors.Is(r.fr.err, io.EOF) {
			r.err = r.fr.err // a failure to read, or corruption already reported
		} else {
			r.fail(err)
		}
		return 0, r.err
	}
	return n, err
}

func (r *decodingReader) fail(cause error) {
	r.bad()
	r.err = cache.Corruptf("corrupt blob %s in local cache: %v (removed)", digest.String(r.d), cause)
}

func (r *decodingReader) Close() error {
	if r.dec != nil {
		putDecoder(r.dec)
		r.dec = nil
	}
	return r.f.Close()
}

// frameStream is ReadCompressed's stream: the frames of a verified blob,
// checked against their hash at the end. Close closes the file.
type frameStream struct {
	*frameReader
	f *os.File
}

func (s *frameStream) Close() error { return s.f.Close() }

// ReadCompressed opens the blob d as it is stored. When compressed is true
// the stream is zstd frames (without the cache's trailer) that this
// process has verified to decode to d's content, once (when it wrote them,
// or here, decoding them before returning); the frames are hashed as they
// are read and checked against the hash recorded when they were verified,
// so the stream ends with a DataLoss error naming d instead of io.EOF
// when a byte differs (and the blob is removed). When compressed is false
// the stream is the raw content, verified as Read verifies it. A missing
// blob is NotFound.
func (c *Cache) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	f, e, size, err := c.openFile(ctx, ns, d)
	if err != nil {
		return nil, false, err
	}
	fm := formOf(f, d, size)
	if !fm.zst {
		rc, err := c.readRaw(f, e, ns, d)
		return rc, false, err
	}
	defer c.unpin(e)
	bad := c.badFunc(e, f)
	c.mu.Lock()
	verified := e.verified
	c.mu.Unlock()
	if !verified {
		if err := c.verifyCompressed(f, fm, ns, d, bad); err != nil {
			f.Close()
			return nil, false, err
		}
		c.setVerified(e)
	}
	return &frameStream{frameReader: newFrameReader(f, fm, d, bad), f: f}, true, nil
}

// VerifiesCompressedReads tells a server that ReadCompressed's compressed
// streams are verified: it passes them on without decoding them.
func (c *Cache) VerifiesCompressedReads() {}

// VerifiesRanges tells a server that ReadRange returns only content
// verified against the digest (a corrupt blob is a DataLoss error and is
// removed), so it may serve a range without hashing the whole blob.
func (c *Cache) VerifiesRanges() {}

// Compression reports whether the cache stores new blobs compressed when
// that shrinks them (Options.Compression).
func (c *Cache) Compression() bool { return c.opts.Compression }

// verifyCompressed decodes the frames of a compressed blob and checks the
// content against d (and the frames against their hash).
func (c *Cache) verifyCompressed(f *os.File, fm form, ns cache.Namespace, d *repb.Digest, bad func()) error {
	v, err := digest.NewVerifier(ns.DigestFunction(), d)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "verifying blob %s: %v", digest.String(d), err)
	}
	dr, err := newDecodingReader(f, fm, d, bad)
	if err != nil {
		return err
	}
	defer func() {
		putDecoder(dr.dec)
		dr.dec = nil
	}()
	bp := copyBufs.Get().(*[]byte)
	_, err = io.CopyBuffer(v, dr, *bp)
	copyBufs.Put(bp)
	if err != nil {
		return err
	}
	if err := v.Check(); err != nil {
		bad()
		return cache.Corruptf("corrupt blob %s in local cache: %v (removed)", digest.String(d), err)
	}
	return nil
}

// badFunc returns a function that removes e's file f as corrupt, once.
func (c *Cache) badFunc(e *entry, f *os.File) func() {
	var once sync.Once
	return func() { once.Do(func() { c.removeCorrupt(e, f) }) }
}

func (c *Cache) setVerified(e *entry) {
	c.mu.Lock()
	e.verified = true
	c.mu.Unlock()
}

// readCompressedPlain is Read of a compressed blob: the decoded content,
// verified against d unless this process has verified the frames already
// (they are then checked against their hash as they are decoded).
func (c *Cache) readCompressedPlain(f *os.File, e *entry, fm form, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	bad := c.badFunc(e, f)
	dr, err := newDecodingReader(f, fm, d, bad)
	if err != nil {
		f.Close()
		return nil, err
	}
	return c.verifiedStream(dr, f, e, ns, d)
}

// openCompressed is Open of a compressed blob: its content is decoded into
// an unnamed file in the scratch directory (zero runs left as holes), read
// by the returned Blob and gone once it is closed. The content is verified
// while it is decoded unless this process has verified the frames (then
// they are checked against their hash).
func (c *Cache) openCompressed(ctx context.Context, f *os.File, e *entry, fm form, ns cache.Namespace, d *repb.Digest) (cache.Blob, error) {
	defer f.Close()
	bad := c.badFunc(e, f)
	c.mu.Lock()
	verified := e.verified
	c.mu.Unlock()
	fail := func(err error) (cache.Blob, error) {
		c.unpin(e)
		return nil, err
	}
	out, err := c.scratchFile()
	if err != nil {
		return fail(errkind.IO(errnoOf(err), "opening blob %s: decoded copy", digest.String(d)))
	}
	dr, err := newDecodingReader(f, fm, d, bad)
	if err != nil {
		out.Close()
		return fail(err)
	}
	var src io.Reader = dr
	var v *digest.Verifier
	if !verified {
		if v, err = digest.NewVerifier(ns.DigestFunction(), d); err != nil {
			putDecoder(dr.dec)
			out.Close()
			return fail(status.Errorf(codes.InvalidArgument, "verifying blob %s: %v", digest.String(d), err))
		}
		src = io.TeeReader(dr, v)
	}
	_, err = copySparse(ctx, out, src, d.SizeBytes)
	putDecoder(dr.dec)
	dr.dec = nil
	if err == nil && v != nil {
		if cerr := v.Check(); cerr != nil {
			bad()
			err = cache.Corruptf("corrupt blob %s in local cache: %v (removed)", digest.String(d), cerr)
		}
	}
	if err != nil {
		out.Close()
		if dr.err != nil && !errors.Is(dr.err, io.EOF) {
			err = dr.err
		}
		if status.Code(err) == codes.Unknown {
			err = errkind.IO(errnoOf(err), "opening blob %s", digest.String(d))
		}
		return fail(err)
	}
	if !verified {
		c.setVerified(e)
	}
	return &blob{f: out, size: d.SizeBytes, c: c, e: e}, nil
}

// scratchFile creates an unnamed file in the scratch directory (a named
// one removed at once where O_TMPFILE is not supported).
func (c *Cache) scratchFile() (*os.File, error) {
	f, err := os.OpenFile(c.TempDir(), os.O_RDWR|unix.O_TMPFILE, 0o600)
	if err == nil {
		return f, nil
	}
	f, err = os.CreateTemp(c.TempDir(), "decoded-*")
	if err != nil {
		return nil, err
	}
	os.Remove(f.Name())
	return f, nil
}
