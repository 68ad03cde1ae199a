package main

import (
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/snapshot"
)

// saveFlags are save's flags.
type saveFlags struct {
	// flags are the command's, to tell the flags given from defaults.
	flags     *pflag.FlagSet
	cf        cacheFlags
	kf        keyFlags
	files     []string
	chunked   []string
	chunkSize int64
	asJSON    bool
	vcpus     int64
	memBytes  int64
	policy    string
	gf        getFlags
	diffs     []string
	baseID    string
	pageSize  string
}

func newSaveCmd() *cobra.Command {
	var f saveFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *saveFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "save",
		Short: "Save a snapshot (artifact files and chunked files) under the task's write key",
		RunE:  runE(f.options, runSave),
	}
	f.cf.register(cmd)
	f.kf.register(cmd)
	f.flags = cmd.Flags()
	fl := cmd.Flags()
	fl.StringArrayVar(&f.files, "file", nil, "artifact file NAME=PATH stored whole (repeatable)")
	fl.StringArrayVar(&f.chunked, "chunked", nil, "chunked file NAME=PATH split into chunks (repeatable)")
	fl.StringArrayVar(&f.diffs, "diff", nil, "chunked file NAME=PATH given as a sparse diff (a VMM's diff snapshot: as long as the memory, data only where pages were dirtied), merged over chunked file NAME of the --diff-base snapshot; only its data regions are read (repeatable)")
	fl.StringVar(&f.baseID, "diff-base", "", "snapshot id the --diff files were taken over (default: the snapshot the key set restores now)")
	fl.StringVar(&f.pageSize, "page-size", "", "guest page size of the chunked files, e.g. 2MiB for huge-page-backed memory: --chunk-size must be a multiple of it; recorded in the manifest (VM configuration extra "+PageSizeKey+")")
	sizeFlag(cmd, &f.chunkSize, "chunk-size", cow.DefaultChunkSize, "chunk size, a multiple of 4096 bytes (bytes, or KiB/MiB/GiB)")
	fl.BoolVar(&f.asJSON, "json", false, "print one JSON object")
	fl.Int64Var(&f.vcpus, "vcpus", 0, "VM configuration: vCPUs (recorded in the manifest)")
	sizeFlag(cmd, &f.memBytes, "memory-bytes", 0, "VM configuration: memory size (bytes, or KiB/MiB/GiB; recorded in the manifest)")
	fl.StringVar(&f.policy, "save-policy", "first-non-default-ref", "when a run on a non-default ref publishes to the remote: always, first-non-default-ref or none-available")
	f.gf.register(cmd)
	return cmd
}

// options checks save's flags: names, chunk and page sizes, the key, the
// caches and the policies, before anything is opened.
func (f *saveFlags) options() (saveOptions, error) {
	var o saveOptions
	if err := f.kf.check(); err != nil {
		return o, err
	}
	if f.chunkSize <= 0 || f.chunkSize%cow.PageSize != 0 {
		return o, usagef("--chunk-size %d: want a positive multiple of %d", f.chunkSize, cow.PageSize)
	}
	fileMap, _, err := parseNamed("file", f.files)
	if err != nil {
		return o, err
	}
	chunkMap, chunkOrder, err := parseNamed("chunked", f.chunked)
	if err != nil {
		return o, err
	}
	if len(fileMap)+len(chunkMap)+len(f.diffs) == 0 {
		return o, usagef("nothing to save: give at least one --file, --chunked or --diff")
	}
	for n := range chunkMap {
		if _, dup := fileMap[n]; dup {
			return o, usagef("name %q given as both --file and --chunked", n)
		}
	}
	diffMap, diffOrder, err := parseNamed("diff", f.diffs)
	if err != nil {
		return o, err
	}
	for n := range diffMap {
		if fileMap[n] != "" || chunkMap[n] != "" {
			return o, usagef("name %q given as --diff and as --file or --chunked", n)
		}
	}
	if f.baseID != "" && len(diffMap) == 0 {
		return o, usagef("--diff-base names the snapshot --diff files were taken over; no --diff given")
	}
	ps, err := parsePageSize(f.pageSize)
	if err != nil {
		return o, err
	}
	for _, n := range chunkOrder {
		if err := checkPageSize("--chunked "+n+" with --chunk-size and --page-size", f.chunkSize, ps); err != nil {
			return o, err
		}
	}
	if o.Cache, err = f.cf.options(); err != nil {
		return o, err
	}
	if o.Key, err = f.kf.options(); err != nil {
		return o, err
	}
	if o.Policy, err = snapshot.ParseSavePolicy(f.policy); err != nil {
		return o, err
	}
	if o.Get, err = f.gf.options(); err != nil {
		return o, err
	}
	o.Files, o.Chunked, o.ChunkOrder, o.Diffs, o.DiffOrder, o.DiffBase = fileMap, chunkMap, chunkOrder, diffMap, diffOrder, f.baseID
	o.ChunkSize, o.ChunkSizeSet, o.PageSize = f.chunkSize, f.flags.Changed("chunk-size"), ps
	o.VCPUs, o.MemoryBytes = f.vcpus, f.memBytes
	o.JSON, o.Progress = f.asJSON, !f.asJSON && stderrIsTerminal()
	return o, nil
}

func parseNamed(flag string, vals []string) (map[string]string, []string, error) {
	m := map[string]string{}
	var order []string
	for _, v := range vals {
		name, path, ok := strings.Cut(v, "=")
		if !ok || name == "" || path == "" {
			return nil, nil, usagef("--%s %q: want NAME=PATH", flag, v)
		}
		if err := snapshot.ValidateName(name); err != nil {
			return nil, nil, usagef("--%s %q: %w", flag, v, err)
		}
		if _, dup := m[name]; dup {
			return nil, nil, usagef("--%s: duplicate name %q", flag, name)
		}
		m[name] = path
		order = append(order, name)
	}
	return m, order, nil
}
