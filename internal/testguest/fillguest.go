package testguest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// BuildFillGuest builds a variant of the test guest whose userland holds a
// working set: after the same setup (virtio modules, the ext4 disk's /log),
// its init runs a small static program that allocates fill_mib MiB (kernel
// command line, FillAppend; default 64), writes every page of it once with
// non-repeating data, prints "FILLED n MiB" and then loops: it reads one
// word of every page, checking it (a wrong page prints "FILL BAD page p"
// and stops counting), prints "COUNTER n", appends "n" to /log, syncs and
// sleeps 0.2 s. A restored guest therefore touches the whole filled area
// before its first new counter line.
//
// The program is compiled at build time with the Go toolchain on PATH
// (CGO_ENABLED=0, linux/amd64); a missing toolchain is Unavailable. Builds
// are cached in dir like BuildTestGuest's, keyed also by the program and the
// toolchain version.
func BuildFillGuest(ctx context.Context, dir string) (*TestGuest, error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "building fill guest: the go toolchain is not installed: %v", err)
	}
	ver, err := exec.CommandContext(ctx, goTool, "version").Output()
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "building fill guest: go version: %v", err)
	}
	return buildCachedGuest(ctx, dir, guestRecipe{
		format:     fillGuestFormat,
		init:       fillGuestInit,
		appendLine: testGuestAppend,
		extraKey:   strings.TrimSpace(string(ver)) + "\n" + fillGuestProgram,
		extra: func(ctx context.Context, work, root string) error {
			return buildFillProgram(ctx, goTool, filepath.Join(work, "fill"), filepath.Join(root, "bin", "fill"))
		},
	})
}

// FillAppend returns the fill guest's command line asking it to fill mib
// MiB.
func FillAppend(tg *TestGuest, mib int) string {
	return fmt.Sprintf("%s fill_mib=%d", tg.Append, mib)
}

// fillGuestFormat changes whenever the fill guest's recipe changes.
const fillGuestFormat = "snaploader-fill-guest-v1"

// fillGuestInit is the test guest's init with the counter loop replaced by
// the fill program.
var fillGuestInit = testGuestInit[:strings.Index(testGuestInit, "n=0\n")] + "exec /bin/fill $LOG\n"

func buildFillProgram(ctx context.Context, goTool, src, bin string) error {
	if err := os.MkdirAll(src, 0o755); err != nil {
		return status.Errorf(codes.Internal, "building fill program: %v", err)
	}
	for name, body := range map[string]string{"go.mod": "module fill\n\ngo 1.22\n", "main.go": fillGuestProgram} {
		if err := os.WriteFile(filepath.Join(src, name), []byte(body), 0o644); err != nil {
			return status.Errorf(codes.Internal, "building fill program: %v", err)
		}
	}
	cmd := exec.CommandContext(ctx, goTool, "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=", "GOWORK=off", "GOTOOLCHAIN=local")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return status.Errorf(codes.Internal, "building fill program: go build: %v: %s", err, strings.TrimSpace(out.String()))
	}
	return nil
}

// fillGuestProgram is the fill guest's program, run as PID 1.
const fillGuestProgram = `package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const page = 4096

// tag is the first word of page p.
func tag(p int) uint64 { return uint64(p)*0x9E3779B97F4A7C15 ^ 0x5A17F111 }

func main() {
	mib := 64
	if b, err := os.ReadFile("/proc/cmdline"); err == nil {
		for _, f := range strings.Fields(string(b)) {
			if v, ok := strings.CutPrefix(f, "fill_mib="); ok {
				if n, err := strconv.Atoi(v); err == nil && n > 0 {
					mib = n
				}
			}
		}
	}
	logPath := "/dev/null"
	if len(os.Args) > 1 {
		logPath = os.Args[1]
	}
	size := mib << 20
	mem, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		fmt.Printf("FILL FAILED %v\n", err)
		select {}
	}
	words := unsafe.Slice((*uint64)(unsafe.Pointer(&mem[0])), size/8)
	pages := size / page
	x := uint64(0x2545F4914F6CDD1D)
	for p := 0; p < pages; p++ {
		base := p * (page / 8)
		words[base] = tag(p)
		for i := 1; i < page/8; i++ {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			words[base+i] = x
		}
	}
	fmt.Printf("FILLED %d MiB\n", mib)
	log, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		fmt.Printf("LOG FAILED %v\n", err)
		select {}
	}
	for n := 1; ; n++ {
		for p := 0; p < pages; p++ {
			if words[p*(page/8)] != tag(p) {
				fmt.Printf("FILL BAD page %d\n", p)
				select {}
			}
		}
		fmt.Printf("COUNTER %d\n", n)
		fmt.Fprintf(log, "%d\n", n)
		syscall.Sync()
		time.Sleep(200 * time.Millisecond)
	}
}
`
