package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// QMPError is an error reply from QEMU's machine protocol. It carries a gRPC
// status code (see GRPCStatus) so status.Code works on wrapped errors.
type QMPError struct {
	Command string // the command that failed
	Class   string // QMP error class, e.g. "GenericError", "CommandNotFound"
	Desc    string // QEMU's human-readable description
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qmp command %q failed: %s: %s", e.Command, e.Class, e.Desc)
}

// Code maps the QMP error class to a gRPC code: CommandNotFound is
// Unimplemented, DeviceNotFound is NotFound, DeviceNotActive is
// FailedPrecondition, KVMMissingCap is Unavailable and GenericError (mostly
// bad or missing arguments) is InvalidArgument.
func (e *QMPError) Code() codes.Code {
	switch e.Class {
	case "CommandNotFound":
		return codes.Unimplemented
	case "DeviceNotFound":
		return codes.NotFound
	case "DeviceNotActive":
		return codes.FailedPrecondition
	case "KVMMissingCap":
		return codes.Unavailable
	case "GenericError":
		return codes.InvalidArgument
	}
	return codes.Unknown
}

// GRPCStatus lets status.Code and status.FromError classify the error.
func (e *QMPError) GRPCStatus() *status.Status { return status.New(e.Code(), e.Error()) }

// Event is an asynchronous QMP event such as STOP, RESUME or SHUTDOWN.
type Event struct {
	Name      string
	Data      json.RawMessage
	Timestamp time.Time
}

type qmpMessage struct {
	QMP       json.RawMessage `json:"QMP,omitempty"`
	Return    json.RawMessage `json:"return,omitempty"`
	Error     *qmpErrorBody   `json:"error,omitempty"`
	ID        *uint64         `json:"id,omitempty"`
	Event     string          `json:"event,omitempty"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp,omitempty"`
}

type qmpErrorBody struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

type qmpReply struct {
	msg qmpMessage
	err error
}

// QMP is a client of one QEMU machine protocol socket. It is safe for
// concurrent use; replies are matched to commands by id.
type QMP struct {
	path string
	conn net.Conn

	writeMu sync.Mutex

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan qmpReply
	readErr error // set once the reader stops

	events  chan Event
	dropped uint64
	done    chan struct{}
}

// eventBuffer is how many unread events are kept; older unread events are
// dropped when it is full.
const eventBuffer = 256

