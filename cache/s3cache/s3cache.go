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
// Read does not trust the bucket: it streams the object through a digest
// verifier, and a corrupt or truncated object ends in a DataLoss error
// naming the digest instead of io.EOF, so wrong bytes are never passed off
// as a complete blob. The object that failed is then deleted, so that
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
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"strings"
	"syscall"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/s3utils"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
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
	// AccessKey, SecretKey and SessionToken are the credentials; all empty
	// for anonymous access.
	AccessKey, SecretKey, SessionToken string
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
	tr, err := minio.DefaultTransport(opts.Secure)
	if err != nil {
		return nil, fmt.Errorf("s3 cache: transport for %s: %w", opts.Endpoint, err)
	}
	tr.MaxIdleConnsPerHost = max(tr.MaxIdleConnsPerHost, opts.Parallelism+maxUploadStreams)
	client, err := minio.New(opts.Endpoint, &minio.Options{
		Creds:      credentials.NewStaticV4(opts.AccessKey, opts.SecretKey, opts.SessionToken),
		Secure:     opts.Secure,
		Region:     opts.Region,
		Transport:  tr,
		MaxRetries: opts.MaxRetries,
	})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "s3 cache: client for %s: %v", opts.Endpoint, err)
	}
	c := &Cache{client: client, core: minio.Core{Client: client}, opts: opts, prefix: prefix}
	exists, err := client.BucketExists(ctx, opts.Bucket)
	if err != nil {
		return nil, c.errorf(err, "checking bucket %s at %s", opts.Bucket, opts.Endpoint)
	}
	if !exists {
		if !opts.CreateBucket {
			return nil, status.Errorf(codes.NotFound, "s3 cache: bucket %s does not exist at %s", opts.Bucket, opts.Endpoint)
		}
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

// function returns ns's digest function, BLAKE3 when unset.
func function(ns cache.Namespace) (digest.Function, error) {
	switch ns.Function {
	case repb.DigestFunction_UNKNOWN:
		return digest.Default, nil
	case digest.BLAKE3, digest.SHA256:
		return ns.Function, nil
	}
	return 0, status.Errorf(codes.InvalidArgument, "s3 cache: unsupported digest function %v", ns.Function)
}

func checkDigest(ns cache.Namespace, d *repb.Digest, what string) (digest.Function, error) {
	fn, err := function(ns)
	if err != nil {
		return 0, err
	}
	if err := digest.Validate(d); err != nil {
		return 0, status.Errorf(codes.InvalidArgument, "s3 cache: %s: %v", what, err)
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

// code classifies an error from the S3 client.
func code(err error) codes.Code {
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown {
		return s.Code()
	}
	var er minio.ErrorResponse
	if errors.As(err, &er) {
		switch er.Code {
		case "NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound":
			return codes.NotFound
		case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
			"ExpiredToken", "InvalidToken", "AccountProblem":
			return codes.PermissionDenied
		case "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
			"XMinioServerNotInitialized", "XMinioReadQuorum", "XMinioWriteQuorum":
			return codes.Unavailable
		case "InvalidArgument", "InvalidBucketName", "KeyTooLongError", "InvalidDigest",
			"BadDigest", "EntityTooLarge", "EntityTooSmall", "InvalidPart", "InvalidPartOrder":
			return codes.InvalidArgument
		}
		switch {
		case er.StatusCode == 404:
			return codes.NotFound
		case er.StatusCode == 401 || er.StatusCode == 403:
			return codes.PermissionDenied
		case er.StatusCode == 408 || er.StatusCode == 429 || er.StatusCode >= 500:
			return codes.Unavailable
		}
		return codes.Unknown
	}
	switch {
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		// The server did not answer in time: as good as down.
		return codes.Unavailable
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.EPIPE), errors.Is(err, io.ErrUnexpectedEOF):
		return codes.Unavailable
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return codes.Unavailable
	}
	return codes.Unknown
}

// errorf wraps err from the S3 client with a status code and says what was
// being done: "s3 cache: <what> (bucket B): <err>".
func (c *Cache) errorf(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	return errkind.New(code(err), "s3 cache: %s (bucket %s): %w", what, c.opts.Bucket, err)
}

// maxCopySize is the largest object a single CopyObject request copies.
const maxCopySize = 5 << 30

// present reports whether the blob at key exists. A blob older than
// Options.RefreshAfter has its age refreshed first (a metadata-only copy
// onto itself, conditional on its ETag), so that a garbage collection
// running now or later treats it as just written; a blob that vanishes
// before the refresh (a collection deleted it) is reported absent, so the
// caller stores it again.
func (c *Cache) present(ctx context.Context, key string) (bool, error) {
	info, err := c.client.StatObject(ctx, c.opts.Bucket, key, minio.StatObjectOptions{})
	if code(err) == codes.NotFound {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	m, err := parseMeta(info.Metadata)
	if err != nil || age(info, m, c.opts.Now(), c.opts.ClockFromMetadata) <= c.opts.RefreshAfter || info.Size > maxCopySize {
		// An object of unknown encoding is present; reads report it.
		return true, nil
	}
	return c.refresh(ctx, key, info, m)
}

// refresh rewrites the metadata of the object at key with the current
// time; it reports whether the object still exists.
func (c *Cache) refresh(ctx context.Context, key string, info minio.ObjectInfo, m objectMeta) (bool, error) {
	_, err := c.client.CopyObject(ctx,
		minio.CopyDestOptions{Bucket: c.opts.Bucket, Object: key, ReplaceMetadata: true, UserMetadata: userMetadata(m.compressed, c.opts.Now())},
		minio.CopySrcOptions{Bucket: c.opts.Bucket, Object: key, MatchETag: info.ETag})
	switch {
	case err == nil:
		return true, nil
	case code(err) == codes.NotFound:
		return false, nil
	case minio.ToErrorResponse(err).Code == "PreconditionFailed":
		// Rewritten meanwhile (by a writer or another refresh): it is as
		// young as that write, if it still exists.
		_, err := c.client.StatObject(ctx, c.opts.Bucket, key, minio.StatObjectOptions{})
		if code(err) == codes.NotFound {
			return false, nil
		}
		return err == nil, err
	}
	return false, err
}

// FindMissing returns the digests in ds the bucket does not hold, each
// once, in the order of their first occurrence. It checks up to
// Options.Parallelism objects at a time. A blob reported present whose age
// is more than Options.RefreshAfter is refreshed first (see present), so
// that a save can name it in a manifest written up to a garbage
// collector's grace period later.
func (c *Cache) FindMissing(ctx context.Context, ns cache.Namespace, ds []*repb.Digest) ([]*repb.Digest, error) {
	type entry struct {
		d       *repb.Digest
		missing bool
	}
	var uniq []*entry
	seen := make(map[string]bool, len(ds))
	var fn digest.Function
	for _, d := range ds {
		f, err := checkDigest(ns, d, "finding missing blobs")
		if err != nil {
			return nil, err
		}
		fn = f
		k := digest.String(d)
		if seen[k] {
			continue
		}
		seen[k] = true
		uniq = append(uniq, &entry{d: d})
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(c.opts.Parallelism)
	for _, e := range uniq {
		if isEmpty(fn, e.d) {
			continue // the empty blob is always present
		}
		g.Go(func() error {
			key := c.casKey(fn, e.d)
			ok, err := c.present(gctx, key)
			if err != nil {
				return c.errorf(err, "looking up blob %s at %s", digest.String(e.d), key)
			}
			e.missing = !ok
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	var missing []*repb.Digest
	for _, e := range uniq {
		if e.missing {
			missing = append(missing, e.d)
		}
	}
	return missing, nil
}

// VerifiesReads tells cache.Verifying that Read already verifies.
func (c *Cache) VerifiesReads() {}

// Read opens the blob d for streaming. The stream is verified against d: a
// corrupt or truncated object ends in a DataLoss error instead of io.EOF,
// and is deleted. A blob stored compressed is decoded (with bounded
// memory) and its decoded bytes are verified. A missing blob is NotFound.
// ctx governs the whole stream.
func (c *Cache) Read(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, error) {
	fn, err := checkDigest(ns, d, "reading blob")
	if err != nil {
		return nil, err
	}
	if isEmpty(fn, d) {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	or, compressed, err := c.openBlob(ctx, fn, d)
	if err != nil {
		return nil, err
	}
	var src io.ReadCloser = or
	if compressed {
		dec, err := newBoundedDecoder(or, d, or.key)
		if err != nil {
			or.Close()
			return nil, err
		}
		src = &decodedReader{boundedDecoder: dec, obj: or}
	}
	// The bucket is not trusted: the stream is checked against d.
	rc, err := cache.NewVerifyingReader(src, fn, d)
	if err != nil {
		src.Close()
		return nil, err
	}
	return &dropCorrupt{ReadCloser: rc, c: c, ctx: ctx, key: or.key}, nil
}

// ReadCompressed opens the blob d as it is stored (cache.CompressedReader):
// when compressed is true the stream is the stored zstd frames, which
// decode to d's content, and is not verified here (the receiver decodes
// and verifies, or the caller wraps it in cache.NewZstdVerifyingReader);
// otherwise it is the raw content, verified as by Read.
func (c *Cache) ReadCompressed(ctx context.Context, ns cache.Namespace, d *repb.Digest) (io.ReadCloser, bool, error) {
	fn, err := checkDigest(ns, d, "reading blob")
	if err != nil {
		return nil, false, err
	}
	if isEmpty(fn, d) {
		return io.NopCloser(bytes.NewReader(nil)), false, nil
	}
	or, compressed, err := c.openBlob(ctx, fn, d)
	if err != nil {
		return nil, false, err
	}
	if compressed {
		return or, true, nil
	}
	rc, err := cache.NewVerifyingReader(or, fn, d)
	if err != nil {
		or.Close()
		return nil, false, err
	}
	return &dropCorrupt{ReadCloser: rc, c: c, ctx: ctx, key: or.key}, false, nil
}

// openBlob opens the object of blob d and says whether it is stored
// compressed. A raw object must have d's size.
func (c *Cache) openBlob(ctx context.Context, fn digest.Function, d *repb.Digest) (*objectReader, bool, error) {
	key := c.casKey(fn, d)
	obj, err := c.client.GetObject(ctx, c.opts.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return nil, false, c.errorf(err, "reading blob %s at %s", digest.String(d), key)
	}
	info, err := obj.Stat()
	if err != nil {
		obj.Close()
		return nil, false, c.errorf(err, "reading blob %s at %s", digest.String(d), key)
	}
	m, err := parseMeta(info.Metadata)
	if err != nil {
		obj.Close()
		c.drop(ctx, key)
		return nil, false, cache.Corruptf("s3 cache: blob %s at %s (bucket %s): %v (deleted)", digest.String(d), key, c.opts.Bucket, err)
	}
	if !m.compressed && info.Size != d.SizeBytes {
		obj.Close()
		c.drop(ctx, key)
		return nil, false, cache.Corruptf("s3 cache: corrupt blob %s at %s (bucket %s): object has %d bytes (deleted)",
			digest.String(d), key, c.opts.Bucket, info.Size)
	}
	return &objectReader{c: c, obj: obj, d: d, key: key}, m.compressed, nil
}

// drop deletes the object of a blob that failed verification, so that it
// is reported missing and stored again by the next Write; a failure to
// delete (a read-only key) leaves it for the next reader to find corrupt.
func (c *Cache) drop(ctx context.Context, key string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	c.client.RemoveObject(ctx, c.opts.Bucket, key, minio.RemoveObjectOptions{})
}

// dropCorrupt is a verified blob stream that deletes the blob's object
// when the stream fails verification (see drop).
type dropCorrupt struct {
	io.ReadCloser
	c       *Cache
	ctx     context.Context
	key     string
	dropped bool
}

func (r *dropCorrupt) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	if cache.IsCorrupt(err) && !r.dropped {
		r.dropped = true
		r.c.drop(r.ctx, r.key)
	}
	return n, err
}

// decodedReader is a compressed object's decoded stream.
type decodedReader struct {
	*boundedDecoder
	obj io.Closer
}

func (r *decodedReader) Close() error {
	r.release()
	return r.obj.Close()
}

// objectReader streams an object, naming the blob, key and offset in any
// transport error.
type objectReader struct {
	c   *Cache
	obj *minio.Object
	d   *repb.Digest
	key string
	n   int64
}

func (r *objectReader) Read(p []byte) (int, error) {
	n, err := r.obj.Read(p)
	r.n += int64(n)
	if err != nil && !errors.Is(err, io.EOF) {
		err = r.c.errorf(err, "reading blob %s at %s at offset %d", digest.String(r.d), r.key, r.n)
	}
	return n, err
}

func (r *objectReader) Close() error { return r.obj.Close() }

// Write stores the blob d read from r. r must yield exactly the content d
// names, else the error is InvalidArgument and nothing is stored. When the
// blob is already present Write returns nil without reading r.
func (c *Cache) Write(ctx context.Context, ns cache.Namespace, d *repb.Digest, r io.Reader) error {
	fn, err := checkDigest(ns, d, "writing blob")
	if err != nil {
		return err
	}
	if isEmpty(fn, d) {
		return c.checkEnd(r, d, 0)
	}
	key := c.casKey(fn, d)
	ok, err := c.present(ctx, key)
	if err != nil {
		return c.errorf(err, "looking up blob %s at %s", digest.String(d), key)
	}
	if ok {
		return nil
	}
	if d.SizeBytes <= c.opts.SmallBlobLimit {
		return c.writeSmall(ctx, fn, d, key, r)
	}
	return c.writeMultipart(ctx, fn, d, key, r)
}

func mismatchf(d *repb.Digest, format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, "s3 cache: writing blob %s: %s", digest.String(d), fmt.Sprintf(format, args...))
}

// fill reads len(buf) bytes of the content of d from r, which is then at
// offset off of the blob.
func fill(r io.Reader, buf []byte, d *repb.Digest, off int64) error {
	n, err := io.ReadFull(r, buf)
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return mismatchf(d, "content ends after %d bytes", off+int64(n))
	case err != nil:
		return fmt.Errorf("s3 cache: reading content of blob %s at offset %d: %w", digest.String(d), off+int64(n), err)
	}
	return nil
}

// checkEnd checks that r has nothing after the size bytes already read.
func (c *Cache) checkEnd(r io.Reader, d *repb.Digest, size int64) error {
	var one [1]byte
	n, err := io.ReadFull(r, one[:])
	switch {
	case n > 0:
		return mismatchf(d, "content is longer than %d bytes", size)
	case errors.Is(err, io.EOF):
		return nil
	}
	return fmt.Errorf("s3 cache: reading content of blob %s at offset %d: %w", digest.String(d), size, err)
}

func (c *Cache) writeSmall(ctx context.Context, fn digest.Function, d *repb.Digest, key string, r io.Reader) error {
	buf := make([]byte, d.SizeBytes)
	if err := fill(r, buf, d, 0); err != nil {
		return err
	}
	if err := c.checkEnd(r, d, d.SizeBytes); err != nil {
		return err
	}
	if got := digest.Compute(fn, buf); got.Hash != d.Hash {
		return mismatchf(d, "content hashes to %s", got.Hash)
	}
	var z []byte
	if !c.opts.DisableCompression {
		z = compress(buf)
	}
	return c.putBlob(ctx, d, key, buf, z)
}

// putBlob stores a verified blob: its zstd form z when there is one, else
// its raw content raw.
func (c *Cache) putBlob(ctx context.Context, d *repb.Digest, key string, raw, z []byte) error {
	body := raw
	if z != nil {
		body = z
	}
	_, err := c.client.PutObject(ctx, c.opts.Bucket, key, bytes.NewReader(body), int64(len(body)), minio.PutObjectOptions{
		ContentType:  "application/octet-stream",
		PartSize:     c.opts.PartSize,
		UserMetadata: userMetadata(z != nil, c.opts.Now()),
	})
	if err != nil {
		return c.errorf(err, "writing blob %s at %s", digest.String(d), key)
	}
	return nil
}

// writeMultipart uploads a large blob in parts while hashing it and
// completes the upload (making the object visible) only when the content
// matched d; otherwise it aborts the upload.
func (c *Cache) writeMultipart(ctx context.Context, fn digest.Function, d *repb.Digest, key string, r io.Reader) (err error) {
	v, err := digest.NewVerifier(fn, d)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "s3 cache: writing blob %s: %v", digest.String(d), err)
	}
	partSize := max(int64(c.opts.PartSize), (d.SizeBytes+maxParts-1)/maxParts)
	nParts := int((d.SizeBytes + partSize - 1) / partSize)
	uploadID, err := c.core.NewMultipartUpload(ctx, c.opts.Bucket, key, minio.PutObjectOptions{
		ContentType:  "application/octet-stream",
		UserMetadata: userMetadata(false, c.opts.Now()),
	})
	if err != nil {
		return c.errorf(err, "starting upload of blob %s at %s", digest.String(d), key)
	}
	completed := false
	defer func() {
		if completed {
			return
		}
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if aerr := c.core.AbortMultipartUpload(actx, c.opts.Bucket, key, uploadID); aerr != nil && code(aerr) != codes.NotFound {
			err = errors.Join(err, c.errorf(aerr, "aborting upload %s of blob %s at %s", uploadID, digest.String(d), key))
		}
	}()

	parts := make([]minio.CompletePart, nParts)
	streams := min(maxUploadStreams, nParts)
	bufs := make(chan []byte, streams)
	for range streams {
		bufs <- nil // allocated on first use
	}
	g, gctx := errgroup.WithContext(ctx)
	var readErr error
	for i := range nParts {
		off := int64(i) * partSize
		n := min(partSize, d.SizeBytes-off)
		var buf []byte
		select {
		case buf = <-bufs:
		case <-gctx.Done():
		}
		if gctx.Err() != nil {
			break
		}
		if int64(cap(buf)) < n {
			buf = make([]byte, partSize)
		}
		buf = buf[:n]
		if readErr = fill(r, buf, d, off); readErr != nil {
			break
		}
		v.Write(buf)
		g.Go(func() error {
			defer func() { bufs <- buf }()
			p, err := c.core.PutObjectPart(gctx, c.opts.Bucket, key, uploadID, i+1, bytes.NewReader(buf), n, minio.PutObjectPartOptions{})
			if err != nil {
				return c.errorf(err, "uploading blob %s at %s: part %d at offset %d", digest.String(d), key, i+1, off)
			}
			parts[i] = minio.CompletePart{
				PartNumber: i + 1, ETag: p.ETag,
				ChecksumCRC32: p.ChecksumCRC32, ChecksumCRC32C: p.ChecksumCRC32C,
				ChecksumSHA1: p.ChecksumSHA1, ChecksumSHA256: p.ChecksumSHA256,
				ChecksumCRC64NVME: p.ChecksumCRC64NVME,
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if readErr != nil {
		return readErr
	}
	if err := ctx.Err(); err != nil {
		return c.errorf(err, "uploading blob %s at %s", digest.String(d), key)
	}
	if err := c.checkEnd(r, d, d.SizeBytes); err != nil {
		return err
	}
	if err := v.Check(); err != nil {
		return mismatchf(d, "%v", err)
	}
	if _, err := c.core.CompleteMultipartUpload(ctx, c.opts.Bucket, key, uploadID, parts, minio.PutObjectOptions{}); err != nil {
		return c.errorf(err, "completing upload of blob %s at %s", digest.String(d), key)
	}
	completed = true
	return nil
}

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
