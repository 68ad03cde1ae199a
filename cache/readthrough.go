package cache

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/digest"
)

// maxBufferedFetch is the largest blob fetched into memory to be verified
// once; larger blobs stream and are verified by both tiers.
const maxBufferedFetch = 64 << 20

// DefaultHandoffBytes bounds the memory of fetched blobs a ReadThrough
// keeps serving from the buffer they were verified in: four 4 MB chunks.
// Dropped buffers are the next fetches' buffers, so the bound is also the
// set of buffers a stream of fetches cycles through, and a small set pays:
// the kernel copies each blob out of its buffer into the page cache (the
// local tier's file, a restore's output), and on virtualized machines the
// first kernel access to a user page costs microseconds (on a 2-vCPU
// cloud VM, writing 512 MiB from a ring of 64 MiB of buffers took 1.8x the
// CPU of a ring of 16 MiB, a ring of 128 MiB 5.5x).
const DefaultHandoffBytes = 16 << 20

// ReadThroughOptions configure a ReadThrough. The zero value gives the
// defaults.
type ReadThroughOptions struct {
	// HandoffBytes bounds the bytes of fetched blobs served from memory: a
	// blob fetched from the remote (up to 64 MiB) is verified once into a
	// buffer, handed to its readers from that buffer at once, and written
	// into the local tier in the background; once the write is done and
	// more than HandoffBytes are held, the oldest buffers are dropped and
	// their readers go on from the local tier's file. Default
	// DefaultHandoffBytes; negative: every fetch is written into the local
	// tier before it is served, and served from there.
	HandoffBytes int64
}

// ReadThrough serves blobs from a local tier, filling it from a remote tier
// on a miss. A blob fetched from the remote is verified against its digest
// while streaming, then written into the local tier once; readers get the
// verified bytes from memory while the write completes (see
// ReadThroughOptions.HandoffBytes). Concurrent misses on one blob fetch it
// once.
type ReadThrough struct {
	local  Local
	remote Tier
	opts   ReadThroughOptions
	sf     singleflight.Group

	bufs  sync.Pool // *[]byte: buffers of dropped handoffs, for the next fetches
	mu    sync.Mutex
	live  map[string]*handoff // fetched blobs whose buffer is held
	held  []*handoff          // the same, oldest first
	heldB int64               // bytes of their buffers

	localHits     atomic.Int64
	remoteFetches atomic.Int64
	remoteBytes   atomic.Int64
	remoteErrors  atomic.Int64
	rangeReads    atomic.Int64
	rangeBytes    atomic.Int64
}

var _ Source = (*ReadThrough)(nil)

// ReadThroughStats are a ReadThrough's counters.
type ReadThroughStats struct {
	LocalHits     int64 // opens served by the local tier without a fetch
	RemoteFetches int64 // blobs copied from the remote into the local tier
	RemoteBytes   int64 // bytes of those blobs
	RemoteErrors  int64 // fetches that failed
	RangeReads    int64 // verified range reads served from the remote
	RangeBytes    int64 // bytes of those ranges
}

// NewReadThrough returns a ReadThrough over local and remote with default
// options; a nil remote makes it a plain view of local.
func NewReadThrough(local Local, remote Tier) *ReadThrough {
	return NewReadThroughOptions(local, remote, ReadThroughOptions{})
}

// NewReadThroughOptions is NewReadThrough with options.
func NewReadThroughOptions(local Local, remote Tier, opts ReadThroughOptions) *ReadThrough {
	if opts.HandoffBytes == 0 {
		opts.HandoffBytes = DefaultHandoffBytes
	}
	return &ReadThrough{local: local, remote: remote, opts: opts, live: map[string]*handoff{}}
}

// Stats returns the counters so far.
func (rt *ReadThrough) Stats() ReadThroughStats {
	return ReadThroughStats{
		LocalHits:     rt.localHits.Load(),
		RemoteFetches: rt.remoteFetches.Load(),
		RemoteBytes:   rt.remoteBytes.Load(),
		RemoteErrors:  rt.remoteErrors.Load(),
		RangeReads:    rt.rangeReads.Load(),
		RangeBytes:    rt.rangeBytes.Load(),
	}
}

// refetchable reports whether a local error should be answered from the
// remote: the blob is absent or failed verification (and was removed).
func refetchable(err error) bool {
	return IsNotFound(err) || IsCorrupt(err)
}

