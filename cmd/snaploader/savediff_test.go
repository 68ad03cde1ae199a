package main

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// dirtyPages is a range a VMM dirtied since the base snapshot; zero says
// it now holds zeros.
type dirtyPages struct {
	off, n int64
	zero   bool
}

// writeSparseDiff writes what a VMM's diff snapshot holds: a sparse file of
// size bytes with data only at the dirty ranges. It returns the full
// memory file the VMM would have written instead.
func writeSparseDiff(t *testing.T, path string, base []byte, size int64, ds []dirtyPages) []byte {
	t.Helper()
	full := make([]byte, size)
	copy(full, base)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(uint64(size), 11))
	for _, d := range ds {
		p := make([]byte, d.n)
		if !d.zero {
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
		}
		copy(full[d.off:], p)
		if _, err := f.WriteAt(p, d.off); err != nil {
			t.Fatal(err)
		}
	}
	return full
}

func saveJSON(t *testing.T, args ...string) report {
	t.Helper()
	out, _ := run(t, false, args...)
	var r report
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("save --json output %q: %v", out, err)
	}
	return r
}

func TestSaveDiffRestoresFullMemory(t *testing.T) {
	const cs = 65536
	const size = 3<<20 + 8192
	tests := []struct {
		name     string
		size     int64 // diff size; 0 = the base's
		ds       []dirtyPages
		explicit bool // --diff-base ID instead of the key set's snapshot
	}{
		{name: "pages dirtied and zeroed", ds: []dirtyPages{
			{off: 4096, n: 4096}, {off: cs + 8192, n: 4096, zero: true}, {off: 5 * cs, n: cs, zero: true}, {off: 20*cs - 4096, n: 8192},
		}},
		{name: "explicit base", explicit: true, ds: []dirtyPages{{off: 7 * cs, n: 3 * 4096}}},
		{name: "grows the file", size: size + 5*cs + 4096, ds: []dirtyPages{
			{off: size - 4096, n: 8192}, {off: size + 2*cs, n: 4096}, {off: size + 5*cs, n: 4096}, {off: 0, n: 4096, zero: true},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cacheDir := filepath.Join(dir, "cache")
			base := writeRandom(t, filepath.Join(dir, "mem"), size, 3)
			state := filepath.Join(dir, "vmstate")
			os.WriteFile(state, []byte("state 1"), 0o644)
			first := saveJSON(t, append(keyArgs(cacheDir), "save", "--json", "--chunk-size", "65536", "--file", "vmstate="+state, "--chunked", "mem="+filepath.Join(dir, "mem"))...)

			dsize := tc.size
			if dsize == 0 {
				dsize = size
			}
			diffPath := filepath.Join(dir, "mem.diff")
			full := writeSparseDiff(t, diffPath, base, dsize, tc.ds)
			os.WriteFile(state, []byte("state 2"), 0o644)
			args := append(keyArgs(cacheDir), "save", "--json", "--file", "vmstate="+state, "--diff", "mem="+diffPath)
			if tc.explicit {
				// A newer snapshot under the key must not be the base.
				saveJSON(t, append(keyArgs(cacheDir), "save", "--json", "--chunk-size", "65536", "--chunked", "mem="+state)...)
				args = append(args, "--diff-base", first.SnapshotID)
			}
			diff := saveJSON(t, args...)

			var dirty int64
			chunks := map[int64]bool{}
			for _, d := range tc.ds {
				dirty += d.n
				for c := d.off / cs; c*cs < d.off+d.n; c++ {
					chunks[c] = true
				}
			}
			if diff.DiffBase != first.SnapshotID || diff.DiffBytesRead != dirty {
				t.Errorf("diff save report %+v: want base %s and exactly the %d dirty bytes read", diff, first.SnapshotID, dirty)
			}
			if diff.ChunksWritten > len(chunks) || diff.ChunkSize != 65536 {
				t.Errorf("diff save stored %d chunks (chunk size %d), want at most the %d the diff covers", diff.ChunksWritten, diff.ChunkSize, len(chunks))
			}

			out := filepath.Join(dir, "out")
			run(t, false, append(keyArgs(cacheDir), "restore", "--out", out, "--snapshot-id", diff.SnapshotID)...)
			got, err := os.ReadFile(filepath.Join(out, "mem"))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, full) {
				t.Fatalf("restored memory (%d bytes) differs from the full memory file the VMM would have written (%d bytes)", len(got), len(full))
			}
			if st, _ := os.ReadFile(filepath.Join(out, "vmstate")); string(st) != "state 2" {
				t.Errorf("restored vmstate %q, want the diff save's", st)
			}
			run(t, false, append(keyArgs(cacheDir), "verify", "--snapshot-id", diff.SnapshotID)...)
		})
	}
}

