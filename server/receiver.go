package server

import (
	"context"
	"fmt"
	"time"

	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// receiver receives a write stream's messages in its own goroutine, so
// that the handler can give up on a stream that goes idle.
type receiver struct {
	ch   chan recvResult
	done chan struct{}
	idle time.Duration
}

type recvResult struct {
	req *bspb.WriteRequest
	err error
}

// idleError is a stream that sent nothing for the idle timeout.
type idleError struct{ d time.Duration }

func (e *idleError) Error() string {
	return fmt.Sprintf("no message for %v: upload aborted", e.d)
}

func (e *idleError) GRPCStatus() *status.Status {
	return status.New(codes.DeadlineExceeded, e.Error())
}

func newReceiver(stream bspb.ByteStream_WriteServer, idle time.Duration) *receiver {
	r := &receiver{ch: make(chan recvResult), done: make(chan struct{}), idle: idle}
	go func() {
		for {
			req, err := stream.Recv()
			select {
			case r.ch <- recvResult{req, err}:
			case <-r.done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return r
}

// next returns the next message, or an idleError after the idle timeout.
func (r *receiver) next(ctx context.Context) (*bspb.WriteRequest, error) {
	t := time.NewTimer(r.idle)
	defer t.Stop()
	select {
	case res := <-r.ch:
		return res.req, res.err
	case <-t.C:
		return nil, &idleError{r.idle}
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

// stop lets the receiving goroutine end (it does once the call is over).
func (r *receiver) stop() { close(r.done) }
