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
	"net"
	"os"
	"path/filepath"
	"strconv"
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
	"github.com/snaploader/snaploader/proto/snapshotpb"
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

const mib = 1 << 20

// Disk is one virtio disk of a Machine.
type Disk struct {
	// Name identifies the disk in the snapshot (chunked file DiskPrefix+Name)
	// and is its NBD export name on restore.
	Name string
	// Path is the raw image file a booted guest uses.
	Path string
}

// Machine describes a guest.
type Machine struct {
	// MemoryBytes is the RAM size, a whole number of MiB.
	MemoryBytes int64
	// Kernel, Initrd and Append are the direct-boot kernel, its initramfs
	// (optional) and its command line.
	Kernel, Initrd, Append string
	// Disks are attached in order.
	Disks []Disk
}

func (m Machine) validate() error {
	if m.MemoryBytes <= 0 || m.MemoryBytes%mib != 0 {
		return status.Errorf(codes.InvalidArgument, "machine memory size %d bytes: want a positive whole number of MiB", m.MemoryBytes)
	}
	if m.Kernel == "" {
		return status.Error(codes.InvalidArgument, "machine has no kernel")
	}
	seen := map[string]bool{}
	for i, d := range m.Disks {
		if err := snapshot.ValidateName(DiskPrefix + d.Name); err != nil || d.Name == "" {
			return status.Errorf(codes.InvalidArgument, "machine disk %d: invalid name %q", i, d.Name)
		}
		if seen[d.Name] {
			return status.Errorf(codes.InvalidArgument, "machine disk %d: duplicate name %q", i, d.Name)
		}
		seen[d.Name] = true
	}
	return nil
}

// Configuration returns the VM configuration recorded for m (disk sizes
// are read from their files when sizes is nil).
func (m Machine) Configuration(sizes map[string]int64) (*snapshotpb.VMConfiguration, error) {
	cfg := &snapshotpb.VMConfiguration{
		Vcpus:         1,
		MemoryBytes:   m.MemoryBytes,
		Vmm:           VMMName,
		KernelCmdline: m.Append,
		Extra:         map[string]string{"machine": "q35"},
	}
	for _, d := range m.Disks {
		size, ok := sizes[d.Name]
		if !ok {
			fi, err := os.Stat(d.Path)
			if err != nil {
				return nil, status.Errorf(codes.NotFound, "disk %q at %s: %v", d.Name, d.Path, err)
			}
			size = fi.Size()
		}
		cfg.Disks = append(cfg.Disks, &snapshotpb.Disk{Name: d.Name, SizeBytes: size})
	}
	return cfg, nil
}

// machineFromManifest reads the machine of a saved snapshot: its
// configuration plus the unpacked kernel and initrd. Disk paths are left
// empty.
func machineFromManifest(m *snapshotpb.SnapshotManifest, files map[string]string) (Machine, error) {
	cfg := m.GetVmConfiguration()
	if v := cfg.GetVmm(); v != VMMName {
		return Machine{}, status.Errorf(codes.InvalidArgument, "snapshot %s is for VMM %q, not %q", m.GetVmMetadata().GetSnapshotId(), v, VMMName)
	}
	mc := Machine{MemoryBytes: cfg.GetMemoryBytes(), Kernel: files[KernelFile], Initrd: files[InitrdFile], Append: cfg.GetKernelCmdline()}
	for _, d := range cfg.GetDisks() {
		mc.Disks = append(mc.Disks, Disk{Name: d.GetName()})
	}
	if err := mc.validate(); err != nil {
		return Machine{}, fmt.Errorf("snapshot %s: %w", m.GetVmMetadata().GetSnapshotId(), err)
	}
	if files[StateFile] == "" {
		return Machine{}, status.Errorf(codes.InvalidArgument, "snapshot %s has no %s", m.GetVmMetadata().GetSnapshotId(), StateFile)
	}
	return mc, nil
}

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

// BootOptions configure Boot.
type BootOptions struct {
	// Dir holds the memory file, the state files and the QMP socket;
	// required.
	Dir string
	// SerialLog receives the serial console (Dir/serial.log when empty).
	SerialLog string
}

