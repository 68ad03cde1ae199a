package localcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// Read opens the blob d for streaming. A blob this process has not verified
// is verified while streaming: a mismatch is a DataLoss error at the end of
// the stream (and the file is removed) instead of io.EOF.
func (c *Cache) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	f, e, size, err := c.openFile(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	if fm := formOf(f, d, size); fm.zst {
		defer c.unpin(e)
		return c.readCompressedPlain(f, e, fm, ns, d)
	}
	return c.readRaw(f, e, ns, d)
}

// readRaw is Read of a raw blob's file f, whose entry e is pinned (readRaw
// unpins it).
func (c *Cache) readRaw(f *os.File, e *entry, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	c.unpin(e)
	return c.verifiedStream(f, f, e, ns, d)
}

// verifiedStream returns the content stream rc of e's file f, verified
// against d while streaming unless this process has verified it already.
func (c *Cache) verifiedStream(rc io.ReadCloser, f *os.File, e *entry, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	c.mu.Lock()
	verified := e.verified
	c.mu.Unlock()
	if verified || c.markedVerified(f, e.rel) {
		return rc, nil
	}
	vr, err := cache.NewVerifyingReader(rc, ns.DigestFunction(), d)
	if err != nil {
		rc.Close()
		return nil, err
	}
	return &checkedReader{ReadCloser: vr, c: c, e: e, f: f}, nil
}

// checkedReader records the outcome of a streaming verification.
type checkedReader struct {
	io.ReadCloser
	c *Cache
	e *entry
	f *os.File
}

func (r *checkedReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	switch {
	case err == io.EOF:
		r.c.mu.Lock()
		r.e.verified = true
		r.c.mu.Unlock()
		r.c.markVerified(r.f, r.e.rel)
	case cache.IsCorrupt(err):
		r.c.removeCorrupt(r.e, r.f)
	}
	return n, err
}

// openFile opens d's file with its entry pinned and returns its size; the
// caller unpins.
func (c *Cache) openFile(ctx context.Context, ns cache.Namespace, d *repb.Digest) (*os.File, *entry, int64, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, 0, status.FromContextError(err).Err()
	}
	if err := checkDigest(ns, d); err != nil {
		return nil, nil, 0, fmt.Errorf("reading blob: %w", err)
	}
	rel := casRel(ns.DigestFunction(), d)
	e := c.lookup(rel, true)
	if e == nil {
		return nil, nil, 0, cache.NotFoundf("blob %s not in local cache", digest.String(d))
	}
	path := filepath.Join(c.dir, rel)
	// O_NONBLOCK: something other than a regular file at the path (a FIFO)
	// must not block the open; O_NOFOLLOW: nor may a symlink lead elsewhere.
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW, 0)
	if err != nil {
		c.mu.Lock()
		e.pins--
		if errors.Is(err, fs.ErrNotExist) {
			c.dropLocked(e)
		}
		c.mu.Unlock()
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil, 0, cache.NotFoundf("blob %s not in local cache (evicted)", digest.String(d))
		}
		if errors.Is(err, unix.ELOOP) {
			c.mu.Lock()
			c.dropLocked(e)
			c.mu.Unlock()
			os.Remove(path)
			return nil, nil, 0, cache.Corruptf("corrupt blob %s in local cache: not a regular file (removed)", digest.String(d))
		}
		return nil, nil, 0, errkind.IO(errnoOf(err), "opening blob %s", digest.String(d))
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		c.unpin(e)
		f.Close()
		return nil, nil, 0, errkind.IO(err, "opening blob %s: stat", digest.String(d))
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		c.unpin(e)
		c.removeCorrupt(e, f)
		f.Close()
		return nil, nil, 0, cache.Corruptf("corrupt blob %s in local cache: not a regular file (removed)", digest.String(d))
	}
	return f, e, st.Size, nil
}

// Discard removes the blob d, e.g. because a reader that verified it found
// it corrupt. A blob that is absent is not an error.
func (c *Cache) Discard(ctx context.Context, ns cache.Namespace, d *repb.Digest) error {
	if err := checkDigest(ns, d); err != nil {
		return fmt.Errorf("discarding blob: %w", err)
	}
	rel := casRel(ns.DigestFunction(), d)
	c.mu.Lock()
	if e := c.entries[rel]; e != nil {
		c.dropLocked(e)
	}
	c.mu.Unlock()
	if err := os.Remove(filepath.Join(c.dir, rel)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return errkind.IO(errnoOf(err), "discarding blob %s", digest.String(d))
	}
	return nil
}

// removeCorrupt drops e and removes its file if it is still the file f:
// only the entry that failed verification, never one written since.
func (c *Cache) removeCorrupt(e *entry, f *os.File) {
	fi, err := f.Stat()
	if err != nil {
		fi = nil
	}
	c.removeCorruptFile(e, fi)
}

// removeCorruptFile drops e and removes its file if it is still the file
// fi describes (nothing is removed when fi is nil).
func (c *Cache) removeCorruptFile(e *entry, fi os.FileInfo) {
	c.mu.Lock()
	c.dropLocked(e)
	c.mu.Unlock()
	path := filepath.Join(c.dir, e.rel)
	if pi, err := os.Lstat(path); fi != nil && err == nil && os.SameFile(fi, pi) {
		os.Remove(path)
	}
}

