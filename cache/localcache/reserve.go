package localcache

import (
	"github.com/snaploader/snaploader/cache"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Reserved is the disk space promised to writes in flight (Reserve).
func (c *Cache) Reserved() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reserved
}

// Reservation is disk space promised to a write in flight, counted toward
// Options.MaxBytes together with the entries until it is released or its
// file becomes an entry (PutFile).
type Reservation struct {
	c    *Cache
	n    int64
	done bool // under c.mu
}

// Size is the number of bytes reserved.
func (r *Reservation) Size() int64 {
	r.c.mu.Lock()
	defer r.c.mu.Unlock()
	return r.n
}

// Release returns the space; it is idempotent.
func (r *Reservation) Release() {
	if r == nil {
		return
	}
	r.c.mu.Lock()
	r.releaseLocked()
	r.c.mu.Unlock()
}

// Resize changes the reservation to n bytes: shrinking always succeeds;
// growing evicts as Reserve does and is ResourceExhausted (the reservation
// unchanged) when the bound cannot hold it. A released reservation cannot
// be resized.
func (r *Reservation) Resize(n int64) error {
	c := r.c
	c.mu.Lock()
	if r.done {
		c.mu.Unlock()
		return status.Error(codes.FailedPrecondition, "resizing a released reservation")
	}
	delta := n - r.n
	if delta <= 0 {
		c.reserved += delta
		r.n = n
		c.mu.Unlock()
		return nil
	}
	if c.reserved+delta > c.opts.MaxBytes {
		reserved := c.reserved
		c.mu.Unlock()
		return status.Errorf(codes.ResourceExhausted, "local cache: reserving %d more bytes: %d bytes are reserved by writes in flight, bound %d", delta, reserved, c.opts.MaxBytes)
	}
	c.reserved += delta
	victims := c.evictLocked(nil)
	if c.usage+c.reserved > c.opts.MaxBytes {
		c.reserved -= delta
		usage := c.usage
		c.mu.Unlock()
		c.remove(victims)
		return status.Errorf(codes.ResourceExhausted, "local cache: reserving %d more bytes: %d bytes of entries in use and %d reserved, bound %d", delta, usage, c.reserved, c.opts.MaxBytes)
	}
	r.n = n
	c.mu.Unlock()
	c.remove(victims)
	return nil
}

func (r *Reservation) releaseLocked() {
	if !r.done {
		r.done = true
		r.c.reserved -= r.n
	}
}

// Reserve promises n bytes of disk to a write in flight (a file the caller
// keeps in TempDir, e.g. an upload being received), evicting least
// recently used entries so that entries plus reservations stay within
// Options.MaxBytes. It is ResourceExhausted when that is impossible: the
// reservations alone, or with the pinned entries, would exceed the bound.
func (c *Cache) Reserve(n int64) (cache.Reservation, error) {
	r, err := c.reserve(n)
	if err != nil {
		return nil, err
	}
	return r, nil
}

func (c *Cache) reserve(n int64) (*Reservation, error) {
	if n < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "reserving %d bytes", n)
	}
	c.mu.Lock()
	if c.reserved+n > c.opts.MaxBytes {
		reserved := c.reserved
		c.mu.Unlock()
		return nil, status.Errorf(codes.ResourceExhausted, "local cache: reserving %d bytes: %d bytes are reserved by writes in flight, bound %d", n, reserved, c.opts.MaxBytes)
	}
	c.reserved += n
	victims := c.evictLocked(nil)
	if c.usage+c.reserved > c.opts.MaxBytes {
		c.reserved -= n
		usage := c.usage
		c.mu.Unlock()
		c.remove(victims)
		return nil, status.Errorf(codes.ResourceExhausted, "local cache: reserving %d bytes: %d bytes of entries in use and %d reserved, bound %d", n, usage, c.reserved, c.opts.MaxBytes)
	}
	r := &Reservation{c: c, n: n}
	c.mu.Unlock()
	c.remove(victims)
	return r, nil
}
