package main

import (
	"testing"
	"time"
)

func TestParseDuration(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"24h", 24 * time.Hour, true},
		{"90m", 90 * time.Minute, true},
		{"1d", 24 * time.Hour, true},
		{"1.5d", 36 * time.Hour, true},
		{"0d", 0, true},
		{"-1d", 0, false},
		{"d", 0, false},
		{"1.5xd", 0, false},
		{"tomorrow", 0, false},
	} {
		got, err := parseDuration(tc.in)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("parseDuration(%q) = %v, %v; want %v ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestKeyFlagsTask(t *testing.T) {
	for _, tc := range []struct {
		name string
		f    keyFlags
		ok   bool
	}{
		{"complete", keyFlags{platform: []string{"os=linux", "arch=amd64"}, configHash: "c"}, true},
		{"no config hash", keyFlags{platform: []string{"os=linux"}}, false},
		{"bad platform", keyFlags{platform: []string{"linux"}, configHash: "c"}, false},
	} {
		_, err := tc.f.task()
		if (err == nil) != tc.ok {
			t.Errorf("%s: task() error %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
	// Platform order does not change the key.
	a, _ := (&keyFlags{platform: []string{"os=linux", "arch=amd64"}, configHash: "c"}).task()
	b, _ := (&keyFlags{platform: []string{"arch=amd64", "os=linux"}, configHash: "c"}).task()
	if a.PlatformHash != b.PlatformHash {
		t.Error("platform hash depends on flag order")
	}
}
