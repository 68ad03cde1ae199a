package main

import (
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// lsFlags are ls's flags.
type lsFlags struct {
	cf        cacheFlags
	asJSON    bool
	retention string
	now       string
	fromMeta  bool
}

func newLsCmd() *cobra.Command {
	var f lsFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *lsFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List the snapshots in the local cache, with --remote s3://... in a bucket, with --remote grpc://... in a snaploader serve",
		Long: `ls lists snapshots, oldest first, with their key, age, sizes, the chunks each shares with the
snapshot saved before it under the same key, and a state: newest (the snapshot its key restores),
invalidated (its key was invalidated since it was saved: only --snapshot-id restores it), retained
(kept for --retention), expired (a collection may delete it) or broken (a chunk list is missing or
corrupt: it cannot restore). Without --remote it lists the local cache (ages from the cache's
recency); with --remote, a bucket or a snaploader serve. --json prints the same object for both.`,
		RunE: runE(f.options, runLs),
	}
	f.cf.register(cmd)
	fl := cmd.Flags()
	fl.BoolVar(&f.asJSON, "json", false, "print the listing as one JSON object")
	fl.StringVar(&f.retention, "retention", "7d", "the retention a snapshot that is not the newest under its key is judged by (retained or expired; as gc --retention)")
	fl.StringVar(&f.now, "now", "", "the clock, RFC 3339 (tests)")
	fl.BoolVar(&f.fromMeta, "clock-from-metadata", false, "with --remote s3://: ages from the write times recorded in object metadata (as gc)")
	_ = fl.MarkHidden("now")
	return cmd
}

// options checks ls's flags: the retention and clock, and the caches when
// the listing is the local cache's. A remote listing takes the remote
// flags as they are.
func (f *lsFlags) options() (lsOptions, error) {
	o := lsOptions{Remote: f.cf.remote.values(), ClockFromMetadata: f.fromMeta, JSON: f.asJSON}
	sf := storeFlags{retention: f.retention, now: f.now}
	var err error
	if o.List, err = sf.options(); err != nil {
		return o, err
	}
	switch u := o.Remote.primary(); {
	case u != "" && isREAPI(u) && f.fromMeta:
		return o, status.Errorf(codes.InvalidArgument, "--clock-from-metadata is for s3:// remotes; a server judges ages by its own backend")
	case u != "":
		return o, nil
	case f.fromMeta:
		return o, usagef("--clock-from-metadata is for s3:// remotes; the local cache's ages are its recency")
	}
	o.Cache, err = f.cf.options()
	return o, err
}
