package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// maxDecoderWindow is the largest zstd window an upload may use: the
// reference encoder's levels 1 to 19 use at most 8 MiB. The decoder
// allocates the window a frame declares, so it is charged to the upload
// memory budget in full.
const maxDecoderWindow = 8 << 20

// decoderOverhead is a zstd decoder's memory beyond its window (block
// buffers, the ring's spare blocks) plus the decode copy buffer.
const decoderOverhead = 2 << 20

// uploadCharge is the memory charged to one upload stream: the transport's
// receive window, the message being handled and the one received ahead
// (messages larger than chunkBytes are charged extra as they come), and
// for zstd the decoder.
func uploadCharge(size int64, compressed bool) int64 {
	n := int64(streamWindow + 2*chunkBytes)
	if compressed {
		n += maxDecoderWindow + decoderOverhead
	}
	return n
}

// Write receives a blob, resumably when uncompressed. The data streams into
// a file in the scratch directory (a zstd upload is decoded as it arrives)
// and is hashed on the way; it reaches the backend only after finish_write
// and a matching digest, so an abandoned or lying upload stores nothing.
//
// Every bound is the server's own: the claimed size must be within
// MaxBlobBytes, is reserved on disk (against the local cache's bound, with
// its entries) before any data is accepted, and no more data than claimed
// is taken; the stream's memory is charged to MaxUploadMemory; a stream
// idle for IdleTimeout is aborted, and an interrupted upload is kept for
// UploadTTL to be resumed, then deleted.
func (s *Server) Write(stream bspb.ByteStream_WriteServer) (err error) {
	defer s.m.observe("Write", time.Now(), &err)
	ctx := stream.Context()
	rx := newReceiver(stream, s.opts.IdleTimeout)
	defer rx.stop()
	req, err := rx.next(ctx)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return status.Error(codes.InvalidArgument, "write stream without requests")
		}
		return err
	}
	r, _, err := parseWrite(req.ResourceName)
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
	switch {
	case req.WriteOffset < 0:
		return status.Errorf(codes.InvalidArgument, "writing blob %s: negative write_offset %d", digest.String(d), req.WriteOffset)
	case d.SizeBytes > s.opts.MaxBlobBytes:
		return status.Errorf(codes.InvalidArgument, "writing blob %s: %d bytes is more than this server stores per blob (limit %d bytes)", digest.String(d), d.SizeBytes, s.opts.MaxBlobBytes)
	case r.compressed && req.WriteOffset != 0:
		return status.Errorf(codes.InvalidArgument, "writing blob %s: compressed uploads cannot resume (write_offset %d)", digest.String(d), req.WriteOffset)
	case req.WriteOffset > d.SizeBytes:
		return status.Errorf(codes.InvalidArgument, "writing blob %s: write_offset %d beyond its size", digest.String(d), req.WriteOffset)
	}
	if d.SizeBytes == 0 {
		return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: 0})
	}
	if missing, err := s.backend.FindMissing(ctx, ns, []*repb.Digest{d}); err == nil && len(missing) == 0 {
		cs := d.SizeBytes
		if r.compressed {
			cs = -1
		}
		return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: cs})
	}
	what := "writing blob " + digest.String(d)
	release, err := s.mem.acquire(ctx, uploadCharge(d.SizeBytes, r.compressed), s.opts.IdleTimeout, what)
	if err != nil {
		return err
	}
	defer release()
	// A backend that stores blobs compressed takes a zstd upload's frames
	// as they came (the upload file holds them, bounded by the same limit
	// as the stream); otherwise the file holds the decoded content.
	cfp, _ := s.backend.(compressedFilePutter)
	if !r.compressed || cfp == nil || !cfp.Compression() {
		cfp = nil
	}
	claim := d.SizeBytes
	if cfp != nil {
		claim = compressedLimit(d)
	}
	key := uploadKey{group: ns.Group, name: req.ResourceName}
	u, err := s.uploads.get(key, ns.Function, d, func() (space, error) { return s.reserve(claim) })
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	keep := false
	defer func() { s.uploads.release(u, keep) }()
	var cs int64
	switch {
	case cfp != nil:
		if cs, err = s.receiveCompressed(ctx, rx, key.name, ns.Function, d, u, req, true); err == nil {
			res, _ := u.space.(*localcache.Reservation)
			if err = cfp.PutCompressedFile(ctx, ns, d, u.f, u.size, res); err == nil {
				u.stored = true
			}
		}
	case r.compressed:
		if cs, err = s.receiveCompressed(ctx, rx, key.name, ns.Function, d, u, req, false); err == nil {
			err = s.commit(ctx, ns, d, u)
		}
	default:
		keep, err = s.receive(ctx, rx, key.name, d, u, req)
		cs = d.SizeBytes
		if err == nil {
			err = s.commit(ctx, ns, d, u)
		}
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return stream.SendAndClose(&bspb.WriteResponse{CommittedSize: cs})
}