// Boot starts m from scratch with its RAM in Dir/memory (shared, so it
// holds guest memory at snapshot time) and its disks as image files.
func (h *Host) Boot(ctx context.Context, m Machine, opts BootOptions) (*VM, error) {
	if err := m.validate(); err != nil {
		return nil, err
	}
	if opts.Dir == "" {
		return nil, status.Error(codes.InvalidArgument, "boot: a directory is required")
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, errkind.IO(err, "boot")
	}
	v := &VM{host: h, machine: m, dir: opts.Dir, memPath: filepath.Join(opts.Dir, MemoryFile)}
	cfg := h.qemuConfig(m, v.memPath, opts.Dir, opts.SerialLog)
	for _, d := range m.Disks {
		cfg.Disks = append(cfg.Disks, qemu.Disk{Path: d.Path})
	}
	os.Remove(v.memPath) // a fresh guest starts from zeroed RAM
	g, err := qemu.Start(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("booting guest in %s: %w", opts.Dir, err)
	}
	v.guest = g
	return v, nil
}

// Attach takes over a QEMU started elsewhere with its RAM in memPath
// (memory-backend-file, share=on) and m's disks as image files, reachable
// through the QMP socket qmpSocket. Only Save and Close may be used.
func (h *Host) Attach(m Machine, memPath, qmpSocket, dir string) (*VM, error) {
	if err := m.validate(); err != nil {
		return nil, err
	}
	fi, err := os.Stat(memPath)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "memory file %s: %v", memPath, err)
	}
	if fi.Size() != m.MemoryBytes {
		return nil, status.Errorf(codes.InvalidArgument, "memory file %s has %d bytes, the machine %d", memPath, fi.Size(), m.MemoryBytes)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, errkind.IO(err, "attach")
	}
	return &VM{host: h, machine: m, dir: dir, memPath: memPath, qmpSock: qmpSocket}, nil
}

func (h *Host) qemuConfig(m Machine, memPath, dir, serial string) qemu.Config {
	if serial == "" {
		serial = filepath.Join(dir, "serial.log")
	}
	return qemu.Config{
		QEMUPath:    h.opts.QEMUPath,
		Accel:       h.opts.Accel,
		MemoryBytes: m.MemoryBytes,
		MemPath:     memPath,
		MemShare:    true,
		Kernel:      m.Kernel,
		Initrd:      m.Initrd,
		Append:      m.Append,
		SerialLog:   serial,
		QMPSocket:   filepath.Join(dir, "qmp.sock"),
	}
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
	// Dir holds the unpacked files (Dir/files, which must be missing or
	// empty unless Unpack.Replace), the FUSE mount point (Dir/mnt), the
	// NBD socket and later state files; required.
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
	var split []cow.SaveStats
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
		ns := v.host.opts.Loader.Namespace(opts.Key)
		defer func() {
			for _, s := range stores {
				s.Close()
			}
		}()
		paths := []struct{ name, path string }{{MemoryFile, v.memPath}}
		for _, d := range v.machine.Disks {
			paths = append(paths, struct{ name, path string }{DiskPrefix + d.Name, d.Path})
		}
		for _, p := range paths {
			s, ss, err := cow.FromFile(ctx, p.name, p.path, v.host.opts.Local, v.host.opts.Local, cow.Options{
				Namespace: ns,
				ChunkSize: v.host.opts.ChunkSize,
				TempDir:   v.host.opts.Local.TempDir(),
			})
			if err != nil {
				return nil, fmt.Errorf("splitting %s: %w", p.path, err)
			}
			stores = append(stores, s)
			split = append(split, ss)
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
		Chunked:       stores,
		Local:         opts.Local,
		Remote:        opts.Remote,
		LocalManifest: opts.LocalManifest,
	})
	if err != nil {
		return nil, err
	}
	// A split stored the chunks itself; the store's own save found them
	// clean.
	for i := range split {
		res.Files[i].SaveStats = split[i]
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
