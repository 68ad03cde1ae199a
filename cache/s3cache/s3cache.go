// Package s3cache is snaploader's S3 tier: a cache.Cache over an
// S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Cloudflare R2).
//
// # Layout
//
// Every object lives under the configured prefix (which may be empty):
//
//	<prefix>/cas/<fn>/<hash>-<size>                  a blob
//	<prefix>/ac/<group>/<instance-hash>/<fn>/<hash>  an action-cache entry
//
// <fn> is the digest function ("blake3" or "sha256"). <group> is the
// namespace group itself when it is a short, lower-case token
// ([a-z0-9][a-z0-9_-]{0,62}), "_" for the empty group, and otherwise
// "h." followed by the SHA-256 hex of the group, so hostile names ("../x",
// "a/b", control characters, very long strings) can never escape the
// prefix or collide with another group. <instance-hash> is always the
// SHA-256 hex of the instance name. Blobs are shared by all groups and
// instances (they are content-addressed); action-cache entries are
// partitioned by both.
//
// The tier keeps no state besides the bucket: any number of *Cache values,
// in one process or many, over the same bucket and prefix see the same
// data.
//
// # Integrity
//
// Write checks the content against the digest before the object becomes
// visible, and stores nothing on a mismatch (InvalidArgument). Blobs up to
// Options.SmallBlobLimit are buffered, hashed and then put in one request;
// larger ones are sent as a multipart upload while being hashed and the
// upload is completed only when the content matched (else it is aborted;
// an interrupted process can leave an incomplete upload behind, which a
// bucket lifecycle rule AbortIncompleteMultipartUpload cleans up). A blob
// already present is not uploaded again.
//
// Read does not trust the bucket: it passes the object through a digest
// verifier, and a corrupt or truncated object ends in a DataLoss error
// naming the digest instead of io.EOF, so wrong bytes are never passed off
// as a complete blob. An object up to 64 MiB is fetched in parts of
// Options.ReadPartSize requested at once (one round trip, each connection
// carrying a part), and a request slower than nearly all recent ones is
// sent again alongside, the first answer winning (hedge.go).
//
// # Range reads
//
// Compressed blobs are stored in the seekable layout (independent zstd
// frames of Options.FrameSize content bytes behind a seek index, see
// zstdio.EncodeSeekable), so that ReadRange fetches only the frames a range
// needs, in one ranged GET once the object's index is known, and in one
// round of parallel ranged GETs of the object's prefix the first time
// (rangeread.go). Range reads are not verified by the tier: the caller
// checks them against the blob's outboard. Objects written before (one
// zstd stream) still read, whole and by range. The object that failed is then deleted, so that
// FindMissing reports the blob missing and the next Write stores it again
// (a Write of a blob present uploads nothing).
//
// Action-cache entries are stored as serialized ActionResult messages and
// returned as found: the tier does not check that the blobs an entry
// refers to are still present. The client does that (the loader calls
// FindMissing on every blob a manifest references before it trusts it).
//
// # Errors
//
// Errors carry gRPC status codes and name the bucket, key and digest they
// concern: a missing object is NotFound, a refused connection, a timeout or
// a 5xx answer is Unavailable, refused credentials are PermissionDenied,
// a malformed digest or content not matching its digest is
// InvalidArgument, and a stored object failing verification is DataLoss.
package s3cache

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/s3utils"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/internal/zstdio"
)

const (
	// DefaultPartSize is the multipart part size when Options.PartSize is 0.
	DefaultPartSize = 16 << 20
	// MinPartSize is the smallest part size S3 accepts (except for the
	// last part of an upload).
	MinPartSize = 5 << 20
	// DefaultParallelism bounds concurrent requests when
	// Options.Parallelism is 0.
	DefaultParallelism = 32
	// DefaultSmallBlobLimit is Options.SmallBlobLimit when it is 0.
	DefaultSmallBlobLimit = 16 << 20
	// maxParts is S3's limit on the parts of one multipart upload.
	maxParts = 10000
	// maxUploadStreams bounds the parts of one large blob in flight, and
	// so the memory one Write holds (maxUploadStreams × part size).
	maxUploadStreams = 4
	// maxActionResultSize bounds an action-cache entry read back.
	maxActionResultSize = 64 << 20
	// DefaultReadPartSize is Options.ReadPartSize when it is 0: about
	// 10 ms of one connection at 100 MB/s, so that a 4 MB chunk comes in
	// four requests at once.
	DefaultReadPartSize = 1 << 20
)

