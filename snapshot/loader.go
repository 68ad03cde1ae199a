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
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// LocalCache is the host's own tier.
type LocalCache interface {
	cache.Cache
	cache.Opener
	// Pin keeps blobs from eviction until release is called.
	Pin(ns cache.Namespace, ds []*repb.Digest) (release func())
	// TempDir is a directory on the cache's filesystem.
	TempDir() string
}

// ReadPolicy says where GetSnapshot may look (SPEC §5).
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
}

// Loader saves and loads snapshots.
type Loader struct {
	local  LocalCache
	remote cache.Cache // nil when there is no remote tier
	opts   Options
}

// New returns a Loader over local and an optional remote tier (nil for
// none).
func New(local LocalCache, remote cache.Cache, opts Options) (*Loader, error) {
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
	return &Loader{local: local, remote: remote, opts: opts}, nil
}

// HasRemote reports whether a remote tier is configured.
func (l *Loader) HasRemote() bool { return l.remote != nil }

// ns is the namespace of a key's entries with digest function fn.
func (l *Loader) ns(instance string, fn digest.Function) cache.Namespace {
	return cache.Namespace{Group: l.opts.Group, Instance: instance, Function: fn}
}

// authoritative is the tier version ids are read from.
func (l *Loader) authoritative() cache.Cache {
	if l.remote != nil {
		return l.remote
	}
	return l.local
}

// CurrentVersion returns the version id of the key's (instance, platform,
// configuration), read from the authoritative tier. When none is stored
// (never set, or expired: an expired entry must not resurrect an older
// snapshot) a fresh random one is written. A host whose remote is read-only
// keeps such a fresh id in its local cache, so that its own local
// snapshots are found again until the remote publishes a version.
func (l *Loader) CurrentVersion(ctx context.Context, key *snapshotpb.SnapshotKey) (string, error) {
	if key == nil {
		return "", invalidf("snapshot key is nil")
	}
	v, err := l.readVersion(ctx, l.authoritative(), key)
	if err != nil || v != "" {
		return v, err
	}
	if l.remote != nil && l.opts.RemoteReadOnly {
		if v, err := l.readVersion(ctx, l.local, key); err != nil || v != "" {
			return v, err
		}
		return l.writeVersion(ctx, l.local, key)
	}
	return l.writeVersion(ctx, l.authoritative(), key)
}

// Invalidate writes a fresh version id for the key and returns it; every
// snapshot saved under an older version is never returned again. It needs
// a writable authoritative tier.
func (l *Loader) Invalidate(ctx context.Context, key *snapshotpb.SnapshotKey) (string, error) {
	if key == nil {
		return "", invalidf("snapshot key is nil")
	}
	if l.remote != nil && l.opts.RemoteReadOnly {
		return "", status.Errorf(codes.FailedPrecondition, "invalidating %s: the remote holding version ids is read-only here", keyString(key))
	}
	return l.writeVersion(ctx, l.authoritative(), key)
}

// readVersion reads the version id stored in c; "" when there is none.
func (l *Loader) readVersion(ctx context.Context, c cache.Cache, key *snapshotpb.SnapshotKey) (string, error) {
	ar, err := c.GetActionResult(ctx, l.ns(key.GetInstanceName(), l.opts.Function), VersionKey(key))
	if cache.IsNotFound(err) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("reading version of key %s: %w", keyString(key), err)
	}
	return versionFromResult(ar), nil
}

// writeVersion stores a fresh version id in c. When another host wrote one
// at the same moment, the id stored last is the one everybody reads, so it
// is read back and adopted.
func (l *Loader) writeVersion(ctx context.Context, c cache.Cache, key *snapshotpb.SnapshotKey) (string, error) {
	v := NewVersionID()
	md, err := anypb.New(&snapshotpb.SnapshotVersionMetadata{VersionId: v})
	if err != nil {
		return "", err
	}
	ar := &repb.ActionResult{ExecutionMetadata: &repb.ExecutedActionMetadata{AuxiliaryMetadata: []*anypb.Any{md}}}
	if err := c.UpdateActionResult(ctx, l.ns(key.GetInstanceName(), l.opts.Function), VersionKey(key), ar); err != nil {
		return "", fmt.Errorf("writing version of key %s: %w", keyString(key), err)
	}
	if stored, err := l.readVersion(ctx, c, key); err == nil && stored != "" {
		return stored, nil
	}
	return v, nil
}

func versionFromResult(ar *repb.ActionResult) string {
	for _, a := range ar.GetExecutionMetadata().GetAuxiliaryMetadata() {
		m := &snapshotpb.SnapshotVersionMetadata{}
		if a.MessageIs(m) && a.UnmarshalTo(m) == nil {
			return m.GetVersionId()
		}
	}
	return ""
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

// Namespace is the cache namespace a snapshot saved under key uses.
func (l *Loader) Namespace(key *snapshotpb.SnapshotKey) cache.Namespace {
	return l.ns(key.GetInstanceName(), l.opts.Function)
}
