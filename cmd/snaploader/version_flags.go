package main

import (
	"github.com/spf13/cobra"
)

func newVersionCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print snaploader's version and the VCS revision it was built from",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runVersion(cmd.Context(), versionOptions{JSON: asJSON}, stdStreams())
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	return cmd
}
