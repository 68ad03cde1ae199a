// Command snaploader saves and restores microVM snapshots through a local
// content-addressed cache and an optional shared remote tier.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

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
		if s, ok := status.FromError(err); ok && s.Code() != 0 {
			fmt.Fprintf(os.Stderr, "snaploader: error kind: %s\n", s.Code())
		}
		os.Exit(1)
	}
}
