package main

import (
	"fmt"
	"log/slog"
	"os"
	"sort"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/snaploader/snaploader/internal/flagconfig"
	"github.com/snaploader/snaploader/server"
)

// serveOps are the flags of serve that deploy it: its configuration
// sources, TLS, API key sources and logs.
type serveOps struct {
	config string
	// tls are the server's certificate chain and key and the CA bundle
	// client certificates must be signed by.
	tls                 tlsFiles
	apiKeyFile          string
	logFormat, logLevel string
	accessLog           bool
	// sources says where each flag not given on the command line was
	// taken from.
	sources map[string]string
}

// envPrefix is put before a serve flag's name in its environment variable.
const envPrefix = "SNAPLOADER_"

func (o *serveOps) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&o.config, "config", "", "YAML file of settings: flag names to values (default $SNAPLOADER_CONFIG); a flag on the command line wins over its SNAPLOADER_<FLAG> environment variable, which wins over the file")
	o.tls.register(fl,
		tlsFlag{"tls-cert", "serve gRPC over TLS with this PEM certificate chain (clients use grpcs://); reread when it changes"},
		tlsFlag{"tls-key", "the PEM private key of --tls-cert"},
		tlsFlag{"tls-client-ca", "with --tls-cert: require client certificates signed by a CA of this PEM bundle (mutual TLS)"})
	fl.StringVar(&o.apiKeyFile, "api-key-file", "", "file of KEY=GROUP[:ro] lines (mode 0600 or stricter), added to --api-key and $SNAPLOADER_API_KEYS")
	fl.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fl.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fl.BoolVar(&o.accessLog, "access-log", true, "log one line per RPC at info level (method, instance, digest, bytes, duration, code, group, peer)")
	// Settings from the environment and the config file are taken before
	// anything else runs (tracing is set up from --trace-endpoint in the
	// root command's hook, called next).
	cmd.PersistentPreRunE = func(cmd *cobra.Command, args []string) error {
		if err := o.applyConfig(cmd); err != nil {
			return err
		}
		if p := cmd.Root().PersistentPreRunE; p != nil && cmd.Root() != cmd {
			return p(cmd, args)
		}
		return nil
	}
}

// applyConfig sets the flags left unset from SNAPLOADER_<FLAG> and the
// config file. --api-key is never read from $SNAPLOADER_API_KEY (the key
// clients send); serve reads $SNAPLOADER_API_KEYS instead.
func (o *serveOps) applyConfig(cmd *cobra.Command) error {
	if !cmd.Flags().Changed("config") {
		o.config = os.Getenv(envPrefix + "CONFIG")
	}
	from, err := flagconfig.Apply(cmd.Flags(), flagconfig.Source{
		EnvPrefix: envPrefix, Environ: os.Environ(), File: o.config,
		Skip: map[string]bool{"config": true}, NoEnv: map[string]bool{"api-key": true},
	})
	if err != nil {
		return err
	}
	if from["api-key"] != "" {
		// The file holds secrets then: it must be private like a key file.
		fi, err := os.Stat(o.config)
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return fmt.Errorf("config file %s sets api-key but has mode %04o: its group or other users can read the keys; chmod 600 it, or move the keys to --api-key-file", o.config, fi.Mode().Perm())
		}
	}
	o.sources = from
	return nil
}

// logger is the server's logger, also made the default one.
func (o *serveOps) logger() (*slog.Logger, error) {
	log, err := server.NewLogger(os.Stderr, o.logFormat, o.logLevel)
	if err != nil {
		return nil, usagef("--log-format %q / --log-level %q: %w", o.logFormat, o.logLevel, err)
	}
	slog.SetDefault(log)
	if len(o.sources) > 0 {
		names := make([]string, 0, len(o.sources))
		for n, src := range o.sources {
			names = append(names, "--"+n+" from "+src)
		}
		sort.Strings(names)
		log.Info("settings not given on the command line", "from", names)
	}
	return log, nil
}

// apiKeys are the keys of --api-key, --api-key-file and
// $SNAPLOADER_API_KEYS together.
func (o *serveOps) apiKeys(specs []string) (map[string]server.APIKey, error) {
	var ks server.APIKeys
	src := "--api-key"
	if s := o.sources["api-key"]; s != "" {
		src = "api-key of " + s
	}
	for _, spec := range specs {
		if err := ks.Add(spec, src); err != nil {
			return nil, err
		}
	}
	if o.apiKeyFile != "" {
		if err := ks.AddFile(o.apiKeyFile); err != nil {
			return nil, err
		}
	}
	if err := ks.AddList(os.Getenv(envPrefix+"API_KEYS"), "$"+envPrefix+"API_KEYS"); err != nil {
		return nil, err
	}
	if ks.Keys == nil {
		return map[string]server.APIKey{}, nil
	}
	return ks.Keys, nil
}

// grpcOptions are the gRPC server options of --tls-*.
func (o *serveOps) grpcOptions() ([]grpc.ServerOption, string, error) {
	if o.tls.cert == "" && o.tls.key == "" {
		if o.tls.ca != "" {
			return nil, "", usagef("--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked over TLS")
		}
		return nil, "plaintext", nil
	}
	if o.tls.cert == "" || o.tls.key == "" {
		return nil, "", usagef("--tls-cert and --tls-key go together: give both (the certificate chain and its private key)")
	}
	cfg, err := server.TLSConfig(o.tls.cert, o.tls.key, o.tls.ca)
	if err != nil {
		return nil, "", fmt.Errorf("--tls-cert/--tls-key: %w", err)
	}
	mode := "TLS"
	if o.tls.ca != "" {
		mode = "mutual TLS"
	}
	return []grpc.ServerOption{grpc.Creds(credentials.NewTLS(cfg))}, mode, nil
}