// Open opens d from the local tier, fetching it from the remote first when
// the local tier lacks it or holds a corrupt copy. Errors keep the remote's
// status code (NotFound, Unavailable, Internal for corrupt remote data) and
// name the digest.
func (rt *ReadThrough) Open(ctx context.Context, ns Namespace, d *repb.Digest) (Blob, error) {
	b, _, err := rt.OpenTier(ctx, ns, d)
	return b, err
}

// Tier names of OpenTier.
const (
	TierLocal  = "local"
	TierRemote = "remote"
)

// OpenTier is Open, also saying which tier served the blob (TierLocal, or
// TierRemote when it had to be fetched).
func (rt *ReadThrough) OpenTier(ctx context.Context, ns Namespace, d *repb.Digest) (Blob, string, error) {
	span := trace.SpanFromContext(ctx)
	key := blobKey(ns, d)
	if h := rt.acquire(key); h != nil {
		// Fetched a moment ago: still in memory.
		rt.localHits.Add(1)
		span.SetAttributes(attribute.String("tier", TierLocal))
		return h.handle(), TierLocal, nil
	}
	b, err := rt.local.Open(ctx, ns, d)
	if err == nil {
		rt.localHits.Add(1)
		span.SetAttributes(attribute.String("tier", TierLocal))
		return b, TierLocal, nil
	}
	if rt.remote == nil || !refetchable(err) {
		return nil, TierLocal, err
	}
	span.SetAttributes(attribute.String("tier", TierRemote))
	if err := rt.fetchShared(ctx, ns, d, key); err != nil {
		return nil, TierRemote, err
	}
	if h := rt.acquire(key); h != nil {
		return h.handle(), TierRemote, nil
	}
	b, err = rt.local.Open(ctx, ns, d)
	if err != nil {
		return nil, TierRemote, fmt.Errorf("opening blob %s after fetching it: %w", digest.String(d), err)
	}
	return b, TierRemote, nil
}

func blobKey(ns Namespace, d *repb.Digest) string {
	return fmt.Sprintf("%d/%s/%s/%d", ns.DigestFunction(), ns.Instance, d.GetHash(), d.GetSizeBytes())
}

// Fetch makes sure the local tier holds a verified copy of d, copying it from
// the remote if needed. Concurrent calls for one blob share one copy; a
// caller whose ctx ends stops waiting, but the copy runs on for the others.
func (rt *ReadThrough) Fetch(ctx context.Context, ns Namespace, d *repb.Digest) error {
	if rt.remote == nil {
		b, err := rt.local.Open(ctx, ns, d)
		if err != nil {
			return err
		}
		return b.Close()
	}
	key := blobKey(ns, d)
	if err := rt.fetchShared(ctx, ns, d, key); err != nil {
		return err
	}
	h := rt.acquire(key)
	if h == nil {
		return nil
	}
	defer h.release()
	select {
	case <-ctx.Done():
		return fmt.Errorf("fetching blob %s: %w", digest.String(d), status.FromContextError(ctx.Err()).Err())
	case <-h.done:
		return h.err
	}
}

// fetchShared fetches d once for all concurrent callers; it returns when
// the blob is verified, in the local tier or in an inflight handoff.
func (rt *ReadThrough) fetchShared(ctx context.Context, ns Namespace, d *repb.Digest, key string) error {
	ch := rt.sf.DoChan(key, func() (any, error) {
		return nil, rt.fetch(context.WithoutCancel(ctx), ns, d, key)
	})
	select {
	case <-ctx.Done():
		return fmt.Errorf("fetching blob %s: %w", digest.String(d), status.FromContextError(ctx.Err()).Err())
	case res := <-ch:
		return res.Err
	}
}

