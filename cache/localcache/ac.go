package localcache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
)

// GetActionResult returns the action-cache entry under key in ns's group,
// instance and digest function; NotFound when absent. An entry that fails
// its checksum or does not parse is removed and is a DataLoss error; a
// failure to read it (no descriptors left, EIO) keeps it and is
// Unavailable.
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
	ar, fi, err := readEntry(filepath.Join(c.dir, rel))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		c.mu.Lock()
		c.dropLocked(e)
		c.mu.Unlock()
		return nil, cache.NotFoundf("action result %s not in local cache (evicted)", digest.String(key))
	case cache.IsCorrupt(err):
		c.removeCorruptFile(e, fi)
		return nil, cache.Corruptf("corrupt action result %s in local cache (removed): %v", digest.String(key), err)
	case err != nil:
		// A failure to read (no descriptors left, EIO) says nothing of
		// the entry: it stays, and the error is retryable.
		return nil, errkind.IO(err, "reading action result %s in local cache", digest.String(key))
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
	b, err := encodeEntry(ar)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "encoding action result %s: %v", digest.String(key), err)
	}
	if err := c.recordInstance(ctx, ns); err != nil {
		return fmt.Errorf("updating action result %s: %w", digest.String(key), err)
	}
	size, err := c.writeFile(ctx, rel, func(f *os.File) error {
		if _, err := f.Write(b); err != nil {
			return errkind.IO(err, "writing")
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("updating action result %s: %w", digest.String(key), err)
	}
	c.stored(rel, size, true)
	return nil
}

// recordInstance writes the INSTANCE file of ns's instance directory once.
func (c *Cache) recordInstance(ctx context.Context, ns cache.Namespace) error {
	instRel, _ := acInstRel(ns)
	instPath := filepath.Join(c.dir, instRel, instFile)
	if _, err := os.Stat(instPath); err != nil {
		if err := os.MkdirAll(filepath.Dir(instPath), 0o755); err != nil {
			return errkind.IO(errnoOf(err), "recording instance")
		}
		if _, err := c.writeFile(ctx, filepath.Join(instRel, instFile), func(f *os.File) error {
			_, err := f.WriteString(ns.Instance)
			return err
		}); err != nil {
			return fmt.Errorf("recording instance: %w", err)
		}
	}
	return nil
}

// CreateActionResult stores ar under key only if no entry is there, as one
// atomic step across every process sharing the directory (a hard link of
// a complete temporary file, which fails when the name exists). It returns
// the entry that is stored afterwards: ar when it was created, else the
// one found. A stored entry that is corrupt is replaced.
func (c *Cache) CreateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) (*repb.ActionResult, bool, error) {
	if err := checkDigest(ns, key); err != nil {
		return nil, false, fmt.Errorf("creating action result: %w", err)
	}
	rel, err := acRel(ns, key)
	if err != nil {
		return nil, false, fmt.Errorf("creating action result %s: %w", digest.String(key), err)
	}
	b, err := encodeEntry(ar)
	if err != nil {
		return nil, false, status.Errorf(codes.InvalidArgument, "encoding action result %s: %v", digest.String(key), err)
	}
	if err := c.recordInstance(ctx, ns); err != nil {
		return nil, false, fmt.Errorf("creating action result %s: %w", digest.String(key), err)
	}
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return nil, false, status.FromContextError(err).Err()
		}
		created, size, err := c.linkNew(rel, b)
		if err != nil {
			return nil, false, fmt.Errorf("creating action result %s: %w", digest.String(key), err)
		}
		if created {
			c.stored(rel, size, true)
			return ar, true, nil
		}
		c.stored(rel, size, false)
		got, err := c.GetActionResult(ctx, ns, key)
		if err == nil {
			return got, false, nil
		}
		// Removed since (evicted, or corrupt and dropped): try again.
		if attempt >= 3 {
			return nil, false, fmt.Errorf("creating action result %s: %w", digest.String(key), err)
		}
	}
}

