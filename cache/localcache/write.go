package localcache

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/fileio"
)

// verifiedPresent reports whether the entry rel is present and verified
// (a write of it can be skipped).
func (c *Cache) verifiedPresent(rel string) bool {
	e := c.lookup(rel, false)
	if e == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return e.verified
}

// Write stores the blob d read from r. The content is verified while it is
// written to a temporary file; on a mismatch nothing is stored and the error
// is InvalidArgument naming d. An error from r keeps its status code. A blob
// already present and verified is not rewritten (r is not read).
func (c *Cache) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	if err := checkDigest(ns, d); err != nil {
		return fmt.Errorf("writing blob: %w", err)
	}
	rel := casRel(ns.DigestFunction(), d)
	if c.verifiedPresent(rel) {
		return nil
	}
	v, err := digest.NewVerifier(ns.DigestFunction(), d)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "writing blob %s: %v", digest.String(d), err)
	}
	size, err := c.writeBlob(ctx, rel, d, func(f *os.File) error {
		if _, err := copySparse(ctx, f, io.TeeReader(r, v), d.SizeBytes); err != nil {
			return err
		}
		if cerr := v.Check(); cerr != nil {
			return status.Errorf(codes.InvalidArgument, "content does not match digest: %v", cerr)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("writing blob %s to local cache %s: %w", digest.String(d), c.dir, err)
	}
	c.stored(rel, size, true)
	return nil
}

// WriteReporting is Write; the blob is stored (or was already) when it
// returns nil.
func (c *Cache) WriteReporting(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) (bool, error) {
	return true, c.Write(ctx, ns, d, r)
}

// copySparse copies r to f, leaving page-aligned zero runs of at least
// fileio.SparseHoleMin bytes as holes. It reads at most limit+1 bytes so that an
// over-long stream is noticed without reading it all.
func copySparse(ctx context.Context, f *os.File, r io.Reader, limit int64) (int64, error) {
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := *bp
	var off int64
	r = io.LimitReader(r, limit+1)
	for {
		if err := ctx.Err(); err != nil {
			return off, status.FromContextError(err).Err()
		}
		n, rerr := io.ReadFull(r, buf)
		if err := writeSparse(f, buf[:n], off); err != nil {
			return off, err
		}
		off += int64(n)
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return off, fmt.Errorf("reading content at offset %d: %w", off, rerr)
		}
	}
	if err := f.Truncate(off); err != nil {
		return off, errkind.IO(errnoOf(err), "truncating to %d", off)
	}
	return off, nil
}

// writeSparse is fileio.WriteSparse with the error in the cache's words.
func writeSparse(f *os.File, b []byte, off int64) error {
	if err := fileio.WriteSparse(f, b, off); err != nil {
		return errkind.IO(errnoOf(err), "writing at offset %d", off)
	}
	return nil
}

// PutHashed stores data under d, which the caller has just computed from
// these very bytes (as the copy-on-write store does when it saves), so the
// content is not hashed a second time. Its size is still checked.
func (c *Cache) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	if err := checkDigest(ns, d); err != nil {
		return fmt.Errorf("writing blob: %w", err)
	}
	if int64(len(data)) != d.SizeBytes {
		return status.Errorf(codes.InvalidArgument, "writing blob %s: got %d bytes", digest.String(d), len(data))
	}
	rel := casRel(ns.DigestFunction(), d)
	if c.verifiedPresent(rel) {
		return nil
	}
	var z []byte
	if c.opts.Compression {
		z = c.compressBytes(ctx, data)
	}
	size, err := c.writeFile(ctx, rel, func(f *os.File) error {
		if z != nil {
			if _, err := f.Write(z); err != nil {
				return errkind.IO(errnoOf(err), "writing compressed content")
			}
			return nil
		}
		if err := writeSparse(f, data, 0); err != nil {
			return err
		}
		return f.Truncate(int64(len(data)))
	})
	if err != nil {
		return fmt.Errorf("writing blob %s to local cache %s: %w", digest.String(d), c.dir, err)
	}
	c.stored(rel, size, true)
	return nil
}

