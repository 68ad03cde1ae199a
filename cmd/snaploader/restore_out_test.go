package main

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/snaploader/snaploader/internal/fileio"
)

// writeForeign fills dir with files and a directory that no snapshot of
// these tests has written: n files note-0 ... plus mem (a snapshot's file
// name, with other content) and sub/kept.
func writeForeign(t *testing.T, dir string, n int) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{"mem": "not the snapshot's memory", "sub/kept": "kept"}
	for i := range n {
		files[fmt.Sprintf("note-%d", i)] = fmt.Sprintf("note %d", i)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// restoreJSON is the restore --json fields these tests read;
// OtherFiles is a pointer so that a missing field is told from an empty one.
type restoreJSON struct {
	SnapshotID string            `json:"snapshot_id"`
	Files      map[string]string `json:"files"`
	OtherFiles *[]string         `json:"other_files"`
}

// restore --out writes only into a missing or empty directory: a
// directory holding anything (but restore's own temporary files) is
// refused before a byte is written, unless --replace, which replaces only
// the snapshot's own file names and reports every other entry.
func TestRestoreOutDir(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	mem := writeRandom(t, filepath.Join(dir, "mem"), 1<<20, 31)
	if err := os.WriteFile(filepath.Join(dir, "state"), []byte("device state"), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, false, append(keyArgs(cacheDir), "save", "--chunk-size", "65536",
		"--file", "state="+filepath.Join(dir, "state"), "--chunked", "mem="+filepath.Join(dir, "mem"))...)
	staleTemp := func(t *testing.T, out string) {
		t.Helper()
		if err := os.MkdirAll(out, 0o755); err != nil {
			t.Fatal(err)
		}
		f, err := fileio.CreateTemp(out) // as a killed restore leaves it
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	tests := []struct {
		name  string
		setup func(t *testing.T, out string)
		args  []string
		// wantKind is the error kind of a refusal ("" = restored), and
		// wantMsg what its message says.
		wantKind string
		wantMsg  []string
		// wantOthers are the entries a restore reports it left.
		wantOthers []string
		// wantStderr: text mode says this on stderr (nothing when empty).
		wantStderr []string
	}{
		{name: "missing directory", wantOthers: []string{}},
		{name: "missing parents", setup: func(t *testing.T, out string) {}, args: []string{"--out-sub", "a/b"}, wantOthers: []string{}},
		{name: "empty directory", setup: func(t *testing.T, out string) { os.MkdirAll(out, 0o755) }, wantOthers: []string{}},
		{name: "only a killed restore's temporary file", setup: staleTemp, wantOthers: []string{}},
		{name: "foreign files", setup: func(t *testing.T, out string) { writeForeign(t, out, 7) },
			wantKind: "FailedPrecondition",
			wantMsg:  []string{"9 entries", `"mem"`, `"note-0"`, `"note-3"`, "and 4 more", "--replace"}},
		{name: "another snapshot's files of the same names", setup: func(t *testing.T, out string) {
			os.MkdirAll(out, 0o755)
			os.WriteFile(filepath.Join(out, "mem"), []byte("other memory"), 0o644)
			os.WriteFile(filepath.Join(out, "state"), []byte("other state"), 0o644)
		}, wantKind: "FailedPrecondition", wantMsg: []string{"2 entries", `"mem", "state"`, "--replace"}},
		{name: "the same with --replace", setup: func(t *testing.T, out string) {
			os.MkdirAll(out, 0o755)
			os.WriteFile(filepath.Join(out, "mem"), []byte("other memory"), 0o644)
			os.WriteFile(filepath.Join(out, "state"), []byte("other state"), 0o644)
		}, args: []string{"--replace"}, wantOthers: []string{}},
		{name: "foreign files with --replace (json)", setup: func(t *testing.T, out string) { writeForeign(t, out, 2) }, args: []string{"--replace"},
			wantOthers: []string{"note-0", "note-1", "sub"}},
		{name: "foreign files with --replace (text)", setup: func(t *testing.T, out string) { writeForeign(t, out, 2) }, args: []string{"--replace", "--text"},
			wantOthers: []string{"note-0", "note-1", "sub"}, wantStderr: []string{"3 other entries", `"note-0"`, `"note-1"`, `"sub"`}},
		{name: "--replace into a missing directory", args: []string{"--replace"}, wantOthers: []string{}},
		{name: "a regular file", setup: func(t *testing.T, out string) { os.WriteFile(out, []byte("my file"), 0o644) },
			wantKind: "InvalidArgument", wantMsg: []string{"a regular file", "not a directory"}},
		{name: "a regular file with --replace", setup: func(t *testing.T, out string) { os.WriteFile(out, []byte("my file"), 0o644) },
			args: []string{"--replace"}, wantKind: "InvalidArgument", wantMsg: []string{"a regular file", "not a directory"}},
		{name: "under a regular file", setup: func(t *testing.T, out string) { os.WriteFile(out, []byte("my file"), 0o644) },
			args: []string{"--out-sub", "x"}, wantKind: "InvalidArgument", wantMsg: []string{"not a directory"}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := filepath.Join(dir, fmt.Sprintf("case-%d", i))
			if err := os.Mkdir(root, 0o755); err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(root, "out")
			if tc.setup != nil {
				tc.setup(t, out)
			}
			before := dirTree(t, root)
			args := append(keyArgs(cacheDir), "restore")
			text := false
			for j := 0; j < len(tc.args); j++ {
				switch tc.args[j] {
				case "--out-sub":
					out = filepath.Join(out, tc.args[j+1])
					j++
				case "--text":
					text = true
				default:
					args = append(args, tc.args[j])
				}
			}
			args = append(args, "--out", out)
			if !text {
				args = append(args, "--json")
			}
			stdout, stderr := run(t, tc.wantKind != "", args...)
			if tc.wantKind != "" {
				if kind := errorKindOf(stderr); kind != tc.wantKind {
					t.Errorf("error kind %q, want %s; stderr:\n%s", kind, tc.wantKind, stderr)
				}
				for _, w := range append([]string{out}, tc.wantMsg...) {
					if !strings.Contains(stderr, w) {
						t.Errorf("error does not say %q:\n%s", w, stderr)
					}
				}
				if after := dirTree(t, root); !maps.Equal(after, before) {
					t.Errorf("a refused restore changed %s:\nbefore %q\nafter  %q", root, slices.Sorted(maps.Keys(before)), slices.Sorted(maps.Keys(after)))
				}
				return
			}
			if got, err := os.ReadFile(filepath.Join(out, "mem")); err != nil || string(got) != string(mem) {
				t.Errorf("restored mem differs from the snapshot's (err %v)", err)
			}
			if got, err := os.ReadFile(filepath.Join(out, "state")); err != nil || string(got) != "device state" {
				t.Errorf("restored state = %q, %v", got, err)
			}
			// Every entry that was there but the snapshot's own names is
			// as it was; nothing else is there but the snapshot's files.
			kept := map[string]string{}
			for p, c := range before {
				if rel, err := filepath.Rel(out, filepath.Join(root, p)); err == nil && !strings.HasPrefix(rel, "..") && rel != "." &&
					rel != "mem" && rel != "state" && !fileio.IsTempName(rel) {
					kept[p] = c
				}
			}
			checkTreeKept(t, root, kept)
			left := extraFiles(t, out, "mem", "state")
			if !slices.Equal(left, tc.wantOthers) {
				t.Errorf("%s holds %q besides the snapshot's files, want %q", out, left, tc.wantOthers)
			}
			if text {
				for _, w := range tc.wantStderr {
					if !strings.Contains(stderr, w) {
						t.Errorf("stderr does not report %q:\n%s", w, stderr)
					}
				}
				if len(tc.wantStderr) == 0 && stderr != "" {
					t.Errorf("stderr %q, want nothing", stderr)
				}
				return
			}
			var rep restoreJSON
			if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
				t.Fatalf("restore --json output %q: %v", stdout, err)
			}
			if rep.OtherFiles == nil {
				t.Fatalf("restore --json output lacks other_files: %s", stdout)
			}
			if !slices.Equal(*rep.OtherFiles, tc.wantOthers) {
				t.Errorf("other_files = %q, want %q", *rep.OtherFiles, tc.wantOthers)
			}
		})
	}
}
