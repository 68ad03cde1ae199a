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
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"go.opentelemetry.io/otel/attribute"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/telemetry"
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
	// DefaultPrefetchConcurrency bounds concurrent background opens.
	DefaultPrefetchConcurrency = 4
	// DefaultPrefetchRate bounds the bytes per second background opens
	// start, so prefetch cannot saturate a link the VM's own reads need.
	DefaultPrefetchRate = 1 << 30
)

// Source opens the blobs of clean chunks. cache.Opener satisfies it.
type Source interface {
	Open(ctx context.Context, ns cache.Namespace, d *repb.Digest) (cache.Blob, error)
}

// Sink stores chunk blobs. cache.Cache satisfies it.
type Sink interface {
	FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error)
	Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error
}

// hashedSink is a Sink that can store bytes whose digest the caller has
// just computed from them without hashing them again (the local cache).
type hashedSink interface {
	PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error
}

// Options configures a Store. The zero value gives the defaults.
type Options struct {
	// Namespace is passed to the Source and Sink; its Function is the digest
	// function of the chunks (BLAKE3 when unset).
	Namespace cache.Namespace
	// ChunkSize is the chunk size FromFile splits with (Open takes it from
	// the ChunkedFile). Default DefaultChunkSize; must be a multiple of
	// PageSize and at most MaxChunkSize.
	ChunkSize int64
	// ReadAhead is the most chunks after a touched one that are opened in
	// the background: a reader touching chunk after chunk gets as many as
	// it consumes while two fetches complete, up to ReadAhead; a first or
	// out-of-order touch gets 4. Default DefaultReadAhead; negative
	// disables read-ahead.
	ReadAhead int
	// PrefetchConcurrency bounds concurrent background opens. Default
	// DefaultPrefetchConcurrency.
	PrefetchConcurrency int
	// PrefetchRate bounds the bytes per second of chunks background opens
	// start. Default DefaultPrefetchRate; negative means unbounded.
	PrefetchRate int64
	// Parallelism bounds concurrent hashing, reading and uploading in Save
	// and FromFile. Default max(8, NumCPU).
	Parallelism int
	// Progress, when set, is called with the byte count of each chunk a
	// Save or FromFile has read and hashed (from several goroutines).
	Progress func(bytes int64)
	// TempDir is where the overlay file holding dirty chunks is created.
	// Default os.TempDir().
	TempDir string
	// Parent carries the values (such as the trace span) chunk fetches run
	// under; its cancellation does not affect the store, which lives until
	// Close. Default context.Background().
	Parent context.Context
	// NoOutboards: Save and FromFile do not compute and store chunk
	// outboards (they do for BLAKE3 otherwise; see RangeSource).
	NoOutboards bool
	// BehindQuiet is how long the store waits, after a verified range read
	// of an unfetched chunk, for the reader to go quiet (no other range
	// read) before the whole chunk streams in behind: on a machine whose
	// client core is busy receiving, hashing and storing a 4 MB chunk for
	// milliseconds, the next fault's range read would otherwise wait behind
	// it. Default DefaultBehindQuiet; negative starts the whole chunk at
	// once.
	BehindQuiet time.Duration
	// BehindMaxDelay bounds that wait: a reader that never pauses still
	// gets one whole chunk per BehindMaxDelay (one such fetch runs at a
	// time). Default DefaultBehindMaxDelay.
	BehindMaxDelay time.Duration
	// OnFetch, when set, is called after every successful open of a clean
	// chunk from the source (from several goroutines, with the chunk's lock
	// held: it must be quick, e.g. count into metrics).
	OnFetch func(FetchEvent)
}

// FetchEvent describes one open of a clean chunk from the source.
type FetchEvent struct {
	File       string
	Offset     int64
	Bytes      int64
	Foreground bool          // a ReadAt or WriteAt waited for it
	Wait       time.Duration // how long the open took
	// Tier is the tier that served it, when the source says (see
	// TierSource), else "".
	Tier string
}

