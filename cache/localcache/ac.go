package localcache

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// GetActionResult returns the action-cache entry under key in ns's group,
// instance and digest function; NotFound when absent. An entry that does not
// parse is removed and is an Internal error.
func (c *Cache) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	if err := checkDigest(ns, key); err != nil {
		return nil, fmt.Errorf("getting action result: %w", err)
	}
	rel, err := acRel(ns, key)
	if err != nil {
		return nil, fmt.Errorf("getting action result %s: %w", digest.String(key), err)
	}
	e := c.lookup(rel, false)
	if e == nil {
		return nil, cache.NotFoundf("action result %s not in local cache", digest.String(key))
	}
	b, err := os.ReadFile(filepath.Join(c.dir, rel))
	if err != nil {
		c.mu.Lock()
		c.dropLocked(e)
		c.mu.Unlock()
		if errors.Is(err, fs.ErrNotExist) {
			return nil, cache.NotFoundf("action result %s not in local cache (evicted)", digest.String(key))
		}
		return nil, status.Errorf(codes.Internal, "reading action result %s: %v", digest.String(key), err)
	}
	ar := &repb.ActionResult{}
	if err := proto.Unmarshal(b, ar); err != nil {
		c.mu.Lock()
		c.dropLocked(e)
		c.mu.Unlock()
		os.Remove(filepath.Join(c.dir, rel))
		return nil, cache.Corruptf("corrupt action result %s in local cache: %v", digest.String(key), err)
	}
	return ar, nil
}

// UpdateActionResult stores ar under key, atomically replacing any entry.
func (c *Cache) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	if err := checkDigest(ns, key); err != nil {
		return fmt.Errorf("updating action result: %w", err)
	}
	rel, err := acRel(ns, key)
	if err != nil {
		return fmt.Errorf("updating action result %s: %w", digest.String(key), err)
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(ar)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "encoding action result %s: %v", digest.String(key), err)
	}
	instRel, _ := acInstRel(ns)
	instPath := filepath.Join(c.dir, instRel, instFile)
	if _, err := os.Stat(instPath); err != nil {
		if err := os.MkdirAll(filepath.Dir(instPath), 0o755); err != nil {
			return status.Errorf(codes.Internal, "updating action result %s: %v", digest.String(key), err)
		}
		if _, err := c.writeFile(ctx, filepath.Join(instRel, instFile), func(f *os.File) error {
			_, err := f.WriteString(ns.Instance)
			return err
		}); err != nil {
			return fmt.Errorf("updating action result %s: recording instance: %w", digest.String(key), err)
		}
	}
	size, err := c.writeFile(ctx, rel, func(f *os.File) error {
		if _, err := f.Write(b); err != nil {
			return status.Errorf(codes.Internal, "writing: %v", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("updating action result %s: %w", digest.String(key), err)
	}
	c.stored(rel, size, true)
	return nil
}

// ACEntry is one action-cache entry, as listed by ListActionResults.
type ACEntry struct {
	Namespace cache.Namespace
	Key       *repb.Digest
	Result    *repb.ActionResult
	ModTime   time.Time // last use
}

// ListActionResults lists the action-cache entries of group, across
// instances and digest functions, without refreshing their recency. Entries
// that vanish or fail to parse while listing are skipped.
func (c *Cache) ListActionResults(ctx context.Context, group string) ([]ACEntry, error) {
	g, err := groupDir(group)
	if err != nil {
		return nil, fmt.Errorf("listing action results: %w", err)
	}
	groupPath := filepath.Join(c.dir, acDir, g)
	insts, err := os.ReadDir(groupPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "listing action results of group %q: %v", group, err)
	}
	var out []ACEntry
	for _, inst := range insts {
		name, err := os.ReadFile(filepath.Join(groupPath, inst.Name(), instFile))
		if err != nil || instanceDir(string(name)) != inst.Name() {
			continue
		}
		fns, _ := os.ReadDir(filepath.Join(groupPath, inst.Name()))
		for _, fnd := range fns {
			if !fnd.IsDir() {
				continue
			}
			fn, err := digest.ParseFunction(fnd.Name())
			if err != nil || digest.FunctionName(fn) != fnd.Name() {
				continue
			}
			err = filepath.WalkDir(filepath.Join(groupPath, inst.Name(), fnd.Name()), func(p string, de fs.DirEntry, err error) error {
				if err != nil {
					return nil
				}
				if cerr := ctx.Err(); cerr != nil {
					return cerr
				}
				if de.IsDir() || !validEntryName(de.Name()) {
					return nil
				}
				h, s, _ := strings.Cut(de.Name(), "-")
				size, _ := strconv.ParseInt(s, 10, 64)
				b, err := os.ReadFile(p)
				if err != nil {
					return nil
				}
				ar := &repb.ActionResult{}
				if proto.Unmarshal(b, ar) != nil {
					return nil
				}
				fi, err := os.Stat(p)
				if err != nil {
					return nil
				}
				out = append(out, ACEntry{
					Namespace: cache.Namespace{Group: group, Instance: string(name), Function: fn},
					Key:       &repb.Digest{Hash: h, SizeBytes: size},
					Result:    ar,
					ModTime:   fi.ModTime(),
				})
				return nil
			})
			if err != nil {
				return nil, status.FromContextError(err).Err()
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ModTime.After(out[j].ModTime) })
	return out, nil
}

