package stall

import (
	"context"
	"errors"
	"testing"
	"time"
)

var errStall = errors.New("no progress")

// The guard cancels its context once the timeout passes without
// progress, and Err names the stall instead of the cancellation.
func TestGuard(t *testing.T) {
	ctx, g := New(context.Background(), 100*time.Millisecond, errStall)
	defer g.Stop()
	for range 4 {
		time.Sleep(50 * time.Millisecond)
		g.Progress()
	}
	if ctx.Err() != nil || g.Stalled() {
		t.Fatal("the guard fired although progress was reported")
	}
	<-ctx.Done()
	if !g.Stalled() || !errors.Is(g.Err(context.Canceled), errStall) {
		t.Fatalf("after a stall: Stalled %v, Err %v", g.Stalled(), g.Err(context.Canceled))
	}
	if g.Err(nil) != nil {
		t.Fatal("Err(nil) is not nil")
	}
}

// A parent cancelled by its caller is not a stall.
func TestParentCancelIsNoStall(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	ctx, g := New(parent, time.Hour, errStall)
	defer g.Stop()
	cancel()
	<-ctx.Done()
	if g.Stalled() || !errors.Is(g.Err(context.Canceled), context.Canceled) {
		t.Fatal("a cancelled parent counts as a stall")
	}
}
