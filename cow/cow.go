// Package cow implements snaploader's copy-on-write chunked store: a huge
// file (guest memory, a disk) seen as fixed-size chunks addressed by digest.
//
// A Store opened from a ChunkedFile is lazy: no chunk is read until it is
// touched. A clean chunk is read straight from the blob its Source opened
// (nothing is copied); the first write to a chunk copies it into a private,
// sparse overlay file, so the cached blob is never modified. All-zero chunks
// are holes: they are not listed, not stored and read as zeros. Save hashes
// the dirty chunks and stores only blobs the Sink is missing; FromFile does
// the same for every chunk of an existing file (the first save).
//
// Touching a chunk schedules the next chunks for background opening
// (read-ahead); Prefetch uses the same queue for a recorded working set.
package cow

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

const (
	// DefaultChunkSize is the default chunk size: 1000 pages.
	DefaultChunkSize = 4096000
	// PageSize is the unit chunk sizes are multiples of.
	PageSize = 4096
	// MaxChunkSize is the largest accepted chunk size.
	MaxChunkSize = 1 << 30
	// MaxSize is the largest accepted file size (1 PiB).
	MaxSize = 1 << 50
	// DefaultReadAhead is the most chunks after a touched one scheduled for
	// background opening (see Options.ReadAhead).
	DefaultReadAhead = 32
	// DefaultPrefetchConcurrency is the least bound of concurrent
	// background opens by default (see Options.PrefetchConcurrency).
	DefaultPrefetchConcurrency = 4
	// DefaultPrefetchBytes bounds the bytes of the chunks background opens
	// hold in flight by default: DefaultPrefetchConcurrency chunks of
	// DefaultChunkSize, more of smaller chunks.
	DefaultPrefetchBytes = DefaultPrefetchConcurrency * DefaultChunkSize
	// MaxDefaultPrefetchConcurrency caps the default bound of concurrent
	// background opens of small chunks (goroutines and connections).
	MaxDefaultPrefetchConcurrency = 64
	// DefaultPrefetchRate bounds the bytes per second background opens
	// start, so prefetch cannot saturate a link the VM's own reads need.
	DefaultPrefetchRate = 1 << 30
)

// Source opens the blobs of clean chunks, naming the tier that served
// each, and serves verified ranges of a chunk not yet fetched when it can
// (see cache.Source): a local tier (cache.Local) or cache.ReadThrough.
type Source = cache.Source

// Sink stores chunk blobs: any tier (cache.Tier).
type Sink interface {
	FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error)
	Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error
	// PutHashed stores bytes whose digest the store has just computed
	// from them; a tier may store them without hashing them again.
	PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error
}

// chunk is the state of one non-hole (or once-written) chunk. Its zero value
// past the off field is a hole.
type chunk struct {
	off int64 // immutable

	mu sync.RWMutex
	// d is the digest of the chunk's last clean content (loaded or saved);
	// nil for a hole. A dirty chunk keeps its last clean digest here.
	d *repb.Digest
	// ob is the digest of d's outboard, when known (see
	// Source.ReadVerifiedRange).
	ob *repb.Digest
	// blob is the source blob of a clean chunk once opened.
	blob cache.Blob
	// overlay: the chunk's current content is in the overlay file.
	overlay bool
	// dirty: written since the last clean state.
	dirty bool
	// gen counts writes, so that Save can tell whether a chunk changed
	// while it was being saved.
	gen uint64

	settled atomic.Bool // needs no fetch: open, in the overlay or a hole
	behind  atomic.Bool // a background fetch of the whole chunk was started
	noRange atomic.Bool // the source cannot serve verified ranges of it
	touched atomic.Bool // accessed by a read or write
	queued  atomic.Bool // in the prefetch queue
	// opening holds the digests of the clean content being opened from
	// the source, while an open runs under mu: a small read meanwhile is
	// served by a verified range read instead of waiting for the whole
	// chunk (see readChunk).
	opening atomic.Pointer[cleanDigests]
}

