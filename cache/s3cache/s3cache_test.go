package s3cache

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/minio/minio-go/v7"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/internal/testutil"
)

const mib = 1 << 20

func newCache(t testing.TB, m testutil.MinIO, bucket string, mod func(*Options)) *Cache {
	t.Helper()
	opts := Options{
		Endpoint:  m.Endpoint,
		Bucket:    bucket,
		Prefix:    "snap/cache",
		Region:    "us-east-1",
		AccessKey: m.AccessKey,
		SecretKey: m.SecretKey,
	}
	if mod != nil {
		mod(&opts)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := New(ctx, opts)
	if err != nil {
		t.Fatalf("New(%+v): %v", opts, err)
	}
	return c
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t testing.TB, err error, want codes.Code, what string) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("%s: got code %v (%v), want %v", what, got, err, want)
	}
}

// listKeys returns every object key in the bucket.
func listKeys(t testing.TB, m testutil.MinIO, bucket string) []string {
	t.Helper()
	var keys []string
	for o := range m.Client.ListObjects(ctxT(t), bucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			t.Fatalf("listing %s: %v", bucket, o.Err)
		}
		keys = append(keys, o.Key)
	}
	return keys
}

// incompleteUploads counts multipart uploads begun and not completed.
func incompleteUploads(t testing.TB, m testutil.MinIO, bucket string) int {
	t.Helper()
	n := 0
	for u := range m.Client.ListIncompleteUploads(ctxT(t), bucket, "", true) {
		if u.Err != nil {
			t.Fatalf("listing uploads in %s: %v", bucket, u.Err)
		}
		n++
	}
	return n
}

func TestRoundTrip(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	// Both write paths: buffered single request, and the verified
	// multipart upload (forced by a small SmallBlobLimit).
	buffered := newCache(t, m, bucket, func(o *Options) { o.PartSize = MinPartSize })
	multipart := newCache(t, m, bucket, func(o *Options) { o.PartSize = MinPartSize; o.SmallBlobLimit = mib })
	tests := []struct {
		name      string
		c         *Cache
		fn        digest.Function
		size      int
		wantParts string // ETag suffix of a multipart object
	}{
		{"empty", buffered, digest.BLAKE3, 0, ""},
		{"one byte", buffered, digest.BLAKE3, 1, ""},
		{"chunk blake3", buffered, digest.BLAKE3, 4096000, ""},
		{"chunk sha256", buffered, digest.SHA256, 4096000, ""},
		{"10MiB buffered in parts", buffered, digest.BLAKE3, 10 * mib, "-2"},
		{"3MiB verified multipart", multipart, digest.BLAKE3, 3 * mib, "-1"},
		{"10MiB verified multipart", multipart, digest.SHA256, 10 * mib, "-2"},
		{"11MiB verified multipart", multipart, digest.BLAKE3, 11*mib + 7, "-3"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := ctxT(t)
			ns := cache.Namespace{Group: "g", Function: tc.fn}
			data := randomBytes(t, tc.size)
			d := digest.Compute(tc.fn, data)
			missing, err := tc.c.FindMissing(ctx, ns, []*repb.Digest{d})
			if err != nil {
				t.Fatal(err)
			}
			if wantMissing := tc.size > 0; (len(missing) == 1) != wantMissing {
				t.Fatalf("FindMissing before write = %v, want missing=%v", missing, wantMissing)
			}
			if tc.size > 0 {
				_, err := cache.ReadAll(ctx, tc.c, ns, d)
				wantCode(t, err, codes.NotFound, "read before write")
				if !strings.Contains(err.Error(), d.Hash) {
					t.Errorf("NotFound error %q does not name the digest", err)
				}
			}
			if err := tc.c.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
				t.Fatalf("Write: %v", err)
			}
			// Idempotent: a second write succeeds and does not read r.
			if err := tc.c.Write(ctx, ns, d, iotestErrReader{}); tc.size > 0 && err != nil {
				t.Fatalf("second Write: %v", err)
			}
			got, err := cache.ReadAll(ctx, tc.c, ns, d)
			if err != nil {
				t.Fatalf("ReadAll: %v", err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("read back %d bytes, differing from the %d written", len(got), len(data))
			}
			missing, err = tc.c.FindMissing(ctx, ns, []*repb.Digest{d})
			if err != nil || len(missing) != 0 {
				t.Fatalf("FindMissing after write = %v, %v; want none", missing, err)
			}
			if tc.size == 0 {
				return
			}
			info, err := m.Client.StatObject(ctx, bucket, tc.c.casKey(tc.fn, d), minio.StatObjectOptions{})
			if err != nil {
				t.Fatalf("stat: %v", err)
			}
			if info.Size != int64(tc.size) {
				t.Errorf("object size %d, want %d", info.Size, tc.size)
			}
			if tc.wantParts != "" && !strings.HasSuffix(info.ETag, tc.wantParts) {
				t.Errorf("ETag %q: want a multipart object with suffix %q", info.ETag, tc.wantParts)
			}
			if tc.wantParts == "" && strings.Contains(info.ETag, "-") {
				t.Errorf("ETag %q: want a single-request object", info.ETag)
			}
		})
	}
	if n := incompleteUploads(t, m, bucket); n != 0 {
		t.Errorf("%d incomplete uploads left", n)
	}
	for _, k := range listKeys(t, m, bucket) {
		if !strings.HasPrefix(k, "snap/cache/cas/blake3/") && !strings.HasPrefix(k, "snap/cache/cas/sha256/") {
			t.Errorf("unexpected key %q", k)
		}
	}
}

