package gc

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"regexp"
	"strings"

	"github.com/snaploader/snaploader/cache/s3cache"
)

// S3Group is the Store of an S3 tier as one group sees it: the group's
// action-cache entries (across instances) and every blob (blobs are
// shared by all groups). Collecting it would miss the other groups'
// entries, so it serves inventories only; collect with S3.
func S3Group(c *s3cache.Cache, group string) Store {
	prefix := s3GroupComponent(group) + "/"
	return scoped{Store: S3(c), keep: func(e Entry) bool { return strings.HasPrefix(e.Scope, prefix) }}
}

// s3GroupComponent is the key component s3cache stores a group's entries
// under (its package doc: "_" for the anonymous group, a safe name as it
// is, any other name "h." and its SHA-256 hex).
func s3GroupComponent(g string) string {
	switch {
	case g == "":
		return "_"
	case s3SafeGroup.MatchString(g):
		return g
	}
	h := sha256.Sum256([]byte(g))
	return "h." + hex.EncodeToString(h[:])
}

var s3SafeGroup = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

// scoped is a Store whose entries are those keep accepts.
type scoped struct {
	Store
	keep func(Entry) bool
}

func (s scoped) ListEntries(ctx context.Context, fn func(Entry) error) error {
	return s.Store.ListEntries(ctx, func(e Entry) error {
		if !s.keep(e) {
			return nil
		}
		return fn(e)
	})
}
