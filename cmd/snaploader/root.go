package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/encrypted"
	"github.com/snaploader/snaploader/cache/failover"
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
	root.AddCommand(newSaveCmd(), newRestoreCmd(), newInvalidateCmd(), newInspectCmd(), newLsCmd(), newVerifyCmd(), newDemoCmd(), newServeCmd(), newPagerCmd(), newQemuCmd(), newGCCmd(), newKeygenCmd(), newBenchCmd(), newVersionCmd())
	tr := &commandTrace{}
	tr.register(root)
	root.SetFlagErrorFunc(flagError)
	forEachCommand(root, func(c *cobra.Command) {
		if c.RunE == nil {
			return
		}
		if c.Args == nil {
			c.Args = cobra.NoArgs // no command takes positional arguments
		}
		run := c.RunE
		c.RunE = func(cmd *cobra.Command, args []string) error {
			runState.ran = true
			return run(cmd, args)
		}
	})
	return root, tr
}

func forEachCommand(c *cobra.Command, fn func(*cobra.Command)) {
	fn(c)
	for _, sub := range c.Commands() {
		forEachCommand(sub, fn)
	}
}

// flagError is a usage error for a flag cobra could not parse: a bad value
// is named as --FLAG VALUE with what the flag wants, and an unknown flag
// names the command's flags closest to it.
func flagError(cmd *cobra.Command, err error) error {
	var iv *pflag.InvalidValueError
	if errors.As(err, &iv) {
		want := cliText(iv.Unwrap())
		var num *strconv.NumError
		if errors.As(iv.Unwrap(), &num) {
			want = "want a whole number"
			if iv.GetFlag().Value.Type() == "bool" {
				want = "want true or false"
			}
		}
		return usagef("--%s %s: %s", iv.GetFlag().Name, iv.GetValue(), want)
	}
	var ne interface{ GetSpecifiedName() string }
	if errors.As(err, &ne) && ne.GetSpecifiedName() != "" {
		if near := nearestFlags(cmd, ne.GetSpecifiedName()); len(near) > 0 {
			return usagef("%s (did you mean %s?)", err, orList(near))
		}
	}
	return usagef("%s", err)
}

// nearestFlags are the names (as --NAME) of cmd's flags that name starts,
// or that are at most two edits away from it, closest first.
func nearestFlags(cmd *cobra.Command, name string) []string {
	type cand struct {
		name string
		dist int
	}
	var cs []cand
	visit := func(f *pflag.Flag) {
		if f.Hidden {
			return
		}
		d := editDistance(name, f.Name)
		if d <= 2 || (len(name) >= 3 && strings.HasPrefix(f.Name, name)) {
			cs = append(cs, cand{f.Name, d})
		}
	}
	cmd.Flags().VisitAll(visit)
	cmd.InheritedFlags().VisitAll(visit)
	sort.SliceStable(cs, func(i, j int) bool {
		if cs[i].dist != cs[j].dist {
			return cs[i].dist < cs[j].dist
		}
		return cs[i].name < cs[j].name
	})
	var out []string
	for _, c := range cs {
		if n := "--" + c.name; !slices.Contains(out, n) && len(out) < 3 {
			out = append(out, n)
		}
	}
	return out
}

