// Package testguest builds tiny QEMU guests for snaploader's tests and
// benchmarks (a busybox counter guest and a variant that fills its memory
// with a working set), makes their ext4 disks and reads back what they
// wrote: the numbers on a disk's /log and the "COUNTER n" lines of the
// serial console.
package testguest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestGuest is a tiny guest for tests: a Debian cloud kernel and a busybox
// initramfs whose init mounts the ext4 file system on its first virtio disk
// (when there is one) and then loops forever: it increments a counter
// starting at 1, prints "COUNTER n" on the serial console, appends "n" to
// /log on the disk, syncs and sleeps 0.2 s.
type TestGuest struct {
	Kernel string // path of the kernel image
	Initrd string // path of the initramfs (newc cpio)
	Append string // kernel command line
	// KernelPackage is the Debian package the kernel came from, as
	// name=version.
	KernelPackage string
}

// testGuestModules are the virtio block modules, in load order.
var testGuestModules = []string{"virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk"}

const testGuestInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in ` + "virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk" + `; do
  insmod /lib/modules/$m.ko || echo "INSMOD FAILED $m"
done
LOG=/dev/null
i=0
while [ ! -b /dev/vda ] && [ $i -lt 40 ]; do sleep 0.05; i=$((i+1)); done
if [ -b /dev/vda ]; then
  if mount -t ext4 /dev/vda /mnt; then LOG=/mnt/log; else echo "DISK MOUNT FAILED"; fi
else
  echo "NO DISK"
fi
echo "GUEST READY"
n=0
while true; do
  n=$((n+1))
  echo "COUNTER $n"
  echo $n >> $LOG
  sync
  sleep 0.2
