package s3cache

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ParseURL parses a cache URL of the form
//
//	s3://BUCKET[/PREFIX][?endpoint=HOST:PORT&secure=BOOL&region=R&profile=P&create=BOOL&part_size=N&parallelism=N&compression=BOOL]
//
// endpoint defaults to s3.amazonaws.com and secure to true. Credentials are
// never taken from the URL (URLs end up in logs): they come from the
// standard chain (see credentials.go; profile names the shared credentials
// file's profile). region defaults to AWS_REGION when set. Unknown
// query parameters are an error, so a misspelt one is not silently ignored.
func ParseURL(raw string) (Options, error) {
	bad := func(format string, args ...any) (Options, error) {
		return Options{}, status.Errorf(codes.InvalidArgument, "s3 cache URL %q: %s", raw, fmt.Sprintf(format, args...))
	}
	u, err := url.Parse(raw)
	if err != nil {
		return bad("%v", err)
	}
	if u.Scheme != "s3" {
		return bad("scheme must be s3")
	}
	if u.User != nil {
		return bad("credentials do not belong in the URL: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
	}
	if u.Host == "" {
		return bad("no bucket")
	}
	if u.Fragment != "" {
		return bad("unexpected fragment")
	}
	opts := Options{
		Bucket:   u.Host,
		Prefix:   strings.Trim(u.Path, "/"),
		Endpoint: "s3.amazonaws.com",
		Secure:   true,
	}
	if _, err := cleanPrefix(opts.Prefix); err != nil {
		return bad("%v", status.Convert(err).Message())
	}
	for k, vs := range u.Query() {
		if len(vs) != 1 {
			return bad("parameter %s given %d times", k, len(vs))
		}
		v := vs[0]
		switch k {
		case "endpoint":
			if v == "" || strings.ContainsAny(v, "/?#@") {
				return bad("endpoint must be HOST or HOST:PORT, got %q", v)
			}
			opts.Endpoint = v
		case "secure":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return bad("secure: %v", err)
			}
			opts.Secure = b
		case "region":
			opts.Region = v
		case "profile":
			opts.Profile = v
		case "create":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return bad("create: %v", err)
			}
			opts.CreateBucket = b
		case "part_size":
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil || n < MinPartSize {
				return bad("part_size must be a number of bytes of at least %d, got %q", MinPartSize, v)
			}
			opts.PartSize = n
		case "compression":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return bad("compression: %v", err)
			}
			opts.DisableCompression = !b
		case "parallelism":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return bad("parallelism must be a positive number, got %q", v)
			}
			opts.Parallelism = n
		default:
			return bad("unknown parameter %q (known: endpoint, secure, region, profile, create, part_size, parallelism, compression)", k)
		}
	}
	if opts.Region == "" {
		opts.Region = os.Getenv("AWS_REGION")
	}
	return opts, nil
}

// OpenURL opens the S3 tier a URL names (see ParseURL), with each of
// adjust applied to its options first (a server creates its bucket, gc
// reads object ages from metadata): the one way every command opens one.
func OpenURL(ctx context.Context, raw string, adjust ...func(*Options)) (*Cache, error) {
	opts, err := ParseURL(raw)
	if err != nil {
		return nil, err
	}
	for _, f := range adjust {
		f(&opts)
	}
	c, err := New(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("opening S3 tier %s: %w", raw, err)
	}
	return c, nil
}