// iotestErrReader fails every read: passing it proves r was not read.
type iotestErrReader struct{}

func (iotestErrReader) Read([]byte) (int, error) { return 0, errors.New("reader must not be read") }

func TestFindMissing(t *testing.T) {
	m := testutil.StartMinIO(t)
	c := newCache(t, m, m.NewBucket(t), func(o *Options) { o.Parallelism = 3 })
	ctx := ctxT(t)
	ns := cache.Namespace{Group: "team"}
	var present, absent []*repb.Digest
	for i := range 20 {
		b := randomBytes(t, 1000+i)
		d := digest.Compute(digest.BLAKE3, b)
		if i%2 == 0 {
			if err := c.Write(ctx, ns, d, bytes.NewReader(b)); err != nil {
				t.Fatal(err)
			}
			present = append(present, d)
		} else {
			absent = append(absent, d)
		}
	}
	empty := digest.Compute(digest.BLAKE3, nil)
	tests := []struct {
		name string
		ask  []*repb.Digest
		want []*repb.Digest
	}{
		{"nothing", nil, nil},
		{"all present", present, nil},
		{"all absent", absent, absent},
		{"interleaved", []*repb.Digest{absent[0], present[0], absent[1], present[1]}, absent[:2]},
		{"duplicates reported once", []*repb.Digest{absent[2], present[2], absent[2], absent[3], absent[2]}, absent[2:4]},
		{"empty blob always present", []*repb.Digest{empty, absent[4]}, absent[4:5]},
		{"same hash other size", []*repb.Digest{{Hash: present[0].Hash, SizeBytes: present[0].SizeBytes + 1}},
			[]*repb.Digest{{Hash: present[0].Hash, SizeBytes: present[0].SizeBytes + 1}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := c.FindMissing(ctx, ns, tc.ask)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %d missing, want %d", len(got), len(tc.want))
			}
			for i := range got {
				if !digest.Equal(got[i], tc.want[i]) {
					t.Errorf("missing[%d] = %s, want %s", i, digest.String(got[i]), digest.String(tc.want[i]))
				}
			}
		})
	}
	// Blobs are content-addressed and shared by every group and instance.
	got, err := c.FindMissing(ctx, cache.Namespace{Group: "other", Instance: "x"}, present)
	if err != nil || len(got) != 0 {
		t.Errorf("FindMissing from another group = %v, %v; want none missing", got, err)
	}
	// Another digest function is another namespace.
	got, err = c.FindMissing(ctx, cache.Namespace{Function: digest.SHA256}, present[:1])
	if err != nil || len(got) != 1 {
		t.Errorf("FindMissing under sha256 = %v, %v; want it missing", got, err)
	}
}

