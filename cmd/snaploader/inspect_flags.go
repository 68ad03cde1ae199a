package main

import (
	"github.com/spf13/cobra"
)

func newInspectCmd() *cobra.Command {
	return newSnapshotCmd("inspect", "Print a snapshot's manifest as JSON", "inspect this exact snapshot", runInspect)
}