// receive takes an uncompressed upload's messages into u. On error it
// reports whether the partial upload is worth keeping for a resumption.
func (s *Server) receive(ctx context.Context, rx *receiver, name string, d *repb.Digest, u *upload, req *bspb.WriteRequest) (keep bool, err error) {
	switch {
	case req.WriteOffset > u.size:
		return u.size > 0, status.Errorf(codes.InvalidArgument, "write_offset %d beyond the %d bytes committed", req.WriteOffset, u.size)
	case req.WriteOffset < u.size:
		if err := u.truncate(req.WriteOffset); err != nil {
			return false, s.ioErr(err, "truncating an upload")
		}
	}
	charged := int64(chunkBytes)
	for {
		if req.WriteOffset != u.size {
			return u.size > 0, status.Errorf(codes.InvalidArgument, "write_offset %d, expected %d", req.WriteOffset, u.size)
		}
		if u.size+int64(len(req.Data)) > d.SizeBytes {
			return false, status.Errorf(codes.InvalidArgument, "more than its %d bytes sent", d.SizeBytes)
		}
		if l := int64(len(req.Data)); l > charged {
			more, err := s.mem.acquire(ctx, 2*(l-charged), s.opts.IdleTimeout, "receiving a large message")
			if err != nil {
				return true, err
			}
			defer more()
			charged = l
		}
		if err := u.write(req.Data); err != nil {
			return false, s.ioErr(err, "storing upload data")
		}
		s.m.in(len(req.Data))
		if req.FinishWrite {
			return false, nil
		}
		if req, err = rx.next(ctx); err != nil {
			var ie *idleError
			switch {
			case errors.As(err, &ie):
				return false, err
			case errors.Is(err, io.EOF):
				return true, status.Errorf(codes.InvalidArgument, "stream closed after %d bytes without finish_write", u.size)
			}
			return true, err
		}
		if req.ResourceName != "" && req.ResourceName != name {
			return false, status.Error(codes.InvalidArgument, "resource name changed mid-stream")
		}
	}
}

// compressedLimit is the most zstd data an upload of d may send.
func compressedLimit(d *repb.Digest) int64 { return d.SizeBytes + d.SizeBytes/8 + 64<<10 }

// compressedFilePutter is a backend that stores blobs compressed at rest
// when Compression says so, and can take a verified zstd upload's frames
// (the first n bytes of f) by renaming the file.
type compressedFilePutter interface {
	Compression() bool
	PutCompressedFile(ctx context.Context, ns cache.Namespace, d *repb.Digest, f *os.File, n int64, res *localcache.Reservation) error
}

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
	dec, err := zstd.NewReader(in, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxDecoderWindow))
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

