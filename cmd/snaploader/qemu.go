package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/snaploader/snaploader/snapshot"
	"github.com/snaploader/snaploader/vmm"
)

// qemuHostOptions configure the emulator.
type qemuHostOptions struct {
	Accel, QEMUPath string
	// ChunkSize is the chunk size of a first save (0: the default).
	ChunkSize int64
}

// qemuRestoreOptions are what qemu restore runs: the snapshot, restored
// lazily into Dir (a temporary directory when ""), until the guest exits
// or the command is interrupted.
type qemuRestoreOptions struct {
	Snapshot  snapshotOptions
	Host      qemuHostOptions
	Dir       string
	SerialLog string
	// SaveOnExit saves the guest under SaveKey's write key when the
	// command is interrupted.
	SaveOnExit bool
	SaveKey    keyOptions
	Prefetch   bool
	ReadAhead  int
	// Replace lets Dir hold entries already.
	Replace bool
}

// qemuBootOptions are what qemu boot runs: Machine, with its memory file
// and state in Dir.
type qemuBootOptions struct {
	Cache     cacheOptions
	Host      qemuHostOptions
	Machine   vmm.Machine
	Dir       string
	SerialLog string
	// SaveOnExit saves the guest under SaveKey's write key when the
	// command is interrupted.
	SaveOnExit bool
	SaveKey    keyOptions
}

// qemuSaveOptions are the running QEMU qemu save snapshots (its QMP socket
// and memory file) and the key it saves under; the device state goes to
// Dir (a temporary directory when "").
type qemuSaveOptions struct {
	Cache      cacheOptions
	Key        keyOptions
	Host       qemuHostOptions
	Machine    vmm.Machine
	QMPSocket  string
	MemoryFile string
	Dir        string
}

// qemuReplaceHint says what --replace does for the qemu commands' --dir.
const qemuReplaceHint = "pass --replace to use it anyway (files named like the guest's files there are replaced, all others left as they are)"

func (o qemuHostOptions) host(e *env) (*vmm.Host, error) {
	return vmm.NewHost(vmm.Options{Loader: e.loader, Local: e.local, QEMUPath: o.QEMUPath, Accel: o.Accel, ChunkSize: o.ChunkSize, Logger: e.log})
}

// open opens the cache c names and the VM host on it; the caller closes
// the env.
func (o qemuHostOptions) open(ctx context.Context, c cacheOptions) (*env, *vmm.Host, error) {
	e, err := openEnv(ctx, c)
	if err != nil {
		return nil, nil, err
	}
	h, err := o.host(e)
	if err != nil {
		e.Close()
		return nil, nil, err
	}
	return e, h, nil
}

// hostIn returns the VM host and a work directory: dir, or a temporary one
// that cleanup removes.
func (o qemuHostOptions) hostIn(e *env, dir string) (*vmm.Host, string, func(), error) {
	h, err := o.host(e)
	if err != nil {
		return nil, "", nil, err
	}
	dir, cleanup, err := workDir(dir)
	if err != nil {
		return nil, "", nil, err
	}
	return h, dir, cleanup, nil
}

// workDir is dir, or a temporary directory that cleanup removes.
func workDir(dir string) (string, func(), error) {
	if dir != "" {
		return dir, func() {}, nil
	}
	tmp, err := os.MkdirTemp("", "snaploader-vm-")
	if err != nil {
		return "", nil, err
	}
	return tmp, func() { os.RemoveAll(tmp) }, nil
}

// runQemuRestore restores the snapshot o selects lazily (memory through
// FUSE, disks through NBD) and runs it until it exits or is interrupted.
func runQemuRestore(ctx context.Context, o qemuRestoreOptions, s streams) error {
	e, snap, err := openSnapshot(ctx, o.Snapshot)
	if err != nil {
		return err
	}
	defer e.Close()
	h, dir, cleanup, err := o.Host.hostIn(e, o.Dir)
	if err != nil {
		return err
	}
	defer cleanup()
	v, err := h.Restore(ctx, snap, vmm.RestoreOptions{Dir: dir, SerialLog: o.SerialLog,
		Unpack: snapshot.UnpackOptions{ReadAhead: o.ReadAhead, PrefetchWorkingSet: o.Prefetch, OnFetch: e.metrics.Fetched, Replace: o.Replace}})
	if err != nil {
		return outDirError("--dir", err, qemuReplaceHint)
	}
	rs := v.RestoreStats()
	fmt.Fprintf(s.Out, "restored snapshot %s from the %s cache; guest running after %s (unpack %s, resume %s); serial log %s\n",
		snap.Manifest.GetVmMetadata().GetSnapshotId(), snap.Source, rs.Total.Round(time.Millisecond),
		rs.Unpack.Round(time.Millisecond), rs.Resume.Round(time.Millisecond), v.Guest().Config().SerialLog)
	return runGuest(ctx, v, o.SaveOnExit, func(ctx context.Context) (vmm.SaveOptions, error) {
		return saveTarget(ctx, e, o.SaveKey, o.Snapshot.Cache.Remote.ReadOnly)
	}, s)
}

