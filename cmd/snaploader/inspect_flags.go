package main

import (
	"github.com/spf13/cobra"
)

func newInspectCmd() *cobra.Command {
	var sf snapshotFlags
	cmd := &cobra.Command{
		Use:   "inspect",
		Short: "Print a snapshot's manifest as JSON",
		RunE: func(cmd *cobra.Command, _ []string) error {
			o, err := sf.options()
			if err != nil {
				return err
			}
			return runInspect(cmd.Context(), o, stdStreams())
		},
	}
	sf.register(cmd, "inspect this exact snapshot")
	return cmd
}
