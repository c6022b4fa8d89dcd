package dev.herald.example;

import dev.herald.v1.Delivery;
import dev.herald.v1.PushServiceGrpc;
import dev.herald.v1.SendBatchRequest;
import dev.herald.v1.SendBatchResponse;
import dev.herald.v1.SendBatchResult;
import dev.herald.v1.SendToUserRequest;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.MetadataUtils;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;
import java.util.concurrent.TimeUnit;

/**
 * Pushes many personalised notifications in one SendBatch call: each item has
 * its own recipient, payload and idempotency key, and gets a result of its
 * own. A backend sending thousands of messages a second sends batches (up to
 * 1,000 items, 10,000 recipients and 1 MiB of payloads per call) instead of
 * one call per message.
 *
 * <p>Every item carries a key ("&lt;prefix&gt;-&lt;i&gt;"), so a batch can be
 * sent again as it is: a whole call that fails with a retryable status is sent
 * again whole, items that fail with a retryable code are sent again alone, and
 * items an earlier attempt already served come back with {@code replayed} set.
 * Each user gets each message exactly once. The example then sends the whole
 * batch once more, as a rerun of the job would, and checks that every item
 * comes back replayed.
 *
 * <p>Usage: {@code BatchExample [host:port] [users] [key-prefix]}; the address
 * defaults to $HERALD_GRPC_ADDR, then 127.0.0.1:50051; users to 100 (at most
 * 1,000); the prefix to a fresh random one. HERALD_API_KEY: the key a node
 * with --api-keys wants (scope send). Plaintext only; see SendExample for TLS.
 *
 * <pre>mvn -q compile exec:java -Dexec.mainClass=dev.herald.example.BatchExample -Dexec.args="127.0.0.1:50051 100"</pre>
 */
public final class BatchExample {
  private BatchExample() {}

  /** The codes after which the same items with the same keys are sent again. */
  static boolean retryable(Status.Code c) {
    switch (c) {
      case UNAVAILABLE:
      case DEADLINE_EXCEEDED:
      case CANCELLED:
      case RESOURCE_EXHAUSTED:
      case ABORTED:
      case INTERNAL:
      case UNKNOWN:
      case DATA_LOSS:
        return true;
      default:
        return false;
    }
  }

  public static void main(String[] args) throws Exception {
    String env = System.getenv("HERALD_GRPC_ADDR");
    String addr = args.length > 0 ? args[0] : (env != null && !env.isEmpty() ? env : "127.0.0.1:50051");
    int users = args.length > 1 ? Integer.parseInt(args[1]) : 100;
    String prefix = args.length > 2 ? args[2] : "batch-" + UUID.randomUUID();
    ManagedChannel channel = ManagedChannelBuilder.forTarget(addr).usePlaintext().build();
    try {
      PushServiceGrpc.PushServiceBlockingStub stub = PushServiceGrpc.newBlockingStub(channel);
      String key = System.getenv("HERALD_API_KEY");
      if (key != null && !key.isEmpty()) {
        Metadata md = new Metadata();
        md.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + key);
        stub = stub.withInterceptors(MetadataUtils.newAttachHeadersInterceptor(md));
      }
      List<SendToUserRequest> items = new ArrayList<>();
      for (int i = 0; i < users; i++) {
        items.add(SendToUserRequest.newBuilder()
            .addUserIds(prefix + "-user-" + i)
            .setTopic("example.digest")
            .setPayloadJson("{\"text\":\"your daily digest\",\"n\":" + i + "}")
            .setIdempotencyKey(prefix + "-" + i)
            .build());
      }
      SendBatchResult[] first = sendAll(stub, items, 8);
      int online = 0;
      for (SendBatchResult r : first) {
        if (r.getDeliveries(0).getOnline()) {
          online++;
        }
      }
      System.out.printf("batch: %d items sent, %d recipients online%n", first.length, online);
      SendBatchResult[] again = sendAll(stub, items, 8);
      for (int i = 0; i < again.length; i++) {
        Delivery d = again[i].getDeliveries(0);
        if (!d.getReplayed() || !d.getMessageId().equals(first[i].getDeliveries(0).getMessageId())) {
          throw new IllegalStateException("item " + i + " was sent again: " + d);
        }
      }
      System.out.printf("batch again: %d items replayed, none sent twice%n", again.length);
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  /**
   * Sends the items in one SendBatch and retries what failed with a retryable
   * status (the same items, the same keys) until every item has its result.
   */
  static SendBatchResult[] sendAll(PushServiceGrpc.PushServiceBlockingStub stub, List<SendToUserRequest> items, int attempts)
      throws InterruptedException {
    SendBatchResult[] results = new SendBatchResult[items.size()];
    List<Integer> todo = new ArrayList<>();
    for (int i = 0; i < items.size(); i++) {
      todo.add(i);
    }
    long backoffMs = 100;
    for (int a = 1; ; a++) {
      SendBatchRequest.Builder req = SendBatchRequest.newBuilder();
      for (int i : todo) {
        req.addItems(items.get(i));
      }
      List<Integer> left = new ArrayList<>();
      try {
        SendBatchResponse resp = stub.withDeadlineAfter(5, TimeUnit.SECONDS).sendBatch(req.build());
        for (int k = 0; k < resp.getResultsCount(); k++) {
          SendBatchResult r = resp.getResults(k);
          Status.Code code = Status.fromCodeValue(r.getErrorCode()).getCode();
          if (code == Status.Code.OK) {
            results[todo.get(k)] = r;
          } else if (retryable(code)) {
            left.add(todo.get(k));
          } else {
            throw new IllegalStateException("item " + todo.get(k) + ": " + code + ": " + r.getErrorMessage());
          }
        }
      } catch (StatusRuntimeException e) {
        if (!retryable(e.getStatus().getCode())) {
          throw e;
        }
        System.err.printf("attempt %d: SendBatch: %s; the whole batch again%n", a, e.getStatus());
        left = todo;
      }
      if (left.isEmpty()) {
        return results;
      }
      if (a >= attempts) {
        throw new IllegalStateException(left.size() + " items still failing after " + a + " attempts");
      }
      todo = left;
      Thread.sleep(backoffMs);
      backoffMs *= 2;
    }
  }
}
