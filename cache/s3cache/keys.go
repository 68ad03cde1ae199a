package s3cache

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

func cleanPrefix(p string) (string, error) {
	p = strings.Trim(p, "/")
	if p == "" {
		return "", nil
	}
	for _, part := range strings.Split(p, "/") {
		if part == "" || part == "." || part == ".." {
			return "", status.Errorf(codes.InvalidArgument, "s3 cache: prefix %q has an empty, . or .. component", p)
		}
		for _, r := range part {
			if r < 0x20 || r == 0x7f {
				return "", status.Errorf(codes.InvalidArgument, "s3 cache: prefix %q has a control character", p)
			}
		}
	}
	return p + "/", nil
}

func checkDigest(ns cache.Namespace, d *repb.Digest, what string) (digest.Function, error) {
	fn, err := ns.CheckDigest(d)
	if err != nil {
		return 0, fmt.Errorf("s3 cache: %s: %w", what, err)
	}
	return fn, nil
}

func isEmpty(fn digest.Function, d *repb.Digest) bool {
	return d.SizeBytes == 0 && d.Hash == emptyHash(fn)
}

var (
	emptyBLAKE3 = digest.Compute(digest.BLAKE3, nil).Hash
	emptySHA256 = digest.Compute(digest.SHA256, nil).Hash
)

func emptyHash(fn digest.Function) string {
	if fn == digest.SHA256 {
		return emptySHA256
	}
	return emptyBLAKE3
}

func (c *Cache) casKey(fn digest.Function, d *repb.Digest) string {
	return fmt.Sprintf("%scas/%s/%s-%d", c.prefix, digest.FunctionName(fn), d.Hash, d.SizeBytes)
}

var safeGroup = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

func sha256Hex(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// groupComponent is the key component for a group (see the package doc).
func groupComponent(g string) string {
	switch {
	case g == "":
		return "_"
	case safeGroup.MatchString(g):
		return g
	}
	return "h." + sha256Hex(g)
}

func (c *Cache) acKey(ns cache.Namespace, fn digest.Function, key *repb.Digest) string {
	return fmt.Sprintf("%sac/%s/%s/%s/%s", c.prefix, groupComponent(ns.Group), sha256Hex(ns.Instance), digest.FunctionName(fn), key.Hash)
}
