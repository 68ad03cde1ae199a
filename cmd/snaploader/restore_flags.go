package main

import (
	"github.com/spf13/cobra"
)

// restoreReplaceHint says what --replace does, for restore and pager.
const restoreReplaceHint = "pass --replace to write the snapshot's files into it anyway (files of the same names are replaced, all others left as they are)"

// restoreFlags are restore's flags.
type restoreFlags struct {
	sf      snapshotFlags
	out     string
	replace bool
	asJSON  bool
}

func newRestoreCmd() *cobra.Command {
	var f restoreFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *restoreFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "restore",
		Short: "Restore the newest usable snapshot of the task's key set into a directory",
		Long: `restore writes the files of the key set's newest usable snapshot into --out.
--out must not exist (it is created) or be an empty directory: a directory that
holds anything is refused before a byte is written, naming what it holds. With
--replace, restore writes into it anyway: files with the snapshot's file names
are replaced, every other entry is left as it is and listed (on stderr, and as
"other_files" with --json).`,
		RunE: runE(f.options, runRestore),
	}
	f.sf.register(cmd, "restore this exact snapshot instead of the key set's newest")
	cmd.Flags().StringVar(&f.out, "out", "", "directory to write the snapshot's files into: created if missing, else it must be empty (see --replace)")
	cmd.Flags().BoolVar(&f.replace, "replace", false, "write into an --out directory that already holds files: those with the snapshot's file names are replaced, all others are left as they are and listed")
	cmd.Flags().BoolVar(&f.asJSON, "json", false, "print one JSON object")
	return cmd
}

// options checks restore's flags; --out is refused before the cache is
// opened or a snapshot looked up.
func (f *restoreFlags) options() (restoreOptions, error) {
	if f.out == "" {
		return restoreOptions{}, usagef("--out is required")
	}
	if err := checkOutDir("--out", f.out, f.replace, restoreReplaceHint); err != nil {
		return restoreOptions{}, err
	}
	so, err := f.sf.options()
	if err != nil {
		return restoreOptions{}, err
	}
	return restoreOptions{Snapshot: so, Out: f.out, Replace: f.replace, JSON: f.asJSON, Progress: !f.asJSON && stderrIsTerminal()}, nil
}
