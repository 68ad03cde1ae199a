package failover

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/telemetry"
)

// reader reads [start, end) of a blob from the remotes, resuming at the
// offset reached after a transient failure. A whole read (whole) delivers
// the blob's final bytes only once the whole blob matched the digest: it
// hashes what it delivers (v), unless every remote declares that its reads
// verify (cache.Traits.VerifiesReads), in which case it resumes with whole
// reads only and takes the remote's verdict at the end of its stream, so
// that the bytes are hashed once.
type reader struct {
	t          *Tier
	ctx        context.Context
	ns         cache.Namespace
	d          *repb.Digest
	whole      bool
	start, end int64
	off        int64 // next offset to deliver
	v          *digest.Verifier
	rt         *retrier
	began      time.Time
	// span is the read's own span; parent the caller's (a chunk fetch),
	// which is told the remote that served too.
	span, parent trace.Span

	rc       io.ReadCloser
	cur      *member
	remotes  []string
	attempts int
	err      error // sticky: io.EOF once complete
	reported bool
}

// ReadFrom is Read, also naming the remote that serves the blob's first
// bytes (others may serve the rest after a failure: Options.OnRead and
// Stats tell).
func (t *Tier) ReadFrom(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, string, error) {
	if err := digest.Validate(d); err != nil {
		return nil, "", err
	}
	v, err := digest.NewVerifier(ns.DigestFunction(), d)
	if err != nil {
		return nil, "", errkind.New(errkind.InvalidArgument, "failover: blob %s: %v", digest.String(d), err)
	}
	r := &reader{t: t, ns: ns, d: d, whole: true, end: d.GetSizeBytes(),
		rt: t.retrier("reading blob " + digest.String(d)), began: time.Now()}
	if !t.remotesVerify() {
		r.v = v
	}
	r.trace(ctx)
	if err := r.open(); err != nil {
		r.finish(err)
		return nil, "", err
	}
	return r, r.cur.name, nil
}

// Read opens blob d from the first remote that serves it (see the package
// documentation); the stream is verified and resumes across failures.
func (t *Tier) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	rc, _, err := t.ReadFrom(ctx, ns, d)
	return rc, err
}

// ReadCompressed is Read: the raw content, verified (compressed false).
func (t *Tier) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	rc, err := t.Read(ctx, ns, d)
	return rc, false, err
}

// ReadRange reads n bytes of d from off (fewer at its end) from the first
// remote serving ranges that has d, resuming across failures; the bytes
// are not verified (see cache.RangeReader). With no remote serving ranges
// it is an error wrapping cache.ErrNoRange.
func (t *Tier) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	if err := digest.Validate(d); err != nil {
		return nil, err
	}
	if off < 0 || n <= 0 || off >= d.GetSizeBytes() {
		return nil, errkind.New(errkind.InvalidArgument, "failover: reading blob %s at offset %d, %d bytes: outside its %d bytes", digest.String(d), off, n, d.GetSizeBytes())
	}
	if !t.Traits().ServesRanges {
		return nil, errkind.New(errkind.Unimplemented, "failover: blob %s at [%d, %d): no remote serves ranges: %w", digest.String(d), off, off+n, cache.ErrNoRange)
	}
	end := min(off+n, d.GetSizeBytes())
	r := &reader{t: t, ns: ns, d: d, start: off, off: off, end: end,
		rt: t.retrier(fmt.Sprintf("reading blob %s at [%d, %d)", digest.String(d), off, end)), began: time.Now()}
	r.trace(ctx)
	if err := r.open(); err != nil {
		r.finish(err)
		return nil, err
	}
	return r, nil
}

// trace starts the read's span, a child of ctx's, and makes ctx the
// read's context (the remotes' calls are its children).
func (r *reader) trace(ctx context.Context) {
	r.parent = trace.SpanFromContext(ctx)
	r.ctx, r.span = telemetry.Start(ctx, "snaploader.remote_read", attribute.String("digest", digest.String(r.d)),
		attribute.Int64("offset", r.start), attribute.Int64("length", r.end-r.start))
}

