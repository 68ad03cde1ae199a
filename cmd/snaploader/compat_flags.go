package main

import (
	"context"

	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/snapshot"
)

// open checks the flags and opens the caches they name.
func (f *cacheFlags) open(ctx context.Context) (*env, error) {
	o, err := f.options()
	if err != nil {
		return nil, err
	}
	return openEnv(ctx, o)
}

// keySet checks the flags and returns the key set they name.
func (f *keyFlags) keySet(ctx context.Context, e *env) (*snapshotpb.SnapshotKeySet, error) {
	k, err := f.options()
	if err != nil {
		return nil, err
	}
	return e.keySet(ctx, k)
}

// primary is the first --remote ("" without one).
func (f *remoteFlags) primary() string { return f.values().primary() }

// open checks the flags, opens the caches and finds the snapshot.
func (f *snapshotFlags) open(ctx context.Context) (*env, *snapshot.Snapshot, error) {
	o, err := f.options()
	if err != nil {
		return nil, nil, err
	}
	return openSnapshot(ctx, o)
}
