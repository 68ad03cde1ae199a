package main

import (
	"path/filepath"
	"testing"
	"time"
)

func TestServeFlags(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cache")
	for _, tc := range []struct {
		name string
		args []string
		want string // "" when the flags are valid
	}{
		{"disk", []string{"--cache-dir", dir}, ""},
		{"regional over a bucket", []string{"--cache-dir", dir, "--s3", "s3://b?endpoint=127.0.0.1:1"}, ""},
		{"regional over an upstream", []string{"--cache-dir", dir, "--upstream", "grpc://127.0.0.1:1"}, ""},
		{"bucket collected", []string{"--s3", "s3://b?endpoint=127.0.0.1:1", "--gc-interval", "1h"}, ""},
		{"bucket and upstream", []string{"--s3", "s3://b", "--upstream", "grpc://x"}, "give either --s3 or --upstream, not both: the upstream is the one source of truth"},
		{"upstream without a disk", []string{"--upstream", "grpc://x"}, "--upstream needs --cache-dir: the disk cache this serve keeps in front of it"},
		{"collecting a disk", []string{"--cache-dir", dir, "--gc-interval", "1h"}, "--gc-interval needs --s3"},
		{"negative interval", []string{"--gc-interval", "-1s"}, "--gc-interval -1s: want a positive duration, or 0 for no collection"},
		{"no disk", []string{"--max-bytes", "0"}, "--max-bytes 0: want a positive value"},
		{"no blob", []string{"--max-blob-bytes", "0"}, "--max-blob-bytes 0: want a positive value"},
		{"no upload memory", []string{"--max-upload-memory", "0"}, "--max-upload-memory 0: want a positive value"},
		{"no idle time", []string{"--idle-timeout", "0s"}, "--idle-timeout 0s: want a positive value"},
		{"retention", []string{"--retention", "0"}, `--retention "0": want a positive duration such as 7d or 36h`},
		{"grace", []string{"--grace", "soon"}, `--grace "soon": want a positive duration such as 1h`},
		{"log format", []string{"--log-format", "yaml"}, `--log-format "yaml" / --log-level "error": log format "yaml": want text or json`},
		{"log level", []string{"--log-level", "loud"}, `log level "loud": want debug, info, warn or error`},
		{"client CA without TLS", []string{"--tls-client-ca", "ca.pem"}, "--tls-client-ca needs --tls-cert and --tls-key"},
		{"certificate without key", []string{"--tls-cert", "cert.pem"}, "--tls-cert and --tls-key go together"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var f serveFlags
			cmd := f.command()
			parseFlags(t, cmd, append([]string{"--log-level", "error"}, tc.args...))
			o, err := f.options()
			checkUsage(t, tc.args, err, tc.want)
			if err == nil && o.Regional != (tc.name == "regional over a bucket" || tc.name == "regional over an upstream") {
				t.Errorf("%q: regional %v", tc.args, o.Regional)
			}
		})
	}
}

// TestServeFlagsOptions: the typed options hold what the flags say.
func TestServeFlagsOptions(t *testing.T) {
	var f serveFlags
	cmd := f.command()
	parseFlags(t, cmd, []string{"--log-level", "error", "--listen", "unix:///tmp/s.sock", "--s3", "s3://b?endpoint=127.0.0.1:1", "--gc-interval", "2h",
		"--retention", "3d", "--grace", "90m", "--compression=false", "--max-blob-bytes", "1GiB", "--api-key", "k1=team"})
	o, err := f.options()
	if err != nil {
		t.Fatal(err)
	}
	if o.Listen != "unix:///tmp/s.sock" || o.S3URL == "" || o.Regional || o.GCInterval != 2*time.Hour || o.Retention != 72*time.Hour || o.Grace != 90*time.Minute {
		t.Errorf("backend and collection: %+v", o)
	}
	if o.Compression || !o.CompressionSet || o.MaxBlobBytes != 1<<30 || o.Transport != "plaintext" || o.APIKeys["k1"].Group != "team" {
		t.Errorf("bounds, transport and keys: %+v", o)
	}
}
