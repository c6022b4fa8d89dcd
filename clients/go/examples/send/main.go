// Command send pushes a message to a user through Herald's gRPC control API,
// asks whether the user is online and how many messages they have unread,
// and shows how a rejected request (INVALID_ARGUMENT) is handled.
//
//	go run ./examples/send -addr 127.0.0.1:50051 -user alice -payload '{"hello":"world"}'
//
// The address defaults to $HERALD_GRPC_ADDR, or 127.0.0.1:50051. A node
// started with --api-key needs the key: -api-key, or $HERALD_API_KEY.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	heraldv1 "github.com/herald-push/herald/clients/go/heraldv1"
)

func main() {
	defAddr := os.Getenv("HERALD_GRPC_ADDR")
	if defAddr == "" {
		defAddr = "127.0.0.1:50051"
	}
	addr := flag.String("addr", defAddr, "Herald gRPC address (host:port); default $HERALD_GRPC_ADDR")
	user := flag.String("user", "alice", "recipient user id")
	topic := flag.String("topic", "example.greeting", "message topic")
	payload := flag.String("payload", `{"text":"hello from Go"}`, "message payload (any JSON value)")
	apiKey := flag.String("api-key", os.Getenv("HERALD_API_KEY"), "API key, if the node requires one; default $HERALD_API_KEY")
	timeout := flag.Duration("timeout", 5*time.Second, "deadline for each call")
	flag.Parse()
	log.SetFlags(0)

	// The control API is an internal listener without TLS.
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if *apiKey != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(*apiKey)))
	}
	conn, err := grpc.NewClient(*addr, opts...)
	if err != nil {
		log.Fatalf("connect %s: %v", *addr, err)
	}
	defer conn.Close()
	client := heraldv1.NewPushServiceClient(conn)

	call := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), *timeout)
	}

	// 1. Send.
	ctx, cancel := call()
	sent, err := client.SendToUser(ctx, &heraldv1.SendToUserRequest{
		UserIds:     []string{*user},
		Topic:       *topic,
		PayloadJson: *payload,
	})
	cancel()
	if err != nil {
		fail("SendToUser", err)
	}
	for _, d := range sent.GetDeliveries() {
		fmt.Printf("sent %s to %s (online=%v)\n", d.GetMessageId(), d.GetUserId(), d.GetOnline())
	}

	// 2. Presence.
	ctx, cancel = call()
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

// bearer sends "authorization: Bearer <key>" with every call.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity is false: the control API is plaintext on an
// internal network.
func (b bearer) RequireTransportSecurity() bool { return false }

// fail reports a gRPC error by its status code and exits.
func fail(what string, err error) {
	st := status.Convert(err)
	switch st.Code() {
	case codes.Unavailable:
		log.Fatalf("%s: Herald unavailable (is the node running? is its backend reachable?): %s", what, st.Message())
	case codes.Unauthenticated:
		log.Fatalf("%s: not authenticated (missing or wrong -api-key): %s", what, st.Message())
	default:
		log.Fatalf("%s: %s: %s", what, st.Code(), st.Message())
	}
}
