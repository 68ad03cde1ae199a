package cow

import (
	"errors"
	"fmt"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// readRange serves p at in of unfetched chunk c (digest d, outboard ob)
// with a verified range read (Source.ReadVerifiedRange) when the source
// can, starting the fetch of the whole chunk behind it: Source.Fetch
// makes sure the whole blob is verified and at hand, streaming in without
// holding the chunk's lock. It reports whether it served p; when the
// source cannot serve ranges (cache.ErrNoRange) the chunk is fetched and
// verified whole.
func (s *Store) readRange(c *chunk, d, ob *repb.Digest, p []byte, in int64) (bool, error) {
	rs := s.src
	// A read of much of the chunk waits for the whole of it instead.
	if ob == nil || c.noRange.Load() || len(p) == 0 || int64(len(p)) > d.GetSizeBytes()/4 {
		return false, nil
	}
	err := rs.ReadVerifiedRange(s.ctx, s.ns, d, ob, p, in)
	if errors.Is(err, cache.ErrNoRange) {
		c.noRange.Store(true)
		return false, nil
	}
	if err != nil {
		s.fetchErrors.Add(1)
		start, end := cache.AlignRange(d.GetSizeBytes(), in, int64(len(p)))
		return false, fmt.Errorf("reading chunked file %q at offset %d (chunk at offset %d, digest %s, outboard %s, range [%d, %d)): %w", s.name, c.off+in, c.off, digest.String(d), digest.String(ob), start, end, err)
	}
	s.rangeReads.Add(1)
	s.lastRange.Store(time.Now().UnixNano())
	// The whole chunk streams in behind the range, once the reader pauses.
	if !c.behind.Swap(true) {
		s.behindMu.Lock()
		if !s.closing {
			s.behind.Add(1)
			go func() {
				defer s.behind.Done()
				release := s.awaitTurn()
				defer release()
				if rs.Fetch(s.ctx, s.ns, d) != nil || s.fetch(c, false) != nil {
					c.behind.Store(false) // a later read tries again
				}
			}()
		}
		s.behindMu.Unlock()
	}
	return true, nil
}

// awaitTurn waits until the whole chunk behind a range read may stream
// in, and returns the release of its turn: one such fetch runs at a time,
// once no range read has been served for Options.BehindQuiet, or once
// Options.BehindMaxDelay has passed since the last one started (so that a
// reader that never pauses still gets whole chunks, one per interval, and
// only the few of its reads that meet one wait behind it). While the store
// is closing, every waiting fetch runs at once (Close waits for them).
func (s *Store) awaitTurn() (release func()) {
	s.behindMu.Lock()
	if s.closing {
		s.behindMu.Unlock()
		return func() {}
	}
	if s.closingCh == nil {
		s.closingCh, s.behindTurn = make(chan struct{}), make(chan struct{}, 1)
		s.lastBehind.Store(time.Now().UnixNano())
	}
	closing, turn := s.closingCh, s.behindTurn
	s.behindMu.Unlock()
	select {
	case turn <- struct{}{}:
	case <-closing:
		return func() {}
	}
	release = func() { <-turn }
	for quiet := s.opts.BehindQuiet; quiet >= 0; {
		now := time.Now()
		wait := quiet - now.Sub(time.Unix(0, s.lastRange.Load()))
		forced := s.opts.BehindMaxDelay - now.Sub(time.Unix(0, s.lastBehind.Load()))
		if wait <= 0 || forced <= 0 {
			break
		}
		t := time.NewTimer(min(wait, forced))
		select {
		case <-closing:
			t.Stop()
			return release
		case <-t.C:
		}
	}
	s.lastBehind.Store(time.Now().UnixNano())
	return release
}
