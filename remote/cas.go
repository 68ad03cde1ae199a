package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

const (
	// chunkBytes is the payload of each ByteStream write request.
	chunkBytes = 1 << 20
	// batchOverhead is left in a batch call for the envelope.
	batchOverhead = 4 << 10
	// maxBuffered is the largest blob read into memory to make an upload
	// resumable (or to compress it) when its reader cannot seek.
	maxBuffered = 64 << 20
	// maxDecoderWindow bounds a zstd decoder's memory.
	maxDecoderWindow = 64 << 20
)

var encoder = func() *zstd.Encoder {
	e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		panic(err)
	}
	return e
}()

var decPool sync.Pool

func getDecoder(r io.Reader) (*zstd.Decoder, error) {
	if d, ok := decPool.Get().(*zstd.Decoder); ok {
		if err := d.Reset(r); err == nil {
			return d, nil
		}
		d.Close()
	}
	return zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxDecoderWindow))
}

func putDecoder(d *zstd.Decoder) {
	d.Reset(nil)
	decPool.Put(d)
}

// blobPath is "blobs/{fn/}{hash}/{size}" or its compressed-blobs form.
func blobPath(fn digest.Function, d *repb.Digest, compressed bool) string {
	p := "blobs/"
	if compressed {
		p = "compressed-blobs/zstd/"
	}
	if fn != digest.SHA256 {
		p += digest.FunctionName(fn) + "/"
	}
	return p + d.Hash + "/" + strconv.FormatInt(d.SizeBytes, 10)
}

func withInstance(inst, p string) string {
	if inst == "" {
		return p
	}
	return inst + "/" + p
}

// ReadResourceName is the ByteStream resource name for reading d.
func ReadResourceName(instance string, fn digest.Function, d *repb.Digest, compressed bool) string {
	return withInstance(instance, blobPath(fn, d, compressed))
}

// WriteResourceName is the ByteStream resource name for uploading d.
func WriteResourceName(instance, uuid string, fn digest.Function, d *repb.Digest, compressed bool) string {
	return withInstance(instance, "uploads/"+uuid+"/"+blobPath(fn, d, compressed))
}

func checkDigest(d *repb.Digest) error {
	if err := digest.Validate(d); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	return nil
}

// streamTimeout is the deadline of one ByteStream call moving n bytes:
// CallTimeout plus a second per 8 MiB, so that large blobs on slow links
// are not cut off.
func (c *Client) streamTimeout(n int64) time.Duration {
	return c.opts.CallTimeout + time.Duration(n>>23)*time.Second
}

// maxBatchedBlob is the largest single blob sent or fetched with a batch
// call; larger ones stream through ByteStream, whose first bytes arrive
// sooner and which keeps no whole-blob message in memory (measured on
// loopback with 4 MB chunks: ByteStream ~1.8x the throughput of a batch
// call and a tenth of its time to first byte).
const maxBatchedBlob = 1 << 20

// batchable reports whether a blob of n bytes goes through a batch call.
func (c *Client) batchable(n int64) bool {
	return n <= maxBatchedBlob && n+batchOverhead <= c.maxBatch
}

// FindMissing returns the digests the server lacks, in batches of at most
// FindMissingBatch digests per call. The empty blob is never missing.
func (c *Client) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	inst, fn, err := c.ns(ns)
	if err != nil {
		return nil, err
	}
	want := make([]*repb.Digest, 0, len(ds))
	for _, d := range ds {
		if err := checkDigest(d); err != nil {
			return nil, err
		}
		if d.SizeBytes > 0 {
			want = append(want, d)
		}
	}
	var missing []*repb.Digest
	for len(want) > 0 {
		batch := want[:min(len(want), c.opts.FindMissingBatch)]
		want = want[len(batch):]
		var resp *repb.FindMissingBlobsResponse
		err := c.retry(ctx, func(ctx context.Context) (err error) {
			resp, err = c.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{InstanceName: inst, BlobDigests: batch, DigestFunction: fn})
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("finding missing blobs among %d (first %s) on %s: %w", len(batch), digest.String(batch[0]), c.target, err)
		}
		missing = append(missing, resp.MissingBlobDigests...)
	}
	return missing, nil
}

