package cache

import (
	"context"
	"errors"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/zstdio"
)

// CompressedReader is the part of the Tier contract that lets a server
// answer REAPI compressed-blobs/zstd reads from the bytes a tier stores
// zstd-compressed at rest (each blob that shrinks enough), without
// decoding and re-encoding them.
//
// ReadCompressed opens blob d as it is stored. When compressed is true the
// stream is zstd frames that decode to d's content; the tier has not
// verified them (a digest names the decoded content): a REAPI client
// decodes and verifies what it receives, and a caller that must not pass
// on unverified bytes wraps the stream in NewZstdVerifyingReader. When
// compressed is false the stream is the raw content, verified as Read
// verifies it (a caller wanting zstd encodes it itself). A missing blob is
// NotFound, as for Read.
type CompressedReader interface {
	ReadCompressed(ctx context.Context, ns Namespace, d *repb.Digest) (rc io.ReadCloser, compressed bool, err error)
}

// CompressedWriter is the part of the Tier contract that takes blobs
// already zstd-compressed (a REAPI compressed-blobs/zstd upload): r yields
// zstd frames whose decoded content must be exactly what d names, else the
// error is InvalidArgument and nothing is stored. A tier storing blobs
// compressed (Traits.StoresCompressed) decodes only to verify and stores
// the frames as they are when they are smaller than the content; any other
// stores the decoded content (WriteDecoded).
type CompressedWriter interface {
	WriteCompressed(ctx context.Context, ns Namespace, d *repb.Digest, r io.Reader) error
}

// MaxZstdWindow bounds the window of a zstd frame NewZstdVerifyingReader
// decodes, and so its memory.
const MaxZstdWindow = zstdio.MaxWindow

// NewZstdVerifyingReader passes the zstd stream rc through unchanged while
// decoding it alongside (memory bounded by MaxZstdWindow, output by d's
// size) and verifying the decoded content against d with fn. At the end of
// the stream it returns a DataLoss error naming d instead of io.EOF when
// the stream does not decode to d's content, withholding the bytes of that
// last call. Close closes rc.
func NewZstdVerifyingReader(rc io.ReadCloser, fn digest.Function, d *repb.Digest) (io.ReadCloser, error) {
	v, err := digest.NewVerifier(fn, d)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "verifying blob %s: %v", digest.String(d), err)
	}
	pr, pw := io.Pipe()
	z := &zstdVerifyingReader{rc: rc, pw: pw, d: d, verdict: make(chan error, 1)}
	go func() {
		z.verdict <- decodeVerify(pr, v, d)
		// Unblock a writer still feeding a decoder that stopped early.
		pr.CloseWithError(errDecoderDone)
	}()
	return z, nil
}

var errDecoderDone = errors.New("decoder finished")

func decodeVerify(r io.Reader, v *digest.Verifier, d *repb.Digest) error {
	dec, err := zstdio.NewDecoder(r, zstdio.Window(d.SizeBytes))
	if err != nil {
		return Corruptf("corrupt compressed blob %s: %v", digest.String(d), err)
	}
	defer dec.Close()
	n, err := io.Copy(v, io.LimitReader(dec, d.SizeBytes+1))
	switch {
	case err != nil:
		return Corruptf("corrupt compressed blob %s: %v", digest.String(d), err)
	case n > d.SizeBytes:
		return Corruptf("corrupt compressed blob %s: decodes to more than %d bytes", digest.String(d), d.SizeBytes)
	}
	if err := v.Check(); err != nil {
		return Corruptf("corrupt compressed blob %s: %v", digest.String(d), err)
	}
	return nil
}

type zstdVerifyingReader struct {
	rc      io.ReadCloser
	pw      *io.PipeWriter
	d       *repb.Digest
	verdict chan error
	err     error // sticky terminal error
}

func (z *zstdVerifyingReader) Read(p []byte) (int, error) {
	if z.err != nil {
		return 0, z.err
	}
	n, err := z.rc.Read(p)
	if n > 0 {
		if _, werr := z.pw.Write(p[:n]); werr != nil {
			// The decoder stopped before the stream ended: it failed, or
			// the content ended before the stream did.
			z.err = <-z.verdict
			if z.err == nil || !errors.Is(werr, errDecoderDone) {
				z.err = Corruptf("corrupt compressed blob %s: data after the end of the content", digest.String(z.d))
			}
			return 0, z.err
		}
	}
	switch {
	case errors.Is(err, io.EOF):
		z.pw.Close()
		if verr := <-z.verdict; verr != nil {
			z.err = verr
			return 0, verr
		}
		z.err = io.EOF
	case err != nil:
		z.err = err
		z.pw.CloseWithError(err)
	}
	return n, err
}

func (z *zstdVerifyingReader) Close() error {
	z.pw.CloseWithError(io.ErrClosedPipe)
	return z.rc.Close()
}
