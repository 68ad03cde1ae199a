package main

import (
	"context"
	"fmt"
	"time"

	"github.com/snaploader/snaploader/snapshot"
)

// restoreOptions are what restore does: the snapshot it restores, and
// the directory it writes into.
type restoreOptions struct {
	Snapshot snapshotOptions
	// Out is the directory the snapshot's files are written into; Replace
	// lets it hold entries already.
	Out     string
	Replace bool
	// JSON prints one object; Progress draws a progress bar.
	JSON, Progress bool
}

// runRestore restores the snapshot o selects into o.Out.
func runRestore(ctx context.Context, o restoreOptions, s streams) error {
	start := time.Now()
	e, snap, err := openSnapshot(ctx, o.Snapshot)
	if err != nil {
		return err
	}
	defer e.Close()
	rep, err := restoreTo(ctx, e, snap, o.Out, restoreToOptions{replace: o.Replace, progress: o.Progress})
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
	if o.JSON {
		return printJSON(s.Out, rep)
	}
	fmt.Fprintf(s.Out, "restored snapshot %s from the %s cache (key ref %q, fallback %d) into %s in %s\n",
		rep.SnapshotID, rep.Source, snap.Key.GetRef(), rep.FallbackIndex, o.Out, time.Duration(rep.DurationMS)*time.Millisecond)
	reportOthers(s.Err, o.Out, rep.OtherFiles)
	return nil
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

// restoreToOptions configure restoreTo.
type restoreToOptions struct {
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
func restoreTo(ctx context.Context, e *env, snap *snapshot.Snapshot, out string, opts restoreToOptions) (*restoreReport, error) {
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
