package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRestoreFlags(t *testing.T) {
	clearKeyEnv(t)
	dir := t.TempDir()
	full := filepath.Join(dir, "full")
	if err := os.Mkdir(full, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(full, "keep"), []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	key := []string{"--cache-dir", filepath.Join(dir, "cache"), "--instance", "ci", "--config-hash", "c", "--ref", "feat"}
	for _, tc := range []struct {
		name string
		args []string
		want string // "" when the flags are valid
	}{
		{"no out", key, "--out is required"},
		{"no key", []string{"--out", out}, "--instance (the instance name snapshots are stored under), --config-hash (the hash of the VM configuration) and --ref or $GIT_BRANCH (the task's git branch) are required"},
		{"id without instance", []string{"--out", out, "--snapshot-id", "s1"}, "--instance is required with --snapshot-id"},
		{"id", []string{"--out", out, "--snapshot-id", "s1", "--instance", "ci", "--cache-dir", filepath.Join(dir, "cache")}, ""},
		{"read policy", append([]string{"--out", out, "--read-policy", "oldest"}, key...), `unknown read policy "oldest"`},
		{"out not a directory", append([]string{"--out", filepath.Join(full, "keep")}, key...), "is a regular file"},
		{"replace", append([]string{"--out", full, "--replace"}, key...), ""},
		{"valid", append([]string{"--out", out}, key...), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var f restoreFlags
			cmd := f.command()
			parseFlags(t, cmd, tc.args)
			o, err := f.options()
			checkUsage(t, tc.args, err, tc.want)
			if err == nil && tc.name == "id" && (o.Snapshot.ID != "s1" || o.Snapshot.Instance != "ci") {
				t.Errorf("%q: snapshot %+v", tc.args, o.Snapshot)
			}
		})
	}
	// An --out that holds files is refused (not a usage error: exit 1),
	// naming what it holds and what --replace does; nothing in it changes.
	var f restoreFlags
	cmd := f.command()
	parseFlags(t, cmd, append([]string{"--out", full}, key...))
	_, err := f.options()
	if err == nil || classify(err, false).ExitCode != exitFailure || !strings.Contains(cliText(err), `"keep"`) || !strings.Contains(cliText(err), "pass --replace") {
		t.Errorf("--out holding a file: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(full, "keep")); err != nil || string(b) != "mine" {
		t.Errorf("--out's file changed: %q, %v", b, err)
	}
	for _, p := range []string{out, filepath.Join(dir, "cache")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("checking restore's flags created %s (%v)", p, err)
		}
	}
}
