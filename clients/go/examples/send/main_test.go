package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	heraldv1 "github.com/herald-push/herald/clients/go/heraldv1"
)

// TestRetryable checks the retry rule code by code: every gRPC status code,
// plus the errors that are not statuses.
func TestRetryable(t *testing.T) {
	byCode := map[codes.Code]bool{
		codes.OK:                 false,
		codes.Canceled:           true, // the caller's own cancellation is checked on its context
		codes.Unknown:            true, // e.g. a transport error some libraries cannot classify
		codes.InvalidArgument:    false,
		codes.DeadlineExceeded:   true,
		codes.NotFound:           false,
		codes.AlreadyExists:      false,
		codes.PermissionDenied:   false,
		codes.ResourceExhausted:  true,
		codes.FailedPrecondition: false,
		codes.Aborted:            true,
		codes.OutOfRange:         false,
		codes.Unimplemented:      false,
		codes.Internal:           true, // e.g. "h2 protocol error"
		codes.Unavailable:        true,
		codes.DataLoss:           true,
		codes.Unauthenticated:    false,
	}
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		want, ok := byCode[c]
		if !ok {
			t.Fatalf("the table lacks %s", c)
		}
		if got := retryable(status.Error(c, "x")); got != want {
			t.Errorf("retryable(%s) = %v, want %v", c, got, want)
		}
		// Wrapped by the caller, the status still decides (status.Error
		// gives nil for OK: nothing to wrap).
		if c == codes.OK {
			continue
		}
		if got := retryable(fmt.Errorf("send: %w", status.Error(c, "x"))); got != want {
			t.Errorf("retryable(wrapped %s) = %v, want %v", c, got, want)
		}
	}

	others := []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"plain transport error", &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}, true},
		{"plain error", errors.New("http2: protocol error"), true},
		{"context.Canceled from the caller", context.Canceled, false},
		{"wrapped context.Canceled", fmt.Errorf("send: %w", context.Canceled), false},
		{"context.DeadlineExceeded of the caller's context", context.DeadlineExceeded, false},
	}
	for _, tc := range others {
		if got := retryable(tc.err); got != tc.want {
			t.Errorf("retryable(%s: %v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

// scripted is a PushService whose SendToUser fails with the next error of
// its script, then answers; it records every request it gets.
type scripted struct {
	heraldv1.UnimplementedPushServiceServer
	mu     sync.Mutex
	script []error
	block  bool // instead: wait until the call's context ends
	seen   []*heraldv1.SendToUserRequest
}

func (s *scripted) SendToUser(ctx context.Context, req *heraldv1.SendToUserRequest) (*heraldv1.SendToUserResponse, error) {
	s.mu.Lock()
	s.seen = append(s.seen, req)
	n := len(s.seen)
	s.mu.Unlock()
	if s.block {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if n <= len(s.script) {
		return nil, s.script[n-1]
	}
	return &heraldv1.SendToUserResponse{Deliveries: []*heraldv1.Delivery{
		{UserId: req.GetUserIds()[0], MessageId: "1-0", Replayed: n > 1},
	}}, nil
}

func (s *scripted) attempts() []*heraldv1.SendToUserRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*heraldv1.SendToUserRequest(nil), s.seen...)
}

// serve runs srv on an in-memory listener and returns a client for it.
func serve(t *testing.T, srv heraldv1.PushServiceServer) heraldv1.PushServiceClient {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	gs := grpc.NewServer()
	heraldv1.RegisterPushServiceServer(gs, srv)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return heraldv1.NewPushServiceClient(conn)
}

var keyed = &heraldv1.SendToUserRequest{
	UserIds:        []string{"alice"},
	Topic:          "billing.invoice",
	PayloadJson:    `{"invoice":42}`,
	IdempotencyKey: "invoice-42-paid",
}

// The outcomes seen during a Redis freeze that the old advice dropped
// (CANCELLED, a transport error) are retried with the same key.
func TestSendWithRetryRetriesTransientOutcomes(t *testing.T) {
	srv := &scripted{script: []error{
		status.Error(codes.Canceled, "stream reset"),
		status.Error(codes.Internal, "h2 protocol error"),
		status.Error(codes.Unknown, "connection reset"),
	}}
	resp, err := sendWithRetry(context.Background(), serve(t, srv), keyed, 5*time.Second, 8, nil)
	if err != nil {
		t.Fatalf("sendWithRetry: %v", err)
	}
	if !resp.GetDeliveries()[0].GetReplayed() {
		t.Errorf("answer %v, want the scripted replayed delivery", resp)
	}
	seen := srv.attempts()
	if len(seen) != 4 {
		t.Fatalf("%d attempts, want 4", len(seen))
	}
	for i, r := range seen {
		if r.GetIdempotencyKey() != keyed.GetIdempotencyKey() || r.GetPayloadJson() != keyed.GetPayloadJson() {
			t.Errorf("attempt %d sent %v, want the same request and key as the first", i+1, r)
		}
	}
}

func TestSendWithRetryStopsOnAWrongRequest(t *testing.T) {
	srv := &scripted{script: []error{status.Error(codes.InvalidArgument, "payload_json is not JSON")}}
	_, err := sendWithRetry(context.Background(), serve(t, srv), keyed, 5*time.Second, 8, nil)
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("err = %v, want INVALID_ARGUMENT", err)
	}
	if n := len(srv.attempts()); n != 1 {
		t.Fatalf("%d attempts, want 1", n)
	}
}

func TestSendWithRetryGivesUpAfterAttempts(t *testing.T) {
	srv := &scripted{script: []error{
		status.Error(codes.Unavailable, "a"), status.Error(codes.Unavailable, "b"), status.Error(codes.Unavailable, "c"),
	}}
	_, err := sendWithRetry(context.Background(), serve(t, srv), keyed, 5*time.Second, 2, nil)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("err = %v, want UNAVAILABLE", err)
	}
	if n := len(srv.attempts()); n != 2 {
		t.Fatalf("%d attempts, want 2", n)
	}
}

