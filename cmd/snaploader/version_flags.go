package main

import (
	"github.com/spf13/cobra"
)

func newVersionCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print snaploader's version and the VCS revision it was built from",
		RunE:  runE(func() (versionOptions, error) { return versionOptions{JSON: asJSON}, nil }, runVersion),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	return cmd
}
