package main

import (
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/snaploader/snaploader/errkind"
)

// clearKeyEnv unsets the variables key flags default to, so that a case
// gives every key field it means to.
func clearKeyEnv(t *testing.T) {
	t.Helper()
	for _, v := range []string{"GIT_BRANCH", "GIT_BASE_BRANCH", "GIT_REPO_DEFAULT_BRANCH", "SNAPLOADER_API_KEY", "SNAPLOADER_ENCRYPTION_KEY_FILE"} {
		t.Setenv(v, "")
	}
}

// parseFlags parses args into cmd's flags as cobra does before RunE, with
// the command's PreRun hook (which records what was given).
func parseFlags(t *testing.T, cmd *cobra.Command, args []string) {
	t.Helper()
	if err := cmd.ParseFlags(args); err != nil {
		t.Fatalf("parsing %q: %v", args, err)
	}
	if cmd.PreRun != nil {
		cmd.PreRun(cmd, nil)
	}
}

// checkUsage fails unless err is a usage error (exit 2) whose message
// contains want, or, with want "", err is nil.
func checkUsage(t *testing.T, args []string, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Errorf("%q: %v, want no error", args, err)
	case want == "":
	case err == nil:
		t.Errorf("%q: no error, want %q", args, want)
	case !strings.Contains(cliText(err), want):
		t.Errorf("%q: %q, want it to say %q", args, cliText(err), want)
	case classify(err, false).ExitCode != exitUsage:
		t.Errorf("%q: %v exits %d (kind %s), want a usage error (exit %d)", args, err, classify(err, false).ExitCode, errkind.Of(err), exitUsage)
	}
}