// DialQMP connects to the QMP unix socket at path, reads the greeting and
// negotiates capabilities. It retries connecting until the socket accepts or
// ctx ends (QEMU creates the socket shortly after it starts).
func DialQMP(ctx context.Context, path string) (*QMP, error) {
	var conn net.Conn
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			conn = c
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connecting to qmp socket %s: %w (last error: %v)", path, status.FromContextError(ctx.Err()).Err(), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	q, err := newQMP(ctx, path, conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

func newQMP(ctx context.Context, path string, conn net.Conn) (*QMP, error) {
	q := &QMP{
		path:    path,
		conn:    conn,
		pending: map[uint64]chan qmpReply{},
		events:  make(chan Event, eventBuffer),
		done:    make(chan struct{}),
	}
	dec := json.NewDecoder(bufio.NewReader(conn))
	// The greeting comes first, before any command.
	if dl, ok := ctx.Deadline(); ok {
		conn.SetReadDeadline(dl)
	}
	var greeting qmpMessage
	if err := dec.Decode(&greeting); err != nil {
		return nil, status.Errorf(codes.Unavailable, "reading qmp greeting from %s: %v", path, err)
	}
	if greeting.QMP == nil {
		return nil, status.Errorf(codes.Internal, "qmp socket %s: first message is not a greeting", path)
	}
	conn.SetReadDeadline(time.Time{})
	go q.readLoop(dec)
	if _, err := q.Execute(ctx, "qmp_capabilities", nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

func (q *QMP) readLoop(dec *json.Decoder) {
	var err error
	for {
		var m qmpMessage
		if err = dec.Decode(&m); err != nil {
			break
		}
		if m.Event != "" {
			ev := Event{Name: m.Event, Data: m.Data}
			if m.Timestamp != nil {
				ev.Timestamp = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
			}
			q.pushEvent(ev)
			continue
		}
		if m.ID == nil {
			continue // a reply without id answers nothing we sent
		}
		q.mu.Lock()
		ch := q.pending[*m.ID]
		delete(q.pending, *m.ID)
		q.mu.Unlock()
		if ch != nil {
			ch <- qmpReply{msg: m}
		}
	}
	q.mu.Lock()
	q.readErr = status.Errorf(codes.Unavailable, "qmp connection %s closed: %v", q.path, err)
	for id, ch := range q.pending {
		ch <- qmpReply{err: q.readErr}
		delete(q.pending, id)
	}
	q.mu.Unlock()
	close(q.done)
	close(q.events)
}

func (q *QMP) pushEvent(ev Event) {
	for {
		select {
		case q.events <- ev:
			return
		default:
		}
		// Full: drop the oldest unread event to keep the newest.
		select {
		case <-q.events:
			q.mu.Lock()
			q.dropped++
			q.mu.Unlock()
		default:
		}
	}
}

// Events returns the channel of asynchronous events. It is closed when the
// connection ends. Unread events beyond an internal buffer are dropped,
// oldest first.
func (q *QMP) Events() <-chan Event { return q.events }

// Done is closed when the connection has ended (e.g. QEMU exited).
func (q *QMP) Done() <-chan struct{} { return q.done }

// WaitEvent discards events until one named name arrives.
func (q *QMP) WaitEvent(ctx context.Context, name string) (Event, error) {
	for {
		select {
		case ev, ok := <-q.events:
			if !ok {
				return Event{}, status.Errorf(codes.Unavailable, "waiting for qmp event %s on %s: connection closed", name, q.path)
			}
			if ev.Name == name {
				return ev, nil
			}
		case <-ctx.Done():
			return Event{}, fmt.Errorf("waiting for qmp event %s on %s: %w", name, q.path, status.FromContextError(ctx.Err()).Err())
		}
	}
}

// Execute runs one QMP command with optional arguments (anything that
// marshals to a JSON object, or nil) and returns the raw "return" value.
// QMP errors are *QMPError; a lost connection is Unavailable; an ended ctx is
// DeadlineExceeded or Canceled.
func (q *QMP) Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{Execute: cmd, Arguments: args}
	if err := ctx.Err(); err != nil {
		// Never send a command whose caller has already given up on it.
		return nil, fmt.Errorf("qmp command %q on %s: %w", cmd, q.path, status.FromContextError(err).Err())
	}
	ch := make(chan qmpReply, 1)
	q.mu.Lock()
	if q.readErr != nil {
		err := q.readErr
		q.mu.Unlock()
		return nil, fmt.Errorf("qmp command %q: %w", cmd, err)
	}
	q.nextID++
	req.ID = q.nextID
	q.pending[req.ID] = ch
	q.mu.Unlock()

	b, err := json.Marshal(req)
	if err != nil {
		q.forget(req.ID)
		return nil, status.Errorf(codes.InvalidArgument, "encoding qmp command %q: %v", cmd, err)
	}
	q.writeMu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		q.conn.SetWriteDeadline(dl)
	}
	_, err = q.conn.Write(append(b, '\n'))
	q.conn.SetWriteDeadline(time.Time{})
	q.writeMu.Unlock()
	if err != nil {
		q.forget(req.ID)
		return nil, status.Errorf(codes.Unavailable, "sending qmp command %q to %s: %v", cmd, q.path, err)
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("qmp command %q: %w", cmd, r.err)
		}
		if r.msg.Error != nil {
			return nil, &QMPError{Command: cmd, Class: r.msg.Error.Class, Desc: r.msg.Error.Desc}
		}
		return r.msg.Return, nil
	case <-ctx.Done():
		q.forget(req.ID)
		return nil, fmt.Errorf("qmp command %q on %s: %w", cmd, q.path, status.FromContextError(ctx.Err()).Err())
	}
}

func (q *QMP) forget(id uint64) {
	q.mu.Lock()
	delete(q.pending, id)
	q.mu.Unlock()
}

// Close ends the connection.
func (q *QMP) Close() error {
	err := q.conn.Close()
	<-q.done
	return err
}

// Stop pauses the guest's vCPUs.
func (q *QMP) Stop(ctx context.Context) error {
	_, err := q.Execute(ctx, "stop", nil)
	return err
}