// RangeSource is a Source that can serve a verified range of a chunk
// without fetching it whole, given the digest of the chunk's outboard
// (cache.ReadThrough implements it). ReadVerifiedRange fills p with the
// bytes of d at off, verified against d before it returns; an error
// wrapping cache.ErrNoRange means it cannot, and the chunk is fetched and
// verified whole. Fetch makes sure the whole blob of d is verified and at
// hand, so that the next Open is quick; the whole chunk streams in behind a
// range read with it, without holding the chunk's lock.
type RangeSource interface {
	ReadVerifiedRange(ctx context.Context, ns cache.Namespace, d, outboard *repb.Digest, p []byte, off int64) error
	Fetch(ctx context.Context, ns cache.Namespace, d *repb.Digest) error
}

// TierSource is a Source that says which tier served each open (e.g.
// cache.ReadThrough).
type TierSource interface {
	OpenTier(ctx context.Context, ns cache.Namespace, d *repb.Digest) (cache.Blob, string, error)
}

func (o Options) withDefaults() (Options, error) {
	if o.Namespace.Function == repb.DigestFunction_UNKNOWN {
		o.Namespace.Function = digest.Default
	}
	if _, err := digest.New(o.Namespace.Function); err != nil {
		return o, status.Errorf(codes.InvalidArgument, "cow options: %v", err)
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = DefaultChunkSize
	}
	if err := checkChunkSize(o.ChunkSize); err != nil {
		return o, status.Errorf(codes.InvalidArgument, "cow options: %v", err)
	}
	if o.ReadAhead == 0 {
		o.ReadAhead = DefaultReadAhead
	}
	if o.PrefetchRate == 0 {
		o.PrefetchRate = DefaultPrefetchRate
	}
	if o.PrefetchConcurrency <= 0 {
		o.PrefetchConcurrency = DefaultPrefetchConcurrency
	}
	if o.Parallelism <= 0 {
		o.Parallelism = max(8, runtime.NumCPU())
	}
	if o.TempDir == "" {
		o.TempDir = os.TempDir()
	}
	if o.BehindQuiet == 0 {
		o.BehindQuiet = DefaultBehindQuiet
	}
	if o.BehindMaxDelay <= 0 {
		o.BehindMaxDelay = DefaultBehindMaxDelay
	}
	return o, nil
}

// Defaults of the wait before a whole chunk streams in behind a range read
// (see Options.BehindQuiet). First bytes of every chunk of 1 GiB in turn,
// through `serve` on two pinned CPUs (e2e BenchmarkColdHost): p50 5.3 ms /
// p99 13.4 ms with no wait; p50 1.6 ms with it, and p99 5.3 ms with one
// forced whole chunk per 100 ms, 3.2 ms with one per 250 ms.
const (
	DefaultBehindQuiet    = 10 * time.Millisecond
	DefaultBehindMaxDelay = 250 * time.Millisecond
)

func checkChunkSize(cs int64) error {
	switch {
	case cs <= 0:
		return fmt.Errorf("chunk size %d is not positive", cs)
	case cs%PageSize != 0:
		return fmt.Errorf("chunk size %d is not a multiple of %d", cs, PageSize)
	case cs > MaxChunkSize:
		return fmt.Errorf("chunk size %d exceeds %d", cs, MaxChunkSize)
	}
	return nil
}

// chunk is the state of one non-hole (or once-written) chunk. Its zero value
// past the off field is a hole.
type chunk struct {
	off int64 // immutable

	mu sync.RWMutex
	// d is the digest of the chunk's last clean content (loaded or saved);
	// nil for a hole. A dirty chunk keeps its last clean digest here.
	d *repb.Digest
	// ob is the digest of d's outboard, when known (see RangeSource).
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
}

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
}

