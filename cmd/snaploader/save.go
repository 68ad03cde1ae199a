package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/snapshot"
)

// snapshotReport is what the --json objects of save and restore share.
// Every field is always present (zero, false or "" when it does not
// apply).
type snapshotReport struct {
	SnapshotID       string          `json:"snapshot_id"`
	Key              json.RawMessage `json:"key"`
	ManifestDigest   string          `json:"manifest_digest"`
	Source           string          `json:"source"`
	FallbackIndex    int             `json:"fallback_index"`
	ChunkSize        int64           `json:"chunk_size"`
	ChunksTotal      int             `json:"chunks_total"`
	ChunksWritten    int             `json:"chunks_written"`
	BytesWritten     int64           `json:"bytes_written"`
	BytesSkippedZero int64           `json:"bytes_skipped_zero"`
	DurationMS       int64           `json:"duration_ms"`
	// RemoteError says why the remote tier was not used: it was down, and
	// the command went on with the local cache (a save completed
	// locally); "" when it was used or there is none.
	RemoteError string `json:"remote_error"`
}

// report is the --json output of save.
type report struct {
	snapshotReport
	RemoteChunksWritten int  `json:"remote_chunks_written"`
	PublishedLocal      bool `json:"published_local"`
	PublishedRemote     bool `json:"published_remote"`
	// RemoteSkipped says why the save policy did not publish to the
	// remote ("" when it did, or there is no remote).
	RemoteSkipped string `json:"remote_skipped"`
	// Invalidated: the key was invalidated while the save ran.
	Invalidated bool `json:"invalidated"`
	// DiffBase is the snapshot --diff files were merged over, and
	// DiffBytesRead the bytes read from them (their data regions); ""
	// and 0 without --diff.
	DiffBase      string `json:"diff_base"`
	DiffBytesRead int64  `json:"diff_bytes_read"`
	// PageSize is the guest page size recorded with --page-size (0: none).
	PageSize int64 `json:"page_size"`
}

func keyJSON(k *snapshotpb.SnapshotKey) json.RawMessage {
	b, _ := protojson.MarshalOptions{EmitUnpopulated: true, UseProtoNames: true}.Marshal(k)
	return b
}

func parseNamed(flag string, vals []string) (map[string]string, []string, error) {
	m := map[string]string{}
	var order []string
	for _, v := range vals {
		name, path, ok := strings.Cut(v, "=")
		if !ok || name == "" || path == "" {
			return nil, nil, usagef("--%s %q: want NAME=PATH", flag, v)
		}
		if err := snapshot.ValidateName(name); err != nil {
			return nil, nil, usagef("--%s %q: %w", flag, v, err)
		}
		if _, dup := m[name]; dup {
			return nil, nil, usagef("--%s: duplicate name %q", flag, name)
		}
		m[name] = path
		order = append(order, name)
	}
	return m, order, nil
}