// Cont resumes the guest's vCPUs.
func (q *QMP) Cont(ctx context.Context) error {
	_, err := q.Execute(ctx, "cont", nil)
	return err
}

// Quit makes QEMU exit. QEMU may close the connection before or after
// answering, so a lost connection counts as success.
func (q *QMP) Quit(ctx context.Context) error {
	_, err := q.Execute(ctx, "quit", nil)
	if err != nil && status.Code(err) == codes.Unavailable {
		return nil
	}
	return err
}

// MigrateSetCapabilities sets migration capabilities, e.g.
// {"x-ignore-shared": true}.
func (q *QMP) MigrateSetCapabilities(ctx context.Context, caps map[string]bool) error {
	type capability struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	var list []capability
	for k, v := range caps {
		list = append(list, capability{k, v})
	}
	_, err := q.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list})
	return err
}

// Migrate starts an outgoing migration to uri (e.g. "exec:cat > state.bin").
func (q *QMP) Migrate(ctx context.Context, uri string) error {
	_, err := q.Execute(ctx, "migrate", map[string]any{"uri": uri})
	return err
}

// MigrateIncoming starts an incoming migration from uri on a QEMU started
// with -incoming defer.
func (q *QMP) MigrateIncoming(ctx context.Context, uri string) error {
	_, err := q.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri})
	return err
}

// MigrationInfo is the part of query-migrate's answer snaploader uses.
type MigrationInfo struct {
	Status    string `json:"status"` // none, setup, active, completed, failed, cancelled, ...
	ErrorDesc string `json:"error-desc,omitempty"`
	TotalTime int64  `json:"total-time,omitempty"` // ms
	Downtime  int64  `json:"downtime,omitempty"`   // ms
	RAM       *struct {
		Transferred int64 `json:"transferred"`
		Total       int64 `json:"total"`
	} `json:"ram,omitempty"`
}

// QueryMigrate returns the migration status.
func (q *QMP) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var info MigrationInfo
	raw, err := q.Execute(ctx, "query-migrate", nil)
	if err != nil {
		return info, err
	}
	if err := json.Unmarshal(raw, &info); err != nil {
		return info, status.Errorf(codes.Internal, "decoding query-migrate answer %s: %v", raw, err)
	}
	return info, nil
}

// WaitMigration polls query-migrate until the status is want. A failed or
// cancelled migration is an Internal error carrying QEMU's description.
func (q *QMP) WaitMigration(ctx context.Context, want string) (MigrationInfo, error) {
	for {
		info, err := q.QueryMigrate(ctx)
		if err != nil {
			return info, err
		}
		if info.Status == want {
			return info, nil
		}
		if info.Status == "failed" || info.Status == "cancelled" {
			return info, status.Errorf(codes.Internal, "migration %s (waiting for %s): %s", info.Status, want, info.ErrorDesc)
		}
		if err := sleepCtx(ctx, 10*time.Millisecond); err != nil {
			return info, fmt.Errorf("waiting for migration status %s (now %s): %w", want, info.Status, err)
		}
	}
}

// RunStatus is query-status's answer.
type RunStatus struct {
	Status  string `json:"status"` // running, paused, inmigrate, postmigrate, shutdown, ...
	Running bool   `json:"running"`
}

// QueryStatus returns the VM run state.
func (q *QMP) QueryStatus(ctx context.Context) (RunStatus, error) {
	var st RunStatus
	raw, err := q.Execute(ctx, "query-status", nil)
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return st, status.Errorf(codes.Internal, "decoding query-status answer %s: %v", raw, err)
	}
	return st, nil
}

// WaitStatus polls query-status until the run state is one of want and
// returns it.
func (q *QMP) WaitStatus(ctx context.Context, want ...string) (RunStatus, error) {
	for {
		st, err := q.QueryStatus(ctx)
		if err != nil {
			return st, err
		}
		for _, w := range want {
			if st.Status == w {
				return st, nil
			}
		}
		if err := sleepCtx(ctx, 10*time.Millisecond); err != nil {
			return st, fmt.Errorf("waiting for run state %v (now %s): %w", want, st.Status, err)
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	case <-t.C:
		return nil
	}
}