// orList joins names as "a", "a or b", "a, b or c".
func orList(names []string) string {
	if len(names) <= 1 {
		return strings.Join(names, "")
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// editDistance is the Levenshtein distance of a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
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
	// remoteURL is --remote, and remoteRequired --remote-required.
	remoteURL      string
	remoteRequired bool
	// failover is the remotes' tier, which names those that served reads
	// (nil without --remote).
	failover *failover.Tier
}

// remotesServed names the remotes that delivered blob bytes so far, in
// their order; [] when none did.
func (e *env) remotesServed() []string {
	out := []string{}
	if e.failover == nil {
		return out
	}
	for _, s := range e.failover.Stats() {
		if s.ReadBytes > 0 {
			out = append(out, s.Name)
		}
	}
	return out
}

// remoteCheck fails with a remoteDownError when the remote is required
// (--remote-required) and failed during the command, which then went on
// with the local cache. Commands call it before printing their result;
// Close records it for main otherwise.
func (e *env) remoteCheck() error {
	if !e.remoteRequired || e.loader == nil {
		return nil
	}
	if err := e.loader.RemoteDown(); err != nil {
		return &remoteDownError{url: e.remoteURL, err: err}
	}
	return nil
}

func (f *cacheFlags) open(ctx context.Context) (*env, error) {
	dir := f.dir
	if dir == "" {
		var err error
		if dir, err = defaultCacheDir(); err != nil {
			return nil, err
		}
	}
	if fi, err := os.Stat(dir); err == nil && !fi.IsDir() {
		return nil, usagef("--cache-dir %s is not a directory", dir)
	}
	fn, err := digest.ParseFunction(f.function)
	if err != nil {
		return nil, usagef("--digest-function: %w", err)
	}
	level := slog.LevelWarn
	if f.verbose {
		level = slog.LevelDebug
	}
	log := newLogger(os.Stderr, level)
	if f.remote.apiKey == "" {
		f.remote.apiKey = os.Getenv("SNAPLOADER_API_KEY")
	}
	if f.maxBytes <= 0 {
		return nil, usagef("--cache-max-bytes %d: want a positive number of bytes", f.maxBytes)
	}
	if f.remote.timeout <= 0 {
		return nil, usagef("--remote-timeout %s: want a positive duration", f.remote.timeout)
	}
	if f.remote.maxBlob < 0 {
		return nil, usagef("--remote-max-blob-bytes %d: want a positive number of bytes", f.remote.maxBlob)
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
		return nil, wrapOnce(err, "opening local cache %s", dir)
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
	e := &env{local: local, remote: r.tier, remoteWritable: r.writable, log: log, closer: r.closer, metrics: clientmetrics.New(), metricsFile: f.metricsFile,
		remoteURL: f.remote.primary(), remoteRequired: f.remote.required, failover: r.failover}
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
	if err := e.remoteCheck(); err != nil && runState.remoteDown == nil {
		runState.remoteDown = err
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
	// noRef: the command needs no ref (invalidate: a version id covers
	// every ref of the key).
	noRef bool

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

// check refuses a key with a required field missing (a usage error that
// names the flag, and the environment variable it defaults to): the
// instance, the configuration hash and, unless noRef, the ref. Nothing is
// stored or looked up under an empty one.
func (f *keyFlags) check() error {
	var missing []string
	if f.instance == "" {
		missing = append(missing, "--instance (the instance name snapshots are stored under)")
	}
	if f.configHash == "" {
		missing = append(missing, "--config-hash (the hash of the VM configuration)")
	}
	if f.ref == "" && !f.noRef {
		missing = append(missing, "--ref or $"+snapshot.EnvBranch+" (the task's git branch)")
	}
	switch len(missing) {
	case 0:
		return nil
	case 1:
		return usagef("%s is required", missing[0])
	}
	return usagef("%s are required", andList(missing))
}

// andList joins items as "a", "a and b", "a, b and c".
func andList(items []string) string {
	if len(items) <= 1 {
		return strings.Join(items, "")
	}
	return strings.Join(items[:len(items)-1], ", ") + " and " + items[len(items)-1]
}

func (f *keyFlags) task() (snapshot.Task, error) {
	props := map[string]string{}
	for _, p := range f.platform {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return snapshot.Task{}, usagef("--platform %q: want KEY=VAL", p)
		}
		props[k] = v
	}
	ph, err := snapshot.PlatformHash(props)
	if err != nil {
		return snapshot.Task{}, err
	}
	if err := f.check(); err != nil {
		return snapshot.Task{}, err
	}
	for flag, ref := range map[string]string{"--ref": f.ref, "--base-ref": f.baseRef, "--default-ref": f.defaultRef, "--universal-ref": f.universal} {
		if strings.ContainsFunc(ref, func(r rune) bool { return r < ' ' || r == 0x7f }) {
			return snapshot.Task{}, usagef("%s %q: a git ref has no control characters", flag, ref)
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

// wrapOnce prefixes err with what was being done, unless its message
// already starts with it (a callee that said so itself).
func wrapOnce(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	if strings.HasPrefix(err.Error(), what+": ") {
		return err
	}
	return fmt.Errorf("%s: %w", what, err)
}

// parseDuration accepts Go durations plus a day suffix ("1d", "1.5d").
func parseDuration(s string) (time.Duration, error) {
	if d, ok := strings.CutSuffix(s, "d"); ok {
		days, err := strconv.ParseFloat(d, 64)
		if err != nil || days < 0 {
			return 0, usagef("invalid duration %q", s)
		}
		return time.Duration(days * float64(24*time.Hour)), nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return 0, usagef("invalid duration %q: %w", s, err)
	}
	return v, nil
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
