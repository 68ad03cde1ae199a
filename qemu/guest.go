// Package qemu runs QEMU guests for snaploader: a QMP client, a Guest that
// boots with its RAM in a file-backed memory backend, and snapshot/restore
// flows that keep guest RAM in that file and write only device state
// through migration (x-ignore-shared). Disks may be image files or NBD
// exports, so a restored guest's memory file and disks can be served lazily
// by snaploader. The tiny busybox guest of the tests is built by
// internal/testguest.
package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Disk is one virtio block device.
type Disk struct {
	// Path is an image file or a QEMU block URL such as
	// "nbd:unix:/run/snap.sock:exportname=root" or
	// "nbd:127.0.0.1:10809:exportname=root".
	Path string
	// Format is the image format, "raw" when empty (NBD exports are raw).
	Format string
	// ReadOnly attaches the disk read-only.
	ReadOnly bool
}

// Config describes one QEMU process.
type Config struct {
	// QEMUPath is the emulator binary; "qemu-system-x86_64" from PATH when
	// empty.
	QEMUPath string
	// Accel is "tcg" (default) or "kvm".
	Accel string
	// MemoryBytes is the guest RAM size, a whole number of MiB (default
	// 256 MiB).
	MemoryBytes int64
	// MemPath backs guest RAM with this file (memory-backend-file). With
	// MemShare the mapping is shared: guest writes reach the file and a
	// snapshot leaves RAM out of the state file. Without MemShare the file
	// is mapped copy-on-write (read lazily, never written) and a snapshot
	// includes RAM in the state file. Empty MemPath uses anonymous RAM.
	MemPath  string
	MemShare bool
	// Kernel, Initrd and Append are the direct-boot kernel, its initramfs
	// and its command line.
	Kernel, Initrd, Append string
	Disks                  []Disk
	// SerialLog receives the first serial port's output; a file in a
	// temporary directory when empty.
	SerialLog string
	// QMPSocket is the unix socket path of the QMP monitor; a file in a
	// temporary directory when empty.
	QMPSocket string
	// Incoming starts QEMU with -incoming defer, waiting for a
	// migrate-incoming (Restore sets it).
	Incoming bool
	// ExtraArgs are appended to the command line.
	ExtraArgs []string
}

