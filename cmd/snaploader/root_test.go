package main

import (
	"testing"
	"time"

	"github.com/snaploader/snaploader/errkind"
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
		{"complete", keyFlags{instance: "ci", platform: []string{"os=linux", "arch=amd64"}, configHash: "c", ref: "main"}, true},
		{"no platform", keyFlags{instance: "ci", configHash: "c", ref: "main"}, true},
		{"no config hash", keyFlags{instance: "ci", platform: []string{"os=linux"}, ref: "main"}, false},
		{"no instance", keyFlags{configHash: "c", ref: "main"}, false},
		{"no ref", keyFlags{instance: "ci", configHash: "c"}, false},
		{"no ref needed", keyFlags{instance: "ci", configHash: "c", noRef: true}, true},
		{"bad platform", keyFlags{instance: "ci", platform: []string{"linux"}, configHash: "c", ref: "main"}, false},
	} {
		_, err := tc.f.task()
		if (err == nil) != tc.ok {
			t.Errorf("%s: task() error %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err != nil && !errkind.Is(err, errkind.InvalidArgument) {
			t.Errorf("%s: task() error %v is not a usage error (InvalidArgument)", tc.name, err)
		}
	}
	// Platform order does not change the key.
	a, _ := (&keyFlags{instance: "ci", platform: []string{"os=linux", "arch=amd64"}, configHash: "c", ref: "main"}).task()
	b, _ := (&keyFlags{instance: "ci", platform: []string{"arch=amd64", "os=linux"}, configHash: "c", ref: "main"}).task()
	if a.PlatformHash != b.PlatformHash {
		t.Error("platform hash depends on flag order")
	}
}
