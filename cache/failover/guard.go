package failover

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/internal/stall"
)

// guarded bounds every call to a remote by a deadline of no progress: a
// call that gets no answer, or a stream (read or write) that moves no byte,
// for timeout fails as DeadlineExceeded naming the remote, an outage the
// breaker in front of it counts.
type guarded struct {
	c       cache.Tier
	name    string
	timeout time.Duration
}

var _ cache.Tier = (*guarded)(nil)

func guard(c cache.Tier, name string, timeout time.Duration) cache.Tier {
	return &guarded{c: c, name: name, timeout: timeout}
}

func (g *guarded) watch(ctx context.Context) (context.Context, *stall.Guard) {
	return stall.New(ctx, g.timeout, &stallError{fmt.Sprintf("remote %s: no answer for %s", g.name, g.timeout)})
}

func (g *guarded) Traits() cache.Traits { return g.c.Traits() }

func (g *guarded) Down() error  { return g.c.Down() }
func (g *guarded) Close() error { return g.c.Close() }

func (g *guarded) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	ctx, w := g.watch(ctx)
	defer w.Stop()
	missing, err := g.c.FindMissing(ctx, ns, ds)
	return missing, w.Err(err)
}

func (g *guarded) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	ctx, w := g.watch(ctx)
	defer w.Stop()
	ar, err := g.c.GetActionResult(ctx, ns, key)
	return ar, w.Err(err)
}

func (g *guarded) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	ctx, w := g.watch(ctx)
	defer w.Stop()
	return w.Err(g.c.UpdateActionResult(ctx, ns, key, ar))
}

// Write counts each piece read from r as progress.
func (g *guarded) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	ctx, w := g.watch(ctx)
	defer w.Stop()
	return w.Err(g.c.Write(ctx, ns, d, progressReader{r, w}))
}

// WriteReporting counts each piece read from r as progress.
func (g *guarded) WriteReporting(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) (bool, error) {
	ctx, w := g.watch(ctx)
	defer w.Stop()
	stored, err := g.c.WriteReporting(ctx, ns, d, progressReader{r, w})
	return stored, w.Err(err)
}

// WriteCompressed counts each piece read from r as progress.
func (g *guarded) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	ctx, w := g.watch(ctx)
	defer w.Stop()
	return w.Err(g.c.WriteCompressed(ctx, ns, d, progressReader{r, w}))
}

// PutHashed is Write of data, so that its pieces count as progress (the
// remotes hash what they receive anyway).
func (g *guarded) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	return g.Write(ctx, ns, d, bytes.NewReader(data))
}

type progressReader struct {
	r io.Reader
	w *stall.Guard
}

func (p progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.w.Progress()
	}
	return n, err
}

func (g *guarded) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	return g.stream(ctx, func(ctx context.Context) (io.ReadCloser, error) { return g.c.Read(ctx, ns, d) })
}

func (g *guarded) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	return g.stream(ctx, func(ctx context.Context) (io.ReadCloser, error) { return g.c.ReadRange(ctx, ns, d, off, n) })
}

func (g *guarded) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	var compressed bool
	rc, err := g.stream(ctx, func(ctx context.Context) (rc io.ReadCloser, err error) {
		rc, compressed, err = g.c.ReadCompressed(ctx, ns, d)
		return rc, err
	})
	return rc, compressed, err
}

func (g *guarded) stream(ctx context.Context, open func(context.Context) (io.ReadCloser, error)) (io.ReadCloser, error) {
	ctx, w := g.watch(ctx)
	rc, err := open(ctx)
	if err != nil {
		w.Stop()
		return nil, w.Err(err)
	}
	w.Progress()
	return &guardedReader{rc: rc, w: w}, nil
}

type guardedReader struct {
	rc io.ReadCloser
	w  *stall.Guard
}

func (r *guardedReader) Read(p []byte) (int, error) {
	n, err := r.rc.Read(p)
	if n > 0 {
		r.w.Progress()
	}
	if err != nil && !errors.Is(err, io.EOF) {
		err = r.w.Err(err)
	}
	return n, err
}

func (r *guardedReader) Close() error {
	err := r.rc.Close()
	r.w.Stop()
	return err
}
