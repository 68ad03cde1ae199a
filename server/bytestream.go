package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/zstdio"
)

// chunkBytes is the payload size of each ByteStream read response.
const chunkBytes = 1 << 20

// readCharge is what one ByteStream read holds, charged to the read memory
// budget: the copy buffer, the message being filled, and its encoding in
// the transport.
const readCharge = 3 * chunkBytes

var bufPool = sync.Pool{New: func() any { b := make([]byte, chunkBytes); return &b }}

var encPool = sync.Pool{New: func() any { return zstdio.NewEncoder() }}

// Read streams a blob, optionally zstd-compressed. The server verifies the
// whole blob as it streams it and holds back the last message until it is
// verified: a blob corrupted at rest is never served whole, the read fails
// with a DataLoss error naming its digest, and the blob is dropped from
// the backend so that FindMissingBlobs reports it missing and a client's
// re-upload repairs it.
//
// A compressed-blobs read of a whole blob that the backend stores
// compressed is answered with the stored frames as they are (no decoding
// and re-encoding): they are verified by the backend as they are read when
// it vouches for them (the local cache checks them against the hash it
// recorded when it verified them), else decoded alongside and the content
// hashed. Other compressed reads encode the content.
func (s *Server) Read(req *bspb.ReadRequest, stream bspb.ByteStream_ReadServer) (err error) {
	defer s.m.observe("Read", time.Now(), &err)
	ctx := stream.Context()
	r, err := parseRead(req.ResourceName)
	if err != nil {
		return err
	}
	ns, _, err := s.namespace(ctx, r.instance, r.fn)
	if err != nil {
		return err
	}
	d := r.d
	if req.ReadOffset < 0 || req.ReadOffset > d.SizeBytes || req.ReadLimit < 0 {
		return status.Errorf(codes.OutOfRange, "blob %s: read offset %d limit %d out of range", digest.String(d), req.ReadOffset, req.ReadLimit)
	}
	if r.compressed && req.ReadLimit != 0 {
		return status.Errorf(codes.InvalidArgument, "blob %s: read_limit must be 0 for compressed-blobs", digest.String(d))
	}
	n := d.SizeBytes - req.ReadOffset
	if req.ReadLimit > 0 && req.ReadLimit < n {
		n = req.ReadLimit
	}
	release, err := s.readMem.acquire(ctx, readCharge, s.opts.IdleTimeout, fmt.Sprintf("reading blob %s", digest.String(d)))
	if err != nil {
		return err
	}
	defer release()
	out := &chunkSender{stream: stream, m: s.m}
	defer out.free()
	var vr *verifiedReader
	var src io.Reader = eofReader{}
	if d.SizeBytes > 0 {
		var rc io.ReadCloser
		if r.compressed && req.ReadOffset == 0 {
			// A backend that stores blobs compressed hands over its frames.
			var zst bool
			if rc, zst, err = s.backend.ReadCompressed(ctx, ns, d); err != nil {
				return fmt.Errorf("reading blob %s: %w", digest.String(d), err)
			}
			if zst {
				return s.sendStored(ctx, ns, d, rc, out)
			}
		} else if rc, err = s.openRead(ctx, ns, d, req.ReadOffset, n); err != nil {
			return s.readFailed(ctx, ns, d, req.ReadOffset, err)
		}
		defer rc.Close()
		if s.ranged(d, req.ReadOffset, n) {
			src = rc
		} else {
			if vr, err = newVerifiedReader(ns.Function, d, rc); err != nil {
				return err
			}
			if req.ReadOffset > 0 {
				if _, err := copyBuffered(io.Discard, io.LimitReader(vr, req.ReadOffset)); err != nil {
					return s.readFailed(ctx, ns, d, req.ReadOffset, err)
				}
			}
			src = io.LimitReader(vr, n)
		}
	}
	if r.compressed {
		enc := encPool.Get().(*zstd.Encoder)
		enc.Reset(out)
		if n > 128<<10 {
			// Compress and send a small first part before the bulk.
			_, err = io.CopyN(enc, src, 128<<10)
			if err == nil {
				err = enc.Flush()
			}
			if err == nil {
				err = out.flush()
			}
		}
		if err == nil {
			_, err = copyBuffered(enc, src)
		}
		if cerr := enc.Close(); err == nil {
			err = cerr
		}
		enc.Reset(nil)
		encPool.Put(enc)
	} else {
		_, err = copyBuffered(out, src)
	}
	if err == nil && vr != nil {
		// Hash the rest of the blob too, then check it.
		err = vr.finish()
	}
	if err != nil {
		var se *sendError
		if errors.As(err, &se) {
			return fmt.Errorf("reading blob %s at offset %d: %w", digest.String(d), req.ReadOffset, se.err)
		}
		return s.readFailed(ctx, ns, d, req.ReadOffset, err)
	}
	if err := out.flush(); err != nil {
		return fmt.Errorf("reading blob %s at offset %d: %w", digest.String(d), req.ReadOffset, err)
	}
	return nil
}

