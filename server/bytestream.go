package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// chunkBytes is the payload size of each ByteStream read response.
const chunkBytes = 1 << 20

var bufPool = sync.Pool{New: func() any { b := make([]byte, chunkBytes); return &b }}

var encPool = sync.Pool{New: func() any {
	e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		panic(err)
	}
	return e
}}

// maxDecoderWindow bounds the memory a hostile zstd stream can make a
// decoder allocate.
const maxDecoderWindow = 64 << 20

// Read streams a blob, optionally zstd-compressed.
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
	var src io.Reader
	if d.SizeBytes > 0 {
		rc, err := s.open(ctx, ns, r, req.ReadOffset)
		if err != nil {
			return fmt.Errorf("reading blob %s at offset %d: %w", digest.String(d), req.ReadOffset, err)
		}
		defer rc.Close()
		src = io.LimitReader(rc, n)
	} else {
		src = eofReader{}
	}
	out := &chunkSender{stream: stream, m: s.m}
	if r.compressed {
		enc := encPool.Get().(*zstd.Encoder)
		enc.Reset(out)
		// Compress and send a small first part before the bulk.
		_, err = io.CopyN(enc, src, 128<<10)
		if err == nil {
			err = enc.Flush()
		}
		if err == nil {
			err = out.flush()
		}
		if err == nil || errors.Is(err, io.EOF) {
			_, err = copyBuffered(enc, src)
		}
		if cerr := enc.Close(); err == nil {
			err = cerr
		}
		enc.Reset(nil)
		encPool.Put(enc)
		if err == nil {
			err = out.flush()
		}
	} else {
		err = sendChunks(stream, src, s.m)
	}
	if err != nil {
		return fmt.Errorf("reading blob %s at offset %d: %w", digest.String(d), req.ReadOffset, err)
	}
	return nil
}

// sendChunks sends src in messages of up to chunkBytes, read straight into
// a reused buffer: gRPC encodes a message before Send returns.
func sendChunks(stream bspb.ByteStream_ReadServer, src io.Reader, m *metrics) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	// A small first message gets the first bytes to the reader sooner.
	first := 64 << 10
	for {
		n, err := io.ReadFull(src, buf[:min(first, len(buf))])
		first = len(buf)
		if n > 0 {
			if serr := stream.Send(&bspb.ReadResponse{Data: buf[:n]}); serr != nil {
				return serr
			}
			m.out(n)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

func copyBuffered(w io.Writer, r io.Reader) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	return io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{r}, *bp)
}

// open returns the blob positioned at off, using random access when the
// backend offers it.
func (s *Server) open(ctx context.Context, ns cache.Namespace, r *resource, off int64) (io.ReadCloser, error) {
	if o, ok := s.backend.(cache.Opener); ok && off > 0 {
		b, err := o.Open(ctx, ns, r.d)
		if err != nil {
			return nil, err
		}
		return struct {
			io.Reader
			io.Closer
		}{io.NewSectionReader(b, off, b.Size()-off), b}, nil
	}
	rc, err := s.backend.Read(ctx, ns, r.d)
	if err != nil {
		return nil, err
	}
	if off > 0 {
		if _, err := io.CopyN(io.Discard, rc, off); err != nil {
			rc.Close()
			return nil, err
		}
	}
	return rc, nil
}

// chunkSender turns writes into ReadResponses of at most chunkBytes.
// The first message is small so that the reader gets going sooner.
type chunkSender struct {
	stream bspb.ByteStream_ReadServer
	m      *metrics
	buf    []byte
	sent   bool
}

