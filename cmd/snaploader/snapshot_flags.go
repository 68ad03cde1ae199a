package main

import (
	"context"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/snapshot"
)

// getFlags choose how a snapshot is looked up.
type getFlags struct {
	policy   string
	maxStale string
}

func (f *getFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.policy, "read-policy", "local-first", "newest, local-first or local-only")
	cmd.Flags().StringVar(&f.maxStale, "max-stale", "24h", "maximum age of a fallback key's local snapshot (Go duration or days, e.g. 1d)")
}

func (f *getFlags) options() (snapshot.GetOptions, error) {
	p, err := snapshot.ParseReadPolicy(f.policy)
	if err != nil {
		return snapshot.GetOptions{}, err
	}
	d, err := parseDuration(f.maxStale)
	if err != nil {
		return snapshot.GetOptions{}, usagef("--max-stale: %w", err)
	}
	if d <= 0 {
		return snapshot.GetOptions{}, usagef("--max-stale %s: want a positive duration", f.maxStale)
	}
	return snapshot.GetOptions{ReadPolicy: p, MaxStaleFallbackAge: d}, nil
}

// snapshotFlags select one snapshot: the key set's newest usable one, or
// an exact one by --snapshot-id.
type snapshotFlags struct {
	cf cacheFlags
	kf keyFlags
	gf getFlags
	id string
}

func (f *snapshotFlags) register(cmd *cobra.Command, idHelp string) {
	f.cf.register(cmd)
	f.kf.register(cmd)
	f.gf.register(cmd)
	cmd.Flags().StringVar(&f.id, "snapshot-id", "", idHelp)
}

// check refuses missing key flags: with --snapshot-id only --instance is
// needed (the id names one snapshot of the instance), else the whole key.
func (f *snapshotFlags) check() error {
	if f.id == "" {
		return f.kf.check()
	}
	if f.kf.instance == "" {
		return usagef("--instance is required with --snapshot-id (the instance name the snapshot is stored under)")
	}
	return nil
}

// options are the snapshot the flags select and the caches to look in.
func (f *snapshotFlags) options() (snapshotOptions, error) {
	if err := f.check(); err != nil {
		return snapshotOptions{}, err
	}
	get, err := f.gf.options()
	if err != nil {
		return snapshotOptions{}, err
	}
	co, err := f.cf.options()
	if err != nil {
		return snapshotOptions{}, err
	}
	o := snapshotOptions{Cache: co, Get: get, ID: f.id, Instance: f.kf.instance}
	if f.id == "" {
		if o.Key, err = f.kf.options(); err != nil {
			return snapshotOptions{}, err
		}
	}
	return o, nil
}

// newSnapshotCmd is a command that acts on one snapshot chosen by
// snapshotFlags (inspect, verify): idHelp is the help of its
// --snapshot-id.
func newSnapshotCmd(use, short, idHelp string, run func(context.Context, snapshotOptions, streams) error) *cobra.Command {
	var sf snapshotFlags
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		RunE:  runE(sf.options, run),
	}
	sf.register(cmd, idHelp)
	return cmd
}