// VerifiesReads tells cache.Verifying that Read already verifies.
func (c *Client) VerifiesReads() {}

// Read opens a blob; its content is verified against d as it is read (a
// mismatch is a DataLoss error at the end). A missing blob is NotFound.
func (c *Client) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	inst, fn, err := c.ns(ns)
	if err != nil {
		return nil, err
	}
	if err := checkDigest(d); err != nil {
		return nil, err
	}
	if d.SizeBytes == 0 {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	if c.batchable(d.SizeBytes) {
		b, err := c.batchRead(ctx, inst, fn, d)
		if err != nil {
			return nil, fmt.Errorf("reading blob %s from %s: %w", digest.String(d), c.target, err)
		}
		return io.NopCloser(bytes.NewReader(b)), nil
	}
	v, err := digest.NewVerifier(fn, d)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	sr := &streamReader{c: c, ctx: ctx, inst: inst, fn: fn, d: d, compressed: c.zstd, v: v}
	if err := sr.start(); err != nil {
		sr.Close()
		return nil, fmt.Errorf("reading blob %s from %s: %w", digest.String(d), c.target, err)
	}
	return sr, nil
}

func (c *Client) batchRead(ctx context.Context, inst string, fn digest.Function, d *repb.Digest) ([]byte, error) {
	var resp *repb.BatchReadBlobsResponse
	err := c.retry(ctx, func(ctx context.Context) error {
		var err error
		resp, err = c.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{InstanceName: inst, Digests: []*repb.Digest{d}, DigestFunction: fn})
		if err != nil {
			return err
		}
		if len(resp.Responses) != 1 {
			return status.Errorf(codes.Internal, "server returned %d responses for one digest", len(resp.Responses))
		}
		return status.ErrorProto(resp.Responses[0].Status)
	})
	if err != nil {
		return nil, err
	}
	r := resp.Responses[0]
	data := r.Data
	switch r.Compressor {
	case repb.Compressor_IDENTITY:
	case repb.Compressor_ZSTD:
		data, err = decodeAll(data, d.SizeBytes)
		if err != nil {
			return nil, cache.Corruptf("decompressing: %v", err)
		}
	default:
		return nil, status.Errorf(codes.Internal, "server used compressor %v, which was not asked for", r.Compressor)
	}
	if got := digest.Compute(fn, data); !digest.Equal(got, d) {
		return nil, cache.Corruptf("data is %s: corrupt", digest.String(got))
	}
	return data, nil
}

// decodeAll decodes a zstd blob of size bytes. The output is bounded by
// the size, never by the frames' claims: data that decodes to more is an
// error as soon as it does (a zstd bomb allocates nothing more). Windows
// up to maxDecoderWindow are accepted whatever the size.
func decodeAll(data []byte, size int64) ([]byte, error) {
	dec, err := getDecoder(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	defer putDecoder(dec)
	out := make([]byte, size+1)
	n, err := io.ReadFull(dec, out)
	switch {
	case err == nil:
		return nil, fmt.Errorf("zstd data decodes to more than %d bytes", size)
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF):
		return out[:n], nil
	}
	return nil, err
}

// streamReader reads a blob over ByteStream, resuming at the offset reached
// after a retryable error and verifying the content.
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
	retries int
	err     error
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
	ctx, cancel := context.WithTimeout(r.ctx, r.c.streamTimeout(r.d.SizeBytes-r.off))
	r.cancel = cancel
	r.buf, r.rawErr, r.openErr = nil, nil, nil
	name := ReadResourceName(r.inst, r.fn, r.d, r.compressed)
	stream, err := r.c.reader().Read(ctx, &bspb.ReadRequest{ResourceName: name, ReadOffset: r.off})
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
	if r.err == nil {
		r.err = status.Error(codes.FailedPrecondition, "reader closed")
	}
	return nil
}

