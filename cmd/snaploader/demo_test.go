package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The README's first command works: the demo saves, dirties, saves
// incrementally and restores on a second host, checking every byte.
func TestDemoRuns(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	cmd := exec.CommandContext(ctx, binary, "demo", "--mem-mib", "32", "--disk-mib", "16",
		"--cache-dir", filepath.Join(dir, "cache"), "--work-dir", filepath.Join(dir, "work"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("demo: %v\n%s%s", err, out.String(), errb.String())
	}
	for _, want := range []string{"manifest from remote tier", "restored files equal the VM's"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}

// The demo removes only what it created: a --work-dir that exists keeps
// everything it held, the demo working in a directory of its own inside
// it; a --work-dir that did not exist is removed again; one that is a
// regular file is refused untouched. The same holds when the demo fails.
func TestDemoRemovesOnlyWhatItCreated(t *testing.T) {
	withFile := func(t *testing.T, work string) {
		if err := os.MkdirAll(filepath.Join(work, "vm"), 0o755); err != nil {
			t.Fatal(err)
		}
		for name, content := range map[string]string{"notes.txt": "mine", "vm/memory.img": "my memory", "restored": "my restored"} {
			if err := os.WriteFile(filepath.Join(work, name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	regular := func(t *testing.T, work string) {
		if err := os.WriteFile(work, []byte("not a directory"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name  string
		setup func(t *testing.T, work string) // nil: --work-dir does not exist
		sub   string                          // --work-dir is this path under the prepared one
		args  []string
		// wantErr is what a failure says ("" = the demo succeeds).
		wantErr string
		// wantKept: a directory of the demo's own is left (--keep).
		wantKept bool
	}{
		{name: "existing directory with files", setup: withFile},
		{name: "existing directory, --keep", setup: withFile, args: []string{"--keep"}, wantKept: true},
		{name: "missing directory", setup: nil},
		{name: "missing directory and parents", sub: "a/b"},
		{name: "regular file", setup: regular, wantErr: "not a directory"},
		{name: "impossible size, existing directory", setup: withFile, args: []string{"--mem-mib", "-1"}, wantErr: "--mem-mib"},
		{name: "impossible size, missing directory", args: []string{"--mem-mib", "-1"}, wantErr: "--mem-mib"},
		{name: "fails after writing the VM, existing directory", setup: withFile, args: []string{"--cache-dir", "FILE"}, wantErr: "FILE"},
		{name: "fails after writing the VM, missing directory", args: []string{"--cache-dir", "FILE"}, wantErr: "FILE"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), fmt.Sprint(i))
			if err := os.Mkdir(root, 0o755); err != nil {
				t.Fatal(err)
			}
			work := filepath.Join(root, "work")
			if tc.setup != nil {
				tc.setup(t, work)
			}
			if tc.sub != "" {
				work = filepath.Join(work, tc.sub)
			}
			cacheFile := filepath.Join(root, "cache-file")
			if err := os.WriteFile(cacheFile, []byte("a file, not a cache"), 0o644); err != nil {
				t.Fatal(err)
			}
			before := dirTree(t, root)
			args := []string{"demo", "--mem-mib", "4", "--disk-mib", "4", "--cache-dir", filepath.Join(root, "cache"), "--work-dir", work}
			for _, a := range tc.args {
				if a == "FILE" {
					a = cacheFile
				}
				args = append(args, a)
			}
			_, stderr := run(t, tc.wantErr != "", args...)
			if tc.wantErr != "" {
				want := strings.ReplaceAll(tc.wantErr, "FILE", cacheFile)
				if !strings.Contains(stderr, want) {
					t.Errorf("demo error does not say %q:\n%s", want, stderr)
				}
			}
			if tc.setup != nil && tc.sub == "" {
				if tc.wantErr == "not a directory" && !strings.Contains(stderr, work) {
					t.Errorf("demo error does not name %s:\n%s", work, stderr)
				}
			}
			after := dirTree(t, root)
			delete(after, "cache") // host A's cache, which the demo keeps
			for p := range after {
				if strings.HasPrefix(p, "cache"+string(filepath.Separator)) {
					delete(after, p)
				}
			}
			checkTreeKept(t, root, before)
			var added []string
			for p := range after {
				if _, ok := before[p]; !ok {
					added = append(added, p)
				}
			}
			if !tc.wantKept {
				if len(added) > 0 {
					t.Errorf("the demo left %q in %s", added, root)
				}
				return
			}
			// --keep: everything the demo wrote is in one directory of its
			// own inside the work directory.
			own := ""
			for _, p := range added {
				top := strings.Split(filepath.ToSlash(p), "/")
				if len(top) < 2 || filepath.Join(root, top[0]) != work {
					t.Errorf("--keep left %s outside a directory of the demo's own in %s", p, work)
					continue
				}
				if own == "" {
					own = top[1]
				} else if own != top[1] {
					t.Errorf("--keep left %s and %s: two directories", own, top[1])
				}
			}
			if own == "" || !strings.Contains(stderr, filepath.Join(work, own)) {
				t.Errorf("--keep left the demo's files in %q; stderr does not say where:\n%s", own, stderr)
			}
		})
	}
}
