package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/debug"

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

// buildVersion reads the version the Go toolchain recorded in the binary.
func buildVersion() versionInfo {
	v := versionInfo{Module: "github.com/snaploader/snaploader", Version: "(unknown)", GoVersion: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if bi.Main.Path != "" {
		v.Module = bi.Main.Path
	}
	if bi.Main.Version != "" {
		v.Version = bi.Main.Version
	}
	if bi.GoVersion != "" {
		v.GoVersion = bi.GoVersion
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Revision = s.Value
		case "vcs.time":
			v.Time = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	return v
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
