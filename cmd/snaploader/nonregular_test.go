package main

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// save given a FIFO or a device instead of a file exits non-zero within
// seconds with an error naming the path, instead of blocking in open or
// reading without end.
func TestSaveRefusesNonRegularFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		path string
	}{
		{"chunked-fifo", []string{"--chunked", "mem=" + fifo}, fifo},
		{"chunked-dev-zero", []string{"--chunked", "mem=/dev/zero"}, "/dev/zero"},
		{"file-fifo", []string{"--file", "st=" + fifo}, fifo},
		{"file-dev-zero", []string{"--file", "st=/dev/zero"}, "/dev/zero"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, binary, append(append(keyArgs(filepath.Join(t.TempDir(), "cache")), "save"), tc.args...)...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			start := time.Now()
			err := cmd.Run()
			if ctx.Err() != nil {
				t.Fatalf("save %s still running after %v (killed)", strings.Join(tc.args, " "), time.Since(start))
			}
			if err == nil {
				t.Fatalf("save %s succeeded, want an error", strings.Join(tc.args, " "))
			}
			if msg := stderr.String(); !strings.Contains(msg, tc.path) || !strings.Contains(msg, "not a regular file") || !strings.Contains(msg, "InvalidArgument") {
				t.Fatalf("save %s: stderr %q does not say %s is not a regular file (InvalidArgument)", strings.Join(tc.args, " "), msg, tc.path)
			}
		})
	}
}
