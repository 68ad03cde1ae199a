// Command snaploader saves and restores microVM snapshots through a local
// content-addressed cache and an optional shared remote tier.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root, tr := newRootCmd()
	err := root.ExecuteContext(ctx)
	tr.finish(err)
	if err != nil {
		fmt.Fprintf(os.Stderr, "snaploader: %v\n", err)
		fmt.Fprintf(os.Stderr, "snaploader: error kind: %s\n", errorKind(err))
		os.Exit(1)
	}
}

// errorKind is the gRPC code an error carries, or one that says what it
// is: a full disk or an oversized file is ResourceExhausted, another
// system error Internal, a bad command line InvalidArgument.
func errorKind(err error) codes.Code {
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown && s.Code() != codes.OK {
		return s.Code()
	}
	var errno syscall.Errno
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EFBIG), errors.Is(err, syscall.EDQUOT):
		return codes.ResourceExhausted
	case errors.As(err, &errno):
		return codes.Internal
	}
	return codes.InvalidArgument
}
