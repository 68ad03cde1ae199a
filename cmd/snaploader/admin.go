package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cache/localcache"
	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/gc"
	"github.com/snaploader/snaploader/proto/inventorypb"
	"github.com/snaploader/snaploader/remote"
	"github.com/snaploader/snaploader/server"
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
			if err := kf.check(); err != nil {
				return err
			}
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
				// Invalidation needs the remote when there is one: an
				// invalidation the fleet does not see is refused.
				return remoteDown(cf.remote.primary(), err)
			}
			fmt.Printf("new version id %s for instance %q platform %.12s config %.12s\n", v, kf.instance, keys.GetBranchKey().GetPlatformHash(), kf.configHash)
			return nil
		},
	}
	cf.register(cmd)
	kf.register(cmd)
	kf.noRef = true
	return cmd
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
		Short: "List the snapshots in the local cache, with --remote s3://... in a bucket, with --remote grpc://... in a snaploader serve",
		Long: `ls lists snapshots, oldest first, with their key, age, sizes, the chunks each shares with the
snapshot saved before it under the same key, and a state: newest (the snapshot its key restores),
invalidated (its key was invalidated since it was saved: only --snapshot-id restores it), retained
(kept for --retention), expired (a collection may delete it) or broken (a chunk list is missing or
corrupt: it cannot restore). Without --remote it lists the local cache (ages from the cache's
recency); with --remote, a bucket or a snaploader serve. --json prints the same object for both.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			sf := storeFlags{remote: cf.remote.primary(), retention: retention, now: now, clockFromMetadata: fromMeta}
			if cf.remote.primary() != "" {
				if isREAPI(cf.remote.primary()) {
					return listServer(ctx, &cf.remote, &sf, asJSON)
				}
				return listRemote(ctx, &sf, asJSON)
			}
			opts, err := sf.options()
			if err != nil {
				return err
			}
			if fromMeta {
				return usagef("--clock-from-metadata is for s3:// remotes; the local cache's ages are its recency")
			}
			e, err := cf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			inv, err := gc.List(ctx, localListing(e.local, cf.group), opts)
			if err != nil {
				return fmt.Errorf("listing the local cache %s: %w", e.local.Dir(), err)
			}
			now := time.Now()
			if opts.Now != nil {
				now = opts.Now()
			}
			lt := listingOfServer(server.InventoryResponse(inv), now)
			lt.Store, lt.Location = "local", e.local.Dir()
			return printListing(lt, asJSON, "the cache's blobs")
		},
	}
	cf.register(cmd)
	fl := cmd.Flags()
	fl.BoolVar(&asJSON, "json", false, "print the listing as one JSON object")
	fl.StringVar(&retention, "retention", "7d", "the retention a snapshot that is not the newest under its key is judged by (retained or expired; as gc --retention)")
	fl.StringVar(&now, "now", "", "the clock, RFC 3339 (tests)")
	fl.BoolVar(&fromMeta, "clock-from-metadata", false, "with --remote s3://: ages from the write times recorded in object metadata (as gc)")
	_ = fl.MarkHidden("now")
	return cmd
}

// localListing is the local cache as a store to list: gc.LocalCache, with
// each snapshot-id manifest entry named as the remote names it, so that
// the listing tells a snapshot's id entry from the entries of its keys
// (the local cache keys its manifests by group too).
func localListing(c *localcache.Cache, group string) gc.Store {
	return &localIDs{Store: gc.LocalCache(c, group), group: group}
}

type localIDs struct {
	gc.Store
	group string
}

func (s *localIDs) ListEntries(ctx context.Context, fn func(gc.Entry) error) error {
	var all []gc.Entry
	if err := s.Store.ListEntries(ctx, func(e gc.Entry) error {
		all = append(all, e)
		return nil
	}); err != nil {
		return err
	}
	for _, e := range all {
		if ar, _, err := s.Store.ReadEntry(ctx, e); err == nil {
			if m, err := snapshot.DecodeManifestEntry(ar); err == nil {
				inst, id := m.Metadata.GetSnapshotKey().GetInstanceName(), m.Metadata.GetSnapshotId()
				lk, err1 := snapshot.LocalManifestKey(s.group, snapshot.SnapshotIDKey(inst, id))
				rk, err2 := snapshot.RemoteSnapshotIDManifestKey(inst, id)
				if err1 == nil && err2 == nil && lk.GetHash() == e.Hash {
					e.Hash = rk.GetHash()
				}
			}
		}
		if err := fn(e); err != nil {
			return err
		}
	}
	return nil
}

// lsRow is one snapshot of ls --json, local or remote alike. Every field
// is always present; shared_chunks_with_previous is null for the first
// snapshot of a key.
type lsRow struct {
	Instance          string    `json:"instance"`
	Scope             string    `json:"scope"`
	PlatformHash      string    `json:"platform_hash"`
	ConfigurationHash string    `json:"configuration_hash"`
	Runner            string    `json:"runner"`
	VersionID         string    `json:"version_id"`
	Ref               string    `json:"ref"`
	SnapshotID        string    `json:"snapshot_id"`
	DigestFunction    string    `json:"digest_function"`
	Completed         time.Time `json:"completed"`
	AgeSeconds        int64     `json:"age_seconds"`
	// State is newest, invalidated, retained, expired or broken.
	State        string   `json:"state"`
	Newest       bool     `json:"newest"`
	Live         bool     `json:"live"`
	Broken       bool     `json:"broken"`
	Invalidated  bool     `json:"invalidated"`
	LogicalBytes int64    `json:"logical_bytes"`
	StoredBytes  int64    `json:"stored_bytes"`
	Blobs        int      `json:"blobs"`
	MissingBlobs int      `json:"missing_blobs"`
	PreviousID   string   `json:"previous_snapshot_id"`
	SharedChunks *float64 `json:"shared_chunks_with_previous"`
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
		return remoteDown(sf.remote, fmt.Errorf("listing %s: %w", sf.remote, err))
	}
	now := time.Now()
	if opts.Now != nil {
		now = opts.Now()
	}
	lt := listingOfServer(server.InventoryResponse(inv), now)
	lt.Store, lt.Location = "remote", sf.remote
	return printListing(lt, asJSON, "the bucket's blobs")
}

// listing is the --json output of ls, local or remote alike.
type listing struct {
	// Store is "local" or "remote"; Location the cache directory or the
	// remote's URL.
	Store     string  `json:"store"`
	Location  string  `json:"location"`
	Snapshots []lsRow `json:"snapshots"`
	// LiveStoredBytes is what the blobs of live snapshots occupy, each
	// once; ReferencedStoredBytes what the blobs of every snapshot occupy;
	// StoredBytes and Blobs the whole blob store's.
	LiveStoredBytes       int64 `json:"live_stored_bytes"`
	ReferencedStoredBytes int64 `json:"referenced_stored_bytes"`
	StoredBytes           int64 `json:"stored_bytes"`
	Blobs                 int64 `json:"blobs"`
}

// printListing prints ls's table (or JSON); store names the blob store in
// the totals line.
func printListing(lt *listing, asJSON bool, store string) error {
	if asJSON {
		return printJSON(os.Stdout, lt)
	}
	rows := lt.Snapshots
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "INSTANCE\tPLATFORM\tCONFIG\tRUNNER\tVERSION\tREF\tSNAPSHOT\tAGE\tLOGICAL\tSTORED\tSHARED\tSTATE")
	for _, r := range rows {
		shared := "-"
		if r.SharedChunks != nil {
			shared = fmt.Sprintf("%.0f%%", 100**r.SharedChunks)
		}
		fmt.Fprintf(w, "%s\t%.12s\t%.12s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Instance, r.PlatformHash, r.ConfigurationHash, r.Runner,
			r.VersionID, r.Ref, r.SnapshotID, (time.Duration(r.AgeSeconds) * time.Second).String(), humanBytes(r.LogicalBytes), humanBytes(r.StoredBytes), shared, r.State)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	fmt.Printf("%d snapshots; stored, each blob once: %s for live snapshots, %s for all; %s: %d, %s\n",
		len(rows), humanBytes(lt.LiveStoredBytes), humanBytes(lt.ReferencedStoredBytes), store, lt.Blobs, humanBytes(lt.StoredBytes))
	return nil
}

func isREAPI(url string) bool {
	return strings.HasPrefix(url, "grpc://") || strings.HasPrefix(url, "grpcs://") || strings.HasPrefix(url, "unix://")
}

// listServer lists the snapshots a snaploader serve holds for this
// client's group, through its Inventory service. Other REAPI caches do
// not offer it (UNIMPLEMENTED): they cannot list their contents.
func listServer(ctx context.Context, rf *remoteFlags, sf *storeFlags, asJSON bool) error {
	opts, err := sf.options()
	if err != nil {
		return err
	}
	if sf.clockFromMetadata {
		return status.Errorf(codes.InvalidArgument, "--clock-from-metadata is for s3:// remotes; a server judges ages by its own backend")
	}
	apiKey := rf.apiKey
	if apiKey == "" {
		apiKey = os.Getenv("SNAPLOADER_API_KEY")
	}
	cannot := "only snaploader serve lists its snapshots; other REAPI caches cannot list their contents (the Remote Execution API has no listing call), they evict by themselves"
	c, err := remote.Dial(ctx, rf.primary(), remote.Options{APIKey: apiKey, APIKeyHeader: rf.apiKeyHdr, BearerToken: rf.bearer,
		CAFile: rf.caFile, ClientCertFile: rf.clientCert, ClientKeyFile: rf.clientKey, CallTimeout: rf.timeout, MaxRetries: -1})
	if err != nil {
		if errkind.Is(err, errkind.InvalidArgument) {
			return flagNamed(err)
		}
		return remoteDown(rf.primary(), fmt.Errorf("ls --remote %s: %w (%s)", rf.primary(), err, cannot))
	}
	defer c.Close()
	req := &inventorypb.ListSnapshotsRequest{RetentionSeconds: int64(opts.Retention / time.Second)}
	now := time.Now()
	if opts.Now != nil {
		now = opts.Now()
		req.Now = timestamppb.New(now)
	}
	resp, err := inventorypb.NewInventoryClient(c.Conn()).ListSnapshots(ctx, req)
	if status.Code(err) == codes.Unimplemented {
		return status.Errorf(codes.InvalidArgument, "ls --remote %s: REAPI caches cannot list their contents (the Remote Execution API has no listing call), and this one does not offer snaploader serve's listing; they evict by themselves", rf.primary())
	}
	if err != nil {
		return remoteDown(rf.primary(), fmt.Errorf("listing the snapshots of %s: %w", rf.primary(), err))
	}
	lt := listingOfServer(resp, now)
	lt.Store, lt.Location = "remote", rf.primary()
	return printListing(lt, asJSON, "the server's blobs")
}

// listingOfServer is the ls listing of an inventory in the listing
// service's form, ages as of now.
func listingOfServer(resp *inventorypb.ListSnapshotsResponse, now time.Time) *listing {
	lt := &listing{Snapshots: make([]lsRow, 0, len(resp.GetSnapshots())), LiveStoredBytes: resp.GetLiveStoredBytes(),
		ReferencedStoredBytes: resp.GetReferencedStoredBytes(), StoredBytes: resp.GetStoredBytes(), Blobs: resp.GetBlobs()}
	for _, l := range resp.GetSnapshots() {
		k, created := l.GetKey(), l.GetCompleted().AsTime()
		r := lsRow{
			Instance: k.GetInstanceName(), Scope: l.GetScope(), PlatformHash: k.GetPlatformHash(),
			ConfigurationHash: k.GetConfigurationHash(), Runner: k.GetRunnerId(), VersionID: k.GetVersionId(),
			Ref: k.GetRef(), SnapshotID: l.GetSnapshotId(), DigestFunction: l.GetDigestFunction(),
			Completed: created, AgeSeconds: int64(now.Sub(created).Seconds()), Newest: l.GetNewest(), Live: l.GetLive(),
			Broken: l.GetBroken(), Invalidated: l.GetInvalidated(), LogicalBytes: l.GetLogicalBytes(), StoredBytes: l.GetStoredBytes(),
			Blobs: int(l.GetBlobs()), MissingBlobs: int(l.GetMissingBlobs()), PreviousID: l.GetPreviousSnapshotId(),
			State: server.ListingState(l.GetBroken(), l.GetInvalidated(), l.GetNewest(), l.GetLive()),
		}
		if r.PreviousID != "" {
			shared := l.GetSharedChunks()
			r.SharedChunks = &shared
		}
		lt.Snapshots = append(lt.Snapshots, r)
	}
	return lt
}

func newVerifyCmd() *cobra.Command {
	var sf snapshotFlags
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Re-hash every blob a snapshot needs (local cache, else the remote), drop local copies that do not match; exit non-zero on any mismatch or missing blob",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			e, snap, err := sf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			bad := 0
			kind := errkind.NotFound // of the failures: DataLoss when any blob was corrupt
			ns := cache.Namespace{Group: sf.cf.group, Instance: snap.Key.GetInstanceName(), Function: snap.Function}
			check := func(what string, d *repb.Digest) {
				// The local copy is hashed whatever was verified before, and
				// dropped when it does not match, so the next restore
				// fetches it again.
				err := e.local.Verify(ctx, ns, d)
				if cache.IsNotFound(err) && e.remote != nil {
					var rc io.ReadCloser
					if rc, err = e.remote.Read(ctx, ns, d); err == nil {
						var got *repb.Digest
						// Stops at Ctrl-C even on a huge or endless blob.
						got, err = digest.ComputeReaderContext(ctx, snap.Function, rc)
						rc.Close()
						if err == nil && !digest.Equal(got, d) {
							err = cache.Corruptf("the remote's copy hashes to %s", digest.String(got))
						}
					}
				}
				if err != nil {
					if ctx.Err() != nil {
						return
					}
					bad++
					if cache.IsCorrupt(err) {
						kind = errkind.DataLoss
					} else if kind != errkind.DataLoss && !cache.IsNotFound(err) {
						kind = errkind.Of(err)
					}
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
				return errkind.New(kind, "snapshot %s: %d of %d blobs failed verification (corrupt local copies were dropped: the next restore fetches them again)", snap.Manifest.GetVmMetadata().GetSnapshotId(), bad, n)
			}
			fmt.Printf("snapshot %s: all %d blobs verified\n", snap.Manifest.GetVmMetadata().GetSnapshotId(), n)
			return nil
		},
	}
	sf.register(cmd, "verify this exact snapshot")
	return cmd
}
