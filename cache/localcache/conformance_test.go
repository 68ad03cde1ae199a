package localcache

import (
	"fmt"
	"path/filepath"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/cachetest"
)

func TestConformance(t *testing.T) {
	for _, compression := range []bool{false, true} {
		t.Run(fmt.Sprintf("compression=%v", compression), func(t *testing.T) {
			cachetest.Run(t, harness(Options{Compression: compression}))
		})
	}
}

// harness makes caches with opts in fresh directories.
func harness(opts Options) cachetest.Harness {
	return cachetest.Harness{
		New: func(t *testing.T) cachetest.Tier {
			dir := t.TempDir()
			c := newCache(t, dir, opts)
			return cachetest.Tier{
				Cache:  c,
				Reopen: reopener(dir, opts),
				Corrupt: func(t *testing.T, ns cache.Namespace, d *repb.Digest, damage func([]byte) []byte) {
					cachetest.DamageFile(t, c.Path(ns, d), damage)
				},
				CorruptActionResult: func(t *testing.T, ns cache.Namespace, key *repb.Digest) {
					rel, err := acRel(ns, key)
					if err != nil {
						t.Fatal(err)
					}
					cachetest.DamageFile(t, filepath.Join(dir, rel), func(b []byte) []byte {
						b[len(b)/2] ^= 0x40
						return b
					})
				},
				Leftovers: func(t *testing.T) []string { return leftovers(t, c) },
				Exhaust:   cachetest.ExhaustDescriptors,
			}
		},
		Full: func(t *testing.T, size int64) (cache.Cache, func()) {
			fs := cachetest.SmallFilesystem(t, 4*size+1<<20)
			c := newCache(t, filepath.Join(fs, "cache"), opts)
			return c, cachetest.Fill(t, fs, size/2)
		},
	}
}

// leftovers lists the files of c besides its entries: temporary files,
// and every blob file (the suite asks on a cache no write succeeded on).
func leftovers(t *testing.T, c *Cache) []string {
	files := cachetest.FilesUnder(t, filepath.Join(c.Dir(), tmpDir), filepath.Join(c.Dir(), casDir))
	if u := c.Usage(); u != 0 {
		files = append(files, fmt.Sprintf("%d bytes of usage", u))
	}
	return files
}

// reopener opens dir again as a process of another boot would, which
// trusts no verification of this one.
func reopener(dir string, opts Options) func(t *testing.T) cache.Cache {
	boots := 0
	return func(t *testing.T) cache.Cache {
		boots++
		opts.BootID = fmt.Sprintf("reopened-%d", boots)
		return newCache(t, dir, opts)
	}
}
