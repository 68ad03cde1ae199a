package testguest

import (
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestParseKernelDepends(t *testing.T) {
	tests := []struct {
		show, pkg, version string
		ok                 bool
	}{
		{"Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n",
			"linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", true},
		{"Depends: foo, linux-image-6.12.1-cloud-amd64 (= 6.12.1-1~bpo12+1), bar\n", "linux-image-6.12.1-cloud-amd64", "6.12.1-1~bpo12+1", true},
		{"Package: linux-image-cloud-amd64\nDepends: linux-image-6.1.0-56-cloud-amd64\n", "", "", false},
		{"", "", "", false},
	}
	for _, tt := range tests {
		pkg, version, err := parseKernelDepends("meta", []byte(tt.show))
		if (err == nil) != tt.ok || pkg != tt.pkg || version != tt.version {
			t.Errorf("parseKernelDepends(%q) = %q, %q, %v; want %q, %q, ok=%v", tt.show, pkg, version, err, tt.pkg, tt.version, tt.ok)
		}
		if err != nil && status.Code(err) != codes.Unavailable {
			t.Errorf("parseKernelDepends error %v is not Unavailable", err)
		}
	}
}