func TestInvalidArguments(t *testing.T) {
	m := testutil.StartMinIO(t)
	c := newCache(t, m, m.NewBucket(t), nil)
	ctx := ctxT(t)
	good := digest.Compute(digest.BLAKE3, []byte("x"))
	tests := []struct {
		name string
		ns   cache.Namespace
		d    *repb.Digest
	}{
		{"nil digest", cache.Namespace{}, nil},
		{"short hash", cache.Namespace{}, &repb.Digest{Hash: "abc", SizeBytes: 1}},
		{"upper-case hash", cache.Namespace{}, &repb.Digest{Hash: strings.ToUpper(good.Hash), SizeBytes: 1}},
		{"traversal in hash", cache.Namespace{}, &repb.Digest{Hash: "../../" + good.Hash[6:], SizeBytes: 1}},
		{"negative size", cache.Namespace{}, &repb.Digest{Hash: good.Hash, SizeBytes: -1}},
		{"unknown function", cache.Namespace{Function: repb.DigestFunction_MD5}, good},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.FindMissing(ctx, tc.ns, []*repb.Digest{tc.d})
			wantCode(t, err, codes.InvalidArgument, "FindMissing")
			_, err = c.Read(ctx, tc.ns, tc.d)
			wantCode(t, err, codes.InvalidArgument, "Read")
			err = c.Write(ctx, tc.ns, tc.d, strings.NewReader("x"))
			wantCode(t, err, codes.InvalidArgument, "Write")
			_, err = c.GetActionResult(ctx, tc.ns, tc.d)
			wantCode(t, err, codes.InvalidArgument, "GetActionResult")
			err = c.UpdateActionResult(ctx, tc.ns, tc.d, &repb.ActionResult{})
			wantCode(t, err, codes.InvalidArgument, "UpdateActionResult")
		})
	}
	err := c.UpdateActionResult(ctx, cache.Namespace{}, good, nil)
	wantCode(t, err, codes.InvalidArgument, "UpdateActionResult(nil)")
}

func actionResult(tag string) *repb.ActionResult {
	return &repb.ActionResult{
		ExitCode:  int32(len(tag)),
		StdoutRaw: []byte(tag),
		OutputFiles: []*repb.OutputFile{{
			Path: "manifest", Digest: digest.Compute(digest.BLAKE3, []byte(tag)),
		}},
	}
}

func TestActionCachePartitioning(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	c := newCache(t, m, bucket, nil)
	ctx := ctxT(t)
	key := digest.Compute(digest.SHA256, []byte("snapshot key"))
	hostile := []string{
		"", "a", "team-1", "Team", "../..", "../../cas/blake3", "a/b", "/abs", "..", ".", "h.x",
		"_", "g\x00nul", "new\nline", "sp ace", "ünïcode", strings.Repeat("x", 64), strings.Repeat("y", 5000),
		"%2e%2e%2f", "\\..\\..",
	}
	type slot struct{ group, instance string }
	var slots []slot
	for _, g := range hostile {
		slots = append(slots, slot{g, ""})
	}
	for _, i := range hostile[1:] {
		slots = append(slots, slot{"a", i})
	}
	for _, s := range slots {
		ns := cache.Namespace{Group: s.group, Instance: s.instance, Function: digest.SHA256}
		_, err := c.GetActionResult(ctx, ns, key)
		wantCode(t, err, codes.NotFound, "GetActionResult before update")
		if err := c.UpdateActionResult(ctx, ns, key, actionResult(s.group+"|"+s.instance)); err != nil {
			t.Fatalf("UpdateActionResult(%q, %q): %v", s.group, s.instance, err)
		}
	}
	// Every slot reads back its own entry: no two slots share an object.
	for _, s := range slots {
		ns := cache.Namespace{Group: s.group, Instance: s.instance, Function: digest.SHA256}
		got, err := c.GetActionResult(ctx, ns, key)
		if err != nil {
			t.Fatalf("GetActionResult(%q, %q): %v", s.group, s.instance, err)
		}
		if want := actionResult(s.group + "|" + s.instance); !proto.Equal(got, want) {
			t.Errorf("GetActionResult(%q, %q) = %v, want %v", s.group, s.instance, got, want)
		}
	}
	keys := listKeys(t, m, bucket)
	if len(keys) != len(slots) {
		t.Errorf("%d objects for %d slots", len(keys), len(slots))
	}
	for _, k := range keys {
		parts := strings.Split(k, "/")
		if len(parts) != 7 || parts[0] != "snap" || parts[1] != "cache" || parts[2] != "ac" || parts[5] != "sha256" || parts[6] != key.Hash {
			t.Errorf("key %q escapes the layout <prefix>/ac/<group>/<instance-hash>/<fn>/<hash>", k)
		}
		for _, p := range parts {
			if p == "" || p == "." || p == ".." || len(p) > 80 || strings.ContainsAny(p, "\\\x00\n %") {
				t.Errorf("key %q has a hostile component %q", k, p)
			}
		}
	}
	// Replacing an entry; other digest function and other key are absent.
	ns := cache.Namespace{Group: "a", Function: digest.SHA256}
	if err := c.UpdateActionResult(ctx, ns, key, actionResult("replaced")); err != nil {
		t.Fatal(err)
	}
	if got, err := c.GetActionResult(ctx, ns, key); err != nil || !proto.Equal(got, actionResult("replaced")) {
		t.Errorf("after replacing: %v, %v", got, err)
	}
	_, err := c.GetActionResult(ctx, cache.Namespace{Group: "a", Function: digest.BLAKE3}, key)
	wantCode(t, err, codes.NotFound, "entry under another digest function")
	other := digest.Compute(digest.SHA256, []byte("other key"))
	_, err = c.GetActionResult(ctx, ns, other)
	wantCode(t, err, codes.NotFound, "another key")
	if !strings.Contains(err.Error(), other.Hash) {
		t.Errorf("NotFound error %q does not name the key", err)
	}
	// A corrupt entry is DataLoss.
	m.PutRaw(t, bucket, c.acKey(ns, digest.SHA256, key), []byte{0xff, 0xff, 0xff})
	_, err = c.GetActionResult(ctx, ns, key)
	wantCode(t, err, codes.DataLoss, "corrupt entry")
}

