package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/snapshot"
	"github.com/snaploader/snaploader/vmm"
)

// qemuFlags configure the emulator.
type qemuFlags struct {
	accel     string
	qemuPath  string
	chunkSize int64
}

func (f *qemuFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.accel, "accel", "tcg", "QEMU accelerator: tcg or kvm")
	cmd.Flags().StringVar(&f.qemuPath, "qemu", "", "QEMU binary (default qemu-system-x86_64 from PATH)")
	sizeFlag(cmd, &f.chunkSize, "chunk-size", 0, "chunk size of a first save, a multiple of 4096 bytes (bytes, or KiB/MiB/GiB; default 4096000)")
}

func (f *qemuFlags) host(e *env) (*vmm.Host, error) {
	return vmm.NewHost(vmm.Options{Loader: e.loader, Local: e.local, QEMUPath: f.qemuPath, Accel: f.accel, ChunkSize: f.chunkSize, Logger: e.log})
}

// machineFlags describe a guest for boot and save.
type machineFlags struct {
	memory                 int64
	kernel, initrd, append string
	disks                  []string
}

func (f *machineFlags) register(cmd *cobra.Command, withMemory bool) {
	fl := cmd.Flags()
	if withMemory {
		sizeFlag(cmd, &f.memory, "memory-bytes", 256<<20, "guest RAM, a whole number of MiB (bytes, or MiB/GiB)")
	}
	fl.StringVar(&f.kernel, "kernel", "", "direct-boot kernel image (saved with the snapshot)")
	fl.StringVar(&f.initrd, "initrd", "", "initramfs (saved with the snapshot)")
	fl.StringVar(&f.append, "append", "", "kernel command line")
	fl.StringArrayVar(&f.disks, "disk", nil, "raw disk image NAME=PATH, attached in order (repeatable)")
}

func (f *machineFlags) machine() (vmm.Machine, error) {
	m := vmm.Machine{MemoryBytes: f.memory, Kernel: f.kernel, Initrd: f.initrd, Append: f.append}
	disks, order, err := parseNamed("disk", f.disks)
	if err != nil {
		return m, err
	}
	for _, name := range order {
		m.Disks = append(m.Disks, vmm.Disk{Name: name, Path: disks[name]})
	}
	return m, nil
}

func newQemuCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "qemu",
		Short: "Run QEMU guests from snapshots: restore lazily, boot, save",
	}
	cmd.AddCommand(newQemuRestoreCmd(), newQemuBootCmd(), newQemuSaveCmd())
	return cmd
}

// qemuReplaceHint and qemuReplaceUsage say what --replace does for the
// qemu commands' --dir.
const (
	qemuReplaceHint  = "pass --replace to use it anyway (files named like the guest's files there are replaced, all others left as they are)"
	qemuReplaceUsage = "use a --dir that already holds files, e.g. an earlier guest's: files named like this guest's files (unpacked files, memory, state-N.bin, serial.log, sockets) are replaced, all others are left as they are"
)

// hostIn returns the VM host and a work directory: dir, or a temporary one
// that cleanup removes.
func (f *qemuFlags) hostIn(e *env, dir string) (*vmm.Host, string, func(), error) {
	h, err := f.host(e)
	if err != nil {
		return nil, "", nil, err
	}
	if dir != "" {
		return h, dir, func() {}, nil
	}
	tmp, err := os.MkdirTemp("", "snaploader-vm-")
	if err != nil {
		return nil, "", nil, err
	}
	return h, tmp, func() { os.RemoveAll(tmp) }, nil
}

// saveTarget decides where a guest's snapshot is published.
func saveTarget(ctx context.Context, e *env, kf *keyFlags, cf *cacheFlags) (vmm.SaveOptions, error) {
	keys, err := kf.keySet(ctx, e)
	if err != nil {
		return vmm.SaveOptions{}, err
	}
	// The save policies of `snaploader save`, with their defaults.
	remote, localManifest, _ := decidePublish(ctx, e, keys, cf.remote.readOnly, snapshot.FirstNonDefaultRef,
		snapshot.GetOptions{ReadPolicy: snapshot.LocalFirst}, kf.defaultRef)
	return vmm.SaveOptions{Key: keys.GetWriteKey(), Local: true, LocalManifest: localManifest, Remote: remote}, nil
}