// Guest is a running QEMU process with its QMP connection.
type Guest struct {
	cfg     Config
	cmd     *exec.Cmd
	QMP     *QMP
	Console *Console
	stderr  *lockedBuffer
	tmpDir  string

	exited  chan struct{}
	waitErr error
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() < 1<<20 {
		l.b.Write(p)
	}
	return len(p), nil
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

const mib = 1 << 20

// Args returns the QEMU command line (without the binary) for cfg, after
// defaults are applied.
func (cfg Config) Args() ([]string, error) {
	accel := cfg.Accel
	if accel == "" {
		accel = "tcg"
	}
	if accel != "tcg" && accel != "kvm" {
		return nil, status.Errorf(codes.InvalidArgument, "qemu accel %q: want tcg or kvm", accel)
	}
	mem := cfg.MemoryBytes
	if mem == 0 {
		mem = 256 * mib
	}
	if mem < 0 || mem%mib != 0 {
		return nil, status.Errorf(codes.InvalidArgument, "qemu memory size %d bytes: want a positive whole number of MiB", mem)
	}
	if cfg.SerialLog == "" || cfg.QMPSocket == "" {
		return nil, status.Errorf(codes.InvalidArgument, "qemu config: serial log %q and qmp socket %q must be set", cfg.SerialLog, cfg.QMPSocket)
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-accel", accel, "-smp", "1",
		"-m", fmt.Sprintf("%dM", mem/mib),
		"-chardev", "file,id=serial0,path=" + escapeOpt(cfg.SerialLog),
		"-serial", "chardev:serial0",
		"-chardev", "socket,id=qmp0,path=" + escapeOpt(cfg.QMPSocket) + ",server=on,wait=off",
		"-mon", "chardev=qmp0,mode=control",
	}
	if accel == "kvm" {
		args = append(args, "-cpu", "host")
	}
	if cfg.MemPath != "" {
		share := "off"
		if cfg.MemShare {
			share = "on"
		}
		args = append(args,
			"-M", "q35,memory-backend=mem",
			"-object", fmt.Sprintf("memory-backend-file,id=mem,size=%d,mem-path=%s,share=%s", mem, escapeOpt(cfg.MemPath), share))
	} else {
		args = append(args, "-M", "q35")
	}
	if cfg.Kernel != "" {
		args = append(args, "-kernel", cfg.Kernel)
	}
	if cfg.Initrd != "" {
		args = append(args, "-initrd", cfg.Initrd)
	}
	if cfg.Append != "" {
		args = append(args, "-append", cfg.Append)
	}
	for i, d := range cfg.Disks {
		if d.Path == "" {
			return nil, status.Errorf(codes.InvalidArgument, "qemu disk %d: empty path", i)
		}
		format := d.Format
		if format == "" {
			format = "raw"
		}
		opt := fmt.Sprintf("file=%s,format=%s,if=virtio,id=disk%d", escapeOpt(d.Path), format, i)
		if d.ReadOnly {
			opt += ",readonly=on"
		}
		args = append(args, "-drive", opt)
	}
	if cfg.Incoming {
		args = append(args, "-incoming", "defer")
	}
	return append(args, cfg.ExtraArgs...), nil
}

// escapeOpt escapes a value for QEMU's comma-separated option syntax.
func escapeOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// Start launches QEMU for cfg and connects to its QMP socket. ctx bounds the
// start-up only; the process runs until Quit, Kill or Close.
func Start(ctx context.Context, cfg Config) (*Guest, error) {
	g := &Guest{cfg: cfg, stderr: &lockedBuffer{}, exited: make(chan struct{})}
	if g.cfg.QEMUPath == "" {
		g.cfg.QEMUPath = "qemu-system-x86_64"
	}
	if g.cfg.SerialLog == "" || g.cfg.QMPSocket == "" {
		dir, err := os.MkdirTemp("", "snaploader-qemu-")
		if err != nil {
			return nil, status.Errorf(codes.Internal, "creating qemu runtime dir: %v", err)
		}
		g.tmpDir = dir
		if g.cfg.SerialLog == "" {
			g.cfg.SerialLog = filepath.Join(dir, "serial.log")
		}
		if g.cfg.QMPSocket == "" {
			g.cfg.QMPSocket = filepath.Join(dir, "qmp.sock")
		}
	}
	args, err := g.cfg.Args()
	if err != nil {
		g.cleanup()
		return nil, err
	}
	// A stale socket from an earlier run would accept no connection.
	os.Remove(g.cfg.QMPSocket)
	g.cmd = exec.Command(g.cfg.QEMUPath, args...)
	g.cmd.Stdout = g.stderr
	g.cmd.Stderr = g.stderr
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := g.cmd.Start(); err != nil {
		g.cleanup()
		return nil, status.Errorf(codes.Unavailable, "starting %s: %v", g.cfg.QEMUPath, err)
	}
	go func() {
		g.waitErr = g.cmd.Wait()
		close(g.exited)
	}()
	g.Console = &Console{path: g.cfg.SerialLog, exited: g.exited}

	dialCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-g.exited:
			cancel()
		case <-dialCtx.Done():
		}
	}()
	q, err := DialQMP(dialCtx, g.cfg.QMPSocket)
	if err != nil {
		// QEMU may have accepted the connection and then failed to start;
		// its own message says why.
		select {
		case <-g.exited:
		case <-time.After(2 * time.Second):
		}
		g.Kill()
		<-g.exited
		g.cleanup()
		if msg := strings.TrimSpace(g.stderr.String()); msg != "" {
			return nil, status.Errorf(codes.Unavailable, "starting qemu: %v: %s", err, msg)
		}
		return nil, fmt.Errorf("starting qemu: %w", err)
	}
	g.QMP = q
	return g, nil
}

// Config returns the configuration the guest runs with, defaults applied.
func (g *Guest) Config() Config { return g.cfg }

// Pid returns the QEMU process id.
func (g *Guest) Pid() int { return g.cmd.Process.Pid }