// sendStored sends the stored zstd frames rc of d, verified (see Read),
// and closes rc.
func (s *Server) sendStored(ctx context.Context, ns cache.Namespace, d *repb.Digest, rc io.ReadCloser, out *chunkSender) error {
	// Frames a backend checks as they are read pass on without decoding;
	// others are decoded alongside and the content hashed.
	if !s.backend.Traits().VerifiesCompressedReads {
		vr, err := cache.NewZstdVerifyingReader(rc, ns.Function, d)
		if err != nil {
			rc.Close()
			return err
		}
		rc = vr
	}
	defer rc.Close()
	s.m.storedCompressed.Inc()
	_, err := copyBuffered(out, rc)
	if err == nil {
		err = out.flush()
		if err != nil {
			err = &sendError{err}
		}
	}
	var se *sendError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &se):
		return fmt.Errorf("reading blob %s: %w", digest.String(d), se.err)
	case cache.IsCorrupt(err):
		s.dropCorrupt(ctx, ns, d, err)
		return corruptOnServer(d, err)
	}
	return fmt.Errorf("reading blob %s: %w", digest.String(d), err)
}

// ranged reports whether a read of n bytes of d from off is answered from
// the range alone: a part of the blob, from a backend that verifies ranges
// itself. A whole blob is always hashed by the server as it is sent, so
// that one corrupted at rest is never served whole (even when the backend
// already verified it once); a client checks a range it reads against the
// chunk's outboard, and falls back to the whole blob if it does not match.
func (s *Server) ranged(d *repb.Digest, off, n int64) bool {
	return s.backend.Traits().VerifiesRanges && (off > 0 || n < d.SizeBytes)
}

// openRead opens the content of d for a read of n bytes from off: the
// range alone when ranged, else the whole blob from its start.
func (s *Server) openRead(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	if s.ranged(d, off, n) {
		return s.backend.ReadRange(ctx, ns, d, off, n)
	}
	return s.backend.Read(ctx, ns, d)
}

// readFailed turns an error reading d from the backend into the call's
// error, dropping d from the backend when its content is corrupt.
func (s *Server) readFailed(ctx context.Context, ns cache.Namespace, d *repb.Digest, off int64, err error) error {
	if cache.IsCorrupt(err) {
		s.dropCorrupt(ctx, ns, d, err)
		return corruptOnServer(d, err)
	}
	if errors.Is(err, errCorrupt) {
		s.dropCorrupt(ctx, ns, d, err)
		return corruptOnServer(d, errors.Unwrap(err))
	}
	return fmt.Errorf("reading blob %s at offset %d: %w", digest.String(d), off, err)
}

// dropCorrupt removes d from the backend after a read found it corrupt.
func (s *Server) dropCorrupt(ctx context.Context, ns cache.Namespace, d *repb.Digest, cause error) {
	s.m.corrupt.Inc()
	s.log.Warn("dropping a corrupt blob", "digest", digest.String(d), "err", cause)
	if err := s.backend.Discard(context.WithoutCancel(ctx), ns, d); err != nil {
		s.log.Error("dropping a corrupt blob", "digest", digest.String(d), "err", err)
	}
}

