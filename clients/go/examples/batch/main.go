// Command batch pushes many personalised notifications in one SendBatch
// call: each item has its own recipient, payload and idempotency key, and
// gets a result of its own.
//
//	go run ./examples/batch -grpc-addr 127.0.0.1:50051 -users 100 -prefix run-42
//
// A backend sending thousands of messages a second sends them in batches
// (up to 1,000 items, 10,000 recipients and 1 MiB of payloads per call)
// instead of one call each: one round trip, and the node stores the whole
// batch in one round trip to Redis.
//
// Retries: every item carries a key ("<prefix>-<i>"), so a batch can be
// sent again as it is. When the whole call fails with a retryable status,
// the whole batch is sent again; when single items fail with a retryable
// code, those items are. Items that an earlier attempt already served are
// answered with replayed=true: each user gets each message exactly once.
// The example then sends the whole batch once more, as a job rerun would,
// and checks that every item comes back replayed.
//
//	-grpc-addr  HERALD_GRPC_ADDR  host:port of the node's gRPC listener (default 127.0.0.1:50051)
//	-api-key    HERALD_API_KEY    the key a node with --api-keys wants (scope send)
//
// Plaintext only; see examples/send for TLS and client certificates.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	heraldv1 "github.com/herald-push/herald/clients/go/heraldv1"
)

// retryable: the codes after which the same items with the same keys are
// sent again (as for SendToUser; see the proto's idempotency_key).
func retryable(c codes.Code) bool {
	switch c {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.ResourceExhausted,
		codes.Aborted, codes.Internal, codes.Unknown, codes.DataLoss:
		return true
	}
	return false
}

func main() {
	addr := os.Getenv("HERALD_GRPC_ADDR")
	if addr == "" {
		addr = "127.0.0.1:50051"
	}
	flag.StringVar(&addr, "grpc-addr", addr, "host:port of the node's gRPC listener; default $HERALD_GRPC_ADDR, then 127.0.0.1:50051")
	apiKey := flag.String("api-key", os.Getenv("HERALD_API_KEY"), "API key, if the node requires one; default $HERALD_API_KEY")
	users := flag.Int("users", 100, "recipients user-0 ... user-<n-1> (one item each, at most 1000)")
	prefix := flag.String("prefix", "", "idempotency key prefix of this run; default a fresh random one")
	attempts := flag.Int("attempts", 8, "attempts per batch")
	flag.Parse()
	log.SetFlags(0)
	if *prefix == "" {
		b := make([]byte, 8)
		if _, err := rand.Read(b); err != nil {
			log.Fatal(err)
		}
		*prefix = "batch-" + hex.EncodeToString(b)
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("connect %s: %v", addr, err)
	}
	defer conn.Close()
	client := heraldv1.NewPushServiceClient(conn)
	ctx := context.Background()
	if *apiKey != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+*apiKey)
	}

	items := make([]*heraldv1.SendToUserRequest, *users)
	for i := range items {
		items[i] = &heraldv1.SendToUserRequest{
			UserIds:        []string{fmt.Sprintf("%s-user-%d", *prefix, i)},
			Topic:          "example.digest",
			PayloadJson:    fmt.Sprintf(`{"text":"your daily digest","n":%d}`, i),
			IdempotencyKey: fmt.Sprintf("%s-%d", *prefix, i),
		}
	}
	results, err := sendAll(ctx, client, items, *attempts)
	if err != nil {
		log.Fatal(err)
	}
	online := 0
	for _, r := range results {
		if r.Deliveries[0].Online {
			online++
		}
	}
	fmt.Printf("batch: %d items sent, %d recipients online\n", len(results), online)

	// The same batch again (a rerun of the job): nothing is sent twice.
	again, err := sendAll(ctx, client, items, *attempts)
	if err != nil {
		log.Fatal(err)
	}
	for i, r := range again {
		d := r.Deliveries[0]
		if !d.Replayed || d.MessageId != results[i].Deliveries[0].MessageId {
			log.Fatalf("item %d was sent again: %v", i, d)
		}
	}
	fmt.Printf("batch again: %d items replayed, none sent twice\n", len(again))
}

// sendAll sends the items in one SendBatch and retries what failed with a
// retryable status, the same items with the same keys, until every item
// has its result. An item refused for good (INVALID_ARGUMENT, ...) is an
// error.
func sendAll(ctx context.Context, c heraldv1.PushServiceClient, items []*heraldv1.SendToUserRequest, attempts int) ([]*heraldv1.SendBatchResult, error) {
	results := make([]*heraldv1.SendBatchResult, len(items))
	todo := make([]int, len(items))
	for i := range todo {
		todo[i] = i
	}
	backoff := 100 * time.Millisecond
	for a := 1; ; a++ {
		batch := make([]*heraldv1.SendToUserRequest, len(todo))
		for k, i := range todo {
			batch[k] = items[i]
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := c.SendBatch(cctx, &heraldv1.SendBatchRequest{Items: batch})
		cancel()
		var left []int
		switch {
		case err != nil && !retryable(status.Code(err)):
			return nil, fmt.Errorf("SendBatch: %v", err)
		case err != nil:
			log.Printf("attempt %d: SendBatch: %v; the whole batch again", a, err)
			left = todo
		default:
			for k, r := range resp.Results {
				code := codes.Code(r.ErrorCode)
				switch {
				case code == codes.OK:
					results[todo[k]] = r
				case retryable(code):
					left = append(left, todo[k])
				default:
					return nil, fmt.Errorf("item %d: %v: %s", todo[k], code, r.ErrorMessage)
				}
			}
		}
		if len(left) == 0 {
			return results, nil
		}
		if a >= attempts {
			return nil, fmt.Errorf("%d items still failing after %d attempts", len(left), a)
		}
		todo = left
		time.Sleep(backoff)
		backoff *= 2
	}
}
