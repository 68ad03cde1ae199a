package localcache

import (
	"errors"
	"fmt"
	"io"
	"os"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

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
