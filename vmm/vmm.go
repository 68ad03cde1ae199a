// Package vmm runs QEMU guests whose snapshots snaploader saves and restores
// lazily.
//
// A Host boots a guest with its RAM in a shared file-backed memory backend
// and its disks as image files (Boot), or restores a saved snapshot
// (Restore): the snapshot's memory is served as a FUSE file that QEMU maps
// shared, so guest writes return into the memory's copy-on-write store and
// dirty its chunks; each disk is an NBD export of its store on a unix
// socket. Chunks are fetched on first touch, from the local cache or through
// it from the remote tier. VM.Save pauses the guest, writes its device state
// through QMP migration (RAM stays in the memory file) and saves the
// snapshot: memory and disks as chunked files, device state, kernel and
// initrd as artifact files, and the machine in the VM configuration. A
// booted guest's files are split into chunks on save; a restored guest's
// stores are saved incrementally (only dirty chunks are written) and carry
// the chunks the guest touched, in order, until the rate of new touches
// settled, as the working set the next restore may prefetch.
package vmm

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/fusefs"
	"github.com/snaploader/snaploader/nbd"
	"github.com/snaploader/snaploader/qemu"
	"github.com/snaploader/snaploader/snapshot"
	"github.com/snaploader/snaploader/telemetry"
)

// Names of a snapshot's files.
const (
	// MemoryFile is the chunked file holding guest RAM.
	MemoryFile = "memory"
	// DiskPrefix starts the chunked file name of each disk: "disk-NAME".
	DiskPrefix = "disk-"
	// StateFile is the artifact file holding QEMU's device state.
	StateFile = "state.bin"
	// KernelFile and InitrdFile are the direct-boot kernel and initramfs.
	KernelFile = "vmlinuz"
	InitrdFile = "initrd"
	// VMMName is recorded as VMConfiguration.vmm.
	VMMName = "qemu"
)

// Options configure a Host.
type Options struct {
	// Loader saves and loads snapshots; required.
	Loader *snapshot.Loader
	// Local is the Loader's local tier: a booted guest's files are split
	// into it on save. Required.
	Local cache.Local
	// QEMUPath is the emulator ("qemu-system-x86_64" from PATH when empty).
	QEMUPath string
	// Accel is "tcg" (default) or "kvm".
	Accel string
	// ChunkSize splits a booted guest's files (default
	// cow.DefaultChunkSize); restored stores keep their snapshot's.
	ChunkSize int64
	// Logger receives FUSE and NBD I/O errors; nil discards them.
	Logger *slog.Logger
}

// Host boots, restores and saves guests on one machine.
type Host struct{ opts Options }

