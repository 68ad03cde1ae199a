package zstdio

import (
	"bytes"
	"io"
	"testing"

	"github.com/klauspost/compress/zstd"
)

func TestWindow(t *testing.T) {
	for _, tc := range []struct {
		size int64
		want uint64
	}{
		{0, MinWindow}, {4 << 20, MinWindow}, {16 << 20, 16 << 20}, {1 << 40, MaxWindow},
	} {
		if got := Window(tc.size); got != tc.want {
			t.Errorf("Window(%d) = %d, want %d", tc.size, got, tc.want)
		}
	}
}

func TestDecoderRefusesWiderWindows(t *testing.T) {
	data := bytes.Repeat([]byte("snaploader "), 4<<20)
	for _, tc := range []struct {
		name    string
		window  int
		max     uint64
		refused bool
	}{
		{"within the bound", 4 << 20, MinWindow, false},
		{"wider than the bound", 32 << 20, MinWindow, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			frames := NewEncoder(zstd.WithWindowSize(tc.window)).EncodeAll(data, nil)
			dec, err := NewDecoder(bytes.NewReader(frames), tc.max)
			if err != nil {
				t.Fatal(err)
			}
			defer dec.Close()
			got, err := io.ReadAll(dec)
			if tc.refused != (err != nil) || (!tc.refused && !bytes.Equal(got, data)) {
				t.Fatalf("decoding: %v (refusal expected: %v)", err, tc.refused)
			}
		})
	}
}
