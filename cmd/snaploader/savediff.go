package main

import (
	"context"
	"fmt"
	"math/bits"
	"os"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/snapshot"
)

// PageSizeKey is the VMConfiguration.extra key under which save records the
// guest page size given with --page-size (decimal bytes, e.g. "2097152"
// for memory backed by 2 MiB huge pages). Every chunked file of such a
// snapshot has a chunk size that is a multiple of it.
const PageSizeKey = "page_size"

// parsePageSize parses --page-size: bytes, or a number with a K/KiB, M/MiB
// or G/GiB suffix; a power of two from 4 KiB to 1 GiB. "" is 0 (not given).
func parsePageSize(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	n, err := parseBytes("--page-size", s)
	if err != nil || n > 1<<30 {
		return 0, usagef("--page-size %q: want a size such as 4KiB, 2MiB or 1GiB", s)
	}
	if n < cow.PageSize || bits.OnesCount64(uint64(n)) != 1 {
		return 0, usagef("--page-size %q: want a power of two from 4KiB to 1GiB", s)
	}
	return n, nil
}

// checkPageSize: a file of pageSize-byte pages must have a chunk size that
// is a multiple of it, so that a page server installs whole pages from one
// chunk.
func checkPageSize(what string, chunkSize, pageSize int64) error {
	if pageSize <= 0 || chunkSize%pageSize == 0 {
		return nil
	}
	return status.Errorf(codes.InvalidArgument,
		"%s: chunk size %d is not a multiple of the page size %d: memory backed by %d-byte pages is served in whole pages, which must not straddle chunks; use a chunk size such as %d",
		what, chunkSize, pageSize, pageSize, (chunkSize+pageSize-1)/pageSize*pageSize)
}

// recordedPageSize is the page size a manifest's configuration records, 0
// if none.
func recordedPageSize(cfg *snapshotpb.VMConfiguration) (int64, error) {
	v, ok := cfg.GetExtra()[PageSizeKey]
	if !ok {
		return 0, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < cow.PageSize || bits.OnesCount64(uint64(n)) != 1 {
		return 0, status.Errorf(codes.InvalidArgument, "VM configuration %s = %q is not a page size", PageSizeKey, v)
	}
	return n, nil
}

// diffPlan is the diff half of a save: sparse diff files merged over the
// chunked files of a base snapshot.
type diffPlan struct {
	base  *snapshot.Snapshot
	files map[string]string // chunked file name -> diff path
	order []string
	// chunkSize is --chunk-size when given explicitly (a diff keeps its
	// base's chunk size, which must then agree), else 0.
	chunkSize int64
	pageSize  int64
}

// diffBase finds the snapshot a diff is taken over: the snapshot id
// given, or else the one the key set restores now.
func diffBase(ctx context.Context, e *env, keys *snapshotpb.SnapshotKeySet, id string, gopts snapshot.GetOptions) (*snapshot.Snapshot, error) {
	if id != "" {
		snap, err := e.loader.GetSnapshotByID(ctx, keys.GetWriteKey().GetInstanceName(), id, gopts)
		if err != nil {
			return nil, fmt.Errorf("--diff-base %s: %w", id, err)
		}
		return snap, nil
	}
	snap, err := e.loader.GetSnapshot(ctx, keys, gopts)
	if err != nil {
		return nil, fmt.Errorf("finding the snapshot the diff was taken over (pass --diff-base ID to name it): %w", err)
	}
	return snap, nil
}

// mergedStore is a base chunked file with a diff merged over it.
type mergedStore struct {
	store *cow.Store
	stats cow.DiffStats
}

// mergeDiffs opens the base's chunked files the plan names lazily and
// merges each diff over its own; only the diffs' data regions are read and
// only the chunks they cover become dirty. The stores read from u, which
// the caller closes after saving.
func mergeDiffs(ctx context.Context, e *env, p *diffPlan) (*snapshot.Unpacked, []mergedStore, error) {
	id := p.base.Manifest.GetVmMetadata().GetSnapshotId()
	dir, err := os.MkdirTemp(e.local.TempDir(), "diff-base-")
	if err != nil {
		return nil, nil, fmt.Errorf("opening base snapshot %s: %w", id, err)
	}
	// Only the stores are used; artifact files unpacked alongside go.
	defer os.RemoveAll(dir)
	u, err := e.loader.UnpackSnapshot(ctx, p.base, dir, snapshot.UnpackOptions{ReadAhead: -1})
	if err != nil {
		return nil, nil, fmt.Errorf("opening base snapshot %s: %w", id, err)
	}
	merged, err := mergeInto(ctx, e, p, u)
	if err != nil {
		u.Close()
		return nil, nil, err
	}
	return u, merged, nil
}

// mergeInto merges each diff of the plan over its store in u, carrying the
// base's working set of the file over.
func mergeInto(ctx context.Context, e *env, p *diffPlan, u *snapshot.Unpacked) ([]mergedStore, error) {
	id := p.base.Manifest.GetVmMetadata().GetSnapshotId()
	var merged []mergedStore
	ws := map[string][]int64{}
	for _, w := range p.base.Manifest.GetVmMetadata().GetWorkingSets() {
		ws[w.GetFileName()] = w.GetOffsets()
	}
	for _, name := range p.order {
		s, ok := u.Stores[name]
		if !ok {
			var have []string
			for n := range u.Stores {
				have = append(have, strconv.Quote(n))
			}
			return nil, status.Errorf(codes.InvalidArgument, "--diff %s=%s: base snapshot %s has no chunked file %q (it has %s)", name, p.files[name], id, name, strings.Join(have, ", "))
		}
		if p.chunkSize > 0 && p.chunkSize != s.ChunkSize() {
			return nil, status.Errorf(codes.InvalidArgument, "--diff %s: --chunk-size %d differs from the chunk size %d of %q in base snapshot %s; a diff keeps its base's chunks", name, p.chunkSize, s.ChunkSize(), name, id)
		}
		if err := checkPageSize(fmt.Sprintf("--diff %s over base snapshot %s", name, id), s.ChunkSize(), p.pageSize); err != nil {
			return nil, err
		}
		st, err := s.MergeDiffFile(ctx, p.files[name])
		if err != nil {
			return nil, fmt.Errorf("--diff %s over base snapshot %s: %w", name, id, err)
		}
		if st.DiffSize > 0 && st.DataBytes == st.DiffSize {
			e.log.Warn("diff file has no holes: every page is taken as dirty (a diff copied without keeping holes is a full file; save it with --chunked)", "file", p.files[name])
		}
		s.CarryWorkingSet(ws[name])
		merged = append(merged, mergedStore{store: s, stats: st})
	}
	return merged, nil
}