// Stats are a Store's counters.
type Stats struct {
	Size              int64 // current size
	ChunksListed      int   // chunks that are not holes
	Dirty             int   // dirty chunks
	Touched           int   // chunks read or written at least once
	Fetched           int64 // blobs opened from the source (any reason)
	FetchedBytes      int64 // total size of those blobs
	FetchErrors       int64 // failed opens and verified range reads
	RangeReads        int64 // reads served by a verified range read
	ForegroundFetches int64 // opens a ReadAt or WriteAt waited for
	Prefetched        int64 // opens done by read-ahead or Prefetch
	PrefetchQueued    int64 // chunks ever put in the prefetch queue
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
				err = status.Errorf(codes.Internal, "blob is shorter than %d bytes", in+int64(len(p)))
			}
			return fmt.Errorf("reading chunked file %q at offset %d (chunk %d, digest %s): %w", s.name, c.off+in, c.off, digest.String(d), err)
		}
		ob, d := c.ob, c.d
		c.mu.RUnlock()
		if done, err := s.readRange(c, d, ob, p, in); done || err != nil {
			return err
		}
		if err := s.fetch(c, true); err != nil {
			return err
		}
	}
}

// readRange serves p at in of unfetched chunk c (digest d, outboard ob)
// with a verified range read when the source can, starting the fetch of
// the whole chunk behind it. It reports whether it served p.
func (s *Store) readRange(c *chunk, d, ob *repb.Digest, p []byte, in int64) (bool, error) {
	rs, ok := s.src.(RangeSource)
	// A read of much of the chunk waits for the whole of it instead.
	if !ok || ob == nil || c.noRange.Load() || len(p) == 0 || int64(len(p)) > d.GetSizeBytes()/4 {
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
		if err := s.fetch(c, true); err != nil {
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
	start := time.Now()
	var b cache.Blob
	var tier string
	var err error
	if ts, ok := s.src.(TierSource); ok {
		b, tier, err = ts.OpenTier(ctx, s.ns, c.d)
	} else {
		b, err = s.src.Open(ctx, s.ns, c.d)
	}
	if err == nil && b.Size() != c.d.SizeBytes {
		b.Close()
		err = status.Errorf(codes.Internal, "source blob has %d bytes", b.Size())
	}
	if err != nil {
		s.fetchErrors.Add(1)
		err = fmt.Errorf("fetching chunk at offset %d (digest %s) of chunked file %q: %w", c.off, digest.String(c.d), s.name, err)
		telemetry.End(span, err)
		return err
	}
	telemetry.End(span, nil)
	wait := time.Since(start)
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

// touch records the first access of c and schedules read-ahead.
func (s *Store) touch(c *chunk, idx int64) {
	if c.touched.Load() || c.touched.Swap(true) {
		return
	}
	s.touchMu.Lock()
	s.touched = append(s.touched, c.off)
	s.touchMu.Unlock()
	if s.opts.ReadAhead > 0 {
		s.scheduleAhead(idx, s.ra.depth(idx, s.opts.ReadAhead, time.Duration(s.fetchLat.Load())))
	}
}

// minReadAhead is the read-ahead depth of a first or out-of-order touch.
const minReadAhead = 4

// readAheadState sizes read-ahead to the reader: a reader that touches
// chunk after chunk gets as many chunks scheduled as it consumes while two
// fetches complete (fast readers up to Options.ReadAhead); a first or
// out-of-order touch gets minReadAhead, so that scattered accesses (a VM
// faulting here and there) do not pull in chunks nobody reads.
type readAheadState struct {
	mu       sync.Mutex
	last     int64 // index of the previous first touch, -1 before any
	lastAt   time.Time
	interval time.Duration // moving average of the time between sequential first touches
}

// depth returns how many chunks after idx to schedule, given the longest
// allowed and the fetches' average latency.
func (r *readAheadState) depth(idx int64, most int, fetchLat time.Duration) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	seq := r.lastAt != (time.Time{}) && idx == r.last+1
	if seq {
		gap := now.Sub(r.lastAt)
		if r.interval == 0 {
			r.interval = gap
		} else {
			r.interval = (3*r.interval + gap) / 4
		}
	} else {
		r.interval = 0
	}
	r.last, r.lastAt = idx, now
	low := min(minReadAhead, most)
	if !seq {
		return low
	}
	if r.interval <= 0 || fetchLat <= 0 {
		return most
	}
	// Chunks consumed while two fetches complete, plus a margin.
	n := int64(2*fetchLat/r.interval) + 2
	return int(max(int64(low), min(n, int64(most))))
}

// scheduleAhead schedules the n chunks after idx, nearest served first.
func (s *Store) scheduleAhead(idx int64, n int) {
	items := make([]prefetchItem, 0, n)
	s.mu.RLock()
	last := (s.size - 1) / s.cs
	for i := min(idx+int64(n), last); i > idx; i-- {
		if c := s.chunks[i]; c != nil && !c.settled.Load() {
			items = append(items, prefetchItem{c: c})
		}
	}
	s.mu.RUnlock()
	if len(items) > 0 {
		s.push(items)
	}
}

// WriteAt writes p at off. Writing beyond Size is an error and writes
// nothing.
func (s *Store) WriteAt(p []byte, off int64) (int, error) {
	if s.closed.Load() {
		return 0, s.errClosed("writing", off)
	}
	size := s.Size()
	if off < 0 || off > size || int64(len(p)) > size-off {
		return 0, status.Errorf(codes.InvalidArgument, "writing %d bytes to chunked file %q at offset %d: beyond its size %d", len(p), s.name, off, size)
	}
	n := 0
	for n < len(p) {
		o := off + int64(n)
		idx := o / s.cs
		in := o - idx*s.cs
		clen := s.chunkLen(idx, size)
		l := int(min(int64(len(p)-n), clen-in))
		c := s.lookupOrCreate(idx)
		s.touch(c, idx)
		if err := s.writeChunk(c, p[n:n+l], in, clen); err != nil {
			return n, err
		}
		n += l
	}
	return n, nil
}

func (s *Store) writeChunk(c *chunk, p []byte, in, clen int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := s.makeDirtyLocked(c, in == 0 && int64(len(p)) == clen); err != nil {
		return err
	}
	ov, err := s.overlayFile()
	if err == nil {
		_, err = ov.WriteAt(p, c.off+in)
	}
	if err != nil {
		return fmt.Errorf("writing chunked file %q at offset %d to its overlay: %w", s.name, c.off+in, err)
	}
	c.gen++
	return nil
}

// makeDirtyLocked gives c a private copy in the overlay. Unless overwrite
// says the caller replaces the whole chunk, its current content is copied in.
func (s *Store) makeDirtyLocked(c *chunk, overwrite bool) error {
	if c.dirty {
		return nil
	}
	if !c.overlay && c.d != nil && !overwrite {
		if c.blob == nil {
			if err := s.openLocked(c, true); err != nil {
				return err
			}
		}
		if err := s.copyToOverlay(c); err != nil {
			return err
		}
	}
	if c.blob != nil {
		c.blob.Close()
		c.blob = nil
	}
	c.overlay = true
	c.dirty = true
	c.settled.Store(true)
	s.dirty.Add(1)
	return nil
}

func (s *Store) copyToOverlay(c *chunk) error {
	n := c.d.SizeBytes
	bp := s.getBuf()
	defer s.bufs.Put(bp)
	buf := (*bp)[:n]
	m, err := c.blob.ReadAt(buf, 0)
	if int64(m) == n {
		err = nil
	} else if err == nil || errors.Is(err, io.EOF) {
		err = status.Errorf(codes.Internal, "blob is shorter than its digest says")
	}
	if err != nil {
		return fmt.Errorf("copying chunk at offset %d (digest %s) of chunked file %q: %w", c.off, digest.String(c.d), s.name, err)
	}
	ov, err := s.overlayFile()
	if err == nil {
		_, err = ov.WriteAt(buf, c.off)
	}
	if err != nil {
		return fmt.Errorf("copying chunk at offset %d of chunked file %q to its overlay: %w", c.off, s.name, err)
	}
	return nil
}

func (s *Store) getBuf() *[]byte {
	if bp, ok := s.bufs.Get().(*[]byte); ok {
		return bp
	}
	b := make([]byte, s.cs)
	return &b
}

// overlayFile returns the overlay, creating it on first use. It is unlinked
// at once, so nothing is left behind even if the process dies.
func (s *Store) overlayFile() (*os.File, error) {
	s.ovMu.Lock()
	defer s.ovMu.Unlock()
	if s.overlay != nil {
		return s.overlay, nil
	}
	if s.closed.Load() {
		return nil, s.errClosed("creating overlay of", 0)
	}
	f, err := os.CreateTemp(s.opts.TempDir, "cow-overlay-*")
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "creating overlay file: %v", err)
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, status.Errorf(codes.Unavailable, "unlinking overlay file: %v", err)
	}
	s.overlay = f
	return f, nil
}