func (c *chunkSender) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if c.buf == nil {
			c.buf = make([]byte, 0, chunkBytes)
		}
		limit := chunkBytes
		if !c.sent {
			limit = 64 << 10
		}
		k := min(len(p), limit-len(c.buf))
		c.buf = append(c.buf, p[:k]...)
		p = p[k:]
		if len(c.buf) == limit {
			if err := c.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
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

// Write receives a blob, resumably when uncompressed. Data is kept in a
// temporary file and reaches the backend only after finish_write and
// digest verification, so an abandoned or lying upload stores nothing.
func (s *Server) Write(stream bspb.ByteStream_WriteServer) (err error) {
	defer s.m.observe("Write", time.Now(), &err)
	ctx := stream.Context()
	req, err := stream.Recv()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return status.Error(codes.InvalidArgument, "write stream without requests")
		}
		return err
	}
	r, id, err := parseWrite(req.ResourceName)
	if err != nil {
		return err
	}
	ns, c, err := s.namespace(ctx, r.instance, r.fn)
	if err != nil {
		return err
	}
	d := r.d
	if err := c.checkWrite("writing blob " + digest.String(d)); err != nil {
		return err
	}
	done := func() error {
		cs := d.SizeBytes
		if r.compressed {
			cs = -1
		}
		return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: cs})
	}
	if d.SizeBytes == 0 {
		return done()
	}
	if missing, err := s.backend.FindMissing(ctx, ns, []*repb.Digest{d}); err == nil && len(missing) == 0 {
		return done()
	}
	key := uploadKey{group: ns.Group, name: req.ResourceName}
	u, err := s.uploads.get(key, id)
	if err != nil {
		return fmt.Errorf("writing blob %s: %w", digest.String(d), err)
	}
	defer u.mu.Unlock()
	keep := false
	defer func() {
		if !keep {
			s.uploads.drop(key, u)
		}
	}()
	// Bytes received beyond this are a lie about the size.
	limit := d.SizeBytes
	if r.compressed {
		limit = d.SizeBytes + d.SizeBytes/8 + 64<<10
		if req.WriteOffset != 0 {
			return status.Errorf(codes.InvalidArgument, "blob %s: compressed uploads cannot resume (write_offset %d)", digest.String(d), req.WriteOffset)
		}
		if err := u.truncate(0); err != nil {
			return err
		}
	} else {
		switch {
		case req.WriteOffset > u.size:
			return status.Errorf(codes.InvalidArgument, "blob %s: write_offset %d beyond the %d bytes committed", digest.String(d), req.WriteOffset, u.size)
		case req.WriteOffset < u.size:
			if err := u.truncate(req.WriteOffset); err != nil {
				return err
			}
		}
	}
	// A fresh, uncompressed upload of a blob that fits in memory is kept
	// there; only an interrupted one is spilled to its file, to be resumed.
	var mem []byte
	if !r.compressed && u.size == 0 && d.SizeBytes <= maxBufferedCommit {
		mem = make([]byte, 0, d.SizeBytes)
	}
	spill := func() error {
		if mem == nil {
			return nil
		}
		_, err := u.f.Write(mem)
		mem = nil
		return err
	}
	defer func() {
		if keep {
			if err := spill(); err != nil {
				keep = false
			}
		}
	}()
	for {
		if req.WriteOffset != u.size {
			keep = !r.compressed
			return status.Errorf(codes.InvalidArgument, "blob %s: write_offset %d, expected %d", digest.String(d), req.WriteOffset, u.size)
		}
		if u.size+int64(len(req.Data)) > limit {
			return status.Errorf(codes.InvalidArgument, "blob %s: more than %d bytes sent", digest.String(d), limit)
		}
		if mem != nil {
			mem = append(mem, req.Data...)
		} else if _, err := u.f.Write(req.Data); err != nil {
			return fmt.Errorf("writing blob %s: %w", digest.String(d), err)
		}
		u.size += int64(len(req.Data))
		u.seen.Store(u.size)
		s.m.in(len(req.Data))
		if req.FinishWrite {
			break
		}
		req, err = stream.Recv()
		if err != nil {
			keep = !r.compressed
			if errors.Is(err, io.EOF) {
				return status.Errorf(codes.InvalidArgument, "blob %s: stream closed after %d bytes without finish_write", digest.String(d), u.size)
			}
			return err
		}
		if req.ResourceName != "" && req.ResourceName != key.name {
			return status.Errorf(codes.InvalidArgument, "blob %s: resource name changed mid-stream", digest.String(d))
		}
	}
	if mem != nil {
		err = s.commitBytes(ctx, ns, d, mem)
	} else {
		err = s.commit(ctx, ns, r, u)
	}
	if err != nil {
		return fmt.Errorf("writing blob %s: %w", digest.String(d), err)
	}
	cs := d.SizeBytes
	if r.compressed {
		cs = u.size
	}
	return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: cs})
}