func TestSaveDiffRejects(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	const size = 1 << 20
	base := writeRandom(t, filepath.Join(dir, "mem"), size, 5)
	first := saveJSON(t, append(keyArgs(cacheDir), "save", "--json", "--chunk-size", "65536", "--chunked", "mem="+filepath.Join(dir, "mem"))...)
	short := filepath.Join(dir, "short.diff")
	writeSparseDiff(t, short, base, size-4096, []dirtyPages{{off: 0, n: 4096}})
	good := filepath.Join(dir, "good.diff")
	writeSparseDiff(t, good, base, size, []dirtyPages{{off: 0, n: 4096}})
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"diff shorter than the base", []string{"--diff", "mem=" + short}, "fewer than the base's 1048576"},
		{"name not in the base", []string{"--diff", "disk=" + good}, `has no chunked file "disk"`},
		{"unknown base", []string{"--diff", "mem=" + good, "--diff-base", "nosuchsnapshot"}, "--diff-base nosuchsnapshot"},
		{"base without diff", []string{"--chunked", "mem=" + good, "--diff-base", first.SnapshotID}, "no --diff given"},
		{"chunk size differs from the base", []string{"--diff", "mem=" + good, "--chunk-size", "131072"}, "differs from the chunk size 65536"},
		{"name twice", []string{"--diff", "mem=" + good, "--chunked", "mem=" + good}, "given as --diff and as --file or --chunked"},
		{"page size does not divide the chunk size", []string{"--chunked", "mem=" + good, "--page-size", "2MiB"}, "chunk size 4096000 is not a multiple of the page size 2097152"},
		{"bad page size", []string{"--chunked", "mem=" + good, "--page-size", "3KiB"}, "power of two"},
		{"huge diff over 64 KiB chunks", []string{"--diff", "mem=" + good, "--page-size", "2MiB"}, "chunk size 65536 is not a multiple of the page size 2097152"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr := run(t, true, append(append(keyArgs(cacheDir), "save"), tc.args...)...)
			if !strings.Contains(stderr, tc.want) {
				t.Errorf("stderr %q, want it to contain %q", stderr, tc.want)
			}
		})
	}
	// Nothing was saved over the first snapshot.
	out, _ := run(t, false, append(keyArgs(cacheDir), "inspect")...)
	if !strings.Contains(out, first.SnapshotID) {
		t.Errorf("a rejected save replaced the key's snapshot: %s", out)
	}
}

// TestSaveFullFileOverPrevious: a full memory file saved again after a VM
// ran stores only the chunks that changed (the other mode, beside diffs).
func TestSaveFullFileOverPrevious(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	mem := filepath.Join(dir, "mem")
	data := writeRandom(t, mem, 2<<20, 9)
	first := saveJSON(t, append(keyArgs(cacheDir), "save", "--json", "--chunk-size", "65536", "--chunked", "mem="+mem)...)
	for _, off := range []int{0, 5 * 65536, 31*65536 + 100} {
		data[off] ^= 0xff
	}
	os.WriteFile(mem, data, 0o644)
	again := saveJSON(t, append(keyArgs(cacheDir), "save", "--json", "--chunk-size", "65536", "--chunked", "mem="+mem)...)
	nonZero := 0
	for off := 0; off < len(data); off += 65536 {
		if !bytes.Equal(data[off:off+65536], make([]byte, 65536)) {
			nonZero++
		}
	}
	if first.ChunksWritten != first.ChunksTotal || again.ChunksWritten != 3 || again.ChunksTotal != nonZero {
		t.Errorf("first save stored %d of %d chunks, the resave of the full file %d of %d; want all, then only the 3 that changed of %d",
			first.ChunksWritten, first.ChunksTotal, again.ChunksWritten, again.ChunksTotal, nonZero)
	}
	out := filepath.Join(dir, "out")
	run(t, false, append(keyArgs(cacheDir), "restore", "--out", out)...)
	if got, _ := os.ReadFile(filepath.Join(out, "mem")); !bytes.Equal(got, data) {
		t.Error("restored memory differs from the full file")
	}
}

// TestSavePageSizeRecorded: --page-size is recorded in the manifest and a
// diff over such a snapshot keeps it.
func TestSavePageSizeRecorded(t *testing.T) {
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	const size = 8 << 20
	base := writeRandom(t, filepath.Join(dir, "mem"), size, 13)
	first := saveJSON(t, append(keyArgs(cacheDir), "save", "--json", "--page-size", "2MiB", "--chunk-size", "4194304", "--chunked", "mem="+filepath.Join(dir, "mem"))...)
	if first.PageSize != 2<<20 {
		t.Errorf("save report page_size %d, want 2097152", first.PageSize)
	}
	diffPath := filepath.Join(dir, "mem.diff")
	full := writeSparseDiff(t, diffPath, base, size, []dirtyPages{{off: 6 << 20, n: 2 << 20}})
	diff := saveJSON(t, append(keyArgs(cacheDir), "save", "--json", "--diff", "mem="+diffPath)...)
	if diff.PageSize != 2<<20 || diff.ChunksWritten != 1 {
		t.Errorf("diff save report %+v: want the base's page size kept and 1 chunk stored", diff)
	}
	out, _ := run(t, false, append(keyArgs(cacheDir), "inspect", "--snapshot-id", diff.SnapshotID)...)
	var m struct {
		VMConfiguration struct {
			Extra map[string]string `json:"extra"`
		} `json:"vm_configuration"`
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil || m.VMConfiguration.Extra[PageSizeKey] != "2097152" {
		t.Errorf("inspect does not show the recorded page size (%v): %s", err, out)
	}
	outDir := filepath.Join(dir, "out")
	run(t, false, append(keyArgs(cacheDir), "restore", "--out", outDir)...)
	if got, _ := os.ReadFile(filepath.Join(outDir, "mem")); !bytes.Equal(got, full) {
		t.Error("restored memory differs from the full memory file")
	}
}
