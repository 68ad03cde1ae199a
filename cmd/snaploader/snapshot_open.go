package main

import (
	"context"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/snapshot"
)

// snapshotOptions select one snapshot: the newest usable one of Key's key
// set, or with ID the snapshot of that id under Instance.
type snapshotOptions struct {
	Cache    cacheOptions
	Get      snapshot.GetOptions
	ID       string
	Instance string
	// Key is the key set looked up when ID is "".
	Key keyOptions
}

// openSnapshot opens the caches and finds the snapshot; the caller closes
// the env. A lookup that finds no usable snapshot is a noSnapshotError.
func openSnapshot(ctx context.Context, o snapshotOptions) (*env, *snapshot.Snapshot, error) {
	e, err := openEnv(ctx, o.Cache)
	if err != nil {
		return nil, nil, err
	}
	var snap *snapshot.Snapshot
	if o.ID != "" {
		snap, err = e.loader.GetSnapshotByID(ctx, o.Instance, o.ID, o.Get)
	} else {
		snap, _, err = e.loader.FindSnapshot(ctx, o.Key.Task, snapshot.KeySetOptions{UniversalRef: o.Key.UniversalRef, Logger: e.log}, o.Get)
	}
	if err == nil || cache.IsNotFound(err) || cache.IsOutage(err) {
		e.metrics.Lookup(snap, err)
	}
	if err != nil {
		e.Close()
		if cache.IsNotFound(err) {
			err = &noSnapshotError{err}
		}
		return nil, nil, err
	}
	return e, snap, nil
}