// readExact reads exactly n bytes from r and checks r has no more.
func readExact(d *repb.Digest, r io.Reader) ([]byte, error) {
	b := make([]byte, d.SizeBytes)
	if n, err := io.ReadFull(r, b); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return nil, status.Errorf(codes.InvalidArgument, "blob %s: reader yields only %d bytes", digest.String(d), n)
		}
		return nil, fmt.Errorf("reading blob %s to upload: %w", digest.String(d), err)
	}
	if err := checkEnd(d, r); err != nil {
		return nil, err
	}
	return b, nil
}

func checkEnd(d *repb.Digest, r io.Reader) error {
	var one [1]byte
	if n, _ := io.ReadFull(r, one[:]); n > 0 {
		return status.Errorf(codes.InvalidArgument, "blob %s: reader yields more than %d bytes", digest.String(d), d.SizeBytes)
	}
	return nil
}

// Write uploads a blob: small ones in a batch call, large ones over
// ByteStream (zstd-compressed when offered), resuming an interrupted
// upload where the server's QueryWriteStatus says it stopped.
func (c *Client) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	inst, fn, err := c.ns(ns)
	if err != nil {
		return err
	}
	if err := checkDigest(d); err != nil {
		return err
	}
	if d.SizeBytes == 0 {
		return checkEnd(d, r)
	}
	if c.batchable(d.SizeBytes) {
		data, err := readExact(d, r)
		if err != nil {
			return err
		}
		err = c.retry(ctx, func(ctx context.Context) error {
			resp, err := c.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{
				InstanceName:   inst,
				Requests:       []*repb.BatchUpdateBlobsRequest_Request{{Digest: d, Data: data}},
				DigestFunction: fn,
			})
			if err != nil {
				return err
			}
			if len(resp.Responses) != 1 {
				return status.Errorf(codes.Internal, "server returned %d responses for one blob", len(resp.Responses))
			}
			return status.ErrorProto(resp.Responses[0].Status)
		})
		if err != nil {
			return fmt.Errorf("writing blob %s to %s: %w", digest.String(d), c.target, err)
		}
		return nil
	}
	if err := c.writeStream(ctx, inst, fn, d, r); err != nil {
		return fmt.Errorf("writing blob %s to %s: %w", digest.String(d), c.target, err)
	}
	return nil
}

// upload is what a ByteStream write sends.
type upload struct {
	data       []byte        // whole payload in memory, or
	rs         io.ReadSeeker // a seekable source starting at base, or
	r          io.Reader     // a one-shot source
	base       int64
	total      int64 // payload bytes
	compressed bool
}

func (c *Client) writeStream(ctx context.Context, inst string, fn digest.Function, d *repb.Digest, r io.Reader) error {
	u := &upload{total: d.SizeBytes}
	rs, seekable := r.(io.ReadSeeker)
	switch {
	case (c.zstd || !seekable) && d.SizeBytes <= maxBuffered:
		data, err := readExact(d, r)
		if err != nil {
			return err
		}
		if c.zstd {
			data = encoder.EncodeAll(data, make([]byte, 0, len(data)/2))
			u.compressed = true
		}
		u.data, u.total = data, int64(len(data))
	case seekable:
		base, err := rs.Seek(0, io.SeekCurrent)
		if err != nil {
			return fmt.Errorf("seeking source: %w", err)
		}
		u.rs, u.base = rs, base
	default:
		u.r = r
	}
	id := newUUID()
	var off int64
	for attempt := 0; ; attempt++ {
		name := WriteResourceName(inst, id, fn, d, u.compressed)
		err := c.writeOnce(ctx, name, d, u, off)
		if err == nil {
			return nil
		}
		if !retryable(err) || attempt >= c.opts.MaxRetries || u.r != nil {
			return err
		}
		if err := c.backoff(ctx, attempt); err != nil {
			return err
		}
		if u.compressed {
			// Compressed uploads restart from the beginning.
			id, off = newUUID(), 0
			continue
		}
		var q *bspb.QueryWriteStatusResponse
		qerr := c.retry(ctx, func(ctx context.Context) (err error) {
			q, err = c.bs.QueryWriteStatus(ctx, &bspb.QueryWriteStatusRequest{ResourceName: name})
			return err
		})
		switch {
		case qerr == nil && q.Complete:
			return nil
		case qerr == nil && q.CommittedSize >= 0 && q.CommittedSize <= u.total:
			off = q.CommittedSize
		default:
			off = 0
		}
	}
}

