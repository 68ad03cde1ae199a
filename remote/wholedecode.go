package remote

import (
	"errors"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/zstdio"
)

// Whole-blob decoding: when a compressed read's caller gives a buffer that
// holds the whole blob (a fetch into the local cache does), the frames are
// received whole and decoded straight into that buffer. A streaming
// decoder would decode each block into its own history and copy it out
// again on every Read: for a chunk that is one copy of every byte saved,
// and the history kept up to date is a second.

// maxWholeDecode is the largest blob decoded whole; larger blobs stream.
const maxWholeDecode = 64 << 20

// wholeDecoder decodes whole compressed blobs. DecodeAll is safe for
// concurrent use; the decoder keeps one state per concurrent call.
var wholeDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil, zstd.WithDecoderConcurrency(4), zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxWindow(zstdio.MaxWindow),
		// Output never grows past the caller's buffer: frames that
		// decode to more are an error, however much more they claim.
		zstd.WithDecodeAllCapLimit(true),
		// Every blob is verified against its digest, which a frame
		// checksum cannot add to.
		zstd.IgnoreChecksum(true))
})

// compBufs hold a blob's compressed frames while they are received.
var compBufs = sync.Pool{New: func() any { b := make([]byte, 0, chunkBytes); return &b }}

// decodesWhole reports whether a Read into p should receive and decode
// the rest of the blob at once.
func (r *streamReader) decodesWhole(p []byte) bool {
	return r.compressed && r.off == 0 && !r.whole && r.d.SizeBytes <= maxWholeDecode && int64(len(p)) >= r.d.SizeBytes
}

// readWhole receives the rest of the compressed stream and decodes it into
// p, returning the content's length. A stream error is returned as it is
// (the caller retries from the start); frames that do not decode, or
// decode to more than the blob's size, are Corrupt.
func (r *streamReader) readWhole(p []byte) (int, error) {
	bp := compBufs.Get().(*[]byte)
	defer compBufs.Put(bp)
	// Raw zstd blocks add a few bytes per 128 KiB, frames and a seek
	// index a few more: anything far beyond the blob's size is not it.
	limit := r.d.SizeBytes + r.d.SizeBytes/64 + 64<<10
	comp := (*bp)[:0]
	if int64(cap(comp)) < limit {
		// Once, then the buffer returns to the pool: growing it while
		// receiving would touch fresh memory for every blob.
		comp = make([]byte, 0, limit)
	}
	comp = append(comp, r.buf...)
	r.buf = nil
	for {
		msg, err := r.stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			*bp = comp
			return 0, err
		}
		comp = append(comp, msg.Data...)
		if int64(len(comp)) > limit {
			*bp = comp[:0]
			return 0, cache.Corruptf("blob %s from %s: server sent %d compressed bytes for %d", digest.String(r.d), r.c.target, len(comp), r.d.SizeBytes)
		}
	}
	*bp = comp
	dec, err := wholeDecoder()
	if err != nil {
		return 0, err
	}
	out, err := dec.DecodeAll(comp, p[:0:len(p)])
	if err != nil {
		return 0, cache.Corruptf("blob %s from %s: decompressing: %v", digest.String(r.d), r.c.target, err)
	}
	if int64(len(out)) > r.d.SizeBytes {
		return 0, cache.Corruptf("blob %s from %s: server sent more than %d bytes", digest.String(r.d), r.c.target, r.d.SizeBytes)
	}
	r.whole = true
	if len(out) > 0 && &out[0] != &p[0] { // grown past p: cannot happen within the size
		return copy(p, out), nil
	}
	return len(out), nil
}