// commitBytes verifies an upload held in memory and hands it to the
// backend.
func (s *Server) commitBytes(ctx context.Context, ns cache.Namespace, d *repb.Digest, b []byte) error {
	if got := digest.Compute(ns.Function, b); !digest.Equal(got, d) {
		return status.Errorf(codes.InvalidArgument, "data does not match its digest: got %s", digest.String(got))
	}
	if hp, ok := s.backend.(hashedPutter); ok {
		return hp.PutHashed(ctx, ns, d, b)
	}
	return s.backend.Write(ctx, ns, d, bytes.NewReader(b))
}

// commit verifies the upload and hands it to the backend.
func (s *Server) commit(ctx context.Context, ns cache.Namespace, r *resource, u *upload) error {
	if _, err := u.f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	var src io.Reader = u.f
	if r.compressed {
		dec, err := zstd.NewReader(u.f, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxDecoderWindow), zstd.WithDecoderMaxMemory(uint64(r.d.SizeBytes)+1))
		if err != nil {
			return err
		}
		defer dec.Close()
		src = dec
	}
	v, err := newVerifyingReader(ns.Function, r.d, src)
	if err != nil {
		return err
	}
	if hp, ok := s.backend.(hashedPutter); ok && r.d.SizeBytes <= maxBufferedCommit {
		// Verify once here, then store without the backend hashing again.
		b := make([]byte, r.d.SizeBytes)
		if _, err := io.ReadFull(v, b); err != nil {
			return err
		}
		if err := checkVerifiedEnd(v); err != nil {
			return err
		}
		return hp.PutHashed(ctx, ns, r.d, b)
	}
	if err := s.backend.Write(ctx, ns, r.d, v); err != nil {
		if v.err != nil {
			return v.err
		}
		return err
	}
	return v.err
}

// hashedPutter is a backend that stores bytes already verified against
// their digest without hashing them again (the local cache).
type hashedPutter interface {
	PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error
}

// maxBufferedCommit is the largest upload committed from memory.
const maxBufferedCommit = 64 << 20

