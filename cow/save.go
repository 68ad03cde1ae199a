package cow

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/fileio"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// SaveStats describes what a Save or FromFile did.
type SaveStats struct {
	// ChunksTotal is the number of chunks listed in the result.
	ChunksTotal int
	// ChunksWritten is the number of blobs newly stored in the sink
	// (identical chunks count once; blobs the sink had are not written).
	ChunksWritten int
	// ChunksDirty is the number of chunks hashed: the dirty chunks for
	// Save, the chunks holding data for FromFile.
	ChunksDirty int
	// BytesWritten is the total size of the blobs written.
	BytesWritten int64
	// BytesSkippedZero counts bytes not stored because they were zeros:
	// chunks that hashed as all zeros, and (FromFile) holes of the file.
	BytesSkippedZero int64
}

// saveJob is one chunk to hash and store.
type saveJob struct {
	off    int64
	length int64
	// read fills buf (len == length) and reports the chunk's write
	// generation at that moment.
	read func(buf []byte) (gen uint64, err error)

	// Results.
	d    *repb.Digest // nil when zero
	od   *repb.Digest // the outboard's digest, when computed
	ob   []byte       // the outboard, until stored or found present
	gen  uint64
	zero bool
}

type hashed struct {
	j   *saveJob
	buf *[]byte
	// What the sink lacks: the chunk, its outboard.
	putChunk, putOb bool
}

// saver runs the hash → FindMissing → Write pipeline with bounded memory:
// Parallelism readers hash chunks into pooled buffers, one batcher asks the
// sink which digests are missing, Parallelism writers store those.
type saver struct {
	name string
	sink Sink
	opts Options
	cs   int64
	pool *sync.Pool // of *[]byte of length cs

	written      atomic.Int64
	bytesWritten atomic.Int64
}

func (sv *saver) run(ctx context.Context, jobs []*saveJob) error {
	if len(jobs) == 0 {
		return nil
	}
	par := sv.opts.Parallelism
	g, ctx := errgroup.WithContext(ctx)

	// Buffers in flight: enough to keep readers and writers busy, at most
	// maxSaveBuffer bytes unless a single chunk is larger.
	nbuf := max(1, min(3*par, len(jobs), int(maxSaveBuffer/sv.cs)))
	free := make(chan *[]byte, nbuf)
	for range nbuf {
		if bp, ok := sv.pool.Get().(*[]byte); ok {
			free <- bp
			continue
		}
		b := make([]byte, sv.cs)
		free <- &b
	}
	defer func() {
		// Keep the buffers for the next Save; any still in flight after
		// an error are left to the garbage collector.
		for {
			select {
			case bp := <-free:
				sv.pool.Put(bp)
			default:
				return
			}
		}
	}()
	release := func(b *[]byte) { free <- b }

	hashedCh := make(chan hashed, nbuf)
	uploadCh := make(chan hashed, nbuf)
	fn := sv.opts.Namespace.Function

	var next atomic.Int64
	var readers sync.WaitGroup
	for range min(par, len(jobs)) {
		readers.Add(1)
		g.Go(func() error {
			defer readers.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(len(jobs)) {
					return nil
				}
				j := jobs[i]
				var bp *[]byte
				select {
				case bp = <-free:
				case <-ctx.Done():
					return ctx.Err()
				}
				buf := (*bp)[:j.length]
				gen, err := j.read(buf)
				if err != nil {
					release(bp)
					return err
				}
				j.gen = gen
				if sv.opts.Progress != nil {
					sv.opts.Progress(j.length)
				}
				if digest.IsZero(buf) {
					j.zero = true
					release(bp)
					continue
				}
				if fn == digest.BLAKE3 && !sv.opts.NoOutboards {
					// One pass gives the outboard and its root, which is
					// the chunk's BLAKE3 digest.
					j.ob, j.d = cache.Outboard(buf)
					j.od = digest.Compute(fn, j.ob)
				} else {
					j.d = digest.Compute(fn, buf)
				}
				select {
				case hashedCh <- hashed{j: j, buf: bp}:
				case <-ctx.Done():
					release(bp)
					return ctx.Err()
				}
			}
		})
	}
	go func() { readers.Wait(); close(hashedCh) }()

	// Batcher: one FindMissing per batch of whatever has been hashed.
	g.Go(func() error {
		defer close(uploadCh)
		claimed := map[string]bool{} // digests already handled this run
		for {
			var batch []hashed
			select {
			case h, ok := <-hashedCh:
				if !ok {
					return nil
				}
				batch = append(batch, h)
			case <-ctx.Done():
				return ctx.Err()
			}
		drain:
			for len(batch) < 256 {
				select {
				case h, ok := <-hashedCh:
					if !ok {
						break drain
					}
					batch = append(batch, h)
				default:
					break drain
				}
			}
			var ask []*repb.Digest
			asked := map[string]bool{}
			for _, h := range batch {
				for _, d := range []*repb.Digest{h.j.d, h.j.od} {
					if d != nil && !claimed[d.Hash] && !asked[d.Hash] {
						asked[d.Hash] = true
						ask = append(ask, d)
					}
				}
			}
			missing := map[string]bool{}
			if len(ask) > 0 {
				ms, err := sv.sink.FindMissing(ctx, sv.opts.Namespace, ask)
				if err != nil {
					for _, h := range batch {
						release(h.buf)
					}
					return fmt.Errorf("finding missing chunks of %q (%d digests, first %s): %w", sv.name, len(ask), digest.String(ask[0]), err)
				}
				for _, d := range ms {
					missing[d.GetHash()] = true
				}
			}
			for _, h := range batch {
				k := h.j.d.Hash
				h.putChunk = !claimed[k] && missing[k]
				claimed[k] = true
				if od := h.j.od; od != nil {
					h.putOb = !claimed[od.Hash] && missing[od.Hash]
					claimed[od.Hash] = true
				}
				if !h.putChunk && !h.putOb {
					h.j.ob = nil
					release(h.buf)
					continue
				}
				select {
				case uploadCh <- h:
				case <-ctx.Done():
					release(h.buf)
					return ctx.Err()
				}
			}
		}
	})

	// The digest was computed from these very bytes just now.
	put := func(d *repb.Digest, b []byte) error { return sv.sink.PutHashed(ctx, sv.opts.Namespace, d, b) }
	for range par {
		g.Go(func() error {
			for h := range uploadCh {
				j := h.j
				var err error
				if h.putChunk {
					err = put(j.d, (*h.buf)[:j.length])
				}
				release(h.buf)
				if err != nil {
					return fmt.Errorf("storing chunk at offset %d (digest %s) of %q: %w", j.off, digest.String(j.d), sv.name, err)
				}
				if h.putOb {
					err = put(j.od, j.ob)
				}
				j.ob = nil
				if err != nil {
					return fmt.Errorf("storing the outboard (digest %s) of chunk at offset %d (digest %s) of %q: %w", digest.String(j.od), j.off, digest.String(j.d), sv.name, err)
				}
				if h.putChunk {
					sv.written.Add(1)
					sv.bytesWritten.Add(j.length)
				}
			}
			return nil
		})
	}
	return g.Wait()
}

