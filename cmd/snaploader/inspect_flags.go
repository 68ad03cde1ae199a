package main

import (
	"github.com/spf13/cobra"
)

func newInspectCmd() *cobra.Command {
	var sf snapshotFlags
	cmd := &cobra.Command{
		Use:   "inspect",
		Short: "Print a snapshot's manifest as JSON",
		RunE:  runE(sf.options, runInspect),
	}
	sf.register(cmd, "inspect this exact snapshot")
	return cmd
}
