package cow

import (
	"errors"
	"fmt"
	"io"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/telemetry"
)

// ReadAt reads len(p) bytes at off, following io.ReaderAt: a read that
// reaches the end returns the bytes before it and io.EOF; a read starting at
// Size returns 0, io.EOF; one starting beyond it is an error.
func (s *Store) ReadAt(p []byte, off int64) (int, error) {
	if s.closed.Load() {
		return 0, s.errClosed("reading", off)
	}
	size := s.Size()
	if off < 0 || off > size {
		return 0, status.Errorf(codes.InvalidArgument, "reading chunked file %q: offset %d is outside its size %d", s.name, off, size)
	}
	want := len(p)
	if int64(want) > size-off {
		p = p[:size-off]
	}
	n := 0
	for n < len(p) {
		o := off + int64(n)
		idx := o / s.cs
		in := o - idx*s.cs
		l := int(min(int64(len(p)-n), s.chunkLen(idx, size)-in))
		c := s.lookup(idx)
		if c == nil {
			clear(p[n : n+l])
		} else {
			s.touch(c, idx)
			if err := s.readChunk(c, p[n:n+l], in); err != nil {
				return n, err
			}
		}
		n += l
	}
	if n < want {
		return n, io.EOF
	}
	return n, nil
}

func (s *Store) readChunk(c *chunk, p []byte, in int64) error {
	for {
		// The chunk is being opened (read ahead, say): its lock is held
		// until the whole chunk is in, and a small read need not wait.
		if op := c.opening.Load(); op != nil {
			s.faults.enter()
			done, err := s.readRange(c, op.d, op.ob, p, in)
			s.faults.leave()
			if done || err != nil {
				return err
			}
		}
		c.mu.RLock()
		switch {
		case c.overlay:
			err := s.readOverlay(p, c.off+in)
			c.mu.RUnlock()
			if err != nil {
				return fmt.Errorf("reading chunked file %q at offset %d from its overlay: %w", s.name, c.off+in, err)
			}
			return nil
		case c.d == nil:
			c.mu.RUnlock()
			clear(p)
			return nil
		case c.blob != nil:
			n, err := c.blob.ReadAt(p, in)
			d := c.d
			c.mu.RUnlock()
			if n == len(p) {
				return nil
			}
			if err == nil || errors.Is(err, io.EOF) {
				err = cache.Corruptf("blob is shorter than %d bytes", in+int64(len(p)))
			}
			return fmt.Errorf("reading chunked file %q at offset %d (chunk %d, digest %s): %w", s.name, c.off+in, c.off, digest.String(d), err)
		}
		ob, d := c.ob, c.d
		c.mu.RUnlock()
		s.faults.enter()
		done, err := s.readRange(c, d, ob, p, in)
		if !done && err == nil {
			err = s.fetch(c, true)
		}
		s.faults.leave()
		if done || err != nil {
			return err
		}
	}
}

// WithCleanChunk calls fn with the source blob of the chunk holding off when
// that chunk is clean, fetching it first as a read would (and scheduling
// read-ahead); no write changes the chunk while fn runs. It returns false
// without calling fn when the chunk is a hole or has a private copy (read
// those with ReadAt). fn's error is returned wrapped with the file, offset
// and digest.
func (s *Store) WithCleanChunk(off int64, fn func(b cache.Blob) error) (bool, error) {
	if s.closed.Load() {
		return false, s.errClosed("reading", off)
	}
	if off < 0 || off >= s.Size() {
		return false, status.Errorf(codes.InvalidArgument, "reading chunked file %q: offset %d is outside its size %d", s.name, off, s.Size())
	}
	idx := off / s.cs
	c := s.lookup(idx)
	if c == nil {
		return false, nil
	}
	s.touch(c, idx)
	for {
		c.mu.RLock()
		switch {
		case c.overlay || c.d == nil:
			c.mu.RUnlock()
			return false, nil
		case c.blob != nil:
			err := fn(c.blob)
			d := c.d
			c.mu.RUnlock()
			if err != nil {
				return true, fmt.Errorf("reading chunked file %q at offset %d (digest %s): %w", s.name, c.off, digest.String(d), err)
			}
			return true, nil
		}
		c.mu.RUnlock()
		s.faults.enter()
		err := s.fetch(c, true)
		s.faults.leave()
		if err != nil {
			return false, err
		}
	}
}

// fetch opens c's blob unless it needs none.
func (s *Store) fetch(c *chunk, foreground bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.overlay || c.d == nil || c.blob != nil {
		return nil
	}
	return s.openLocked(c, foreground)
}

func (s *Store) openLocked(c *chunk, foreground bool) error {
	if s.closed.Load() {
		return s.errClosed("fetching chunk of", c.off)
	}
	ctx, span := telemetry.Start(s.ctx, "snaploader.chunk_fetch",
		attribute.String("file", s.name), attribute.Int64("offset", c.off), attribute.Int64("bytes", c.d.SizeBytes),
		attribute.String("digest", c.d.GetHash()), attribute.Bool("foreground", foreground))
	c.opening.Store(&cleanDigests{c.d, c.ob})
	defer c.opening.Store(nil)
	start := time.Now()
	ticket := s.link.begin(start)
	b, tier, err := s.src.OpenTier(ctx, s.ns, c.d)
	if err == nil && b.Size() != c.d.SizeBytes {
		b.Close()
		err = cache.Corruptf("source blob has %d bytes", b.Size())
	}
	if err != nil {
		s.link.end(ticket, 0, time.Now(), false)
		s.fetchErrors.Add(1)
		err = fmt.Errorf("fetching chunk at offset %d (digest %s) of chunked file %q: %w", c.off, digest.String(c.d), s.name, err)
		telemetry.End(span, err)
		return err
	}
	telemetry.End(span, nil)
	wait := time.Since(start)
	// Only fetches that crossed a link size read-ahead to it.
	s.link.end(ticket, c.d.SizeBytes, start.Add(wait), tier != cache.TierLocal)
	if old := s.fetchLat.Load(); old == 0 {
		s.fetchLat.Store(int64(wait))
	} else {
		s.fetchLat.Store((7*old + int64(wait)) / 8)
	}
	if s.opts.OnFetch != nil {
		s.opts.OnFetch(FetchEvent{File: s.name, Offset: c.off, Bytes: c.d.SizeBytes, Foreground: foreground, Wait: wait, Tier: tier})
	}
	if s.closed.Load() {
		b.Close()
		return s.errClosed("fetching chunk of", c.off)
	}
	c.blob = b
	c.settled.Store(true)
	s.fetched.Add(1)
	s.fetchedBytes.Add(c.d.SizeBytes)
	if foreground {
		s.fgFetches.Add(1)
	} else {
		s.prefetched.Add(1)
	}
	return nil
}