// cleanDigests are a chunk's clean digest and its outboard's.
type cleanDigests struct{ d, ob *repb.Digest }

// Store is a lazy copy-on-write chunked file. It is safe for concurrent use.
type Store struct {
	name string
	src  Source
	opts Options
	ns   cache.Namespace
	cs   int64

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	closed atomic.Bool

	saveMu sync.Mutex // serialises Save and Resize

	// behind counts the whole-chunk fetches started behind verified range
	// reads; Close waits for them (closing stops new ones).
	behindMu sync.Mutex
	closing  bool
	behind   sync.WaitGroup
	// closingCh, once made (by awaitTurn), is closed by Close; behindTurn
	// holds the turn of the one whole-chunk fetch behind range reads that
	// runs, and lastBehind is when the last one started.
	closingCh  chan struct{}
	behindTurn chan struct{}
	lastBehind atomic.Int64
	// lastRange is when the last verified range read was served (unix
	// nanoseconds), for awaitTurn.
	lastRange atomic.Int64

	mu        sync.RWMutex
	size      int64
	chunks    map[int64]*chunk // by index; absent = hole
	cleanSize int64            // size of the last clean state

	ovMu    sync.Mutex
	overlay *os.File

	touchMu sync.Mutex
	touched []int64
	wsEnd   int // with wsEnded, the working set is touched[:wsEnd] (workingset.go)
	wsEnded bool

	pq prefetchQueue
	ra readAheadState
	// link sizes background fetching to the link (linkrate.go); faults
	// counts the reads waiting on the source, which read-ahead yields to
	// (faultgate.go).
	link   linkEstimate
	faults faultGate
	// fetchLat is a moving average of the time an open from the source
	// takes (nanoseconds), which sizes read-ahead.
	fetchLat atomic.Int64

	bufs sync.Pool // *[]byte of chunk size

	dirty        atomic.Int64
	fetched      atomic.Int64
	fetchedBytes atomic.Int64
	fetchErrors  atomic.Int64
	rangeReads   atomic.Int64
	fgFetches    atomic.Int64
	prefetched   atomic.Int64
	queuedTotal  atomic.Int64
	yields       atomic.Int64
}

// Open returns a lazy Store over cf: nothing is read until a chunk is
// touched. cf is validated with ValidateChunkedFile; its chunk size wins over
// opts.ChunkSize. src opens clean chunks on first access.
func Open(name string, cf *snapshotpb.ChunkedFile, src Source, opts Options) (*Store, error) {
	if err := ValidateChunkedFile(cf); err != nil {
		return nil, err
	}
	if name == "" {
		name = cf.GetName()
	}
	opts.ChunkSize = cf.GetChunkSize()
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if src == nil && len(cf.GetChunks()) > 0 {
		return nil, status.Errorf(codes.InvalidArgument, "opening chunked file %q: no source for its %d chunks", name, len(cf.GetChunks()))
	}
	s := &Store{
		name:      name,
		src:       src,
		opts:      opts,
		ns:        opts.Namespace,
		cs:        opts.ChunkSize,
		size:      cf.GetSize(),
		cleanSize: cf.GetSize(),
		chunks:    make(map[int64]*chunk, len(cf.GetChunks())),
	}
	parent := context.Background()
	if opts.Parent != nil {
		parent = context.WithoutCancel(opts.Parent)
	}
	s.ctx, s.cancel = context.WithCancel(parent)
	s.ra.last = -1
	s.pq.max = opts.PrefetchConcurrency
	s.pq.rate = opts.PrefetchRate
	slab := make([]chunk, len(cf.GetChunks()))
	for i, c := range cf.GetChunks() {
		k := &slab[i]
		k.off, k.d, k.ob = c.GetOffset(), c.GetDigest(), c.GetOutboard()
		s.chunks[k.off/s.cs] = k
	}
	return s, nil
}

// Name is the chunked file's name.
func (s *Store) Name() string { return s.name }

