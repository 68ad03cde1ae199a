package failover

import (
	"context"
	"fmt"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// FindMissing asks the first remote that answers.
func (t *Tier) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	what := fmt.Sprintf("finding missing blobs among %d", len(ds))
	if len(ds) > 0 {
		what += fmt.Sprintf(" (first %s)", digest.String(ds[0]))
	}
	var missing []*repb.Digest
	err := t.each(ctx, what, false, func(m *member) (bool, error) {
		var err error
		missing, err = m.tier.FindMissing(ctx, ns, ds)
		return false, err
	})
	return missing, err
}

// GetActionResult returns the entry of the first remote that holds it;
// NotFound once every remote that answered said so (see the package
// documentation).
func (t *Tier) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	var ar *repb.ActionResult
	err := t.each(ctx, "reading action result "+digest.String(key), false, func(m *member) (bool, error) {
		var err error
		ar, err = m.tier.GetActionResult(ctx, ns, key)
		if cache.IsNotFound(err) {
			m.notFound.Add(1)
			return true, err
		}
		return false, err
	})
	return ar, err
}

// UpdateActionResult writes the entry to the first writable remote that
// is up.
func (t *Tier) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	return t.each(ctx, "updating action result "+digest.String(key), true, func(m *member) (bool, error) {
		err := m.tier.UpdateActionResult(ctx, ns, key, ar)
		if err == nil {
			m.writes.Add(1)
		}
		return false, err
	})
}

// Write stores the blob read from r on the first writable remote that is
// up. A failed attempt is retried only when r can be read again from its
// start (an io.Seeker) or the attempt consumed none of it.
func (t *Tier) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	return t.write(ctx, "writing blob", d, r, func(m *member, src io.Reader) error { return m.tier.Write(ctx, ns, d, src) })
}

// WriteReporting is Write, saying whether the remote that took the blob
// stored it.
func (t *Tier) WriteReporting(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) (bool, error) {
	var stored bool
	err := t.write(ctx, "writing blob", d, r, func(m *member, src io.Reader) (err error) {
		stored, err = m.tier.WriteReporting(ctx, ns, d, src)
		return err
	})
	return stored, err
}

// WriteCompressed is Write of zstd frames: each remote takes them as its
// WriteCompressed does.
func (t *Tier) WriteCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	return t.write(ctx, "writing compressed blob", d, r, func(m *member, src io.Reader) error { return m.tier.WriteCompressed(ctx, ns, d, src) })
}

// PutHashed is Write of data, which the caller has just hashed to d.
func (t *Tier) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	return t.each(ctx, "writing blob "+digest.String(d), true, func(m *member) (bool, error) {
		err := m.tier.PutHashed(ctx, ns, d, data)
		if err == nil {
			m.writes.Add(1)
		}
		return false, err
	})
}

// write makes one pass of put over the writable remotes with the bytes of
// r, read again from the start for the next remote when r can seek.
func (t *Tier) write(ctx context.Context, what string, d *repb.Digest, r io.Reader, put func(m *member, src io.Reader) error) error {
	seeker, _ := r.(io.Seeker)
	src := &countReader{r: r}
	return t.each(ctx, what+" "+digest.String(d), true, func(m *member) (bool, error) {
		if src.n > 0 {
			if seeker == nil {
				return false, errkind.New(errkind.Unavailable, "%s: the data was partly sent and cannot be read again", m.name)
			}
			if _, err := seeker.Seek(0, io.SeekStart); err != nil {
				return false, errkind.New(errkind.Internal, "rewinding blob %s: %v", digest.String(d), err)
			}
			src.n = 0
		}
		err := put(m, src)
		if err == nil {
			m.writes.Add(1)
		}
		return false, err
	})
}

type countReader struct {
	r io.Reader
	n int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// each calls call on the remotes in order (the writable ones when write)
// until one answers: nil, or an error that is not transient, ends the
// call; an error call marks as an answer (absent: NotFound) ends it once
// every remote was tried and none answered otherwise. Transient failures
// are skipped, and when no remote answered, the pass is retried within
// the bound.
func (t *Tier) each(ctx context.Context, what string, write bool, call func(m *member) (absent bool, err error)) error {
	rt := t.lookupRetrier(what)
	for {
		var answer error
		tried := false
		for _, m := range t.members {
			if write && m.readOnly {
				continue
			}
			tried = true
			err := t.ready(ctx, m)
			absent := false
			if err == nil {
				absent, err = call(m)
			}
			if err == nil {
				return nil
			}
			if cerr := ctx.Err(); cerr != nil {
				return fmt.Errorf("%s: %w", what, status.FromContextError(cerr).Err())
			}
			switch {
			case absent:
				if answer == nil {
					answer = fmt.Errorf("%s: %s: %w", what, m.name, err)
				}
			case Transient(err):
				rt.failed(m, err)
			default:
				return fmt.Errorf("%s: %s: %w", what, m.name, err)
			}
		}
		if !tried {
			return errkind.New(codes.FailedPrecondition, "%s: every remote is read-only", what)
		}
		if answer != nil {
			return answer
		}
		if err := rt.wait(ctx); err != nil {
			return err
		}
	}
}
