package testutil

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"go/build"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// MinIO is a MinIO server started for one test by StartMinIO. It listens on
// 127.0.0.1 only and keeps its data in a per-test temporary directory.
//
// MinIO's single-drive layout under DataDir is DataDir/BUCKET/KEY/xl.meta,
// where small objects are stored inline inside xl.meta and larger ones in
// DataDir/BUCKET/KEY/<data-dir-uuid>/part.N; a part file is larger than
// the object (a 3 MiB object gives a 3 MiB + 96 byte part.1) because MinIO
// interleaves its own block checksums, so a byte flipped on disk is caught
// by MinIO rather than by the code under test. Tests that need a corrupt
// object therefore use PutRaw, which replaces an object's bytes through the
// S3 API and so bypasses every check of the code under test.
type MinIO struct {
	// Endpoint is "127.0.0.1:PORT".
	Endpoint string
	// AccessKey and SecretKey are the root credentials.
	AccessKey, SecretKey string
	// DataDir is the server's data directory.
	DataDir string
	// Client is a client with root credentials, for test set-up.
	Client *minio.Client

	proc *minioProc
}

type minioProc struct {
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited
	logPath string
	once    sync.Once
}

// minioBinary finds the minio server binary on PATH, then in GOPATH/bin.
func minioBinary() (string, error) { return serverBinary("minio", ".ci/minio.sh") }

// serverBinary finds the test server binary name on PATH, then in
// GOPATH/bin, where the CI scripts keep built servers.
func serverBinary(name, installer string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	var tried []string
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		gopath = build.Default.GOPATH
	}
	for _, dir := range filepath.SplitList(gopath) {
		p := filepath.Join(dir, "bin", name)
		tried = append(tried, p)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s is not on PATH nor at %s (install it with %s)", name, strings.Join(tried, ", "), installer)
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// StartMinIO starts a MinIO server for t and waits until it serves
// requests; it calls Unavailable when the minio binary is not installed.
// The server is stopped, and waited for, when t ends.
func StartMinIO(t testing.TB) MinIO {
	t.Helper()
	bin, err := minioBinary()
	if err != nil {
		Unavailable(t, err.Error())
	}
	dataDir := t.TempDir()
	logDir := t.TempDir()
	m := MinIO{
		AccessKey: "snaploader-" + randomHex(4),
		SecretKey: randomHex(16),
		DataDir:   dataDir,
	}
	// Another process may take a port between freePort and MinIO binding
	// it; such a start fails fast and is retried on fresh ports.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		proc, endpoint, err := startMinIOProc(bin, dataDir, filepath.Join(logDir, fmt.Sprintf("minio-%d.log", attempt)), m.AccessKey, m.SecretKey)
		if err != nil {
			lastErr = err
			continue
		}
		m.Endpoint, m.proc = endpoint, proc
		break
	}
	if m.proc == nil {
		t.Fatalf("starting minio: %v", lastErr)
	}
	t.Cleanup(m.Stop)
	m.Client, err = minio.New(m.Endpoint, &minio.Options{
		Creds:  credentials.NewStaticV4(m.AccessKey, m.SecretKey, ""),
		Region: "us-east-1",
	})
	if err != nil {
		t.Fatalf("minio client for %s: %v", m.Endpoint, err)
	}
	// The liveness probe can answer before the drive is formatted: wait
	// until an S3 request succeeds too.
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := m.Client.ListBuckets(ctx)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("minio at %s does not answer S3 requests: %v\n%s", m.Endpoint, err, m.proc.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return m
}

func startMinIOProc(bin, dataDir, logPath, user, password string) (*minioProc, string, error) {
	port, err := freePort()
	if err != nil {
		return nil, "", err
	}
	consolePort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	endpoint := fmt.Sprintf("127.0.0.1:%d", port)
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, "", err
	}
	defer logf.Close()
	cmd := exec.Command(bin, "server",
		"--address", endpoint,
		"--console-address", fmt.Sprintf("127.0.0.1:%d", consolePort),
		dataDir)
	cmd.Env = append(os.Environ(),
		"MINIO_ROOT_USER="+user,
		"MINIO_ROOT_PASSWORD="+password,
		"MINIO_BROWSER=off",
		"MINIO_UPDATE=off",
		"MINIO_CI_CD=on",
		"MINIO_PROMETHEUS_AUTH_TYPE=public", // request counts for Requests
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, "", fmt.Errorf("running %s: %w", bin, err)
	}
	p := &minioProc{cmd: cmd, done: make(chan struct{}), logPath: logPath}
	go func() {
		cmd.Wait()
		close(p.done)
	}()
	hc := &http.Client{Timeout: time.Second}
	url := "http://" + endpoint + "/minio/health/live"
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-p.done:
			return nil, "", fmt.Errorf("minio exited during start-up (%s)\n%s", cmd.ProcessState, p.logTail())
		default:
		}
		resp, err := hc.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p, endpoint, nil
			}
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, "", fmt.Errorf("minio at %s not live after 60s: %v\n%s", endpoint, err, p.logTail())
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func (p *minioProc) stop() {
	p.once.Do(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
	})
}