// ChunkSize is the chunk size.
func (s *Store) ChunkSize() int64 { return s.cs }

// Size is the current size.
func (s *Store) Size() int64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.size
}

func (s *Store) chunkLen(idx, size int64) int64 {
	return min(s.cs, size-idx*s.cs)
}

func (s *Store) lookup(idx int64) *chunk {
	s.mu.RLock()
	c := s.chunks[idx]
	s.mu.RUnlock()
	return c
}

// IsHole reports whether the chunk holding off is a hole that no write has
// touched, so it reads as zeros without any fetch (a page server answers
// such faults with zero pages). It is cheap and safe for concurrent use.
func (s *Store) IsHole(off int64) bool {
	if off < 0 || off >= s.Size() {
		return false
	}
	c := s.lookup(off / s.cs)
	if c == nil {
		return true
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.d == nil && !c.overlay
}

func (s *Store) lookupOrCreate(idx int64) *chunk {
	if c := s.lookup(idx); c != nil {
		return c
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.chunks[idx]
	if c == nil {
		c = &chunk{off: idx * s.cs}
		c.settled.Store(true)
		s.chunks[idx] = c
	}
	return c
}

func (s *Store) errClosed(op string, off int64) error {
	return status.Errorf(codes.FailedPrecondition, "%s chunked file %q at offset %d: store is closed", op, s.name, off)
}

// snapshotChunks returns the chunk entries sorted by offset.
func (s *Store) snapshotChunks() []*chunk {
	s.mu.RLock()
	cs := make([]*chunk, 0, len(s.chunks))
	for _, c := range s.chunks {
		cs = append(cs, c)
	}
	s.mu.RUnlock()
	slices.SortFunc(cs, func(a, b *chunk) int { return cmp.Compare(a.off, b.off) })
	return cs
}

// ChunkedFile describes the last clean state: the one the store was opened
// from or last saved, ignoring writes since.
func (s *Store) ChunkedFile() *snapshotpb.ChunkedFile {
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	s.mu.RLock()
	size := s.cleanSize
	s.mu.RUnlock()
	cf := &snapshotpb.ChunkedFile{Name: s.name, Size: size, ChunkSize: s.cs}
	for _, c := range s.snapshotChunks() {
		c.mu.RLock()
		d, ob := c.d, c.ob
		c.mu.RUnlock()
		if d != nil && c.off < size {
			cf.Chunks = append(cf.Chunks, &snapshotpb.Chunk{Offset: c.off, Digest: d, Outboard: ob})
		}
	}
	return cf
}

// Close waits for the whole-chunk fetches started behind verified range
// reads (so that the chunks read are in the cache), for at most
// Options.CloseGrace before it cancels them, stops read-ahead, releases the
// source blobs and removes the overlay. Later reads and writes fail with
// FailedPrecondition.
func (s *Store) Close() error {
	s.behindMu.Lock()
	if !s.closing {
		s.closing = true
		if s.closingCh != nil {
			close(s.closingCh)
		}
	}
	s.behindMu.Unlock()
	done := make(chan struct{})
	go func() { s.behind.Wait(); close(done) }()
	grace := time.NewTimer(s.opts.CloseGrace)
	select {
	case <-done:
	case <-grace.C:
		s.cancel() // fetches riding out an outage end now
		<-done
	}
	grace.Stop()
	if s.closed.Swap(true) {
		return nil
	}
	s.cancel()
	s.pq.stop()
	var errs []error
	for _, c := range s.snapshotChunks() {
		c.mu.Lock()
		if c.blob != nil {
			if err := c.blob.Close(); err != nil {
				errs = append(errs, fmt.Errorf("closing chunk at offset %d of %q: %w", c.off, s.name, err))
			}
			c.blob = nil
		}
		c.mu.Unlock()
	}
	s.ovMu.Lock()
	if s.overlay != nil {
		if err := s.overlay.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing overlay of %q: %w", s.name, err))
		}
	}
	s.ovMu.Unlock()
	return errors.Join(errs...)
}