// checkVerifiedEnd reads v to its end so that its digest check runs.
func checkVerifiedEnd(v *verifyingReader) error {
	var one [1]byte
	n, err := v.Read(one[:])
	if n > 0 {
		return status.Errorf(codes.InvalidArgument, "blob %s: more data than its size", digest.String(v.d))
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// verifyingReader yields at most the digest's size and, at the end, an
// InvalidArgument error instead of io.EOF when the content does not match.
type verifyingReader struct {
	v   *digest.Verifier
	d   *repb.Digest
	r   io.Reader
	n   int64
	err error
}

func newVerifyingReader(fn digest.Function, d *repb.Digest, r io.Reader) (*verifyingReader, error) {
	v, err := digest.NewVerifier(fn, d)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return &verifyingReader{v: v, d: d, r: r}, nil
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	if rem := v.d.SizeBytes + 1 - v.n; int64(len(p)) > rem {
		p = p[:rem]
	}
	n, err := v.r.Read(p)
	v.n += int64(n)
	v.v.Write(p[:n])
	if v.n > v.d.SizeBytes {
		v.err = status.Errorf(codes.InvalidArgument, "blob %s: data is longer than its digest says", digest.String(v.d))
		return 0, v.err
	}
	if errors.Is(err, io.EOF) {
		if cerr := v.v.Check(); cerr != nil {
			v.err = status.Errorf(codes.InvalidArgument, "data does not match its digest: %v", cerr)
			return n, v.err
		}
		return n, io.EOF
	}
	if err != nil {
		v.err = status.Errorf(codes.InvalidArgument, "blob %s: bad upload: %v", digest.String(v.d), err)
		return n, v.err
	}
	return n, nil
}

// QueryWriteStatus reports how much of an interrupted upload the server
// holds, or that the blob is complete.
func (s *Server) QueryWriteStatus(ctx context.Context, req *bspb.QueryWriteStatusRequest) (_ *bspb.QueryWriteStatusResponse, err error) {
	defer s.m.observe("QueryWriteStatus", time.Now(), &err)
	r, _, err := parseWrite(req.ResourceName)
	if err != nil {
		return nil, err
	}
	ns, _, err := s.namespace(ctx, r.instance, r.fn)
	if err != nil {
		return nil, err
	}
	if r.d.SizeBytes == 0 {
		return &bspb.QueryWriteStatusResponse{CommittedSize: 0, Complete: true}, nil
	}
	if missing, err := s.backend.FindMissing(ctx, ns, []*repb.Digest{r.d}); err == nil && len(missing) == 0 {
		return &bspb.QueryWriteStatusResponse{CommittedSize: r.d.SizeBytes, Complete: true}, nil
	}
	if n, ok := s.uploads.committed(uploadKey{group: ns.Group, name: req.ResourceName}); ok && !r.compressed {
		return &bspb.QueryWriteStatusResponse{CommittedSize: n}, nil
	}
	return nil, status.Errorf(codes.NotFound, "no upload %q", req.ResourceName)
}

type uploadKey struct{ group, name string }

// upload is a partial ByteStream upload in a temporary file.
type upload struct {
	mu   sync.Mutex // held by the Write call using it
	f    *os.File
	size int64        // bytes in f; written under mu
	seen atomic.Int64 // size, for QueryWriteStatus without waiting for mu
	used time.Time
	gone atomic.Bool
}

func (u *upload) truncate(n int64) error {
	if err := u.f.Truncate(n); err != nil {
		return err
	}
	if _, err := u.f.Seek(n, io.SeekStart); err != nil {
		return err
	}
	u.size = n
	u.seen.Store(n)
	return nil
}

// uploads holds partial uploads so an interrupted write can resume.
type uploads struct {
	dir string
	ttl time.Duration
	mu  sync.Mutex
	m   map[uploadKey]*upload
}

func newUploads(dir string, ttl time.Duration) *uploads {
	return &uploads{dir: dir, ttl: ttl, m: map[uploadKey]*upload{}}
}

// get returns the upload for key, created if needed, locked.
func (us *uploads) get(key uploadKey, id string) (*upload, error) {
	for {
		us.mu.Lock()
		us.expireLocked()
		u := us.m[key]
		if u == nil {
			f, err := os.CreateTemp(us.dir, "upload-*")
			if err != nil {
				us.mu.Unlock()
				return nil, status.Errorf(codes.Internal, "creating upload file: %v", err)
			}
			u = &upload{f: f}
			us.m[key] = u
		}
		u.used = time.Now()
		us.mu.Unlock()
		u.mu.Lock()
		if !u.gone.Load() {
			return u, nil
		}
		u.mu.Unlock()
	}
}

func (us *uploads) committed(key uploadKey) (int64, bool) {
	us.mu.Lock()
	u := us.m[key]
	us.mu.Unlock()
	if u == nil {
		return 0, false
	}
	return u.seen.Load(), !u.gone.Load()
}

// drop removes u (whose lock the caller holds).
func (us *uploads) drop(key uploadKey, u *upload) {
	us.mu.Lock()
	if us.m[key] == u {
		delete(us.m, key)
	}
	us.mu.Unlock()
	u.gone.Store(true)
	u.f.Close()
	os.Remove(u.f.Name())
}

func (us *uploads) expireLocked() {
	now := time.Now()
	for k, u := range us.m {
		if now.Sub(u.used) > us.ttl && u.mu.TryLock() {
			delete(us.m, k)
			u.gone.Store(true)
			u.f.Close()
			os.Remove(u.f.Name())
			u.mu.Unlock()
		}
	}
}

func (us *uploads) closeAll() {
	us.mu.Lock()
	defer us.mu.Unlock()
	for k, u := range us.m {
		if u.mu.TryLock() {
			delete(us.m, k)
			u.gone.Store(true)
			u.f.Close()
			os.Remove(u.f.Name())
			u.mu.Unlock()
		}
	}
}