func TestGroupComponent(t *testing.T) {
	tests := []struct {
		group string
		want  string // "" means hashed
	}{
		{"", "_"},
		{"a", "a"},
		{"team-1_x", "team-1_x"},
		{strings.Repeat("z", 63), strings.Repeat("z", 63)},
		{strings.Repeat("z", 64), ""},
		{"Team", ""},
		{"..", ""},
		{"a/b", ""},
		{"-a", ""},
		{"_", ""},
		{"h.0", ""},
	}
	seen := map[string]string{}
	for _, tc := range tests {
		got := groupComponent(tc.group)
		if tc.want != "" && got != tc.want {
			t.Errorf("groupComponent(%q) = %q, want %q", tc.group, got, tc.want)
		}
		if tc.want == "" && (!strings.HasPrefix(got, "h.") || len(got) != 2+64) {
			t.Errorf("groupComponent(%q) = %q, want h.<sha256>", tc.group, got)
		}
		if prev, ok := seen[got]; ok {
			t.Errorf("groups %q and %q share component %q", prev, tc.group, got)
		}
		seen[got] = tc.group
	}
}

func TestTwoCachesOneBucket(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	c1 := newCache(t, m, bucket, nil)
	c2 := newCache(t, m, bucket, func(o *Options) { o.Prefix = "/snap/cache/" })
	ctx := ctxT(t)
	ns := cache.Namespace{Group: "g", Instance: "i"}
	data := randomBytes(t, 2*mib)
	d := digest.Compute(digest.BLAKE3, data)
	if err := c1.Write(ctx, ns, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	got, err := cache.ReadAll(ctx, c2, ns, d)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("second cache reads %d bytes, %v", len(got), err)
	}
	key := digest.Compute(digest.BLAKE3, []byte("k"))
	if err := c2.UpdateActionResult(ctx, ns, key, actionResult("from c2")); err != nil {
		t.Fatal(err)
	}
	ar, err := c1.GetActionResult(ctx, ns, key)
	if err != nil || !proto.Equal(ar, actionResult("from c2")) {
		t.Fatalf("first cache sees %v, %v", ar, err)
	}
	// Another prefix is another cache.
	c3 := newCache(t, m, bucket, func(o *Options) { o.Prefix = "elsewhere" })
	if missing, err := c3.FindMissing(ctx, ns, []*repb.Digest{d}); err != nil || len(missing) != 1 {
		t.Errorf("cache under another prefix: FindMissing = %v, %v; want missing", missing, err)
	}
}

