// Package snapshot saves and loads VM snapshots through a local cache and an
// optional remote tier: key sets with branch fallbacks, version ids that
// invalidate every ref of a key at once, manifests written only after every
// blob they reference, and lazy copy-on-write stores for chunked files.
package snapshot

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"sync"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// ReadPolicy says where GetSnapshot may look: which tiers, in which order.
type ReadPolicy int

const (
	// ReadPolicyUnset is rejected: callers must choose.
	ReadPolicyUnset ReadPolicy = iota
	// Newest lets the fleet's newest snapshot win: remote manifests are never
	// pinned locally.
	Newest
	// LocalFirst prefers the local manifest and pins fetched remote ones.
	LocalFirst
	// LocalOnly never reads a remote manifest.
	LocalOnly
)

// ParseReadPolicy parses newest, local-first or local-only.
func ParseReadPolicy(s string) (ReadPolicy, error) {
	switch s {
	case "newest":
		return Newest, nil
	case "local-first":
		return LocalFirst, nil
	case "local-only":
		return LocalOnly, nil
	}
	return ReadPolicyUnset, invalidf("unknown read policy %q (want newest, local-first or local-only)", s)
}

func (p ReadPolicy) String() string {
	switch p {
	case Newest:
		return "newest"
	case LocalFirst:
		return "local-first"
	case LocalOnly:
		return "local-only"
	}
	return "unset"
}

// SavePolicy says when a run on a non-default ref publishes remotely.
type SavePolicy int

const (
	// FirstNonDefaultRef publishes only when nothing existed under the
	// branch key itself (the default).
	FirstNonDefaultRef SavePolicy = iota
	// Always publishes on every run.
	Always
	// NoneAvailable publishes only when no snapshot was found at all.
	NoneAvailable
)

// ParseSavePolicy parses always, first-non-default-ref or none-available.
func ParseSavePolicy(s string) (SavePolicy, error) {
	switch s {
	case "", "first-non-default-ref":
		return FirstNonDefaultRef, nil
	case "always":
		return Always, nil
	case "none-available":
		return NoneAvailable, nil
	}
	return 0, invalidf("unknown save policy %q (want always, first-non-default-ref or none-available)", s)
}

// DefaultMaxStaleFallbackAge bounds how old a fallback key's local manifest
// may be.
const DefaultMaxStaleFallbackAge = 24 * time.Hour

// Options configure a Loader.
type Options struct {
	// Group is the tenant whose local manifests are read and written.
	Group string
	// Function is the digest function for new snapshots (default BLAKE3).
	Function digest.Function
	// RemoteReadOnly loads from the remote but never publishes to it.
	RemoteReadOnly bool
	// Parallelism bounds concurrent uploads (default max(8, NumCPU)).
	Parallelism int
	// Logger for non-fatal events; nil = slog.Default().
	Logger *slog.Logger
	// Now returns the current time (tests); nil = time.Now.
	Now func() time.Time
	// RemoteEntryFunction is the digest function the remote's version
	// entries are keyed under: BLAKE3 (the default), or SHA-256 for a
	// remote that only speaks SHA-256.
	RemoteEntryFunction digest.Function
	// VersionSettle is how long a host that created a key's first
	// version on the remote waits before reading back the one stored
	// (default 250ms; only the first save of a new key pays it).
	VersionSettle time.Duration
	// RemoteMaxBlobBytes is the largest blob the remote accepts (0: no
	// limit known); larger artifact files are stored there as chunks.
	RemoteMaxBlobBytes int64
	// RemoteFunctions are the digest functions the remote accepts
	// (default: BLAKE3 and SHA-256); manifests are looked up under each.
	RemoteFunctions []digest.Function
}

// Loader saves and loads snapshots.
type Loader struct {
	local  cache.Local
	remote cache.Tier // nil when there is no remote tier
	opts   Options

	mu        sync.Mutex
	remoteErr error // the outage the remote failed with, if it did
}

