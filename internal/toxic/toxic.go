// Package toxic runs TCP proxies for tests that inject network faults
// (latency, bandwidth limits, stalls, resets) between a client and a real
// server, with Toxiproxy's proxy and toxics: in the test's process
// (Start), or in a process of its own (Listen, as the linkproxy command
// does, so that a benchmark can pin the emulated network apart from the
// client).
package toxic

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"
)

var quiet sync.Once

// Proxy is a TCP proxy on 127.0.0.1 in front of one upstream address.
type Proxy struct {
	p    *toxiproxy.Proxy
	addr string
}

// Start starts a proxy to upstream ("HOST:PORT") for the test's duration.
func Start(t testing.TB, upstream string) *Proxy {
	t.Helper()
	p, err := Listen("127.0.0.1:0", upstream)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Disable)
	return p
}

// Listen starts a proxy on listen ("HOST:PORT"; port 0 picks one) to
// upstream, until Disable.
func Listen(listen, upstream string) (*Proxy, error) {
	quiet.Do(func() { zerolog.SetGlobalLevel(zerolog.Disabled) })
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	p := toxiproxy.NewProxy(srv, "proxy-"+strings.ReplaceAll(upstream, ":", "-"), listen, upstream)
	if err := p.Start(); err != nil {
		return nil, fmt.Errorf("starting a proxy on %s to %s: %w", listen, upstream, err)
	}
	return &Proxy{p: p, addr: p.Listen}, nil
}

// Addr is the proxy's "127.0.0.1:PORT".
func (p *Proxy) Addr() string { return p.addr }

// Add adds a toxic: typ is a Toxiproxy toxic type ("latency", "bandwidth",
// "timeout", "reset_peer", "slicer", "limit_data"), stream "downstream"
// (server to client) or "upstream", attrs its attributes as JSON
// ("latency": 50, ...). It returns the toxic's name, for Remove.
func (p *Proxy) Add(t testing.TB, typ, stream, attrs string) string {
	t.Helper()
	name, err := p.AddToxic(typ, stream, attrs)
	if err != nil {
		t.Fatal(err)
	}
	return name
}

// AddToxic is Add, returning its error.
func (p *Proxy) AddToxic(typ, stream, attrs string) (string, error) {
	name := typ + "_" + stream
	js := fmt.Sprintf(`{"name":%q,"type":%q,"stream":%q,"toxicity":1,"attributes":{%s}}`, name, typ, stream, attrs)
	if _, err := p.p.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
		return "", fmt.Errorf("adding toxic %s to the proxy on %s: %w", js, p.addr, err)
	}
	return name, nil
}

// Remove removes the toxic name (an error is reported, not fatal: it may
// run after the test's end).
func (p *Proxy) Remove(t testing.TB, name string) {
	if err := p.p.Toxics.RemoveToxic(context.Background(), name); err != nil {
		t.Errorf("removing toxic %s: %v", name, err)
	}
}

// Disable closes the listener and every connection through the proxy:
// the upstream looks down (connections refused).
func (p *Proxy) Disable() { p.p.Stop() }

// Enable listens again, on the same address. A failure is reported, not
// fatal: tests call it from timers.
func (p *Proxy) Enable(t testing.TB) {
	t.Helper()
	if err := p.p.Start(); err != nil {
		t.Errorf("restarting the proxy on %s: %v", p.addr, err)
	}
}