func TestServerDown(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	c := newCache(t, m, bucket, func(o *Options) { o.MaxRetries = 2 })
	ns := cache.Namespace{}
	data := []byte("stored before the server stopped")
	d := digest.Compute(digest.BLAKE3, data)
	key := digest.Compute(digest.BLAKE3, []byte("key"))
	if err := c.Write(ctxT(t), ns, d, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	m.Stop()
	ops := []struct {
		name string
		op   func(ctx context.Context) error
	}{
		{"FindMissing", func(ctx context.Context) error {
			_, err := c.FindMissing(ctx, ns, []*repb.Digest{d})
			return err
		}},
		{"Read", func(ctx context.Context) error {
			_, err := cache.ReadAll(ctx, c, ns, d)
			return err
		}},
		{"Write", func(ctx context.Context) error {
			other := []byte("other")
			return c.Write(ctx, ns, digest.Compute(digest.BLAKE3, other), bytes.NewReader(other))
		}},
		{"GetActionResult", func(ctx context.Context) error {
			_, err := c.GetActionResult(ctx, ns, key)
			return err
		}},
		{"UpdateActionResult", func(ctx context.Context) error {
			return c.UpdateActionResult(ctx, ns, key, actionResult("x"))
		}},
		{"New", func(ctx context.Context) error {
			_, err := New(ctx, c.opts)
			return err
		}},
	}
	for _, tc := range ops {
		t.Run(tc.name, func(t *testing.T) {
			// The deadline turns a hang into a failure rather than a
			// stuck test; the refused connection is reported before it.
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err := tc.op(ctx)
			wantCode(t, err, codes.Unavailable, tc.name+" with the server stopped")
			if !strings.Contains(err.Error(), bucket) {
				t.Errorf("error %q does not name the bucket", err)
			}
		})
	}
	// A deadline that expires before the server answers is Unavailable too.
	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	time.Sleep(2 * time.Millisecond)
	_, err := c.FindMissing(ctx, ns, []*repb.Digest{d})
	wantCode(t, err, codes.Unavailable, "FindMissing past its deadline")
}

func TestNew(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	ctx := ctxT(t)
	base := Options{Endpoint: m.Endpoint, Region: "us-east-1", AccessKey: m.AccessKey, SecretKey: m.SecretKey}
	tests := []struct {
		name string
		mod  func(*Options)
		want codes.Code
	}{
		{"existing bucket", func(o *Options) { o.Bucket = bucket }, codes.OK},
		{"missing bucket", func(o *Options) { o.Bucket = "no-such-bucket" }, codes.NotFound},
		{"created bucket", func(o *Options) { o.Bucket = "created-bucket"; o.CreateBucket = true }, codes.OK},
		{"create existing", func(o *Options) { o.Bucket = bucket; o.CreateBucket = true }, codes.OK},
		{"wrong secret", func(o *Options) { o.Bucket = bucket; o.SecretKey = "wrong-secret-key" }, codes.PermissionDenied},
		{"unknown access key", func(o *Options) { o.Bucket = bucket; o.AccessKey = "nobody" }, codes.PermissionDenied},
		{"invalid bucket name", func(o *Options) { o.Bucket = "A_B" }, codes.InvalidArgument},
		{"no endpoint", func(o *Options) { o.Bucket = bucket; o.Endpoint = "" }, codes.InvalidArgument},
		{"part size too small", func(o *Options) { o.Bucket = bucket; o.PartSize = MinPartSize - 1 }, codes.InvalidArgument},
		{"traversing prefix", func(o *Options) { o.Bucket = bucket; o.Prefix = "a/../b" }, codes.InvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			opts := base
			tc.mod(&opts)
			_, err := New(ctx, opts)
			wantCode(t, err, tc.want, "New")
		})
	}
	if ok, err := m.Client.BucketExists(ctx, "created-bucket"); err != nil || !ok {
		t.Errorf("CreateBucket did not create the bucket: %v, %v", ok, err)
	}
}