// linkNew writes b to a temporary file and links it to rel unless rel
// exists. It reports whether it created rel, and rel's disk usage.
func (c *Cache) linkNew(rel string, b []byte) (bool, int64, error) {
	dst := filepath.Join(c.dir, rel)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return false, 0, errkind.IO(errnoOf(err), "creating %s", filepath.Dir(rel))
	}
	f, err := os.CreateTemp(filepath.Join(c.dir, tmpDir), "ac-*.tmp")
	if err != nil {
		return false, 0, errkind.IO(errnoOf(err), "creating temporary file")
	}
	defer os.Remove(f.Name())
	defer f.Close()
	// The lock tells other processes cleaning tmp/ that this file is live.
	unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if _, err := f.Write(b); err != nil {
		return false, 0, errkind.IO(errnoOf(err), "writing temporary file")
	}
	created := true
	if err := os.Link(f.Name(), dst); err != nil {
		if !errors.Is(err, fs.ErrExist) {
			return false, 0, errkind.IO(unwrapLink(err), "linking %s", rel)
		}
		created = false
	}
	var st unix.Stat_t
	if err := unix.Stat(dst, &st); err != nil {
		return created, 0, nil
	}
	return created, st.Blocks * 512, nil
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
		return nil, errkind.IO(errnoOf(err), "listing action results of group %q", group)
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
				ar, fi, err := readEntry(p)
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

// An action-cache entry file is entryMagic, the SHA-256 of the encoded
// ActionResult, then the encoded ActionResult, so that a flipped bit
// anywhere in it is detected on read instead of changing a manifest.
// Files without the magic are entries written before the check existed,
// read as a bare ActionResult.
const entryMagic = "SLAC1\n"

// maxEntryBytes bounds an action-cache entry file (a manifest lists
// artifact files and tree digests; trees hold the chunk lists).
const maxEntryBytes = 64 << 20

func encodeEntry(ar *repb.ActionResult) ([]byte, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(ar)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(b)
	out := make([]byte, 0, len(entryMagic)+len(sum)+len(b))
	out = append(append(append(out, entryMagic...), sum[:]...), b...)
	return out, nil
}

// decodeEntry parses an entry file's content; a checksum mismatch or a
// payload that does not parse is a DataLoss error.
func decodeEntry(b []byte) (*repb.ActionResult, error) {
	payload := b
	if rest, ok := bytes.CutPrefix(b, []byte(entryMagic)); ok {
		if len(rest) < sha256.Size {
			return nil, cache.Corruptf("entry is truncated")
		}
		payload = rest[sha256.Size:]
		if sum := sha256.Sum256(payload); !bytes.Equal(sum[:], rest[:sha256.Size]) {
			return nil, cache.Corruptf("entry checksum mismatch")
		}
	}
	ar := &repb.ActionResult{}
	if err := proto.Unmarshal(payload, ar); err != nil {
		return nil, cache.Corruptf("entry does not parse: %v", err)
	}
	return ar, nil
}

// readEntry reads and decodes an entry file without blocking on a FIFO
// or reading a device or an oversized file placed at its path. It returns
// the file's identity too (nil when it could not be opened), so that a
// corrupt entry is removed only while it is still the same file. Only
// content that is not an entry is a DataLoss error; a failure to read
// keeps its cause.
func readEntry(path string) (*repb.ActionResult, os.FileInfo, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fi, cache.Corruptf("not a regular file (%s)", fi.Mode().Type())
	}
	if fi.Size() > maxEntryBytes {
		return nil, fi, cache.Corruptf("%d bytes is larger than any entry", fi.Size())
	}
	b, err := io.ReadAll(io.LimitReader(f, maxEntryBytes+1))
	if err != nil {
		return nil, fi, err
	}
	ar, err := decodeEntry(b)
	return ar, fi, err
}
