package server

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
)

// memBudget bounds the memory that streams of one kind in flight may hold
// at once, across all streams: uploads (gRPC's per-stream receive window,
// the messages being handled, zstd decoder history) or reads (the copy
// buffer, the message being built and its encoding).
type memBudget struct {
	kind string // "upload" or "read", for errors
	max  int64
	sem  *semaphore.Weighted
	mu   sync.Mutex
	use  int64
}

func newMemBudget(kind string, max int64) *memBudget {
	return &memBudget{kind: kind, max: max, sem: semaphore.NewWeighted(max)}
}

// acquire takes n bytes, waiting up to wait for them; it is
// ResourceExhausted when they do not become free in time or n exceeds the
// whole budget.
func (b *memBudget) acquire(ctx context.Context, n int64, wait time.Duration, what string) (release func(), err error) {
	if n > b.max {
		return nil, status.Errorf(codes.ResourceExhausted, "%s: needs %d bytes of memory, more than the server's %s memory budget of %d bytes", what, n, b.kind, b.max)
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	if err := b.sem.Acquire(wctx, n); err != nil {
		if ctx.Err() != nil {
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		return nil, status.Errorf(codes.ResourceExhausted, "%s: the server's %s memory budget of %d bytes stayed in use for %v; retry later", what, b.kind, b.max, wait)
	}
	b.mu.Lock()
	b.use += n
	b.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			b.mu.Lock()
			b.use -= n
			b.mu.Unlock()
			b.sem.Release(n)
		})
	}, nil
}

func (b *memBudget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.use
}

// space is disk space reserved for a file in the server's scratch
// directory: the backend's own reservation, or the scratch budget's.
type space = cache.Reservation

// scratchBudget bounds the scratch space of uploads in flight for
// backends that do not account for it (S3).
type scratchBudget struct {
	max int64
	mu  sync.Mutex
	use int64
}

type scratchSpace struct {
	b    *scratchBudget
	n    int64 // under b.mu
	done bool  // under b.mu
}

func (s *scratchSpace) Release() {
	s.b.mu.Lock()
	defer s.b.mu.Unlock()
	if !s.done {
		s.done = true
		s.b.use -= s.n
	}
}

func (s *scratchSpace) Resize(n int64) error {
	s.b.mu.Lock()
	defer s.b.mu.Unlock()
	if s.done {
		return status.Error(codes.FailedPrecondition, "resizing a released reservation")
	}
	if delta := n - s.n; delta > 0 && s.b.use+delta > s.b.max {
		return status.Errorf(codes.ResourceExhausted, "scratch space: %d bytes are reserved by uploads in flight; %d more would exceed the bound of %d bytes", s.b.use, delta, s.b.max)
	}
	s.b.use += n - s.n
	s.n = n
	return nil
}

func (b *scratchBudget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.use
}

func (b *scratchBudget) reserve(n int64) (space, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.use+n > b.max {
		return nil, status.Errorf(codes.ResourceExhausted, "scratch space: %d bytes are reserved by uploads in flight; %d more would exceed the bound of %d bytes", b.use, n, b.max)
	}
	b.use += n
	return &scratchSpace{b: b, n: n}, nil
}

// reserve promises n bytes of disk to an upload: from the backend's own
// bound when it keeps its blobs on this host's disk, else from the scratch
// budget.
func (s *Server) reserve(n int64) (space, error) {
	res, err := s.backend.Reserve(n)
	if err != nil || res != nil {
		return res, err
	}
	return s.scratch.reserve(n)
}

func describeBytes(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d bytes", n)
}
