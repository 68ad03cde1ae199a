// Package buildinfo reads the version the Go toolchain recorded in the
// running binary: the main module's version and the version control
// revision it was built from.
package buildinfo

import (
	"runtime"
	"runtime/debug"
)

// Info is what the binary records of its build.
type Info struct {
	// Module is the main module's path, Version its version: a release
	// tag when installed with go install MODULE@VERSION, "(devel)" for a
	// build from a work tree, "unknown" when nothing was recorded.
	Module, Version string
	// Revision is the VCS revision, Time its commit time (RFC 3339), and
	// Modified whether the work tree had uncommitted changes; "", "" and
	// false when the build recorded none.
	Revision, Time string
	Modified       bool
	// GoVersion is the toolchain that built it.
	GoVersion string
}

// Read returns the running binary's Info.
func Read() Info {
	info := Info{Module: "github.com/snaploader/snaploader", Version: "unknown", GoVersion: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return info
	}
	if bi.Main.Path != "" {
		info.Module = bi.Main.Path
	}
	if bi.Main.Version != "" {
		info.Version = bi.Main.Version
	}
	if bi.GoVersion != "" {
		info.GoVersion = bi.GoVersion
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			info.Revision = s.Value
		case "vcs.time":
			info.Time = s.Value
		case "vcs.modified":
			info.Modified = s.Value == "true"
		}
	}
	return info
}
