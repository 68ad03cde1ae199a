package localcache

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"golang.org/x/sys/unix"
)

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
