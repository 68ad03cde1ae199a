package main

import (
	"context"
	"fmt"
)

// invalidateOptions name the key invalidate gives a fresh version id, and
// the caches it is written to.
type invalidateOptions struct {
	Cache cacheOptions
	Key   keyOptions
}

// runInvalidate writes a fresh version id for the key o names: every
// snapshot saved under it before is never returned again.
func runInvalidate(ctx context.Context, o invalidateOptions, s streams) error {
	e, err := openEnv(ctx, o.Cache)
	if err != nil {
		return err
	}
	defer e.Close()
	keys, err := e.keySet(ctx, o.Key)
	if err != nil {
		return err
	}
	v, err := e.loader.Invalidate(ctx, keys.GetBranchKey())
	if err != nil {
		// Invalidation needs the remote when there is one: an
		// invalidation the fleet does not see is refused.
		return remoteDown(o.Cache.Remote.primary(), err)
	}
	fmt.Fprintf(s.Out, "new version id %s for instance %q platform %.12s config %.12s\n", v, o.Key.Task.InstanceName, keys.GetBranchKey().GetPlatformHash(), o.Key.Task.ConfigurationHash)
	return nil
}
