// Command linkproxy runs one emulated network link (internal/toxic: a
// bandwidth cap shared by all connections, and latency, both ways) in a
// process of its own, so that a benchmark can pin it to a CPU: on two real
// hosts the network's work is not done on the client's CPU.
//
//	linkproxy -upstream 127.0.0.1:9092 -rate 125000 -latency 1
//
// It prints the address it listens on, on a line of its own, once it
// accepts connections, and runs until its standard input closes (its
// parent exited) or it is signalled.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/snaploader/snaploader/internal/toxic"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0 picks one)")
	upstream := flag.String("upstream", "", "address to proxy to (HOST:PORT)")
	rate := flag.Int64("rate", 0, "link rate in KB/s each way, shared by all connections (0: no cap)")
	latency := flag.Int64("latency", 0, "latency in ms each way")
	flag.Parse()
	if *upstream == "" || *rate < 0 || *latency < 0 {
		fmt.Fprintln(os.Stderr, "linkproxy: -upstream is required; -rate and -latency are not negative")
		os.Exit(2)
	}
	p, err := toxic.Listen(*listen, *upstream)
	if err != nil {
		fmt.Fprintln(os.Stderr, "linkproxy:", err)
		os.Exit(1)
	}
	defer p.Disable()
	if err := p.Emulate(toxic.Wire{RateKBs: *rate, LatencyMs: *latency}); err != nil {
		fmt.Fprintln(os.Stderr, "linkproxy:", err)
		os.Exit(1)
	}
	fmt.Println(p.Addr())
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	eof := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(eof)
	}()
	select {
	case <-stop:
	case <-eof:
	}
}
