package main

import (
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/gc"
)

// storeFlags are the flags gc and ls --remote share.
type storeFlags struct {
	remote            string
	retention         string
	now               string
	clockFromMetadata bool
}

func (f *storeFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.remote, "remote", "", "S3 tier: s3://BUCKET[/PREFIX]?endpoint=HOST:PORT&secure=false (credentials from the standard AWS chain: environment, shared files with ?profile=, web identity, container or instance role)")
	fl.StringVar(&f.retention, "retention", "7d", "how long a snapshot that is no longer the newest under its key is kept (Go duration or days, e.g. 7d)")
	fl.StringVar(&f.now, "now", "", "the collector's clock, RFC 3339 (tests)")
	fl.BoolVar(&f.clockFromMetadata, "clock-from-metadata", false, "take ages from the write times snaploader records in object metadata (buckets copied or replicated, which resets LastModified)")
	_ = fl.MarkHidden("now")
}

func (f *storeFlags) options() (gc.Options, error) {
	var o gc.Options
	r, err := parseDuration(f.retention)
	if err != nil || r <= 0 {
		return o, status.Errorf(codes.InvalidArgument, "--retention %q: want a positive duration such as 7d or 36h", f.retention)
	}
	o.Retention = r
	if f.now != "" {
		t, err := time.Parse(time.RFC3339, f.now)
		if err != nil {
			return o, status.Errorf(codes.InvalidArgument, "--now %q: %v", f.now, err)
		}
		o.Now = func() time.Time { return t }
	}
	return o, nil
}

// gcFlags are gc's flags.
type gcFlags struct {
	sf         storeFlags
	grace      string
	dryRun     bool
	asJSON     bool
	list       bool
	batchSize  int
	batchPause time.Duration
}

func newGCCmd() *cobra.Command {
	var f gcFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *gcFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "gc",
		Short: "Delete the snapshots an S3 tier no longer needs and the blobs only they used",
		Long: `gc collects an S3 tier: version entries and the newest snapshot under each key are
always kept, older snapshots for --retention, and every blob a kept snapshot names.
Unreferenced blobs younger than --grace are kept (a save may be about to name them).
Safe to run while hosts save and restore, from two places at once, and to kill.`,
		RunE: runE(f.options, runGC),
	}
	f.sf.register(cmd)
	fl := cmd.Flags()
	fl.StringVar(&f.grace, "grace", "1h", "unreferenced blobs younger than this are kept; longer than any save")
	fl.BoolVar(&f.dryRun, "dry-run", false, "delete nothing; report what a real run would delete")
	fl.BoolVar(&f.asJSON, "json", false, "print the report as one JSON object")
	fl.BoolVar(&f.list, "list", false, "print every object deleted (or, with --dry-run, that would be); in the JSON report as \"deleted\"")
	fl.IntVar(&f.batchSize, "batch-size", 1000, "blobs checked and deleted together")
	fl.DurationVar(&f.batchPause, "batch-pause", 0, "pause between deletion batches")
	_ = fl.MarkHidden("batch-pause")
	return cmd
}

// options checks gc's flags: the retention, clock and grace.
func (f *gcFlags) options() (gcOptions, error) {
	opts, err := f.sf.options()
	if err != nil {
		return gcOptions{}, err
	}
	g, err := parseDuration(f.grace)
	if err != nil || g <= 0 {
		return gcOptions{}, status.Errorf(codes.InvalidArgument, "--grace %q: want a positive duration such as 1h", f.grace)
	}
	opts.Grace, opts.DryRun, opts.BatchSize, opts.BatchPause = g, f.dryRun, f.batchSize, f.batchPause
	return gcOptions{Remote: f.sf.remote, GC: opts, ClockFromMetadata: f.sf.clockFromMetadata, List: f.list, JSON: f.asJSON,
		Progress: !f.asJSON && stderrIsTerminal()}, nil
}
