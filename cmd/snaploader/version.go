package main

import (
	"context"
	"fmt"

	"github.com/snaploader/snaploader/internal/buildinfo"
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

// versionOptions say how version prints: JSON prints one object.
type versionOptions struct {
	JSON bool
}

// runVersion prints the version the Go toolchain recorded in the binary.
func runVersion(_ context.Context, o versionOptions, s streams) error {
	v := buildVersion()
	if o.JSON {
		return printJSON(s.Out, v)
	}
	line := fmt.Sprintf("snaploader %s %s", v.Module, v.Version)
	if v.Revision != "" {
		line += " revision " + v.Revision
		if v.Modified {
			line += " (modified)"
		}
	}
	_, err := fmt.Fprintln(s.Out, line+" built with "+v.GoVersion)
	return err
}
