package vmm

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/fusefs"
	"github.com/snaploader/snaploader/nbd"
	"github.com/snaploader/snaploader/qemu"
	"github.com/snaploader/snaploader/snapshot"
)

// RestoreStats are the timings of a Restore.
type RestoreStats struct {
	// Unpack is GetSnapshot's result turned into files and lazy stores.
	Unpack time.Duration
	// Serve is mounting the memory file and starting the NBD server.
	Serve time.Duration
	// Resume is QEMU starting, loading the device state and resuming.
	Resume time.Duration
	// Total is the whole Restore, until the guest runs.
	Total time.Duration
}

// RestoreStats returns the timings of a restored guest.
func (v *VM) RestoreStats() RestoreStats { return v.restore }

// RestoreOptions configure Restore.
type RestoreOptions struct {
	// Dir holds the unpacked files, the FUSE mount point (Dir/mnt), the NBD
	// socket and later state files; required.
	Dir string
	// SerialLog receives the serial console (Dir/serial.log when empty).
	SerialLog string
	// Unpack configures the lazy stores (read-ahead, working-set
	// prefetch).
	Unpack snapshot.UnpackOptions
	// Settle says when the guest's working set is complete: once the guest
	// runs, each store records the chunks it touches, in order, until the
	// rate of new ones settles (see cow.Store.RecordWorkingSet; by default
	// fewer than 2 new chunks per 250 ms for 1 s). The next save records
	// that list for the next restore to prefetch; a save before then
	// records every chunk touched so far.
	Settle cow.SettleOptions
}

// Restore runs snap lazily: its stores are opened without reading a
// chunk, memory is served through FUSE (shared: guest writes dirty its
// store), each disk through NBD, and QEMU loads the device state and
// resumes. ctx bounds the restore; the VM runs until Save or Close.
func (h *Host) Restore(ctx context.Context, snap *snapshot.Snapshot, opts RestoreOptions) (*VM, error) {
	start := time.Now()
	if opts.Dir == "" {
		return nil, status.Error(codes.InvalidArgument, "restore: a directory is required")
	}
	// The stores, mount and NBD server live as long as the VM.
	life, cancel := context.WithCancel(context.WithoutCancel(ctx))
	v := &VM{host: h, dir: opts.Dir, snap: snap, cancel: cancel, traceCtx: life, started: start}
	fail := func(err error) (*VM, error) {
		v.Close()
		return nil, fmt.Errorf("restoring snapshot %s: %w", snap.Manifest.GetVmMetadata().GetSnapshotId(), err)
	}
	u, err := h.opts.Loader.UnpackSnapshot(life, snap, filepath.Join(opts.Dir, "files"), opts.Unpack)
	if err != nil {
		return fail(err)
	}
	v.unpacked = u
	if v.machine, err = machineFromManifest(snap.Manifest, u.Files); err != nil {
		return fail(err)
	}
	mem := u.Stores[MemoryFile]
	if mem == nil || mem.Size() != v.machine.MemoryBytes {
		return fail(status.Errorf(codes.InvalidArgument, "chunked file %q is missing or not %d bytes", MemoryFile, v.machine.MemoryBytes))
	}
	for _, d := range v.machine.Disks {
		if u.Stores[DiskPrefix+d.Name] == nil {
			return fail(status.Errorf(codes.InvalidArgument, "no chunked file %q for disk %q", DiskPrefix+d.Name, d.Name))
		}
	}
	v.restore.Unpack = time.Since(start)

	serveStart := time.Now()
	mnt := filepath.Join(opts.Dir, "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return fail(errkind.IO(err, "creating mount point"))
	}
	v.fuse, err = fusefs.Mount(life, mnt, map[string]fusefs.File{MemoryFile: mem}, fusefs.Options{Logger: h.opts.Logger})
	if err != nil {
		return fail(status.Errorf(codes.Unavailable, "serving memory through FUSE on %s: %v", mnt, err))
	}
	cfg := h.qemuConfig(v.machine, filepath.Join(mnt, MemoryFile), opts.Dir, opts.SerialLog)
	if len(v.machine.Disks) > 0 {
		sock := filepath.Join(opts.Dir, "nbd.sock")
		os.Remove(sock)
		lis, err := net.Listen("unix", sock)
		if err != nil {
			return fail(status.Errorf(codes.Unavailable, "listening for NBD on %s: %v", sock, err))
		}
		v.nbdSrv = nbd.NewServer(nbd.Options{Logger: h.opts.Logger})
		for _, d := range v.machine.Disks {
			if err := v.nbdSrv.AddExport(d.Name, u.Stores[DiskPrefix+d.Name], false); err != nil {
				lis.Close()
				return fail(err)
			}
			cfg.Disks = append(cfg.Disks, qemu.Disk{Path: "nbd:unix:" + sock + ":exportname=" + d.Name})
		}
		v.nbdDone = make(chan struct{})
		go func() {
			defer close(v.nbdDone)
			v.nbdSrv.Serve(life, lis)
		}()
	}
	v.restore.Serve = time.Since(serveStart)

	resumeStart := time.Now()
	g, err := qemu.Restore(ctx, cfg, u.Files[StateFile])
	if err != nil {
		return fail(err)
	}
	v.guest = g
	v.restore.Resume = time.Since(resumeStart)
	v.restore.Total = time.Since(start)
	for _, s := range u.Stores {
		v.recording.Add(1)
		go func() {
			defer v.recording.Done()
			s.RecordWorkingSet(life, opts.Settle)
		}()
	}
	return v, nil
}
