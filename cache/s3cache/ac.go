package s3cache

import (
	"bytes"
	"context"
	"io"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/minio/minio-go/v7"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
)

// GetActionResult returns the action-cache entry under key in ns's group
// and instance; NotFound when absent. The blobs it refers to may have been
// removed since: callers check them with FindMissing.
func (c *Cache) GetActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest) (*repb.ActionResult, error) {
	fn, err := checkDigest(ns, key, "reading action-cache entry")
	if err != nil {
		return nil, err
	}
	k := c.acKey(ns, fn, key)
	obj, err := c.client.GetObject(ctx, c.opts.Bucket, k, minio.GetObjectOptions{})
	if err != nil {
		return nil, c.errorf(err, "reading action-cache entry %s (group %q, instance %q) at %s", digest.String(key), ns.Group, ns.Instance, k)
	}
	defer obj.Close()
	b, err := io.ReadAll(io.LimitReader(obj, maxActionResultSize+1))
	if err != nil {
		return nil, c.errorf(err, "reading action-cache entry %s (group %q, instance %q) at %s", digest.String(key), ns.Group, ns.Instance, k)
	}
	if len(b) > maxActionResultSize {
		return nil, cache.Corruptf("s3 cache: action-cache entry %s at %s (bucket %s) is larger than %d bytes",
			digest.String(key), k, c.opts.Bucket, maxActionResultSize)
	}
	ar := &repb.ActionResult{}
	if err := proto.Unmarshal(b, ar); err != nil {
		return nil, cache.Corruptf("s3 cache: corrupt action-cache entry %s at %s (bucket %s): %v",
			digest.String(key), k, c.opts.Bucket, err)
	}
	return ar, nil
}

// UpdateActionResult stores ar under key in ns's group and instance,
// replacing any entry.
func (c *Cache) UpdateActionResult(ctx context.Context, ns cache.Namespace, key *repb.Digest, ar *repb.ActionResult) error {
	fn, err := checkDigest(ns, key, "writing action-cache entry")
	if err != nil {
		return err
	}
	if ar == nil {
		return status.Errorf(codes.InvalidArgument, "s3 cache: writing action-cache entry %s: no action result", digest.String(key))
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(ar)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "s3 cache: encoding action-cache entry %s: %v", digest.String(key), err)
	}
	if len(b) > maxActionResultSize {
		return status.Errorf(codes.InvalidArgument, "s3 cache: action-cache entry %s is %d bytes, more than %d",
			digest.String(key), len(b), maxActionResultSize)
	}
	k := c.acKey(ns, fn, key)
	_, err = c.client.PutObject(ctx, c.opts.Bucket, k, bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{
		ContentType:  "application/x-protobuf",
		UserMetadata: userMetadata(false, c.opts.Now()),
	})
	if err != nil {
		return c.errorf(err, "writing action-cache entry %s (group %q, instance %q) at %s", digest.String(key), ns.Group, ns.Instance, k)
	}
	return nil
}
