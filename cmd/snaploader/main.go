// Command snaploader saves and restores microVM snapshots through a local
// content-addressed cache and an optional shared remote tier.
//
// Its command line is a contract for scripts: every failure exits with a
// code that says what kind of failure it was (see exitCodes), prints
// "snaploader: MESSAGE" and "snaploader: error kind: KIND" on stderr, and,
// when the command was given --json, one error object on stdout.
//
// Each command is two parts in two files:
//
//   - CMD_flags.go is the flags part, the command's only code that knows
//     cobra and pflag. CMDFlags holds the flags; its command method defines
//     the command with its flags read into it (newCMDCmd returns it), and
//     its options method turns them (with the environment, and for serve
//     the --config file, already applied) into a typed CMDOptions struct.
//     options checks every value and combination before anything is
//     opened or written, returning usage errors (exit 2) that name the
//     flag, and can be tested directly (CMD_flags_test.go). RunE is
//     options followed by the logic part, nothing else.
//   - CMD.go is the logic part: CMDOptions and runCMD(ctx, opts, streams),
//     which knows nothing of flags and can be called directly; it writes
//     its result on streams.Out and its notes on streams.Err.
//
// The qemu subcommands share qemu_flags.go and qemu.go. Flag groups several
// commands share follow the same rule: cache_flags.go, remote_flags.go,
// key_flags.go and snapshot_flags.go give cacheOptions, remoteOptions,
// keyOptions and snapshotOptions, which env.go, remote.go, key.go and
// snapshot_open.go open. The other files that know cobra are flag
// plumbing too: root.go (the root command, flag errors), sizes.go (the
// size and duration syntaxes), serveops.go (serve's deployment flags and
// configuration sources) and tracing.go (--trace-endpoint); logic parts
// import neither cobra nor pflag.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"

	"github.com/snaploader/snaploader/cache"
	"github.com/snaploader/snaploader/errkind"
)

// Exit codes. Scripts may rely on them; each is documented in the README.
const (
	exitOK          = 0   // success
	exitFailure     = 1   // any other failure
	exitUsage       = 2   // bad flags, arguments or configuration
	exitNoSnapshot  = 3   // nothing to restore: no usable snapshot
	exitRemoteDown  = 4   // a remote the command needs is unavailable
	exitDataLoss    = 5   // stored bytes failed verification
	exitInterrupted = 130 // SIGINT or SIGTERM
)

// exitCodes maps an error's kind to the exit code. NotFound and
// Unavailable have codes of their own only where the error says what was
// not found or unavailable (noSnapshotError, remoteDownError): a missing
// input file or a transient local I/O failure is an ordinary failure.
var exitCodes = map[errkind.Kind]int{
	codes.OK:                exitOK,
	errkind.InvalidArgument: exitUsage,
	errkind.DataLoss:        exitDataLoss,
	errkind.Canceled:        exitInterrupted,
}

// failure is how a command ended, as the CLI reports it.
type failure struct {
	Kind     string `json:"kind"`
	Message  string `json:"message"`
	ExitCode int    `json:"exit_code"`
}

// classify is the kind, message and exit code of err, the error a command
// returned (nil on success). interrupted says the process received SIGINT
// or SIGTERM: whatever the command returned, it was interrupted.
func classify(err error, interrupted bool) failure {
	if interrupted {
		return failure{Kind: errkind.Canceled.String(), Message: "interrupted", ExitCode: exitInterrupted}
	}
	if err == nil {
		return failure{Kind: codes.OK.String(), ExitCode: exitOK}
	}
	msg := cliText(err)
	var nf *noSnapshotError
	var rd *remoteDownError
	switch {
	case errors.As(err, &rd):
		return failure{Kind: errkind.Unavailable.String(), Message: msg, ExitCode: exitRemoteDown}
	case errors.As(err, &nf) && errkind.Is(err, errkind.NotFound):
		return failure{Kind: errkind.NotFound.String(), Message: msg, ExitCode: exitNoSnapshot}
	}
	k := errkind.Of(err)
	code, ok := exitCodes[k]
	if !ok || code == exitOK {
		code = exitFailure
	}
	if k == errkind.Canceled {
		msg = "interrupted"
	}
	return failure{Kind: k.String(), Message: msg, ExitCode: code}
}

// usagef returns a usage error: bad flags, arguments or values (exit 2).
func usagef(format string, args ...any) error {
	return errkind.New(errkind.InvalidArgument, format, args...)
}

// noSnapshotError is a snapshot lookup that found nothing usable (exit 3
// when its kind is NotFound).
type noSnapshotError struct{ err error }

func (e *noSnapshotError) Error() string { return e.err.Error() }
func (e *noSnapshotError) Unwrap() error { return e.err }

// remoteDownError is a remote the command needs that could not be
// reached (exit 4): --remote-required, or a command that works on the
// remote alone (ls --remote, gc, invalidate with --remote).
type remoteDownError struct {
	url string
	err error
}

