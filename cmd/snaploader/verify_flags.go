package main

import (
	"github.com/spf13/cobra"
)

func newVerifyCmd() *cobra.Command {
	return newSnapshotCmd("verify",
		"Re-hash every blob a snapshot needs (local cache, else the remote), drop local copies that do not match; exit non-zero on any mismatch or missing blob",
		"verify this exact snapshot", runVerify)
}
