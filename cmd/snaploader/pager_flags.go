package main

import "github.com/spf13/cobra"

// pagerFlags are pager's flags.
type pagerFlags struct {
	sf       snapshotFlags
	dir      string
	socket   string
	memName  string
	asJSON   bool
	prefetch bool
	replace  bool
}

func newPagerCmd() *cobra.Command {
	var f pagerFlags
	return f.command()
}

// command defines the command, its flags read into f.
func (f *pagerFlags) command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pager",
		Short: "Restore a snapshot and serve its guest memory lazily to one Firecracker-style VMM over userfaultfd",
		Long: `pager unpacks the snapshot's artifact files (VM state, kernel, ...) into --dir, then listens on
--socket for one VMM speaking Firecracker's page-fault handler handshake (Firecracker: mem_backend
{"backend_type": "Uffd", "backend_path": SOCKET}). Guest memory pages are served from the chunked
file --memory-file as the guest faults them in, fetching chunks from the local cache or the remote.
Regions the VMM announces with 2 MiB pages (hugetlbfs guest memory) are served in whole huge pages;
their chunk size must be a multiple of 2 MiB (save --page-size 2MiB --chunk-size 4194304).
It exits when the VMM does, printing the fault statistics.
--dir must not exist (it is created) or be empty, unless --replace; a socket
left at --socket is replaced, anything else there is refused.`,
		RunE: runE(f.options, runPager),
	}
	f.sf.register(cmd, "serve this exact snapshot instead of the key set's newest")
	fl := cmd.Flags()
	fl.StringVar(&f.dir, "dir", "", "directory to unpack the snapshot's artifact files into: created if missing, else it must be empty (see --replace)")
	fl.BoolVar(&f.replace, "replace", false, "unpack into a --dir that already holds files: those with the snapshot's file names are replaced, all others are left as they are")
	fl.StringVar(&f.socket, "socket", "", "Unix socket the VMM connects to")
	fl.StringVar(&f.memName, "memory-file", "memory", "name of the chunked file holding guest memory")
	fl.BoolVar(&f.asJSON, "json", false, "print one JSON object when the VMM exits")
	fl.BoolVar(&f.prefetch, "prefetch-working-set", true, "prefetch the chunks the guest touched after its previous restore")
	return cmd
}

// options checks pager's flags; --dir and --socket are refused before the
// cache is opened or a snapshot looked up.
func (f *pagerFlags) options() (pagerOptions, error) {
	if f.dir == "" || f.socket == "" {
		return pagerOptions{}, usagef("--dir and --socket are required")
	}
	if err := checkOutDir("--dir", f.dir, f.replace, restoreReplaceHint); err != nil {
		return pagerOptions{}, err
	}
	if err := checkSocketPath("--socket", f.socket); err != nil {
		return pagerOptions{}, err
	}
	so, err := f.sf.options()
	if err != nil {
		return pagerOptions{}, err
	}
	return pagerOptions{Snapshot: so, Dir: f.dir, Socket: f.socket, MemoryFile: f.memName, JSON: f.asJSON, Prefetch: f.prefetch, Replace: f.replace}, nil
}
