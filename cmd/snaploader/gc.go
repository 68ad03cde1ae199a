package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/gc"
)

// openStore opens the tier --remote names for listing and collection: an
// S3 bucket. A REAPI cache has no listing, so it cannot be inventoried or
// collected (it evicts by itself).
func openStore(ctx context.Context, url, what string, clockFromMetadata bool) (gc.Store, error) {
	switch {
	case url == "":
		return nil, status.Errorf(codes.InvalidArgument, "%s needs --remote s3://BUCKET[/PREFIX]?endpoint=...", what)
	case strings.HasPrefix(url, "s3://"):
	case strings.HasPrefix(url, "grpc://"), strings.HasPrefix(url, "grpcs://"), strings.HasPrefix(url, "unix://"):
		return nil, status.Errorf(codes.InvalidArgument,
			"%s --remote %s: REAPI caches cannot list their contents (the Remote Execution API has no listing call), so they cannot be inventoried or collected; they evict by themselves. Use an s3:// remote", what, url)
	default:
		return nil, status.Errorf(codes.InvalidArgument, "--remote %q: want s3://BUCKET[/PREFIX]?endpoint=HOST:PORT", url)
	}
	c, err := s3cache.OpenURL(ctx, url, func(o *s3cache.Options) { o.ClockFromMetadata = clockFromMetadata })
	if err != nil {
		return nil, remoteDown(url, err)
	}
	return gc.S3(c), nil
}

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

func newGCCmd() *cobra.Command {
	var (
		sf         storeFlags
		grace      string
		dryRun     bool
		asJSON     bool
		list       bool
		batchSize  int
		batchPause time.Duration
	)
	cmd := &cobra.Command{
		Use:   "gc",
		Short: "Delete the snapshots an S3 tier no longer needs and the blobs only they used",
		Long: `gc collects an S3 tier: version entries and the newest snapshot under each key are
always kept, older snapshots for --retention, and every blob a kept snapshot names.
Unreferenced blobs younger than --grace are kept (a save may be about to name them).
Safe to run while hosts save and restore, from two places at once, and to kill.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			opts, err := sf.options()
			if err != nil {
				return err
			}
			g, err := parseDuration(grace)
			if err != nil || g <= 0 {
				return status.Errorf(codes.InvalidArgument, "--grace %q: want a positive duration such as 1h", grace)
			}
			opts.Grace, opts.DryRun, opts.BatchSize, opts.BatchPause = g, dryRun, batchSize, batchPause
			st, err := openStore(ctx, sf.remote, "gc", sf.clockFromMetadata)
			if err != nil {
				return err
			}
			var deleted []deletedObject
			var mu sync.Mutex
			if list {
				opts.OnDelete = func(k gc.Kind, id string, n int64) {
					mu.Lock()
					defer mu.Unlock()
					if asJSON {
						deleted = append(deleted, deletedObject{Kind: string(k), Key: id, Bytes: n})
						return
					}
					verb := "deleted"
					if dryRun {
						verb = "would delete"
					}
					fmt.Fprintf(os.Stdout, "%s %s %s %d\n", verb, k, id, n)
				}
			}
			bar := newCountBar(!asJSON && stderrIsTerminal(), "gc: objects examined")
			opts.Progress = bar.Set
			rep, err := gc.Run(ctx, st, opts)
			bar.Finish()
			if err != nil {
				if rep != nil {
					printGCSummary(os.Stderr, rep)
				}
				return remoteDown(sf.remote, err)
			}
			if asJSON {
				// deleted lists the objects with --list, else is empty.
				return printJSON(os.Stdout, struct {
					*gc.Report
					Deleted []deletedObject `json:"deleted"`
				}{rep, append([]deletedObject{}, deleted...)})
			}
			printGCSummary(os.Stdout, rep)
			return nil
		},
	}
	sf.register(cmd)
	fl := cmd.Flags()
	fl.StringVar(&grace, "grace", "1h", "unreferenced blobs younger than this are kept; longer than any save")
	fl.BoolVar(&dryRun, "dry-run", false, "delete nothing; report what a real run would delete")
	fl.BoolVar(&asJSON, "json", false, "print the report as one JSON object")
	fl.BoolVar(&list, "list", false, "print every object deleted (or, with --dry-run, that would be); in the JSON report as \"deleted\"")
	fl.IntVar(&batchSize, "batch-size", 1000, "blobs checked and deleted together")
	fl.DurationVar(&batchPause, "batch-pause", 0, "pause between deletion batches")
	_ = fl.MarkHidden("batch-pause")
	return cmd
}

type deletedObject struct {
	Kind  string `json:"kind"`
	Key   string `json:"key"`
	Bytes int64  `json:"bytes"`
}

func printGCSummary(w io.Writer, r *gc.Report) {
	verb := "deleted"
	if r.DryRun {
		verb = "would delete"
	}
	fmt.Fprintf(w, "snapshots: %d (%d live, %d expired", r.Snapshots, r.LiveSnapshots, r.ExpiredSnapshots)
	if r.BrokenSnapshots > 0 {
		fmt.Fprintf(w, ", %d live ones broken", r.BrokenSnapshots)
	}
	fmt.Fprintf(w, "); retention %s, grace %s\n", r.Retention, r.Grace)
	fmt.Fprintf(w, "entries: %d examined, %d kept, %s %d\n", r.Entries.Examined, r.Entries.Kept, verb, r.Entries.Deleted)
	fmt.Fprintf(w, "blobs:   %d examined (%s), %d kept (%s; %d live, %s), %s %d (%s)\n",
		r.Blobs.Examined, humanBytes(r.Blobs.ExaminedBytes), r.Blobs.Kept, humanBytes(r.Blobs.KeptBytes),
		r.LiveBlobs, humanBytes(r.LiveBytes), verb, r.Blobs.Deleted, humanBytes(r.Blobs.DeletedBytes))
}

// countBar draws a spinner with a count on stderr once a run has lasted a
// second; disabled, it draws nothing.
type countBar struct {
	mu      sync.Mutex
	enabled bool
	start   time.Time
	desc    string
	bar     *progressbar.ProgressBar
}

func newCountBar(enabled bool, desc string) *countBar {
	return &countBar{enabled: enabled, start: time.Now(), desc: desc}
}

func (b *countBar) Set(n int64) {
	if !b.enabled {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.bar == nil {
		if time.Since(b.start) < time.Second {
			return
		}
		b.bar = progressbar.NewOptions64(-1,
			progressbar.OptionSetWriter(os.Stderr),
			progressbar.OptionSetDescription(b.desc),
			progressbar.OptionShowCount(),
			progressbar.OptionShowIts(),
			progressbar.OptionSetItsString("objects"),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
	}
	_ = b.bar.Set64(n)
}

func (b *countBar) Finish() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.bar != nil {
		_ = b.bar.Finish()
	}
}
