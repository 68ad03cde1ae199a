package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/encrypted"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/clientmetrics"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/snapshot"
)

// DefaultCacheBytes bounds the local cache when --cache-max-bytes is unset.
const DefaultCacheBytes = 20 << 30

func newRootCmd() (*cobra.Command, *commandTrace) {
	root := &cobra.Command{
		Use:           "snaploader",
		Short:         "Save and restore microVM snapshots through content-addressed caches",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newSaveCmd(), newRestoreCmd(), newInvalidateCmd(), newInspectCmd(), newLsCmd(), newVerifyCmd(), newDemoCmd(), newServeCmd(), newPagerCmd(), newQemuCmd(), newGCCmd(), newKeygenCmd(), newBenchCmd())
	tr := &commandTrace{}
	tr.register(root)
	return root, tr
}

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
	cmd.Flags().Int64Var(&f.maxBytes, "cache-max-bytes", DefaultCacheBytes, "bound of the local cache in bytes of disk usage")
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

func defaultCacheDir() (string, error) {
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("finding the user cache directory (pass --cache-dir): %w", err)
	}
	return filepath.Join(d, "snaploader"), nil
}

// env is what a command needs: the caches and the loader over them.
type env struct {
	local  *localcache.Cache
	remote cache.Tier
	// remoteWritable is false when the remote refuses this client's
	// action-cache updates (a read-only key).
	remoteWritable bool
	metrics        *clientmetrics.Metrics
	metricsFile    string
	loader         *snapshot.Loader
	log            *slog.Logger
	closer         io.Closer
}

func (f *cacheFlags) open(ctx context.Context) (*env, error) {
	dir := f.dir
	if dir == "" {
		var err error
		if dir, err = defaultCacheDir(); err != nil {
			return nil, err
		}
	}
	fn, err := digest.ParseFunction(f.function)
	if err != nil {
		return nil, err
	}
	level := slog.LevelWarn
	if f.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if f.remote.apiKey == "" {
		f.remote.apiKey = os.Getenv("SNAPLOADER_API_KEY")
	}
	if f.maxBytes <= 0 {
		return nil, fmt.Errorf("--cache-max-bytes %d: want a positive number of bytes", f.maxBytes)
	}
	if f.remote.timeout <= 0 {
		return nil, fmt.Errorf("--remote-timeout %s: want a positive duration", f.remote.timeout)
	}
	if f.remote.maxBlob < 0 {
		return nil, fmt.Errorf("--remote-max-blob-bytes %d: want a positive number of bytes", f.remote.maxBlob)
	}
	r, err := f.remote.open(ctx, fn, f.functionSet, log)
	if err != nil {
		return nil, err
	}
	local, err := localcache.New(dir, localcache.Options{MaxBytes: f.maxBytes, Compression: f.compress})
	if err != nil {
		if r.closer != nil {
			r.closer.Close()
		}
		return nil, fmt.Errorf("opening local cache %s: %w", dir, err)
	}
	if f.keyFile != "" {
		if r.tier, err = encryptTier(r.tier, f.keyFile, local.TempDir(), log); err != nil {
			local.Close()
			if r.closer != nil {
				r.closer.Close()
			}
			return nil, err
		}
	}
	e := &env{local: local, remote: r.tier, remoteWritable: r.writable, log: log, closer: r.closer, metrics: clientmetrics.New(), metricsFile: f.metricsFile}
	if f.metricsAddr != "" {
		addr, err := e.metrics.Serve(ctx, f.metricsAddr)
		if err != nil {
			e.Close()
			return nil, err
		}
		log.Info("serving metrics", "url", "http://"+addr+"/metrics")
	}
	e.loader, err = snapshot.New(local, r.tier, snapshot.Options{Group: f.group, Function: r.fn, Logger: log, RemoteReadOnly: f.remote.readOnly, RemoteEntryFunction: r.entryFn, RemoteFunctions: r.fns, RemoteMaxBlobBytes: r.maxBlob})
	if err != nil {
		e.Close()
		return nil, err
	}
	return e, nil
}

func (e *env) Close() error {
	if e.loader != nil && e.loader.RemoteDown() != nil {
		e.metrics.RemoteUnavailable()
	}
	if e.metricsFile != "" {
		if err := e.metrics.WriteTextfile(e.metricsFile); err != nil {
			e.log.Warn("writing metrics", "err", err)
		}
	}
	if e.closer != nil {
		e.closer.Close()
	}
	return e.local.Close()
}

