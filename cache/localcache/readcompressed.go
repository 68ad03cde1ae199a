package localcache

import (
	"context"
	"errors"
	"io"
	"os"
	"sync"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// frameStream is ReadCompressed's stream: the frames of a verified blob,
// checked against their hash at the end. Close closes the file.
type frameStream struct {
	*frameReader
	f *os.File
}

func (s *frameStream) Close() error { return s.f.Close() }

// ReadCompressed opens the blob d as it is stored. When compressed is true
// the stream is zstd frames (without the cache's trailer) that this
// process has verified to decode to d's content, once (when it wrote them,
// or here, decoding them before returning); the frames are hashed as they
// are read and checked against the hash recorded when they were verified,
// so the stream ends with a DataLoss error naming d instead of io.EOF
// when a byte differs (and the blob is removed). When compressed is false
// the stream is the raw content, verified as Read verifies it. A missing
// blob is NotFound.
func (c *Cache) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	f, e, size, err := c.openFile(ctx, ns, d)
	if err != nil {
		return nil, false, err
	}
	fm := formOf(f, d, size)
	if !fm.zst {
		rc, err := c.readRaw(f, e, ns, d)
		return rc, false, err
	}
	defer c.unpin(e)
	bad := c.badFunc(e, f)
	c.mu.Lock()
	verified := e.verified
	c.mu.Unlock()
	if !verified {
		if err := c.verifyCompressed(f, fm, ns, d, bad); err != nil {
			f.Close()
			return nil, false, err
		}
		c.setVerified(e)
	}
	return &frameStream{frameReader: newFrameReader(f, fm, d, bad), f: f}, true, nil
}

// verifyCompressed decodes the frames of a compressed blob and checks the
// content against d (and the frames against their hash).
func (c *Cache) verifyCompressed(f *os.File, fm form, ns cache.Namespace, d *repb.Digest, bad func()) error {
	v, err := digest.NewVerifier(ns.DigestFunction(), d)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "verifying blob %s: %v", digest.String(d), err)
	}
	dr, err := newDecodingReader(f, fm, d, bad)
	if err != nil {
		return err
	}
	defer func() {
		putDecoder(dr.dec)
		dr.dec = nil
	}()
	bp := copyBufs.Get().(*[]byte)
	_, err = io.CopyBuffer(v, dr, *bp)
	copyBufs.Put(bp)
	if err != nil {
		return err
	}
	if err := v.Check(); err != nil {
		bad()
		return cache.Corruptf("corrupt blob %s in local cache: %v (removed)", digest.String(d), err)
	}
	return nil
}

// badFunc returns a function that removes e's file f as corrupt, once.
func (c *Cache) badFunc(e *entry, f *os.File) func() {
	var once sync.Once
	return func() { once.Do(func() { c.removeCorrupt(e, f) }) }
}

func (c *Cache) setVerified(e *entry) {
	c.mu.Lock()
	e.verified = true
	c.mu.Unlock()
}

// readCompressedPlain is Read of a compressed blob: the decoded content,
// verified against d unless this process has verified the frames already
// (they are then checked against their hash as they are decoded).
func (c *Cache) readCompressedPlain(f *os.File, e *entry, fm form, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	bad := c.badFunc(e, f)
	dr, err := newDecodingReader(f, fm, d, bad)
	if err != nil {
		f.Close()
		return nil, err
	}
	return c.verifiedStream(dr, f, e, ns, d)
}

// openCompressed is Open of a compressed blob: its content is decoded into
// an unnamed file in the scratch directory (zero runs left as holes), read
// by the returned Blob and gone once it is closed. The content is verified
// while it is decoded unless this process has verified the frames (then
// they are checked against their hash).
func (c *Cache) openCompressed(ctx context.Context, f *os.File, e *entry, fm form, ns cache.Namespace, d *repb.Digest) (cache.Blob, error) {
	defer f.Close()
	bad := c.badFunc(e, f)
	c.mu.Lock()
	verified := e.verified
	c.mu.Unlock()
	fail := func(err error) (cache.Blob, error) {
		c.unpin(e)
		return nil, err
	}
	out, err := c.scratchFile()
	if err != nil {
		return fail(errkind.IO(errnoOf(err), "opening blob %s: decoded copy", digest.String(d)))
	}
	dr, err := newDecodingReader(f, fm, d, bad)
	if err != nil {
		out.Close()
		return fail(err)
	}
	var src io.Reader = dr
	var v *digest.Verifier
	if !verified {
		if v, err = digest.NewVerifier(ns.DigestFunction(), d); err != nil {
			putDecoder(dr.dec)
			out.Close()
			return fail(status.Errorf(codes.InvalidArgument, "verifying blob %s: %v", digest.String(d), err))
		}
		src = io.TeeReader(dr, v)
	}
	_, err = copySparse(ctx, out, src, d.SizeBytes)
	putDecoder(dr.dec)
	dr.dec = nil
	if err == nil && v != nil {
		if cerr := v.Check(); cerr != nil {
			bad()
			err = cache.Corruptf("corrupt blob %s in local cache: %v (removed)", digest.String(d), cerr)
		}
	}
	if err != nil {
		out.Close()
		if dr.err != nil && !errors.Is(dr.err, io.EOF) {
			err = dr.err
		}
		if status.Code(err) == codes.Unknown {
			err = errkind.IO(errnoOf(err), "opening blob %s", digest.String(d))
		}
		return fail(err)
	}
	if !verified {
		c.setVerified(e)
	}
	return &blob{f: out, size: d.SizeBytes, c: c, e: e}, nil
}

// scratchFile creates an unnamed file in the scratch directory (a named
// one removed at once where O_TMPFILE is not supported).
func (c *Cache) scratchFile() (*os.File, error) {
	f, err := os.OpenFile(c.TempDir(), os.O_RDWR|unix.O_TMPFILE, 0o600)
	if err == nil {
		return f, nil
	}
	f, err = os.CreateTemp(c.TempDir(), "decoded-*")
	if err != nil {
		return nil, err
	}
	os.Remove(f.Name())
	return f, nil
}
