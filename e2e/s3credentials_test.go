package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snaploader/snaploader/internal/testutil"
)

// TestS3CredentialsFromSharedFile: with no credential variables at all, a
// host reaches the bucket with the keys of a profile in a shared
// credentials file; a profile the bucket refuses and a host with no
// credentials get errors that say where the credentials came from, or that
// none were found and where they were looked for.
func TestS3CredentialsFromSharedFile(t *testing.T) {
	m := testutil.StartMinIO(t)
	bucket := m.NewBucket(t)
	dir := t.TempDir()
	credFile := filepath.Join(dir, "credentials")
	creds := fmt.Sprintf("[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong-secret\n\n[team]\naws_access_key_id = %s\naws_secret_access_key = %s\n", m.AccessKey, m.SecretKey)
	if err := os.WriteFile(credFile, []byte(creds), 0o600); err != nil {
		t.Fatal(err)
	}
	// No credential variable reaches the processes; only the file does.
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "AWS_") || strings.HasPrefix(k, "MINIO_") {
			continue
		}
		env = append(env, kv)
	}
	home := filepath.Join(dir, "home")
	env = append(env, "HOME="+home, "AWS_CONFIG_FILE="+filepath.Join(dir, "config"))
	run := func(extra []string, args ...string) cliResult {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, binary, args...)
		cmd.Env = append(append([]string(nil), env...), extra...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		return cliResult{out.String(), errb.String(), err}
	}
	want := writeVM(t, filepath.Join(dir, "mem.img"), 1<<20, 77)
	url := func(profile string) string {
		u := fmt.Sprintf("s3://%s/creds?endpoint=%s&secure=false", bucket, m.Endpoint)
		if profile != "" {
			u += "&profile=" + profile
		}
		return u
	}
	key := []string{"--instance", "ci", "--platform", "os=linux", "--config-hash", "c1", "--ref", "main"}
	fileEnv := []string{"AWS_SHARED_CREDENTIALS_FILE=" + credFile}

	save := append([]string{"save", "--cache-dir", filepath.Join(dir, "a"), "--chunk-size", "65536", "--chunked", "mem.img=" + filepath.Join(dir, "mem.img"), "--remote", url("team")}, key...)
	run(fileEnv, save...).must(t, "save with the team profile")
	run(append(fileEnv, "AWS_PROFILE=team"), append([]string{"restore", "--cache-dir", filepath.Join(dir, "b"), "--out", filepath.Join(dir, "out"), "--remote", url("")}, key...)...).must(t, "restore with AWS_PROFILE=team")
	if got, err := os.ReadFile(filepath.Join(dir, "out", "mem.img")); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("restored from the bucket with the profile's keys: differs (err %v)", err)
	}

	r := run(fileEnv, append([]string{"restore", "--cache-dir", filepath.Join(dir, "c"), "--out", filepath.Join(dir, "out2"), "--remote", url("default")}, key...)...)
	if r.err == nil || !strings.Contains(r.stderr, "the credentials from the shared credentials file (profile default) were refused") {
		t.Errorf("a refused profile: %v\n%s\nwant an error naming where the credentials came from", r.err, r.stderr)
	}
	r = run(nil, append([]string{"restore", "--cache-dir", filepath.Join(dir, "d"), "--out", filepath.Join(dir, "out3"), "--remote", url("")}, key...)...)
	if r.err == nil || !strings.Contains(r.stderr, "no credentials were found") || !strings.Contains(r.stderr, "shared credentials file") {
		t.Errorf("no credentials: %v\n%s\nwant an error saying none were found and where it looked", r.err, r.stderr)
	}
}