// open opens the stream at r.off on the first remote that serves it,
// riding out outages within the bound.
func (r *reader) open() error {
	for {
		var absent error
		outage := false
		for _, m := range r.t.members {
			if !r.whole && !m.raw.Traits().ServesRanges {
				continue
			}
			rc, err := r.attempt(m)
			if err == nil {
				r.rc, r.cur = rc, m
				r.attempts++
				m.reads.Add(1)
				return nil
			}
			if cerr := r.ctx.Err(); cerr != nil {
				return fmt.Errorf("%s: %w", r.rt.what, status.FromContextError(cerr).Err())
			}
			switch {
			case cache.IsNotFound(err), errors.Is(err, cache.ErrNoRange):
				m.notFound.Add(1)
				if absent == nil {
					absent = fmt.Errorf("%s: %w", m.name, err)
				}
			case cache.IsCorrupt(err) && r.off == r.start:
				// Its copy is bad and nothing of it was delivered: another
				// remote may hold a good one.
				absent = fmt.Errorf("%s: %w", m.name, err)
			case Transient(err):
				r.rt.failed(m, err)
				outage = true
			default:
				return fmt.Errorf("%s from %s: %w", r.rt.what, m.name, err)
			}
		}
		if !outage {
			if absent == nil {
				absent = errkind.New(errkind.NotFound, "no remote holds it")
			}
			return fmt.Errorf("%s: %w", r.rt.what, absent)
		}
		if err := r.rt.wait(r.ctx); err != nil {
			return err
		}
	}
}

