package localcache

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// entry is one indexed file.
type entry struct {
	rel      string // path relative to the cache dir; also the index key
	size     int64  // disk usage in bytes
	atime    int64  // last use, unix nanoseconds
	pins     int
	verified bool // content known to match the digest
	elem     *list.Element
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