func TestParseURL(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("MINIO_ROOT_USER", "")
	t.Setenv("MINIO_ROOT_PASSWORD", "")
	tests := []struct {
		name string
		raw  string
		env  map[string]string
		want Options
		bad  bool
	}{
		{name: "bucket only", raw: "s3://snaps",
			want: Options{Bucket: "snaps", Endpoint: "s3.amazonaws.com", Secure: true}},
		{name: "prefix and endpoint", raw: "s3://snaps/team/vm/?endpoint=127.0.0.1:9000&secure=false&region=eu-west-1",
			want: Options{Bucket: "snaps", Prefix: "team/vm", Endpoint: "127.0.0.1:9000", Region: "eu-west-1"}},
		{name: "tuning", raw: "s3://b?create=true&part_size=8388608&parallelism=4",
			want: Options{Bucket: "b", Endpoint: "s3.amazonaws.com", Secure: true, CreateBucket: true, PartSize: 8 << 20, Parallelism: 4}},
		{name: "credentials stay with the chain", raw: "s3://b",
			env:  map[string]string{"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"},
			want: Options{Bucket: "b", Endpoint: "s3.amazonaws.com", Secure: true}},
		{name: "profile", raw: "s3://b?profile=team",
			want: Options{Bucket: "b", Endpoint: "s3.amazonaws.com", Secure: true, Profile: "team"}},
		{name: "region from the environment", raw: "s3://b",
			env:  map[string]string{"AWS_REGION": "eu-west-3"},
			want: Options{Bucket: "b", Endpoint: "s3.amazonaws.com", Secure: true, Region: "eu-west-3"}},
		{name: "no compression", raw: "s3://b?compression=false",
			want: Options{Bucket: "b", Endpoint: "s3.amazonaws.com", Secure: true, DisableCompression: true}},
		{name: "bad compression", raw: "s3://b?compression=lz4", bad: true},
		{name: "wrong scheme", raw: "http://b", bad: true},
		{name: "no bucket", raw: "s3:///prefix", bad: true},
		{name: "credentials in URL", raw: "s3://id:secret@b", bad: true},
		{name: "unknown parameter", raw: "s3://b?endpiont=x", bad: true},
		{name: "repeated parameter", raw: "s3://b?region=a&region=b", bad: true},
		{name: "bad secure", raw: "s3://b?secure=maybe", bad: true},
		{name: "small part size", raw: "s3://b?part_size=1024", bad: true},
		{name: "zero parallelism", raw: "s3://b?parallelism=0", bad: true},
		{name: "endpoint with path", raw: "s3://b?endpoint=host/x", bad: true},
		{name: "traversing prefix", raw: "s3://b/a/../../c", bad: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			got, err := ParseURL(tc.raw)
			if tc.bad {
				wantCode(t, err, codes.InvalidArgument, "ParseURL("+tc.raw+")")
				return
			}
			if err != nil {
				t.Fatalf("ParseURL(%q): %v", tc.raw, err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ParseURL(%q) = %+v, want %+v", tc.raw, got, tc.want)
			}
		})
	}
}

func TestCode(t *testing.T) {
	tests := []struct {
		err  error
		want codes.Code
	}{
		{minio.ErrorResponse{Code: "NoSuchKey", StatusCode: 404}, codes.NotFound},
		{minio.ErrorResponse{Code: "AccessDenied", StatusCode: 403}, codes.PermissionDenied},
		{minio.ErrorResponse{Code: "SlowDown", StatusCode: 503}, codes.Unavailable},
		{minio.ErrorResponse{Code: "Weird", StatusCode: 502}, codes.Unavailable},
		{minio.ErrorResponse{Code: "Weird", StatusCode: 400}, codes.Unknown},
		{context.Canceled, codes.Canceled},
		{context.DeadlineExceeded, codes.Unavailable},
		{io.ErrUnexpectedEOF, codes.Unavailable},
		{errors.New("other"), codes.Unknown},
	}
	for _, tc := range tests {
		if got := code(tc.err); got != tc.want {
			t.Errorf("code(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// BenchmarkUpload and BenchmarkDownload move 4,096,000-byte chunks (the
// default chunk size) to and from a local MinIO; MB/s is per chunk byte.
func BenchmarkUpload(b *testing.B) {
	m := testutil.StartMinIO(b)
	c := newCache(b, m, m.NewBucket(b), nil)
	ctx := context.Background()
	data := randomBytes(b, 4096000)
	b.SetBytes(int64(len(data)))
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		// A distinct blob each time, so each Write uploads.
		data[0], data[1], data[2], data[3] = byte(i), byte(i>>8), byte(i>>16), byte(i>>24)
		d := digest.Compute(digest.BLAKE3, data)
		if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDownload(b *testing.B) {
	m := testutil.StartMinIO(b)
	c := newCache(b, m, m.NewBucket(b), nil)
	ctx := context.Background()
	var ds []*repb.Digest
	for range 8 {
		data := randomBytes(b, 4096000)
		d := digest.Compute(digest.BLAKE3, data)
		if err := c.Write(ctx, cache.Namespace{}, d, bytes.NewReader(data)); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, d)
	}
	buf := make([]byte, 1<<20)
	b.SetBytes(4096000)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		rc, err := c.Read(ctx, cache.Namespace{}, ds[i%len(ds)])
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.CopyBuffer(io.Discard, rc, buf)
		rc.Close()
		if err != nil || n != 4096000 {
			b.Fatalf("read %d bytes: %v", n, err)
		}
	}
}
