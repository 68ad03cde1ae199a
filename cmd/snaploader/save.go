package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"time"

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
	// ArtifactsAsChunks names the artifact files the remote refused as
	// one blob, stored as chunked files instead ([] when none).
	ArtifactsAsChunks []string `json:"artifacts_as_chunks"`
}

func keyJSON(k *snapshotpb.SnapshotKey) json.RawMessage {
	b, _ := protojson.MarshalOptions{EmitUnpopulated: true, UseProtoNames: true}.Marshal(k)
	return b
}

// saveOptions are what save stores and where.
type saveOptions struct {
	Cache cacheOptions
	Key   keyOptions
	// Files are the artifact files by name, stored whole.
	Files map[string]string
	// Chunked are the files split into chunks by name, ChunkOrder their
	// names in the order given.
	Chunked    map[string]string
	ChunkOrder []string
	// Diffs are sparse diffs by chunked file name, merged over the
	// chunked files of DiffBase (a snapshot id; "": the snapshot the key
	// set restores now); DiffOrder their names in the order given.
	Diffs     map[string]string
	DiffOrder []string
	DiffBase  string
	// ChunkSize is the chunk size of the chunked files; ChunkSizeSet says
	// it was given (a diff then must keep it).
	ChunkSize    int64
	ChunkSizeSet bool
	// PageSize is the guest page size to record (0: none).
	PageSize int64
	// VCPUs and MemoryBytes are recorded in the VM configuration.
	VCPUs, MemoryBytes int64
	Policy             snapshot.SavePolicy
	Get                snapshot.GetOptions
	// JSON prints one object; Progress draws a progress bar.
	JSON, Progress bool
}

// runSave saves the snapshot o describes under the write key of its key
// set.
func runSave(ctx context.Context, o saveOptions, s streams) error {
	start := time.Now()
	e, err := openEnv(ctx, o.Cache)
	if err != nil {
		return err
	}
	defer e.Close()
	keys, err := e.keySet(ctx, o.Key)
	if err != nil {
		return err
	}
	pub := publishPlan{local: true, progress: o.Progress}
	var skipped string
	pub.remote, pub.localManifest, skipped = decidePublish(ctx, e, keys, o.Cache.Remote.ReadOnly, o.Policy, o.Get, o.Key.defaultRef())
	if pub.remote && !e.remoteWritable {
		return status.Errorf(codes.FailedPrecondition, "saving to remote %s: the remote refuses action-cache updates from this client (a read-only key?), so nothing could be published; pass --remote-read-only to save locally only", o.Cache.Remote.primary())
	}
	if u := o.Key.UniversalRef; u != "" && keys.GetWriteKey().GetRef() != "" && keys.GetWriteKey().GetRef() != u {
		k := proto.Clone(keys.GetWriteKey()).(*snapshotpb.SnapshotKey)
		k.Ref = u
		pub.alsoKeys = append(pub.alsoKeys, k)
	}
	cfg := &snapshotpb.VMConfiguration{Vcpus: o.VCPUs, MemoryBytes: o.MemoryBytes}
	ps := o.PageSize
	var diff *diffPlan
	if len(o.Diffs) > 0 {
		base, err := diffBase(ctx, e, keys, o.DiffBase, o.Get)
		if err != nil {
			return err
		}
		if ps == 0 {
			// A diff of huge-page memory stays huge-page memory.
			if ps, err = recordedPageSize(base.Manifest.GetVmConfiguration()); err != nil {
				return fmt.Errorf("base snapshot %s: %w", base.Manifest.GetVmMetadata().GetSnapshotId(), err)
			}
		}
		diff = &diffPlan{base: base, files: o.Diffs, order: o.DiffOrder, pageSize: ps}
		if o.ChunkSizeSet {
			diff.chunkSize = o.ChunkSize
		}
	}
	if ps > 0 {
		cfg.Extra = map[string]string{PageSizeKey: strconv.FormatInt(ps, 10)}
	}
	res, err := saveFiles(ctx, e, keys, o.Files, o.Chunked, o.ChunkOrder, o.ChunkSize, cfg, pub, diff)
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
			ChunkSize:        o.ChunkSize,
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
		ArtifactsAsChunks:   append([]string{}, res.ArtifactsAsChunks...),
	}
	if cfs := res.Manifest.GetChunkedFiles(); len(o.ChunkOrder) == 0 && len(cfs) > 0 {
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
	if o.JSON {
		return printJSON(s.Out, rep)
	}
	if diff != nil {
		fmt.Fprintf(s.Out, "merged %s of diff data over snapshot %s\n", humanBytes(rep.DiffBytesRead), rep.DiffBase)
	}
	fmt.Fprintf(s.Out, "saved snapshot %s under ref %q: %d chunks (%d newly stored, %s), %s of zeros skipped, in %s\n",
		rep.SnapshotID, res.Key.GetRef(), rep.ChunksTotal, rep.ChunksWritten, humanBytes(rep.BytesWritten),
		humanBytes(rep.BytesSkippedZero), time.Duration(rep.DurationMS)*time.Millisecond)
	return nil
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
