package main

import (
	"github.com/spf13/cobra"
)

// invalidateFlags are invalidate's flags.
type invalidateFlags struct {
	cf cacheFlags
	kf keyFlags
}

func newInvalidateCmd() *cobra.Command {
	var f invalidateFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *invalidateFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "invalidate",
		Short: "Write a fresh version id for the key: every snapshot saved before is never returned again",
		RunE:  runE(f.options, runInvalidate),
	}
	f.cf.register(cmd)
	f.kf.register(cmd)
	f.kf.noRef = true
	return cmd
}

// options checks invalidate's flags: the key (no ref needed: a version id
// covers every ref of the key) and the caches.
func (f *invalidateFlags) options() (invalidateOptions, error) {
	if err := f.kf.check(); err != nil {
		return invalidateOptions{}, err
	}
	co, err := f.cf.options()
	if err != nil {
		return invalidateOptions{}, err
	}
	ko, err := f.kf.options()
	if err != nil {
		return invalidateOptions{}, err
	}
	return invalidateOptions{Cache: co, Key: ko}, nil
}
