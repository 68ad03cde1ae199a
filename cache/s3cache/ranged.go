package s3cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/minio/minio-go/v7"
	"google.golang.org/grpc/codes"
)

// Ranged GETs: every read of an object goes out as one or more ranged
// GETs fetched whole into memory, each hedged (see hedge.go).

// errPastEnd says a ranged GET started at or past the object's end (the
// bucket answered 416): the object is shorter than the caller's bound.
var errPastEnd = errors.New("range starts past the object's end")

// span is the answer to one ranged GET.
type span struct {
	start int64  // the object offset of data[0]
	data  []byte // the bytes of the range that exist
	info  minio.ObjectInfo
	total int64 // the object's size (from Content-Range)
}

// getRange fetches the object's bytes [start, end) (fewer at its end),
// hedged; with etag set, only from that version of the object (a changed
// object is a PreconditionFailed error).
func (c *Cache) getRange(ctx context.Context, key string, start, end int64, etag string) (span, error) {
	return do(ctx, c.hedge, final, func(ctx context.Context) (span, error) {
		return c.getRangeOnce(ctx, key, start, end, etag)
	})
}

// final reports errors a second request would meet again.
func final(err error) bool {
	return errors.Is(err, errPastEnd) || preconditionFailed(err) || code(err) == codes.NotFound ||
		code(err) == codes.PermissionDenied
}

func preconditionFailed(err error) bool {
	return minio.ToErrorResponse(err).Code == "PreconditionFailed"
}

func (c *Cache) getRangeOnce(ctx context.Context, key string, start, end int64, etag string) (span, error) {
	var opts minio.GetObjectOptions
	if err := opts.SetRange(start, end-1); err != nil {
		return span{}, err
	}
	if etag != "" {
		if err := opts.SetMatchETag(etag); err != nil {
			return span{}, err
		}
	}
	body, info, h, err := c.core.GetObject(ctx, c.opts.Bucket, key, opts)
	if err != nil {
		if minio.ToErrorResponse(err).Code == "InvalidRange" {
			return span{}, errPastEnd
		}
		return span{}, err
	}
	defer body.Close()
	total, ok := contentRangeTotal(h.Get("Content-Range"))
	if !ok {
		// A bucket answering a range with the whole object (200).
		total = info.Size
		if start > 0 || info.Size > end-start {
			return span{}, fmt.Errorf("ranged GET of [%d, %d) answered without Content-Range", start, end)
		}
	}
	data := make([]byte, min(end-start, max(info.Size, 0)))
	n, err := io.ReadFull(body, data)
	if err != nil {
		return span{}, fmt.Errorf("at offset %d: %w", start+int64(n), err)
	}
	// Reading on to the end of the body lets the connection be reused.
	var one [1]byte
	if k, _ := body.Read(one[:]); k > 0 {
		return span{}, fmt.Errorf("ranged GET of [%d, %d) answered with more than its Content-Length", start, end)
	}
	c.rangeBytes.Add(int64(n))
	c.rangeGets.Add(1)
	return span{start: start, data: data, info: info, total: total}, nil
}

// contentRangeTotal parses the object size of "bytes A-B/TOTAL".
func contentRangeTotal(v string) (int64, bool) {
	_, total, ok := strings.Cut(v, "/")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(total, 10, 64)
	return n, err == nil && n >= 0
}

// part is one ranged GET of a fan-out, running.
type part struct {
	start, end int64 // requested [start, end)
	sp         span
	err        error
	done       chan struct{}
	cancel     context.CancelFunc
}

// fetchParts starts ranged GETs of [0, bound) in parts of partSize at
// once.
func (c *Cache) fetchParts(ctx context.Context, key string, bound, partSize int64, etag string) []*part {
	var ps []*part
	for start := int64(0); start < bound; start += partSize {
		pctx, cancel := context.WithCancel(ctx)
		p := &part{start: start, end: min(bound, start+partSize), done: make(chan struct{}), cancel: cancel}
		ps = append(ps, p)
		go func() {
			defer close(p.done)
			p.sp, p.err = c.getRange(pctx, key, p.start, p.end, etag)
		}()
	}
	return ps
}

// cancelParts stops the parts and waits for them to end.
func cancelParts(ps []*part) {
	for _, p := range ps {
		p.cancel()
	}
	for _, p := range ps {
		<-p.done
	}
}

// gather waits for the parts overlapping [start, end), cancels the others,
// and returns the object's bytes [start, end) (fewer when the object ends
// first). Every part used must come from the object version of etag.
func gather(ps []*part, start, end int64, etag string) ([]byte, error) {
	out := make([]byte, 0, end-start)
	for _, p := range ps {
		if p.end <= start || p.start >= end {
			p.cancel()
			continue
		}
		<-p.done
		if errors.Is(p.err, errPastEnd) {
			break
		}
		if p.err != nil {
			return nil, p.err
		}
		if p.sp.info.ETag != etag {
			return nil, errChanged
		}
		lo, hi := max(start, p.start)-p.start, min(end, p.start+int64(len(p.sp.data)))-p.start
		if lo < hi {
			out = append(out, p.sp.data[lo:hi]...)
		}
		if int64(len(p.sp.data)) < p.end-p.start {
			break // the object ends here
		}
	}
	return out, nil
}

// errChanged says an object was replaced while its parts were fetched.
var errChanged = errors.New("the object changed while it was read")
