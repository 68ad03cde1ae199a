package s3cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"

	"github.com/minio/minio-go/v7"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/errkind"
)

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
// being done: "s3 cache: <what> (bucket B): <err>". While the bucket check
// New left running has not said the bucket exists, an absent object or a
// refusal may come from a missing bucket or refused credentials: the
// check's answer is awaited, and its failure is the error when it failed.
func (c *Cache) errorf(err error, format string, args ...any) error {
	if k := code(err); k == codes.NotFound || k == codes.PermissionDenied {
		if cerr := c.check.failed(); cerr != nil {
			return errkind.New(errkind.Of(cerr), "s3 cache: %s: %w", fmt.Sprintf(format, args...), cerr)
		}
	}
	return c.clientErrorf(err, format, args...)
}

// clientErrorf is errorf without the bucket check.
func (c *Cache) clientErrorf(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	k := code(err)
	if k == codes.PermissionDenied && c.creds != nil {
		if src := c.creds.used(); src != "" {
			what += ": the credentials from " + src + " were refused"
		} else {
			what += ": no credentials were found (looked in " + c.creds.tried() + ")"
		}
	}
	return errkind.New(k, "s3 cache: %s (bucket %s): %w", what, c.opts.Bucket, err)
}
