package snapshot

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/snaploader/snaploader/digest"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// Golden values are computed independently of this code (Python hashlib
// over hand-encoded protobuf bytes); they are a storage format.
func TestGoldenKeys(t *testing.T) {
	key := &snapshotpb.SnapshotKey{InstanceName: "inst", PlatformHash: "ph", ConfigurationHash: "ch", Ref: "main", VersionId: "v1"}
	k, err := KeyHash(key)
	if err != nil {
		t.Fatal(err)
	}
	remote, err := RemoteManifestKey(key)
	if err != nil {
		t.Fatal(err)
	}
	localAnon, err := LocalManifestKey("", key)
	if err != nil {
		t.Fatal(err)
	}
	localG1, err := LocalManifestKey("g1", key)
	if err != nil {
		t.Fatal(err)
	}
	ph, err := PlatformHash(map[string]string{"OSFamily": "linux", "Arch": "amd64"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, got, want string }{
		{"H(a,b)", digest.StringListHash("a", "b"), "62af5c3cb8da3e4f25061e829ebeea5c7513c54949115b1acc225930a90154da"},
		{"H()", digest.StringListHash(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
		{"H('','')", digest.StringListHash("", ""), "3b7546ed79e3e5a7907381b093c5a182cbf364c5dd0443dfa956c8cca271cc33"},
		{"K", k, "98035f1981bcee3b8a4aa25c96fd9ba203a0543363b56275cca92523092e01f6"},
		{"version key", VersionKey(key).GetHash(), "b165364d916dcb6f90e2034c1e2e86480c36620e85de136bf5afbb60f2ff1736"},
		{"remote manifest key", remote.GetHash(), "e5fe4ba6e12b6ac0e35b8b83a646aaf993193df9ed1c60fb9e84f5c2d8f43f30"},
		{"local manifest key, anonymous", localAnon.GetHash(), "3d61b881a5a669207c099470bf129d99c629d2ad69854d7d3685c990a09c058c"},
		{"local manifest key, group g1", localG1.GetHash(), "f83014b1c212520b13440ed0729f8f81861f52b9229bd90989e49de5e5a3014a"},
		{"platform hash", ph, "a5443d0812b9ae47a332a1a708ee7992c55fa01b6ae9beaafc9af62e00de64ef"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %s, want %s", tc.name, tc.got, tc.want)
		}
	}
	if remote.GetSizeBytes() != 1 || VersionKey(key).GetSizeBytes() != 1 {
		t.Errorf("action-cache key sizes must be the placeholder 1")
	}
}

func refs(keys []*snapshotpb.SnapshotKey) []string {
	var out []string
	for _, k := range keys {
		out = append(out, k.GetRef())
	}
	return out
}

func TestKeySet(t *testing.T) {
	for _, tc := range []struct {
		name          string
		env           map[string]string
		universal     string
		wantBranch    string
		wantFallbacks []string
		wantWrite     string
		wantLoggedErr bool
	}{
		{name: "no branch: no ref, no fallbacks", env: map[string]string{EnvBaseBranch: "main", EnvDefaultBranch: "main"}, wantBranch: "", wantWrite: ""},
		{name: "feature branch", env: map[string]string{EnvBranch: "feat", EnvBaseBranch: "dev", EnvDefaultBranch: "main"}, wantBranch: "feat", wantFallbacks: []string{"dev", "main"}, wantWrite: "feat"},
		{name: "base equals default is listed once", env: map[string]string{EnvBranch: "feat", EnvBaseBranch: "main", EnvDefaultBranch: "main"}, wantBranch: "feat", wantFallbacks: []string{"main"}, wantWrite: "feat"},
		{name: "branch equals default", env: map[string]string{EnvBranch: "main", EnvBaseBranch: "main", EnvDefaultBranch: "main"}, wantBranch: "main", wantWrite: "main"},
		{name: "empty base skipped", env: map[string]string{EnvBranch: "feat", EnvDefaultBranch: "main"}, wantBranch: "feat", wantFallbacks: []string{"main"}, wantWrite: "feat"},
		{name: "universal ref last", env: map[string]string{EnvBranch: "feat", EnvDefaultBranch: "main"}, universal: "__universal", wantBranch: "feat", wantFallbacks: []string{"main", "__universal"}, wantWrite: "feat"},
		{name: "merge queue writes to default", env: map[string]string{EnvBranch: "gh-readonly-queue/main/pr-12-abc", EnvBaseBranch: "main", EnvDefaultBranch: "main"}, wantBranch: "gh-readonly-queue/main/pr-12-abc", wantFallbacks: []string{"main"}, wantWrite: "main"},
		{name: "merge queue into a default branch with a slash", env: map[string]string{EnvBranch: "gh-readonly-queue/release/v2/pr-7-abc", EnvDefaultBranch: "release/v2"}, wantBranch: "gh-readonly-queue/release/v2/pr-7-abc", wantFallbacks: []string{"release/v2"}, wantWrite: "release/v2"},
		{name: "malformed merge queue: no pr", env: map[string]string{EnvBranch: "gh-readonly-queue/main", EnvDefaultBranch: "main"}, wantBranch: "gh-readonly-queue/main", wantFallbacks: []string{"main"}, wantWrite: "gh-readonly-queue/main", wantLoggedErr: true},
		{name: "malformed merge queue: other target", env: map[string]string{EnvBranch: "gh-readonly-queue/dev/pr-1", EnvDefaultBranch: "main"}, wantBranch: "gh-readonly-queue/dev/pr-1", wantFallbacks: []string{"main"}, wantWrite: "gh-readonly-queue/dev/pr-1", wantLoggedErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs bytes.Buffer
			log := slog.New(slog.NewTextHandler(&logs, nil))
			set := NewKeySet(Task{InstanceName: "i", PlatformHash: "p", ConfigurationHash: "c", Env: tc.env}, "ver", KeySetOptions{UniversalRef: tc.universal, Logger: log})
			if got := set.GetBranchKey().GetRef(); got != tc.wantBranch {
				t.Errorf("branch ref = %q, want %q", got, tc.wantBranch)
			}
			if got := strings.Join(refs(set.GetFallbackKeys()), ","); got != strings.Join(tc.wantFallbacks, ",") {
				t.Errorf("fallback refs = %q, want %q", got, strings.Join(tc.wantFallbacks, ","))
			}
			if got := set.GetWriteKey().GetRef(); got != tc.wantWrite {
				t.Errorf("write ref = %q, want %q", got, tc.wantWrite)
			}
			for _, k := range append(AllKeys(set), set.GetWriteKey()) {
				if k.GetVersionId() != "ver" || k.GetInstanceName() != "i" {
					t.Errorf("key %v lacks version or instance", k)
				}
			}
			if logged := strings.Contains(logs.String(), "level=ERROR"); logged != tc.wantLoggedErr {
				t.Errorf("error logged = %v, want %v (logs: %s)", logged, tc.wantLoggedErr, logs.String())
			}
		})
	}
}

func TestRandomIDs(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		v := NewVersionID()
		if len(v) != 10 || strings.Trim(v, idAlphabet) != "" {
			t.Fatalf("version id %q is not 10 characters of [0-9A-Za-z]", v)
		}
		if seen[v] {
			t.Fatalf("version id %q repeated", v)
		}
		seen[v] = true
	}
}
