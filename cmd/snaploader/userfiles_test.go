package main

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// dirTree maps every path under root (relative, "." excluded) to its
// content, "<dir>" for a directory, "<link> TARGET" for a symbolic link:
// what a command must leave as it was.
func dirTree(t *testing.T, root string) map[string]string {
	t.Helper()
	tree := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		switch {
		case rel == ".":
		case d.IsDir():
			tree[rel] = "<dir>"
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			tree[rel] = "<link> " + target
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			tree[rel] = string(b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

// checkTreeKept fails unless every path of before is under root with the
// same content.
func checkTreeKept(t *testing.T, root string, before map[string]string) {
	t.Helper()
	after := dirTree(t, root)
	for p, want := range before {
		if got, ok := after[p]; !ok {
			t.Errorf("%s was removed", filepath.Join(root, p))
		} else if got != want {
			t.Errorf("%s was changed: %.40q, was %.40q", filepath.Join(root, p), got, want)
		}
	}
}

// errorKindOf is the error kind the CLI printed on stderr.
func errorKindOf(stderr string) string {
	_, kind, _ := strings.Cut(stderr, "error kind: ")
	return strings.TrimSpace(kind)
}
