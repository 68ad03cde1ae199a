// Package localcache is snaploader's on-disk cache tier: a content-addressed
// blob store plus a small action cache (snapshot manifests), bounded in bytes
// of real disk usage with least-recently-used eviction.
//
// # On-disk layout
//
// Under the cache directory:
//
//	cas/<fn>/<hh>/<hash>-<size>                     blob (shared by all groups)
//	ac/<group>/<instance>/<fn>/<hh>/<hash>-<size>   serialized ActionResult
//	ac/<group>/<instance>/INSTANCE                  the instance name, verbatim
//	tmp/                                            writes in flight
//	scratch/                                        TempDir: callers' files
//
// <fn> is the digest function ("blake3" or "sha256"), <hh> the first two hex
// characters of the hash. <group> is "anonymous" for the anonymous group ""
// and "g-<name>" otherwise; a group name must match
// [A-Za-z0-9][A-Za-z0-9._@+-]{0,127}, anything else is InvalidArgument.
// <instance> is the SHA-256 hex of the instance name (any string, so an
// instance name can never name a path); the INSTANCE file beside it records
// the name so that ListActionResults can report it.
//
// # Semantics
//
// Writes stream into a temporary file in tmp/ while hashing and are renamed
// into place only when the content matches the digest, so a reader never
// sees a partial file. Page-sized runs of zeros are left as holes, so sparse
// chunks cost little disk. Nothing is fsynced: a blob torn by a crash is
// caught by verification, because blobs this process did not write itself
// (found at start, or written by another process) are verified against
// their digest on first Read or Open, unless a process of the same boot
// verified them (a marker in an extended attribute, see verifiedAttr); a
// mismatch removes the file and is a DataLoss ("corrupt") error.
//
// Every entry (blob or action-cache entry) counts its st_blocks*512 bytes
// toward Options.MaxBytes. After a write the least recently used entries
// that are not pinned are removed until usage is under the bound. Lookups
// (FindMissing of a present blob, Read, Open, GetActionResult) refresh an
// entry's recency and record it as the file's mtime, so the index rebuilt by
// New (a walk of the directory) keeps the LRU order across restarts. The
// batch lookups of a restore (FindMissing, Pin) answer indexed entries from
// memory and write their mtimes in the background (Close waits for it), so
// that a restore's readiness costs no system call per chunk.
//
// Several processes may share one directory: files appear only by rename,
// a file removed by another process is NotFound, and each process rescans
// the directory after writing a fraction of MaxBytes, every RescanInterval,
// and on Close, so the bound holds eventually for all writers together.
// Pins (Pin and open Blobs) protect entries against eviction by this
// process only; a blob another process evicts while this one holds it open
// stays readable through the open file.
package localcache

