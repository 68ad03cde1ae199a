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
	"github.com/snaploader/snaploader/gc"
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
	if err == nil || cache.IsNotFound(err) || cache.IsOutage(err) {
		e.metrics.Lookup(snap, err)
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
	var (
		cf        cacheFlags
		asJSON    bool
		retention string
		now       string
		fromMeta  bool
	)
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List the snapshots in the local cache, or with --remote s3://... in a bucket",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if cf.remote.url != "" {
				sf := storeFlags{remote: cf.remote.url, retention: retention, now: now, clockFromMetadata: fromMeta}
				return listRemote(ctx, &sf, asJSON)
			}
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
			if asJSON {
				return printJSON(os.Stdout, rows)
			}
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "SNAPSHOT\tREF\tINSTANCE\tFILES\tCHUNKED\tBYTES\tCOMPLETED")
			for _, r := range rows {
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%s\t%s\n", r.SnapshotID, r.Ref, r.Instance, r.Files, r.ChunkedFiles, humanBytes(r.Bytes), r.Completed.Format(time.RFC3339))
			}
			return w.Flush()
		},
	}
	cf.register(cmd)
	fl := cmd.Flags()
	fl.BoolVar(&asJSON, "json", false, "print the listing as JSON")
	fl.StringVar(&retention, "retention", "7d", "with --remote: the retention a snapshot's LIVE column is judged by (as gc --retention)")
	fl.StringVar(&now, "now", "", "with --remote: the clock, RFC 3339 (tests)")
	fl.BoolVar(&fromMeta, "clock-from-metadata", false, "with --remote: ages from the write times recorded in object metadata (as gc)")
	_ = fl.MarkHidden("now")
	return cmd
}

// remoteListing is one row of ls --remote --json.
type remoteListing struct {
	Instance          string    `json:"instance"`
	Scope             string    `json:"scope"`
	PlatformHash      string    `json:"platform_hash"`
	ConfigurationHash string    `json:"configuration_hash"`
	Runner            string    `json:"runner,omitempty"`
	VersionID         string    `json:"version_id"`
	Ref               string    `json:"ref"`
	SnapshotID        string    `json:"snapshot_id"`
	DigestFunction    string    `json:"digest_function"`
	Completed         time.Time `json:"completed"`
	AgeSeconds        int64     `json:"age_seconds"`
	Newest            bool      `json:"newest"`
	Live              bool      `json:"live"`
	Broken            bool      `json:"broken,omitempty"`
	LogicalBytes      int64     `json:"logical_bytes"`
	StoredBytes       int64     `json:"stored_bytes"`
	Blobs             int       `json:"blobs"`
	MissingBlobs      int       `json:"missing_blobs,omitempty"`
	PreviousID        string    `json:"previous_snapshot_id,omitempty"`
	SharedChunks      *float64  `json:"shared_chunks_with_previous,omitempty"`
}

func listRemote(ctx context.Context, sf *storeFlags, asJSON bool) error {
	opts, err := sf.options()
	if err != nil {
		return err
	}
	st, err := openStore(ctx, sf.remote, "ls", sf.clockFromMetadata)
	if err != nil {
		return err
	}
	inv, err := gc.List(ctx, st, opts)
	if err != nil {
		return fmt.Errorf("listing %s: %w", sf.remote, err)
	}
	now := time.Now()
	if opts.Now != nil {
		now = opts.Now()
	}
	rows := make([]remoteListing, 0, len(inv.Snapshots))
	for _, l := range inv.Snapshots {
		s := l.Snapshot
		r := remoteListing{
			Instance: s.Key.GetInstanceName(), Scope: s.Scope, PlatformHash: s.Key.GetPlatformHash(),
			ConfigurationHash: s.Key.GetConfigurationHash(), Runner: s.Key.GetRunnerId(), VersionID: s.Key.GetVersionId(),
			Ref: s.Key.GetRef(), SnapshotID: s.SnapshotID, DigestFunction: digest.FunctionName(s.Function),
			Completed: s.Created, AgeSeconds: int64(now.Sub(s.Created).Seconds()), Newest: len(s.KeyEntries) > 0, Live: s.Live,
			Broken: l.Broken, LogicalBytes: l.LogicalBytes, StoredBytes: l.StoredBytes, Blobs: l.Blobs, MissingBlobs: l.Missing,
			PreviousID: l.PreviousID,
		}
		if l.PreviousID != "" {
			r.SharedChunks = &l.SharedChunks
		}
		rows = append(rows, r)
	}
	if asJSON {
		return printJSON(os.Stdout, struct {
			Snapshots             []remoteListing `json:"snapshots"`
			LiveStoredBytes       int64           `json:"live_stored_bytes"`
			ReferencedStoredBytes int64           `json:"referenced_stored_bytes"`
			StoredBytes           int64           `json:"stored_bytes"`
			Blobs                 int64           `json:"blobs"`
		}{rows, inv.LiveStoredBytes, inv.ReferencedStoredBytes, inv.StoredBytes, inv.Blobs})
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "INSTANCE\tPLATFORM\tCONFIG\tRUNNER\tVERSION\tREF\tSNAPSHOT\tAGE\tLOGICAL\tSTORED\tSHARED\tSTATE")
	for _, r := range rows {
		shared := "-"
		if r.SharedChunks != nil {
			shared = fmt.Sprintf("%.0f%%", 100**r.SharedChunks)
		}
		state := "expired"
		switch {
		case r.Broken:
			state = "broken"
		case r.Newest:
			state = "newest"
		case r.Live:
			state = "retained"
		}
		fmt.Fprintf(w, "%s\t%.12s\t%.12s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Instance, r.PlatformHash, r.ConfigurationHash, r.Runner,
			r.VersionID, r.Ref, r.SnapshotID, (time.Duration(r.AgeSeconds) * time.Second).String(), humanBytes(r.LogicalBytes), humanBytes(r.StoredBytes), shared, state)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	fmt.Printf("%d snapshots; stored, each blob once: %s for live snapshots, %s for all; the bucket's blobs: %d, %s\n",
		len(rows), humanBytes(inv.LiveStoredBytes), humanBytes(inv.ReferencedStoredBytes), inv.Blobs, humanBytes(inv.StoredBytes))
	return nil
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