func (rt *ReadThrough) fetch(ctx context.Context, ns Namespace, d *repb.Digest, key string) error {
	// A fetch that finished just before this one started already did the
	// work (its bytes may still be on their way into the local tier); a
	// corrupt local copy is removed by this Open.
	rt.mu.Lock()
	_, live := rt.live[key]
	rt.mu.Unlock()
	if live {
		return nil
	}
	if b, err := rt.local.Open(ctx, ns, d); err == nil {
		return b.Close()
	}
	if hs := rt.local; d.GetSizeBytes() <= maxBufferedFetch {
		// Verify once while reading; store without hashing again.
		b, err := readAllInto(ctx, Verifying(rt.remote), ns, d, rt.buffer(d.GetSizeBytes()))
		if err != nil {
			rt.recycle(b)
			rt.remoteErrors.Add(1)
			return fmt.Errorf("fetching blob %s from remote: %w", digest.String(d), err)
		}
		if rt.opts.HandoffBytes < 0 {
			err := hs.PutHashed(ctx, ns, d, b)
			rt.recycle(b)
			if err != nil {
				rt.remoteErrors.Add(1)
				return fmt.Errorf("fetching blob %s from remote: %w", digest.String(d), err)
			}
		} else {
			rt.handOff(ctx, ns, d, key, b, hs)
		}
		rt.remoteFetches.Add(1)
		rt.remoteBytes.Add(d.GetSizeBytes())
		return nil
	}
	rc, err := Verifying(rt.remote).Read(ctx, ns, d)
	if err != nil {
		rt.remoteErrors.Add(1)
		return fmt.Errorf("fetching blob %s from remote: %w", digest.String(d), err)
	}
	defer rc.Close()
	if err := rt.local.Write(ctx, ns, d, rc); err != nil {
		rt.remoteErrors.Add(1)
		return fmt.Errorf("fetching blob %s from remote: %w", digest.String(d), err)
	}
	rt.remoteFetches.Add(1)
	rt.remoteBytes.Add(d.GetSizeBytes())
	return nil
}

// buffer is an empty buffer with room for n bytes: one a dropped handoff
// left behind when it is large enough, so that fetches reuse memory
// instead of touching fresh pages.
func (rt *ReadThrough) buffer(n int64) []byte {
	if bp, ok := rt.bufs.Get().(*[]byte); ok && int64(cap(*bp)) >= n {
		return (*bp)[:0]
	}
	return make([]byte, 0, n)
}

// recycle gives b, which nothing reads any more, to the next fetches.
func (rt *ReadThrough) recycle(b []byte) {
	if cap(b) > 0 {
		b = b[:0]
		rt.bufs.Put(&b)
	}
}

// handoff is a fetched, verified blob served from memory while (and after)
// it is written into the local tier. It stays in ReadThrough.live, buffer
// and all, until trimLocked drops it (its write has ended and more than
// HandoffBytes are held); the local tier's file then serves its open
// handles, and is closed with the last of them. The dropped buffer is
// recycled once no reader is inside it (readers hold inUse's read lock
// while they use the buffer).
type handoff struct {
	rt    *ReadThrough
	d     *repb.Digest
	key   string
	inUse sync.RWMutex
	buf   atomic.Pointer[[]byte] // nil once dropped
	done  chan struct{}          // closed when the local write has ended
	err   error                  // the write's error; set before done closes
	file  Blob                   // the stored blob, once written (nil on error)
	refs  int                    // under rt.mu: handles, plus one for the write
}

// handOff makes data (verified against d) available to readers at once and
// writes it into the local tier in the background.
func (rt *ReadThrough) handOff(ctx context.Context, ns Namespace, d *repb.Digest, key string, data []byte, hs Local) {
	h := &handoff{rt: rt, d: d, key: key, done: make(chan struct{}), refs: 1}
	h.buf.Store(&data)
	rt.mu.Lock()
	rt.live[key] = h
	rt.held = append(rt.held, h)
	rt.heldB += int64(len(data))
	dropped := rt.trimLocked()
	rt.mu.Unlock()
	if len(dropped) > 0 {
		go rt.recycleDropped(dropped)
	}
	go func() {
		err := hs.PutHashed(ctx, ns, d, data)
		var f Blob
		if err == nil {
			f, err = rt.local.Open(ctx, ns, d)
		}
		if err != nil {
			rt.remoteErrors.Add(1)
			err = fmt.Errorf("storing blob %s fetched from remote in the local tier: %w", digest.String(d), err)
		}
		h.file, h.err = f, err
		close(h.done)
		rt.mu.Lock()
		dropped := rt.trimLocked()
		rt.mu.Unlock()
		rt.recycleDropped(dropped)
		h.release()
	}()
}

