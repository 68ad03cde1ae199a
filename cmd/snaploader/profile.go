package main

import (
	"fmt"
	"os"
	"runtime/pprof"
)

// profileEnv names a file to write a CPU profile of the whole command to
// (go tool pprof reads it): a hidden switch for measuring where a
// restore's CPU goes, off when unset.
const profileEnv = "SNAPLOADER_CPUPROFILE"

// startProfile starts the CPU profile profileEnv asks for and returns the
// function that ends it (a no-op when none was asked for or it could not
// start, which is said on stderr).
func startProfile() (stop func()) {
	path := os.Getenv(profileEnv)
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "snaploader: %s: %v\n", profileEnv, err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintf(os.Stderr, "snaploader: %s: profiling into %s: %v\n", profileEnv, path, err)
		f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "snaploader: %s: writing %s: %v\n", profileEnv, path, err)
		}
	}
}