// writeFile writes a temporary file with fill and renames it to rel. It
// returns the file's disk usage. The temporary file is removed on failure.
func (c *Cache) writeFile(ctx context.Context, rel string, fill func(*os.File) error) (int64, error) {
	f, err := c.tempFile()
	if err != nil {
		return 0, err
	}
	return c.placeFile(f, rel, fill)
}

// writeBlob is writeFile for a blob of d's size whose raw content fill
// writes: with Options.Compression the content is compressed from the
// temporary file into another one, which takes its place when that is
// worth it.
func (c *Cache) writeBlob(ctx context.Context, rel string, d *repb.Digest, fill func(*os.File) error) (int64, error) {
	if !c.opts.Compression || d.SizeBytes < minCompressed {
		return c.writeFile(ctx, rel, fill)
	}
	f, err := c.tempFile()
	if err != nil {
		return 0, err
	}
	if err := fill(f); err != nil {
		f.Close()
		os.Remove(f.Name())
		return 0, err
	}
	return c.placeCompressed(ctx, f, rel, d)
}

// placeCompressed renames to rel either the raw temporary file f or, when
// that is worth it, a compressed copy of it; f is closed.
func (c *Cache) placeCompressed(ctx context.Context, f *os.File, rel string, d *repb.Digest) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		os.Remove(f.Name())
		return 0, errkind.IO(errnoOf(err), "stat of the temporary file")
	}
	g, err := c.tempFile()
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return 0, err
	}
	_, err = c.compressInto(ctx, g, io.NewSectionReader(f, 0, d.SizeBytes), d.SizeBytes, st.Blocks*512)
	if errors.Is(err, errNotWorth) {
		g.Close()
		os.Remove(g.Name())
		return c.placeFile(f, rel, func(*os.File) error { return nil })
	}
	f.Close()
	os.Remove(f.Name())
	return c.placeFile(g, rel, func(*os.File) error { return err })
}

// tempFile creates a locked temporary file in tmp/.
func (c *Cache) tempFile() (*os.File, error) {
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(c.dir, tmpDir, hex.EncodeToString(rnd[:])+".tmp")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, errkind.IO(errnoOf(err), "creating temporary file")
	}
	// The lock tells other processes cleaning tmp/ that this file is live.
	unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	return f, nil
}

// placeFile fills the temporary file f and renames it to rel, returning
// its disk usage; f is closed, and removed on failure.
func (c *Cache) placeFile(f *os.File, rel string, fill func(*os.File) error) (int64, error) {
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := fill(f); err != nil {
		return 0, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, errkind.IO(errnoOf(err), "stat of the temporary file")
	}
	dst := filepath.Join(c.dir, rel)
	if err := os.Rename(tmp, dst); err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			return 0, errkind.IO(unwrapLink(err), "renaming into place")
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return 0, errkind.IO(errnoOf(err), "creating the blob's directory")
		}
		if err := os.Rename(tmp, dst); err != nil {
			return 0, errkind.IO(unwrapLink(err), "renaming into place")
		}
	}
	ok = true
	f.Close()
	return st.Blocks * 512, nil
}

// stored indexes a file this process just wrote, then evicts (and rescans
// when due).
func (c *Cache) stored(rel string, size int64, verified bool) {
	c.storedReserved(rel, size, verified, nil)
}

// storedReserved is stored for a file that res (if not nil) covered: the
// reservation is released just before the entry is counted, so the space
// is never counted twice (the eviction that follows keeps entries and
// reservations within the bound).
func (c *Cache) storedReserved(rel string, size int64, verified bool, res cache.Reservation) {
	release(res)
	now := time.Now()
	c.mu.Lock()
	e := c.entries[rel]
	if e == nil {
		e = &entry{rel: rel, size: size}
		c.addLocked(e)
	} else {
		c.usage += size - e.size
		e.size = size
	}
	e.verified = verified
	c.touchLocked(e, now)
	c.sinceScan += size
	due := !c.scanning && (c.sinceScan >= c.opts.RescanBytes || now.Sub(c.lastScan) >= c.opts.RescanInterval)
	var victims []string
	if !due {
		victims = c.evictLocked(e)
	}
	c.mu.Unlock()
	if verified {
		c.markVerified(nil, rel)
	}
	c.remove(victims)
	if due {
		c.Rescan(context.Background())
	}
}