// maxSaveBuffer bounds the memory a Save or FromFile holds in chunk buffers.
const maxSaveBuffer = 256 << 20

// Save stores the dirty chunks in sink and returns the new description. Dirty
// chunks are hashed in parallel; all-zero ones become holes; only blobs the
// sink reports missing are written (bounded parallelism, the first error
// cancels the rest). On success the saved chunks are clean (their content
// stays in the overlay) and Dirty is empty, except chunks written during the
// Save, which stay dirty. On error the store is unchanged.
func (s *Store) Save(ctx context.Context, sink Sink) (*snapshotpb.ChunkedFile, SaveStats, error) {
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	if s.closed.Load() {
		return nil, SaveStats{}, s.errClosed("saving", 0)
	}
	size := s.Size()
	chunks := s.snapshotChunks()
	var jobs []*saveJob
	jobOf := map[*chunk]*saveJob{}
	for _, c := range chunks {
		c.mu.RLock()
		dirty := c.dirty
		c.mu.RUnlock()
		if !dirty {
			continue
		}
		c := c
		j := &saveJob{off: c.off, length: s.chunkLen(c.off/s.cs, size)}
		j.read = func(buf []byte) (uint64, error) {
			c.mu.RLock()
			defer c.mu.RUnlock()
			if err := s.readOverlay(buf, c.off); err != nil {
				return 0, fmt.Errorf("reading dirty chunk at offset %d of %q: %w", c.off, s.name, err)
			}
			return c.gen, nil
		}
		jobs = append(jobs, j)
		jobOf[c] = j
	}
	sv := &saver{name: s.name, sink: sink, opts: s.opts, cs: s.cs, pool: &s.bufs}
	if err := sv.run(ctx, jobs); err != nil {
		return nil, SaveStats{}, fmt.Errorf("saving chunked file %q: %w", s.name, err)
	}
	st := SaveStats{
		ChunksDirty:   len(jobs),
		ChunksWritten: int(sv.written.Load()),
		BytesWritten:  sv.bytesWritten.Load(),
	}
	cf := &snapshotpb.ChunkedFile{Name: s.name, Size: size, ChunkSize: s.cs}
	for _, c := range chunks {
		c.mu.Lock()
		if j := jobOf[c]; j != nil {
			c.d, c.ob = j.d, j.od
			if j.zero {
				st.BytesSkippedZero += j.length
			}
			if c.gen == j.gen {
				c.dirty = false
				s.dirty.Add(-1)
				if j.zero {
					c.overlay = false
					s.punchOverlay(c.off, j.length)
				}
			}
		}
		d, ob := c.d, c.ob
		c.mu.Unlock()
		if d != nil {
			cf.Chunks = append(cf.Chunks, &snapshotpb.Chunk{Offset: c.off, Digest: d, Outboard: ob})
		}
	}
	st.ChunksTotal = len(cf.Chunks)
	s.mu.Lock()
	s.cleanSize = size
	s.mu.Unlock()
	return cf, st, nil
}

