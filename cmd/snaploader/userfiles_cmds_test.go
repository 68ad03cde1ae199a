package main

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The other commands that write into a directory the user names refuse
// one that holds files unless --replace, and never remove a file they did
// not create (pager's --socket, keygen's --out). Each refusal comes before
// the command needs a snapshot, QEMU or a VMM.
func TestCommandsKeepUserFiles(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "team.keys")
	run(t, false, "keygen", "--out", key)
	tests := []struct {
		name string
		// args: "DIR" is replaced by a directory holding a user file,
		// "FILE" by a user file.
		args     []string
		wantKind string
		wantMsg  []string
	}{
		{"pager --dir", []string{"pager", "--dir", "DIR", "--socket", filepath.Join(dir, "s.sock")}, "FailedPrecondition", []string{"--dir", "--replace", `"notes"`}},
		{"pager --socket on a file", []string{"pager", "--dir", filepath.Join(dir, "pager-new"), "--socket", "FILE"}, "InvalidArgument", []string{"--socket", "not a socket"}},
		{"qemu restore --dir", []string{"qemu", "restore", "--dir", "DIR"}, "FailedPrecondition", []string{"--dir", "--replace", `"notes"`}},
		{"qemu boot --dir", []string{"qemu", "boot", "--dir", "DIR", "--kernel", "FILE"}, "FailedPrecondition", []string{"--dir", "--replace", `"notes"`}},
		{"qemu save --dir", []string{"qemu", "save", "--dir", "DIR", "--qmp", filepath.Join(dir, "q.sock"), "--mem-file", "FILE"}, "FailedPrecondition", []string{"--dir", "--replace", `"notes"`}},
		{"qemu boot --dir on a file", []string{"qemu", "boot", "--dir", "FILE", "--kernel", "FILE"}, "InvalidArgument", []string{"--dir", "not a directory"}},
		{"keygen --out an existing file", []string{"keygen", "--out", "FILE"}, "AlreadyExists", []string{"exists"}},
		{"keygen --add-to --out an existing file", []string{"keygen", "--add-to", key, "--out", "FILE"}, "AlreadyExists", []string{"exists"}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := filepath.Join(dir, fmt.Sprintf("case-%d", i))
			userDir, userFile := filepath.Join(root, "dir"), filepath.Join(root, "file")
			if err := os.MkdirAll(userDir, 0o755); err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{filepath.Join(userDir, "notes"), userFile} {
				if err := os.WriteFile(p, []byte("mine"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			args := append([]string{}, tc.args...)
			for j, a := range args {
				switch a {
				case "DIR":
					args[j] = userDir
				case "FILE":
					args[j] = userFile
				}
			}
			if args[0] != "keygen" {
				args = append(args, keyArgs(filepath.Join(root, "cache"))...)
			}
			before := dirTree(t, root)
			keyBefore, _ := os.ReadFile(key)
			_, stderr := run(t, true, args...)
			if kind := errorKindOf(stderr); kind != tc.wantKind {
				t.Errorf("error kind %q, want %s; stderr:\n%s", kind, tc.wantKind, stderr)
			}
			for _, w := range tc.wantMsg {
				if !strings.Contains(stderr, w) {
					t.Errorf("error does not say %q:\n%s", w, stderr)
				}
			}
			if after := dirTree(t, root); !maps.Equal(after, before) {
				t.Errorf("%s changed %s:\nbefore %q\nafter  %q", tc.name, root, before, after)
			}
			if b, _ := os.ReadFile(key); string(b) != string(keyBefore) {
				t.Errorf("%s changed the key file %s", tc.name, key)
			}
		})
	}
}
