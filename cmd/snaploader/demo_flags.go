package main

import (
	"math"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

type demoFlags struct {
	cf       cacheFlags
	workDir  string
	memMiB   int64
	diskMiB  int64
	dirtyPct float64
	keep     bool
}

func newDemoCmd() *cobra.Command {
	var f demoFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *demoFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Save, dirty, incrementally save and restore a synthetic VM snapshot on two hosts' caches",
		RunE:  runE(f.options, runDemo),
	}
	f.cf.register(cmd)
	fl := cmd.Flags()
	fl.StringVar(&f.workDir, "work-dir", "", "where the synthetic VM files, host B's cache and the restored files go: a directory the demo creates inside it, or DIR itself if it does not exist yet; the demo removes only what it created (default: a temporary directory)")
	fl.Int64Var(&f.memMiB, "mem-mib", 1024, "guest memory file size in MiB")
	fl.Int64Var(&f.diskMiB, "disk-mib", 512, "root disk size in MiB")
	fl.Float64Var(&f.dirtyPct, "dirty-percent", 1, "percentage of chunks the VM dirties before the incremental save")
	fl.BoolVar(&f.keep, "keep", false, "keep the demo's work directory (its path is printed)")
	return cmd
}

// options checks demo's flags: the sizes and the share of chunks dirtied,
// and the caches.
func (f *demoFlags) options() (demoOptions, error) {
	const maxMiB = math.MaxInt64 >> 21 // memory and disk together fit an int64 of bytes
	if f.memMiB < 1 || f.memMiB > maxMiB {
		return demoOptions{}, status.Errorf(codes.InvalidArgument, "--mem-mib %d: want 1 to %d", f.memMiB, int64(maxMiB))
	}
	if f.diskMiB < 1 || f.diskMiB > maxMiB {
		return demoOptions{}, status.Errorf(codes.InvalidArgument, "--disk-mib %d: want 1 to %d", f.diskMiB, int64(maxMiB))
	}
	if !(f.dirtyPct >= 0 && f.dirtyPct <= 100) {
		return demoOptions{}, status.Errorf(codes.InvalidArgument, "--dirty-percent %v: want 0 to 100", f.dirtyPct)
	}
	co, err := f.cf.options()
	if err != nil {
		return demoOptions{}, err
	}
	return demoOptions{Cache: co, WorkDir: f.workDir, MemMiB: f.memMiB, DiskMiB: f.diskMiB, DirtyPercent: f.dirtyPct, Keep: f.keep}, nil
}
