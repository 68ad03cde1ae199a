package snapshot

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snaploader/snaploader/internal/fileio"
)

func TestValidateName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"memory", true},
		{"rootfs.ext4", true},
		{strings.Repeat("n", MaxNameBytes), true},
		{strings.Repeat("n", MaxNameBytes+1), false},
		{strings.Repeat("n", 300), false},
		{strings.Repeat("é", MaxNameBytes/2+1), false}, // bytes, not characters
		{"", false},
		{".", false},
		{"..", false},
		{"a/b", false},
		{`a\b`, false},
		{"a\x00b", false},
		{"a\x01b", false},
		{"tab\there", false},
		{"del\x7f", false},
		{"naïve", true},
		{".snaploader-tmp-0123456789abcdef", false}, // a restore's temporary
		{".snaploader-tmp", true},
	} {
		err := ValidateName(tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateName(%.20q… %d bytes) = %v, want ok=%v", tc.name, len(tc.name), err, tc.ok)
		}
		if err != nil && status.Code(err) != codes.InvalidArgument {
			t.Errorf("ValidateName(%.20q…): %v, want InvalidArgument", tc.name, err)
		}
	}
}

// The longest valid name can be created on disk (a restore writes through
// a temporary of fixed length, so the name itself is the longest path
// element it creates).
func TestLongestNameFitsOnDisk(t *testing.T) {
	dir := t.TempDir()
	name := strings.Repeat("n", MaxNameBytes)
	if err := os.WriteFile(filepath.Join(dir, name), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if fileio.TempNameLen > 255 {
		t.Fatalf("temporary names of %d bytes exceed NAME_MAX", fileio.TempNameLen)
	}
}
