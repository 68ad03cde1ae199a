package remote

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/snaploader/snaploader/errkind"
)

// probeTimeout bounds each look at an endpoint's protocol.
const probeTimeout = 2 * time.Second

// What an endpoint answered a probe with.
type answer int

const (
	answerUnknown   answer = iota // nothing conclusive: closed, silent, refused
	answerHTTP1                   // an HTTP/1 response: a web server
	answerText                    // text that is not HTTP/1: not gRPC either
	answerTLS                     // a TLS record: the endpoint wants TLS
	answerH2                      // an HTTP/2 frame in the clear, as gRPC speaks
	answerTLSNoH2                 // TLS, but no HTTP/2 offered: an HTTPS web server
	answerUntrusted               // TLS with a certificate the client does not trust
)

// Probe looks at what the endpoint of a grpc:// or grpcs:// remote that
// could not be reached answers, to tell a configuration error from an
// outage. It returns an InvalidArgument error that says what the endpoint
// answered and the likely fix, or nil when the endpoint could be a gRPC
// cache that is down (nothing listens, it answers nothing, or it speaks
// the protocol the URL asks for). Dial probes when it fails as an outage
// would.
func Probe(ctx context.Context, url, caFile string) error {
	scheme, rest, ok := strings.Cut(url, "://")
	if !ok || (scheme != "grpc" && scheme != "grpcs") {
		return nil
	}
	hostport, _, _ := strings.Cut(rest, "/")
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*probeTimeout)
	defer cancel()
	other := "grpcs://" + rest
	if scheme == "grpcs" {
		other = "grpc://" + rest
	}
	fail := func(format string, args ...any) error {
		return errkind.New(errkind.InvalidArgument, "remote %s: the endpoint %s", url, fmt.Sprintf(format, args...))
	}
	httpFix := "it is likely a web server, or a metrics or status page address; give the address the cache serves gRPC on (for snaploader serve, its --listen address)"
	if scheme == "grpc" {
		a, line := sniffPlain(ctx, hostport)
		if a == answerUnknown {
			a, _ = sniffTLS(ctx, hostport, host, "", false)
		}
		switch a {
		case answerHTTP1:
			return fail("answered as an HTTP/1 server (%q), not as a gRPC cache: %s", line, httpFix)
		case answerText:
			return fail("answered with text (%q), not as a gRPC cache: %s", line, httpFix)
		case answerTLS, answerUntrusted:
			return fail("answered with TLS: use %s (with --ca-file if its certificate is not signed by a system root)", other)
		case answerTLSNoH2:
			return fail("answered as an HTTPS server without HTTP/2, which gRPC needs, not as a gRPC cache: %s", httpFix)
		}
		return nil
	}
	a, detail := sniffTLS(ctx, hostport, host, caFile, true)
	if a == answerUntrusted {
		// Whether it could serve gRPC at all matters more.
		if b, _ := sniffTLS(ctx, hostport, host, "", false); b == answerTLSNoH2 {
			a = b
		}
	}
	switch a {
	case answerUntrusted:
		return fail("answered with a TLS certificate this host does not trust (%s): pass --ca-file with the CA that signed it", detail)
	case answerTLSNoH2:
		return fail("answered as an HTTPS server without HTTP/2, which gRPC needs, not as a gRPC cache: %s", httpFix)
	case answerTLS:
		return nil
	}
	switch p, line := sniffPlain(ctx, hostport); {
	case p == answerHTTP1:
		return fail("answered without TLS, as an HTTP/1 server (%q): %s", line, httpFix)
	case p == answerText:
		return fail("answered without TLS, with text (%q): %s", line, httpFix)
	case a == answerHTTP1 || a == answerText:
		return fail("answered without TLS, in text: %s", httpFix)
	case p == answerH2 || a == answerH2:
		return fail("answered without TLS (plain gRPC): use %s", other)
	}
	return nil
}

// h2Preface is what an HTTP/2 client sends first: the connection preface
// and an empty SETTINGS frame.
var h2Preface = append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, 4, 0, 0, 0, 0, 0)

// sniffPlain opens a plain connection, speaks HTTP/2 as a gRPC client does
// and classifies the first bytes of the answer; line is the first line of
// an HTTP/1 answer.
func sniffPlain(ctx context.Context, hostport string) (answer, string) {
	d := net.Dialer{Timeout: probeTimeout}
	c, err := d.DialContext(ctx, "tcp", hostport)
	if err != nil {
		return answerUnknown, ""
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(probeTimeout))
	if _, err := c.Write(h2Preface); err != nil {
		return answerUnknown, ""
	}
	buf := make([]byte, 256)
	n, _ := readAtLeast(c, buf, 9)
	return classifyFirstBytes(buf[:n])
}

// classifyFirstBytes says what the first bytes an endpoint sent are.
func classifyFirstBytes(b []byte) (answer, string) {
	switch {
	case bytes.HasPrefix(b, []byte("HTTP/")):
		line, _, _ := bytes.Cut(b, []byte("\n"))
		return answerHTTP1, strings.TrimSpace(string(line))
	case len(b) >= 2 && (b[0] == 0x15 || b[0] == 0x16) && b[1] == 0x03:
		return answerTLS, ""
	case len(b) >= 5 && b[0] == 0 && b[3] == 0x4 && b[4]&^0x1 == 0:
		// A SETTINGS frame header (short, flags none or ACK): HTTP/2.
		return answerH2, ""
	case len(b) > 0 && b[0] >= ' ' && b[0] < 0x7f:
		// As an HTTP/2 frame header, a frame of several megabytes: text.
		line, _, _ := bytes.Cut(b, []byte("\n"))
		return answerText, strings.TrimSpace(string(line))
	}
	return answerUnknown, ""
}

// readAtLeast reads into buf until it holds min bytes, the peer stops
// sending, or the deadline passes.
func readAtLeast(c net.Conn, buf []byte, min int) (int, error) {
	n := 0
	for n < min {
		m, err := c.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// sniffTLS makes a TLS handshake offering HTTP/2 and HTTP/1.1 and says
// what came of it; detail is the reason a certificate is not trusted.
// Without verify, any certificate is taken (the protocol alone matters).
func sniffTLS(ctx context.Context, hostport, host, caFile string, verify bool) (answer, string) {
	cfg := &tls.Config{ServerName: host, NextProtos: []string{"h2", "http/1.1"}, InsecureSkipVerify: !verify} // #nosec G402 -- a probe: nothing is sent
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return answerUnknown, ""
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		cfg.RootCAs = pool
	}
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: probeTimeout}, Config: cfg}
	hctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	c, err := d.DialContext(hctx, "tcp", hostport)
	var rh tls.RecordHeaderError
	var alert tls.AlertError
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	switch {
	case err == nil:
		defer c.Close()
		if c.(*tls.Conn).ConnectionState().NegotiatedProtocol != "h2" {
			return answerTLSNoH2, ""
		}
		return answerTLS, ""
	case errors.As(err, &rh):
		a, _ := classifyFirstBytes(rh.RecordHeader[:])
		return a, ""
	case errors.As(err, &cv), errors.As(err, &ua), errors.As(err, &hn), errors.As(err, &ci):
		return answerUntrusted, err.Error()
	case errors.As(err, &alert):
		return answerTLS, "" // it refused the handshake, in TLS
	}
	return answerUnknown, ""
}
