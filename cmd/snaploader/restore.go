package main

import (
	"context"
	"fmt"
	"os"
	"time"

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

// restoreReplaceHint says what --replace does, for restore and pager.
const restoreReplaceHint = "pass --replace to write the snapshot's files into it anyway (files of the same names are replaced, all others left as they are)"

func newRestoreCmd() *cobra.Command {
	var (
		sf      snapshotFlags
		out     string
		replace bool
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "restore",
		Short: "Restore the newest usable snapshot of the task's key set into a directory",
		Long: `restore writes the files of the key set's newest usable snapshot into --out.
--out must not exist (it is created) or be an empty directory: a directory that
holds anything is refused before a byte is written, naming what it holds. With
--replace, restore writes into it anyway: files with the snapshot's file names
are replaced, every other entry is left as it is and listed (on stderr, and as
"other_files" with --json).`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			start := time.Now()
			if out == "" {
				return usagef("--out is required")
			}
			// Before the cache is opened or a snapshot looked up.
			if err := checkOutDir("--out", out, replace, restoreReplaceHint); err != nil {
				return err
			}
			e, snap, err := sf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			rep, err := restoreTo(ctx, e, snap, out, restoreOptions{replace: replace, progress: !asJSON && stderrIsTerminal()})
			if err != nil {
				return outDirError("--out", err, restoreReplaceHint)
			}
			rep.DurationMS = time.Since(start).Milliseconds()
			if err := e.remoteCheck(); err != nil {
				return err
			}
			if err := e.loader.RemoteDown(); err != nil {
				rep.RemoteError = cliText(err)
			}
			rep.RemotesServed = e.remotesServed()
			if asJSON {
				return printJSON(os.Stdout, rep)
			}
			fmt.Printf("restored snapshot %s from the %s cache (key ref %q, fallback %d) into %s in %s\n",
				rep.SnapshotID, rep.Source, snap.Key.GetRef(), rep.FallbackIndex, out, time.Duration(rep.DurationMS)*time.Millisecond)
			reportOthers(out, rep.OtherFiles)
			return nil
		},
	}
	sf.register(cmd, "restore this exact snapshot instead of the key set's newest")
	cmd.Flags().StringVar(&out, "out", "", "directory to write the snapshot's files into: created if missing, else it must be empty (see --replace)")
	cmd.Flags().BoolVar(&replace, "replace", false, "write into an --out directory that already holds files: those with the snapshot's file names are replaced, all others are left as they are and listed")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	return cmd
}

// restoreReport is the --json output of restore.
type restoreReport struct {
	snapshotReport
	// Files maps each file of the snapshot to the path it was written to.
	Files map[string]string `json:"files"`
	// OtherFiles are the entries --out held that are not the snapshot's
	// files, left as they were (only --replace lets there be any); always
	// present, empty when none.
	OtherFiles []string `json:"other_files"`
	// RemotesServed are the remotes (--remote URLs, in their order) that
	// delivered blobs to this restore; [] when the local cache held them.
	RemotesServed []string `json:"remotes_served"`
}

// restoreOptions configure restoreTo.
type restoreOptions struct {
	// replace lets out hold entries already (snapshot.UnpackOptions.Replace).
	replace bool
	// progress draws a progress bar on stderr.
	progress bool
}

// restoreTo unpacks snap into out and writes every chunked file as a
// regular file (sparse where holes), reading through the lazy store.
// out must be missing or empty unless opts.replace. Unpacking first
// removes the temporary files that killed restores left in out (those no
// live process holds locked); every file is written under a temporary
// name of fileio.TempNameLen bytes whatever its own name, and renamed into
// place when complete.
func restoreTo(ctx context.Context, e *env, snap *snapshot.Snapshot, out string, opts restoreOptions) (*restoreReport, error) {
	bar := newProgress(opts.progress, snapshot.ChunkedBytes(snap), "restoring")
	defer bar.Finish()
	r, err := e.loader.Restore(ctx, snap, out, snapshot.RestoreOptions{
		UnpackOptions: snapshot.UnpackOptions{OnFetch: e.metrics.Fetched, Replace: opts.replace},
		Progress:      bar.Add,
	})
	if err != nil {
		return nil, err
	}
	rep := &restoreReport{
		snapshotReport: snapshotReport{
			SnapshotID:     snap.Manifest.GetVmMetadata().GetSnapshotId(),
			Key:            keyJSON(snap.Key),
			ManifestDigest: snap.ManifestKey.GetHash(),
			Source:         string(snap.Source),
			FallbackIndex:  snap.FallbackIndex,
			ChunkSize:      r.ChunkSize,
			ChunksTotal:    r.ChunksTotal,
		},
		Files:      r.Files,
		OtherFiles: r.Others,
	}
	if rep.Files == nil {
		rep.Files = map[string]string{}
	}
	return rep, nil
}