// Options configures a Cache.
type Options struct {
	// Endpoint is the server's HOST:PORT (e.g. "s3.amazonaws.com",
	// "127.0.0.1:9000").
	Endpoint string
	// Bucket holds the cache.
	Bucket string
	// Prefix is prepended to every key ("team/cache" gives keys
	// "team/cache/cas/..."); empty for the bucket's root.
	Prefix string
	// Region is the bucket's region; empty to let the client discover it.
	Region string
	// AccessKey, SecretKey and SessionToken are static credentials; when
	// empty, credentials come from the standard chain (see
	// credentials.go): the environment, the shared credentials file, a web
	// identity token, container or instance credentials.
	AccessKey, SecretKey, SessionToken string
	// Profile is the shared credentials file's profile (default
	// $AWS_PROFILE, else "default").
	Profile string
	// Secure selects HTTPS.
	Secure bool
	// PartSize is the multipart part size in bytes; 0 means
	// DefaultPartSize, else at least MinPartSize.
	PartSize uint64
	// Parallelism bounds concurrent requests of one FindMissing call; 0
	// means DefaultParallelism.
	Parallelism int
	// SmallBlobLimit is the size up to which Write buffers a blob and puts
	// it in one request; larger blobs go through a verified multipart
	// upload. 0 means DefaultSmallBlobLimit.
	SmallBlobLimit int64
	// CreateBucket makes New create the bucket when it does not exist
	// (otherwise a missing bucket is a NotFound error).
	CreateBucket bool
	// CheckInBackground makes New return before the bucket's existence is
	// checked when the region is known (with none, every request needs
	// the bucket's region first, and that request is the check): the
	// check then goes out with the first requests instead of a round trip
	// before them, and a call that fails reports the check's failure (a
	// missing bucket, refused credentials) when it failed.
	CheckInBackground bool
	// MaxRetries is how many times a failed request is tried; 0 means
	// the client's default (10), 1 disables retries.
	MaxRetries int
	// DisableCompression stores every blob raw. By default blobs up to
	// SmallBlobLimit are stored zstd-compressed when that shrinks them.
	DisableCompression bool
	// RefreshAfter is the age past which FindMissing (and Write of a blob
	// already present) refreshes a present blob's age, so that a garbage
	// collection treats it as just written; 0 means DefaultRefreshAfter.
	// A collection's grace period must exceed RefreshAfter plus the
	// longest save.
	RefreshAfter time.Duration
	// ClockFromMetadata takes an object's age from the write time the tier
	// records in its metadata alone, when there is one, instead of from
	// the later of that and the object's LastModified: for buckets whose
	// LastModified was reset by a copy or replication (and for tests that
	// set ages through Now).
	ClockFromMetadata bool
	// Now is the clock recorded in objects and used to judge their age;
	// nil means time.Now.
	Now func() time.Time
	// FrameSize is the uncompressed size of the independently decodable
	// zstd frames a compressed blob is stored in (the seekable layout, see
	// README "On-disk and cache formats"); 0 means
	// zstdio.DefaultFrameSize.
	FrameSize int
	// ReadPartSize is the size of the parts a whole object is fetched in,
	// concurrently; 0 means DefaultReadPartSize.
	ReadPartSize int64
	// HedgeAfter is how long a ranged GET runs before the same request is
	// sent again alongside (the first answer is used, the other
	// cancelled); 0 adapts it to the 95th percentile of recent requests,
	// negative turns hedging off.
	HedgeAfter time.Duration
}

// DefaultRefreshAfter is Options.RefreshAfter when it is 0: a quarter of
// the garbage collector's default grace period.
const DefaultRefreshAfter = 15 * time.Minute

// Cache is a cache.Cache over an S3 bucket. It is safe for concurrent use.
type Cache struct {
	client *minio.Client
	core   minio.Core
	opts   Options
	prefix string // "" or ending in "/"
	creds  *chain // where the credentials came from
	// check is the bucket check New left running (CheckInBackground).
	check *bucketCheck

	frameSize int
	layouts   *layouts // what range reads learned of objects
	hedge     *hedger

	rangeGets, rangeBytes  atomic.Int64 // ranged GETs answered, bytes received
	coldRanges, warmRanges atomic.Int64 // range reads without and with a known layout
}

// Stats are a Cache's counters of reads.
type Stats struct {
	// Gets and Bytes count the ranged GETs answered and the bytes they
	// brought.
	Gets, Bytes int64
	// ColdRanges and WarmRanges count range reads of objects whose layout
	// was not known yet, and known.
	ColdRanges, WarmRanges int64
	// Hedges counts requests sent again because the first was slow, and
	// HedgeWins those the second answered first.
	Hedges, HedgeWins int64
}

// Stats returns the counters so far.
func (c *Cache) Stats() Stats {
	return Stats{
		Gets: c.rangeGets.Load(), Bytes: c.rangeBytes.Load(),
		ColdRanges: c.coldRanges.Load(), WarmRanges: c.warmRanges.Load(),
		Hedges: c.hedge.hedges.Load(), HedgeWins: c.hedge.wins.Load(),
	}
}

// bucketCheck is a check of the bucket's existence running in the
// background.
type bucketCheck struct {
	done chan struct{}
	err  error // set before done closes
}

// failed waits for the check and returns its error, nil when the bucket
// exists or no check runs.
func (b *bucketCheck) failed() error {
	if b == nil {
		return nil
	}
	<-b.done
	return b.err
}

var _ cache.Cache = (*Cache)(nil)

