package main

import (
	"github.com/spf13/cobra"
)

func newVerifyCmd() *cobra.Command {
	var sf snapshotFlags
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Re-hash every blob a snapshot needs (local cache, else the remote), drop local copies that do not match; exit non-zero on any mismatch or missing blob",
		RunE:  runE(sf.options, runVerify),
	}
	sf.register(cmd, "verify this exact snapshot")
	return cmd
}
