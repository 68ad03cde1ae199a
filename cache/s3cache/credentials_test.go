package s3cache

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCredentialChain(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "credentials")
	if err := os.WriteFile(file, []byte("[default]\naws_access_key_id = def\naws_secret_access_key = s1\n[team]\naws_access_key_id = team\naws_secret_access_key = s2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	clear := map[string]string{"AWS_ACCESS_KEY_ID": "", "AWS_ACCESS_KEY": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SECRET_KEY": "", "AWS_SESSION_TOKEN": "",
		"MINIO_ROOT_USER": "", "MINIO_ROOT_PASSWORD": "", "MINIO_ACCESS_KEY": "", "MINIO_SECRET_KEY": "", "AWS_PROFILE": "",
		"AWS_SHARED_CREDENTIALS_FILE": filepath.Join(dir, "none"), "AWS_CONFIG_FILE": filepath.Join(dir, "none"), "AWS_WEB_IDENTITY_TOKEN_FILE": "",
		"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "", "AWS_CONTAINER_CREDENTIALS_FULL_URI": ""}
	for _, tc := range []struct {
		name    string
		opts    Options
		env     map[string]string
		wantKey string
		wantSrc string
	}{
		{"nothing: anonymous", Options{Endpoint: "127.0.0.1:9000"}, nil, "", ""},
		{"static options", Options{AccessKey: "k", SecretKey: "s"}, map[string]string{"AWS_ACCESS_KEY_ID": "env"}, "k", "the options' keys"},
		{"AWS variables first", Options{}, map[string]string{"AWS_ACCESS_KEY_ID": "aws", "AWS_SECRET_ACCESS_KEY": "x", "MINIO_ROOT_USER": "m", "MINIO_ROOT_PASSWORD": "y"}, "aws", "the environment (AWS_ACCESS_KEY_ID)"},
		{"MinIO variables", Options{}, map[string]string{"MINIO_ROOT_USER": "m", "MINIO_ROOT_PASSWORD": "y"}, "m", "the environment (MINIO_ROOT_USER)"},
		{"shared file, default profile", Options{}, map[string]string{"AWS_SHARED_CREDENTIALS_FILE": file}, "def", "the shared credentials file (profile default)"},
		{"shared file, AWS_PROFILE", Options{}, map[string]string{"AWS_SHARED_CREDENTIALS_FILE": file, "AWS_PROFILE": "team"}, "team", "the shared credentials file (profile team)"},
		{"shared file, profile option", Options{Profile: "team"}, map[string]string{"AWS_SHARED_CREDENTIALS_FILE": file, "AWS_PROFILE": "other"}, "team", "the shared credentials file (profile team)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range clear {
				t.Setenv(k, v)
			}
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			c := newChain(tc.opts)
			v, err := c.Retrieve()
			if err != nil {
				t.Fatal(err)
			}
			if v.AccessKeyID != tc.wantKey || c.used() != tc.wantSrc {
				t.Errorf("key %q from %q, want %q from %q", v.AccessKeyID, c.used(), tc.wantKey, tc.wantSrc)
			}
		})
	}
}