// attempt opens the stream at r.off on m: a range from r.off, or the
// whole blob with what was delivered already skipped.
func (r *reader) attempt(m *member) (io.ReadCloser, error) {
	if err := r.t.ready(r.ctx, m); err != nil {
		return nil, err
	}
	if !r.whole || (r.off > 0 && r.v != nil && m.raw.Traits().ServesRanges) {
		p := &pieces{ctx: r.ctx, m: m, ns: r.ns, d: r.d, off: r.off, end: r.end}
		if err := p.next(); err != nil {
			return nil, err
		}
		return p, nil
	}
	rc, err := m.tier.Read(r.ctx, r.ns, r.d)
	if err != nil || r.off == 0 {
		return rc, err
	}
	if _, err := io.CopyN(io.Discard, rc, r.off); err != nil {
		rc.Close()
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return rc, nil
}

// pieceBytes is the most one range request of pieces asks for: a remote
// may buffer a range whole before its first byte (the REAPI client does),
// so a piece must arrive within one AttemptTimeout.
const pieceBytes = 1 << 20

// pieces reads [off, end) of a blob from one remote as a sequence of
// range reads of at most pieceBytes.
type pieces struct {
	ctx      context.Context
	m        *member
	ns       cache.Namespace
	d        *repb.Digest
	off, end int64
	cur      io.ReadCloser
	curEnd   int64
}

// next opens the next piece.
func (p *pieces) next() error {
	n := min(int64(pieceBytes), p.end-p.off)
	rc, err := p.m.tier.ReadRange(p.ctx, p.ns, p.d, p.off, n)
	if err != nil {
		return err
	}
	p.cur, p.curEnd = rc, p.off+n
	return nil
}

func (p *pieces) Read(b []byte) (int, error) {
	for {
		if p.cur == nil {
			if p.off >= p.end {
				return 0, io.EOF
			}
			if err := p.next(); err != nil {
				return 0, err
			}
		}
		n, err := p.cur.Read(b[:min(int64(len(b)), p.curEnd-p.off)])
		p.off += int64(n)
		if p.off >= p.curEnd || errors.Is(err, io.EOF) {
			p.cur.Close()
			p.cur = nil
			if p.off < p.curEnd {
				return n, io.ErrUnexpectedEOF
			}
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

func (p *pieces) Close() error {
	if p.cur != nil {
		p.cur.Close()
		p.cur = nil
	}
	return nil
}

func (r *reader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if r.off >= r.end {
		if err := r.complete(); err != nil { // an empty blob's check
			return 0, err
		}
		r.err = io.EOF
		return 0, io.EOF
	}
	for {
		q := p[:min(int64(len(p)), r.end-r.off)]
		n, err := r.rc.Read(q)
		if n > 0 {
			m := r.cur
			if len(r.remotes) == 0 || r.remotes[len(r.remotes)-1] != m.name {
				r.remotes = append(r.remotes, m.name)
			}
			m.readBytes.Add(int64(n))
			r.rt.progress()
			if r.v != nil {
				r.v.Write(q[:n])
			}
			r.off += int64(n)
			if r.off == r.end {
				// The final bytes: delivered only once the blob verified.
				if err := r.complete(); err != nil {
					return 0, err
				}
			}
			return n, nil
		}
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF // r.off < r.end: the stream ended early
		}
		if err == nil {
			continue
		}
		if cerr := r.ctx.Err(); cerr != nil {
			return 0, r.finish(fmt.Errorf("%s: %w", r.rt.what, status.FromContextError(cerr).Err()))
		}
		if !Transient(err) {
			return 0, r.finish(fmt.Errorf("%s from %s at offset %d: %w", r.rt.what, r.cur.name, r.off, err))
		}
		// Cut mid-stream: resume where it stopped.
		r.rt.failed(r.cur, err)
		r.rc.Close()
		r.rc = nil
		if oerr := r.open(); oerr != nil {
			return 0, r.finish(oerr)
		}
	}
}

// complete checks a whole read's digest once all its bytes are in, and
// records the read's end.
func (r *reader) complete() error {
	if r.v != nil {
		if err := r.v.Check(); err != nil {
			return r.finish(cache.Corruptf("%s: the bytes received from %s do not match the digest: %v", r.rt.what, strings.Join(r.remotes, " and "), err))
		}
	} else if r.whole && r.rc != nil {
		// The remote checks the blob when its stream ends.
		if err := r.remoteVerdict(); err != nil {
			return r.finish(err)
		}
	}
	r.finish(nil)
	return nil
}

// remoteVerdict reads the end of the current remote's stream, where a
// remote whose reads verify reports a blob that does not match its digest.
func (r *reader) remoteVerdict() error {
	var one [1]byte
	for {
		n, err := r.rc.Read(one[:])
		switch {
		case n > 0:
			return cache.Corruptf("%s: %s sent more than the blob's %d bytes", r.rt.what, r.cur.name, r.end)
		case errors.Is(err, io.EOF):
			return nil
		case err != nil:
			return fmt.Errorf("%s from %s at its end: %w", r.rt.what, strings.Join(r.remotes, " and "), err)
		}
	}
}

// finish records the read's end once and returns err (sticky).
func (r *reader) finish(err error) error {
	if err != nil {
		r.err = err
	}
	if r.reported {
		return err
	}
	r.reported = true
	// The remotes that served, by name (a URL without credentials), on
	// the read's span and on its caller's.
	served := strings.Join(r.remotes, ", then ")
	r.span.SetAttributes(attribute.String("remote", served), attribute.Int("attempts", r.attempts),
		attribute.Int64("bytes_read", r.off-r.start), attribute.Bool("complete", err == nil && r.off >= r.end))
	telemetry.End(r.span, err)
	if served != "" {
		r.parent.SetAttributes(attribute.String("remote", served))
	}
	if f := r.t.opts.OnRead; f != nil {
		f(ReadEvent{Digest: r.d, Offset: r.start, Length: r.end - r.start, Remotes: r.remotes,
			Bytes: r.off - r.start, Attempts: r.attempts, Complete: err == nil && r.off >= r.end,
			Err: err, Duration: time.Since(r.began)})
	}
	return err
}

func (r *reader) Close() error {
	if r.rc != nil {
		r.rc.Close()
		r.rc = nil
	}
	if r.err == nil {
		r.finish(nil)
		r.err = errkind.New(errkind.Internal, "%s: reader closed", r.rt.what)
	}
	return nil
}
