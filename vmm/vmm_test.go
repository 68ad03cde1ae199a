package vmm

import (
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/proto/snapshotpb"
)

func TestMachineValidate(t *testing.T) {
	ok := Machine{MemoryBytes: 128 * mib, Kernel: "/k", Disks: []Disk{{Name: "root"}, {Name: "data"}}}
	tests := []struct {
		name string
		mod  func(*Machine)
		want codes.Code
	}{
		{"ok", func(*Machine) {}, codes.OK},
		{"no memory", func(m *Machine) { m.MemoryBytes = 0 }, codes.InvalidArgument},
		{"odd memory", func(m *Machine) { m.MemoryBytes = mib + 4096 }, codes.InvalidArgument},
		{"no kernel", func(m *Machine) { m.Kernel = "" }, codes.InvalidArgument},
		{"empty disk name", func(m *Machine) { m.Disks = []Disk{{}} }, codes.InvalidArgument},
		{"slash in disk name", func(m *Machine) { m.Disks = []Disk{{Name: "a/b"}} }, codes.InvalidArgument},
		{"duplicate disk", func(m *Machine) { m.Disks = []Disk{{Name: "a"}, {Name: "a"}} }, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := ok
			m.Disks = append([]Disk(nil), ok.Disks...)
			tt.mod(&m)
			if got := status.Code(m.validate()); got != tt.want {
				t.Fatalf("validate() = %v, want %v", m.validate(), tt.want)
			}
		})
	}
}

func TestConfigurationRoundTrip(t *testing.T) {
	dir := t.TempDir()
	disk := filepath.Join(dir, "root.img")
	if err := os.WriteFile(disk, make([]byte, 3*4096), 0o644); err != nil {
		t.Fatal(err)
	}
	m := Machine{MemoryBytes: 64 * mib, Kernel: "/k", Initrd: "/i", Append: "console=ttyS0", Disks: []Disk{{Name: "root", Path: disk}}}
	cfg, err := m.Configuration(nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.GetMemoryBytes() != 64*mib || cfg.GetVmm() != VMMName || cfg.GetKernelCmdline() != "console=ttyS0" ||
		len(cfg.GetDisks()) != 1 || cfg.GetDisks()[0].GetName() != "root" || cfg.GetDisks()[0].GetSizeBytes() != 3*4096 {
		t.Fatalf("Configuration() = %v", cfg)
	}
	if _, err := (Machine{Disks: []Disk{{Name: "x", Path: filepath.Join(dir, "missing")}}}).Configuration(nil); status.Code(err) != codes.NotFound {
		t.Fatalf("Configuration with a missing disk: %v, want NotFound", err)
	}

	files := map[string]string{StateFile: "/s", KernelFile: "/u/k", InitrdFile: "/u/i"}
	tests := []struct {
		name  string
		cfg   *snapshotpb.VMConfiguration
		files map[string]string
		want  codes.Code
	}{
		{"ok", cfg, files, codes.OK},
		{"other vmm", &snapshotpb.VMConfiguration{Vmm: "firecracker", MemoryBytes: 64 * mib}, files, codes.InvalidArgument},
		{"no kernel file", cfg, map[string]string{StateFile: "/s"}, codes.InvalidArgument},
		{"no state file", cfg, map[string]string{KernelFile: "/u/k"}, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := machineFromManifest(&snapshotpb.SnapshotManifest{VmConfiguration: tt.cfg}, tt.files)
			if status.Code(err) != tt.want {
				t.Fatalf("machineFromManifest() error = %v, want %v", err, tt.want)
			}
			if err == nil && (got.Kernel != "/u/k" || got.Initrd != "/u/i" || got.Append != m.Append || got.MemoryBytes != m.MemoryBytes || len(got.Disks) != 1 || got.Disks[0].Name != "root") {
				t.Fatalf("machineFromManifest() = %+v", got)
			}
		})
	}
}

func TestShellEscape(t *testing.T) {
	for in, want := range map[string]string{"/a/b": "/a/b", "it's": `it'\''s`, "": ""} {
		if got := shellEscape(in); got != want {
			t.Errorf("shellEscape(%q) = %q, want %q", in, got, want)
		}
	}
}
