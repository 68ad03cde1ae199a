package vmm

import (
	"fmt"
	"os"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/proto/snapshotpb"
	"github.com/snaploader/snaploader/snapshot"
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
