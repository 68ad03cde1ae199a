package server

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/snaploader/snaploader/internal/fileio"
)

// TLSConfig is the TLS configuration of a server with the certificate
// chain in certFile and its key in keyFile (PEM). With clientCAFile, every
// client must present a certificate signed by one of its CAs (mutual
// TLS). The certificate and key are read again on the first handshake
// after either file changes, so a renewed certificate is served without a
// restart.
func TLSConfig(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	if certFile == "" || keyFile == "" {
		return nil, fmt.Errorf("TLS needs both a certificate and a key file")
	}
	kp := &keyPair{cert: certFile, key: keyFile}
	if _, err := kp.get(); err != nil {
		return nil, err
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return kp.get()
		},
	}
	if clientCAFile != "" {
		pem, err := readPEM(clientCAFile, "client CA file")
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("client CA file %s: no PEM certificates", clientCAFile)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// keyPair is a certificate and key loaded from files, reloaded when
// either file's modification time or size changes.
type keyPair struct {
	cert, key string
	mu        sync.Mutex
	stamp     [2]fileStamp
	loaded    *tls.Certificate
}

type fileStamp struct {
	mod  time.Time
	size int64
}

func stampOf(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{fi.ModTime(), fi.Size()}, nil
}

func (k *keyPair) get() (*tls.Certificate, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	cs, err1 := stampOf(k.cert)
	ks, err2 := stampOf(k.key)
	if k.loaded != nil && (err1 != nil || err2 != nil || [2]fileStamp{cs, ks} == k.stamp) {
		return k.loaded, nil // unchanged, or being replaced: keep serving the last good pair
	}
	certPEM, err := readPEM(k.cert, "TLS certificate")
	if err != nil {
		return k.fallback(err)
	}
	keyPEM, err := readPEM(k.key, "TLS key")
	if err != nil {
		return k.fallback(err)
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return k.fallback(fmt.Errorf("TLS certificate %s and key %s: %w", k.cert, k.key, err))
	}
	k.loaded, k.stamp = &c, [2]fileStamp{cs, ks}
	return k.loaded, nil
}

// fallback keeps the last good pair while a renewal is half written.
func (k *keyPair) fallback(err error) (*tls.Certificate, error) {
	if k.loaded != nil {
		return k.loaded, nil
	}
	return nil, err
}

// readPEM reads a small PEM file without blocking on a FIFO or reading a
// device.
func readPEM(path, what string) ([]byte, error) {
	f, err := fileio.OpenRegular(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 1<<20+1))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", what, path, err)
	}
	if len(b) > 1<<20 {
		return nil, fmt.Errorf("%s %s: larger than 1 MiB", what, path)
	}
	return b, nil
}