// runGuest waits until the guest exits or the command is interrupted; an
// interrupted guest is saved when save is set, else stopped.
func runGuest(ctx context.Context, v *vmm.VM, save bool, target func(context.Context) (vmm.SaveOptions, error)) error {
	defer v.Close()
	select {
	case <-v.Guest().Exited():
		fmt.Println("guest exited")
		return v.Guest().Wait(context.Background())
	case <-ctx.Done():
	}
	if !save {
		fmt.Println("interrupted: guest stopped without saving")
		return nil
	}
	// The signal was the request to save: the command ends as the save
	// does, not as an interrupted command.
	runState.interruptHandled = true
	// The command's context is done; the save gets its own.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Minute)
	defer cancel()
	return saveGuest(sctx, v, target)
}

func saveGuest(ctx context.Context, v *vmm.VM, target func(context.Context) (vmm.SaveOptions, error)) error {
	opts, err := target(ctx)
	if err != nil {
		return err
	}
	st, err := v.Save(ctx, opts)
	if err != nil {
		return err
	}
	for _, f := range st.Result.Files {
		fmt.Printf("  %s: %d chunks, %d dirty, %d written (%s), %d uploaded\n", f.Name, f.ChunksTotal, f.ChunksDirty, f.ChunksWritten, humanBytes(f.BytesWritten), f.RemoteChunksWritten)
	}
	fmt.Printf("saved snapshot %s under ref %q (remote: %v): guest paused to exited %s, device state %s, saved in %s\n",
		st.Result.SnapshotID, opts.Key.GetRef(), st.Result.PublishedRemote, st.Snapshot.Total.Round(time.Millisecond), humanBytes(st.Snapshot.StateBytes), st.Save.Round(time.Millisecond))
	return nil
}

func newQemuRestoreCmd() *cobra.Command {
	var (
		sf         snapshotFlags
		qf         qemuFlags
		dir        string
		serial     string
		saveOnExit bool
		prefetch   bool
		readAhead  int
		replace    bool
	)
	cmd := &cobra.Command{
		Use:   "restore",
		Short: "Restore the key set's newest QEMU snapshot lazily (memory through FUSE, disks through NBD) and run it until it exits or is interrupted",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if err := sf.check(); err != nil {
				return err
			}
			if saveOnExit {
				if err := sf.kf.check(); err != nil {
					return err
				}
			}
			if dir != "" {
				if err := checkOutDir("--dir", dir, replace, qemuReplaceHint); err != nil {
					return err
				}
			}
			e, snap, err := sf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			h, workDir, cleanup, err := qf.hostIn(e, dir)
			if err != nil {
				return err
			}
			defer cleanup()
			dir = workDir
			v, err := h.Restore(ctx, snap, vmm.RestoreOptions{Dir: dir, SerialLog: serial,
				Unpack: snapshot.UnpackOptions{ReadAhead: readAhead, PrefetchWorkingSet: prefetch, OnFetch: e.metrics.Fetched, Replace: replace}})
			if err != nil {
				return outDirError("--dir", err, qemuReplaceHint)
			}
			rs := v.RestoreStats()
			fmt.Printf("restored snapshot %s from the %s cache; guest running after %s (unpack %s, resume %s); serial log %s\n",
				snap.Manifest.GetVmMetadata().GetSnapshotId(), snap.Source, rs.Total.Round(time.Millisecond),
				rs.Unpack.Round(time.Millisecond), rs.Resume.Round(time.Millisecond), v.Guest().Config().SerialLog)
			return runGuest(ctx, v, saveOnExit, func(ctx context.Context) (vmm.SaveOptions, error) {
				return saveTarget(ctx, e, &sf.kf, &sf.cf)
			})
		},
	}
	sf.register(cmd, "restore this exact snapshot instead of the key set's newest")
	qf.register(cmd)
	fl := cmd.Flags()
	fl.StringVar(&dir, "dir", "", "work directory: unpacked files, memory mount point, NBD socket; created if missing, else it must be empty (see --replace) (default a temporary one)")
	fl.BoolVar(&replace, "replace", false, qemuReplaceUsage)
	fl.StringVar(&serial, "serial-log", "", "file receiving the guest's serial console (default DIR/serial.log)")
	fl.BoolVar(&saveOnExit, "save-on-exit", false, "on SIGINT/SIGTERM snapshot the guest and save it incrementally under the write key")
	fl.BoolVar(&prefetch, "prefetch-working-set", true, "prefetch the chunks the guest touched after its previous restore")
	fl.IntVar(&readAhead, "read-ahead", 0, "chunks after a touched one fetched in the background (0 = default: none for files whose working set is prefetched, else 32; negative = off)")
	return cmd
}

