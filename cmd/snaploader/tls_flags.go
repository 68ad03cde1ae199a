package main

import (
	"github.com/spf13/pflag"
)

// tlsFiles are the PEM files of one end of a TLS connection: its
// certificate chain and key, and the CA bundle it checks the other end
// against (the remote's flags on a client, serve's on the server).
type tlsFiles struct{ cert, key, ca string }

// tlsFlag is the name and help of one flag of tlsFiles.
type tlsFlag struct{ name, usage string }

func (t *tlsFiles) register(fl *pflag.FlagSet, cert, key, ca tlsFlag) {
	fl.StringVar(&t.cert, cert.name, "", cert.usage)
	fl.StringVar(&t.key, key.name, "", key.usage)
	fl.StringVar(&t.ca, ca.name, "", ca.usage)
}
