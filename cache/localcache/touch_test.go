package localcache

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

// TestBatchLookupsRecordRecencyOnDisk checks the lookups a restore makes
// of every chunk (FindMissing, Pin), which answer from memory: they still
// record recency as mtimes (so another process, or this one restarted,
// keeps the LRU order), and they notice a file another process removed.
func TestBatchLookupsRecordRecencyOnDisk(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		lookup func(c *Cache, ds []*repb.Digest)
	}{
		{"FindMissing", func(c *Cache, ds []*repb.Digest) {
			if _, err := c.FindMissing(ctx, ns, ds); err != nil {
				t.Fatal(err)
			}
		}},
		{"Pin", func(c *Cache, ds []*repb.Digest) { c.Pin(ns, ds)() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			c := newCache(t, dir, Options{})
			var ds []*repb.Digest
			for i := range 3 {
				ds = append(ds, put(t, c, ns, content(uint64(i), 8192)))
			}
			old := time.Now().Add(-time.Hour)
			for _, d := range ds {
				if err := os.Chtimes(c.Path(ns, d), old, old); err != nil {
					t.Fatal(err)
				}
			}
			// Another process evicts the last blob.
			if err := os.Remove(c.Path(ns, ds[2])); err != nil {
				t.Fatal(err)
			}
			before := c.Usage()
			tc.lookup(c, ds)
			c.touchers.Wait()
			for _, d := range ds[:2] {
				fi, err := os.Stat(c.Path(ns, d))
				if err != nil {
					t.Fatal(err)
				}
				if !fi.ModTime().After(old.Add(time.Minute)) {
					t.Errorf("%s: mtime %v after the lookup, want its time recorded", filepath.Base(c.Path(ns, d)), fi.ModTime())
				}
			}
			if c.Usage() >= before {
				t.Errorf("usage %d after a lookup of a removed file, want less than %d (its entry dropped)", c.Usage(), before)
			}
			if got := present(t, c, ds...); !got[0] || !got[1] || got[2] {
				t.Errorf("present = %v, want [true true false]", got)
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