// readOverlay reads p at off from the overlay; bytes past its end are zeros.
func (s *Store) readOverlay(p []byte, off int64) error {
	ov, err := s.overlayFile()
	if err != nil {
		return err
	}
	n, err := ov.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		err = nil
	}
	return err
}

func (s *Store) punchOverlay(off, n int64) {
	s.ovMu.Lock()
	ov := s.overlay
	s.ovMu.Unlock()
	if ov != nil {
		// Best effort: the range is zeros either way.
		_ = unix.Fallocate(int(ov.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
}

// Resize grows the store to n bytes; the new area reads as zeros. Shrinking
// is an InvalidArgument error.
func (s *Store) Resize(n int64) error {
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	size := s.Size()
	if n < size || n > MaxSize {
		return status.Errorf(codes.InvalidArgument, "resizing chunked file %q from %d to %d bytes: a store can only grow, up to %d", s.name, size, n, int64(MaxSize))
	}
	if n == size {
		return nil
	}
	// A short last chunk that grows no longer matches its digest: give it a
	// private copy so the next Save stores it at its new length.
	if last := (size - 1) / s.cs; size > 0 && size%s.cs != 0 {
		if c := s.lookup(last); c != nil {
			var err error
			c.mu.Lock()
			if c.d != nil {
				err = s.makeDirtyLocked(c, false)
				c.gen++
			}
			c.mu.Unlock()
			if err != nil {
				return fmt.Errorf("resizing chunked file %q: %w", s.name, err)
			}
		}
	}
	s.mu.Lock()
	s.size = n
	s.mu.Unlock()
	return nil
}

// Dirty returns the offsets of the dirty chunks, ascending.
func (s *Store) Dirty() []int64 {
	var out []int64
	for _, c := range s.snapshotChunks() {
		c.mu.RLock()
		if c.dirty {
			out = append(out, c.off)
		}
		c.mu.RUnlock()
	}
	return out
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

// Touched returns the offsets of the non-hole chunks read or written so
// far, in order of first access: the working set to Prefetch next time.
// Once EndWorkingSet was called it stops growing (Accessed does not).
func (s *Store) Touched() []int64 {
	s.touchMu.Lock()
	defer s.touchMu.Unlock()
	if s.wsEnded {
		return slices.Clone(s.touched[:s.wsEnd])
	}
	return slices.Clone(s.touched)
}

// Stats returns the store's counters.
func (s *Store) Stats() Stats {
	st := Stats{
		Size:              s.Size(),
		Dirty:             int(s.dirty.Load()),
		Fetched:           s.fetched.Load(),
		FetchedBytes:      s.fetchedBytes.Load(),
		FetchErrors:       s.fetchErrors.Load(),
		RangeReads:        s.rangeReads.Load(),
		ForegroundFetches: s.fgFetches.Load(),
		Prefetched:        s.prefetched.Load(),
		PrefetchQueued:    s.queuedTotal.Load(),
	}
	for _, c := range s.snapshotChunks() {
		c.mu.RLock()
		if c.d != nil || c.dirty {
			st.ChunksListed++
		}
		c.mu.RUnlock()
	}
	s.touchMu.Lock()
	st.Touched = len(s.touched)
	s.touchMu.Unlock()
	return st
}

// Close waits for the whole-chunk fetches started behind verified range
// reads (so that the chunks read are in the cache), stops read-ahead,
// releases the source blobs and removes the overlay. Later reads and writes
// fail with FailedPrecondition.
func (s *Store) Close() error {
	s.behindMu.Lock()
	if !s.closing {
		s.closing = true
		if s.closingCh != nil {
			close(s.closingCh)
		}
	}
	s.behindMu.Unlock()
	s.behind.Wait()
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