func newSaveCmd() *cobra.Command {
	var (
		cf        cacheFlags
		kf        keyFlags
		files     []string
		chunked   []string
		chunkSize int64
		asJSON    bool
		vcpus     int64
		memBytes  int64
		policy    string
		gf        getFlags
		diffs     []string
		baseID    string
		pageSize  string
	)
	cmd := &cobra.Command{
		Use:   "save",
		Short: "Save a snapshot (artifact files and chunked files) under the task's write key",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			start := time.Now()
			if err := kf.check(); err != nil {
				return err
			}
			if chunkSize <= 0 || chunkSize%cow.PageSize != 0 {
				return usagef("--chunk-size %d: want a positive multiple of %d", chunkSize, cow.PageSize)
			}
			fileMap, _, err := parseNamed("file", files)
			if err != nil {
				return err
			}
			chunkMap, chunkOrder, err := parseNamed("chunked", chunked)
			if err != nil {
				return err
			}
			if len(fileMap)+len(chunkMap)+len(diffs) == 0 {
				return usagef("nothing to save: give at least one --file, --chunked or --diff")
			}
			for n := range chunkMap {
				if _, dup := fileMap[n]; dup {
					return usagef("name %q given as both --file and --chunked", n)
				}
			}
			diffMap, diffOrder, err := parseNamed("diff", diffs)
			if err != nil {
				return err
			}
			for n := range diffMap {
				if fileMap[n] != "" || chunkMap[n] != "" {
					return usagef("name %q given as --diff and as --file or --chunked", n)
				}
			}
			if baseID != "" && len(diffMap) == 0 {
				return usagef("--diff-base names the snapshot --diff files were taken over; no --diff given")
			}
			ps, err := parsePageSize(pageSize)
			if err != nil {
				return err
			}
			for _, n := range chunkOrder {
				if err := checkPageSize("--chunked "+n+" with --chunk-size and --page-size", chunkSize, ps); err != nil {
					return err
				}
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
			sp, err := snapshot.ParseSavePolicy(policy)
			if err != nil {
				return err
			}
			gopts, err := gf.options()
			if err != nil {
				return err
			}
			pub := publishPlan{local: true, progress: !asJSON && stderrIsTerminal()}
			var skipped string
			pub.remote, pub.localManifest, skipped = decidePublish(ctx, e, keys, cf.remote.readOnly, sp, gopts, kf.defaultRef)
			if pub.remote && !e.remoteWritable {
				return status.Errorf(codes.FailedPrecondition, "saving to remote %s: the remote refuses action-cache updates from this client (a read-only key?), so nothing could be published; pass --remote-read-only to save locally only", cf.remote.primary())
			}
			if kf.universal != "" && keys.GetWriteKey().GetRef() != "" && keys.GetWriteKey().GetRef() != kf.universal {
				u := proto.Clone(keys.GetWriteKey()).(*snapshotpb.SnapshotKey)
				u.Ref = kf.universal
				pub.alsoKeys = append(pub.alsoKeys, u)
			}
			cfg := &snapshotpb.VMConfiguration{Vcpus: vcpus, MemoryBytes: memBytes}
			var diff *diffPlan
			if len(diffMap) > 0 {
				base, err := diffBase(ctx, e, keys, baseID, gopts)
				if err != nil {
					return err
				}
				if ps == 0 {
					// A diff of huge-page memory stays huge-page memory.
					if ps, err = recordedPageSize(base.Manifest.GetVmConfiguration()); err != nil {
						return fmt.Errorf("base snapshot %s: %w", base.Manifest.GetVmMetadata().GetSnapshotId(), err)
					}
				}
				diff = &diffPlan{base: base, files: diffMap, order: diffOrder, pageSize: ps}
				if cmd.Flags().Changed("chunk-size") {
					diff.chunkSize = chunkSize
				}
			}
			if ps > 0 {
				cfg.Extra = map[string]string{PageSizeKey: strconv.FormatInt(ps, 10)}
			}
			res, err := saveFiles(ctx, e, keys, fileMap, chunkMap, chunkOrder, chunkSize, cfg, pub, diff)
			if err != nil {
				return err
			}
			e.metrics.Saved(res.SaveResult)
			t := res.Totals()
			source := "local" // the tier manifest_digest names
			if !res.PublishedLocal {
				source = "remote"
			}
			rep := report{
				snapshotReport: snapshotReport{
					SnapshotID:       res.SnapshotID,
					Key:              keyJSON(res.Key),
					ManifestDigest:   res.ManifestKey.GetHash(),
					Source:           source,
					ChunkSize:        chunkSize,
					ChunksTotal:      t.ChunksTotal,
					ChunksWritten:    t.ChunksWritten,
					BytesWritten:     t.BytesWritten,
					BytesSkippedZero: t.BytesSkippedZero,
					DurationMS:       time.Since(start).Milliseconds(),
				},
				RemoteChunksWritten: t.RemoteChunksWritten,
				PublishedLocal:      res.PublishedLocal,
				PublishedRemote:     res.PublishedRemote,
				Invalidated:         res.Invalidated,
				PageSize:            ps,
			}
			if cfs := res.Manifest.GetChunkedFiles(); len(chunkOrder) == 0 && len(cfs) > 0 {
				rep.ChunkSize = cfs[0].GetChunkSize() // a diff keeps its base's
			}
			if diff != nil {
				rep.DiffBase = diff.base.Manifest.GetVmMetadata().GetSnapshotId()
				rep.DiffBytesRead = res.diffBytesRead
			}
			if err := e.remoteCheck(); err != nil {
				return err
			}
			if res.RemoteError != nil {
				rep.RemoteError = cliText(res.RemoteError)
			}
			rep.RemoteSkipped = skipped
			if asJSON {
				return printJSON(os.Stdout, rep)
			}
			if diff != nil {
				fmt.Printf("merged %s of diff data over snapshot %s\n", humanBytes(rep.DiffBytesRead), rep.DiffBase)
			}
			fmt.Printf("saved snapshot %s under ref %q: %d chunks (%d newly stored, %s), %s of zeros skipped, in %s\n",
				rep.SnapshotID, res.Key.GetRef(), rep.ChunksTotal, rep.ChunksWritten, humanBytes(rep.BytesWritten),
				humanBytes(rep.BytesSkippedZero), time.Duration(rep.DurationMS)*time.Millisecond)
			return nil
		},
	}
	cf.register(cmd)
	kf.register(cmd)
	fl := cmd.Flags()
	fl.StringArrayVar(&files, "file", nil, "artifact file NAME=PATH stored whole (repeatable)")
	fl.StringArrayVar(&chunked, "chunked", nil, "chunked file NAME=PATH split into chunks (repeatable)")
	fl.StringArrayVar(&diffs, "diff", nil, "chunked file NAME=PATH given as a sparse diff (a VMM's diff snapshot: as long as the memory, data only where pages were dirtied), merged over chunked file NAME of the --diff-base snapshot; only its data regions are read (repeatable)")
	fl.StringVar(&baseID, "diff-base", "", "snapshot id the --diff files were taken over (default: the snapshot the key set restores now)")
	fl.StringVar(&pageSize, "page-size", "", "guest page size of the chunked files, e.g. 2MiB for huge-page-backed memory: --chunk-size must be a multiple of it; recorded in the manifest (VM configuration extra "+PageSizeKey+")")
	sizeFlag(cmd, &chunkSize, "chunk-size", cow.DefaultChunkSize, "chunk size, a multiple of 4096 bytes (bytes, or KiB/MiB/GiB)")
	fl.BoolVar(&asJSON, "json", false, "print one JSON object")
	fl.Int64Var(&vcpus, "vcpus", 0, "VM configuration: vCPUs (recorded in the manifest)")
	sizeFlag(cmd, &memBytes, "memory-bytes", 0, "VM configuration: memory size (bytes, or KiB/MiB/GiB; recorded in the manifest)")
	fl.StringVar(&policy, "save-policy", "first-non-default-ref", "when a run on a non-default ref publishes to the remote: always, first-non-default-ref or none-available")
	gf.register(cmd)
	return cmd
}

