package main

import (
	"context"
	"fmt"
	"os"
	"sort"
	"text/tabwriter"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/snapshot"
)

func newInvalidateCmd() *cobra.Command {
	var (
		cf cacheFlags
		kf keyFlags
	)
	cmd := &cobra.Command{
		Use:   "invalidate",
		Short: "Write a fresh version id for the key: every snapshot saved before is never returned again",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			e, err := cf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			keys, err := kf.keySet(ctx, e)
			if err != nil {
				return err
			}
			v, err := e.loader.Invalidate(ctx, keys.GetBranchKey())
			if err != nil {
				return err
			}
			fmt.Printf("new version id %s for instance %q platform %.12s config %.12s\n", v, kf.instance, keys.GetBranchKey().GetPlatformHash(), kf.configHash)
			return nil
		},
	}
	cf.register(cmd)
	kf.register(cmd)
	return cmd
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

// open opens the caches and finds the snapshot; the caller closes the env.
func (f *snapshotFlags) open(ctx context.Context) (*env, *snapshot.Snapshot, error) {
	opts, err := f.gf.options()
	if err != nil {
		return nil, nil, err
	}
	e, err := f.cf.open(ctx)
	if err != nil {
		return nil, nil, err
	}
	var snap *snapshot.Snapshot
	if f.id != "" {
		snap, err = e.loader.GetSnapshotByID(ctx, f.kf.instance, f.id, opts)
	} else {
		var keys *snapshotpb.SnapshotKeySet
		if keys, err = f.kf.keySet(ctx, e); err == nil {
			snap, err = e.loader.GetSnapshot(ctx, keys, opts)
		}
	}
	if err != nil {
		e.Close()
		return nil, nil, err
	}
	return e, snap, nil
}

func newInspectCmd() *cobra.Command {
	var sf snapshotFlags
	cmd := &cobra.Command{
		Use:   "inspect",
		Short: "Print a snapshot's manifest as JSON",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			e, snap, err := sf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			b, err := protojson.MarshalOptions{Multiline: true, UseProtoNames: true}.Marshal(snap.Manifest)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(os.Stdout, "%s\n", b)
			return err
		},
	}
	sf.register(cmd, "inspect this exact snapshot")
	return cmd
}

func newLsCmd() *cobra.Command {
	var cf cacheFlags
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List the snapshot manifests in the local cache",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			e, err := cf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			rows, err := snapshot.ListLocal(ctx, e.local, cf.group)
			if err != nil {
				return err
			}
			sort.Slice(rows, func(i, j int) bool { return rows[i].Completed.After(rows[j].Completed) })
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "SNAPSHOT\tREF\tINSTANCE\tFILES\tCHUNKED\tBYTES\tCOMPLETED")
			for _, r := range rows {
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%s\t%s\n", r.SnapshotID, r.Ref, r.Instance, r.Files, r.ChunkedFiles, humanBytes(r.Bytes), r.Completed.Format(time.RFC3339))
			}
			return w.Flush()
		},
	}
	cf.register(cmd)
	return cmd
}

func newVerifyCmd() *cobra.Command {
	var sf snapshotFlags
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Re-hash every blob a snapshot needs (local cache, else the remote); exit non-zero on any mismatch or missing blob",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			e, snap, err := sf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			bad := 0
			ns := cache.Namespace{Group: sf.cf.group, Instance: snap.Key.GetInstanceName(), Function: snap.Function}
			check := func(what string, d *repb.Digest) {
				rc, err := e.local.Read(ctx, ns, d)
				if cache.IsNotFound(err) && e.remote != nil {
					rc, err = e.remote.Read(ctx, ns, d)
				}
				if err == nil {
					var got *repb.Digest
					// Stops at Ctrl-C even on a huge or endless blob.
					got, err = digest.ComputeReaderContext(ctx, snap.Function, rc)
					rc.Close()
					if err == nil && !digest.Equal(got, d) {
						err = fmt.Errorf("content hashes to %s", digest.String(got))
					}
				}
				if err != nil {
					if ctx.Err() != nil {
						return
					}
					bad++
					fmt.Printf("BAD  %s %s: %v\n", what, digest.String(d), err)
				}
			}
			n := 0
			for _, f := range snap.Manifest.GetFiles() {
				check(fmt.Sprintf("file %q", f.GetPath()), f.GetDigest())
				n++
			}
			for _, cfile := range snap.Manifest.GetChunkedFiles() {
				for _, c := range cfile.GetChunks() {
					check(fmt.Sprintf("chunk %q@%d", cfile.GetName(), c.GetOffset()), c.GetDigest())
					n++
				}
			}
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("verifying snapshot %s: interrupted: %w", snap.Manifest.GetVmMetadata().GetSnapshotId(), err)
			}
			if bad > 0 {
				return fmt.Errorf("snapshot %s: %d of %d blobs failed verification", snap.Manifest.GetVmMetadata().GetSnapshotId(), bad, n)
			}
			fmt.Printf("snapshot %s: all %d blobs verified\n", snap.Manifest.GetVmMetadata().GetSnapshotId(), n)
			return nil
		},
	}
	sf.register(cmd, "verify this exact snapshot")
	return cmd
}