// Stderr returns what QEMU wrote to stdout and stderr so far.
func (g *Guest) Stderr() string { return g.stderr.String() }

// Exited is closed when the QEMU process has ended.
func (g *Guest) Exited() <-chan struct{} { return g.exited }

// Wait waits for QEMU to exit or ctx to end. A QEMU that exited on its own
// with a failure status is an Internal error carrying its stderr.
func (g *Guest) Wait(ctx context.Context) error {
	select {
	case <-g.exited:
	case <-ctx.Done():
		return fmt.Errorf("waiting for qemu pid %d to exit: %w", g.Pid(), status.FromContextError(ctx.Err()).Err())
	}
	var ee *exec.ExitError
	if errors.As(g.waitErr, &ee) && ee.ExitCode() > 0 {
		return status.Errorf(codes.Internal, "qemu pid %d exited with %v: %s", g.Pid(), g.waitErr, strings.TrimSpace(g.stderr.String()))
	}
	return nil
}

// Quit asks QEMU to exit through QMP and waits for the process to end.
func (g *Guest) Quit(ctx context.Context) error {
	if err := g.QMP.Quit(ctx); err != nil {
		return fmt.Errorf("quitting qemu pid %d: %w", g.Pid(), err)
	}
	err := g.Wait(ctx)
	g.Close()
	return err
}

// Kill ends the QEMU process at once.
func (g *Guest) Kill() {
	select {
	case <-g.exited:
	default:
		g.cmd.Process.Kill()
	}
}

// Close kills QEMU if it still runs, waits for it, closes the QMP
// connection and removes temporary files Start created.
func (g *Guest) Close() error {
	g.Kill()
	<-g.exited
	if g.QMP != nil {
		g.QMP.Close()
	}
	g.cleanup()
	return nil
}

func (g *Guest) cleanup() {
	if g.tmpDir != "" {
		// Holds the default serial log and QMP socket; callers that read the
		// serial log after Close pass Config.SerialLog.
		os.RemoveAll(g.tmpDir)
	}
}

// shellQuote quotes s for /bin/sh.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// migrationCaps are set on both ends of every snapshot and restore. The
// capability must match on both ends; x-ignore-shared leaves shared
// file-backed RAM out of the stream and changes nothing for private RAM.
func migrationCaps() map[string]bool { return map[string]bool{"x-ignore-shared": true} }

// SnapshotStats describes one snapshot.
type SnapshotStats struct {
	StateBytes int64         // size of the device state file
	Migration  time.Duration // stop to migration completed
	Total      time.Duration // stop to QEMU exited
}

// Snapshot pauses the guest, writes its device state to stateFile (RAM too
// unless the guest's RAM is a shared memory file, which then holds it) and
// makes QEMU exit. The memory file and the disks stay consistent with the
// state file. The Guest is closed afterwards.
func (g *Guest) Snapshot(ctx context.Context, stateFile string) (SnapshotStats, error) {
	var st SnapshotStats
	start := time.Now()
	if err := g.QMP.Stop(ctx); err != nil {
		return st, fmt.Errorf("pausing guest for snapshot to %s: %w", stateFile, err)
	}
	if err := g.QMP.MigrateSetCapabilities(ctx, migrationCaps()); err != nil {
		return st, fmt.Errorf("setting migration capabilities for snapshot to %s: %w", stateFile, err)
	}
	if err := g.QMP.Migrate(ctx, "exec:cat > "+shellQuote(stateFile)); err != nil {
		return st, fmt.Errorf("starting migration to %s: %w", stateFile, err)
	}
	if _, err := g.QMP.WaitMigration(ctx, "completed"); err != nil {
		return st, fmt.Errorf("saving device state to %s: %w", stateFile, err)
	}
	st.Migration = time.Since(start)
	if err := g.Quit(ctx); err != nil {
		return st, fmt.Errorf("after snapshot to %s: %w", stateFile, err)
	}
	st.Total = time.Since(start)
	fi, err := os.Stat(stateFile)
	if err != nil {
		return st, status.Errorf(codes.Internal, "snapshot state file %s: %v", stateFile, err)
	}
	st.StateBytes = fi.Size()
	return st, nil
}

