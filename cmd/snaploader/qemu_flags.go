package main

import (
	"os"

	"github.com/spf13/cobra"

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

func (f *qemuFlags) options() qemuHostOptions {
	return qemuHostOptions{Accel: f.accel, QEMUPath: f.qemuPath, ChunkSize: f.chunkSize}
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

// qemuReplaceUsage says what --replace does for the qemu commands' --dir.
const qemuReplaceUsage = "use a --dir that already holds files, e.g. an earlier guest's: files named like this guest's files (unpacked files, memory, state-N.bin, serial.log, sockets) are replaced, all others are left as they are"

// qemuRestoreFlags are qemu restore's flags.
type qemuRestoreFlags struct {
	sf         snapshotFlags
	qf         qemuFlags
	dir        string
	serial     string
	saveOnExit bool
	prefetch   bool
	readAhead  int
	replace    bool
}

func newQemuRestoreCmd() *cobra.Command {
	var f qemuRestoreFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *qemuRestoreFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "restore",
		Short: "Restore the key set's newest QEMU snapshot lazily (memory through FUSE, disks through NBD) and run it until it exits or is interrupted",
		RunE:  runE(f.options, runQemuRestore),
	}
	f.sf.register(cmd, "restore this exact snapshot instead of the key set's newest")
	f.qf.register(cmd)
	fl := cmd.Flags()
	fl.StringVar(&f.dir, "dir", "", "work directory: unpacked files, memory mount point, NBD socket; created if missing, else it must be empty (see --replace) (default a temporary one)")
	fl.BoolVar(&f.replace, "replace", false, qemuReplaceUsage)
	fl.StringVar(&f.serial, "serial-log", "", "file receiving the guest's serial console (default DIR/serial.log)")
	fl.BoolVar(&f.saveOnExit, "save-on-exit", false, "on SIGINT/SIGTERM snapshot the guest and save it incrementally under the write key")
	fl.BoolVar(&f.prefetch, "prefetch-working-set", true, "prefetch the chunks the guest touched after its previous restore")
	fl.IntVar(&f.readAhead, "read-ahead", 0, "chunks after a touched one fetched in the background (0 = default: none for files whose working set is prefetched, else 32; negative = off)")
	return cmd
}

// options checks qemu restore's flags: the key a save on exit needs and
// --dir are refused before the cache is opened or a snapshot looked up.
func (f *qemuRestoreFlags) options() (qemuRestoreOptions, error) {
	var o qemuRestoreOptions
	if err := f.sf.check(); err != nil {
		return o, err
	}
	if f.saveOnExit {
		if err := f.sf.kf.check(); err != nil {
			return o, err
		}
	}
	if f.dir != "" {
		if err := checkOutDir("--dir", f.dir, f.replace, qemuReplaceHint); err != nil {
			return o, err
		}
	}
	var err error
	if o.Snapshot, err = f.sf.options(); err != nil {
		return o, err
	}
	if f.saveOnExit {
		if o.SaveKey, err = f.sf.kf.options(); err != nil {
			return o, err
		}
	}
	o.Host, o.Dir, o.SerialLog = f.qf.options(), f.dir, f.serial
	o.SaveOnExit, o.Prefetch, o.ReadAhead, o.Replace = f.saveOnExit, f.prefetch, f.readAhead, f.replace
	return o, nil
}

// qemuBootFlags are qemu boot's flags.
type qemuBootFlags struct {
	cf         cacheFlags
	kf         keyFlags
	qf         qemuFlags
	mf         machineFlags
	dir        string
	serial     string
	saveOnExit bool
	replace    bool
}

func newQemuBootCmd() *cobra.Command {
	var f qemuBootFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *qemuBootFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "boot",
		Short: "Boot a QEMU guest with its RAM in a shared memory file and run it until it exits or is interrupted",
		RunE:  runE(f.options, runQemuBoot),
	}
	f.cf.register(cmd)
	f.kf.register(cmd)
	f.qf.register(cmd)
	f.mf.register(cmd, true)
	cmd.Flags().StringVar(&f.dir, "dir", "", "directory for the memory file, state files and QMP socket: created if missing, else it must be empty (see --replace)")
	cmd.Flags().BoolVar(&f.replace, "replace", false, qemuReplaceUsage)
	cmd.Flags().StringVar(&f.serial, "serial-log", "", "file receiving the guest's serial console (default DIR/serial.log)")
	cmd.Flags().BoolVar(&f.saveOnExit, "save-on-exit", false, "on SIGINT/SIGTERM snapshot the guest and save it under the write key")
	return cmd
}