import (
	"container/list"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// DefaultMaxBytes is the default bound on disk usage: 20 GiB.
const DefaultMaxBytes int64 = 20 << 30

// DefaultRescanInterval is how often, at most, a writing process rescans the
// directory for other processes' files when it has not written enough to
// trigger a rescan by volume.
const DefaultRescanInterval = time.Minute

// Options configures a Cache. The zero value gives the defaults.
type Options struct {
	// MaxBytes bounds the disk usage (st_blocks*512) of all entries.
	// Default DefaultMaxBytes.
	MaxBytes int64
	// RescanInterval: a write rescans the directory when the last rescan is
	// older than this. Default DefaultRescanInterval.
	RescanInterval time.Duration
	// RescanBytes: a write rescans the directory after this process has
	// written this many bytes since the last rescan. Default MaxBytes/16.
	RescanBytes int64
	// Compression stores each new blob of at least 8 KiB zstd-compressed
	// (the fastest level) when that saves at least a sixteenth of its disk
	// usage; others stay raw, with their zero runs as holes. Blobs of
	// either form are read whatever this says, so a directory written with
	// or without it stays readable. Off by default: reads of compressed
	// blobs decode (Open decodes the whole blob into an unnamed scratch
	// file), which a host's page faults should not wait for.
	Compression bool
	// BootID names the running boot of this host, for verification markers
	// (see the package documentation); empty means the kernel's
	// /proc/sys/kernel/random/boot_id. Markers are off if it is unknown.
	BootID string
}

const (
	casDir     = "cas"
	acDir      = "ac"
	tmpDir     = "tmp"
	scratchDir = "scratch"
	instFile   = "INSTANCE"
	pageSize   = 4096
)

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

var groupRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$`)

// entry is one indexed file.
type entry struct {
	rel      string // path relative to the cache dir; also the index key
	size     int64  // disk usage in bytes
	atime    int64  // last use, unix nanoseconds
	pins     int
	verified bool // content known to match the digest
	elem     *list.Element
}

// Cache is a directory-backed cache. It implements cache.Cache and
// cache.Opener and is safe for concurrent use.
type Cache struct {
	dir  string
	opts Options

	mu        sync.Mutex
	entries   map[string]*entry
	lru       *list.List // front = most recently used
	usage     int64
	reserved  int64 // promised to writes in flight (Reserve)
	sinceScan int64
	lastScan  time.Time
	scanning  bool
	// touchQ holds recencies still to be written as mtimes (lookupMany),
	// by one goroutine at a time (touching), which touchers tracks.
	touchQ   map[*entry]time.Time
	touching bool
	touchers sync.WaitGroup

	evictions atomic.Int64
	// encoders holds a token per zstd encoder in use (Options.Compression).
	encoders chan struct{}
}

var (
	_ cache.Cache  = (*Cache)(nil)
	_ cache.Opener = (*Cache)(nil)
)

// New opens (creating if needed) the cache in dir and rebuilds its index by
// walking it. Temporary files left by writers that are gone are removed.
func New(dir string, opts Options) (*Cache, error) {
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = DefaultMaxBytes
	}
	if opts.RescanInterval <= 0 {
		opts.RescanInterval = DefaultRescanInterval
	}
	if opts.RescanBytes <= 0 {
		opts.RescanBytes = max(opts.MaxBytes/16, 1)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("opening local cache %s: %w", dir, err)
	}
	for _, d := range []string{casDir, acDir, tmpDir, scratchDir} {
		if err := os.MkdirAll(filepath.Join(abs, d), 0o755); err != nil {
			return nil, fmt.Errorf("opening local cache %s: %w", dir, err)
		}
	}
	c := &Cache{
		dir:      abs,
		opts:     opts,
		entries:  map[string]*entry{},
		lru:      list.New(),
		encoders: make(chan struct{}, max(2, runtime.GOMAXPROCS(0))),
	}
	if c.opts.BootID == "" {
		if b, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
			c.opts.BootID = strings.TrimSpace(string(b))
		}
	}
	c.cleanTemp()
	if err := c.Rescan(context.Background()); err != nil {
		return nil, err
	}
	return c, nil
}

// Dir is the cache directory.
func (c *Cache) Dir() string { return c.dir }

// TempDir is a directory on the same filesystem as the cache, for callers'
// files (unpacked artifacts, copy-on-write overlays) that may later be
// hard-linked or renamed. The cache never cleans it nor counts it, except
// the space callers promise their files with Reserve.
func (c *Cache) TempDir() string { return filepath.Join(c.dir, scratchDir) }

// MaxBytes is the bound on disk usage (Options.MaxBytes).
func (c *Cache) MaxBytes() int64 { return c.opts.MaxBytes }

// Reserved is the disk space promised to writes in flight (Reserve).
func (c *Cache) Reserved() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reserved
}

// Usage is the disk usage (st_blocks*512) of the indexed entries.
func (c *Cache) Usage() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.usage
}

// Close rescans the directory and evicts down to the bound. The Cache must
// not be used afterwards.
func (c *Cache) Close() error {
	c.touchers.Wait()
	return c.Rescan(context.Background())
}

// Path is where the blob d lives (whether or not it is present). Callers may
// hard-link or read it but must never modify it: entries are immutable and
// shared. A hard link keeps the data alive after eviction but is not counted
// in Usage. Path is "" for a malformed digest.
func (c *Cache) Path(ns cache.Namespace, d *repb.Digest) string {
	if digest.Validate(d) != nil {
		return ""
	}
	return filepath.Join(c.dir, casRel(ns.DigestFunction(), d))
}

// casRel is the path of blob d relative to the cache directory, for a
// valid digest (built without filepath.Join: a restore forms one per chunk).
func casRel(fn digest.Function, d *repb.Digest) string {
	return casDir + "/" + digest.FunctionName(fn) + "/" + d.Hash[:2] + "/" + d.Hash + "-" + strconv.FormatInt(d.SizeBytes, 10)
}

func groupDir(group string) (string, error) {
	if group == "" {
		return "anonymous", nil
	}
	if !groupRE.MatchString(group) {
		return "", status.Errorf(codes.InvalidArgument, "group name %q is not allowed (want %s)", group, groupRE)
	}
	return "g-" + group, nil
}

func instanceDir(instance string) string { return digest.StringListHash(instance) }

func acInstRel(ns cache.Namespace) (string, error) {
	g, err := groupDir(ns.Group)
	if err != nil {
		return "", err
	}
	return filepath.Join(acDir, g, instanceDir(ns.Instance)), nil
}

func acRel(ns cache.Namespace, key *repb.Digest) (string, error) {
	inst, err := acInstRel(ns)
	if err != nil {
		return "", err
	}
	fn := ns.DigestFunction()
	return filepath.Join(inst, digest.FunctionName(fn), key.Hash[:2], key.Hash+"-"+strconv.FormatInt(key.SizeBytes, 10)), nil
}

func checkNS(ns cache.Namespace) error {
	if _, err := digest.New(ns.DigestFunction()); err != nil {
		return status.Errorf(codes.InvalidArgument, "namespace: %v", err)
	}
	return nil
}

func checkDigest(ns cache.Namespace, d *repb.Digest) error {
	if err := checkNS(ns); err != nil {
		return err
	}
	if err := digest.Validate(d); err != nil {
		return status.Errorf(codes.InvalidArgument, "%v", err)
	}
	return nil
}

// lookup returns the entry for rel, consulting the disk when this process
// has not indexed it (another process may have written it). The entry's
// recency is refreshed, in memory and as the file's mtime; a file that has
// vanished is dropped from the index and nil is returned.
func (c *Cache) lookup(rel string, pin bool) *entry {
	now := time.Now()
	c.mu.Lock()
	e := c.entries[rel]
	if e != nil {
		c.touchLocked(e, now)
		if pin {
			e.pins++
		}
	}
	c.mu.Unlock()
	path := filepath.Join(c.dir, rel)
	if e != nil {
		if err := os.Chtimes(path, now, now); err != nil && errors.Is(err, fs.ErrNotExist) {
			c.mu.Lock()
			if pin {
				e.pins--
			}
			c.dropLocked(e)
			c.mu.Unlock()
			return nil
		}
		return e
	}
	return c.lookupDisk(rel, path, pin, now, true)
}

// lookupDisk indexes rel if another process stored it (nil if there is
// nothing at path; what is there is checked when it is opened), recording now as its recency on disk when touch
// is set.
func (c *Cache) lookupDisk(rel, path string, pin bool, now time.Time, touch bool) *entry {
	if touch {
		if err := os.Chtimes(path, now, now); err != nil {
			return nil
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[rel]
	if e == nil {
		e = &entry{rel: rel, size: st.Blocks * 512}
		c.addLocked(e)
	}
	c.touchLocked(e, now)
	if pin {
		e.pins++
	}
	return e
}

// lookupMany is lookup of many entries at once, for the checks that a
// restore makes of every chunk of a snapshot (FindMissing, Pin): indexed
// entries are found in memory under one lock, and their recency is
// written to disk (mtimes) in the background, so that readiness does not
// cost a system call per chunk. With exact, each indexed file is also
// checked to exist (FindMissing); without (FindMissingIndexed, Pin), a
// file that another process removed is found when it is opened. Entries
// not indexed are looked up on disk. The result has nil
// for rels not present.
func (c *Cache) lookupMany(rels []string, pin, exact bool) []*entry {
	now := time.Now()
	out := make([]*entry, len(rels))
	var unknown []int
	c.mu.Lock()
	for i, rel := range rels {
		e := c.entries[rel]
		if e == nil {
			unknown = append(unknown, i)
			continue
		}
		c.touchLocked(e, now)
		c.queueTouchLocked(e, now)
		if pin {
			e.pins++
		}
		out[i] = e
	}
	c.mu.Unlock()
	if exact {
		// An answer others act on (a client that skips an upload, a
		// completeness check): each indexed file is checked to exist.
		for i, e := range out {
			var st unix.Stat_t
			if e == nil || unix.Stat(filepath.Join(c.dir, e.rel), &st) == nil {
				continue
			}
			c.mu.Lock()
			if pin {
				e.pins--
			}
			c.dropLocked(e)
			c.mu.Unlock()
			out[i] = nil
		}
	}
	for _, i := range unknown {
		out[i] = c.lookupDisk(rels[i], filepath.Join(c.dir, rels[i]), pin, now, true)
	}
	return out
}

// queueTouchLocked schedules writing e's recency as its file's mtime, by a
// background goroutine that Close waits for.
func (c *Cache) queueTouchLocked(e *entry, now time.Time) {
	if c.touchQ == nil {
		c.touchQ = map[*entry]time.Time{}
	}
	c.touchQ[e] = now
	if !c.touching {
		c.touching = true
		c.touchers.Add(1)
		go c.applyTouches()
	}
}

// applyTouches writes queued recencies to disk until the queue is empty,
// dropping entries whose files are gone.
func (c *Cache) applyTouches() {
	defer c.touchers.Done()
	for {
		c.mu.Lock()
		q := c.touchQ
		c.touchQ = nil
		if len(q) == 0 {
			c.touching = false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
		for e, t := range q {
			if err := os.Chtimes(filepath.Join(c.dir, e.rel), t, t); err != nil && errors.Is(err, fs.ErrNotExist) {
				c.mu.Lock()
				c.dropLocked(e)
				c.mu.Unlock()
			}
		}
	}
}

func (c *Cache) touchLocked(e *entry, now time.Time) {
	e.atime = now.UnixNano()
	if e.elem != nil {
		c.lru.MoveToFront(e.elem)
	}
}

func (c *Cache) addLocked(e *entry) {
	c.entries[e.rel] = e
	e.elem = c.lru.PushFront(e)
	c.usage += e.size
}

// dropLocked forgets e (its file is gone or going).
func (c *Cache) dropLocked(e *entry) {
	if c.entries[e.rel] != e {
		return
	}
	delete(c.entries, e.rel)
	c.lru.Remove(e.elem)
	e.elem = nil
	c.usage -= e.size
}

func (c *Cache) unpin(e *entry) {
	c.mu.Lock()
	e.pins--
	c.mu.Unlock()
}

// FindMissing returns the digests in ds that are not in the cache, and
// refreshes the recency of those that are. Each present file is checked to
// exist on disk.
func (c *Cache) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	return c.findMissing(ctx, ns, ds, true)
}

// FindMissingIndexed is FindMissing answered from this process's index for
// the entries it has: no system call per present blob, for a restore's
// check of every chunk of a large guest. A file another process removed
// meanwhile is found when it is opened (NotFound, and a read-through then
// fetches it again), as if it had been removed just after the check.
func (c *Cache) FindMissingIndexed(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	return c.findMissing(ctx, ns, ds, false)
}

func (c *Cache) findMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest, exact bool) ([]*repb.Digest, error) {
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	if err := checkNS(ns); err != nil {
		return nil, fmt.Errorf("finding missing blobs: %w", err)
	}
	fn := ns.DigestFunction()
	rels := make([]string, len(ds))
	for i, d := range ds {
		if err := digest.Validate(d); err != nil {
			return nil, fmt.Errorf("finding missing blobs: %w", status.Errorf(codes.InvalidArgument, "%v", err))
		}
		rels[i] = casRel(fn, d)
	}
	var missing []*repb.Digest
	for i, e := range c.lookupMany(rels, false, exact) {
		if e == nil {
			missing = append(missing, ds[i])
		}
	}
	return missing, nil
}

// Read opens the blob d for streaming. A blob this process has not verified
// is verified while streaming: a mismatch is a DataLoss error at the end of
// the stream (and the file is removed) instead of io.EOF.
func (c *Cache) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	f, e, size, err := c.openFile(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	if fm := formOf(f, d, size); fm.zst {
		defer c.unpin(e)
		return c.readCompressedPlain(f, e, fm, ns, d)
	}
	return c.readRaw(f, e, ns, d)
}

// readRaw is Read of a raw blob's file f, whose entry e is pinned (readRaw
// unpins it).
func (c *Cache) readRaw(f *os.File, e *entry, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	c.unpin(e)
	return c.verifiedStream(f, f, e, ns, d)
}

// verifiedStream returns the content stream rc of e's file f, verified
// against d while streaming unless this process has verified it already.
func (c *Cache) verifiedStream(rc io.ReadCloser, f *os.File, e *entry, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	c.mu.Lock()
	verified := e.verified
	c.mu.Unlock()
	if verified || c.markedVerified(f, e.rel) {
		return rc, nil
	}
	vr, err := cache.NewVerifyingReader(rc, ns.DigestFunction(), d)
	if err != nil {
		rc.Close()
		return nil, err
	}
	return &checkedReader{ReadCloser: vr, c: c, e: e, f: f}, nil
}

// verifiedPresent reports whether the entry rel is present and verified
// (a write of it can be skipped).
func (c *Cache) verifiedPresent(rel string) bool {
	e := c.lookup(rel, false)
	if e == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return e.verified
}

// checkedReader records the outcome of a streaming verification.
type checkedReader struct {
	io.ReadCloser
	c *Cache
	e *entry
	f *os.File
}

func (r *checkedReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	switch {
	case err == io.EOF:
		r.c.mu.Lock()
		r.e.verified = true
		r.c.mu.Unlock()
		r.c.markVerified(r.f, r.e.rel)
	case cache.IsCorrupt(err):
		r.c.removeCorrupt(r.e, r.f)
	}
	return n, err
}

// openFile opens d's file with its entry pinned and returns its size; the
// caller unpins.
func (c *Cache) openFile(ctx context.Context, ns cache.Namespace, d *repb.Digest) (*os.File, *entry, int64, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, 0, status.FromContextError(err).Err()
	}
	if err := checkDigest(ns, d); err != nil {
		return nil, nil, 0, fmt.Errorf("reading blob: %w", err)
	}
	rel := casRel(ns.DigestFunction(), d)
	e := c.lookup(rel, true)
	if e == nil {
		return nil, nil, 0, cache.NotFoundf("blob %s not in local cache", digest.String(d))
	}
	path := filepath.Join(c.dir, rel)
	// O_NONBLOCK: something other than a regular file at the path (a FIFO)
	// must not block the open; O_NOFOLLOW: nor may a symlink lead elsewhere.
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW, 0)
	if err != nil {
		c.mu.Lock()
		e.pins--
		if errors.Is(err, fs.ErrNotExist) {
			c.dropLocked(e)
		}
		c.mu.Unlock()
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil, 0, cache.NotFoundf("blob %s not in local cache (evicted)", digest.String(d))
		}
		if errors.Is(err, unix.ELOOP) {
			c.mu.Lock()
			c.dropLocked(e)
			c.mu.Unlock()
			os.Remove(path)
			return nil, nil, 0, cache.Corruptf("corrupt blob %s in local cache: not a regular file (removed)", digest.String(d))
		}
		return nil, nil, 0, errkind.IO(errnoOf(err), "opening blob %s", digest.String(d))
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		c.unpin(e)
		f.Close()
		return nil, nil, 0, errkind.IO(err, "opening blob %s: stat", digest.String(d))
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		c.unpin(e)
		c.removeCorrupt(e, f)
		f.Close()
		return nil, nil, 0, cache.Corruptf("corrupt blob %s in local cache: not a regular file (removed)", digest.String(d))
	}
	return f, e, st.Size, nil
}

// errnoOf strips the path from an *fs.PathError, so that errors which may
// reach remote clients never name the cache's files.
func errnoOf(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %w", pe.Op, pe.Err)
	}
	return err
}

// Discard removes the blob d, e.g. because a reader that verified it found
// it corrupt. A blob that is absent is not an error.
func (c *Cache) Discard(ctx context.Context, ns cache.Namespace, d *repb.Digest) error {
	if err := checkDigest(ns, d); err != nil {
		return fmt.Errorf("discarding blob: %w", err)
	}
	rel := casRel(ns.DigestFunction(), d)
	c.mu.Lock()
	if e := c.entries[rel]; e != nil {
		c.dropLocked(e)
	}
	c.mu.Unlock()
	if err := os.Remove(filepath.Join(c.dir, rel)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return errkind.IO(errnoOf(err), "discarding blob %s", digest.String(d))
	}
	return nil
}

// Reservation is disk space promised to a write in flight, counted toward
// Options.MaxBytes together with the entries until it is released or its
// file becomes an entry (PutFile).
type Reservation struct {
	c    *Cache
	n    int64
	done bool // under c.mu
}

// Size is the number of bytes reserved.
func (r *Reservation) Size() int64 {
	r.c.mu.Lock()
	defer r.c.mu.Unlock()
	return r.n
}

// Release returns the space; it is idempotent.
func (r *Reservation) Release() {
	if r == nil {
		return
	}
	r.c.mu.Lock()
	r.releaseLocked()
	r.c.mu.Unlock()
}

// Resize changes the reservation to n bytes: shrinking always succeeds;
// growing evicts as Reserve does and is ResourceExhausted (the reservation
// unchanged) when the bound cannot hold it. A released reservation cannot
// be resized.
func (r *Reservation) Resize(n int64) error {
	c := r.c
	c.mu.Lock()
	if r.done {
		c.mu.Unlock()
		return status.Error(codes.FailedPrecondition, "resizing a released reservation")
	}
	delta := n - r.n
	if delta <= 0 {
		c.reserved += delta
		r.n = n
		c.mu.Unlock()
		return nil
	}
	if c.reserved+delta > c.opts.MaxBytes {
		reserved := c.reserved
		c.mu.Unlock()
		return status.Errorf(codes.ResourceExhausted, "local cache: reserving %d more bytes: %d bytes are reserved by writes in flight, bound %d", delta, reserved, c.opts.MaxBytes)
	}
	c.reserved += delta
	victims := c.evictLocked(nil)
	if c.usage+c.reserved > c.opts.MaxBytes {
		c.reserved -= delta
		usage := c.usage
		c.mu.Unlock()
		c.remove(victims)
		return status.Errorf(codes.ResourceExhausted, "local cache: reserving %d more bytes: %d bytes of entries in use and %d reserved, bound %d", delta, usage, c.reserved, c.opts.MaxBytes)
	}
	r.n = n
	c.mu.Unlock()
	c.remove(victims)
	return nil
}

func (r *Reservation) releaseLocked() {
	if !r.done {
		r.done = true
		r.c.reserved -= r.n
	}
}

// Reserve promises n bytes of disk to a write in flight (a file the caller
// keeps in TempDir, e.g. an upload being received), evicting least
// recently used entries so that entries plus reservations stay within
// Options.MaxBytes. It is ResourceExhausted when that is impossible: the
// reservations alone, or with the pinned entries, would exceed the bound.
func (c *Cache) Reserve(n int64) (*Reservation, error) {
	if n < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "reserving %d bytes", n)
	}
	c.mu.Lock()
	if c.reserved+n > c.opts.MaxBytes {
		reserved := c.reserved
		c.mu.Unlock()
		return nil, status.Errorf(codes.ResourceExhausted, "local cache: reserving %d bytes: %d bytes are reserved by writes in flight, bound %d", n, reserved, c.opts.MaxBytes)
	}
	c.reserved += n
	victims := c.evictLocked(nil)
	if c.usage+c.reserved > c.opts.MaxBytes {
		c.reserved -= n
		usage := c.usage
		c.mu.Unlock()
		c.remove(victims)
		return nil, status.Errorf(codes.ResourceExhausted, "local cache: reserving %d bytes: %d bytes of entries in use and %d reserved, bound %d", n, usage, c.reserved, c.opts.MaxBytes)
	}
	r := &Reservation{c: c, n: n}
	c.mu.Unlock()
	c.remove(victims)
	return r, nil
}

// PutFile stores the file f, whose content the caller has just verified
// against d, by renaming it into place: f must be a regular file in
// TempDir (or elsewhere on the cache's filesystem; otherwise it is copied
// and verified). res, when not nil, is the reservation that covered f's
// space: it is released as f becomes an entry, so the space is counted
// once. The caller still closes f; once PutFile succeeds its name is gone
// (renamed, or removed when the blob was stored already).
func (c *Cache) PutFile(ctx context.Context, ns cache.Namespace, d *repb.Digest, f *os.File, res *Reservation) error {
	defer res.Release()
	if err := checkDigest(ns, d); err != nil {
		return fmt.Errorf("writing blob: %w", err)
	}
	rel := casRel(ns.DigestFunction(), d)
	if c.verifiedPresent(rel) {
		os.Remove(f.Name())
		return nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return errkind.IO(errnoOf(err), "writing blob %s to local cache: stat", digest.String(d))
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size != d.SizeBytes {
		return status.Errorf(codes.InvalidArgument, "writing blob %s to local cache: the file holds %d bytes", digest.String(d), st.Size)
	}
	if c.opts.Compression && d.SizeBytes >= minCompressed {
		g, err := c.tempFile()
		if err != nil {
			return fmt.Errorf("writing blob %s to local cache: %w", digest.String(d), err)
		}
		_, err = c.compressInto(ctx, g, io.NewSectionReader(f, 0, d.SizeBytes), d.SizeBytes, st.Blocks*512)
		if err == nil {
			size, err := c.placeFile(g, rel, func(*os.File) error { return nil })
			if err != nil {
				return fmt.Errorf("writing blob %s to local cache: %w", digest.String(d), err)
			}
			os.Remove(f.Name())
			c.storedReserved(rel, size, true, res)
			return nil
		}
		g.Close()
		os.Remove(g.Name())
		if !errors.Is(err, errNotWorth) {
			return fmt.Errorf("writing blob %s to local cache: %w", digest.String(d), err)
		}
	}
	err := c.renameInto(f, rel)
	if errors.Is(err, unix.EXDEV) {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return errkind.IO(errnoOf(err), "writing blob %s to local cache", digest.String(d))
		}
		if err := c.Write(ctx, ns, d, f); err != nil {
			return err
		}
		os.Remove(f.Name())
		return nil
	}
	if err != nil {
		return errkind.IO(unwrapLink(err), "writing blob %s to local cache: renaming into place", digest.String(d))
	}
	c.storedReserved(rel, st.Blocks*512, true, res)
	return nil
}

// renameInto makes the verified file f the entry rel.
func (c *Cache) renameInto(f *os.File, rel string) error {
	if err := f.Chmod(0o644); err != nil {
		return err
	}
	dst := filepath.Join(c.dir, rel)
	err := os.Rename(f.Name(), dst)
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(filepath.Dir(dst), 0o755); err == nil {
			err = os.Rename(f.Name(), dst)
		}
	}
	return err
}

// PutCompressedFile stores the blob d from the file f, whose first n bytes
// are zstd frames that the caller has just verified to decode to exactly
// d's content (with windows of at most MaxWindow, as a bounded decoder
// checks). When they shrink the blob enough they are stored as they are
// (the cache's trailer appended, f renamed into place); otherwise they are
// decoded and the content stored raw. f must be a regular file in TempDir;
// res, when not nil, is the reservation that covered f's space (released
// as the blob becomes an entry). The caller still closes f; once
// PutCompressedFile succeeds its name is gone.
func (c *Cache) PutCompressedFile(ctx context.Context, ns cache.Namespace, d *repb.Digest, f *os.File, n int64, res *Reservation) error {
	defer res.Release()
	if err := checkDigest(ns, d); err != nil {
		return fmt.Errorf("writing blob: %w", err)
	}
	rel := casRel(ns.DigestFunction(), d)
	if c.verifiedPresent(rel) {
		os.Remove(f.Name())
		return nil
	}
	fail := func(err error) error {
		return errkind.IO(errnoOf(err), "writing blob %s to local cache", digest.String(d))
	}
	if total := n + trailerLen; d.SizeBytes >= minCompressed && total < d.SizeBytes && worthCompressing(total, d.SizeBytes) {
		h := blake3.New()
		if _, err := copyBuffer(h, io.NewSectionReader(f, 0, n)); err != nil {
			return fail(err)
		}
		if _, err := f.WriteAt(trailer(h.Sum(nil)), n); err != nil {
			return fail(err)
		}
		if err := f.Truncate(total); err != nil {
			return fail(err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &st); err != nil {
			return fail(err)
		}
		if err := c.renameInto(f, rel); err != nil {
			return errkind.IO(unwrapLink(err), "writing blob %s to local cache: renaming into place", digest.String(d))
		}
		c.storedReserved(rel, st.Blocks*512, true, res)
		return nil
	}
	dec := decPool.Get().(*zstd.Decoder)
	defer putDecoder(dec)
	if err := dec.Reset(io.NewSectionReader(f, 0, n)); err != nil {
		return status.Errorf(codes.InvalidArgument, "writing blob %s to local cache: zstd: %v", digest.String(d), err)
	}
	size, err := c.writeFile(ctx, rel, func(g *os.File) error {
		m, err := copySparse(ctx, g, dec, d.SizeBytes)
		if err == nil && m != d.SizeBytes {
			err = status.Errorf(codes.InvalidArgument, "zstd data decodes to %d bytes, want %d", m, d.SizeBytes)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("writing blob %s to local cache: %w", digest.String(d), err)
	}
	os.Remove(f.Name())
	c.storedReserved(rel, size, true, res)
	return nil
}

func copyBuffer(w io.Writer, r io.Reader) (int64, error) {
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	return io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{r}, *bp)
}

func unwrapLink(err error) error {
	var le *os.LinkError
	if errors.As(err, &le) {
		return fmt.Errorf("%s: %w", le.Op, le.Err)
	}
	return errnoOf(err)
}

// removeCorrupt drops e and removes its file if it is still the file f:
// only the entry that failed verification, never one written since.
func (c *Cache) removeCorrupt(e *entry, f *os.File) {
	fi, err := f.Stat()
	if err != nil {
		fi = nil
	}
	c.removeCorruptFile(e, fi)
}

// removeCorruptFile drops e and removes its file if it is still the file
// fi describes (nothing is removed when fi is nil).
func (c *Cache) removeCorruptFile(e *entry, fi os.FileInfo) {
	c.mu.Lock()
	c.dropLocked(e)
	c.mu.Unlock()
	path := filepath.Join(c.dir, e.rel)
	if pi, err := os.Lstat(path); fi != nil && err == nil && os.SameFile(fi, pi) {
		os.Remove(path)
	}
}

// Open opens the blob d for random reads; the entry is pinned against
// eviction until the Blob is closed. A blob this process has not verified is
// hashed before Open returns; a mismatch removes it and is a DataLoss error.
func (c *Cache) Open(ctx context.Context, ns cache.Namespace, d *repb.Digest) (cache.Blob, error) {
	f, e, size, err := c.openFile(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	if size != d.SizeBytes {
		if fm := formOf(f, d, size); fm.zst {
			return c.openCompressed(ctx, f, e, fm, ns, d)
		}
	}
	return c.openRaw(f, e, ns, d)
}

// openRaw is Open of a raw blob's file f, whose entry e is pinned (the
// Blob unpins it, or openRaw on failure): f is hashed first unless it is
// known verified.
func (c *Cache) openRaw(f *os.File, e *entry, ns cache.Namespace, d *repb.Digest) (cache.Blob, error) {
	c.mu.Lock()
	verified := e.verified
	c.mu.Unlock()
	if !verified && c.markedVerified(f, e.rel) {
		verified = true
		c.mu.Lock()
		e.verified = true
		c.mu.Unlock()
	}
	if !verified {
		v, err := digest.NewVerifier(ns.DigestFunction(), d)
		if err == nil {
			bp := copyBufs.Get().(*[]byte)
			_, err = io.CopyBuffer(v, io.NewSectionReader(f, 0, 1<<62), *bp)
			copyBufs.Put(bp)
			if err == nil {
				if cerr := v.Check(); cerr != nil {
					c.unpin(e)
					c.removeCorrupt(e, f)
					f.Close()
					return nil, cache.Corruptf("corrupt blob %s in local cache: %v", digest.String(d), cerr)
				}
			}
		}
		if err != nil {
			c.unpin(e)
			f.Close()
			return nil, errkind.IO(errnoOf(err), "verifying blob %s", digest.String(d))
		}
		c.mu.Lock()
		e.verified = true
		c.mu.Unlock()
		c.markVerified(f, e.rel)
	}
	return &blob{f: f, size: d.SizeBytes, c: c, e: e}, nil
}

type blob struct {
	f    *os.File
	size int64
	c    *Cache
	e    *entry
	once sync.Once
}

func (b *blob) ReadAt(p []byte, off int64) (int, error) { return b.f.ReadAt(p, off) }
func (b *blob) Size() int64                             { return b.size }
func (b *blob) Close() error {
	var err error
	b.once.Do(func() {
		b.c.unpin(b.e)
		err = b.f.Close()
	})
	return err
}

// File is the open file holding the blob's raw content from offset 0 (the
// cached blob itself, or the decoded copy of a compressed one), sparse
// where the content has long zero runs: for in-kernel copies
// (copy_file_range, FICLONERANGE) and SEEK_DATA/SEEK_HOLE. Callers must
// neither write to it nor close it, and must not use it after Close.
func (b *blob) File() *os.File { return b.f }

// Write stores the blob d read from r. The content is verified while it is
// written to a temporary file; on a mismatch nothing is stored and the error
// is InvalidArgument naming d. An error from r keeps its status code. A blob
// already present and verified is not rewritten (r is not read).
func (c *Cache) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	if err := checkDigest(ns, d); err != nil {
		return fmt.Errorf("writing blob: %w", err)
	}
	rel := casRel(ns.DigestFunction(), d)
	if c.verifiedPresent(rel) {
		return nil
	}
	v, err := digest.NewVerifier(ns.DigestFunction(), d)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "writing blob %s: %v", digest.String(d), err)
	}
	size, err := c.writeBlob(ctx, rel, d, func(f *os.File) error {
		if _, err := copySparse(ctx, f, io.TeeReader(r, v), d.SizeBytes); err != nil {
			return err
		}
		if cerr := v.Check(); cerr != nil {
			return status.Errorf(codes.InvalidArgument, "content does not match digest: %v", cerr)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("writing blob %s to local cache: %w", digest.String(d), err)
	}
	c.stored(rel, size, true)
	return nil
}

// holeMin is the shortest run of zeros left as a hole: shorter runs are
// written as data, since a write per short run costs more than the disk it
// saves.
const holeMin = 64 << 10

// copySparse copies r to f, leaving page-aligned zero runs of at least
// holeMin bytes as holes. It reads at most limit+1 bytes so that an
// over-long stream is noticed without reading it all.
func copySparse(ctx context.Context, f *os.File, r io.Reader, limit int64) (int64, error) {
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := *bp
	var off int64
	r = io.LimitReader(r, limit+1)
	for {
		if err := ctx.Err(); err != nil {
			return off, status.FromContextError(err).Err()
		}
		n, rerr := io.ReadFull(r, buf)
		if err := writeSparse(f, buf[:n], off); err != nil {
			return off, err
		}
		off += int64(n)
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return off, fmt.Errorf("reading content at offset %d: %w", off, rerr)
		}
	}
	if err := f.Truncate(off); err != nil {
		return off, errkind.IO(errnoOf(err), "truncating to %d", off)
	}
	return off, nil
}

// writeSparse writes b at off, skipping page-aligned zero runs of at least
// holeMin bytes, with one write per data run.
func writeSparse(f *os.File, b []byte, off int64) error {
	run := 0 // start of the pending data run
	for i := 0; i < len(b); {
		if i+holeMin > len(b) || !digest.IsZero(b[i:i+pageSize]) {
			i += pageSize
			continue
		}
		// Measure the zero run starting at page i.
		z := i
		for z < len(b) && digest.IsZero(b[z:min(z+pageSize, len(b))]) {
			z = min(z+pageSize, len(b))
		}
		if z-i < holeMin {
			i = z
			continue
		}
		if run < i {
			if _, err := f.WriteAt(b[run:i], off+int64(run)); err != nil {
				return errkind.IO(errnoOf(err), "writing at offset %d", off+int64(run))
			}
		}
		i, run = z, z
	}
	if run < len(b) {
		if _, err := f.WriteAt(b[run:], off+int64(run)); err != nil {
			return errkind.IO(errnoOf(err), "writing at offset %d", off+int64(run))
		}
	}
	return nil
}

// PutHashed stores data under d, which the caller has just computed from
// these very bytes (as the copy-on-write store does when it saves), so the
// content is not hashed a second time. Its size is still checked.
func (c *Cache) PutHashed(ctx context.Context, ns cache.Namespace, d *repb.Digest, data []byte) error {
	if err := checkDigest(ns, d); err != nil {
		return fmt.Errorf("writing blob: %w", err)
	}
	if int64(len(data)) != d.SizeBytes {
		return status.Errorf(codes.InvalidArgument, "writing blob %s: got %d bytes", digest.String(d), len(data))
	}
	rel := casRel(ns.DigestFunction(), d)
	if c.verifiedPresent(rel) {
		return nil
	}
	var z []byte
	if c.opts.Compression {
		z = c.compressBytes(ctx, data)
	}
	size, err := c.writeFile(ctx, rel, func(f *os.File) error {
		if z != nil {
			if _, err := f.Write(z); err != nil {
				return errkind.IO(errnoOf(err), "writing compressed content")
			}
			return nil
		}
		if err := writeSparse(f, data, 0); err != nil {
			return err
		}
		return f.Truncate(int64(len(data)))
	})
	if err != nil {
		return fmt.Errorf("writing blob %s to local cache: %w", digest.String(d), err)
	}
	c.stored(rel, size, true)
	return nil
}

// writeFile writes a temporary file with fill and renames it to rel. It
// returns the file's disk usage. The temporary file is removed on failure.
func (c *Cache) writeFile(ctx context.Context, rel string, fill func(*os.File) error) (int64, error) {
	f, err := c.tempFile()
	if err != nil {
		return 0, err
	}
	return c.placeFile(f, rel, fill)
}

// writeBlob is writeFile for a blob of d's size whose raw content fill
// writes: with Options.Compression the content is compressed from the
// temporary file into another one, which takes its place when that is
// worth it.
func (c *Cache) writeBlob(ctx context.Context, rel string, d *repb.Digest, fill func(*os.File) error) (int64, error) {
	if !c.opts.Compression || d.SizeBytes < minCompressed {
		return c.writeFile(ctx, rel, fill)
	}
	f, err := c.tempFile()
	if err != nil {
		return 0, err
	}
	if err := fill(f); err != nil {
		f.Close()
		os.Remove(f.Name())
		return 0, err
	}
	return c.placeCompressed(ctx, f, rel, d)
}

// placeCompressed renames to rel either the raw temporary file f or, when
// that is worth it, a compressed copy of it; f is closed.
func (c *Cache) placeCompressed(ctx context.Context, f *os.File, rel string, d *repb.Digest) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		os.Remove(f.Name())
		return 0, errkind.IO(errnoOf(err), "stat of the temporary file")
	}
	g, err := c.tempFile()
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return 0, err
	}
	_, err = c.compressInto(ctx, g, io.NewSectionReader(f, 0, d.SizeBytes), d.SizeBytes, st.Blocks*512)
	if errors.Is(err, errNotWorth) {
		g.Close()
		os.Remove(g.Name())
		return c.placeFile(f, rel, func(*os.File) error { return nil })
	}
	f.Close()
	os.Remove(f.Name())
	return c.placeFile(g, rel, func(*os.File) error { return err })
}

// tempFile creates a locked temporary file in tmp/.
func (c *Cache) tempFile() (*os.File, error) {
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(c.dir, tmpDir, hex.EncodeToString(rnd[:])+".tmp")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, errkind.IO(errnoOf(err), "creating temporary file")
	}
	// The lock tells other processes cleaning tmp/ that this file is live.
	unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	return f, nil
}

// placeFile fills the temporary file f and renames it to rel, returning
// its disk usage; f is closed, and removed on failure.
func (c *Cache) placeFile(f *os.File, rel string, fill func(*os.File) error) (int64, error) {
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := fill(f); err != nil {
		return 0, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, errkind.IO(errnoOf(err), "stat of the temporary file")
	}
	dst := filepath.Join(c.dir, rel)
	if err := os.Rename(tmp, dst); err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			return 0, errkind.IO(unwrapLink(err), "renaming into place")
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return 0, errkind.IO(errnoOf(err), "creating the blob's directory")
		}
		if err := os.Rename(tmp, dst); err != nil {
			return 0, errkind.IO(unwrapLink(err), "renaming into place")
		}
	}
	ok = true
	f.Close()
	return st.Blocks * 512, nil
}

// stored indexes a file this process just wrote, then evicts (and rescans
// when due).
func (c *Cache) stored(rel string, size int64, verified bool) {
	c.storedReserved(rel, size, verified, nil)
}

// storedReserved is stored for a file that res (if not nil) covered: the
// reservation is released in the same step as the entry is counted.
func (c *Cache) storedReserved(rel string, size int64, verified bool, res *Reservation) {
	now := time.Now()
	c.mu.Lock()
	if res != nil {
		res.releaseLocked()
	}
	e := c.entries[rel]
	if e == nil {
		e = &entry{rel: rel, size: size}
		c.addLocked(e)
	} else {
		c.usage += size - e.size
		e.size = size
	}
	e.verified = verified
	c.touchLocked(e, now)
	c.sinceScan += size
	due := !c.scanning && (c.sinceScan >= c.opts.RescanBytes || now.Sub(c.lastScan) >= c.opts.RescanInterval)
	var victims []string
	if !due {
		victims = c.evictLocked(e)
	}
	c.mu.Unlock()
	if verified {
		c.markVerified(nil, rel)
	}
	c.remove(victims)
	if due {
		c.Rescan(context.Background())
	}
}

// evictLocked unindexes least recently used unpinned entries (never keep)
// until usage plus reservations is under the bound and returns their paths for removal.
func (c *Cache) evictLocked(keep *entry) []string {
	var victims []string
	for el := c.lru.Back(); el != nil && c.usage+c.reserved > c.opts.MaxBytes; {
		e := el.Value.(*entry)
		prev := el.Prev()
		if e.pins == 0 && e != keep {
			c.dropLocked(e)
			victims = append(victims, e.rel)
		}
		el = prev
	}
	return victims
}

// Evictions is how many entries this Cache has evicted since New.
func (c *Cache) Evictions() int64 { return c.evictions.Load() }

func (c *Cache) remove(rels []string) {
	c.evictions.Add(int64(len(rels)))
	for _, rel := range rels {
		os.Remove(filepath.Join(c.dir, rel))
	}
}

// tempGrace is how old an unlocked temporary file must be before another
// process may remove it.
const tempGrace = time.Minute

// cleanTemp removes temporary files whose writer is gone (no lock held).
func (c *Cache) cleanTemp() {
	ents, _ := os.ReadDir(filepath.Join(c.dir, tmpDir))
	for _, de := range ents {
		p := filepath.Join(c.dir, tmpDir, de.Name())
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		// A file younger than tempGrace may be one another process has
		// created and not yet locked.
		if fi, err := f.Stat(); err == nil && time.Since(fi.ModTime()) > tempGrace &&
			unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			os.Remove(p)
		}
		f.Close()
	}
}

type scanned struct {
	size  int64
	mtime int64
}

// Rescan walks the directory, indexing entries other processes stored,
// forgetting those they removed, re-ordering the LRU by the recency recorded
// in mtimes, and evicting down to the bound.
func (c *Cache) Rescan(ctx context.Context) error {
	c.mu.Lock()
	if c.scanning {
		c.mu.Unlock()
		return nil
	}
	c.scanning = true
	c.mu.Unlock()
	start := time.Now()
	found := map[string]scanned{}
	var walkErr error
	for _, top := range []string{casDir, acDir} {
		err := filepath.WalkDir(filepath.Join(c.dir, top), func(p string, de fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if cerr := ctx.Err(); cerr != nil {
				return cerr
			}
			if de.IsDir() || !validEntryName(de.Name()) {
				return nil
			}
			var st unix.Stat_t
			if err := unix.Lstat(p, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
				return nil
			}
			rel, _ := filepath.Rel(c.dir, p)
			found[rel] = scanned{size: st.Blocks * 512, mtime: st.Mtim.Nano()}
			return nil
		})
		if err != nil && walkErr == nil {
			walkErr = err
		}
	}
	c.mu.Lock()
	if walkErr != nil {
		c.scanning = false
		c.mu.Unlock()
		return fmt.Errorf("scanning local cache %s: %w", c.dir, walkErr)
	}
	for rel, e := range c.entries {
		s, ok := found[rel]
		if !ok {
			if e.atime < start.UnixNano() {
				c.dropLocked(e) // removed by another process
			}
			continue
		}
		c.usage += s.size - e.size
		e.size = s.size
		e.atime = max(e.atime, s.mtime)
	}
	for rel, s := range found {
		if c.entries[rel] == nil {
			c.addLocked(&entry{rel: rel, size: s.size, atime: s.mtime})
		}
	}
	all := make([]*entry, 0, len(c.entries))
	for _, e := range c.entries {
		all = append(all, e)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].atime > all[j].atime })
	c.lru.Init()
	for _, e := range all {
		e.elem = c.lru.PushBack(e)
	}
	c.sinceScan = 0
	c.lastScan = time.Now()
	victims := c.evictLocked(nil)
	c.scanning = false
	c.mu.Unlock()
	c.remove(victims)
	return nil
}

// validEntryName matches "<64 hex>-<size>".
func validEntryName(name string) bool {
	h, s, ok := strings.Cut(name, "-")
	if !ok || len(h) != digest.HashLen {
		return false
	}
	if _, err := strconv.ParseUint(s, 10, 63); err != nil {
		return false
	}
	_, err := hex.DecodeString(h)
	return err == nil && strings.ToLower(h) == h
}

// pinSet is one Pin call's hold.
type pinSet struct{ entries []*entry }

// Pin protects the blobs ds that are present against eviction by this
// process until release is called (release is idempotent). Blobs not
// present are ignored; lookups refresh recency.
func (c *Cache) Pin(ns cache.Namespace, ds []*repb.Digest) (release func()) {
	ps := &pinSet{}
	if checkNS(ns) == nil {
		fn := ns.DigestFunction()
		rels := make([]string, 0, len(ds))
		for _, d := range ds {
			if digest.Validate(d) == nil {
				rels = append(rels, casRel(fn, d))
			}
		}
		for _, e := range c.lookupMany(rels, true, false) {
			if e != nil {
				ps.entries = append(ps.entries, e)
			}
		}
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			for _, e := range ps.entries {
				e.pins--
			}
			c.mu.Unlock()
		})
	}
}

// ReadRange reads n bytes of blob d from off (fewer at its end); see
// cache.RangeReader.
//
// A raw blob is opened (verified first unless it is known verified, see
// Open) and the range read from it. A compressed one is decoded as a
// stream: the bytes before the range are skipped, and once the range is
// read the rest is decoded too, so that the stream ends with an error
// instead of io.EOF if the blob is corrupt, without a scratch copy.
func (c *Cache) ReadRange(ctx context.Context, ns cache.Namespace, d *repb.Digest, off, n int64) (io.ReadCloser, error) {
	if err := checkDigest(ns, d); err != nil {
		return nil, fmt.Errorf("reading blob: %w", err)
	}
	if off < 0 || off > d.GetSizeBytes() || n < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "reading blob %s at offset %d, %d bytes: outside its %d bytes", digest.String(d), off, n, d.GetSizeBytes())
	}
	n = min(n, d.SizeBytes-off)
	f, e, size, err := c.openFile(ctx, ns, d)
	if err != nil {
		return nil, err
	}
	if fm := formOf(f, d, size); fm.zst {
		defer c.unpin(e)
		rc, err := c.readCompressedPlain(f, e, fm, ns, d)
		if err != nil {
			return nil, err
		}
		if _, err := copyBuffer(io.Discard, io.LimitReader(rc, off)); err != nil {
			rc.Close()
			return nil, fmt.Errorf("reading blob %s at offset %d: %w", digest.String(d), off, err)
		}
		return &verifiedRange{rc: rc, n: n}, nil
	}
	b, err := c.openRaw(f, e, ns, d)
	if err != nil {
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{io.NewSectionReader(b, off, n), b}, nil
}

// verifiedRange is the next n bytes of a verifying stream rc, whose rest
// is drained at the end of the range so that its verdict replaces io.EOF.
type verifiedRange struct {
	rc io.ReadCloser
	n  int64
}

func (r *verifiedRange) Read(p []byte) (int, error) {
	if r.n <= 0 {
		if _, err := copyBuffer(io.Discard, r.rc); err != nil {
			return 0, err
		}
		return 0, io.EOF
	}
	if int64(len(p)) > r.n {
		p = p[:r.n]
	}
	k, err := r.rc.Read(p)
	r.n -= int64(k)
	if err == io.EOF && r.n > 0 {
		err = io.ErrUnexpectedEOF
	}
	if err == io.EOF {
		err = nil
	}
	return k, err
}

func (r *verifiedRange) Close() error { return r.rc.Close() }
