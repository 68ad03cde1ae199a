package cow

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// WriteAt writes p at off. Writing beyond Size is an error and writes
// nothing.
func (s *Store) WriteAt(p []byte, off int64) (int, error) {
	if s.closed.Load() {
		return 0, s.errClosed("writing", off)
	}
	size := s.Size()
	if off < 0 || off > size || int64(len(p)) > size-off {
		return 0, status.Errorf(codes.InvalidArgument, "writing %d bytes to chunked file %q at offset %d: beyond its size %d", len(p), s.name, off, size)
	}
	n := 0
	for n < len(p) {
		o := off + int64(n)
		idx := o / s.cs
		in := o - idx*s.cs
		clen := s.chunkLen(idx, size)
		l := int(min(int64(len(p)-n), clen-in))
		c := s.lookupOrCreate(idx)
		s.touch(c, idx)
		if err := s.writeChunk(c, p[n:n+l], in, clen); err != nil {
			return n, err
		}
		n += l
	}
	return n, nil
}

func (s *Store) writeChunk(c *chunk, p []byte, in, clen int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := s.makeDirtyLocked(c, in == 0 && int64(len(p)) == clen); err != nil {
		return err
	}
	ov, err := s.overlayFile()
	if err == nil {
		_, err = ov.WriteAt(p, c.off+in)
	}
	if err != nil {
		return fmt.Errorf("writing chunked file %q at offset %d to its overlay: %w", s.name, c.off+in, err)
	}
	c.gen++
	return nil
}

// makeDirtyLocked gives c a private copy in the overlay. Unless overwrite
// says the caller replaces the whole chunk, its current content is copied in.
func (s *Store) makeDirtyLocked(c *chunk, overwrite bool) error {
	if c.dirty {
		return nil
	}
	if !c.overlay && c.d != nil && !overwrite {
		if c.blob == nil {
			if err := s.openLocked(c, true); err != nil {
				return err
			}
		}
		if err := s.copyToOverlay(c); err != nil {
			return err
		}
	}
	if c.blob != nil {
		c.blob.Close()
		c.blob = nil
	}
	c.overlay = true
	c.dirty = true
	c.settled.Store(true)
	s.dirty.Add(1)
	return nil
}

func (s *Store) copyToOverlay(c *chunk) error {
	n := c.d.SizeBytes
	bp := s.getBuf()
	defer s.bufs.Put(bp)
	buf := (*bp)[:n]
	m, err := c.blob.ReadAt(buf, 0)
	if int64(m) == n {
		err = nil
	} else if err == nil || errors.Is(err, io.EOF) {
		err = cache.Corruptf("blob is shorter than its digest says")
	}
	if err != nil {
		return fmt.Errorf("copying chunk at offset %d (digest %s) of chunked file %q: %w", c.off, digest.String(c.d), s.name, err)
	}
	ov, err := s.overlayFile()
	if err == nil {
		_, err = ov.WriteAt(buf, c.off)
	}
	if err != nil {
		return fmt.Errorf("copying chunk at offset %d of chunked file %q to its overlay: %w", c.off, s.name, err)
	}
	return nil
}

func (s *Store) getBuf() *[]byte {
	if bp, ok := s.bufs.Get().(*[]byte); ok {
		return bp
	}
	b := make([]byte, s.cs)
	return &b
}

// overlayFile returns the overlay, creating it on first use. It is unlinked
// at once, so nothing is left behind even if the process dies.
func (s *Store) overlayFile() (*os.File, error) {
	s.ovMu.Lock()
	defer s.ovMu.Unlock()
	if s.overlay != nil {
		return s.overlay, nil
	}
	if s.closed.Load() {
		return nil, s.errClosed("creating overlay of", 0)
	}
	f, err := os.CreateTemp(s.opts.TempDir, "cow-overlay-*")
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "creating overlay file: %v", err)
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, status.Errorf(codes.Unavailable, "unlinking overlay file: %v", err)
	}
	s.overlay = f
	return f, nil
}

// readOverlay reads p at off from the overlay; bytes past its end are zeros.
func (s *Store) readOverlay(p []byte, off int64) error {
	ov, err := s.overlayFile()
	if err != nil {
		return err
	}
	n, err := ov.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		err = nil
	}
	return err
}

func (s *Store) punchOverlay(off, n int64) {
	s.ovMu.Lock()
	ov := s.overlay
	s.ovMu.Unlock()
	if ov != nil {
		// Best effort: the range is zeros either way.
		_ = unix.Fallocate(int(ov.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
}

// Resize grows the store to n bytes; the new area reads as zeros. Shrinking
// is an InvalidArgument error.
func (s *Store) Resize(n int64) error {
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	size := s.Size()
	if n < size || n > MaxSize {
		return status.Errorf(codes.InvalidArgument, "resizing chunked file %q from %d to %d bytes: a store can only grow, up to %d", s.name, size, n, int64(MaxSize))
	}
	if n == size {
		return nil
	}
	// A short last chunk that grows no longer matches its digest: give it a
	// private copy so the next Save stores it at its new length.
	if last := (size - 1) / s.cs; size > 0 && size%s.cs != 0 {
		if c := s.lookup(last); c != nil {
			var err error
			c.mu.Lock()
			if c.d != nil {
				err = s.makeDirtyLocked(c, false)
				c.gen++
			}
			c.mu.Unlock()
			if err != nil {
				return fmt.Errorf("resizing chunked file %q: %w", s.name, err)
			}
		}
	}
	s.mu.Lock()
	s.size = n
	s.mu.Unlock()
	return nil
}

// Dirty returns the offsets of the dirty chunks, ascending.
func (s *Store) Dirty() []int64 {
	var out []int64
	for _, c := range s.snapshotChunks() {
		c.mu.RLock()
		if c.dirty {
			out = append(out, c.off)
		}
		c.mu.RUnlock()
	}
	return out
}
