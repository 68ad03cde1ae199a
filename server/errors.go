package server

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"regexp"
	"strings"

	"github.com/snaploader/snaploader/errkind"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// pathFree strips the file names from an os error (*fs.PathError,
// *os.LinkError), keeping the operation and the errno: errors sent to
// clients never name the server's files.
func pathFree(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %w", pe.Op, pe.Err)
	}
	var le *os.LinkError
	if errors.As(err, &le) {
		return fmt.Errorf("%s: %w", le.Op, le.Err)
	}
	return err
}

// ioErr is the error of a server-side I/O failure (disk, scratch files),
// of the kind its cause says: a full disk is ResourceExhausted, no
// descriptors left or a scratch directory that is gone Unavailable. The
// cause is logged in full and sent without file names.
func (s *Server) ioErr(err error, what string) error {
	s.log.Error(what, "err", err)
	return scratchErr(err, what)
}

// scratchErr is ioErr without the log line.
func scratchErr(err error, what string) error {
	k := errkind.OfIO(err)
	if k == errkind.NotFound {
		k = errkind.Unavailable // the server's own directory is gone: not an absent blob
	}
	return &errkind.Error{Kind: k, Msg: what + ": " + errkind.Text(pathFree(err)), Err: err}
}

var nestedStatus = regexp.MustCompile(`rpc error: code = \w+ desc = `)

// sanitizer rewrites the errors every RPC returns: context and system
// errors get their kinds, other errors without a code become Internal, and no message
// names a server directory (the scratch directory or the backend's).
type sanitizer struct {
	dirs *regexp.Regexp // nil when there is nothing to hide
}

func newSanitizer(dirs ...string) *sanitizer {
	var alts []string
	for _, d := range dirs {
		if d = strings.TrimRight(d, "/"); d != "" && d != "." {
			alts = append(alts, regexp.QuoteMeta(d))
		}
	}
	if len(alts) == 0 {
		return &sanitizer{}
	}
	return &sanitizer{dirs: regexp.MustCompile(`(` + strings.Join(alts, "|") + `)(/[^\s:"']*)?`)}
}

func (z *sanitizer) clean(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	code, msg := st.Code(), st.Message()
	if !ok {
		code, msg = codes.Unknown, err.Error()
	}
	if code == codes.Unknown {
		code = errkind.Of(err) // a cancelled context, a system error's kind, else Internal
	}
	// Wrapped status errors: one code, said once.
	msg = nestedStatus.ReplaceAllString(msg, "")
	if z.dirs != nil {
		msg = z.dirs.ReplaceAllString(msg, "[server file]")
	}
	if code == st.Code() && msg == st.Message() && ok {
		return err
	}
	return status.Error(code, msg)
}

func (z *sanitizer) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	resp, err := h(ctx, req)
	return resp, z.clean(err)
}

func (z *sanitizer) stream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	return z.clean(h(srv, ss))
}
