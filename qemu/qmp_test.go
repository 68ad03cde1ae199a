package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// scriptedQMP is a QMP peer on a real unix socket driven by the test: it
// sends the greeting, answers qmp_capabilities and hands every later
// command to handle.
func scriptedQMP(t *testing.T, handle func(conn net.Conn, w *json.Encoder, cmd map[string]any)) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		w := json.NewEncoder(conn)
		w.Encode(map[string]any{"QMP": map[string]any{"version": map[string]any{}, "capabilities": []string{}}})
		r := bufio.NewReader(conn)
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			var cmd map[string]any
			if err := json.Unmarshal(line, &cmd); err != nil {
				return
			}
			if cmd["execute"] == "qmp_capabilities" {
				w.Encode(map[string]any{"return": map[string]any{}, "id": cmd["id"]})
				continue
			}
			handle(conn, w, cmd)
		}
	}()
	return sock
}

func TestQMPRepliesMatchedByID(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var held map[string]any
	sock := scriptedQMP(t, func(_ net.Conn, w *json.Encoder, cmd map[string]any) {
		// Hold the first command, answer the second, then the first: the
		// replies arrive out of order.
		if held == nil {
			held = cmd
			return
		}
		w.Encode(map[string]any{"return": cmd["execute"], "id": cmd["id"]})
		w.Encode(map[string]any{"event": "STOP", "timestamp": map[string]any{"seconds": 1, "microseconds": 2}})
		w.Encode(map[string]any{"return": held["execute"], "id": held["id"]})
	})
	q, err := DialQMP(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	results := make(chan string, 2)
	for _, cmd := range []string{"first", "second"} {
		go func() {
			raw, err := q.Execute(ctx, cmd, nil)
			results <- fmt.Sprintf("%s=%s/%v", cmd, raw, err)
		}()
		time.Sleep(50 * time.Millisecond) // order the two sends
	}
	got := map[string]bool{<-results: true, <-results: true}
	for _, want := range []string{`first="first"/<nil>`, `second="second"/<nil>`} {
		if !got[want] {
			t.Errorf("results %v lack %s", got, want)
		}
	}
	ev, err := q.WaitEvent(ctx, "STOP")
	if err != nil || ev.Timestamp != time.Unix(1, 2000) {
		t.Fatalf("WaitEvent = %+v, %v", ev, err)
	}
}

func TestQMPConnectionLoss(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sock := scriptedQMP(t, func(conn net.Conn, w *json.Encoder, cmd map[string]any) {
		conn.Close() // dies with the command in flight
	})
	q, err := DialQMP(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if _, err := q.Execute(ctx, "query-status", nil); status.Code(err) != codes.Unavailable {
		t.Fatalf("in-flight command on a closed connection: %v, want Unavailable", err)
	}
	select {
	case <-q.Done():
	case <-ctx.Done():
		t.Fatal("Done not closed after connection loss")
	}
	if _, err := q.Execute(ctx, "query-status", nil); status.Code(err) != codes.Unavailable {
		t.Fatalf("command after connection loss: %v, want Unavailable", err)
	}
	if _, err := q.WaitEvent(ctx, "STOP"); status.Code(err) != codes.Unavailable {
		t.Fatalf("WaitEvent after connection loss: %v, want Unavailable", err)
	}
	if err := q.Quit(ctx); err != nil {
		t.Fatalf("Quit on a closed connection: %v, want success (QEMU is gone)", err)
	}
}

func TestQMPEventOverflowKeepsNewest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const n = eventBuffer + 50
	sock := scriptedQMP(t, func(_ net.Conn, w *json.Encoder, cmd map[string]any) {
		for i := 0; i < n; i++ {
			w.Encode(map[string]any{"event": fmt.Sprintf("E%d", i)})
		}
		w.Encode(map[string]any{"return": map[string]any{}, "id": cmd["id"]})
	})
	q, err := DialQMP(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if _, err := q.Execute(ctx, "flood", nil); err != nil {
		t.Fatal(err)
	}
	first := <-q.Events()
	if want := fmt.Sprintf("E%d", n-eventBuffer); first.Name != want {
		t.Fatalf("oldest kept event = %s, want %s", first.Name, want)
	}
	if _, err := q.WaitEvent(ctx, fmt.Sprintf("E%d", n-1)); err != nil {
		t.Fatalf("newest event lost: %v", err)
	}
}

func TestDialQMPNoSocket(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := DialQMP(ctx, filepath.Join(t.TempDir(), "absent.sock"))
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("DialQMP on a missing socket: %v, want DeadlineExceeded", err)
	}
}