// trimLocked drops the oldest handoffs whose write has ended while more
// than HandoffBytes are held, and returns their buffers for recycleDropped.
func (rt *ReadThrough) trimLocked() (dropped []droppedBuf) {
	kept := rt.held[:0]
	for _, h := range rt.held {
		written := false
		select {
		case <-h.done:
			written = true
		default:
		}
		if rt.heldB > rt.opts.HandoffBytes && written {
			if bp := h.buf.Swap(nil); bp != nil {
				rt.heldB -= int64(len(*bp))
				dropped = append(dropped, droppedBuf{h, *bp})
			}
			delete(rt.live, h.key)
			if h.refs == 0 && h.file != nil {
				h.file.Close()
			}
			continue
		}
		kept = append(kept, h)
	}
	clear(rt.held[len(kept):])
	rt.held = kept
	return dropped
}

// droppedBuf is the buffer trimLocked took from handoff h.
type droppedBuf struct {
	h   *handoff
	buf []byte
}

// recycleDropped recycles the buffers trimLocked dropped, each once the
// readers that were inside it have left (new readers no longer see it).
// It is called without rt.mu, and never by a fetch that a reader inside
// a buffer may be waiting for.
func (rt *ReadThrough) recycleDropped(dropped []droppedBuf) {
	for _, d := range dropped {
		// Taking the write lock waits out the readers inside the buffer.
		d.h.inUse.Lock()
		d.h.inUse.Unlock()
		rt.recycle(d.buf)
	}
}

// acquire returns the live handoff of key with a reference taken, or nil.
func (rt *ReadThrough) acquire(key string) *handoff {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	h := rt.live[key]
	if h != nil {
		h.refs++
	}
	return h
}

func (h *handoff) release() {
	h.rt.mu.Lock()
	h.refs--
	closeFile := h.refs == 0 && h.buf.Load() == nil
	h.rt.mu.Unlock()
	if closeFile && h.file != nil {
		h.file.Close()
	}
}

func (h *handoff) handle() Blob { return &handoffBlob{h: h} }

// handoffBlob is one opener's view of a handoff.
type handoffBlob struct {
	h    *handoff
	once sync.Once
}

func (b *handoffBlob) Size() int64 { return b.h.d.GetSizeBytes() }

func (b *handoffBlob) ReadAt(p []byte, off int64) (int, error) {
	h := b.h
	h.inUse.RLock()
	if bp := h.buf.Load(); bp != nil {
		defer h.inUse.RUnlock()
		data := *bp
		if off < 0 || off >= int64(len(data)) {
			if off == int64(len(data)) {
				return 0, io.EOF
			}
			return 0, status.Errorf(codes.InvalidArgument, "reading blob %s at offset %d: outside its %d bytes", digest.String(h.d), off, len(data))
		}
		n := copy(p, data[off:])
		if n < len(p) {
			return n, io.EOF
		}
		return n, nil
	}
	h.inUse.RUnlock()
	<-h.done
	if h.file == nil {
		return 0, fmt.Errorf("reading blob %s at offset %d: %w", digest.String(h.d), off, h.err)
	}
	return h.file.ReadAt(p, off)
}

// Close releases the view. It waits for the blob's write into the local
// tier to end, so that a closed blob is in the local tier (unless the write
// failed: then that error is returned).
func (b *handoffBlob) Close() error {
	var err error
	b.once.Do(func() {
		<-b.h.done
		err = b.h.err
		b.h.release()
	})
	return err
}

// WithContents lends fn the verified bytes in memory while the buffer is
// held, else the local tier's blob's contents once it is written.
func (b *handoffBlob) WithContents(fn func(Contents) error) error {
	h := b.h
	h.inUse.RLock()
	if bp := h.buf.Load(); bp != nil {
		defer h.inUse.RUnlock()
		return fn(Contents{Mem: *bp})
	}
	h.inUse.RUnlock()
	<-h.done
	if h.file == nil {
		return fmt.Errorf("reading blob %s: %w", digest.String(h.d), h.err)
	}
	return h.file.WithContents(fn)
}

// Read is Open as a stream: the blob is in the local tier and verified
// before the first byte is returned.
func (rt *ReadThrough) Read(ctx context.Context, ns Namespace, d *repb.Digest) (io.ReadCloser, error) {
	b, err := rt.Open(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	return blobReader{io.NewSectionReader(b, 0, b.Size()), b}, nil
}

type blobReader struct {
	*io.SectionReader
	io.Closer
}
