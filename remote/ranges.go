package remote

import (
	"context"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// rangeSupport is what the client has learned of the server's range reads
// (ByteStream read_limit): once one is refused, every later ReadRange is
// cache.ErrNoRange at once, and the tier's traits say it serves none; once
// one is served, range reads go out freely. Until then, one range read at a
// time finds out, so that a server without them refuses one request, not
// one per chunk first touched.
type rangeSupport struct {
	refused, served atomic.Bool
	probe           chan struct{} // held by the range read finding out
}

func newRangeSupport() *rangeSupport { return &rangeSupport{probe: make(chan struct{}, 1)} }

// turn waits until a range read may go out and returns the function that
// records its outcome, or refused when the server is known to serve no
// ranges.
func (s *rangeSupport) turn(ctx context.Context) (done func(error), refused bool, err error) {
	for {
		switch {
		case s.refused.Load():
			return nil, true, nil
		case s.served.Load():
			return func(error) {}, false, nil
		}
		select {
		case s.probe <- struct{}{}:
		case <-ctx.Done():
			return nil, false, status.FromContextError(ctx.Err()).Err()
		}
		if s.refused.Load() || s.served.Load() {
			<-s.probe
			continue
		}
		return func(err error) {
			switch {
			case err == nil:
				s.served.Store(true)
			case refusesRanges(err):
				s.refused.Store(true)
			}
			// Any other outcome (absent, down) teaches nothing: the
			// next range read finds out.
			<-s.probe
		}, false, nil
	}
}

// refusesRanges reports whether err is a server's refusal of a range read
// inside the blob: UNIMPLEMENTED, or OUT_OF_RANGE for a read limit it does
// not take (the range was checked against the blob's size before asking).
func refusesRanges(err error) bool {
	switch status.Code(err) {
	case codes.Unimplemented, codes.OutOfRange:
		return true
	}
	return false
}
