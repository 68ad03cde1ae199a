package vmm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/qemu"
	"github.com/snaploader/snaploader/snapshot"
)

// SaveOptions say where a snapshot goes.
type SaveOptions struct {
	// Key is the write key; required.
	Key *snapshotpb.SnapshotKey
	// Local, Remote and LocalManifest are as in snapshot.SaveRequest.
	Local, Remote, LocalManifest bool
}

// SaveStats report a Save.
type SaveStats struct {
	// Result is the loader's result (per-file chunk counts).
	Result *snapshot.SaveResult
	// Snapshot is pausing the guest until QEMU exited.
	Snapshot qemu.SnapshotStats
	// DirtyBefore counts each store's dirty chunks after the guest stopped,
	// before the save (restored guests only).
	DirtyBefore map[string]int
	// Save is splitting or saving the files, after QEMU exited.
	Save time.Duration
	// Total is the whole Save.
	Total time.Duration
}

// Save pauses the guest, writes its device state and makes QEMU exit, then
// saves the snapshot under opts.Key. A restored guest's stores are saved
// incrementally and stay usable (e.g. to read its disk); a booted guest's
// memory file and disks are split into the local cache.
func (v *VM) Save(ctx context.Context, opts SaveOptions) (*SaveStats, error) {
	start := time.Now()
	if opts.Key == nil {
		return nil, status.Error(codes.InvalidArgument, "saving guest: no write key")
	}
	v.saves++
	state := filepath.Join(v.dir, "state-"+strconv.Itoa(v.saves)+".bin")
	st := &SaveStats{}
	var err error
	if v.guest != nil {
		st.Snapshot, err = v.guest.Snapshot(ctx, state)
	} else if v.qmpSock != "" {
		st.Snapshot, err = snapshotExternal(ctx, v.qmpSock, state)
	} else {
		err = status.Error(codes.FailedPrecondition, "guest is not running")
	}
	if err != nil {
		return nil, fmt.Errorf("snapshotting guest in %s: %w", v.dir, err)
	}
	v.guest = nil
	v.qmpSock = ""
	saveStart := time.Now()
	files := map[string]string{StateFile: state, KernelFile: v.machine.Kernel}
	if v.machine.Initrd != "" {
		files[InitrdFile] = v.machine.Initrd
	}
	sizes := map[string]int64{}
	var stores []*cow.Store
	var split []snapshot.NamedFile
	if v.unpacked != nil {
		// Pages QEMU dirtied reached the store when it closed the file.
		st.DirtyBefore = map[string]int{}
		stores = append(stores, v.unpacked.Stores[MemoryFile])
		for _, d := range v.machine.Disks {
			s := v.unpacked.Stores[DiskPrefix+d.Name]
			stores = append(stores, s)
			sizes[d.Name] = s.Size()
		}
		for _, s := range stores {
			st.DirtyBefore[s.Name()] = len(s.Dirty())
		}
	} else {
		// A booted guest's memory file and disks are split by the save.
		split = append(split, snapshot.NamedFile{Name: MemoryFile, Path: v.memPath})
		for _, d := range v.machine.Disks {
			split = append(split, snapshot.NamedFile{Name: DiskPrefix + d.Name, Path: d.Path})
		}
	}
	cfg, err := v.machine.Configuration(sizes)
	if err != nil {
		return nil, err
	}
	res, err := v.host.opts.Loader.CacheSnapshot(ctx, &snapshot.SaveRequest{
		Key:           opts.Key,
		Config:        cfg,
		Files:         files,
		ChunkedFiles:  split,
		ChunkSize:     v.host.opts.ChunkSize,
		Chunked:       stores,
		Local:         opts.Local,
		Remote:        opts.Remote,
		LocalManifest: opts.LocalManifest,
	})
	if err != nil {
		return nil, err
	}
	st.Result = res
	st.Save = time.Since(saveStart)
	st.Total = time.Since(start)
	return st, nil
}

// snapshotExternal snapshots a QEMU this process did not start: pause,
// device state to stateFile through migration (shared RAM stays in its
// file), quit, and wait until the QMP connection closes.
func snapshotExternal(ctx context.Context, sock, stateFile string) (qemu.SnapshotStats, error) {
	var st qemu.SnapshotStats
	start := time.Now()
	q, err := qemu.DialQMP(ctx, sock)
	if err != nil {
		return st, err
	}
	defer q.Close()
	if err := q.Stop(ctx); err != nil {
		return st, fmt.Errorf("pausing guest: %w", err)
	}
	if err := q.MigrateSetCapabilities(ctx, map[string]bool{"x-ignore-shared": true}); err != nil {
		return st, fmt.Errorf("setting migration capabilities: %w", err)
	}
	if err := q.Migrate(ctx, "exec:cat > '"+shellEscape(stateFile)+"'"); err != nil {
		return st, fmt.Errorf("starting migration to %s: %w", stateFile, err)
	}
	if _, err := q.WaitMigration(ctx, "completed"); err != nil {
		return st, fmt.Errorf("saving device state to %s: %w", stateFile, err)
	}
	st.Migration = time.Since(start)
	if err := q.Quit(ctx); err != nil {
		return st, fmt.Errorf("quitting qemu: %w", err)
	}
	select {
	case <-q.Done():
	case <-ctx.Done():
		return st, status.FromContextError(ctx.Err()).Err()
	}
	st.Total = time.Since(start)
	fi, err := os.Stat(stateFile)
	if err != nil {
		return st, errkind.IO(err, "state file %s", stateFile)
	}
	st.StateBytes = fi.Size()
	return st, nil
}

// shellEscape escapes s for use inside single quotes.
func shellEscape(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] == '\'' {
			out = append(out, `'\''`...)
		} else {
			out = append(out, s[i])
		}
	}
	return string(out)
}