// runQemuBoot boots o.Machine with its RAM in a shared memory file and
// runs it until it exits or is interrupted.
func runQemuBoot(ctx context.Context, o qemuBootOptions, s streams) error {
	e, h, err := o.Host.open(ctx, o.Cache)
	if err != nil {
		return err
	}
	defer e.Close()
	v, err := h.Boot(ctx, o.Machine, vmm.BootOptions{Dir: o.Dir, SerialLog: o.SerialLog})
	if err != nil {
		return err
	}
	fmt.Fprintf(s.Out, "guest running, memory file %s, serial log %s\n", filepath.Join(o.Dir, vmm.MemoryFile), v.Guest().Config().SerialLog)
	return runGuest(ctx, v, o.SaveOnExit, func(ctx context.Context) (vmm.SaveOptions, error) {
		return saveTarget(ctx, e, o.SaveKey, o.Cache.Remote.ReadOnly)
	}, s)
}

// runQemuSave snapshots the running QEMU o names (it exits) and saves it.
func runQemuSave(ctx context.Context, o qemuSaveOptions, s streams) error {
	e, h, err := o.Host.open(ctx, o.Cache)
	if err != nil {
		return err
	}
	defer e.Close()
	dir, cleanup, err := workDir(o.Dir)
	if err != nil {
		return err
	}
	defer cleanup()
	v, err := h.Attach(o.Machine, o.MemoryFile, o.QMPSocket, dir)
	if err != nil {
		return err
	}
	defer v.Close()
	return saveGuest(ctx, v, func(ctx context.Context) (vmm.SaveOptions, error) {
		return saveTarget(ctx, e, o.Key, o.Cache.Remote.ReadOnly)
	}, s)
}

// saveTarget decides where a guest's snapshot is published.
func saveTarget(ctx context.Context, e *env, k keyOptions, readOnly bool) (vmm.SaveOptions, error) {
	keys, err := e.keySet(ctx, k)
	if err != nil {
		return vmm.SaveOptions{}, err
	}
	// The save policies of `snaploader save`, with their defaults.
	remote, localManifest, _ := decidePublish(ctx, e, keys, readOnly, snapshot.FirstNonDefaultRef,
		snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst}, k.defaultRef())
	return vmm.SaveOptions{Key: keys.GetWriteKey(), Local: true, LocalManifest: localManifest, Remote: remote}, nil
}

// runGuest waits until the guest exits or the command is interrupted; an
// interrupted guest is saved when save is set, else stopped.
func runGuest(ctx context.Context, v *vmm.VM, save bool, target func(context.Context) (vmm.SaveOptions, error), s streams) error {
	defer v.Close()
	select {
	case <-v.Guest().Exited():
		fmt.Fprintln(s.Out, "guest exited")
		return v.Guest().Wait(context.Background())
	case <-ctx.Done():
	}
	if !save {
		fmt.Fprintln(s.Out, "interrupted: guest stopped without saving")
		return nil
	}
	// The signal was the request to save: the command ends as the save
	// does, not as an interrupted command.
	runState.interruptHandled = true
	// The command's context is done; the save gets its own.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Minute)
	defer cancel()
	return saveGuest(sctx, v, target, s)
}

func saveGuest(ctx context.Context, v *vmm.VM, target func(context.Context) (vmm.SaveOptions, error), s streams) error {
	opts, err := target(ctx)
	if err != nil {
		return err
	}
	st, err := v.Save(ctx, opts)
	if err != nil {
		return err
	}
	for _, f := range st.Result.Files {
		fmt.Fprintf(s.Out, "  %s: %d chunks, %d dirty, %d written (%s), %d uploaded\n", f.Name, f.ChunksTotal, f.ChunksDirty, f.ChunksWritten, humanBytes(f.BytesWritten), f.RemoteChunksWritten)
	}
	fmt.Fprintf(s.Out, "saved snapshot %s under ref %q (remote: %v): guest paused to exited %s, device state %s, saved in %s\n",
		st.Result.SnapshotID, opts.Key.GetRef(), st.Result.PublishedRemote, st.Snapshot.Total.Round(time.Millisecond), humanBytes(st.Snapshot.StateBytes), st.Save.Round(time.Millisecond))
	return nil
}
