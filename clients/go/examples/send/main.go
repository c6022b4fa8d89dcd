// Command send pushes a message to a user through Herald's gRPC control API,
// asks whether the user is online and how many messages they have unread,
// and shows how a rejected request (INVALID_ARGUMENT) is handled.
//
//	go run ./examples/send -grpc-addr 127.0.0.1:50051 -user alice -payload '{"hello":"world"}'
//
// The send carries an idempotency key (-key, default a fresh random UUID;
// a business event id such as "invoice-42-paid" is better, since a re-run of
// the same job then reuses it) and is retried with the same key on every
// outcome that does not say the request itself is wrong (see retryable):
// each attempt has its own deadline (-timeout), at most -attempts attempts,
// with exponential backoff between them. Herald stores and pushes a keyed message once per recipient, however
// many attempts reach it; a repeat is answered with the first call's
// delivery and replayed=true. The example then sends the same request again,
// as a retry after a lost answer would, to show such an answer.
//
// Every setting has a flag and an environment variable:
//
//	-grpc-addr        HERALD_GRPC_ADDR        host:port of the node's gRPC listener (default 127.0.0.1:50051)
//	-api-key          HERALD_API_KEY          the key a node with --api-keys name:scope:key wants: its key part
//	                                          (scope send+read or admin: the example sends and also reads)
//	-tls-ca           HERALD_TLS_CA           PEM file of the CA that signed the node's certificate (--tls-cert)
//	-tls-client-cert  HERALD_TLS_CLIENT_CERT  PEM client certificate, for a node with --grpc-tls-client-ca
//	-tls-client-key   HERALD_TLS_CLIENT_KEY   its PEM private key
//
// Without -tls-ca and a client certificate the connection is plaintext:
//
//	go run ./examples/send -grpc-addr push.internal:50051 -tls-ca ca.pem \
//	    -tls-client-cert client.pem -tls-client-key client.key -api-key "$HERALD_API_KEY"
//
// When a call fails, the example says what to change (see advice): a
// plaintext client at a TLS node, a certificate not trusted, a client
// certificate missing, a key missing or lacking a scope, no node there.
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log"
	mathrand "math/rand/v2"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	heraldv1 "github.com/herald-push/herald/clients/go/heraldv1"
)

