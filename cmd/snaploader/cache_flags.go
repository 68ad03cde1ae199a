package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/digest"
)

// DefaultCacheBytes bounds the local cache when --cache-max-bytes is unset.
const DefaultCacheBytes = 20 << 30

// cacheFlags select and configure the caches.
type cacheFlags struct {
	dir      string
	maxBytes int64
	compress bool
	group    string
	function string
	verbose  bool
	remote   remoteFlags
	keyFile  string
	// metricsFile and metricsAddr: where the host's metrics go.
	metricsFile string
	metricsAddr string

	functionSet bool
}

func (f *cacheFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.dir, "cache-dir", "", "local cache directory (default: the user cache directory's snaploader/)")
	sizeFlag(cmd, &f.maxBytes, "cache-max-bytes", DefaultCacheBytes, "bound of the local cache's disk usage (bytes, or KiB/MiB/GiB/TiB)")
	cmd.Flags().BoolVar(&f.compress, "cache-compression", false, "store new local cache blobs zstd-compressed when that shrinks them (reads then decode; blobs of either form are always read)")
	cmd.Flags().StringVar(&f.group, "group", "", "tenant owning local manifests (default anonymous)")
	cmd.Flags().StringVar(&f.function, "digest-function", "blake3", "digest function for new snapshots: blake3 or sha256 (with a REAPI remote, default: what the server offers, BLAKE3 first)")
	cmd.PreRun = func(cmd *cobra.Command, _ []string) { f.functionSet = cmd.Flags().Changed("digest-function") }
	cmd.Flags().BoolVarP(&f.verbose, "verbose", "v", false, "log debug messages to stderr")
	cmd.Flags().StringVar(&f.metricsFile, "metrics-textfile", "", "when the command ends, write its metrics (hits, cold starts, bytes fetched by tier, chunk waits, saves, skipped publishes) to this file for node-exporter's textfile collector")
	cmd.Flags().StringVar(&f.metricsAddr, "metrics-addr", "", "serve the host's metrics at http://ADDR/metrics while the command runs (for long-running commands: qemu restore, pager)")
	cmd.Flags().StringVar(&f.keyFile, "encryption-key-file", os.Getenv("SNAPLOADER_ENCRYPTION_KEY_FILE"), "group key file: everything stored in the remote tier is encrypted on this host (see keygen; default $SNAPLOADER_ENCRYPTION_KEY_FILE)")
	f.remote.register(cmd)
}

// options are the caches the flags select: the cache directory resolved
// (a path that is not a directory refused), the digest function parsed
// and the bounds checked, without opening anything.
func (f *cacheFlags) options() (cacheOptions, error) {
	dir := f.dir
	if dir == "" {
		var err error
		if dir, err = defaultCacheDir(); err != nil {
			return cacheOptions{}, err
		}
	}
	if fi, err := os.Stat(dir); err == nil && !fi.IsDir() {
		return cacheOptions{}, usagef("--cache-dir %s is not a directory", dir)
	}
	return f.optionsAt(dir)
}

// optionsAt are the caches the flags select with the local cache in dir.
func (f *cacheFlags) optionsAt(dir string) (cacheOptions, error) {
	fn, err := digest.ParseFunction(f.function)
	if err != nil {
		return cacheOptions{}, usagef("--digest-function: %w", err)
	}
	if f.maxBytes <= 0 {
		return cacheOptions{}, usagef("--cache-max-bytes %d: want a positive number of bytes", f.maxBytes)
	}
	ro, err := f.remote.options()
	if err != nil {
		return cacheOptions{}, err
	}
	return cacheOptions{
		Dir: dir, MaxBytes: f.maxBytes, Compress: f.compress, Group: f.group, Function: fn, FunctionSet: f.functionSet,
		Verbose: f.verbose, KeyFile: f.keyFile, MetricsFile: f.metricsFile, MetricsAddr: f.metricsAddr, Remote: ro,
	}, nil
}

func defaultCacheDir() (string, error) {
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("finding the user cache directory (pass --cache-dir): %w", err)
	}
	return filepath.Join(d, "snaploader"), nil
}
