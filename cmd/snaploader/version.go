package main

import (
	"fmt"
	"os"

	"github.com/snaploader/snaploader/internal/buildinfo"

	"github.com/spf13/cobra"
)

// versionInfo is the --json output of version.
type versionInfo struct {
	// Module is the main module's path, Version its version: a release
	// tag when installed with go install MODULE@VERSION, "(devel)" for a
	// build from a work tree.
	Module  string `json:"module"`
	Version string `json:"version"`
	// Revision is the VCS revision the binary was built from, Time its
	// commit time (RFC 3339), and Modified whether the work tree had
	// uncommitted changes; "", "" and false when the build recorded none.
	Revision string `json:"revision"`
	Time     string `json:"time"`
	Modified bool   `json:"modified"`
	// GoVersion is the Go toolchain that built it.
	GoVersion string `json:"go_version"`
}

// buildVersion is the version the Go toolchain recorded in the binary.
func buildVersion() versionInfo {
	b := buildinfo.Read()
	return versionInfo{Module: b.Module, Version: b.Version, Revision: b.Revision, Time: b.Time, Modified: b.Modified, GoVersion: b.GoVersion}
}

func newVersionCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print snaploader's version and the VCS revision it was built from",
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := buildVersion()
			if asJSON {
				return printJSON(os.Stdout, v)
			}
			line := fmt.Sprintf("snaploader %s %s", v.Module, v.Version)
			if v.Revision != "" {
				line += " revision " + v.Revision
				if v.Modified {
					line += " (modified)"
				}
			}
			fmt.Println(line + " built with " + v.GoVersion)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	return cmd
}
