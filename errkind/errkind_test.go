package errkind

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestKinds(t *testing.T) {
	pathErr := func(e syscall.Errno) error { return &fs.PathError{Op: "open", Path: "/x", Err: e} }
	for _, tc := range []struct {
		name string
		err  error
		want Kind
	}{
		{"nil", nil, codes.OK},
		{"full disk", pathErr(syscall.ENOSPC), ResourceExhausted},
		{"quota", pathErr(syscall.EDQUOT), ResourceExhausted},
		{"no descriptors", pathErr(syscall.EMFILE), Unavailable},
		{"no descriptors in the system", pathErr(syscall.ENFILE), Unavailable},
		{"I/O error", pathErr(syscall.EIO), Unavailable},
		{"absent", pathErr(syscall.ENOENT), NotFound},
		{"link", &os.LinkError{Op: "rename", Err: syscall.ENOSPC}, ResourceExhausted},
		{"wrapped errno", fmt.Errorf("writing: %w", syscall.EMFILE), Unavailable},
		{"cancelled", fmt.Errorf("x: %w", context.Canceled), Canceled},
		{"deadline", context.DeadlineExceeded, DeadlineExceeded},
		{"status", status.Error(codes.DataLoss, "bad"), DataLoss},
		{"wrapped status", fmt.Errorf("reading: %w", status.Error(codes.NotFound, "gone")), NotFound},
		{"kinded", New(DataLoss, "blob %s is corrupt", "abc"), DataLoss},
		{"kinded I/O keeps a cause's kind", IO(DataLossf("bad"), "reading"), DataLoss},
		{"I/O", IO(pathErr(syscall.EMFILE), "opening blob"), Unavailable},
		{"plain", errors.New("broken invariant"), Internal},
		{"unknown status", status.Error(codes.Unknown, "?"), Internal},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Of(tc.err); got != tc.want {
				t.Fatalf("Of(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}

func TestErrorKeepsCauseAndReadsInProductWords(t *testing.T) {
	cause := &fs.PathError{Op: "open", Path: "/c/blob", Err: syscall.EMFILE}
	err := IO(cause, "opening blob %s", "abc/3")
	if !errors.Is(err, syscall.EMFILE) {
		t.Fatalf("%v does not wrap EMFILE", err)
	}
	if got, want := err.Error(), "opening blob abc/3: open /c/blob: too many open files"; got != want {
		t.Fatalf("text %q, want %q", got, want)
	}
	if status.Code(err) != Unavailable || status.Code(fmt.Errorf("x: %w", err)) != Unavailable {
		t.Fatalf("status.Code does not see the kind of %v", err)
	}
	remote := status.Error(codes.Unavailable, "connection refused")
	err = New(Unavailable, "fetching blob %s: %w", "abc/3", remote)
	if got, want := err.Error(), "fetching blob abc/3: connection refused"; got != want {
		t.Fatalf("text %q, want %q", got, want)
	}
	if !errors.Is(err, remote) {
		t.Fatalf("%v does not wrap its cause", err)
	}
}
