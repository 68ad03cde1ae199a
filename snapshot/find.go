package snapshot

import (
	"context"

	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// FindSnapshot derives the task's key set with the current version id and
// finds its first usable snapshot: what KeySet then GetSnapshot return, in
// fewer round trips to the remote. The version id rarely changes, so while
// the remote's id is read, the key set is looked up under the id this host
// last saw (kept in its local cache): when the remote agrees, as it
// usually does, the lookups already under way stand, and a restore costs
// the version read and the lookups in one round trip instead of two; when
// it does not (an invalidation, or a host that never saw the key), the
// lookups under the stale id are dropped and the key set is looked up
// again under the remote's. Nothing a lookup under a stale id finds is
// returned.
func (l *Loader) FindSnapshot(ctx context.Context, t Task, kopts KeySetOptions, gopts GetOptions) (*Snapshot, *snapshotpb.SnapshotKeySet, error) {
	if _, err := gopts.withDefaults(); err != nil {
		return nil, nil, err
	}
	if kopts.Logger == nil {
		kopts.Logger = l.opts.Logger
	}
	probe := &snapshotpb.SnapshotKey{InstanceName: t.InstanceName, PlatformHash: t.PlatformHash, ConfigurationHash: t.ConfigurationHash}
	seen := ""
	if l.remoteUp() {
		if ar, err := l.getEntry(ctx, false, t.InstanceName, VersionKey(probe)); err == nil {
			seen, _ = versionFromResult(ar)
		}
	}
	if seen == "" {
		// Nothing to go on (or no remote to wait for): one step after
		// the other.
		keys, err := l.KeySet(ctx, t, kopts)
		if err != nil {
			return nil, nil, err
		}
		snap, err := l.GetSnapshot(ctx, keys, gopts)
		return snap, keys, err
	}
	type found struct {
		snap *Snapshot
		err  error
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	spec := NewKeySet(t, seen, kopts)
	specDone := make(chan found, 1)
	go func() {
		snap, err := l.GetSnapshot(sctx, spec, gopts)
		specDone <- found{snap, err}
	}()
	v, err := l.CurrentVersion(ctx, probe)
	if err != nil {
		cancel()
		<-specDone
		return nil, nil, err
	}
	if v == seen {
		r := <-specDone
		return r.snap, spec, r.err
	}
	cancel()
	<-specDone
	l.opts.Logger.Debug("version id changed since this host last saw it; looking the key set up again", "was", seen, "now", v)
	keys := NewKeySet(t, v, kopts)
	snap, err := l.GetSnapshot(ctx, keys, gopts)
	return snap, keys, err
}
