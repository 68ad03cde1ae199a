package main

import (
	"context"

	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/snapshot"
)

// keyOptions name a snapshot key set: the task whose keys it holds, and
// the universal ref its saves also publish under ("" for none).
type keyOptions struct {
	Task         snapshot.Task
	UniversalRef string
}

// defaultRef is the repository's default branch, the key set's last
// fallback.
func (k keyOptions) defaultRef() string { return k.Task.Env[snapshot.EnvDefaultBranch] }

// keySet is the key set k names, under e's loader.
func (e *env) keySet(ctx context.Context, k keyOptions) (*snapshotpb.SnapshotKeySet, error) {
	return e.loader.KeySet(ctx, k.Task, snapshot.KeySetOptions{UniversalRef: k.UniversalRef, Logger: e.log})
}