// Open opens the blob d for random reads; the entry is pinned against
// eviction until the Blob is closed. A blob this process has not verified is
// hashed before Open returns; a mismatch removes it and is a DataLoss error.
func (c *Cache) Open(ctx context.Context, ns cache.Namespace, d *repb.Digest) (cache.Blob, error) {
	f, e, size, err := c.openFile(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	if size != d.SizeBytes {
		if fm := formOf(f, d, size); fm.zst {
			return c.openCompressed(ctx, f, e, fm, ns, d)
		}
	}
	return c.openRaw(f, e, ns, d)
}

// openRaw is Open of a raw blob's file f, whose entry e is pinned (the
// Blob unpins it, or openRaw on failure): f is hashed first unless it is
// known verified.
func (c *Cache) openRaw(f *os.File, e *entry, ns cache.Namespace, d *repb.Digest) (cache.Blob, error) {
	c.mu.Lock()
	verified := e.verified
	c.mu.Unlock()
	if !verified && c.markedVerified(f, e.rel) {
		verified = true
		c.mu.Lock()
		e.verified = true
		c.mu.Unlock()
	}
	if !verified {
		v, err := digest.NewVerifier(ns.DigestFunction(), d)
		if err == nil {
			bp := copyBufs.Get().(*[]byte)
			_, err = io.CopyBuffer(v, io.NewSectionReader(f, 0, 1<<62), *bp)
			copyBufs.Put(bp)
			if err == nil {
				if cerr := v.Check(); cerr != nil {
					c.unpin(e)
					c.removeCorrupt(e, f)
					f.Close()
					return nil, cache.Corruptf("corrupt blob %s in local cache: %v", digest.String(d), cerr)
				}
			}
		}
		if err != nil {
			c.unpin(e)
			f.Close()
			return nil, errkind.IO(errnoOf(err), "verifying blob %s", digest.String(d))
		}
		c.mu.Lock()
		e.verified = true
		c.mu.Unlock()
		c.markVerified(f, e.rel)
	}
	return &blob{f: f, size: d.SizeBytes, c: c, e: e}, nil
}

type blob struct {
	f    *os.File
	size int64
	c    *Cache
	e    *entry
	once sync.Once
}

func (b *blob) ReadAt(p []byte, off int64) (int, error) { return b.f.ReadAt(p, off) }
func (b *blob) Size() int64                             { return b.size }
func (b *blob) Close() error {
	var err error
	b.once.Do(func() {
		b.c.unpin(b.e)
		err = b.f.Close()
	})
	return err
}

// WithContents lends fn the open file holding the blob's raw content
// from offset 0 (the cached blob itself, or the decoded copy of a
// compressed one), sparse where the content has long zero runs.
func (b *blob) WithContents(fn func(cache.Contents) error) error {
	return fn(cache.Contents{File: b.f})
}

// ReadRange reads n bytes of blob d from off (fewer at its end); see
// cache.RangeReader.
//
// A raw blob is opened (verified first unless it is known verified, see
// Open) and the range read from it. A compressed one is decoded as a
// stream: the bytes before the range are skipped, and once the range is
// read the rest is decoded too, so that the stream ends with an error
// instead of io.EOF if the blob is corrupt, without a scratch copy.
func (c *Cache) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	if err := checkDigest(ns, d); err != nil {
		return nil, fmt.Errorf("reading blob: %w", err)
	}
	if off < 0 || off > d.GetSizeBytes() || n < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "reading blob %s at offset %d, %d bytes: outside its %d bytes", digest.String(d), off, n, d.GetSizeBytes())
	}
	n = min(n, d.SizeBytes-off)
	f, e, size, err := c.openFile(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	if fm := formOf(f, d, size); fm.zst {
		defer c.unpin(e)
		rc, err := c.readCompressedPlain(f, e, fm, ns, d)
		if err != nil {
			return nil, err
		}
		if _, err := copyBuffer(io.Discard, io.LimitReader(rc, off)); err != nil {
			rc.Close()
			return nil, fmt.Errorf("reading blob %s at offset %d: %w", digest.String(d), off, err)
		}
		return &verifiedRange{rc: rc, n: n}, nil
	}
	b, err := c.openRaw(f, e, ns, d)
	if err != nil {
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{io.NewSectionReader(b, off, n), b}, nil
}

// verifiedRange is the next n bytes of a verifying stream rc, whose rest
// is drained at the end of the range so that its verdict replaces io.EOF.
type verifiedRange struct {
	rc io.ReadCloser
	n  int64
}

func (r *verifiedRange) Read(p []byte) (int, error) {
	if r.n <= 0 {
		if _, err := copyBuffer(io.Discard, r.rc); err != nil {
			return 0, err
		}
		return 0, io.EOF
	}
	if int64(len(p)) > r.n {
		p = p[:r.n]
	}
	k, err := r.rc.Read(p)
	r.n -= int64(k)
	if err == io.EOF && r.n > 0 {
		err = io.ErrUnexpectedEOF
	}
	if err == io.EOF {
		err = nil
	}
	return k, err
}

func (r *verifiedRange) Close() error { return r.rc.Close() }