// options checks qemu boot's flags.
func (f *qemuBootFlags) options() (qemuBootOptions, error) {
	var o qemuBootOptions
	if f.dir == "" {
		return o, usagef("--dir is required")
	}
	if f.saveOnExit {
		if err := f.kf.check(); err != nil {
			return o, err
		}
	}
	if err := checkOutDir("--dir", f.dir, f.replace, qemuReplaceHint); err != nil {
		return o, err
	}
	var err error
	if o.Machine, err = f.mf.machine(); err != nil {
		return o, err
	}
	if o.Cache, err = f.cf.options(); err != nil {
		return o, err
	}
	if f.saveOnExit {
		if o.SaveKey, err = f.kf.options(); err != nil {
			return o, err
		}
	}
	o.Host, o.Dir, o.SerialLog, o.SaveOnExit = f.qf.options(), f.dir, f.serial, f.saveOnExit
	return o, nil
}

// qemuSaveFlags are qemu save's flags.
type qemuSaveFlags struct {
	cf      cacheFlags
	kf      keyFlags
	qf      qemuFlags
	mf      machineFlags
	qmpSock string
	memFile string
	dir     string
	replace bool
}

func newQemuSaveCmd() *cobra.Command {
	var f qemuSaveFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *qemuSaveFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "save",
		Short: "Snapshot a running QEMU started with a shared file memory backend (it exits) and save it",
		RunE:  runE(f.options, runQemuSave),
	}
	f.cf.register(cmd)
	f.kf.register(cmd)
	f.qf.register(cmd)
	f.mf.register(cmd, false)
	cmd.Flags().StringVar(&f.qmpSock, "qmp", "", "QMP unix socket of the running QEMU")
	cmd.Flags().StringVar(&f.memFile, "mem-file", "", "the guest's memory file (memory-backend-file mem-path, share=on); its size is the RAM size")
	cmd.Flags().StringVar(&f.dir, "dir", "", "directory for the device state file: created if missing, else it must be empty (see --replace) (default a temporary one)")
	cmd.Flags().BoolVar(&f.replace, "replace", false, qemuReplaceUsage)
	return cmd
}

// options checks qemu save's flags; the guest's RAM size is the size of
// --mem-file.
func (f *qemuSaveFlags) options() (qemuSaveOptions, error) {
	var o qemuSaveOptions
	if f.qmpSock == "" || f.memFile == "" {
		return o, usagef("--qmp and --mem-file are required")
	}
	if err := f.kf.check(); err != nil {
		return o, err
	}
	if f.dir != "" {
		if err := checkOutDir("--dir", f.dir, f.replace, qemuReplaceHint); err != nil {
			return o, err
		}
	}
	fi, err := os.Stat(f.memFile)
	if err != nil {
		return o, err
	}
	f.mf.memory = fi.Size()
	if o.Machine, err = f.mf.machine(); err != nil {
		return o, err
	}
	if o.Cache, err = f.cf.options(); err != nil {
		return o, err
	}
	if o.Key, err = f.kf.options(); err != nil {
		return o, err
	}
	o.Host, o.QMPSocket, o.MemoryFile, o.Dir = f.qf.options(), f.qmpSock, f.memFile, f.dir
	return o, nil
}
