package server

import (
	"context"
	"errors"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/zstdio"
)

// compressedLimit is the most zstd data an upload of d may send.
func compressedLimit(d *repb.Digest) int64 { return d.SizeBytes + d.SizeBytes/8 + 64<<10 }

// receiveCompressed decodes a zstd upload as its messages arrive and
// returns the compressed bytes received. With frames false the decoded
// content goes into u (and is verified by commit); with frames true u
// holds the compressed bytes as received and the decoded content is only
// hashed, and verified here. Decoding stops as soon as the output exceeds
// the claimed size (a zstd bomb never gets further).
func (s *Server) receiveCompressed(ctx context.Context, rx *receiver, name string, fn digest.Function, d *repb.Digest, u *upload, first *bspb.WriteRequest, frames bool) (int64, error) {
	if err := u.truncate(0); err != nil {
		return 0, s.ioErr(err, "truncating an upload")
	}
	rr := &reqReader{ctx: ctx, rx: rx, name: name, next: first, limit: compressedLimit(d), m: s.m}
	var in io.Reader = rr
	var v *digest.Verifier
	if frames {
		var err error
		if v, err = digest.NewVerifier(fn, d); err != nil {
			return 0, status.Error(codes.InvalidArgument, err.Error())
		}
		in = io.TeeReader(rr, frameWriter{u})
	}
	dec, err := zstdio.NewDecoder(in, maxDecoderWindow)
	if err != nil {
		return 0, errkind.New(errkind.Internal, "starting a zstd decoder: %w", err)
	}
	defer dec.Close()
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var decoded int64
	for {
		n, err := dec.Read(buf)
		if n > 0 {
			if decoded+int64(n) > d.SizeBytes {
				return rr.n, status.Errorf(codes.InvalidArgument, "zstd data decodes to more than its %d bytes", d.SizeBytes)
			}
			decoded += int64(n)
			if frames {
				v.Write(buf[:n])
			} else if werr := u.write(buf[:n]); werr != nil {
				return rr.n, s.ioErr(werr, "storing upload data")
			}
		}
		if errors.Is(err, io.EOF) {
			if frames {
				if decoded != d.SizeBytes {
					return rr.n, status.Errorf(codes.InvalidArgument, "got %d bytes, digest says %d", decoded, d.SizeBytes)
				}
				if err := v.Check(); err != nil {
					return rr.n, status.Errorf(codes.InvalidArgument, "data does not match its digest: %v", err)
				}
				if err := u.werr; err != nil {
					return rr.n, s.ioErr(err, "storing upload data")
				}
			}
			return rr.n, nil
		}
		if err != nil {
			if rr.err != nil {
				if errors.Is(rr.err, io.EOF) {
					return rr.n, status.Errorf(codes.InvalidArgument, "stream closed after %d compressed bytes without finish_write", rr.n)
				}
				return rr.n, rr.err
			}
			return rr.n, status.Errorf(codes.InvalidArgument, "bad zstd data after %d compressed bytes: %v", rr.n, err)
		}
	}
}

// frameWriter appends a compressed upload's bytes to its file.
type frameWriter struct{ u *upload }

func (w frameWriter) Write(p []byte) (int, error) {
	u := w.u
	if u.werr != nil {
		return len(p), nil
	}
	if _, err := u.f.WriteAt(p, u.size); err != nil {
		u.werr = err
		return len(p), nil
	}
	u.size += int64(len(p))
	u.seen.Store(u.size)
	return len(p), nil
}

// reqReader reads the data of a compressed upload's messages.
type reqReader struct {
	ctx      context.Context
	rx       *receiver
	name     string
	next     *bspb.WriteRequest // received, not yet consumed
	buf      []byte
	n        int64 // compressed bytes received
	limit    int64
	finished bool
	err      error
	m        *metrics
}

func (r *reqReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		if r.finished {
			return 0, io.EOF
		}
		req := r.next
		r.next = nil
		if req == nil {
			var err error
			if req, err = r.rx.next(r.ctx); err != nil {
				r.err = err
				return 0, err
			}
			if req.ResourceName != "" && req.ResourceName != r.name {
				r.err = status.Error(codes.InvalidArgument, "resource name changed mid-stream")
				return 0, r.err
			}
		}
		if req.WriteOffset != r.n {
			r.err = status.Errorf(codes.InvalidArgument, "write_offset %d, expected %d", req.WriteOffset, r.n)
			return 0, r.err
		}
		if r.n+int64(len(req.Data)) > r.limit {
			r.err = status.Errorf(codes.InvalidArgument, "more than %d compressed bytes sent", r.limit)
			return 0, r.err
		}
		if int64(len(req.Data)) > chunkBytes*4 {
			// Compressed messages are not charged beyond chunkBytes each:
			// a client sending more per message is refused.
			r.err = status.Errorf(codes.InvalidArgument, "a compressed upload message of %d bytes; at most %d per message", len(req.Data), chunkBytes*4)
			return 0, r.err
		}
		r.n += int64(len(req.Data))
		r.m.in(len(req.Data))
		r.buf = req.Data
		r.finished = req.FinishWrite
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}
