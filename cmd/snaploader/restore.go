package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/internal/fileio"
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
		return snapshot.GetOptions{}, fmt.Errorf("--max-stale: %w", err)
	}
	if d <= 0 {
		return snapshot.GetOptions{}, fmt.Errorf("--max-stale %s: want a positive duration", f.maxStale)
	}
	return snapshot.GetOptions{ReadPolicy: p, MaxStaleFallbackAge: d}, nil
}

func newRestoreCmd() *cobra.Command {
	var (
		sf     snapshotFlags
		out    string
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "restore",
		Short: "Restore the newest usable snapshot of the task's key set into a directory",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			start := time.Now()
			if out == "" {
				return fmt.Errorf("--out is required")
			}
			e, snap, err := sf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			rep, err := restoreTo(ctx, e, snap, out, !asJSON && stderrIsTerminal())
			if err != nil {
				return err
			}
			rep.DurationMS = time.Since(start).Milliseconds()
			if err := e.loader.RemoteDown(); err != nil {
				rep.RemoteError = err.Error()
			}
			if asJSON {
				return printJSON(os.Stdout, rep)
			}
			fmt.Printf("restored snapshot %s from the %s cache (key ref %q, fallback %d) into %s in %s\n",
				rep.SnapshotID, rep.Source, snap.Key.GetRef(), rep.FallbackIndex, out, time.Duration(rep.DurationMS)*time.Millisecond)
			return nil
		},
	}
	sf.register(cmd, "restore this exact snapshot instead of the key set's newest")
	cmd.Flags().StringVar(&out, "out", "", "directory to write the snapshot's files into")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	return cmd
}

// restoreTo unpacks snap into out and writes every chunked file as a
// regular file (sparse where holes), reading through the lazy store.
// Unpacking first removes the temporary files that killed restores left in
// out (those no live process holds locked); every file is written under a
// temporary name of fileio.TempNameLen bytes whatever its own name, and
// renamed into place when complete.
func restoreTo(ctx context.Context, e *env, snap *snapshot.Snapshot, out string, progress bool) (*report, error) {
	u, err := e.loader.UnpackSnapshot(ctx, snap, out, snapshot.UnpackOptions{OnFetch: e.metrics.Fetched})
	if err != nil {
		return nil, err
	}
	defer u.Close()
	rep := &report{
		SnapshotID:     snap.Manifest.GetVmMetadata().GetSnapshotId(),
		Key:            keyJSON(snap.Key),
		ManifestDigest: snap.ManifestKey.GetHash(),
		Source:         string(snap.Source),
		FallbackIndex:  snap.FallbackIndex,
		Files:          u.Files,
	}
	var total int64
	for _, cf := range snap.Manifest.GetChunkedFiles() {
		for _, c := range cf.GetChunks() {
			total += c.GetDigest().GetSizeBytes()
		}
	}
	bar := newProgress(progress, total, "restoring")
	defer bar.Finish()
	for _, cf := range snap.Manifest.GetChunkedFiles() {
		s := u.Stores[cf.GetName()]
		if s == nil {
			continue // an artifact file stored as chunks, unpacked as a file
		}
		path := filepath.Join(out, cf.GetName())
		if err := writeStore(ctx, s, path, bar.Add); err != nil {
			return nil, fmt.Errorf("writing chunked file %q: %w", cf.GetName(), err)
		}
		rep.Files[cf.GetName()] = path
		rep.ChunkSize = cf.GetChunkSize()
		rep.ChunksTotal += len(cf.GetChunks())
	}
	return rep, nil
}

// writeStore copies a store into a sparse regular file, skipping holes,
// with a few chunks in flight so fetching and writing overlap.
func writeStore(ctx context.Context, s *cow.Store, path string, progress func(int64)) error {
	// A fresh temporary name (never a file the snapshot unpacked, nor a
	// link planted at a predictable name), locked while this process
	// writes it: if the process is killed, the next restore into the
	// directory finds it unlocked and removes it.
	f, err := fileio.CreateTemp(filepath.Dir(path))
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	defer f.Close()
	if err := f.Chmod(0o644); err != nil {
		return err
	}
	if err := f.Truncate(s.Size()); err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(writeParallelism)
	bufs := sync.Pool{New: func() any { b := make([]byte, s.ChunkSize()); return &b }}
	for _, c := range s.ChunkedFile().GetChunks() {
		g.Go(func() error {
			if err := gctx.Err(); err != nil {
				return err
			}
			bp := bufs.Get().(*[]byte)
			defer bufs.Put(bp)
			n := c.GetDigest().GetSizeBytes()
			if _, err := s.ReadAt((*bp)[:n], c.GetOffset()); err != nil {
				return err
			}
			if _, err := f.WriteAt((*bp)[:n], c.GetOffset()); err != nil {
				return err
			}
			progress(n)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// writeParallelism is how many chunks writeStore has in flight.
const writeParallelism = 4
