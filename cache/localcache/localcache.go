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
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/snaploader/snaploader/cache"
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
	_ cache.Source = (*Cache)(nil)
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

// Traits: ranges are verified against the digest (a corrupt blob is a
// DataLoss error and is removed), so a server may serve a range without
// hashing the whole blob, and compressed streams are checked as they are
// read. Whole reads are verified once per boot (see Options.BootID), not
// on every read, so VerifiesReads is false: a wrapper that must see every
// byte checked (cache.Verifying) still hashes them.
func (c *Cache) Traits() cache.Traits {
	return cache.Traits{
		Description:             "directory " + c.dir,
		VerifiesRanges:          true,
		ServesRanges:            true,
		VerifiesCompressedReads: true,
		StoresCompressed:        c.opts.Compression,
		MaxBytes:                c.opts.MaxBytes,
		Dir:                     c.dir,
	}
}

// String names the cache's directory.
func (c *Cache) String() string { return "directory " + c.dir }

// MaxBytes is the bound on disk usage (Options.MaxBytes).
func (c *Cache) MaxBytes() int64 { return c.opts.MaxBytes }

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

// errnoOf strips the path from an *fs.PathError, so that errors which may
// reach remote clients never name the cache's files.
func errnoOf(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %w", pe.Op, pe.Err)
	}
	return err
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

var (
	_ cache.Local   = (*Cache)(nil)
	_ cache.Backend = (*Cache)(nil)
)