func main() {
	defAddr := os.Getenv("HERALD_GRPC_ADDR")
	if defAddr == "" {
		defAddr = "127.0.0.1:50051"
	}
	var s settings
	flag.StringVar(&s.addr, "grpc-addr", defAddr, "host:port of the node's gRPC listener; default $HERALD_GRPC_ADDR, then 127.0.0.1:50051")
	flag.StringVar(&s.apiKey, "api-key", os.Getenv("HERALD_API_KEY"), "API key, if the node requires one: the key part of the node's --api-keys name:scope:key; default $HERALD_API_KEY")
	flag.StringVar(&s.tlsCA, "tls-ca", os.Getenv("HERALD_TLS_CA"), "PEM file of the CA that signed the node's certificate: connect over TLS; default $HERALD_TLS_CA (unset, and no client certificate: plaintext)")
	flag.StringVar(&s.clientCert, "tls-client-cert", os.Getenv("HERALD_TLS_CLIENT_CERT"), "PEM client certificate, for a node that requires one (--grpc-tls-client-ca); default $HERALD_TLS_CLIENT_CERT")
	flag.StringVar(&s.clientKey, "tls-client-key", os.Getenv("HERALD_TLS_CLIENT_KEY"), "PEM private key of -tls-client-cert; default $HERALD_TLS_CLIENT_KEY")
	flag.StringVar(&s.tlsServerName, "tls-server-name", os.Getenv("HERALD_TLS_SERVER_NAME"), "name to check the node's certificate against; default the host of -grpc-addr")
	user := flag.String("user", "alice", "recipient user id")
	topic := flag.String("topic", "example.greeting", "message topic")
	payload := flag.String("payload", `{"text":"hello from Go"}`, "message payload (any JSON value)")
	key := flag.String("key", "", "idempotency key of this send (1 to 128 printable ASCII characters); default a fresh random UUID")
	timeout := flag.Duration("timeout", 5*time.Second, "deadline for each call (for the send: for each attempt)")
	attempts := flag.Int("attempts", 8, "attempts of the send, retried with the same key on UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNKNOWN, DATA_LOSS and transport errors")
	flag.Parse()
	log.SetFlags(0)
	if *key == "" {
		*key = newUUID()
	}

	conn, err := connect(s)
	if err != nil {
		log.Fatalf("connect %s: %v", s.addr, err)
	}
	defer conn.Close()
	client := heraldv1.NewPushServiceClient(conn)
	fail := func(what string, err error) { failed(what, err, s) }
	// A setup problem (TLS, certificates, a key, the address) is not retried:
	// the call never reached the node, and it would fail the same way again.
	setupProblem := func(err error) bool { _, setup := advice("SendToUser", err, s); return setup }

	call := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), *timeout)
	}

	// 1. Send, with an idempotency key, retried with the same key.
	req := &heraldv1.SendToUserRequest{
		UserIds:        []string{*user},
		Topic:          *topic,
		PayloadJson:    *payload,
		IdempotencyKey: *key,
	}
	fmt.Printf("idempotency key %s\n", *key)
	sent, err := sendWithRetry(context.Background(), client, req, *timeout, *attempts, setupProblem)
	if err != nil {
		fail("SendToUser", err)
	}
	printDeliveries("sent", sent)

	// 1b. The same request again, as a retry whose first attempt went
	// through but whose answer was lost: nothing is stored or pushed, the
	// answer is the first call's delivery with replayed=true.
	again, err := sendWithRetry(context.Background(), client, req, *timeout, *attempts, setupProblem)
	if err != nil {
		fail("SendToUser (repeat)", err)
	}
	printDeliveries("repeat", again)
	for i, d := range again.GetDeliveries() {
		if !d.GetReplayed() || d.GetMessageId() != sent.GetDeliveries()[i].GetMessageId() {
			log.Fatalf("the repeat with key %s was not replayed: %v", *key, d)
		}
	}

	// 2. Presence.
	ctx, cancel := call()
	online, err := client.IsOnline(ctx, &heraldv1.IsOnlineRequest{UserIds: []string{*user}})
	cancel()
	if err != nil {
		fail("IsOnline", err)
	}
	for _, p := range online.GetUsers() {
		fmt.Printf("%s online=%v connections=%d\n", p.GetUserId(), p.GetOnline(), p.GetConnections())
	}

	// 3. Unread count.
	ctx, cancel = call()
	unread, err := client.UnreadCount(ctx, &heraldv1.UnreadCountRequest{UserId: *user})
	cancel()
	if err != nil {
		fail("UnreadCount", err)
	}
	fmt.Printf("%s has %d unread\n", *user, unread.GetCount())

	// 3b. The message center: the newest page, then one message read on
	// its own (every device of the user gets the new count and a
	// "changed" frame).
	ctx, cancel = call()
	page, err := client.ListMessages(ctx, &heraldv1.ListMessagesRequest{UserId: *user, Limit: 5})
	cancel()
	if err != nil {
		fail("ListMessages", err)
	}
	for _, m := range page.GetMessages() {
		fmt.Printf("  %s topic=%s read=%v %s\n", m.GetMessageId(), m.GetTopic(), m.GetRead(), m.GetPayloadJson())
	}
	if len(page.GetMessages()) > 0 {
		ctx, cancel = call()
		read, err := client.MarkRead(ctx, &heraldv1.MarkReadRequest{
			UserId:     *user,
			MessageIds: []string{page.GetMessages()[0].GetMessageId()},
		})
		cancel()
		if err != nil {
			fail("MarkRead (one message)", err)
		}
		fmt.Printf("read %v; %s has %d unread\n", read.GetChangedMessageIds(), *user, read.GetUnread())
	}

	// 4. A request the server must reject: the payload is not JSON.
	ctx, cancel = call()
	_, err = client.SendToUser(ctx, &heraldv1.SendToUserRequest{
		UserIds:     []string{*user},
		Topic:       *topic,
		PayloadJson: "{this is not json",
	})
	cancel()
	switch status.Code(err) {
	case codes.InvalidArgument:
		st := status.Convert(err)
		fmt.Printf("rejected as expected: code=%s message=%q\n", st.Code(), st.Message())
	case codes.OK:
		log.Fatal("the server accepted a non-JSON payload")
	default:
		fail("SendToUser (bad payload)", err)
	}
}

// connect makes the client connection: plaintext (a node on loopback or a
// private network), or TLS when s has a CA file or a client certificate.
// TLS verifies the node's certificate against the CA file (without one,
// against the system's roots) and presents the client certificate, if any,
// to a node that requires one (--grpc-tls-client-ca). The API key goes with
// every call as "authorization: Bearer <key>".
func connect(s settings) (*grpc.ClientConn, error) {
	creds := insecure.NewCredentials()
	if s.useTLS() {
		cfg, err := tlsConfig(s)
		if err != nil {
			return nil, err
		}
		creds = credentials.NewTLS(cfg)
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if s.apiKey != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(s.apiKey)))
	}
	return grpc.NewClient(s.addr, opts...)
}