// NewHost returns a Host.
func NewHost(opts Options) (*Host, error) {
	if opts.Loader == nil || opts.Local == nil {
		return nil, status.Error(codes.InvalidArgument, "vmm host: a loader and its local cache are required")
	}
	if opts.ChunkSize == 0 {
		opts.ChunkSize = cow.DefaultChunkSize
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Host{opts: opts}, nil
}

// VM is a guest started by Boot or Restore.
type VM struct {
	host    *Host
	machine Machine
	dir     string
	guest   *qemu.Guest
	qmpSock string // external guest: QMP socket (guest is nil)

	// Booted guest: RAM file.
	memPath string
	// Restored guest.
	snap     *snapshot.Snapshot
	unpacked *snapshot.Unpacked
	fuse     *fusefs.Server
	nbdSrv   *nbd.Server
	nbdDone  chan struct{}
	cancel   context.CancelFunc
	restore  RestoreStats
	// recording runs each store's working-set recording until it settles
	// or the VM closes.
	recording sync.WaitGroup

	saves     int
	closeOnce sync.Once
	closeErr  error
	// traceCtx and started place the serving summary spans of a restored
	// VM in the trace of its restore.
	traceCtx context.Context
	started  time.Time
}

// Guest is the running QEMU (nil for an attached one).
func (v *VM) Guest() *qemu.Guest { return v.guest }

// Machine is the guest's machine; a restored guest's kernel and initrd
// are the unpacked files.
func (v *VM) Machine() Machine { return v.machine }

// Stores returns a restored guest's copy-on-write stores by chunked file
// name (nil for a booted guest).
func (v *VM) Stores() map[string]*cow.Store {
	if v.unpacked == nil {
		return nil
	}
	return v.unpacked.Stores
}

// Close stops QEMU if it still runs, unmounts the memory file, stops the
// NBD server and closes the stores.
func (v *VM) Close() error {
	v.closeOnce.Do(func() {
		if v.guest != nil {
			v.guest.Close()
		}
		if v.nbdSrv != nil {
			for _, d := range v.machine.Disks {
				v.nbdSrv.RemoveExport(d.Name)
			}
		}
		if v.fuse != nil {
			if err := v.fuse.Unmount(); err != nil {
				v.closeErr = err
			}
		}
		if v.cancel != nil {
			v.cancel()
		}
		v.recording.Wait()
		if v.nbdDone != nil {
			<-v.nbdDone
		}
		if v.fuse != nil {
			v.fuse.Wait()
		}
		v.traceServing()
		if v.unpacked != nil {
			if err := v.unpacked.Close(); err != nil && v.closeErr == nil {
				v.closeErr = err
			}
		}
	})
	return v.closeErr
}

// traceServing records what the NBD server and the stores served while the
// VM ran, as spans from its restore to now.
func (v *VM) traceServing() {
	if v.traceCtx == nil {
		return
	}
	if v.nbdSrv != nil {
		st := v.nbdSrv.Stats()
		_, span := telemetry.Tracer().Start(v.traceCtx, "snaploader.nbd_serve", trace.WithTimestamp(v.started), trace.WithAttributes(
			attribute.Int64("reads", st.Reads), attribute.Int64("writes", st.Writes), attribute.Int64("bytes_read", st.BytesRead),
			attribute.Int64("bytes_written", st.BytesWritten), attribute.Int64("errors", st.Errors), attribute.Int64("connections", st.Connections)))
		span.End()
	}
	for name, s := range v.Stores() {
		st := s.Stats()
		_, span := telemetry.Tracer().Start(v.traceCtx, "snaploader.store_serve", trace.WithTimestamp(v.started), trace.WithAttributes(
			attribute.String("file", name), attribute.Int64("fetched", st.Fetched), attribute.Int64("fetched_bytes", st.FetchedBytes),
			attribute.Int64("foreground_fetches", st.ForegroundFetches), attribute.Int64("prefetched", st.Prefetched),
			attribute.Int("dirty", st.Dirty), attribute.Int("touched", st.Touched)))
		span.End()
	}
}

// WriteFile copies a store's current contents (dirty chunks included) into
// a sparse regular file at path, e.g. a restored disk for offline
// inspection. Holes are not written.
func WriteFile(ctx context.Context, s *cow.Store, path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return errkind.IO(err, "writing %q to %s", s.Name(), path)
	}
	defer f.Close()
	size := s.Size()
	if err := f.Truncate(size); err != nil {
		return errkind.IO(err, "writing %q to %s", s.Name(), path)
	}
	cs := s.ChunkSize()
	buf := make([]byte, cs)
	zero := make([]byte, cs)
	for off := int64(0); off < size; off += cs {
		if err := ctx.Err(); err != nil {
			return status.FromContextError(err).Err()
		}
		n := min(cs, size-off)
		if _, err := s.ReadAt(buf[:n], off); err != nil {
			return fmt.Errorf("writing %q to %s: %w", s.Name(), path, err)
		}
		if bytes.Equal(buf[:n], zero[:n]) {
			continue
		}
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			return errkind.IO(err, "writing %q to %s at offset %d", s.Name(), path, off)
		}
	}
	if err := f.Close(); err != nil {
		return errkind.IO(err, "writing %q to %s", s.Name(), path)
	}
	return nil
}