// keyFlags identify a snapshot key set.
type keyFlags struct {
	instance   string
	platform   []string
	configHash string
	ref        string
	baseRef    string
	defaultRef string
	runner     string
	universal  string
}

func (f *keyFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.instance, "instance", "", "REAPI instance name")
	fl.StringSliceVar(&f.platform, "platform", nil, "platform properties KEY=VAL,... the VM was created with")
	fl.StringVar(&f.configHash, "config-hash", "", "hash of the VM configuration")
	fl.StringVar(&f.ref, "ref", os.Getenv(snapshot.EnvBranch), "git branch of the task (default $GIT_BRANCH)")
	fl.StringVar(&f.baseRef, "base-ref", os.Getenv(snapshot.EnvBaseBranch), "base branch, first fallback (default $GIT_BASE_BRANCH)")
	fl.StringVar(&f.defaultRef, "default-ref", os.Getenv(snapshot.EnvDefaultBranch), "repository default branch, last fallback (default $GIT_REPO_DEFAULT_BRANCH)")
	fl.StringVar(&f.runner, "runner", "", "runner id, when snapshots are not shared between runners")
	fl.StringVar(&f.universal, "universal-ref", "", "optional last fallback ref any branch also publishes under")
}

func (f *keyFlags) task() (snapshot.Task, error) {
	props := map[string]string{}
	for _, p := range f.platform {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return snapshot.Task{}, fmt.Errorf("--platform %q: want KEY=VAL", p)
		}
		props[k] = v
	}
	ph, err := snapshot.PlatformHash(props)
	if err != nil {
		return snapshot.Task{}, err
	}
	if f.configHash == "" {
		return snapshot.Task{}, fmt.Errorf("--config-hash is required")
	}
	for flag, ref := range map[string]string{"--ref": f.ref, "--base-ref": f.baseRef, "--default-ref": f.defaultRef, "--universal-ref": f.universal} {
		if strings.ContainsFunc(ref, func(r rune) bool { return r < ' ' || r == 0x7f }) {
			return snapshot.Task{}, fmt.Errorf("%s %q: a git ref has no control characters", flag, ref)
		}
	}
	return snapshot.Task{
		InstanceName:      f.instance,
		PlatformHash:      ph,
		ConfigurationHash: f.configHash,
		RunnerID:          f.runner,
		Env: map[string]string{
			snapshot.EnvBranch:        f.ref,
			snapshot.EnvBaseBranch:    f.baseRef,
			snapshot.EnvDefaultBranch: f.defaultRef,
		},
	}, nil
}

func (f *keyFlags) keySet(ctx context.Context, e *env) (*snapshotpb.SnapshotKeySet, error) {
	t, err := f.task()
	if err != nil {
		return nil, err
	}
	return e.loader.KeySet(ctx, t, snapshot.KeySetOptions{UniversalRef: f.universal, Logger: e.log})
}

// parseDuration accepts Go durations plus a day suffix ("1d", "1.5d").
func parseDuration(s string) (time.Duration, error) {
	if d, ok := strings.CutSuffix(s, "d"); ok {
		days, err := strconv.ParseFloat(d, 64)
		if err != nil || days < 0 {
			return 0, fmt.Errorf("invalid duration %q", s)
		}
		return time.Duration(days * float64(24*time.Hour)), nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("invalid duration %q: %w", s, err)
	}
	return v, nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// stderrIsTerminal reports whether progress bars may be drawn.
func stderrIsTerminal() bool { return term.IsTerminal(int(os.Stderr.Fd())) }

// encryptTier wraps the remote tier in client-side encryption with the
// group keys in keyFile; the local cache stays in the clear.
func encryptTier(remote cache.Tier, keyFile, tempDir string, log *slog.Logger) (cache.Tier, error) {
	keys, err := encrypted.ReadKeyFile(keyFile)
	if err != nil {
		return nil, err
	}
	if remote == nil {
		log.Warn("--encryption-key-file has no effect without --remote: the local cache stays in the clear")
		return nil, nil
	}
	c, err := encrypted.New(remote, encrypted.Options{Keys: keys, TempDir: tempDir})
	if err != nil {
		return nil, err
	}
	return cache.Verifying(c), nil
}