// tlsConfig trusts the CA file (or, without one, the system's roots) and
// carries the client certificate, if any.
func tlsConfig(s settings) (*tls.Config, error) {
	cfg := &tls.Config{ServerName: s.tlsServerName, MinVersion: tls.VersionTLS12}
	if s.tlsCA != "" {
		pem, err := os.ReadFile(s.tlsCA)
		if err != nil {
			return nil, fmt.Errorf("-tls-ca / HERALD_TLS_CA: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("-tls-ca / HERALD_TLS_CA: no PEM certificate in %s", s.tlsCA)
		}
	}
	if (s.clientCert == "") != (s.clientKey == "") {
		return nil, errors.New("set both -tls-client-cert and -tls-client-key (HERALD_TLS_CLIENT_CERT, HERALD_TLS_CLIENT_KEY), or neither")
	}
	if s.clientCert != "" {
		cert, err := tls.LoadX509KeyPair(s.clientCert, s.clientKey)
		if err != nil {
			return nil, fmt.Errorf("client certificate (-tls-client-cert, -tls-client-key): %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// sendWithRetry calls SendToUser until it answers, retrying with the very
// same request, so with the same idempotency key, on every error retryable
// accepts: the failed attempt may have stored and pushed the message although
// its answer never arrived (a lost connection, Redis frozen past the
// deadline), and the key makes Herald answer the retry with that delivery
// (replayed=true) instead of pushing the message again. Each attempt gets its
// own deadline; between attempts it waits 100 ms, 200 ms, 400 ms, ... (at
// most 2 s), each with up to half taken off at random. An error that says the
// request itself is wrong (INVALID_ARGUMENT, UNAUTHENTICATED, ...) comes back
// at once: a retry would fail the same way. ctx bounds the whole loop: once it
// is done (the caller cancelled, or its deadline passed) nothing is retried.
// Nor is an error for which setupProblem (if not nil) is true: a connection
// that failed for want of the right TLS settings, say, fails the same way
// every time, and its request never reached the node.
func sendWithRetry(ctx context.Context, client heraldv1.PushServiceClient, req *heraldv1.SendToUserRequest,
	perAttempt time.Duration, attempts int, setupProblem func(error) bool) (*heraldv1.SendToUserResponse, error) {
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, perAttempt)
		resp, err := client.SendToUser(actx, req)
		cancel()
		if err == nil || !retryable(err) {
			return resp, err // success, or the request itself is wrong: a retry will not fix it
		}
		if setupProblem != nil && setupProblem(err) {
			return nil, err // a retry would fail the same way
		}
		if ctx.Err() != nil {
			// The CANCELLED or DEADLINE_EXCEEDED came from ctx, the caller's
			// own context: the caller gave up, so do not retry.
			return nil, errors.Join(err, ctx.Err())
		}
		if attempt >= attempts {
			return nil, fmt.Errorf("after %d attempts: %w", attempt, err)
		}
		wait := backoff - mathrand.N(backoff/2)
		log.Printf("SendToUser attempt %d: %s (%s); retrying in %v with the same key",
			attempt, status.Code(err), status.Convert(err).Message(), wait.Round(time.Millisecond))
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil, errors.Join(err, ctx.Err())
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// retryable reports whether a keyed SendToUser or Broadcast that failed with
// err may be sent again, with the same request and the same idempotency key:
// on every outcome that does not say the request itself is wrong (the retry
// rule of README.md). Only keyed calls are retried this way: without a key a
// retry may deliver the message twice.
//
// A CANCELLED status is retryable: during a Redis freeze a call can end
// CANCELLED although the caller cancelled nothing. When the caller's own
// context ended, grpc-go also answers CANCELLED (or DEADLINE_EXCEEDED), which
// err alone cannot tell apart; check the context too, as sendWithRetry does.
// A bare context.Canceled or context.DeadlineExceeded (not a gRPC status) is
// the caller's own context and is not retryable. Any other error that is not
// a gRPC status comes from the transport (a reset connection) and is
// retryable.
//
// The Go client's README.md shows this code word for word (main_test.go
// checks).
func retryable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false // success, or your own context ended (not a gRPC status)
	}
	st, ok := status.FromError(err)
	if !ok {
		return true // not a gRPC status: a transport error
	}
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.ResourceExhausted,
		codes.Aborted, codes.Internal, codes.Unknown, codes.DataLoss:
		return true
	}
	return false // InvalidArgument, Unauthenticated, PermissionDenied, ...: the request is wrong
}

func printDeliveries(what string, resp *heraldv1.SendToUserResponse) {
	for _, d := range resp.GetDeliveries() {
		replayed := ""
		if d.GetReplayed() {
			replayed = " replayed (an earlier call with this key delivered it; nothing was pushed now)"
		}
		fmt.Printf("%s %s to %s (online=%v)%s\n", what, d.GetMessageId(), d.GetUserId(), d.GetOnline(), replayed)
	}
}

// newUUID returns a random (version 4) UUID, a good idempotency key when
// the send has no business event id of its own.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		log.Fatalf("crypto/rand: %v", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// bearer sends "authorization: Bearer <key>" with every call.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity is false so the key also works on a plaintext
// loopback node; over a network, use TLS (-tls-ca) so the key never travels
// in the clear.
func (b bearer) RequireTransportSecurity() bool { return false }

// failed reports a failed call and exits: what to change, when advice
// knows, then the status code and the node's (or the transport's) message.
func failed(what string, err error, s settings) {
	st := status.Convert(err)
	if hint, _ := advice(what, err, s); hint != "" {
		log.Fatalf("%s failed: %s\n  (%s: %s)", what, hint, st.Code(), st.Message())
	}
	log.Fatalf("%s failed: %s: %s", what, st.Code(), st.Message())
}
