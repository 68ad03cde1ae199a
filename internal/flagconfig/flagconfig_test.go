package flagconfig

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

type vals struct {
	listen string
	max    int64
	log    bool
	idle   time.Duration
	keys   []string
	config string
}

func flags(v *vals) *pflag.FlagSet {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	fs.StringVar(&v.listen, "listen", "127.0.0.1:8980", "")
	fs.Int64Var(&v.max, "max-bytes", 100, "")
	fs.BoolVar(&v.log, "access-log", true, "")
	fs.DurationVar(&v.idle, "idle-timeout", 30*time.Second, "")
	fs.StringArrayVar(&v.keys, "api-key", nil, "")
	fs.StringVar(&v.config, "config", "", "")
	return fs
}

func TestApplyPrecedence(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		env     []string
		file    string
		want    vals
		from    map[string]string
		wantErr string
	}{
		{name: "defaults", want: vals{listen: "127.0.0.1:8980", max: 100, log: true, idle: 30 * time.Second}, from: map[string]string{}},
		{name: "file", file: "listen: unix:///run/s.sock\nmax-bytes: 200\naccess-log: false\napi-key: [a=g, b=h:ro]\n",
			want: vals{listen: "unix:///run/s.sock", max: 200, idle: 30 * time.Second, keys: []string{"a=g", "b=h:ro"}},
			from: map[string]string{"listen": "F", "max-bytes": "F", "access-log": "F", "api-key": "F"}},
		{name: "env over file", file: "listen: file:1\nmax-bytes: 200\n", env: []string{"SNAPLOADER_LISTEN=env:2", "SNAPLOADER_IDLE_TIMEOUT=1m", "OTHER_LISTEN=x"},
			want: vals{listen: "env:2", max: 200, log: true, idle: time.Minute},
			from: map[string]string{"listen": "$SNAPLOADER_LISTEN", "max-bytes": "F", "idle-timeout": "$SNAPLOADER_IDLE_TIMEOUT"}},
		{name: "flag over env and file", args: []string{"--listen", "flag:3", "--api-key", "c=g", "--access-log=true"},
			file: "listen: file:1\napi-key: [a=g]\naccess-log: false\n", env: []string{"SNAPLOADER_LISTEN=env:2", "SNAPLOADER_ACCESS_LOG=false"},
			want: vals{listen: "flag:3", max: 100, log: true, idle: 30 * time.Second, keys: []string{"c=g"}}, from: map[string]string{}},
		{name: "flag set to its default still wins", args: []string{"--max-bytes", "100"}, env: []string{"SNAPLOADER_MAX_BYTES=5"},
			want: vals{listen: "127.0.0.1:8980", max: 100, log: true, idle: 30 * time.Second}, from: map[string]string{}},
		{name: "skipped", env: []string{"SNAPLOADER_API_KEY=client-key", "SNAPLOADER_CONFIG=x"}, file: "max-bytes: 7\n",
			want: vals{listen: "127.0.0.1:8980", max: 7, log: true, idle: 30 * time.Second}, from: map[string]string{"max-bytes": "F"}},
		{name: "not from the environment, from the file", env: []string{"SNAPLOADER_API_KEY=client-key"}, file: "api-key: a=g\n",
			want: vals{listen: "127.0.0.1:8980", max: 100, log: true, idle: 30 * time.Second, keys: []string{"a=g"}}, from: map[string]string{"api-key": "F"}},
		{name: "bad env value", env: []string{"SNAPLOADER_MAX_BYTES=lots"}, wantErr: `$SNAPLOADER_MAX_BYTES: --max-bytes "lots"`},
		{name: "bad file value", file: "idle-timeout: soon\n", wantErr: `--idle-timeout "soon"`},
		{name: "unknown name", file: "max-byte: 1\n", wantErr: `"max-byte" is not a setting`},
		{name: "skipped name in file", file: "config: other.yaml\n", wantErr: `"config" is not a setting`},
		{name: "list for a single flag", file: "listen: [a, b]\n", wantErr: "takes one value"},
		{name: "no value", file: "listen:\n", wantErr: "has no value"},
		{name: "set twice", file: "listen: a\nlisten: b\n", wantErr: "set twice"},
		{name: "not a mapping", file: "- listen\n", wantErr: "want a mapping"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var v vals
			fs := flags(&v)
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			src := Source{EnvPrefix: "SNAPLOADER_", Environ: tc.env, Skip: map[string]bool{"config": true}, NoEnv: map[string]bool{"api-key": true}}
			if tc.file != "" {
				src.File = filepath.Join(t.TempDir(), "serve.yaml")
				if err := os.WriteFile(src.File, []byte(tc.file), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			from, err := Apply(fs, src)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one saying %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(v, tc.want) {
				t.Errorf("values %+v, want %+v", v, tc.want)
			}
			for k, w := range tc.from {
				if w == "F" {
					tc.from[k] = src.File
				}
			}
			if !reflect.DeepEqual(from, tc.from) {
				t.Errorf("sources %v, want %v", from, tc.from)
			}
			for name := range tc.from {
				if !fs.Changed(name) {
					t.Errorf("--%s was set but is not marked changed", name)
				}
			}
		})
	}
}

func TestEnvName(t *testing.T) {
	if got := EnvName("SNAPLOADER_", "max-upload-memory"); got != "SNAPLOADER_MAX_UPLOAD_MEMORY" {
		t.Errorf("EnvName: %s", got)
	}
}
