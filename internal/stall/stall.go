// Package stall bounds how long a call or a stream may go without
// progress: a Guard cancels its context when no progress was reported for
// its timeout, and turns the error the cancelled call returns into one
// that says so (kind DeadlineExceeded, which cache.IsOutage counts as an
// outage of the tier that stalled).
package stall

import (
	"context"
	"errors"
	"time"
)

// Guard watches one call or stream.
type Guard struct {
	parent  context.Context
	ctx     context.Context
	cancel  context.CancelCauseFunc
	timer   *time.Timer
	timeout time.Duration
	cause   error
}

// New returns a context derived from parent that is cancelled, with cause
// as its cause, once timeout passes without a call to Progress. A timeout
// of 0 or less never fires. Stop must be called when the guarded work is
// over.
func New(parent context.Context, timeout time.Duration, cause error) (context.Context, *Guard) {
	ctx, cancel := context.WithCancelCause(parent)
	g := &Guard{parent: parent, ctx: ctx, cancel: cancel, timeout: timeout, cause: cause}
	if timeout > 0 {
		g.timer = time.AfterFunc(timeout, func() { cancel(cause) })
	}
	return ctx, g
}

// Progress restarts the timeout.
func (g *Guard) Progress() {
	if g.timer != nil {
		g.timer.Reset(g.timeout)
	}
}

// Stop ends the watch and cancels the context.
func (g *Guard) Stop() {
	if g.timer != nil {
		g.timer.Stop()
	}
	g.cancel(context.Canceled)
}

// Stalled reports whether the guard fired (and the parent is still live).
func (g *Guard) Stalled() bool {
	return g.parent.Err() == nil && errors.Is(context.Cause(g.ctx), g.cause)
}

// Err returns the guard's cause in place of err when the guard fired and
// err is what the cancelled call returned; otherwise err unchanged.
func (g *Guard) Err(err error) error {
	if err != nil && g.Stalled() {
		return g.cause
	}
	return err
}