// New connects to the bucket opts names and checks that it exists,
// creating it when opts.CreateBucket is set.
func New(ctx context.Context, opts Options) (*Cache, error) {
	if opts.Endpoint == "" {
		return nil, status.Errorf(codes.InvalidArgument, "s3 cache: no endpoint")
	}
	if err := s3utils.CheckValidBucketNameStrict(opts.Bucket); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "s3 cache: bucket %q: %v", opts.Bucket, err)
	}
	prefix, err := cleanPrefix(opts.Prefix)
	if err != nil {
		return nil, err
	}
	if opts.PartSize == 0 {
		opts.PartSize = DefaultPartSize
	}
	if opts.PartSize < MinPartSize {
		return nil, status.Errorf(codes.InvalidArgument, "s3 cache: part size %d is below S3's minimum %d", opts.PartSize, MinPartSize)
	}
	if opts.Parallelism <= 0 {
		opts.Parallelism = DefaultParallelism
	}
	if opts.SmallBlobLimit <= 0 {
		opts.SmallBlobLimit = DefaultSmallBlobLimit
	}
	if opts.RefreshAfter <= 0 {
		opts.RefreshAfter = DefaultRefreshAfter
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.FrameSize == 0 {
		opts.FrameSize = zstdio.DefaultFrameSize
	}
	if opts.FrameSize < 1<<10 || opts.FrameSize > zstdio.MaxFrameSize {
		return nil, status.Errorf(codes.InvalidArgument, "s3 cache: frame size %d is outside [1 KiB, %d]", opts.FrameSize, zstdio.MaxFrameSize)
	}
	if opts.ReadPartSize <= 0 {
		opts.ReadPartSize = DefaultReadPartSize
	}
	creds := newChain(opts)
	tr, err := minio.DefaultTransport(opts.Secure)
	if err != nil {
		return nil, fmt.Errorf("s3 cache: transport for %s: %w", opts.Endpoint, err)
	}
	tr.MaxIdleConnsPerHost = max(tr.MaxIdleConnsPerHost, opts.Parallelism+maxUploadStreams)
	client, err := minio.New(opts.Endpoint, &minio.Options{
		Creds:      credentials.New(creds),
		Secure:     opts.Secure,
		Region:     opts.Region,
		Transport:  tr,
		MaxRetries: opts.MaxRetries,
	})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "s3 cache: client for %s: %v", opts.Endpoint, err)
	}
	c := &Cache{client: client, core: minio.Core{Client: client}, opts: opts, prefix: prefix, creds: creds,
		frameSize: opts.FrameSize, layouts: newLayouts(layoutCacheSize), hedge: newHedger(opts.HedgeAfter)}
	if opts.CheckInBackground && opts.Region != "" && !opts.CreateBucket {
		c.check = &bucketCheck{done: make(chan struct{})}
		go func() {
			defer close(c.check.done)
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			c.check.err = c.checkBucket(cctx)
		}()
		return c, nil
	}
	err = c.checkBucket(ctx)
	missing := errkind.Is(err, errkind.NotFound)
	if err != nil && !(missing && opts.CreateBucket) {
		return nil, err
	}
	if missing {
		err := client.MakeBucket(ctx, opts.Bucket, minio.MakeBucketOptions{Region: opts.Region})
		if err != nil {
			if code := minio.ToErrorResponse(err).Code; code != "BucketAlreadyOwnedByYou" && code != "BucketAlreadyExists" {
				return nil, c.errorf(err, "creating bucket %s at %s", opts.Bucket, opts.Endpoint)
			}
		}
	}
	return c, nil
}

// String describes the cache for logs: s3://BUCKET/PREFIX at ENDPOINT.
func (c *Cache) String() string {
	return fmt.Sprintf("s3://%s/%s at %s", c.opts.Bucket, strings.TrimSuffix(c.prefix, "/"), c.opts.Endpoint)
}

// checkBucket returns nil when the bucket exists, else why not: NotFound,
// or the error of the check.
func (c *Cache) checkBucket(ctx context.Context) error {
	exists, err := c.bucketExists(ctx)
	if err != nil {
		return c.clientErrorf(err, "checking bucket %s at %s", c.opts.Bucket, c.opts.Endpoint)
	}
	if !exists {
		return status.Errorf(codes.NotFound, "s3 cache: bucket %s does not exist at %s", c.opts.Bucket, c.opts.Endpoint)
	}
	return nil
}

// bucketExists checks that the bucket exists. Without a configured region
// every request first needs the bucket's, which the client asks for once:
// that request answers the check too (NoSuchBucket), so opening the tier
// costs one round trip, not two.
func (c *Cache) bucketExists(ctx context.Context) (bool, error) {
	if c.opts.Region != "" || c.opts.CreateBucket {
		return c.client.BucketExists(ctx, c.opts.Bucket)
	}
	_, err := c.client.GetBucketLocation(ctx, c.opts.Bucket)
	switch {
	case err == nil:
		return true, nil
	case minio.ToErrorResponse(err).Code == minio.NoSuchBucket:
		return false, nil
	}
	return false, err
}
