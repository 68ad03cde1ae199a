package s3cache

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/minio/minio-go/v7"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// EntryObject is an action-cache entry found by ListEntries.
type EntryObject struct {
	// Key is the object key.
	Key string
	// Scope is "<group>/<instance-hash>", the partition the entry lives in.
	Scope string
	// Function is the digest function the entry is keyed under.
	Function digest.Function
	// Hash is the entry's action-cache key hash.
	Hash string
	// Size is the object's size in bytes.
	Size int64
	// LastModified is the bucket's modification time.
	LastModified time.Time
}

// BlobObject is a blob found by ListBlobs.
type BlobObject struct {
	// Key is the object key.
	Key string
	// Function and Digest name the blob (Digest's size is the content's).
	Function digest.Function
	Digest   *repb.Digest
	// StoredSize is the object's size: the bytes at rest (compressed or
	// raw).
	StoredSize int64
	// LastModified is the bucket's modification time.
	LastModified time.Time
}

var functionsByName = map[string]digest.Function{
	digest.FunctionName(digest.BLAKE3): digest.BLAKE3,
	digest.FunctionName(digest.SHA256): digest.SHA256,
}

// list streams the objects under the tier's prefix + sub to fn.
func (c *Cache) list(ctx context.Context, sub string, fn func(minio.ObjectInfo) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // stops the listing goroutine when fn fails
	prefix := c.prefix + sub
	for o := range c.client.ListObjects(ctx, c.opts.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if o.Err != nil {
			return c.errorf(o.Err, "listing %s", prefix)
		}
		if err := fn(o); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// ListEntries calls fn for every action-cache entry of every group and
// instance, in key order. Objects under the action-cache prefix that do
// not have an entry's form are skipped.
func (c *Cache) ListEntries(ctx context.Context, fn func(EntryObject) error) error {
	return c.list(ctx, "ac/", func(o minio.ObjectInfo) error {
		parts := strings.Split(strings.TrimPrefix(o.Key, c.prefix+"ac/"), "/")
		if len(parts) != 4 {
			return nil
		}
		f, ok := functionsByName[parts[2]]
		if !ok || digest.Validate(&repb.Digest{Hash: parts[3], SizeBytes: 1}) != nil {
			return nil
		}
		return fn(EntryObject{Key: o.Key, Scope: parts[0] + "/" + parts[1], Function: f, Hash: parts[3], Size: o.Size, LastModified: o.LastModified})
	})
}

// ListBlobs calls fn for every blob, in key order. Objects under the blob
// prefix that do not have a blob's form are skipped.
func (c *Cache) ListBlobs(ctx context.Context, fn func(BlobObject) error) error {
	return c.list(ctx, "cas/", func(o minio.ObjectInfo) error {
		fnName, name, ok := strings.Cut(strings.TrimPrefix(o.Key, c.prefix+"cas/"), "/")
		if !ok {
			return nil
		}
		f, ok := functionsByName[fnName]
		if !ok {
			return nil
		}
		hash, sizeStr, ok := strings.Cut(name, "-")
		size, err := strconv.ParseInt(sizeStr, 10, 64)
		if !ok || err != nil || strconv.FormatInt(size, 10) != sizeStr {
			return nil
		}
		d := &repb.Digest{Hash: hash, SizeBytes: size}
		if digest.Validate(d) != nil {
			return nil
		}
		return fn(BlobObject{Key: o.Key, Function: f, Digest: d, StoredSize: o.Size, LastModified: o.LastModified})
	})
}

// ObjectWritten is when the object at key was written or its age last
// refreshed (see Options.ClockFromMetadata), and whether it exists.
func (c *Cache) ObjectWritten(ctx context.Context, key string) (time.Time, bool, error) {
	info, err := c.client.StatObject(ctx, c.opts.Bucket, key, minio.StatObjectOptions{})
	if code(err) == codes.NotFound {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, c.errorf(err, "looking up %s", key)
	}
	m, _ := parseMeta(info.Metadata)
	return c.written(info, m), true, nil
}

// written is the time an object's age counts from.
func (c *Cache) written(info minio.ObjectInfo, m objectMeta) time.Time {
	return c.opts.Now().Add(-age(info, m, c.opts.Now(), c.opts.ClockFromMetadata))
}

// ClockFromMetadata reports Options.ClockFromMetadata: when set, a
// listing's LastModified does not bound an object's age.
func (c *Cache) ClockFromMetadata() bool { return c.opts.ClockFromMetadata }

// ReadEntryObject reads the action-cache entry stored at key (as listed by
// ListEntries) and says when it was written. A missing entry is NotFound,
// an undecodable one Internal.
func (c *Cache) ReadEntryObject(ctx context.Context, key string) (*repb.ActionResult, time.Time, error) {
	obj, err := c.client.GetObject(ctx, c.opts.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return nil, time.Time{}, c.errorf(err, "reading action-cache entry at %s", key)
	}
	defer obj.Close()
	info, err := obj.Stat()
	if err != nil {
		return nil, time.Time{}, c.errorf(err, "reading action-cache entry at %s", key)
	}
	b, err := io.ReadAll(io.LimitReader(obj, maxActionResultSize+1))
	if err != nil {
		return nil, time.Time{}, c.errorf(err, "reading action-cache entry at %s", key)
	}
	if len(b) > maxActionResultSize {
		return nil, time.Time{}, cache.Corruptf("s3 cache: action-cache entry at %s (bucket %s) is larger than %d bytes", key, c.opts.Bucket, maxActionResultSize)
	}
	ar := &repb.ActionResult{}
	if err := proto.Unmarshal(b, ar); err != nil {
		return nil, time.Time{}, cache.Corruptf("s3 cache: corrupt action-cache entry at %s (bucket %s): %v", key, c.opts.Bucket, err)
	}
	m, _ := parseMeta(info.Metadata)
	return ar, c.written(info, m), nil
}

// DeleteObjects removes the objects at keys (listed by ListEntries or
// ListBlobs) in batched requests of up to 1000 keys. An object already
// gone is not an error. It returns how many keys were removed (or already
// gone) and the first failure, naming the key.
func (c *Cache) DeleteObjects(ctx context.Context, keys []string) (int, error) {
	ch := make(chan minio.ObjectInfo, len(keys))
	for _, k := range keys {
		if !strings.HasPrefix(k, c.prefix+"cas/") && !strings.HasPrefix(k, c.prefix+"ac/") {
			return 0, status.Errorf(codes.InvalidArgument, "s3 cache: deleting %s: not an object of the tier under %q", k, c.prefix)
		}
		ch <- minio.ObjectInfo{Key: k}
	}
	close(ch)
	var first error
	failed := 0
	for e := range c.client.RemoveObjects(ctx, c.opts.Bucket, ch, minio.RemoveObjectsOptions{}) {
		if code(e.Err) == codes.NotFound {
			continue
		}
		failed++
		if first == nil {
			first = c.errorf(e.Err, "deleting %s", e.ObjectName)
		}
	}
	if first == nil {
		first = ctx.Err()
	}
	if first != nil && failed > 0 {
		first = fmt.Errorf("%d of %d deletions failed: %w", failed, len(keys), first)
	}
	return len(keys) - failed, first
}
