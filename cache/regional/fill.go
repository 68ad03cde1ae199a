package regional

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/internal/stall"
)

// Holdback is how many final bytes of a read (of a whole blob, or of a
// range) wait for the blob being fetched to verify: the rest is served as
// it arrives.
const Holdback = 64 << 10

// fetchBuf is the size of the pieces a fetch writes to its file.
const fetchBuf = 1 << 20

// fill is one fetch of a blob from the upstream into a temporary file of
// the disk cache, shared by every reader of the blob that misses the disk
// meanwhile. Readers read the file as it grows (src, below avail) except
// for their last Holdback bytes, which they get once the whole blob
// verified (verified); a failed fetch ends every reader with its error.
// The file stays open until the fetch and every reader are done with it.
type fill struct {
	d *repb.Digest

	mu       sync.Mutex
	src      io.ReaderAt // the file being filled, or the disk's blob
	avail    int64       // bytes of src written so far
	verified bool        // the whole blob is in src and matched d
	err      error       // the fetch failed (readers get this)
	wake     chan struct{}
	refs     int    // readers and the fetch itself
	release  func() // closes src once refs drops to 0
}

// open opens a reader of d's bytes [off, end) from the disk when it holds
// d, else from the fetch of d in flight, starting one when there is none.
func (r *Regional) open(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, end int64) (io.ReadCloser, error) {
	key := blobKey(ns, d)
	r.mu.Lock()
	f := r.fills[key]
	if f != nil {
		f.acquire()
		r.mu.Unlock()
		r.stats.joins.Add(1)
		return f.started(ctx, off, end)
	}
	r.mu.Unlock()
	if err := digest.Validate(d); err != nil {
		return nil, err
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, errkind.New(errkind.Unavailable, "regional cache: blob %s: the tier is closed", digest.String(d))
	}
	if f = r.fills[key]; f != nil {
		f.acquire()
		r.mu.Unlock()
		r.stats.joins.Add(1)
		return f.started(ctx, off, end)
	}
	f = &fill{d: d, wake: make(chan struct{}), refs: 2} // this reader and the fetch
	r.fills[key] = f
	r.wg.Add(1)
	r.mu.Unlock()
	// The fetch outlives the reader that started it: the others, and the
	// disk cache, want the blob too. It keeps ctx's values (the trace).
	go r.fetch(context.WithoutCancel(ctx), ns, d, key, f)
	return f.started(ctx, off, end)
}

// started returns a reader of [off, end) of f once the fetch has received
// its first bytes (so that a blob the upstream lacks is NotFound here),
// or the fetch's error. The caller holds a reference to f, which the
// reader takes over.
func (f *fill) started(ctx context.Context, off, end int64) (io.ReadCloser, error) {
	fr := f.reader(ctx, off, end)
	for {
		f.mu.Lock()
		ok, err, wake := f.avail > 0 || f.verified, f.err, f.wake
		f.mu.Unlock()
		switch {
		case err != nil:
			fr.Close()
			return nil, err
		case ok:
			return fr, nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			fr.Close()
			return nil, fmt.Errorf("regional cache: reading blob %s: %w", digest.String(f.d), status.FromContextError(ctx.Err()).Err())
		}
	}
}

// fetch fills f from the disk when another fetch just put d there, else
// from the upstream, verifies it and makes it the disk's entry.
func (r *Regional) fetch(ctx context.Context, ns cache.Namespace, d *repb.Digest, key string, f *fill) {
	defer r.wg.Done()
	defer func() {
		r.mu.Lock()
		delete(r.fills, key)
		r.mu.Unlock()
		f.unref()
	}()
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		select {
		case <-r.ctx.Done():
			stop()
		case <-ctx.Done():
		}
	}()
	// A fetch that ended just before this one started may have put d on
	// the disk.
	if b, err := r.local.Open(ctx, ns, d); err == nil {
		f.mu.Lock()
		f.src, f.release = b, func() { b.Close() }
		f.mu.Unlock()
		f.finish(d.GetSizeBytes(), nil)
		return
	}
	r.stats.fills.Add(1) // from here on, the upstream is asked
	tmp, err := fileio.CreateTemp(r.local.TempDir())
	if err != nil {
		r.stats.fillErrors.Add(1)
		f.finish(0, errkind.IO(err, "regional cache: fetching blob %s", digest.String(d)))
		return
	}
	f.mu.Lock()
	f.src, f.release = tmp, func() { tmp.Close() }
	f.mu.Unlock()
	// Space on the disk for the copy. Without it the fetch still serves
	// its readers, from a file removed at once, and keeps no copy.
	res, rerr := r.local.Reserve(d.GetSizeBytes())
	if rerr != nil {
		os.Remove(tmp.Name())
		r.opts.Logger.Warn("regional cache: no room to keep a fetched blob; serving it without keeping it",
			"digest", digest.String(d), "err", rerr)
	}
	n, err := r.download(ctx, ns, d, tmp, f)
	r.stats.fillBytes.Add(n)
	if err != nil {
		r.stats.fillErrors.Add(1)
		if res != nil {
			res.Release()
		}
		os.Remove(tmp.Name())
		f.finish(n, err)
		return
	}
	f.finish(n, nil)
	r.remember(ns, d)
	if rerr != nil {
		return
	}
	if err := r.local.PutFile(ctx, ns, d, tmp, res); err != nil {
		if res != nil {
			res.Release()
		}
		os.Remove(tmp.Name())
		r.stats.localCopyErrors.Add(1)
		r.opts.Logger.Warn("regional cache: keeping a fetched blob on disk", "digest", digest.String(d), "err", err)
	}
}