func (p *minioProc) logTail() string {
	b, _ := os.ReadFile(p.logPath)
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return "minio log tail:\n" + string(b)
}

// Stop stops the server and waits for it to exit. It is idempotent; tests
// call it to observe how a client behaves when the server is down.
func (m MinIO) Stop() {
	if m.proc != nil {
		m.proc.stop()
	}
}

// Pid is the server's process id (a benchmark pins it to a CPU).
func (m MinIO) Pid() int { return m.proc.cmd.Process.Pid }

// NewBucket creates a bucket with a fresh name and returns the name.
func (m MinIO) NewBucket(t testing.TB) string {
	t.Helper()
	name := "test-" + randomHex(6)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Client.MakeBucket(ctx, name, minio.MakeBucketOptions{}); err != nil {
		t.Fatalf("creating bucket %s on %s: %v", name, m.Endpoint, err)
	}
	return name
}

// PutRaw stores data under bucket/key directly, bypassing any verification
// of the code under test; tests use it to plant corrupt objects.
func (m MinIO) PutRaw(t testing.TB, bucket, key string, data []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := m.Client.PutObject(ctx, bucket, key, bytes.NewReader(data), int64(len(data)), minio.PutObjectOptions{}); err != nil {
		t.Fatalf("putting %s/%s on %s: %v", bucket, key, m.Endpoint, err)
	}
}

// Damage replaces the object at bucket/key by damage(its bytes), keeping
// its user metadata, through the S3 API: what a tier finds when its bucket
// holds bytes other than it wrote. Damage fails t when there is no such
// object.
func (m MinIO) Damage(t testing.TB, bucket, key string, damage func([]byte) []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	obj, err := m.Client.GetObject(ctx, bucket, key, minio.GetObjectOptions{})
	if err != nil {
		t.Fatalf("getting %s/%s on %s: %v", bucket, key, m.Endpoint, err)
	}
	defer obj.Close()
	info, err := obj.Stat()
	if err != nil {
		t.Fatalf("getting %s/%s on %s: %v", bucket, key, m.Endpoint, err)
	}
	b, err := io.ReadAll(obj)
	if err != nil {
		t.Fatalf("reading %s/%s on %s: %v", bucket, key, m.Endpoint, err)
	}
	b = damage(b)
	if _, err := m.Client.PutObject(ctx, bucket, key, bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{UserMetadata: info.UserMetadata}); err != nil {
		t.Fatalf("putting %s/%s on %s: %v", bucket, key, m.Endpoint, err)
	}
}

// Requests returns how many S3 requests the server has received so far,
// per API (GetObject, HeadObject, PutObject...), from its metrics.
func (m MinIO) Requests() (map[string]float64, error) {
	hc := &http.Client{Timeout: 10 * time.Second}
	resp, err := hc.Get("http://" + m.Endpoint + "/minio/metrics/v3/api/requests")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("minio metrics at %s: %s: %s", m.Endpoint, resp.Status, b)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		rest, ok := strings.CutPrefix(line, "minio_api_requests_total{")
		if !ok {
			continue
		}
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		_, name, ok := strings.Cut(labels, `name="`)
		if !ok {
			continue
		}
		name, _, _ = strings.Cut(name, `"`)
		var v float64
		if _, err := fmt.Sscan(strings.TrimSpace(value), &v); err != nil {
			return nil, fmt.Errorf("minio metrics at %s: %q: %v", m.Endpoint, line, err)
		}
		out[name] += v
	}
	return out, nil
}
