package vmm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/errkind"
	"github.com/snaploader/snaploader/qemu"
)

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
