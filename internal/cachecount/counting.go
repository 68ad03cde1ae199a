// Package cachecount counts what passes through a tier, for the tests and
// benchmarks that measure how many calls and bytes reach one.
package cachecount

import (
	"context"
	"io"
	"sync/atomic"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
)

// Counting is a tier that counts the calls and bytes passing through to
// another, for tests and benchmarks. It is safe for concurrent use.
type Counting struct {
	c cache.Tier

	findMissing, findMissingDigests atomic.Int64
	reads, readBytes                atomic.Int64
	rangeReads, rangeBytes          atomic.Int64
	writes, writeBytes              atomic.Int64
	acGets, acPuts                  atomic.Int64
}

var _ cache.Tier = (*Counting)(nil)

// CountingStats are a Counting's counters. Calls are counted whether or not
// they fail; bytes are those that actually passed.
type CountingStats struct {
	FindMissing        int64 // FindMissing calls
	FindMissingDigests int64 // digests asked about
	Reads              int64 // Read calls
	ReadBytes          int64 // bytes read from returned readers
	RangeReads         int64 // ReadRange calls
	RangeBytes         int64 // bytes read from their readers
	Writes             int64 // Write calls
	WriteBytes         int64 // bytes consumed from writers' readers
	ACGets             int64 // GetActionResult calls
	ACPuts             int64 // UpdateActionResult calls
}

// NewCounting wraps c.
func NewCounting(c cache.Tier) *Counting { return &Counting{c: c} }

// Stats returns the counters so far.
func (c *Counting) Stats() CountingStats {
	return CountingStats{
		FindMissing:        c.findMissing.Load(),
		FindMissingDigests: c.findMissingDigests.Load(),
		Reads:              c.reads.Load(),
		ReadBytes:          c.readBytes.Load(),
		RangeReads:         c.rangeReads.Load(),
		RangeBytes:         c.rangeBytes.Load(),
		Writes:             c.writes.Load(),
		WriteBytes:         c.writeBytes.Load(),
		ACGets:             c.acGets.Load(),
		ACPuts:             c.acPuts.Load(),
	}
}

// FindMissing counts the call and the digests asked about.
func (c *Counting) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	c.findMissing.Add(1)
	c.findMissingDigests.Add(int64(len(ds)))
	return c.c.FindMissing(ctx, ns, ds)
}

// Read counts the call and the bytes read from the returned reader.
func (c *Counting) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	c.reads.Add(1)
	rc, err := c.c.Read(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	return countingReader{rc, &c.readBytes}, nil
}

// ReadRange counts the call and the bytes read.
func (c *Counting) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	c.rangeReads.Add(1)
	rc, err := c.c.ReadRange(ctx, ns, d, off, n)
	if err != nil {
		return nil, err
	}
	return countingReader{rc, &c.rangeBytes}, nil
}

// ReadCompressed counts the call as a read, and the bytes read (stored
// bytes, compressed or not).
func (c *Counting) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	c.reads.Add(1)
	rc, compressed, err := c.c.ReadCompressed(ctx, ns, d)
	if err != nil {
		return nil, false, err
	}
	return countingReader{rc, &c.readBytes}, compressed, nil
}

// Traits are the wrapped tier's.
func (c *Counting) Traits() cache.Traits { return c.c.Traits() }

// Down is the wrapped tier's.
func (c *Counting) Down() error { return c.c.Down() }

// Close closes the wrapped tier.
func (c *Counting) Close() error { return c.c.Close() }

// WriteCompressed counts the call as a write, and the bytes consumed from
// r (compressed).
func (c *Counting) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	c.writes.Add(1)
	return c.c.WriteCompressed(ctx, ns, d, countingReader{io.NopCloser(r), &c.writeBytes})
}

// PutHashed counts the call as a write, and data's bytes.
func (c *Counting) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	c.writes.Add(1)
	c.writeBytes.Add(int64(len(data)))
	return c.c.PutHashed(ctx, ns, d, data)
}

// Write counts the call and the bytes consumed from r.
func (c *Counting) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	c.writes.Add(1)
	return c.c.Write(ctx, ns, d, countingReader{io.NopCloser(r), &c.writeBytes})
}

// WriteReporting counts the call and the bytes consumed from r.
func (c *Counting) WriteReporting(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) (bool, error) {
	c.writes.Add(1)
	return c.c.WriteReporting(ctx, ns, d, countingReader{io.NopCloser(r), &c.writeBytes})
}

// GetActionResult counts the call.
func (c *Counting) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	c.acGets.Add(1)
	return c.c.GetActionResult(ctx, ns, key)
}

// UpdateActionResult counts the call.
func (c *Counting) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	c.acPuts.Add(1)
	return c.c.UpdateActionResult(ctx, ns, key, ar)
}

type countingReader struct {
	io.ReadCloser
	n *atomic.Int64
}

func (r countingReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	r.n.Add(int64(n))
	return n, err
}