// readVerified reads a whole blob from the backend and checks its digest,
// dropping it when it is corrupt.
func (s *Server) readVerified(ctx context.Context, ns cache.Namespace, d *repb.Digest) ([]byte, error) {
	b, err := cache.ReadAll(ctx, s.backend, ns, d)
	if err != nil {
		return nil, err
	}
	if got := digest.Compute(ns.Function, b); !digest.Equal(got, d) {
		cause := fmt.Errorf("content is %s", digest.String(got))
		s.dropCorrupt(ctx, ns, d, cause)
		return nil, corruptOnServer(d, cause)
	}
	return b, nil
}

var errCorrupt = errors.New("corrupt")

// corruptOnServer is the DataLoss error a client gets for a blob that
// failed verification on the server (and was dropped there).
func corruptOnServer(d *repb.Digest, cause error) error {
	return errkind.DataLossf("blob %s is corrupt on the server (%s); it was dropped: upload it again", digest.String(d), errkind.Text(cause))
}

// sendError is a failure to send to the client (not the backend's).
type sendError struct{ err error }

func (e *sendError) Error() string { return e.err.Error() }
func (e *sendError) Unwrap() error { return e.err }

// verifiedReader hashes a blob as it is read; finish reads and hashes
// what is left and checks the digest. Errors that mean "the stored content
// is wrong" wrap errCorrupt.
type verifiedReader struct {
	v *digest.Verifier
	d *repb.Digest
	r io.Reader
	n int64
}

func newVerifiedReader(fn digest.Function, d *repb.Digest, r io.Reader) (*verifiedReader, error) {
	v, err := digest.NewVerifier(fn, d)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "blob %s: %v", digest.String(d), err)
	}
	return &verifiedReader{v: v, d: d, r: r}, nil
}

func (v *verifiedReader) Read(p []byte) (int, error) {
	if rem := v.d.SizeBytes + 1 - v.n; int64(len(p)) > rem {
		p = p[:rem]
	}
	n, err := v.r.Read(p)
	v.n += int64(n)
	v.v.Write(p[:n])
	if v.n > v.d.SizeBytes {
		return 0, fmt.Errorf("%w: longer than %d bytes", errCorrupt, v.d.SizeBytes)
	}
	if errors.Is(err, io.EOF) && v.n < v.d.SizeBytes {
		return n, fmt.Errorf("%w: only %d of %d bytes", errCorrupt, v.n, v.d.SizeBytes)
	}
	return n, err
}

func (v *verifiedReader) finish() error {
	if _, err := copyBuffered(io.Discard, v); err != nil {
		return err
	}
	if err := v.v.Check(); err != nil {
		return fmt.Errorf("%w: %v", errCorrupt, err)
	}
	return nil
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

func copyBuffered(w io.Writer, r io.Reader) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	return io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{r}, *bp)
}

// chunkSender turns writes into ReadResponses of at most chunkBytes. The
// first message is small so that the reader gets going sooner; a full
// buffer is sent only when more data follows, so the last message waits
// for the final flush (after verification).
type chunkSender struct {
	stream bspb.ByteStream_ReadServer
	m      *metrics
	buf    []byte
	sent   bool
}

func (c *chunkSender) limit() int {
	if !c.sent {
		return 64 << 10
	}
	return chunkBytes
}

func (c *chunkSender) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if c.buf == nil {
			c.buf = (*bufPool.Get().(*[]byte))[:0]
		}
		if len(c.buf) >= c.limit() {
			if err := c.flush(); err != nil {
				return 0, &sendError{err}
			}
		}
		k := min(len(p), c.limit()-len(c.buf))
		c.buf = append(c.buf, p[:k]...)
		p = p[k:]
	}
	return n, nil
}

// free returns the message buffer to the pool once the read is over.
func (c *chunkSender) free() {
	if c.buf != nil {
		b := c.buf[:cap(c.buf)]
		bufPool.Put(&b)
		c.buf = nil
	}
}

func (c *chunkSender) flush() error {
	if len(c.buf) == 0 {
		return nil
	}
	err := c.stream.Send(&bspb.ReadResponse{Data: c.buf})
	c.sent = true
	c.m.out(len(c.buf))
	c.buf = c.buf[:0]
	return err
}
