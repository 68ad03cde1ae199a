package main

import (
	"path/filepath"

	"github.com/spf13/cobra"
)

// benchFlags are bench's flags.
type benchFlags struct {
	cf      cacheFlags
	size    string
	runs    int
	workDir string
	asJSON  bool
	keep    bool
}

func newBenchCmd() *cobra.Command {
	var f benchFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *benchFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure cold and warm lazy reads through the remote and the local cache against cp of the same file",
		Long: `bench saves a synthetic VM-like file to --remote, then measures, against cp of
the same file on the same disk: a lazy sequential read into an empty local cache, the time to the first byte
of unfetched chunks (p50/p99), and the same from the local cache. Scratch files (the file, its copy and the
local caches) live in a fresh directory under --work-dir, removed at the end. The snapshot it saved is
invalidated at the end (its key gets a fresh version id, as snaploader invalidate does: the remote never
gives it out again, and its blobs go as the remote drops unused data) unless --keep, which leaves it for
later runs to reuse. Pin the command to a CPU
(taskset -c 0 snaploader bench ...) to keep it off the server's.`,
		RunE: runE(f.options, runBench),
	}
	f.cf.register(cmd)
	cmd.Flags().StringVar(&f.size, "size", "256MiB", "size of the synthetic file (bytes, or KiB/MiB/GiB)")
	cmd.Flags().IntVar(&f.runs, "runs", 3, "measured runs of each figure (after one warm-up run), alternated; medians are reported")
	cmd.Flags().StringVar(&f.workDir, "work-dir", "", "where scratch files go (default: the directory holding --cache-dir, i.e. the cache's disk)")
	cmd.Flags().BoolVar(&f.asJSON, "json", false, "print one JSON object")
	cmd.Flags().BoolVar(&f.keep, "keep", false, "keep the benchmark snapshot on the remote for later runs to reuse (default: invalidate its key at the end)")
	return cmd
}

// options checks bench's flags. What is measured is the remote: it is
// required. The local caches are bench's own scratch caches, of the
// default bound and without metrics; --cache-dir only places the scratch
// directory (by default, beside it).
func (f *benchFlags) options() (benchOptions, error) {
	var o benchOptions
	n, err := parseBytes("--size", f.size)
	if err != nil {
		return o, err
	}
	if len(f.cf.remote.urls) == 0 {
		return o, usagef("--remote is required")
	}
	if f.runs <= 0 {
		return o, usagef("--runs %d: want at least 1", f.runs)
	}
	cf := f.cf
	cf.remote.required = true
	cf.maxBytes = DefaultCacheBytes
	cf.metricsFile, cf.metricsAddr = "", ""
	if o.Cache, err = cf.optionsAt(""); err != nil {
		return o, err
	}
	o.WorkDir = f.workDir
	if o.WorkDir == "" {
		dir := f.cf.dir
		if dir == "" {
			if dir, err = defaultCacheDir(); err != nil {
				return o, err
			}
		}
		o.WorkDir = filepath.Dir(filepath.Clean(dir))
	}
	o.Size, o.Runs, o.Keep, o.JSON = n, f.runs, f.keep, f.asJSON
	return o, nil
}
