package gc

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
)

// LocalCache is the Store of a local cache directory (the disk backend of
// `snaploader serve`) as one group sees it: the group's action-cache
// entries, across instances and digest functions, and every blob (blobs
// are shared by all groups). Ages are the cache's recency (a file's mtime
// is its last use), and stored sizes are disk usage (st_blocks*512), as
// the cache's bound counts them.
//
// It serves inventories: the cache evicts by itself, so Delete refuses
// (FailedPrecondition) and a collection of it fails before deleting
// anything.
func LocalCache(c *localcache.Cache, group string) Store {
	return &localStore{c: c, group: group, entries: map[string]localcache.ACEntry{}}
}

type localStore struct {
	c     *localcache.Cache
	group string

	mu      sync.Mutex
	entries map[string]localcache.ACEntry // by Entry.ID, as last listed
}

func (s *localStore) ListEntries(ctx context.Context, fn func(Entry) error) error {
	es, err := s.c.ListActionResults(ctx, s.group)
	if err != nil {
		return fmt.Errorf("listing the action cache of group %q: %w", s.group, err)
	}
	byID := make(map[string]localcache.ACEntry, len(es))
	list := make([]Entry, 0, len(es))
	for _, e := range es {
		id := fmt.Sprintf("ac/%s/%s/%s-%d", digest.StringListHash(e.Namespace.Instance),
			digest.FunctionName(e.Namespace.Function), e.Key.GetHash(), e.Key.GetSizeBytes())
		byID[id] = e
		list = append(list, Entry{ID: id, Scope: s.group + "/" + e.Namespace.Instance, Hash: e.Key.GetHash(), Size: e.Key.GetSizeBytes()})
	}
	s.mu.Lock()
	s.entries = byID
	s.mu.Unlock()
	for _, e := range list {
		if err := fn(e); err != nil {
			return err
		}
	}
	return nil
}

func (s *localStore) ReadEntry(_ context.Context, e Entry) (*repb.ActionResult, time.Time, error) {
	s.mu.Lock()
	ae, ok := s.entries[e.ID]
	s.mu.Unlock()
	if !ok {
		return nil, time.Time{}, status.Errorf(codes.NotFound, "action-cache entry %s of group %q: not listed", e.ID, s.group)
	}
	return ae.Result, ae.ModTime, nil
}

// ListBlobs walks cas/<fn>/<hh>/<hash>-<size> (the layout the localcache
// package documents). Files that vanish meanwhile (eviction) are skipped.
func (s *localStore) ListBlobs(ctx context.Context, fn func(Blob) error) error {
	root := filepath.Join(s.c.Dir(), "cas")
	fns, err := os.ReadDir(root)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return status.Errorf(codes.Internal, "listing blobs: %v", err)
	}
	for _, fd := range fns {
		f, err := digest.ParseFunction(fd.Name())
		if err != nil || !fd.IsDir() || digest.FunctionName(f) != fd.Name() {
			continue
		}
		err = filepath.WalkDir(filepath.Join(root, fd.Name()), func(p string, de fs.DirEntry, err error) error {
			if err != nil || de.IsDir() {
				return nil
			}
			if cerr := ctx.Err(); cerr != nil {
				return cerr
			}
			d, ok := blobName(de.Name())
			if !ok {
				return nil
			}
			info, err := de.Info()
			if err != nil {
				return nil
			}
			return fn(Blob{ID: p, Function: f, Digest: d, StoredSize: diskUsage(info), Modified: info.ModTime()})
		})
		if err != nil {
			if ctx.Err() != nil {
				return status.FromContextError(ctx.Err()).Err()
			}
			return err
		}
	}
	return nil
}

// blobName parses "<hash>-<size>".
func blobName(name string) (*repb.Digest, bool) {
	h, sz, ok := strings.Cut(name, "-")
	if !ok {
		return nil, false
	}
	n, err := strconv.ParseInt(sz, 10, 64)
	if err != nil || strconv.FormatInt(n, 10) != sz {
		return nil, false
	}
	d := &repb.Digest{Hash: h, SizeBytes: n}
	return d, digest.Validate(d) == nil
}

func diskUsage(info fs.FileInfo) int64 {
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return info.Size()
}

func (s *localStore) ReadBlob(ctx context.Context, fn digest.Function, d *repb.Digest) (io.ReadCloser, error) {
	return s.c.Read(ctx, cache.Namespace{Group: s.group, Function: fn}, d)
}

func (s *localStore) Written(_ context.Context, b Blob) (time.Time, bool, error) {
	info, err := os.Stat(b.ID)
	if os.IsNotExist(err) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, status.Errorf(codes.Internal, "looking up blob %s: %v", digest.String(b.Digest), err)
	}
	return info.ModTime(), true, nil
}

func (s *localStore) Delete(context.Context, []string) (int, error) {
	return 0, status.Error(codes.FailedPrecondition, "a local cache directory evicts by itself (LRU under its byte bound); it is not collected")
}