// A setup problem (here: the node wants a client certificate) is not
// retried, though its status (UNAVAILABLE) would be.
func TestSendWithRetryStopsOnASetupProblem(t *testing.T) {
	srv := &scripted{script: []error{
		status.Error(codes.Unavailable, `connection error: desc = "error reading server preface: remote error: tls: certificate required"`),
		status.Error(codes.Unavailable, "b"),
	}}
	setup := func(err error) bool {
		_, s := advice("SendToUser", err, settings{addr: "localhost:1", tlsCA: "ca.pem"})
		return s
	}
	_, err := sendWithRetry(context.Background(), serve(t, srv), keyed, 5*time.Second, 8, setup)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("err = %v, want UNAVAILABLE", err)
	}
	if n := len(srv.attempts()); n != 1 {
		t.Fatalf("%d attempts, want 1", n)
	}
	// A refused connection is retried: the node may be restarting.
	srv = &scripted{script: []error{
		status.Error(codes.Unavailable, `connection error: desc = "transport: Error while dialing: dial tcp 127.0.0.1:1: connect: connection refused"`),
	}}
	if _, err := sendWithRetry(context.Background(), serve(t, srv), keyed, 5*time.Second, 8, setup); err != nil {
		t.Fatalf("sendWithRetry: %v", err)
	}
	if n := len(srv.attempts()); n != 2 {
		t.Fatalf("%d attempts, want 2", n)
	}
}

// CANCELLED because the caller cancelled its own context is not retried.
func TestSendWithRetryStopsWhenTheCallerCancels(t *testing.T) {
	srv := &scripted{block: true}
	client := serve(t, srv)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	_, err := sendWithRetry(ctx, client, keyed, 5*time.Second, 8, nil)
	if status.Code(err) != codes.Canceled || !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want CANCELLED and context.Canceled", err)
	}
	if n := len(srv.attempts()); n != 1 {
		t.Fatalf("%d attempts, want 1", n)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("took %v after the cancel", d)
	}
}

// The retry rule is stated once and repeated word for word in every README
// that gives retry advice; its two lists name every status code once, and
// retryable follows them.
func TestREADMEsStateTheRetryRule(t *testing.T) {
	readmes := []string{
		"../../../../README.md",   // the project's
		"../../README.md",         // this module's
		"../../../java/README.md", // the Java client's
		"../../../js/README.md",   // the Node/browser client's
	}
	var rule string
	for i, path := range readmes {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		text := string(b)
		begin := strings.Index(text, "<!-- retry-rule:begin -->")
		end := strings.Index(text, "<!-- retry-rule:end -->")
		if begin < 0 || end < begin || strings.Count(text, "<!-- retry-rule:begin -->") != 1 {
			t.Fatalf("%s: no single retry-rule:begin/end block", path)
		}
		block := text[begin:end]
		if i == 0 {
			rule = block
		} else if block != rule {
			t.Errorf("%s: the retry rule differs from %s's", path, readmes[0])
		}
	}

	retryItem := strings.Index(rule, "\n- **retry**")
	neverItem := strings.Index(rule, "\n- **never retry**")
	neverEnd := strings.Index(rule, "\n\n"+"Without an idempotency key")
	if retryItem < 0 || neverItem < retryItem || neverEnd < neverItem {
		t.Fatalf("the retry rule lacks its retry / never retry lists:\n%s", rule)
	}
	named := regexp.MustCompile("`([A-Z_]+)`")
	listed := map[codes.Code]bool{}
	for _, list := range []struct {
		text  string
		retry bool
	}{{rule[retryItem:neverItem], true}, {rule[neverItem:neverEnd], false}} {
		for _, m := range named.FindAllStringSubmatch(list.text, -1) {
			var c codes.Code
			if err := c.UnmarshalJSON([]byte(`"` + m[1] + `"`)); err != nil {
				t.Fatalf("the retry rule names %s, not a status code", m[1])
			}
			if prev, dup := listed[c]; dup {
				if prev != list.retry {
					t.Errorf("the retry rule lists %s both to retry and not to", m[1])
				}
				continue // UNKNOWN, INTERNAL, UNAVAILABLE again, for transport errors
			}
			listed[c] = list.retry
			if got := retryable(status.Error(c, "x")); got != list.retry {
				t.Errorf("the retry rule says retry %s = %v, retryable says %v", m[1], list.retry, got)
			}
		}
	}
	for c := codes.Canceled; c <= codes.Unauthenticated; c++ {
		if _, ok := listed[c]; !ok {
			t.Errorf("the retry rule does not say whether to retry %s", c)
		}
	}
}

// This module's README shows retryable's code word for word.
func TestREADMEShowsRetryable(t *testing.T) {
	fn := regexp.MustCompile(`(?s)\nfunc retryable\(err error\) bool \{\n.*?\n\}\n`)
	var got []string
	for _, path := range []string{"main.go", "../../README.md"} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		m := fn.FindAllString(string(b), -1)
		if len(m) != 1 {
			t.Fatalf("%s: %d retryable functions, want 1", path, len(m))
		}
		got = append(got, m[0])
	}
	if got[0] != got[1] {
		t.Errorf("README.md's retryable differs from main.go's:\n%s\nmain.go:\n%s", got[1], got[0])
	}
}
