package s3cache

import (
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
)

// requestsDuring counts the S3 requests m received per API while f ran.
func requestsDuring(t *testing.T, m testutil.MinIO, f func()) map[string]float64 {
	t.Helper()
	before, err := m.Requests()
	if err != nil {
		t.Fatal(err)
	}
	f()
	after, err := m.Requests()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for api, n := range after {
		if d := n - before[api]; d > 0 {
			out[api] = d
		}
	}
	return out
}

// TestOpeningChecksTheBucketInOneRequest: without a region, New checks
// the bucket with the request that finds its region, which later requests
// need anyway (one request, not two); with one and CheckInBackground, New
// returns at once and a call reports what the check found: a missing
// bucket or refused credentials, never a mere absent entry.
func TestOpeningChecksTheBucketInOneRequest(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	ctx := ctxT(t)
	key := digest.Compute(digest.BLAKE3, []byte("no such entry"))
	ns := cache.Namespace{Instance: "ci", Function: digest.BLAKE3}

	t.Run("no region", func(t *testing.T) {
		var c *Cache
		reqs := requestsDuring(t, m, func() {
			c = newCache(t, m, bucket, func(o *Options) { o.Region = "" })
			_, err := c.GetActionResult(ctx, ns, key)
			wantCode(t, err, codes.NotFound, "GetActionResult of an absent entry")
		})
		if reqs["GetBucketLocation"] != 1 || reqs["HeadBucket"] != 0 || reqs["GetObject"] != 1 {
			t.Errorf("requests %v, want one GetBucketLocation, no HeadBucket and one GetObject", reqs)
		}
		_, err := New(ctx, Options{Endpoint: m.Endpoint, Bucket: "no-such-bucket", AccessKey: m.AccessKey, SecretKey: m.SecretKey})
		wantCode(t, err, codes.NotFound, "New of a missing bucket without a region")
	})
	for _, tc := range []struct {
		name   string
		mod    func(*Options)
		want   codes.Code
		saying string
	}{
		{"existing bucket", func(o *Options) {}, codes.NotFound, "snap/cache/ac/"},
		{"missing bucket", func(o *Options) { o.Bucket = "no-such-bucket" }, codes.NotFound, "bucket no-such-bucket does not exist"},
		{"refused credentials", func(o *Options) { o.SecretKey = "wrong-secret-key" }, codes.PermissionDenied, "were refused"},
	} {
		t.Run("in the background: "+tc.name, func(t *testing.T) {
			c := newCache(t, m, bucket, func(o *Options) { o.CheckInBackground = true; tc.mod(o) })
			_, err := c.GetActionResult(ctx, ns, key)
			wantCode(t, err, tc.want, "GetActionResult")
			if !strings.Contains(err.Error(), tc.saying) {
				t.Errorf("GetActionResult: %v, want it to say %q", err, tc.saying)
			}
			missing, err := c.FindMissing(ctx, ns, []*repb.Digest{key})
			if tc.name == "existing bucket" {
				if err != nil || len(missing) != 1 {
					t.Errorf("FindMissing: %v, %v; want the digest missing", missing, err)
				}
			} else {
				wantCode(t, err, tc.want, "FindMissing")
			}
		})
	}
}