done
`

const testGuestAppend = "console=ttyS0 panic=-1 quiet loglevel=1"

// testGuestFormat changes whenever the build recipe changes, invalidating
// cached builds.
const testGuestFormat = "snaploader-test-guest-v1"

// DefaultTestGuestDir is where BuildTestGuest caches builds when given no
// directory: snaploader-test-guest under the user cache directory
// ($XDG_CACHE_HOME or ~/.cache).
func DefaultTestGuestDir() (string, error) {
	d, err := os.UserCacheDir()
	if err != nil {
		return "", status.Errorf(codes.Unavailable, "finding the user cache directory: %v", err)
	}
	return filepath.Join(d, "snaploader-test-guest"), nil
}

// BuildTestGuest builds the test guest into dir (DefaultTestGuestDir when
// empty), in a subdirectory keyed by the kernel package version, the busybox
// binary and the recipe, so a rerun with the same inputs reuses it. It needs
// apt-cache, apt-get (with package lists), dpkg-deb and busybox; a missing
// tool or an unobtainable kernel package is Unavailable. Concurrent builders
// are safe: each builds privately and renames into place.
func BuildTestGuest(ctx context.Context, dir string) (*TestGuest, error) {
	return buildCachedGuest(ctx, dir, guestRecipe{format: testGuestFormat, init: testGuestInit, appendLine: testGuestAppend})
}

// guestRecipe is what a cached guest build is made of.
type guestRecipe struct {
	format, init, appendLine string
	// extraKey is added to the cache key when not empty (e.g. the sources
	// and toolchain of extra binaries).
	extraKey string
	// extra, when set, adds files to the initramfs tree rooted at root;
	// work is a private scratch directory.
	extra func(ctx context.Context, work, root string) error
}

func buildCachedGuest(ctx context.Context, dir string, r guestRecipe) (*TestGuest, error) {
	if dir == "" {
		d, err := DefaultTestGuestDir()
		if err != nil {
			return nil, err
		}
		dir = d
	}
	for _, tool := range []string{"apt-cache", "apt-get", "dpkg-deb", "busybox"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, status.Errorf(codes.Unavailable, "building test guest: %s is not installed: %v", tool, err)
		}
	}
	pkg, version, err := kernelPackage(ctx)
	if err != nil {
		return nil, err
	}
	busybox, _ := exec.LookPath("busybox")
	busyboxSum, err := fileSHA256(busybox)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "building test guest: hashing %s: %v", busybox, err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s=%s\n%s\n%s\n%s\n%s\n", r.format, pkg, version, busyboxSum, r.init, r.appendLine, strings.Join(testGuestModules, ","))
	if r.extraKey != "" {
		fmt.Fprintf(h, "%s\n", r.extraKey)
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	dest := filepath.Join(dir, key)
	tg := &TestGuest{
		Kernel:        filepath.Join(dest, "vmlinuz"),
		Initrd:        filepath.Join(dest, "initrd.cpio"),
		Append:        r.appendLine,
		KernelPackage: pkg + "=" + version,
	}
	if _, err := os.Stat(filepath.Join(dest, "ready")); err == nil {
		return tg, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "creating test guest cache dir %s: %v", dir, err)
	}
	work, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return nil, status.Errorf(codes.Internal, "creating test guest build dir in %s: %v", dir, err)
	}
	defer os.RemoveAll(work)
	out := filepath.Join(work, "out")
	if err := buildTestGuest(ctx, work, out, pkg+"="+version, busybox, r); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(out, "ready"), []byte(tg.KernelPackage+"\n"), 0o644); err != nil {
		return nil, status.Errorf(codes.Internal, "writing test guest marker: %v", err)
	}
	if err := os.Rename(out, dest); err != nil {
		// Another builder may have won the race; its result is equivalent.
		if _, serr := os.Stat(filepath.Join(dest, "ready")); serr != nil {
			return nil, status.Errorf(codes.Internal, "installing test guest into %s: %v", dest, err)
		}
	}
	return tg, nil
}

// kernelPackage resolves Debian's cloud kernel metapackage to the exact
// kernel image package and version it depends on.
func kernelPackage(ctx context.Context) (string, string, error) {
	const meta = "linux-image-cloud-amd64"
	b, err := exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", meta).Output()
	if err != nil {
		return "", "", status.Errorf(codes.Unavailable, "building test guest: apt-cache show %s: %v (run apt-get update?)", meta, err)
	}
	return parseKernelDepends(meta, b)
}

var kernelDepends = regexp.MustCompile(`(?m)^Depends:.*?\b(linux-image-[^\s,(]+) \(= ([^)\s]+)\)`)

// parseKernelDepends extracts "linux-image-X (= V)" from apt-cache show
// output of the metapackage meta.
func parseKernelDepends(meta string, show []byte) (string, string, error) {
	m := kernelDepends.FindSubmatch(show)
	if m == nil {
		return "", "", status.Errorf(codes.Unavailable, "building test guest: %s depends on no exact linux-image version:\n%s", meta, show)
	}
	return string(m[1]), string(m[2]), nil
}

func buildTestGuest(ctx context.Context, work, out, pkgVersion, busybox string, r guestRecipe) error {
	run := func(dir string, stdin io.Reader, stdout io.Writer, name string, args ...string) error {
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Dir = dir
		cmd.Stdin = stdin
		var stderr bytes.Buffer
		cmd.Stdout = stdout
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
		}
		return nil
	}
	debDir := filepath.Join(work, "deb")
	extract := filepath.Join(work, "x")
	root := filepath.Join(work, "root")
	for _, d := range []string{debDir, extract, out, root} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return status.Errorf(codes.Internal, "building test guest: %v", err)
		}
	}
	if err := run(debDir, nil, nil, "apt-get", "download", pkgVersion); err != nil {
		return status.Errorf(codes.Unavailable, "building test guest: downloading kernel package: %v", err)
	}
	debs, _ := filepath.Glob(filepath.Join(debDir, "*.deb"))
	if len(debs) != 1 {
		return status.Errorf(codes.Unavailable, "building test guest: apt-get download %s left %d .deb files", pkgVersion, len(debs))
	}
	if err := run(work, nil, nil, "dpkg-deb", "-x", debs[0], extract); err != nil {
		return status.Errorf(codes.Internal, "building test guest: extracting %s: %v", debs[0], err)
	}
	kernels, _ := filepath.Glob(filepath.Join(extract, "boot", "vmlinuz-*"))
	if len(kernels) != 1 {
		return status.Errorf(codes.Internal, "building test guest: %s holds %d boot/vmlinuz-* files", debs[0], len(kernels))
	}
	if err := copyFile(kernels[0], filepath.Join(out, "vmlinuz"), 0o644); err != nil {
		return err
	}

	// The initramfs tree.
	for _, d := range []string{"bin", "dev", "proc", "sys", "mnt", "lib/modules"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return status.Errorf(codes.Internal, "building test guest: %v", err)
		}
	}
	if err := copyFile(busybox, filepath.Join(root, "bin", "busybox"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "init"), []byte(r.init), 0o755); err != nil {
		return status.Errorf(codes.Internal, "building test guest: %v", err)
	}
	if r.extra != nil {
		if err := r.extra(ctx, work, root); err != nil {
			return err
		}
	}
	modules := map[string]string{}
	filepath.WalkDir(filepath.Join(extract, "lib", "modules"), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			modules[strings.TrimSuffix(d.Name(), ".ko")] = p
		}
		return nil
	})
	for _, m := range testGuestModules {
		src, ok := modules[m]
		if !ok {
			return status.Errorf(codes.Internal, "building test guest: %s has no module %s.ko", debs[0], m)
		}
		if err := copyFile(src, filepath.Join(root, "lib", "modules", m+".ko"), 0o644); err != nil {
			return err
		}
	}
	var list []string
	filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && p != root {
			rel, _ := filepath.Rel(root, p)
			list = append(list, rel)
		}
		return nil
	})
	sort.Strings(list) // parents sort before their children
	cpio, err := os.Create(filepath.Join(out, "initrd.cpio"))
	if err != nil {
		return status.Errorf(codes.Internal, "building test guest: %v", err)
	}
	defer cpio.Close()
	if err := run(root, strings.NewReader(strings.Join(list, "\n")+"\n"), cpio, busybox, "cpio", "-o", "-H", "newc"); err != nil {
		return status.Errorf(codes.Internal, "building test guest initramfs: %v", err)
	}
	if err := cpio.Close(); err != nil {
		return status.Errorf(codes.Internal, "building test guest initramfs: %v", err)
	}
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return status.Errorf(codes.Internal, "copying %s: %v", src, err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return status.Errorf(codes.Internal, "copying %s to %s: %v", src, dst, err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return status.Errorf(codes.Internal, "copying %s to %s: %v", src, dst, err)
	}
	if err := out.Close(); err != nil {
		return status.Errorf(codes.Internal, "copying %s to %s: %v", src, dst, err)
	}
	return nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// MakeTestDisk creates a raw disk image of size bytes at path holding an
// empty ext4 file system without a journal (so the test guest's synced log
// can be read with debugfs right after QEMU exits). Needs mkfs.ext4.
func MakeTestDisk(ctx context.Context, path string, size int64) error {
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		return status.Errorf(codes.Unavailable, "making test disk %s: mkfs.ext4 is not installed: %v", path, err)
	}
	f, err := os.Create(path)
	if err != nil {
		return status.Errorf(codes.Internal, "making test disk %s: %v", path, err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return status.Errorf(codes.Internal, "making test disk %s: %v", path, err)
	}
	b, err := exec.CommandContext(ctx, mkfs, "-F", "-q", "-O", "^has_journal", "-L", "testguest", path).CombinedOutput()
	if err != nil {
		return status.Errorf(codes.Internal, "making test disk %s: mkfs.ext4: %v: %s", path, err, b)
	}
	return nil
}

// ReadTestLog returns the numbers the test guest appended to /log on the
// ext4 disk image at path, read with debugfs without mounting. An
// incomplete last line (the guest stopped mid-append) is left out. Needs
// debugfs.
func ReadTestLog(ctx context.Context, path string) ([]int, error) {
	debugfs, err := exec.LookPath("debugfs")
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "reading test log on %s: debugfs is not installed: %v", path, err)
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, debugfs, "-R", "cat /log", path)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, status.Errorf(codes.Internal, "reading test log on %s: debugfs: %v: %s", path, err, stderr.String())
	}
	if strings.Contains(stderr.String(), "File not found") {
		return nil, status.Errorf(codes.NotFound, "reading test log on %s: no /log", path)
	}
	data := bytes.TrimRight(stdout.Bytes(), "\x00")
	lines := strings.Split(string(data), "\n")
	lines = lines[:len(lines)-1] // after the last newline: empty or incomplete
	nums := make([]int, 0, len(lines))
	for i, l := range lines {
		n, err := strconv.Atoi(l)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "reading test log on %s: line %d is %q, not a number", path, i+1, l)
		}
		nums = append(nums, n)
	}
	return nums, nil
}

var counterLine = regexp.MustCompile(`(?m)^COUNTER (\d+)\r?\n`)

// CounterPattern matches one complete "COUNTER n" line of the test guest's
// serial output; the submatch is n.
func CounterPattern() *regexp.Regexp { return counterLine }

// ParseCounters returns the numbers of all complete "COUNTER n" lines in
// serial output, in order.
func ParseCounters(serial []byte) []int {
	var nums []int
	for _, m := range counterLine.FindAllSubmatch(serial, -1) {
		n, _ := strconv.Atoi(string(m[1]))
		nums = append(nums, n)
	}
	return nums
}
