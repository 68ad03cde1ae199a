// Package systemd holds the systemd units of snaploader (serve, and the
// daily collection of an S3 bucket); its test checks them with
// systemd-analyze verify.
package systemd

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/snaploader/snaploader/internal/testutil"
)

const installedBinary = "/usr/local/bin/snaploader"

var units = []string{"snaploader-serve.service", "snaploader-gc.service", "snaploader-gc.timer"}

func TestUnitsVerify(t *testing.T) {
	analyze := testutil.LookPath(t, "systemd-analyze")
	// verify checks that ExecStart names an executable: this test's own
	// binary stands in for the installed snaploader.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		text := string(b)
		if strings.HasSuffix(u, ".service") && !strings.Contains(text, "ExecStart="+installedBinary+" ") {
			t.Errorf("%s: ExecStart does not run %s", u, installedBinary)
		}
		if err := os.WriteFile(filepath.Join(dir, u), []byte(strings.ReplaceAll(text, installedBinary, exe)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(analyze, append([]string{"verify"}, units...)...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// The serve unit runs hardened, keeps its cache in its state directory,
// takes secrets from an environment file and restarts after a failure;
// the timer starts the collection daily.
func TestUnitsSettings(t *testing.T) {
	for u, want := range map[string][]string{
		"snaploader-serve.service": {"DynamicUser=yes", "StateDirectory=snaploader", "EnvironmentFile=-/etc/snaploader/serve.env",
			"Environment=SNAPLOADER_CONFIG=/etc/snaploader/serve.yaml", "Restart=on-failure", "ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n"},
		"snaploader-gc.service": {"Type=oneshot", "DynamicUser=yes", "EnvironmentFile=/etc/snaploader/gc.env", "gc --remote ${SNAPLOADER_GC_REMOTE}"},
		"snaploader-gc.timer":   {"OnCalendar=daily", "Persistent=true", "WantedBy=timers.target"},
		"serve.yaml":            {"cache-dir: /var/lib/snaploader/cache"},
	} {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range want {
			if !strings.Contains(string(b), w) {
				t.Errorf("%s lacks %q", u, w)
			}
		}
	}
}