// New returns a Loader over local and an optional remote tier (nil for
// none).
func New(local cache.Local, remote cache.Tier, opts Options) (*Loader, error) {
	if local == nil {
		return nil, status.Error(codes.InvalidArgument, "a local cache is required")
	}
	if opts.Function == repb.DigestFunction_UNKNOWN {
		opts.Function = digest.Default
	}
	if _, err := digest.New(opts.Function); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if opts.Parallelism <= 0 {
		opts.Parallelism = max(8, runtime.NumCPU())
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.VersionSettle <= 0 {
		opts.VersionSettle = 250 * time.Millisecond
	}
	return &Loader{local: local, remote: remote, opts: opts}, nil
}

// HasRemote reports whether a remote tier is configured.
func (l *Loader) HasRemote() bool { return l.remote != nil }

// ns is the namespace of a key's entries with digest function fn.
func (l *Loader) ns(instance string, fn digest.Function) cache.Namespace {
	return cache.Namespace{Group: l.opts.Group, Instance: instance, Function: fn}
}

// entryNS is the namespace version entries live under in the local tier
// (or, when remote, the remote one), whatever digest function the snapshot
// data uses, so that every host sees one version per key, whichever
// function saved it: BLAKE3, or SHA-256 on a remote that only
// speaks SHA-256. Version entries name no blobs, so any namespace holds
// them; manifests do, and live under their data's digest function (what
// REAPI caches check completeness in).
func (l *Loader) entryNS(remote bool, instance string) cache.Namespace {
	if remote && l.opts.RemoteEntryFunction != repb.DigestFunction_UNKNOWN {
		return l.ns(instance, l.opts.RemoteEntryFunction)
	}
	return l.ns(instance, digest.BLAKE3)
}

// getEntry reads a version entry of the local or (remote) the remote tier.
// Version entries written before they had one namespace live under the
// writer's digest function; a miss is looked up there too.
func (l *Loader) getEntry(ctx context.Context, remote bool, instance string, key *repb.Digest) (*repb.ActionResult, error) {
	c, ns := l.tier(remote), l.entryNS(remote, instance)
	ar, err := c.GetActionResult(ctx, ns, key)
	if cache.IsNotFound(err) && l.opts.Function != ns.Function {
		if old, oerr := c.GetActionResult(ctx, l.ns(instance, l.opts.Function), key); oerr == nil {
			return old, nil
		}
	}
	return ar, err
}

// functions lists the digest functions manifests of the local or (remote)
// the remote tier may be stored under, this loader's own first.
func (l *Loader) functions(remote bool) []digest.Function {
	all := []digest.Function{digest.BLAKE3, digest.SHA256}
	if remote && len(l.opts.RemoteFunctions) > 0 {
		// Only the functions snaploader writes: a cache may offer more
		// (GITSHA1, MD5...), under which no snapshot is ever stored.
		all = slices.DeleteFunc(slices.Clone(l.opts.RemoteFunctions), func(fn digest.Function) bool {
			return fn != digest.BLAKE3 && fn != digest.SHA256
		})
	}
	out := []digest.Function{l.opts.Function}
	for _, fn := range all {
		if fn != l.opts.Function {
			out = append(out, fn)
		}
	}
	return out
}

// getManifest reads the manifest under key from the local or (remote) the
// remote tier, looking under each digest function the tier offers (a snapshot saved with SHA-256 is found
// by a host whose own function is BLAKE3, and the reverse).
func (l *Loader) getManifest(ctx context.Context, remote bool, instance string, key *repb.Digest) (*repb.ActionResult, error) {
	c := l.tier(remote)
	if remote {
		return l.getManifestAll(ctx, c, l.functions(true), instance, key)
	}
	var first error
	for _, fn := range l.functions(remote) {
		ar, err := c.GetActionResult(ctx, l.ns(instance, fn), key)
		if err == nil {
			return ar, nil
		}
		if !cache.IsNotFound(err) {
			return nil, err
		}
		if first == nil {
			first = err
		}
	}
	return nil, first
}

// tier is the remote tier when remote, else the local one. Callers say
// which tier they mean: in a loader whose two tiers are one cache (a host
// reading another host's cache as its second tier) comparing tiers cannot.
func (l *Loader) tier(remote bool) cache.Cache {
	if remote {
		return l.remote
	}
	return l.local
}

// remoteUp reports whether the remote tier may be used: configured and not
// known to be down.
func (l *Loader) remoteUp() bool {
	return l.remote != nil && cache.TierDown(l.remote) == nil
}

// RemoteDown returns the error that made the remote tier unusable during
// this loader's work (it degraded to the local tier), nil when it was fine
// or there is none.
func (l *Loader) RemoteDown() error {
	if l.remote == nil {
		return nil
	}
	if err := cache.TierDown(l.remote); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.remoteErr
}

// degraded records that the remote tier failed with an outage and work
// goes on with the local tier; it reports whether err was such an outage.
func (l *Loader) degraded(err error) bool {
	if err == nil || !cache.IsOutage(err) {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.remoteErr == nil {
		l.remoteErr = err
		if cache.TierDown(l.remote) == nil { // a Breaker has already said so
			l.opts.Logger.Warn("remote tier unavailable; continuing with the local cache", "err", err)
		}
	}
	return true
}

// CurrentVersion returns the version id of the key's (instance, platform,
// configuration): one per such triple, shared by all its refs, so that one
// invalidation covers them all. It is read from the remote when there is one,
// and the host keeps the last id it saw there in its local cache: when the
// remote is down, or absent from a later command, that id is used, so the
// host's own snapshots stay reachable; when the remote is back, its id
// rules again (an invalidation made meanwhile is seen). When no id is
// stored anywhere it may be read, a fresh random one is created (an
// expired entry must not resurrect an older snapshot); creation converges:
// the local cache creates atomically, and a save that raced with another
// host's creation on the remote republishes under the id that won.
func (l *Loader) CurrentVersion(ctx context.Context, key *snapshotpb.SnapshotKey) (string, error) {
	if key == nil {
		return "", invalidf("snapshot key is nil")
	}
	if l.remoteUp() {
		v, err := l.remoteVersion(ctx, key)
		if err == nil {
			return v, nil
		}
		if !l.degraded(err) {
			return "", err
		}
	}
	return l.localVersion(ctx, key)
}

// remoteVersion reads (or creates) the remote's version id and keeps it
// locally.
func (l *Loader) remoteVersion(ctx context.Context, key *snapshotpb.SnapshotKey) (string, error) {
	ar, err := l.getEntry(ctx, true, key.GetInstanceName(), VersionKey(key))
	if err != nil && !cache.IsNotFound(err) {
		return "", fmt.Errorf("reading version of key %s from the remote: %w", keyString(key), err)
	}
	v, _ := versionFromResult(ar)
	if v == "" {
		if l.opts.RemoteReadOnly {
			// Nothing published yet: this host keeps its own id until
			// the remote has one.
			return l.localVersion(ctx, key)
		}
		if ar, err = l.createRemoteVersion(ctx, key); err != nil {
			return "", err
		}
		v, _ = versionFromResult(ar)
	}
	l.keepLocally(ctx, key, ar, v)
	return v, nil
}

// createRemoteVersion writes a fresh version id to the remote, then, after
// Options.VersionSettle, reads back the one stored: hosts that found no
// version at the same moment all write one within about a round trip of
// each other, and the one stored last is what everybody reads from then
// on. A save that still ends under another id republishes under the
// winner (republishIfRaced).
func (l *Loader) createRemoteVersion(ctx context.Context, key *snapshotpb.SnapshotKey) (*repb.ActionResult, error) {
	ar, err := versionResult(NewVersionID(), false)
	if err != nil {
		return nil, err
	}
	ns := l.entryNS(true, key.GetInstanceName())
	if err := l.remote.UpdateActionResult(ctx, ns, VersionKey(key), ar); err != nil {
		return nil, fmt.Errorf("writing version of key %s to the remote: %w", keyString(key), err)
	}
	t := time.NewTimer(l.opts.VersionSettle)
	select {
	case <-t.C:
	case <-ctx.Done():
		t.Stop()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if stored, err := l.remote.GetActionResult(ctx, ns, VersionKey(key)); err == nil {
		if v, _ := versionFromResult(stored); v != "" {
			return stored, nil
		}
	}
	return ar, nil
}

// keepLocally records the remote's version entry in the local cache when
// it differs from the one kept there.
func (l *Loader) keepLocally(ctx context.Context, key *snapshotpb.SnapshotKey, ar *repb.ActionResult, v string) {
	ns := l.entryNS(false, key.GetInstanceName())
	if cur, err := l.local.GetActionResult(ctx, ns, VersionKey(key)); err == nil {
		if cv, _ := versionFromResult(cur); cv == v {
			return
		}
	}
	if err := l.local.UpdateActionResult(ctx, ns, VersionKey(key), ar); err != nil {
		l.opts.Logger.Warn("keeping the remote's version id locally", "key", keyString(key), "err", err)
	}
}

// localVersion reads the local cache's version id, creating one
// atomically when there is none.
func (l *Loader) localVersion(ctx context.Context, key *snapshotpb.SnapshotKey) (string, error) {
	ns := l.entryNS(false, key.GetInstanceName())
	ar, err := l.getEntry(ctx, false, key.GetInstanceName(), VersionKey(key))
	if err != nil && !cache.IsNotFound(err) && !cache.IsCorrupt(err) {
		return "", fmt.Errorf("reading version of key %s: %w", keyString(key), err)
	}
	if v, _ := versionFromResult(ar); v != "" {
		return v, nil
	}
	fresh, err := versionResult(NewVersionID(), false)
	if err != nil {
		return "", err
	}
	stored, _, err := l.local.CreateActionResult(ctx, ns, VersionKey(key), fresh)
	if err != nil {
		return "", fmt.Errorf("creating version of key %s: %w", keyString(key), err)
	}
	if v, _ := versionFromResult(stored); v != "" {
		return v, nil
	}
	return "", cache.Corruptf("version entry of key %s holds no version id", keyString(key))
}

// storedVersion reads the version id that CurrentVersion would return now,
// without creating one: "" when none is stored. invalidation says it was
// written by Invalidate.
func (l *Loader) storedVersion(ctx context.Context, key *snapshotpb.SnapshotKey) (v string, invalidation bool, err error) {
	if l.remoteUp() {
		ar, err := l.getEntry(ctx, true, key.GetInstanceName(), VersionKey(key))
		if err == nil || cache.IsNotFound(err) {
			if v, inv := versionFromResult(ar); v != "" || !l.opts.RemoteReadOnly {
				return v, inv, nil
			}
		} else if !l.degraded(err) {
			return "", false, err
		}
	}
	ar, err := l.getEntry(ctx, false, key.GetInstanceName(), VersionKey(key))
	if err != nil && !cache.IsNotFound(err) {
		return "", false, err
	}
	v, invalidation = versionFromResult(ar)
	return v, invalidation, nil
}

// Invalidate writes a fresh version id for the key and returns it; every
// snapshot saved under an older version is never returned again. It needs
// a writable authoritative tier that is up: an invalidation the fleet does
// not see is refused.
func (l *Loader) Invalidate(ctx context.Context, key *snapshotpb.SnapshotKey) (string, error) {
	if key == nil {
		return "", invalidf("snapshot key is nil")
	}
	v := NewVersionID()
	ar, err := versionResult(v, true)
	if err != nil {
		return "", err
	}
	if l.remote != nil {
		if l.opts.RemoteReadOnly {
			return "", status.Errorf(codes.FailedPrecondition, "invalidating %s: the remote holding version ids is read-only here", keyString(key))
		}
		if err := l.remote.UpdateActionResult(ctx, l.entryNS(true, key.GetInstanceName()), VersionKey(key), ar); err != nil {
			return "", fmt.Errorf("invalidating %s on the remote: %w", keyString(key), err)
		}
	}
	if err := l.local.UpdateActionResult(ctx, l.entryNS(false, key.GetInstanceName()), VersionKey(key), ar); err != nil {
		if l.remote == nil {
			return "", fmt.Errorf("invalidating %s: %w", keyString(key), err)
		}
		l.opts.Logger.Warn("keeping the new version id locally", "key", keyString(key), "err", err)
	}
	return v, nil
}

// versionResult is the version entry holding id v.
func versionResult(v string, invalidation bool) (*repb.ActionResult, error) {
	md, err := anypb.New(&snapshotpb.SnapshotVersionMetadata{VersionId: v, Invalidation: invalidation})
	if err != nil {
		return nil, err
	}
	return &repb.ActionResult{ExecutionMetadata: &repb.ExecutedActionMetadata{AuxiliaryMetadata: []*anypb.Any{md}}}, nil
}

// VersionOfEntry is the version id a version entry holds ("" when ar is
// no version entry) and whether Invalidate wrote it.
func VersionOfEntry(ar *repb.ActionResult) (string, bool) { return versionFromResult(ar) }

// versionFromResult returns a version entry's id ("" when it holds none)
// and whether Invalidate wrote it.
func versionFromResult(ar *repb.ActionResult) (string, bool) {
	for _, a := range ar.GetExecutionMetadata().GetAuxiliaryMetadata() {
		m := &snapshotpb.SnapshotVersionMetadata{}
		if a.MessageIs(m) && a.UnmarshalTo(m) == nil {
			return m.GetVersionId(), m.GetInvalidation()
		}
	}
	return "", false
}

// KeySet derives the task's key set with the current version id.
func (l *Loader) KeySet(ctx context.Context, t Task, opts KeySetOptions) (*snapshotpb.SnapshotKeySet, error) {
	probe := &snapshotpb.SnapshotKey{InstanceName: t.InstanceName, PlatformHash: t.PlatformHash, ConfigurationHash: t.ConfigurationHash}
	v, err := l.CurrentVersion(ctx, probe)
	if err != nil {
		return nil, err
	}
	if opts.Logger == nil {
		opts.Logger = l.opts.Logger
	}
	return NewKeySet(t, v, opts), nil
}

func keyString(k *snapshotpb.SnapshotKey) string {
	s := fmt.Sprintf("{instance=%q platform=%.12s config=%.12s ref=%q", k.GetInstanceName(), k.GetPlatformHash(), k.GetConfigurationHash(), k.GetRef())
	if k.GetRunnerId() != "" {
		s += fmt.Sprintf(" runner=%q", k.GetRunnerId())
	}
	if k.GetSnapshotId() != "" {
		s += fmt.Sprintf(" snapshot=%q", k.GetSnapshotId())
	}
	return s + fmt.Sprintf(" version=%q}", k.GetVersionId())
}

// errorsJoinLast keeps the most informative error: Unavailable beats
// NotFound so callers can tell "down" from "absent".
func errorsJoinLast(prev, next error) error {
	if prev == nil {
		return next
	}
	if status.Code(prev) == codes.Unavailable && status.Code(next) == codes.NotFound {
		return prev
	}
	return next
}

// Namespace is the cache namespace new snapshot data saved under key uses.
func (l *Loader) Namespace(key *snapshotpb.SnapshotKey) cache.Namespace {
	return l.ns(key.GetInstanceName(), l.opts.Function)
}
