package digest

import (
	"bytes"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
)

func TestCompute(t *testing.T) {
	for _, tc := range []struct {
		fn   Function
		data string
		want string
	}{
		{BLAKE3, "", "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"},
		{BLAKE3, "abc", "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"},
		{SHA256, "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
		{SHA256, "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
	} {
		d := Compute(tc.fn, []byte(tc.data))
		if d.Hash != tc.want || d.SizeBytes != int64(len(tc.data)) {
			t.Errorf("%s(%q) = %s, want %s/%d", FunctionName(tc.fn), tc.data, String(d), tc.want, len(tc.data))
		}
		r, err := ComputeReader(tc.fn, strings.NewReader(tc.data))
		if err != nil || !Equal(r, d) {
			t.Errorf("ComputeReader(%q) = %v, %v; want %s", tc.data, r, err, String(d))
		}
	}
}

func TestValidate(t *testing.T) {
	good := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		name string
		d    *repb.Digest
		ok   bool
	}{
		{"good", &repb.Digest{Hash: good, SizeBytes: 5}, true},
		{"nil", nil, false},
		{"negative size", &repb.Digest{Hash: good, SizeBytes: -1}, false},
		{"short hash", &repb.Digest{Hash: "abc", SizeBytes: 1}, false},
		{"upper case", &repb.Digest{Hash: strings.ToUpper(good), SizeBytes: 1}, false},
		{"path in hash", &repb.Digest{Hash: "../" + good[3:], SizeBytes: 1}, false},
	} {
		if err := Validate(tc.d); (err == nil) != tc.ok {
			t.Errorf("%s: Validate = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func TestVerifier(t *testing.T) {
	d := Compute(BLAKE3, []byte("hello"))
	for _, tc := range []struct {
		data string
		ok   bool
	}{{"hello", true}, {"hellO", false}, {"hell", false}, {"hello!", false}} {
		v, err := NewVerifier(BLAKE3, d)
		if err != nil {
			t.Fatal(err)
		}
		v.Write([]byte(tc.data))
		if err := v.Check(); (err == nil) != tc.ok {
			t.Errorf("verifying %q: %v, want ok=%v", tc.data, err, tc.ok)
		}
	}
}

func TestIsZero(t *testing.T) {
	b := make([]byte, 200<<10)
	if !IsZero(b) || !IsZero(nil) {
		t.Error("zeros not recognised")
	}
	for _, i := range []int{0, 63, 64 << 10, len(b) - 1} {
		b[i] = 1
		if IsZero(b) {
			t.Errorf("a byte set at %d not seen", i)
		}
		b[i] = 0
	}
}

func TestParseFunction(t *testing.T) {
	for in, want := range map[string]Function{"": BLAKE3, "blake3": BLAKE3, "SHA256": SHA256, "sha-256": SHA256} {
		if got, err := ParseFunction(in); err != nil || got != want {
			t.Errorf("ParseFunction(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseFunction("md5"); err == nil {
		t.Error("md5 accepted")
	}
	if !bytes.Equal([]byte(FunctionName(SHA256)), []byte("sha256")) {
		t.Errorf("FunctionName(SHA256) = %q", FunctionName(SHA256))
	}
}
