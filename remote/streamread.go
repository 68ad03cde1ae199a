package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// streamReader reads a blob over ByteStream, resuming at the offset reached
// after a retryable error and verifying the content. A compressed read cut
// after some bytes resumes on the uncompressed resource: servers disagree
// on what read_offset means for compressed-blobs (some resend the stream
// from its start), while on blobs it is a plain byte offset.
type streamReader struct {
	c          *Client
	ctx        context.Context
	inst       string
	fn         digest.Function
	d          *repb.Digest
	compressed bool
	v          *digest.Verifier

	cancel  context.CancelFunc
	stream  bspb.ByteStream_ReadClient
	buf     []byte // received, not yet consumed raw bytes
	rawErr  error  // last stream error, seen through the decoder
	openErr error  // the last open failed
	dec     *zstd.Decoder
	off     int64 // content bytes delivered
	whole   bool  // the blob was received and decoded at once (readWhole)
	retries int
	err     error

	codec *readCodec // decodes the responses; nil until the first open
}

// start opens the stream and receives the first message, retrying.
func (r *streamReader) start() error {
	for {
		err := r.open()
		if err == nil {
			var msg *bspb.ReadResponse
			if msg, err = r.stream.Recv(); err == nil {
				r.buf = msg.Data
				return nil
			}
		}
		if !retryable(err) || r.retries >= r.c.opts.MaxRetries {
			return err
		}
		r.retries++
		if err := r.c.backoff(r.ctx, r.retries-1); err != nil {
			return err
		}
	}
}

func (r *streamReader) open() error {
	if r.cancel != nil {
		r.cancel()
	}
	if r.off > 0 {
		r.compressed = false
	}
	ctx, cancel := context.WithTimeout(r.ctx, r.c.streamTimeout(r.d.SizeBytes-r.off))
	r.cancel = cancel
	r.buf, r.rawErr, r.openErr = nil, nil, nil
	name := ReadResourceName(r.inst, r.fn, r.d, r.compressed)
	if r.codec == nil {
		r.codec = newReadCodec()
	}
	stream, err := r.c.reader().Read(ctx, &bspb.ReadRequest{ResourceName: name, ReadOffset: r.off}, grpc.ForceCodecV2(r.codec))
	if err != nil {
		r.openErr = err
		return err
	}
	r.stream = stream
	if r.compressed {
		raw := rawReader{r}
		if r.dec == nil {
			r.dec, err = getDecoder(raw)
		} else {
			err = r.dec.Reset(raw)
		}
		if err != nil {
			r.openErr = cache.Corruptf("zstd: %v", err)
			return r.openErr
		}
	}
	return nil
}

type rawReader struct{ r *streamReader }

func (x rawReader) Read(p []byte) (int, error) {
	r := x.r
	for len(r.buf) == 0 {
		msg, err := r.stream.Recv()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				r.rawErr = err
			}
			return 0, err
		}
		r.buf = msg.Data
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

func (r *streamReader) Read(p []byte) (int, error) {
	for {
		if r.err != nil {
			return 0, r.err
		}
		var n int
		var err error
		if r.openErr != nil {
			err = r.openErr
		} else if r.whole {
			err = io.EOF
		} else if r.decodesWhole(p) {
			n, err = r.readWhole(p)
		} else if r.compressed {
			n, err = r.dec.Read(p)
			if err != nil && !errors.Is(err, io.EOF) && r.rawErr != nil {
				err = r.rawErr
			}
		} else {
			n, err = rawReader{r}.Read(p)
		}
		if n > 0 {
			r.v.Write(p[:n])
			r.off += int64(n)
			if r.off > r.d.SizeBytes {
				r.err = cache.Corruptf("blob %s from %s: server sent more than %d bytes", digest.String(r.d), r.c.target, r.d.SizeBytes)
				return 0, r.err
			}
			return n, nil
		}
		switch {
		case errors.Is(err, io.EOF):
			if cerr := r.v.Check(); cerr != nil {
				r.err = cache.Corruptf("reading from %s: corrupt: %v", r.c.target, cerr)
				return 0, r.err
			}
			r.err = io.EOF
			return 0, io.EOF
		case retryable(err) && r.retries < r.c.opts.MaxRetries:
			r.retries++
			if berr := r.c.backoff(r.ctx, r.retries-1); berr != nil {
				r.err = berr
				continue
			}
			r.open() // a failure is seen by the next read
		case err != nil:
			if status.Code(err) == codes.Unknown {
				err = cache.Corruptf("decompressing: %v", err)
			}
			r.err = fmt.Errorf("reading blob %s from %s at offset %d: %w", digest.String(r.d), r.c.target, r.off, err)
		}
	}
}

func (r *streamReader) Close() error {
	if r.cancel != nil {
		r.cancel()
	}
	if r.dec != nil {
		putDecoder(r.dec)
		r.dec = nil
	}
	if r.codec != nil {
		r.codec.release()
	}
	if r.err == nil {
		r.err = status.Error(codes.FailedPrecondition, "reader closed")
	}
	return nil
}

var copyBufs = sync.Pool{New: func() any { b := make([]byte, chunkBytes); return &b }}

// WriteTo copies the rest of the blob to w in large pieces (io.Copy uses
// it), which keeps hashing and copying efficient whatever w is.
func (r *streamReader) WriteTo(w io.Writer) (int64, error) {
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := *bp
	var total int64
	for {
		n, err := r.Read(buf)
		if n > 0 {
			k, werr := w.Write(buf[:n])
			total += int64(k)
			if werr != nil {
				return total, werr
			}
		}
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}