// download copies d from the upstream into tmp, publishing progress to f,
// and verifies it. It returns the bytes received.
func (r *Regional) download(ctx context.Context, ns cache.Namespace, d *repb.Digest, tmp *os.File, f *fill) (int64, error) {
	up := r.up.Traits().Description
	ctx, g := stall.New(ctx, r.opts.StallTimeout, errkind.New(errkind.Unavailable,
		"regional cache: upstream %s sent no byte of blob %s for %s", up, digest.String(d), r.opts.StallTimeout))
	defer g.Stop()
	fail := func(off int64, err error) (int64, error) {
		if err = g.Err(err); r.ctx.Err() != nil {
			err = errkind.New(errkind.Unavailable, "the tier was closed")
		}
		return off, fmt.Errorf("regional cache: fetching blob %s from upstream %s at offset %d: %w", digest.String(d), up, off, err)
	}
	v, err := digest.NewVerifier(ns.DigestFunction(), d)
	if err != nil {
		return 0, errkind.New(errkind.InvalidArgument, "regional cache: blob %s: %v", digest.String(d), err)
	}
	rc, err := r.up.Read(ctx, ns, d)
	if err != nil {
		return fail(0, err)
	}
	defer rc.Close()
	bp := bufs.Get().(*[]byte)
	defer bufs.Put(bp)
	buf := *bp
	var off int64
	for {
		n, err := rc.Read(buf)
		if n > 0 {
			g.Progress()
			if off+int64(n) > d.GetSizeBytes() {
				return off, cache.Corruptf("regional cache: upstream %s sent more than the %d bytes of blob %s", up, d.GetSizeBytes(), digest.String(d))
			}
			v.Write(buf[:n])
			if werr := fileio.WriteSparse(tmp, buf[:n], off); werr != nil {
				return off, errkind.IO(werr, "regional cache: writing blob %s fetched from upstream %s", digest.String(d), up)
			}
			off += int64(n)
			// A run of zeros left as a hole at the end still reads back.
			if werr := tmp.Truncate(off); werr != nil {
				return off, errkind.IO(werr, "regional cache: writing blob %s fetched from upstream %s", digest.String(d), up)
			}
			f.progress(off)
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fail(off, err)
		}
	}
	if off != d.GetSizeBytes() {
		return off, cache.Corruptf("regional cache: upstream %s sent %d of the %d bytes of blob %s", up, off, d.GetSizeBytes(), digest.String(d))
	}
	if err := v.Check(); err != nil {
		return off, cache.Corruptf("regional cache: blob %s from upstream %s is corrupt: %v", digest.String(d), up, err)
	}
	return off, nil
}

var bufs = sync.Pool{New: func() any { b := make([]byte, fetchBuf); return &b }}

func (f *fill) acquire() {
	f.mu.Lock()
	f.refs++
	f.mu.Unlock()
}

func (f *fill) unref() {
	f.mu.Lock()
	f.refs--
	var release func()
	if f.refs == 0 {
		release, f.release = f.release, nil
	}
	f.mu.Unlock()
	if release != nil {
		release()
	}
}

// broadcastLocked wakes every waiting reader.
func (f *fill) broadcastLocked() {
	close(f.wake)
	f.wake = make(chan struct{})
}

func (f *fill) progress(n int64) {
	f.mu.Lock()
	f.avail = n
	f.broadcastLocked()
	f.mu.Unlock()
}

