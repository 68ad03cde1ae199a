package gc

import (
	"context"
	"io"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/digest"
)

// Entry is an action-cache entry of a Store.
type Entry struct {
	// ID names the entry to the store (an object key).
	ID string
	// Scope is the partition (group, instance) the entry lives in.
	Scope string
	// Hash is the entry's action-cache key hash.
	Hash string
	// Size is the bytes the entry occupies.
	Size int64
}

// Blob is a stored blob of a Store.
type Blob struct {
	// ID names the blob to the store (an object key).
	ID       string
	Function digest.Function
	// Digest names the content; its size is the logical size.
	Digest *repb.Digest
	// StoredSize is the bytes at rest (compressed or raw).
	StoredSize int64
	// Modified is a time the blob was last written or refreshed at or
	// before; zero when the listing does not bound it (Written tells).
	Modified time.Time
}

// Store is what the collector and the inventory need of a tier without
// eviction of its own. s3cache implements it through S3; a server can
// implement it over its own backend to list and collect remotely.
type Store interface {
	// ListEntries calls fn for every action-cache entry, streamed.
	ListEntries(ctx context.Context, fn func(Entry) error) error
	// ReadEntry reads an entry and says when it was written. A missing
	// entry is NotFound, an undecodable one Internal.
	ReadEntry(ctx context.Context, e Entry) (*repb.ActionResult, time.Time, error)
	// ListBlobs calls fn for every blob, streamed.
	ListBlobs(ctx context.Context, fn func(Blob) error) error
	// ReadBlob opens a blob, verified against d. A missing blob is
	// NotFound, a corrupt one Internal.
	ReadBlob(ctx context.Context, fn digest.Function, d *repb.Digest) (io.ReadCloser, error)
	// Written says when the blob was last written or had its age
	// refreshed (a save that found it present), as of now, and whether it
	// still exists.
	Written(ctx context.Context, b Blob) (time.Time, bool, error)
	// Delete removes entries or blobs by ID; one already gone is not an
	// error. It returns how many were removed (or already gone).
	Delete(ctx context.Context, ids []string) (int, error)
}

// S3 is the Store of an S3 tier.
func S3(c *s3cache.Cache) Store { return s3Store{c} }

type s3Store struct{ c *s3cache.Cache }

func (s s3Store) ListEntries(ctx context.Context, fn func(Entry) error) error {
	return s.c.ListEntries(ctx, func(o s3cache.EntryObject) error {
		return fn(Entry{ID: o.Key, Scope: o.Scope, Hash: o.Hash, Size: o.Size})
	})
}

func (s s3Store) ReadEntry(ctx context.Context, e Entry) (*repb.ActionResult, time.Time, error) {
	return s.c.ReadEntryObject(ctx, e.ID)
}

func (s s3Store) ListBlobs(ctx context.Context, fn func(Blob) error) error {
	bounded := !s.c.ClockFromMetadata()
	return s.c.ListBlobs(ctx, func(o s3cache.BlobObject) error {
		b := Blob{ID: o.Key, Function: o.Function, Digest: o.Digest, StoredSize: o.StoredSize}
		if bounded {
			b.Modified = o.LastModified
		}
		return fn(b)
	})
}

func (s s3Store) ReadBlob(ctx context.Context, fn digest.Function, d *repb.Digest) (io.ReadCloser, error) {
	return s.c.Read(ctx, cache.Namespace{Function: fn}, d)
}

func (s s3Store) Written(ctx context.Context, b Blob) (time.Time, bool, error) {
	return s.c.ObjectWritten(ctx, b.ID)
}

func (s s3Store) Delete(ctx context.Context, ids []string) (int, error) {
	return s.c.DeleteObjects(ctx, ids)
}
