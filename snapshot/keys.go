package snapshot

import (
	"crypto/rand"
	"fmt"
	"log/slog"
	"sort"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// Environment variables a task's key set is derived from.
const (
	EnvBranch        = "GIT_BRANCH"
	EnvBaseBranch    = "GIT_BASE_BRANCH"
	EnvDefaultBranch = "GIT_REPO_DEFAULT_BRANCH"
)

// mergeQueuePrefix starts the refs of GitHub merge-queue branches,
// gh-readonly-queue/<default>/<pr>.
const mergeQueuePrefix = "gh-readonly-queue/"

// Task is what a key set is computed from.
type Task struct {
	InstanceName      string
	PlatformHash      string
	ConfigurationHash string
	// RunnerID pins snapshots to one runner; empty when snapshots are shared.
	RunnerID string
	// Env holds at least GIT_BRANCH, GIT_BASE_BRANCH, GIT_REPO_DEFAULT_BRANCH.
	Env map[string]string
}

// KeySetOptions tune key derivation.
type KeySetOptions struct {
	// UniversalRef, when set, is a last fallback ref under which any branch
	// may also publish (off by default).
	UniversalRef string
	// Logger receives the malformed merge-queue ref error; nil = slog.Default.
	Logger *slog.Logger
}

// NewKeySet derives a task's key set with versionID on every key: the
// branch key, the fallback keys (base branch, default branch, universal
// ref, each once) and the write key.
func NewKeySet(t Task, versionID string, opts KeySetOptions) *snapshotpb.SnapshotKeySet {
	base := func(ref string) *snapshotpb.SnapshotKey {
		return &snapshotpb.SnapshotKey{
			InstanceName:      t.InstanceName,
			PlatformHash:      t.PlatformHash,
			ConfigurationHash: t.ConfigurationHash,
			RunnerId:          t.RunnerID,
			Ref:               ref,
			VersionId:         versionID,
		}
	}
	branch := t.Env[EnvBranch]
	set := &snapshotpb.SnapshotKeySet{BranchKey: base(branch)}
	if branch == "" {
		set.WriteKey = base("")
		return set
	}
	seen := map[string]bool{branch: true}
	for _, ref := range []string{t.Env[EnvBaseBranch], t.Env[EnvDefaultBranch], opts.UniversalRef} {
		if ref == "" || seen[ref] {
			continue
		}
		seen[ref] = true
		set.FallbackKeys = append(set.FallbackKeys, base(ref))
	}
	set.WriteKey = base(writeRef(branch, t.Env[EnvDefaultBranch], opts.Logger))
	return set
}

// writeRef is the ref a task on branch publishes to: the branch itself,
// except merge-queue branches gh-readonly-queue/<default>/<pr>, which write
// to <default>.
func writeRef(branch, defaultRef string, log *slog.Logger) string {
	rest, ok := strings.CutPrefix(branch, mergeQueuePrefix)
	if !ok {
		return branch
	}
	target, pr, ok := strings.Cut(rest, "/")
	if defaultRef != "" {
		// The default branch may itself contain slashes (release/v2).
		pr, ok = strings.CutPrefix(rest, defaultRef+"/")
		target = defaultRef
	}
	if !ok || target == "" || pr == "" {
		if log == nil {
			log = slog.Default()
		}
		log.Error("malformed merge-queue ref; writing snapshot to the branch key instead",
			"ref", branch, "default_ref", defaultRef)
		return branch
	}
	return target
}

// AllKeys lists the keys of a set in read order: branch, then fallbacks.
func AllKeys(set *snapshotpb.SnapshotKeySet) []*snapshotpb.SnapshotKey {
	return append([]*snapshotpb.SnapshotKey{set.GetBranchKey()}, set.GetFallbackKeys()...)
}

// KeyHash is K: the SHA-256 hex of the deterministic encoding of key.
func KeyHash(key *snapshotpb.SnapshotKey) (string, error) {
	if key == nil {
		return "", status.Error(codes.InvalidArgument, "snapshot key is nil")
	}
	return digest.ProtoHash(key)
}

// acDigest makes an action-cache key digest; the size is a placeholder.
func acDigest(hash string) *repb.Digest { return &repb.Digest{Hash: hash, SizeBytes: 1} }

// RemoteManifestKey is H(K, snapshot_id, version_id, ".manifest").
func RemoteManifestKey(key *snapshotpb.SnapshotKey) (*repb.Digest, error) {
	k, err := KeyHash(key)
	if err != nil {
		return nil, err
	}
	return acDigest(digest.StringListHash(k, key.GetSnapshotId(), key.GetVersionId(), ".manifest")), nil
}

// LocalManifestKey is H(group, K, snapshot_id, version_id, ".manifest"):
// the local cache has no other tenant partitioning, so the group is hashed
// in (anonymous group = "").
func LocalManifestKey(group string, key *snapshotpb.SnapshotKey) (*repb.Digest, error) {
	k, err := KeyHash(key)
	if err != nil {
		return nil, err
	}
	return acDigest(digest.StringListHash(group, k, key.GetSnapshotId(), key.GetVersionId(), ".manifest")), nil
}

// VersionKey is H(instance_name, platform_hash, configuration_hash,
// ".version"); it has no ref, so one invalidation covers a branch and all
// its fallbacks.
func VersionKey(key *snapshotpb.SnapshotKey) *repb.Digest {
	return acDigest(digest.StringListHash(key.GetInstanceName(), key.GetPlatformHash(), key.GetConfigurationHash(), ".version"))
}

// SnapshotIDKey is the key naming one exact snapshot: only instance name and
// snapshot id.
func SnapshotIDKey(instance, snapshotID string) *snapshotpb.SnapshotKey {
	return &snapshotpb.SnapshotKey{InstanceName: instance, SnapshotId: snapshotID}
}

// PlatformHash is the SHA-256 hex of platform properties sorted by name,
// encoded as a REAPI Platform message.
func PlatformHash(props map[string]string) (string, error) {
	names := make([]string, 0, len(props))
	for n := range props {
		names = append(names, n)
	}
	sort.Strings(names)
	p := &repb.Platform{}
	for _, n := range names {
		p.Properties = append(p.Properties, &repb.Platform_Property{Name: n, Value: props[n]})
	}
	return digest.ProtoHash(p)
}

// ConfigurationHash is the default configuration hash: SHA-256 hex of the
// VMConfiguration message.
func ConfigurationHash(c *snapshotpb.VMConfiguration) (string, error) {
	return digest.ProtoHash(c)
}

const idAlphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// NewVersionID returns a random 10-character [0-9A-Za-z] id.
func NewVersionID() string { return randomID(10) }

// NewSnapshotID returns a random snapshot id.
func NewSnapshotID() string { return randomID(22) }

func randomID(n int) string {
	b := make([]byte, n)
	// Rejection sampling keeps the distribution uniform.
	out := make([]byte, 0, n)
	for len(out) < n {
		if _, err := rand.Read(b); err != nil {
			panic(fmt.Sprintf("reading random bytes: %v", err))
		}
		for _, c := range b {
			if c < 248 && len(out) < n { // 248 = 4*62
				out = append(out, idAlphabet[int(c)%62])
			}
		}
	}
	return string(out)
}