func newQemuBootCmd() *cobra.Command {
	var (
		cf         cacheFlags
		kf         keyFlags
		qf         qemuFlags
		mf         machineFlags
		dir        string
		serial     string
		saveOnExit bool
		replace    bool
	)
	cmd := &cobra.Command{
		Use:   "boot",
		Short: "Boot a QEMU guest with its RAM in a shared memory file and run it until it exits or is interrupted",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if dir == "" {
				return usagef("--dir is required")
			}
			if saveOnExit {
				if err := kf.check(); err != nil {
					return err
				}
			}
			if err := checkOutDir("--dir", dir, replace, qemuReplaceHint); err != nil {
				return err
			}
			m, err := mf.machine()
			if err != nil {
				return err
			}
			e, err := cf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			h, err := qf.host(e)
			if err != nil {
				return err
			}
			v, err := h.Boot(ctx, m, vmm.BootOptions{Dir: dir, SerialLog: serial})
			if err != nil {
				return err
			}
			fmt.Printf("guest running, memory file %s, serial log %s\n", filepath.Join(dir, vmm.MemoryFile), v.Guest().Config().SerialLog)
			return runGuest(ctx, v, saveOnExit, func(ctx context.Context) (vmm.SaveOptions, error) {
				return saveTarget(ctx, e, &kf, &cf)
			})
		},
	}
	cf.register(cmd)
	kf.register(cmd)
	qf.register(cmd)
	mf.register(cmd, true)
	cmd.Flags().StringVar(&dir, "dir", "", "directory for the memory file, state files and QMP socket: created if missing, else it must be empty (see --replace)")
	cmd.Flags().BoolVar(&replace, "replace", false, qemuReplaceUsage)
	cmd.Flags().StringVar(&serial, "serial-log", "", "file receiving the guest's serial console (default DIR/serial.log)")
	cmd.Flags().BoolVar(&saveOnExit, "save-on-exit", false, "on SIGINT/SIGTERM snapshot the guest and save it under the write key")
	return cmd
}

func newQemuSaveCmd() *cobra.Command {
	var (
		cf      cacheFlags
		kf      keyFlags
		qf      qemuFlags
		mf      machineFlags
		qmpSock string
		memFile string
		dir     string
		replace bool
	)
	cmd := &cobra.Command{
		Use:   "save",
		Short: "Snapshot a running QEMU started with a shared file memory backend (it exits) and save it",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if qmpSock == "" || memFile == "" {
				return usagef("--qmp and --mem-file are required")
			}
			if err := kf.check(); err != nil {
				return err
			}
			if dir != "" {
				if err := checkOutDir("--dir", dir, replace, qemuReplaceHint); err != nil {
					return err
				}
			}
			fi, err := os.Stat(memFile)
			if err != nil {
				return err
			}
			mf.memory = fi.Size()
			m, err := mf.machine()
			if err != nil {
				return err
			}
			e, err := cf.open(ctx)
			if err != nil {
				return err
			}
			defer e.Close()
			h, workDir, cleanup, err := qf.hostIn(e, dir)
			if err != nil {
				return err
			}
			defer cleanup()
			dir = workDir
			v, err := h.Attach(m, memFile, qmpSock, dir)
			if err != nil {
				return err
			}
			defer v.Close()
			return saveGuest(ctx, v, func(ctx context.Context) (vmm.SaveOptions, error) {
				return saveTarget(ctx, e, &kf, &cf)
			})
		},
	}
	cf.register(cmd)
	kf.register(cmd)
	qf.register(cmd)
	mf.register(cmd, false)
	cmd.Flags().StringVar(&qmpSock, "qmp", "", "QMP unix socket of the running QEMU")
	cmd.Flags().StringVar(&memFile, "mem-file", "", "the guest's memory file (memory-backend-file mem-path, share=on); its size is the RAM size")
	cmd.Flags().StringVar(&dir, "dir", "", "directory for the device state file: created if missing, else it must be empty (see --replace) (default a temporary one)")
	cmd.Flags().BoolVar(&replace, "replace", false, qemuReplaceUsage)
	return cmd
}