func (e *remoteDownError) Error() string {
	return fmt.Sprintf("remote %s is unavailable: %s", e.url, cliText(e.err))
}
func (e *remoteDownError) Unwrap() error { return e.err }

// remoteDown marks err, a failure of the remote at url, as the outage of a
// remote the command needs; other failures are returned as they are.
func remoteDown(url string, err error) error {
	var rd *remoteDownError
	if err == nil || errors.As(err, &rd) || !cache.IsOutage(err) {
		return err
	}
	return &remoteDownError{url: url, err: err}
}

// runState is what main learns of the command that ran.
var runState struct {
	// ran is set when a command's RunE starts: an error before it is a
	// usage error (flags, arguments, unknown command).
	ran bool
	// jsonPrinted is set when a command printed its --json object.
	jsonPrinted bool
	// remoteDown is a --remote-required remote that failed during the
	// command (the command went on with the local cache).
	remoteDown error
	// interruptHandled is set by a command for which SIGINT or SIGTERM is
	// a request to finish (qemu --save-on-exit saves the guest): it ends
	// as its work does, not as an interrupted command.
	interruptHandled bool
}

func main() {
	stopProfile := startProfile()
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	interrupted := make(chan struct{})
	go func() {
		<-sigs
		close(interrupted)
		cancel()
		<-sigs
		fmt.Fprintln(os.Stderr, "snaploader: interrupted again: exiting at once")
		os.Exit(exitInterrupted)
	}()
	root, tr := newRootCmd()
	cmd, err := root.ExecuteContextC(ctx)
	if err != nil && !runState.ran && !errkind.Is(err, errkind.Canceled) {
		err = &errkind.Error{Kind: errkind.InvalidArgument, Msg: err.Error(), Err: err}
	}
	if err == nil && runState.remoteDown != nil {
		err = runState.remoteDown
	}
	tr.finish(err)
	wasInterrupted := false
	select {
	case <-interrupted:
		wasInterrupted = !runState.interruptHandled
	default:
	}
	code := reportOutcome(os.Stdout, os.Stderr, cmd, err, wasInterrupted)
	stopProfile()
	os.Exit(code)
}

// reportOutcome prints how the command ended and returns the exit code: on
// stderr the message and the kind, and on stdout one error object when
// the command was given --json and has not printed its own object.
func reportOutcome(stdout, stderr io.Writer, cmd *cobra.Command, err error, interrupted bool) int {
	f := classify(err, interrupted)
	if f.ExitCode == exitOK {
		return exitOK
	}
	fmt.Fprintf(stderr, "snaploader: %s\n", f.Message)
	fmt.Fprintf(stderr, "snaploader: error kind: %s\n", f.Kind)
	if wantsJSON(cmd, os.Args[1:]) && !runState.jsonPrinted {
		printJSON(stdout, struct {
			Error failure `json:"error"`
		}{f})
	}
	return f.ExitCode
}

// wantsJSON reports whether cmd was asked for --json output; args are the
// command line, for a command whose flags could not be parsed.
func wantsJSON(cmd *cobra.Command, args []string) bool {
	if cmd == nil {
		return false
	}
	fl := cmd.Flags().Lookup("json")
	if fl == nil {
		return false
	}
	if fl.Changed {
		return fl.Value.String() == "true"
	}
	return slices.ContainsFunc(args, func(a string) bool {
		if v, ok := strings.CutPrefix(a, "--json="); ok {
			b, err := strconv.ParseBool(v)
			return err == nil && b
		}
		return a == "--json"
	})
}

// cliText is err's message in the product's words: no transport wording
// (errkind.Text, and the gRPC transport's own phrases) and no part
// repeated twice in a row ("opening X: opening X: ...").
func cliText(err error) string {
	s := errkind.Text(err)
	s = connErrorDesc.ReplaceAllStringFunc(s, func(m string) string {
		q := connErrorDesc.FindStringSubmatch(m)[1]
		if u, err := strconv.Unquote(q); err == nil {
			return u
		}
		return strings.Trim(q, `"`)
	})
	for _, r := range transportWording {
		s = strings.ReplaceAll(s, r[0], r[1])
	}
	parts := strings.Split(s, ": ")
	out := make([]string, 0, len(parts))
	for i, p := range parts {
		if i > 0 && p == parts[i-1] {
			continue
		}
		out = append(out, p)
	}
	return strings.Join(out, ": ")
}

var (
	connErrorDesc    = regexp.MustCompile(`connection error: desc = ("(?:[^"\\]|\\.)*")`)
	transportWording = [][2]string{
		{"transport: Error while dialing: ", ""},
		{"transport: authentication handshake failed: ", "TLS handshake failed: "},
		{"transport: ", ""},
	}
)

// printJSON prints v as indented JSON: the one object a --json command
// prints.
func printJSON(w io.Writer, v any) error {
	if w == os.Stdout {
		runState.jsonPrinted = true
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
