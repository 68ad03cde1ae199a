package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/snaploader/snaploader/snapshot"
)

func TestSaveFlags(t *testing.T) {
	clearKeyEnv(t)
	cacheDir := filepath.Join(t.TempDir(), "cache")
	key := []string{"--cache-dir", cacheDir, "--instance", "ci", "--config-hash", "c", "--ref", "feat"}
	for _, tc := range []struct {
		name string
		args []string
		want string // "" when the flags are valid
	}{
		{"no key", []string{"--file", "a=/x"}, "--instance (the instance name snapshots are stored under), --config-hash (the hash of the VM configuration) and --ref or $GIT_BRANCH (the task's git branch) are required"},
		{"nothing to save", nil, "nothing to save: give at least one --file, --chunked or --diff"},
		{"chunk size", []string{"--file", "a=/x", "--chunk-size", "100"}, "--chunk-size 100: want a positive multiple of 4096"},
		{"not NAME=PATH", []string{"--chunked", "mem"}, `--chunked "mem": want NAME=PATH`},
		{"name with a separator", []string{"--file", "a/b=/x"}, `--file "a/b=/x": file name "a/b" contains a path separator`},
		{"duplicate name", []string{"--file", "a=/x", "--file", "a=/y"}, `--file: duplicate name "a"`},
		{"file and chunked", []string{"--file", "a=/x", "--chunked", "a=/y"}, `name "a" given as both --file and --chunked`},
		{"diff and chunked", []string{"--chunked", "a=/x", "--diff", "a=/y"}, `name "a" given as --diff and as --file or --chunked`},
		{"diff base without diff", []string{"--file", "a=/x", "--diff-base", "s1"}, "--diff-base names the snapshot --diff files were taken over; no --diff given"},
		{"page size", []string{"--file", "a=/x", "--page-size", "3KiB"}, `--page-size "3KiB": want a power of two from 4KiB to 1GiB`},
		{"chunks straddle pages", []string{"--chunked", "mem=/x", "--page-size", "2MiB"}, "--chunked mem with --chunk-size and --page-size: chunk size 4096000 is not a multiple of the page size 2097152"},
		{"digest function", []string{"--file", "a=/x", "--digest-function", "md5"}, `--digest-function: unknown digest function "md5"`},
		{"cache bound", []string{"--file", "a=/x", "--cache-max-bytes", "0"}, "--cache-max-bytes 0: want a positive number of bytes"},
		{"remote timeout", []string{"--file", "a=/x", "--remote-timeout", "0s"}, "--remote-timeout 0s: want a positive duration"},
		{"client cert alone", []string{"--file", "a=/x", "--remote", "grpc://127.0.0.1:1", "--tls-client-cert", "c.pem"}, "--tls-client-cert and --tls-client-key go together"},
		{"client cert without remote", []string{"--file", "a=/x", "--tls-client-cert", "c.pem"}, ""},
		{"platform", []string{"--file", "a=/x", "--platform", "linux"}, `--platform "linux": want KEY=VAL`},
		{"control character", []string{"--file", "a=/x", "--base-ref", "a\x01b"}, `--base-ref "a\x01b": a git ref has no control characters`},
		{"save policy", []string{"--file", "a=/x", "--save-policy", "sometimes"}, `unknown save policy "sometimes"`},
		{"max stale", []string{"--file", "a=/x", "--max-stale", "0"}, "--max-stale 0: want a positive duration"},
		{"valid", []string{"--file", "a=/x", "--chunked", "mem=/m", "--chunk-size", "4MiB", "--page-size", "2MiB"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var f saveFlags
			cmd := f.command()
			args := append(append([]string{}, key...), tc.args...)
			if tc.name == "no key" {
				args = append([]string{"--cache-dir", cacheDir}, tc.args...)
			}
			parseFlags(t, cmd, args)
			_, err := f.options()
			checkUsage(t, args, err, tc.want)
		})
	}
	// Checking the flags opens nothing: the cache directory is not created.
	if _, err := os.Stat(cacheDir); !os.IsNotExist(err) {
		t.Errorf("checking save's flags touched the cache directory %s (%v)", cacheDir, err)
	}
}

// TestSaveFlagsOptions: the typed options hold what the flags say.
func TestSaveFlagsOptions(t *testing.T) {
	clearKeyEnv(t)
	var f saveFlags
	cmd := f.command()
	dir := t.TempDir()
	parseFlags(t, cmd, []string{"--cache-dir", dir, "--instance", "ci", "--config-hash", "c", "--ref", "feat", "--default-ref", "main",
		"--universal-ref", "all", "--file", "vmstate=/s", "--chunked", "mem=/m", "--chunked", "disk=/d", "--chunk-size", "4MiB", "--page-size", "2MiB",
		"--vcpus", "2", "--memory-bytes", "1GiB", "--save-policy", "always", "--read-policy", "newest", "--remote-read-only", "--json"})
	o, err := f.options()
	if err != nil {
		t.Fatal(err)
	}
	if o.Cache.Dir != dir || o.Files["vmstate"] != "/s" || o.Chunked["disk"] != "/d" || len(o.ChunkOrder) != 2 || o.ChunkOrder[0] != "mem" || o.ChunkOrder[1] != "disk" {
		t.Errorf("files: %+v", o)
	}
	if o.ChunkSize != 4<<20 || !o.ChunkSizeSet || o.PageSize != 2<<20 || o.VCPUs != 2 || o.MemoryBytes != 1<<30 {
		t.Errorf("sizes: chunk %d (given %v), page %d, vcpus %d, memory %d", o.ChunkSize, o.ChunkSizeSet, o.PageSize, o.VCPUs, o.MemoryBytes)
	}
	if o.Key.Task.InstanceName != "ci" || o.Key.UniversalRef != "all" || o.Key.defaultRef() != "main" || o.Key.Task.Env[snapshot.EnvBranch] != "feat" {
		t.Errorf("key: %+v", o.Key)
	}
	if o.Policy != snapshot.Always || o.Get.ReadPolicy != snapshot.Newest || !o.Cache.Remote.ReadOnly || !o.JSON || o.Progress {
		t.Errorf("policies and output: %+v", o)
	}
}
