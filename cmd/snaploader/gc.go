package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache/s3cache"
	"github.com/snaploader/snaploader/gc"
)

// gcOptions are what gc collects (the bucket Remote names) and how.
type gcOptions struct {
	Remote string
	GC     gc.Options
	// ClockFromMetadata takes ages from the write times in object
	// metadata.
	ClockFromMetadata bool
	// List prints every object deleted; JSON prints one object; Progress
	// draws a counter.
	List, JSON, Progress bool
}

// runGC collects the bucket o names.
func runGC(ctx context.Context, o gcOptions, s streams) error {
	st, err := openStore(ctx, o.Remote, "gc", o.ClockFromMetadata)
	if err != nil {
		return err
	}
	var deleted []deletedObject
	var mu sync.Mutex
	if o.List {
		o.GC.OnDelete = func(k gc.Kind, id string, n int64) {
			mu.Lock()
			defer mu.Unlock()
			if o.JSON {
				deleted = append(deleted, deletedObject{Kind: string(k), Key: id, Bytes: n})
				return
			}
			verb := "deleted"
			if o.GC.DryRun {
				verb = "would delete"
			}
			fmt.Fprintf(s.Out, "%s %s %s %d\n", verb, k, id, n)
		}
	}
	bar := newCountBar(o.Progress, "gc: objects examined")
	o.GC.Progress = bar.Set
	rep, err := gc.Run(ctx, st, o.GC)
	bar.Finish()
	if err != nil {
		if rep != nil {
			printGCSummary(s.Err, rep)
		}
		return remoteDown(o.Remote, err)
	}
	if o.JSON {
		// deleted lists the objects with --list, else is empty.
		return printJSON(s.Out, struct {
			*gc.Report
			Deleted []deletedObject `json:"deleted"`
		}{rep, append([]deletedObject{}, deleted...)})
	}
	printGCSummary(s.Out, rep)
	return nil
}

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