// FromFile splits the file at path into chunks (the first save): holes found
// with SEEK_DATA/SEEK_HOLE are not read, all-zero chunks are not stored, the
// last chunk may be short. Chunks are read and hashed in parallel and the
// blobs sink is missing are written. It returns a Store over the result that
// reads from src (usually the same cache as sink); the file is not used
// afterwards.
func FromFile(ctx context.Context, name, path string, src Source, sink Sink, opts Options) (*Store, SaveStats, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, SaveStats{}, err
	}
	if name == "" {
		name = filepath.Base(path)
	}
	// Never block in open on a FIFO or a device: only a regular file is
	// split.
	f, err := fileio.OpenRegular(path)
	if err != nil {
		return nil, SaveStats{}, status.Errorf(status.Code(err), "splitting file %s into chunked file %q: %v", path, name, status.Convert(err).Message())
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, SaveStats{}, fmt.Errorf("splitting file %s: %w", path, err)
	}
	size := fi.Size()
	if size > MaxSize {
		return nil, SaveStats{}, status.Errorf(codes.InvalidArgument, "splitting file %s: size %d exceeds %d", path, size, int64(MaxSize))
	}
	cs := opts.ChunkSize
	idxs, err := dataChunks(f, size, cs)
	if err != nil {
		return nil, SaveStats{}, fmt.Errorf("finding data in %s: %w", path, err)
	}
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_SEQUENTIAL)
	jobs := make([]*saveJob, len(idxs))
	for i, idx := range idxs {
		off := idx * cs
		j := &saveJob{off: off, length: min(cs, size-off)}
		j.read = func(buf []byte) (uint64, error) {
			n, err := f.ReadAt(buf, off)
			if n == len(buf) {
				return 0, nil
			}
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return 0, status.Errorf(codes.Unavailable, "reading %s at offset %d: %v", path, off, err)
		}
		jobs[i] = j
	}
	sv := &saver{name: name, sink: sink, opts: opts, cs: cs, pool: &sync.Pool{}}
	if err := sv.run(ctx, jobs); err != nil {
		return nil, SaveStats{}, fmt.Errorf("splitting file %s into chunked file %q: %w", path, name, err)
	}
	cf := &snapshotpb.ChunkedFile{Name: name, Size: size, ChunkSize: cs}
	st := SaveStats{
		ChunksDirty:   len(jobs),
		ChunksWritten: int(sv.written.Load()),
		BytesWritten:  sv.bytesWritten.Load(),
	}
	var dataBytes int64
	for _, j := range jobs {
		dataBytes += j.length
		if !j.zero {
			cf.Chunks = append(cf.Chunks, &snapshotpb.Chunk{Offset: j.off, Digest: j.d, Outboard: j.od})
		} else {
			st.BytesSkippedZero += j.length
		}
	}
	st.BytesSkippedZero += size - dataBytes
	st.ChunksTotal = len(cf.Chunks)
	s, err := Open(name, cf, src, opts)
	if err != nil {
		return nil, SaveStats{}, err
	}
	return s, st, nil
}

// dataChunks lists the indices of chunks that hold data according to
// SEEK_DATA/SEEK_HOLE (every chunk when the filesystem cannot tell).
func dataChunks(f *os.File, size, cs int64) ([]int64, error) {
	n := (size + cs - 1) / cs
	fd := int(f.Fd())
	var out []int64
	next := int64(0) // first chunk index not yet listed
	for off := int64(0); off < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			out = out[:0]
			for i := range n {
				out = append(out, i)
			}
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		h = min(h, size)
		for i := max(d/cs, next); i <= (h-1)/cs && i < n; i++ {
			out = append(out, i)
		}
		next = max(next, (h-1)/cs+1)
		off = h
	}
	return out, nil
}
