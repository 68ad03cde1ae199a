package main

import (
	"path/filepath"
	"testing"
	"time"
)

func TestLsAndGCFlags(t *testing.T) {
	cacheDir := filepath.Join(t.TempDir(), "cache")
	for _, tc := range []struct {
		name string
		gc   bool
		args []string
		want string // "" when the flags are valid
	}{
		{"ls local", false, []string{"--cache-dir", cacheDir}, ""},
		{"ls retention", false, []string{"--retention", "0"}, `--retention "0": want a positive duration such as 7d or 36h`},
		{"ls clock", false, []string{"--now", "yesterday"}, `--now "yesterday"`},
		{"ls local clock from metadata", false, []string{"--cache-dir", cacheDir, "--clock-from-metadata"}, "--clock-from-metadata is for s3:// remotes; the local cache's ages are its recency"},
		{"ls server clock from metadata", false, []string{"--remote", "grpc://127.0.0.1:1", "--clock-from-metadata"}, "--clock-from-metadata is for s3:// remotes; a server judges ages by its own backend"},
		{"ls bucket clock from metadata", false, []string{"--remote", "s3://b", "--clock-from-metadata"}, ""},
		// A remote listing does not check the local cache's flags.
		{"ls remote", false, []string{"--remote", "grpc://127.0.0.1:1", "--cache-max-bytes", "0"}, ""},
		{"gc", true, []string{"--remote", "s3://b", "--grace", "2h", "--now", "2026-01-02T03:04:05Z"}, ""},
		{"gc grace", true, []string{"--remote", "s3://b", "--grace", "0"}, `--grace "0": want a positive duration such as 1h`},
		{"gc retention", true, []string{"--remote", "s3://b", "--retention", "long"}, `--retention "long": want a positive duration such as 7d or 36h`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.gc {
				var f gcFlags
				cmd := f.command()
				parseFlags(t, cmd, tc.args)
				o, err := f.options()
				checkUsage(t, tc.args, err, tc.want)
				if err == nil && (o.GC.Grace != 2*time.Hour || o.GC.Now == nil || o.GC.Now().Year() != 2026 || o.Remote != "s3://b") {
					t.Errorf("%q: options %+v", tc.args, o)
				}
				return
			}
			var f lsFlags
			cmd := f.command()
			parseFlags(t, cmd, tc.args)
			_, err := f.options()
			checkUsage(t, tc.args, err, tc.want)
		})
	}
}
