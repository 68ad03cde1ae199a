package localcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// PutFile stores the file f, whose content the caller has just verified
// against d, by renaming it into place: f must be a regular file in
// TempDir (or elsewhere on the cache's filesystem; otherwise it is copied
// and verified). res, when not nil, is the reservation that covered f's
// space: it is released as f becomes an entry, so the space is counted
// once. The caller still closes f; once PutFile succeeds its name is gone
// (renamed, or removed when the blob was stored already).
func (c *Cache) PutFile(ctx context.Context, ns cache.Namespace, d *repb.Digest, f *os.File, res cache.Reservation) error {
	defer release(res)
	if err := checkDigest(ns, d); err != nil {
		return fmt.Errorf("writing blob: %w", err)
	}
	rel := casRel(ns.DigestFunction(), d)
	if c.verifiedPresent(rel) {
		os.Remove(f.Name())
		return nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return errkind.IO(errnoOf(err), "writing blob %s to local cache %s: stat", digest.String(d), c.dir)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size != d.SizeBytes {
		return status.Errorf(codes.InvalidArgument, "writing blob %s to local cache %s: the file holds %d bytes", digest.String(d), c.dir, st.Size)
	}
	if c.opts.Compression && d.SizeBytes >= minCompressed {
		g, err := c.tempFile()
		if err != nil {
			return fmt.Errorf("writing blob %s to local cache %s: %w", digest.String(d), c.dir, err)
		}
		_, err = c.compressInto(ctx, g, io.NewSectionReader(f, 0, d.SizeBytes), d.SizeBytes, st.Blocks*512)
		if err == nil {
			size, err := c.placeFile(g, rel, func(*os.File) error { return nil })
			if err != nil {
				return fmt.Errorf("writing blob %s to local cache %s: %w", digest.String(d), c.dir, err)
			}
			os.Remove(f.Name())
			c.storedReserved(rel, size, true, res)
			return nil
		}
		g.Close()
		os.Remove(g.Name())
		if !errors.Is(err, errNotWorth) {
			return fmt.Errorf("writing blob %s to local cache %s: %w", digest.String(d), c.dir, err)
		}
	}
	err := c.renameInto(f, rel)
	if errors.Is(err, unix.EXDEV) {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return errkind.IO(errnoOf(err), "writing blob %s to local cache %s", digest.String(d), c.dir)
		}
		if err := c.Write(ctx, ns, d, f); err != nil {
			return err
		}
		os.Remove(f.Name())
		return nil
	}
	if err != nil {
		return errkind.IO(unwrapLink(err), "writing blob %s to local cache %s: renaming into place", digest.String(d), c.dir)
	}
	c.storedReserved(rel, st.Blocks*512, true, res)
	return nil
}

// renameInto makes the verified file f the entry rel.
func (c *Cache) renameInto(f *os.File, rel string) error {
	if err := f.Chmod(0o644); err != nil {
		return err
	}
	dst := filepath.Join(c.dir, rel)
	err := os.Rename(f.Name(), dst)
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(filepath.Dir(dst), 0o755); err == nil {
			err = os.Rename(f.Name(), dst)
		}
	}
	return err
}

// PutCompressedFile stores the blob d from the file f, whose first n bytes
// are zstd frames that the caller has just verified to decode to exactly
// d's content (with windows of at most MaxWindow, as a bounded decoder
// checks). When they shrink the blob enough they are stored as they are
// (the cache's trailer appended, f renamed into place); otherwise they are
// decoded and the content stored raw. f must be a regular file in TempDir;
// res, when not nil, is the reservation that covered f's space (released
// as the blob becomes an entry). The caller still closes f; once
// PutCompressedFile succeeds its name is gone.
func (c *Cache) PutCompressedFile(ctx context.Context, ns cache.Namespace, d *repb.Digest, f *os.File, n int64, res cache.Reservation) error {
	defer release(res)
	if err := checkDigest(ns, d); err != nil {
		return fmt.Errorf("writing blob: %w", err)
	}
	rel := casRel(ns.DigestFunction(), d)
	if c.verifiedPresent(rel) {
		os.Remove(f.Name())
		return nil
	}
	fail := func(err error) error {
		return errkind.IO(errnoOf(err), "writing blob %s to local cache %s", digest.String(d), c.dir)
	}
	if total := n + trailerLen; d.SizeBytes >= minCompressed && total < d.SizeBytes && worthCompressing(total, d.SizeBytes) {
		h := blake3.New()
		if _, err := copyBuffer(h, io.NewSectionReader(f, 0, n)); err != nil {
			return fail(err)
		}
		if _, err := f.WriteAt(trailer(h.Sum(nil)), n); err != nil {
			return fail(err)
		}
		if err := f.Truncate(total); err != nil {
			return fail(err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &st); err != nil {
			return fail(err)
		}
		if err := c.renameInto(f, rel); err != nil {
			return errkind.IO(unwrapLink(err), "writing blob %s to local cache %s: renaming into place", digest.String(d), c.dir)
		}
		c.storedReserved(rel, st.Blocks*512, true, res)
		return nil
	}
	dec := decPool.Get().(*zstd.Decoder)
	defer putDecoder(dec)
	if err := dec.Reset(io.NewSectionReader(f, 0, n)); err != nil {
		return status.Errorf(codes.InvalidArgument, "writing blob %s to local cache %s: zstd: %v", digest.String(d), c.dir, err)
	}
	size, err := c.writeFile(ctx, rel, func(g *os.File) error {
		m, err := copySparse(ctx, g, dec, d.SizeBytes)
		if err == nil && m != d.SizeBytes {
			err = status.Errorf(codes.InvalidArgument, "zstd data decodes to %d bytes, want %d", m, d.SizeBytes)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("writing blob %s to local cache %s: %w", digest.String(d), c.dir, err)
	}
	os.Remove(f.Name())
	c.storedReserved(rel, size, true, res)
	return nil
}

// release gives res back, if there is one (Release is idempotent).
func release(res cache.Reservation) {
	if res != nil {
		res.Release()
	}
}
