package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/snaploader/snaploader/internal/testutil"
)

var bin string // the linkproxy command, built by TestMain

func TestMain(m *testing.M) {
	b, cleanup, err := testutil.BuildMain(".", "linkproxy")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = b
	code := m.Run()
	cleanup()
	os.Exit(code)
}

// Bytes sent through the linkproxy process reach the upstream and come
// back whole, with and without a cap and latency, and the process exits
// once its standard input closes.
func TestLinkProxyCarriesBytes(t *testing.T) {
	// An echo server upstream.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	for _, tc := range []struct {
		rate, latency string
		size          int
	}{
		{"0", "0", 1 << 20},
		{"125000", "1", 2 << 20},
	} {
		cmd := exec.Command(bin, "-upstream", l.Addr().String(), "-rate", tc.rate, "-latency", tc.latency)
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		addr, err := bufio.NewReader(stdout).ReadString('\n')
		if err != nil {
			t.Fatalf("rate %s latency %s: no address: %v\n%s", tc.rate, tc.latency, err, stderr.String())
		}
		c, err := net.Dial("tcp", strings.TrimSpace(addr))
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, tc.size)
		rand.NewChaCha8([32]byte{1}).Read(want)
		go c.Write(want) // Toxiproxy closes both ways on a half close: no CloseWrite
		got := make([]byte, len(want))
		n, err := io.ReadFull(c, got)
		c.Close()
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("rate %s latency %s: %d of %d bytes came back (err %v), equal %v", tc.rate, tc.latency, n, len(want), err, bytes.Equal(got, want))
		}
		stdin.Close()
		if err := cmd.Wait(); err != nil {
			t.Errorf("rate %s latency %s: linkproxy exited with %v\n%s", tc.rate, tc.latency, err, stderr.String())
		}
	}
}

// Flags it cannot run with are refused.
func TestLinkProxyRefusesBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"-upstream", "127.0.0.1:1", "-rate", "-5"},
		{"-upstream", "127.0.0.1:1", "-latency", "-1"},
	} {
		err := exec.Command(bin, args...).Run()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
			t.Errorf("linkproxy %v: %v, want exit status 2", args, err)
		}
	}
}