// Restore starts QEMU for cfg waiting for an incoming migration, loads the
// device state from stateFile and resumes the guest. cfg must describe the
// same machine as the snapshot (memory size, kernel, disks in the same
// order). When the snapshot was taken with MemShare, cfg.MemPath must hold
// the snapshot's memory file contents (a copy, or a lazily served file):
// with MemShare the restored guest writes back into it; without, it is
// mapped copy-on-write, read only where the guest touches it and never
// modified. ctx bounds the restore only. A state file that does not load
// (corrupt, truncated, or from a different machine) is an Internal error
// carrying QEMU's message.
func Restore(ctx context.Context, cfg Config, stateFile string) (*Guest, error) {
	if _, err := os.Stat(stateFile); err != nil {
		return nil, status.Errorf(codes.NotFound, "restoring from state file %s: %v", stateFile, err)
	}
	cfg.Incoming = true
	g, err := Start(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("restoring from state file %s: %w", stateFile, err)
	}
	fail := func(what string, err error) (*Guest, error) {
		// QEMU exits when the state does not load (corrupt or truncated
		// file, a machine that differs); that is the error to report.
		select {
		case <-g.exited:
		case <-time.After(time.Second):
		}
		exited := false
		select {
		case <-g.exited:
			exited = true
		default:
		}
		g.Close()
		if exited {
			return nil, status.Errorf(codes.Internal, "restoring from state file %s: qemu exited while %s (%v): %s", stateFile, what, g.waitErr, strings.TrimSpace(g.Stderr()))
		}
		return nil, fmt.Errorf("restoring from state file %s: %s: %w (qemu: %s)", stateFile, what, err, strings.TrimSpace(g.Stderr()))
	}
	if err := g.QMP.MigrateSetCapabilities(ctx, migrationCaps()); err != nil {
		return fail("setting migration capabilities", err)
	}
	if err := g.QMP.MigrateIncoming(ctx, "exec:cat "+shellQuote(stateFile)); err != nil {
		return fail("starting incoming migration", err)
	}
	st, err := g.QMP.WaitStatus(ctx, "paused", "running")
	if err != nil {
		return fail("loading the state", err)
	}
	if st.Status == "paused" {
		if err := g.QMP.Cont(ctx); err != nil {
			return fail("resuming", err)
		}
	}
	return g, nil
}

// Console reads a guest's serial output from the file QEMU writes.
type Console struct {
	path   string
	exited <-chan struct{}

	mu     sync.Mutex
	cursor int
}

// NewConsole reads the serial log at path (e.g. of a guest that has
// exited).
func NewConsole(path string) *Console { return &Console{path: path} }

// Path returns the serial log's path.
func (c *Console) Path() string { return c.path }

// Output returns everything the guest wrote to the serial port so far.
func (c *Console) Output() ([]byte, error) {
	b, err := os.ReadFile(c.path)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "reading serial log %s: %v", c.path, err)
	}
	return b, nil
}

// WaitFor waits until re matches the output after the previous WaitFor's
// match and returns the submatches; the next WaitFor continues after this
// match. It fails when ctx ends or QEMU exits first.
func (c *Console) WaitFor(ctx context.Context, re *regexp.Regexp) ([]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		b, err := os.ReadFile(c.path)
		if err != nil && !os.IsNotExist(err) {
			return nil, status.Errorf(codes.Internal, "reading serial log %s: %v", c.path, err)
		}
		if c.cursor <= len(b) {
			if loc := re.FindSubmatchIndex(b[c.cursor:]); loc != nil {
				var m []string
				for i := 0; i < len(loc); i += 2 {
					if loc[i] < 0 {
						m = append(m, "")
					} else {
						m = append(m, string(b[c.cursor+loc[i]:c.cursor+loc[i+1]]))
					}
				}
				c.cursor += loc[1]
				return m, nil
			}
		}
		select {
		case <-c.exited:
			return nil, status.Errorf(codes.Unavailable, "waiting for %q on serial log %s: qemu exited", re, c.path)
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for %q on serial log %s: %w", re, c.path, status.FromContextError(ctx.Err()).Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
