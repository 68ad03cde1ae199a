package main

import (
	"github.com/spf13/cobra"
)

// keygenFlags are keygen's flags.
type keygenFlags struct {
	out, addTo string
}

func newKeygenCmd() *cobra.Command {
	var f keygenFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *keygenFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keygen --out FILE | --add-to FILE [--out FILE]",
		Short: "Create a group key file for client-side encryption, or add a new key to one (rotation)",
		Long: `keygen writes a key file (mode 0600) holding 256-bit group keys, oldest first.
--out FILE creates a new file with one key; a FILE that exists is refused, never
overwritten. --add-to FILE adds a new key to an existing file (written back to
FILE, or to --out, a new file): new saves seal with the newest
key, and every key in the file still opens what it sealed, so snapshots saved
before a rotation keep restoring until their key is removed from the file.`,
		RunE: runE(f.options, runKeygen),
	}
	cmd.Flags().StringVar(&f.out, "out", "", "key file to write; refused if it exists (unless it is the --add-to file)")
	cmd.Flags().StringVar(&f.addTo, "add-to", "", "existing key file to add a new key to")
	return cmd
}

// options checks keygen's flags: a file to write or to add to.
func (f *keygenFlags) options() (keygenOptions, error) {
	if f.out == "" && f.addTo == "" {
		return keygenOptions{}, usagef("keygen: give --out FILE or --add-to FILE")
	}
	return keygenOptions{Out: f.out, AddTo: f.addTo}, nil
}