// commit verifies the upload in u and hands it to the backend: a local
// cache takes the file itself (renamed, its reservation counted over to
// the entry); other backends read it.
func (s *Server) commit(ctx context.Context, ns cache.Namespace, d *repb.Digest, u *upload) error {
	if u.size != d.SizeBytes {
		return status.Errorf(codes.InvalidArgument, "got %d bytes, digest says %d", u.size, d.SizeBytes)
	}
	if err := u.f.Truncate(u.size); err != nil {
		return s.ioErr(err, "sizing an upload")
	}
	v := u.v
	if v == nil || u.hashed != u.size {
		// Resumed below what was hashed: hash the file again.
		var err error
		if v, err = digest.NewVerifier(ns.Function, d); err != nil {
			return status.Error(codes.InvalidArgument, err.Error())
		}
		if _, err := copyBuffered(v, io.NewSectionReader(u.f, 0, u.size)); err != nil {
			return s.ioErr(err, "reading an upload back")
		}
	}
	if err := v.Check(); err != nil {
		return status.Errorf(codes.InvalidArgument, "data does not match its digest: %v", err)
	}
	if fp, ok := s.backend.(filePutter); ok {
		res, _ := u.space.(*localcache.Reservation)
		if err := fp.PutFile(ctx, ns, d, u.f, res); err != nil {
			return err
		}
		u.stored = true
		return nil
	}
	return s.backend.Write(ctx, ns, d, io.NewSectionReader(u.f, 0, u.size))
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

// receiver receives a write stream's messages in its own goroutine, so
// that the handler can give up on a stream that goes idle.
type receiver struct {
	ch   chan recvResult
	done chan struct{}
	idle time.Duration
}

type recvResult struct {
	req *bspb.WriteRequest
	err error
}

// idleError is a stream that sent nothing for the idle timeout.
type idleError struct{ d time.Duration }

func (e *idleError) Error() string {
	return fmt.Sprintf("no message for %v: upload aborted", e.d)
}

func (e *idleError) GRPCStatus() *status.Status {
	return status.New(codes.DeadlineExceeded, e.Error())
}

func newReceiver(stream bspb.ByteStream_WriteServer, idle time.Duration) *receiver {
	r := &receiver{ch: make(chan recvResult), done: make(chan struct{}), idle: idle}
	go func() {
		for {
			req, err := stream.Recv()
			select {
			case r.ch <- recvResult{req, err}:
			case <-r.done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return r
}

// next returns the next message, or an idleError after the idle timeout.
func (r *receiver) next(ctx context.Context) (*bspb.WriteRequest, error) {
	t := time.NewTimer(r.idle)
	defer t.Stop()
	select {
	case res := <-r.ch:
		return res.req, res.err
	case <-t.C:
		return nil, &idleError{r.idle}
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

// stop lets the receiving goroutine end (it does once the call is over).
func (r *receiver) stop() { close(r.done) }

type uploadKey struct{ group, name string }

// upload is a ByteStream upload's file in the scratch directory. Its disk
// space is reserved from creation until it is stored, deleted or expires:
// the claimed size while a Write call uses it, the bytes it holds while it
// is parked.
type upload struct {
	key    uploadKey
	mu     sync.Mutex // held by the Write call using it
	path   string
	f      *os.File // open while a Write call uses it
	space  space
	size   int64            // bytes received; under mu
	seen   atomic.Int64     // size, for QueryWriteStatus without waiting for mu
	v      *digest.Verifier // hashes the first hashed bytes; nil once invalid
	hashed int64
	timer  *time.Timer // expiry while parked
	stored bool        // the backend took the file
	gone   atomic.Bool
	werr   error // a failure writing compressed bytes to f
}

func (u *upload) write(b []byte) error {
	if err := writeSparse(u.f, b, u.size); err != nil {
		return err
	}
	if u.v != nil && u.hashed == u.size {
		u.v.Write(b)
		u.hashed += int64(len(b))
	}
	u.size += int64(len(b))
	u.seen.Store(u.size)
	return nil
}

func (u *upload) truncate(n int64) error {
	if err := u.f.Truncate(n); err != nil {
		return err
	}
	if n < u.hashed {
		u.v = nil
	}
	u.size = n
	u.seen.Store(n)
	return nil
}

// pageSize and holeMin: page-aligned zero runs of at least holeMin bytes
// are left as holes in upload files, as the local cache does in its blobs.
const (
	pageSize = 4096
	holeMin  = 64 << 10
)

// writeSparse writes b at off, skipping page-aligned zero runs of at least
// holeMin bytes (the file is sized at commit).
func writeSparse(f *os.File, b []byte, off int64) error {
	run := 0
	for i := 0; i < len(b); {
		if i+holeMin > len(b) || (off+int64(i))%pageSize != 0 || !digest.IsZero(b[i:i+pageSize]) {
			i += min(pageSize, len(b)-i)
			continue
		}
		z := i
		for z+pageSize <= len(b) && digest.IsZero(b[z:z+pageSize]) {
			z += pageSize
		}
		if z-i < holeMin {
			i = z
			continue
		}
		if run < i {
			if _, err := f.WriteAt(b[run:i], off+int64(run)); err != nil {
				return err
			}
		}
		i, run = z, z
	}
	if run < len(b) {
		if _, err := f.WriteAt(b[run:], off+int64(run)); err != nil {
			return err
		}
	}
	return nil
}

// uploads holds uploads in flight and interrupted ones, which a client
// may resume until they expire.
type uploads struct {
	dir string
	ttl time.Duration
	log *slog.Logger
	mu  sync.Mutex
	m   map[uploadKey]*upload
}

const uploadPrefix = "upload-"

func newUploads(dir string, ttl time.Duration, log *slog.Logger) *uploads {
	return &uploads{dir: dir, ttl: ttl, log: log, m: map[uploadKey]*upload{}}
}

// cleanStale removes upload files that no live server holds (left by a
// server that was killed): a server holds a lock on each file it writes.
func (us *uploads) cleanStale() {
	ents, _ := os.ReadDir(us.dir)
	for _, de := range ents {
		if !strings.HasPrefix(de.Name(), uploadPrefix) || !de.Type().IsRegular() {
			continue
		}
		p := filepath.Join(us.dir, de.Name())
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			os.Remove(p)
		}
		f.Close()
	}
}

// get returns the upload for key, locked, creating it (with the disk space
// reserve promises) when there is none.
func (us *uploads) get(key uploadKey, fn digest.Function, d *repb.Digest, reserve func() (space, error)) (*upload, error) {
	for {
		us.mu.Lock()
		u := us.m[key]
		if u == nil {
			sp, err := reserve()
			if err != nil {
				us.mu.Unlock()
				return nil, err
			}
			f, err := os.CreateTemp(us.dir, uploadPrefix+"*")
			if err != nil {
				us.mu.Unlock()
				sp.Release()
				us.log.Error("creating an upload file", "err", err)
				return nil, scratchErr(err, "creating an upload file")
			}
			unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
			u = &upload{key: key, path: f.Name(), f: f, space: sp}
			u.v, _ = digest.NewVerifier(fn, d)
			u.mu.Lock()
			us.m[key] = u
			us.mu.Unlock()
			return u, nil
		}
		us.mu.Unlock()
		u.mu.Lock()
		if u.gone.Load() {
			u.mu.Unlock()
			continue
		}
		if u.timer != nil {
			u.timer.Stop()
			u.timer = nil
		}
		if u.f == nil {
			// Parked, it held only the space its bytes take: reserve the
			// whole claim again.
			if err := u.space.Resize(d.SizeBytes); err != nil {
				us.park(u)
				u.mu.Unlock()
				return nil, err
			}
			f, err := os.OpenFile(u.path, os.O_RDWR, 0)
			if err != nil {
				us.drop(u)
				u.mu.Unlock()
				us.log.Error("reopening an upload file", "err", err)
				return nil, scratchErr(err, "reopening an interrupted upload")
			}
			unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
			u.f = f
		}
		return u, nil
	}
}

// release ends a Write call's use of u (whose lock it holds): a partial
// upload worth resuming is parked (its file closed) until it expires;
// anything else is deleted at once.
func (us *uploads) release(u *upload, keep bool) {
	defer u.mu.Unlock()
	if !keep || u.stored {
		us.drop(u)
		return
	}
	u.f.Close()
	u.f = nil
	// A parked upload takes no more disk than the bytes it holds.
	u.space.Resize(u.size)
	us.park(u)
}

// park (re)starts the expiry of a parked upload, whose lock the caller
// holds.
func (us *uploads) park(u *upload) {
	u.timer = time.AfterFunc(us.ttl, func() { us.expire(u) })
}

// drop deletes u (whose lock the caller holds) and frees its space.
func (us *uploads) drop(u *upload) {
	us.mu.Lock()
	if us.m[u.key] == u {
		delete(us.m, u.key)
	}
	us.mu.Unlock()
	u.gone.Store(true)
	if u.timer != nil {
		u.timer.Stop()
	}
	if u.f != nil {
		u.f.Close()
		u.f = nil
	}
	if !u.stored {
		os.Remove(u.path)
	}
	u.space.Release()
}

// expire deletes a parked upload unless a Write call resumed it meanwhile.
func (us *uploads) expire(u *upload) {
	if !u.mu.TryLock() {
		return // in use: parked again with a fresh timer when released
	}
	defer u.mu.Unlock()
	if !u.gone.Load() && u.f == nil {
		us.drop(u)
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

// pending is the number of uploads held (in flight or parked).
func (us *uploads) pending() int {
	us.mu.Lock()
	defer us.mu.Unlock()
	return len(us.m)
}

// closeAll deletes the uploads no Write call is using.
func (us *uploads) closeAll() {
	us.mu.Lock()
	all := make([]*upload, 0, len(us.m))
	for _, u := range us.m {
		all = append(all, u)
	}
	us.mu.Unlock()
	for _, u := range all {
		if u.mu.TryLock() {
			if !u.gone.Load() {
				us.drop(u)
			}
			u.mu.Unlock()
		}
	}
}