// writeOnce sends u from off in one Write call.
func (c *Client) writeOnce(ctx context.Context, name string, d *repb.Digest, u *upload, off int64) error {
	ctx, cancel := context.WithTimeout(ctx, c.streamTimeout(u.total-off))
	defer cancel()
	if u.rs != nil {
		if _, err := u.rs.Seek(u.base+off, io.SeekStart); err != nil {
			return fmt.Errorf("seeking source to %d: %w", off, err)
		}
	}
	stream, err := c.bs.Write(ctx)
	if err != nil {
		return err
	}
	pos := off
	var buf []byte
	if u.data == nil {
		// Reused: gRPC encodes a message before Send returns.
		buf = make([]byte, min(u.total, chunkBytes))
	}
	for first := true; pos < u.total || first; first = false {
		n := min(u.total-pos, chunkBytes)
		var chunk []byte
		if u.data != nil {
			chunk = u.data[pos : pos+n]
		} else {
			chunk = buf[:n]
			src := u.r
			if u.rs != nil {
				src = u.rs
			}
			if k, err := io.ReadFull(src, chunk); err != nil {
				stream.CloseSend()
				if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
					return status.Errorf(codes.InvalidArgument, "blob %s: reader yields only %d bytes", digest.String(d), pos+int64(k))
				}
				return fmt.Errorf("reading source at %d: %w", pos, err)
			}
			if pos+n == u.total {
				if err := checkEnd(d, src); err != nil {
					stream.CloseSend()
					return err
				}
			}
		}
		req := &bspb.WriteRequest{WriteOffset: pos, Data: chunk, FinishWrite: pos+n == u.total}
		if first {
			req.ResourceName = name
		}
		if err := stream.Send(req); err != nil {
			if errors.Is(err, io.EOF) {
				break // the server ended the call; its status follows
			}
			return err
		}
		pos += n
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return err
	}
	if cs := resp.CommittedSize; cs != d.SizeBytes && !(u.compressed && (cs == -1 || cs == u.total)) {
		return status.Errorf(codes.Internal, "server committed %d bytes of %d", cs, u.total)
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

// ReadRange reads n bytes of blob d from off (fewer at its end) with one
// ByteStream read (read_offset, read_limit) of the uncompressed resource,
// retrying. The bytes are not verified: the caller checks them (see
// cache.RangeReader).
func (c *Client) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	inst, fn, err := c.ns(ns)
	if err != nil {
		return nil, err
	}
	if err := checkDigest(d); err != nil {
		return nil, err
	}
	if off < 0 || n <= 0 || off >= d.SizeBytes {
		return nil, status.Errorf(codes.InvalidArgument, "reading blob %s at offset %d, %d bytes: outside its %d bytes", digest.String(d), off, n, d.SizeBytes)
	}
	n = min(n, d.SizeBytes-off)
	buf := make([]byte, 0, n)
	err = c.retry(ctx, func(ctx context.Context) error {
		buf = buf[:0]
		stream, err := c.reader().Read(ctx, &bspb.ReadRequest{ResourceName: ReadResourceName(inst, fn, d, false), ReadOffset: off, ReadLimit: n})
		if err != nil {
			return err
		}
		for {
			msg, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
			if int64(len(buf)+len(msg.Data)) > n {
				return cache.Corruptf("server sent more than the %d bytes asked for", n)
			}
			buf = append(buf, msg.Data...)
			if int64(len(buf)) == n {
				// Done: the server may still be checking the rest of
				// the blob, which this read does not wait for.
				return nil
			}
		}
	})
	if err != nil {
		return nil, fmt.Errorf("reading blob %s at [%d, %d) from %s: %w", digest.String(d), off, off+n, c.target, err)
	}
	return io.NopCloser(bytes.NewReader(buf)), nil
}