// finish ends the fetch: verified with n bytes when err is nil.
func (f *fill) finish(n int64, err error) {
	f.mu.Lock()
	f.avail = n
	if err == nil {
		f.verified = true
	} else {
		f.err = err
	}
	f.broadcastLocked()
	f.mu.Unlock()
}

func (f *fill) reader(ctx context.Context, off, end int64) *fillReader {
	return &fillReader{f: f, ctx: ctx, start: off, off: off, end: end}
}

// fillReader reads [start, end) of a fill's blob.
type fillReader struct {
	f               *fill
	ctx             context.Context
	start, off, end int64
	closed          bool
	err             error
}

func (fr *fillReader) Read(p []byte) (int, error) {
	if fr.err != nil {
		return 0, fr.err
	}
	f := fr.f
	for {
		f.mu.Lock()
		limit := min(f.avail, fr.end)
		if !f.verified {
			limit = min(limit, fr.end-min(fr.end-fr.start, Holdback))
		}
		verified, ferr, wake, src := f.verified, f.err, f.wake, f.src
		f.mu.Unlock()
		if fr.off < limit {
			n, err := readFull(src, p[:min(int64(len(p)), limit-fr.off)], fr.off)
			fr.off += int64(n)
			if err != nil {
				fr.err = errkind.IO(err, "regional cache: reading blob %s at offset %d", digest.String(f.d), fr.off)
				return n, fr.err
			}
			return n, nil
		}
		switch {
		case ferr != nil:
			fr.err = ferr
			return 0, ferr
		case verified && fr.off >= fr.end:
			fr.err = io.EOF
			return 0, io.EOF
		}
		select {
		case <-wake:
		case <-fr.ctx.Done():
			fr.err = fmt.Errorf("regional cache: reading blob %s: %w", digest.String(f.d), status.FromContextError(fr.ctx.Err()).Err())
			return 0, fr.err
		}
	}
}

// readFull reads len(p) bytes at off from src, which holds them (a file
// may end before a run of zeros written as a hole: it reads as zeros).
func readFull(src io.ReaderAt, p []byte, off int64) (int, error) {
	n, err := src.ReadAt(p, off)
	if n < len(p) && errors.Is(err, io.EOF) {
		clear(p[n:])
		return len(p), nil
	}
	if n == len(p) {
		return n, nil
	}
	return n, err
}

func (fr *fillReader) Close() error {
	if !fr.closed {
		fr.closed = true
		if fr.err == nil {
			fr.err = errkind.New(errkind.Internal, "regional cache: reading blob %s: reader closed", digest.String(fr.f.d))
		}
		fr.f.unref()
	}
	return nil
}

// localMiss reports whether a read of the disk that failed with err
// should be answered by a fetch: the disk lacks the blob, dropped a
// corrupt copy, or cannot read it now.
func localMiss(err error) bool {
	return !errkind.Is(err, errkind.InvalidArgument) && !errkind.Is(err, errkind.Canceled)
}

// Read serves d from the disk, else from a fetch from the upstream shared
// by every reader of d (see the package documentation). A blob absent
// upstream is NotFound, when the first byte is read.
func (r *Regional) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	rc, err := r.local.Read(ctx, ns, d)
	if err == nil {
		r.stats.localHits.Add(1)
		return rc, nil
	}
	if !localMiss(err) {
		return nil, err
	}
	return r.open(ctx, ns, d, 0, d.GetSizeBytes())
}

// ReadRange serves n bytes of d from off: from the disk's verified copy,
// else from the fetch of the whole blob, the range's last bytes once the
// blob verified.
func (r *Regional) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	if off < 0 || n <= 0 || off >= d.GetSizeBytes() {
		return nil, errkind.New(errkind.InvalidArgument, "regional cache: reading blob %s at offset %d, %d bytes: outside its %d bytes", digest.String(d), off, n, d.GetSizeBytes())
	}
	rc, err := r.local.ReadRange(ctx, ns, d, off, n)
	if err == nil {
		r.stats.localHits.Add(1)
		return rc, nil
	}
	if !localMiss(err) {
		return nil, err
	}
	return r.open(ctx, ns, d, off, min(off+n, d.GetSizeBytes()))
}

// ReadCompressed serves d as the disk stores it, else the raw content
// from the fetch (compressed false).
func (r *Regional) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	rc, compressed, err := r.local.ReadCompressed(ctx, ns, d)
	if err == nil {
		r.stats.localHits.Add(1)
		return rc, compressed, nil
	}
	if !localMiss(err) {
		return nil, false, err
	}
	rc, err = r.open(ctx, ns, d, 0, d.GetSizeBytes())
	return rc, false, err
}
