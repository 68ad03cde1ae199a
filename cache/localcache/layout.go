package localcache

import (
	"encoding/hex"
	"fmt"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

var groupRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$`)

// Path is where the blob d lives (whether or not it is present). Callers may
// hard-link or read it but must never modify it: entries are immutable and
// shared. A hard link keeps the data alive after eviction but is not counted
// in Usage. Path is "" for a malformed digest.
func (c *Cache) Path(ns cache.Namespace, d *repb.Digest) string {
	if digest.Validate(d) != nil {
		return ""
	}
	return filepath.Join(c.dir, casRel(ns.DigestFunction(), d))
}

// casRel is the path of blob d relative to the cache directory, for a
// valid digest (built without filepath.Join: a restore forms one per chunk).
func casRel(fn digest.Function, d *repb.Digest) string {
	return casDir + "/" + digest.FunctionName(fn) + "/" + d.Hash[:2] + "/" + d.Hash + "-" + strconv.FormatInt(d.SizeBytes, 10)
}

func groupDir(group string) (string, error) {
	if group == "" {
		return "anonymous", nil
	}
	if !groupRE.MatchString(group) {
		return "", status.Errorf(codes.InvalidArgument, "group name %q is not allowed (want %s)", group, groupRE)
	}
	return "g-" + group, nil
}

func instanceDir(instance string) string { return digest.StringListHash(instance) }

func acInstRel(ns cache.Namespace) (string, error) {
	g, err := groupDir(ns.Group)
	if err != nil {
		return "", err
	}
	return filepath.Join(acDir, g, instanceDir(ns.Instance)), nil
}

func acRel(ns cache.Namespace, key *repb.Digest) (string, error) {
	inst, err := acInstRel(ns)
	if err != nil {
		return "", err
	}
	fn := ns.DigestFunction()
	return filepath.Join(inst, digest.FunctionName(fn), key.Hash[:2], key.Hash+"-"+strconv.FormatInt(key.SizeBytes, 10)), nil
}

func checkNS(ns cache.Namespace) error {
	if _, err := ns.CheckFunction(); err != nil {
		return fmt.Errorf("namespace: %w", err)
	}
	return nil
}

func checkDigest(ns cache.Namespace, d *repb.Digest) error {
	if err := checkNS(ns); err != nil {
		return err
	}
	return digest.Validate(d)
}

// validEntryName matches "<64 hex>-<size>".
func validEntryName(name string) bool {
	h, s, ok := strings.Cut(name, "-")
	if !ok || len(h) != digest.HashLen {
		return false
	}
	if _, err := strconv.ParseUint(s, 10, 63); err != nil {
		return false
	}
	_, err := hex.DecodeString(h)
	return err == nil && strings.ToLower(h) == h
}
