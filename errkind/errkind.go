// Package errkind gives every error snaploader returns one kind per cause,
// carried through every layer: a wrapped error keeps its kind and its
// cause (errors.Is and errors.As see through it), and its text is in the
// product's words, never in transport wording.
//
// The kinds are gRPC status codes, so an error of this package crosses a
// gRPC boundary with its kind (a server returns it as is; status.Code
// reads it on either side), and the command line maps each kind to an exit
// code. What a kind means, and what it allows a tier to do to the data it
// holds:
//
//   - InvalidArgument: bad input: flags, keys, names, a hostile manifest,
//     an upload whose bytes do not match its digest.
//   - NotFound: an absent blob or entry; no usable snapshot.
//   - Unavailable: a remote that is down, slow or resetting, and transient
//     local I/O failures (no descriptors left, EIO, EINTR): retryable.
//   - ResourceExhausted: a full disk, a memory or space budget, a quota.
//   - DataLoss: stored bytes that failed verification (a digest, checksum,
//     seal or authentication tag). It is the only kind after which a tier
//     may drop what it holds, and only the entry that failed.
//   - Internal: a broken invariant (a bug), never a state of the world.
//
// Nothing is deleted or reported corrupt because of an error of any kind
// but DataLoss.
package errkind

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"regexp"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Kind is the cause of an error. Its values are gRPC status codes.
type Kind = codes.Code

// The kinds snaploader's errors carry.
const (
	InvalidArgument   = codes.InvalidArgument
	NotFound          = codes.NotFound
	Unavailable       = codes.Unavailable
	ResourceExhausted = codes.ResourceExhausted
	DataLoss          = codes.DataLoss
	Internal          = codes.Internal
	Canceled          = codes.Canceled
	DeadlineExceeded  = codes.DeadlineExceeded
	Unimplemented     = codes.Unimplemented
)

// Error is an error of one kind. Its text is the message alone; its cause,
// when there is one, is what Unwrap returns.
type Error struct {
	Kind Kind
	Msg  string
	Err  error
}

func (e *Error) Error() string { return e.Msg }

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// GRPCStatus makes the kind the error's gRPC status code, so that
// status.Code and a gRPC server see it.
func (e *Error) GRPCStatus() *status.Status { return status.New(e.Kind, e.Msg) }

// New returns an error of kind k whose message is fmt.Sprintf(format,
// args...); a %w verb names its cause, as with fmt.Errorf.
func New(k Kind, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return &Error{Kind: k, Msg: Text(err), Err: errors.Unwrap(err)}
}

// DataLossf returns a DataLoss error: stored bytes that failed
// verification. Only code that checked a digest, checksum, seal or tag
// creates one.
func DataLossf(format string, args ...any) error { return New(DataLoss, format, args...) }

// IO returns err, the failure of a local file operation, as an error of
// the kind its cause says (see OfIO), prefixed with what was being done:
// "what: cause". An err that already has a kind keeps it.
func IO(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	msg := fmt.Sprintf(format, args...)
	return &Error{Kind: OfIO(err), Msg: msg + ": " + Text(err), Err: err}
}

// OfIO is the kind of a local I/O failure: a full disk or file too large
// is ResourceExhausted, a missing file NotFound, a cancelled context its
// own kind, and every other failure of the system (no descriptors left,
// EIO, EINTR, a permission) Unavailable: a state of the world, never
// corruption. An error that already has a kind keeps it.
func OfIO(err error) Kind {
	if k, ok := kindOf(err); ok {
		return k
	}
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return ResourceExhausted
	case errors.Is(err, fs.ErrNotExist):
		return NotFound
	case errors.Is(err, context.Canceled):
		return Canceled
	case errors.Is(err, context.DeadlineExceeded):
		return DeadlineExceeded
	}
	return Unavailable
}

// Of returns err's kind: the kind it or an error it wraps carries, the
// kind of a system error (OfIO) or of a cancelled context, and otherwise
// Internal. Of(nil) is codes.OK.
func Of(err error) Kind {
	if err == nil {
		return codes.OK
	}
	if k, ok := kindOf(err); ok {
		return k
	}
	var errno syscall.Errno
	var pe *fs.PathError
	var le *os.LinkError
	if errors.As(err, &errno) || errors.As(err, &pe) || errors.As(err, &le) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return OfIO(err)
	}
	return Internal
}

// Is reports whether err is of kind k.
func Is(err error, k Kind) bool { return err != nil && Of(err) == k }

// kindOf is the kind err carries as a gRPC status (an Error or a status
// error from a peer), when it carries one other than Unknown.
func kindOf(err error) (Kind, bool) {
	var gs interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &gs) {
		return 0, false
	}
	c := gs.GRPCStatus().Code()
	if c == codes.Unknown || c == codes.OK {
		return 0, false
	}
	return c, true
}

// Text is err's message in the product's words: a gRPC status error's
// message without the "rpc error: code = … desc =" wording, wherever in
// the chain it stands, and any other error's text as it is.
func Text(err error) string {
	if err == nil {
		return ""
	}
	return rpcWording.ReplaceAllString(err.Error(), "")
}

var rpcWording = regexp.MustCompile(`rpc error: code = \w+ desc = `)