// decidePublish applies the save policies: whether the remote
// gets this snapshot, decided by what this run would have started from, and
// whether a local manifest is written (not under newest when the snapshot
// is published remotely).
//
// A save that could publish and does not says why (skipped): on stderr, in
// --json as remote_skipped, and in the metrics.
func decidePublish(ctx context.Context, e *env, keys *snapshotpb.SnapshotKeySet, readOnly bool, sp snapshot.SavePolicy, gopts snapshot.GetOptions, defaultRef string) (remote, localManifest bool, skipped string) {
	if e.remote == nil {
		return false, true, ""
	}
	if readOnly {
		e.metrics.PublishSkipped("read_only")
		return false, true, "the remote is read-only here (--remote-read-only)"
	}
	loaded, err := e.loader.GetSnapshot(ctx, keys, gopts)
	if err != nil && status.Code(err) != codes.NotFound {
		e.log.Warn("looking up the current snapshot before saving", "err", err)
	}
	d := snapshot.DecidePublish(sp, keys.GetWriteKey().GetRef(), defaultRef, loaded)
	if !d.Publish {
		e.metrics.PublishSkipped(d.Label)
		e.log.Warn("not publishing to the remote", "reason", d.Reason)
	}
	return d.Publish, !(d.Publish && gopts.ReadPolicy == snapshot.Newest), d.Reason
}

// publishPlan says where a save goes.
type publishPlan struct {
	local, remote, localManifest, progress bool
	alsoKeys                               []*snapshotpb.SnapshotKey
}

// savedFiles is a SaveResult plus what merging diffs read.
type savedFiles struct {
	*snapshot.SaveResult
	diffBytesRead int64
}

// saveFiles splits the chunked files into the local cache and saves a
// snapshot under the key set's write key.
func saveFiles(ctx context.Context, e *env, keys *snapshotpb.SnapshotKeySet, files, chunked map[string]string, order []string, chunkSize int64, cfg *snapshotpb.VMConfiguration, pub publishPlan, diff *diffPlan) (*savedFiles, error) {
	out := &savedFiles{}
	var merged []*cow.Store
	if diff != nil {
		u, ms, err := mergeDiffs(ctx, e, diff)
		if err != nil {
			return nil, err
		}
		defer u.Close()
		for _, m := range ms {
			merged = append(merged, m.store)
			out.diffBytesRead += m.stats.BytesRead
		}
	}
	var total int64
	for _, name := range order {
		if fi, err := os.Stat(chunked[name]); err == nil {
			total += fi.Size()
		}
	}
	bar := newProgress(pub.progress, total, "saving")
	defer bar.Finish()
	var split []snapshot.NamedFile
	for _, name := range order {
		split = append(split, snapshot.NamedFile{Name: name, Path: chunked[name]})
	}
	// New chunks of the split files use the merged stores' digest
	// function (the diff base's): one function per snapshot.
	res, err := e.loader.CacheSnapshot(ctx, &snapshot.SaveRequest{
		Key:           keys.GetWriteKey(),
		Config:        cfg,
		Files:         files,
		ChunkedFiles:  split,
		ChunkSize:     chunkSize,
		Progress:      bar.Add,
		Chunked:       merged,
		Local:         pub.local,
		Remote:        pub.remote,
		LocalManifest: pub.localManifest,
		AlsoKeys:      pub.alsoKeys,
	})
	if err != nil {
		return nil, err
	}
	// A merged diff's stats are its save's: the chunks the diff dirtied.
	out.SaveResult = res
	return out, nil
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
