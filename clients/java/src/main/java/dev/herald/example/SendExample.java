package dev.herald.example;

import dev.herald.v1.Delivery;
import dev.herald.v1.IsOnlineRequest;
import dev.herald.v1.IsOnlineResponse;
import dev.herald.v1.ListMessagesRequest;
import dev.herald.v1.ListMessagesResponse;
import dev.herald.v1.MarkReadRequest;
import dev.herald.v1.MarkReadResponse;
import dev.herald.v1.PushServiceGrpc;
import dev.herald.v1.SendToUserRequest;
import dev.herald.v1.SendToUserResponse;
import dev.herald.v1.StoredMessage;
import dev.herald.v1.UnreadCountRequest;
import dev.herald.v1.UserPresence;
import io.grpc.ChannelCredentials;
import io.grpc.Context;
import io.grpc.Grpc;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.stub.MetadataUtils;
import java.util.UUID;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;

/**
 * Pushes one message to a user over Herald's control API, asks whether the
 * user is online and how many messages they have unread, then shows how an
 * INVALID_ARGUMENT error arrives.
 *
 * <p>The send carries an idempotency key and is retried with the same key on
 * every outcome that does not say the request itself is wrong (see
 * {@link #sendWithRetry} and {@link #retryable(Throwable)}): Herald
 * stores and pushes a keyed message once per recipient however many attempts
 * reach it, and answers a repeat with the first call's delivery and
 * {@code replayed} set. The example sends the same request a second time, as
 * a retry after a lost answer would, to show such an answer.
 *
 * <p>Usage: {@code SendExample [host:port] [user-id] [idempotency-key]}. The
 * address defaults to $HERALD_GRPC_ADDR, then to 127.0.0.1:50051; the user to
 * "alice"; the key to a fresh random UUID (a business event id such as
 * "invoice-42-paid" is better: a re-run of the same job then reuses it).
 * When the node runs with an API key (--api-key), put it in $HERALD_API_KEY
 * (scope send+read or admin: the example also calls IsOnline and
 * UnreadCount). When it runs with TLS (--tls-cert), put the PEM file of the
 * CA that signed its certificate in $HERALD_TLS_CA.
 */
public final class SendExample {

    /** Attempts of a send (retried as {@link #retryable(Throwable)} says), and the deadline of each. */
    private static final int SEND_ATTEMPTS = 8;
    private static final long ATTEMPT_DEADLINE_MS = 5_000;

    private SendExample() {}

    /**
     * Plaintext (a node on loopback or a private network), or, with a CA
     * file, TLS that verifies the node's certificate against that CA.
     */
    static ManagedChannel channel(String addr, String caFile) {
        if (caFile == null || caFile.isBlank()) {
            return ManagedChannelBuilder.forTarget(addr).usePlaintext().build();
        }
        try {
            ChannelCredentials tls = TlsChannelCredentials.newBuilder()
                    .trustManager(new java.io.File(caFile))
                    .build();
            return Grpc.newChannelBuilder(addr, tls).build();
        } catch (java.io.IOException e) {
            throw new IllegalArgumentException("cannot read the TLS CA file " + caFile + ": " + e.getMessage(), e);
        }
    }

    public static void main(String[] args) throws InterruptedException {
        String addr = args.length > 0 ? args[0] : envOr("HERALD_GRPC_ADDR", "127.0.0.1:50051");
        String user = args.length > 1 ? args[1] : "alice";
        // One key per logical send, made before the first attempt.
        String key = args.length > 2 ? args[2] : UUID.randomUUID().toString();

        ManagedChannel channel = channel(addr, System.getenv("HERALD_TLS_CA"));
        int exit = 0;
        try {
            PushServiceGrpc.PushServiceBlockingStub herald = PushServiceGrpc.newBlockingStub(channel);
            String apiKey = System.getenv("HERALD_API_KEY");
            if (apiKey != null && !apiKey.isBlank()) {
                // Without it such a node answers UNAUTHENTICATED.
                Metadata md = new Metadata();
                md.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + apiKey);
                herald = herald.withInterceptors(MetadataUtils.newAttachHeadersInterceptor(md));
            }

            SendToUserRequest request = SendToUserRequest.newBuilder()
                    .addUserIds(user)
                    .setTopic("billing.invoice")
                    .setPayloadJson("{\"invoice\":42,\"amount\":\"19.99\"}")
                    .setIdempotencyKey(key)
                    .build();
            System.out.println("idempotency key " + key);
            SendToUserResponse sent = sendWithRetry(herald, request);
            print("sent", sent);

            // The same request again, as a retry whose first attempt went
            // through but whose answer was lost: nothing is stored or pushed,
            // the answer is the first call's delivery with replayed=true.
            SendToUserResponse again = sendWithRetry(herald, request);
            print("repeat", again);
            for (int i = 0; i < again.getDeliveriesCount(); i++) {
                Delivery d = again.getDeliveries(i);
                if (!d.getReplayed() || !d.getMessageId().equals(sent.getDeliveries(i).getMessageId())) {
                    System.out.println("unexpected: the repeat with key " + key + " was not replayed: " + d);
                    exit = 1;
                }
            }

            IsOnlineResponse presence = herald.withDeadlineAfter(5, TimeUnit.SECONDS)
                    .isOnline(IsOnlineRequest.newBuilder().addUserIds(user).build());
            for (UserPresence p : presence.getUsersList()) {
                System.out.printf("%s online=%b connections=%d%n",
                        p.getUserId(), p.getOnline(), p.getConnections());
            }

            long unread = herald.withDeadlineAfter(5, TimeUnit.SECONDS)
                    .unreadCount(UnreadCountRequest.newBuilder().setUserId(user).build())
                    .getCount();
            System.out.printf("%s has %d unread%n", user, unread);

            // The message center: the newest page, then one message read on
            // its own (every device of the user gets the new count and a
            // "changed" frame).
            ListMessagesResponse page = herald.withDeadlineAfter(5, TimeUnit.SECONDS)
                    .listMessages(ListMessagesRequest.newBuilder().setUserId(user).setLimit(5).build());
            for (StoredMessage m : page.getMessagesList()) {
                System.out.printf("  %s topic=%s read=%b %s%n",
                        m.getMessageId(), m.getTopic(), m.getRead(), m.getPayloadJson());
            }
            if (page.getMessagesCount() > 0) {
                MarkReadResponse read = herald.withDeadlineAfter(5, TimeUnit.SECONDS)
                        .markRead(MarkReadRequest.newBuilder()
                                .setUserId(user)
                                .addMessageIds(page.getMessages(0).getMessageId())
                                .build());
                System.out.printf("read %s; %s has %d unread%n",
                        read.getChangedMessageIdsList(), user, read.getUnread());
            }

            // Errors arrive as StatusRuntimeException; this payload is not JSON.
            try {
                herald.withDeadlineAfter(5, TimeUnit.SECONDS)
                        .sendToUser(SendToUserRequest.newBuilder()
                                .addUserIds(user)
                                .setPayloadJson("this is not json")
                                .build());
                System.out.println("unexpected: the non-JSON payload was accepted");
                exit = 1;
            } catch (StatusRuntimeException e) {
                Status st = e.getStatus();
                if (st.getCode() == Status.Code.INVALID_ARGUMENT) {
                    System.out.printf("rejected as expected: %s: %s%n", st.getCode(), st.getDescription());
                } else {
                    throw e;
                }
            }
        } catch (StatusRuntimeException e) {
            // UNAVAILABLE: no node at that address (or it went away);
            // UNAUTHENTICATED: the node wants an API key ($HERALD_API_KEY);
            // DEADLINE_EXCEEDED: it did not answer in time. (The send was
            // retried already: see sendWithRetry.)
            Status st = e.getStatus();
            System.err.printf("herald call failed: %s: %s%n", st.getCode(), st.getDescription());
            exit = 1;
        } finally {
            channel.shutdown().awaitTermination(5, TimeUnit.SECONDS);
        }
        if (exit != 0) {
            System.exit(exit);
        }
    }

    /**
     * Calls SendToUser until it answers, retrying with the very same request,
     * so with the same idempotency key, on every error {@link
     * #retryable(Throwable)} accepts: the failed attempt may have stored and
     * pushed the message although its answer never arrived (a lost
     * connection, Redis frozen past the deadline), and the key makes Herald
     * answer the retry with that delivery (replayed=true) instead of pushing
     * it again. Every attempt has its own deadline; between attempts it waits
     * 100 ms, 200 ms, 400 ms, ... (at most 2 s), each with up to half taken
     * off at random. An error that says the request itself is wrong
     * (INVALID_ARGUMENT, UNAUTHENTICATED, ...) is thrown at once: a retry
     * would fail the same way. So is the CANCELLED of a call this thread's
     * caller cancelled (an interrupt, or a cancelled {@link Context}).
     */
    static SendToUserResponse sendWithRetry(PushServiceGrpc.PushServiceBlockingStub herald,
            SendToUserRequest request) throws InterruptedException {
        long backoffMs = 100;
        for (int attempt = 1; ; attempt++) {
            try {
                // withDeadlineAfter returns a new stub: a fresh deadline per attempt.
                return herald.withDeadlineAfter(ATTEMPT_DEADLINE_MS, TimeUnit.MILLISECONDS).sendToUser(request);
            } catch (StatusRuntimeException e) {
                if (!retryable(e) || attempt >= SEND_ATTEMPTS) {
                    throw e;
                }
                long waitMs = backoffMs - ThreadLocalRandom.current().nextLong(backoffMs / 2 + 1);
                System.err.printf("SendToUser attempt %d: %s (%s); retrying in %d ms with the same key%n",
                        attempt, e.getStatus().getCode(), e.getStatus().getDescription(), waitMs);
                Thread.sleep(waitMs);
                backoffMs = Math.min(2 * backoffMs, 2_000);
            }
        }
    }

    /**
     * Whether a keyed SendToUser or Broadcast that failed with {@code code}
     * may be sent again, with the same request and the same idempotency key:
     * on every outcome that does not say the request itself is wrong (the
     * retry rule of README.md). Only keyed calls are retried this way:
     * without a key a retry may deliver the message twice.
     */
    static boolean retryable(Status.Code code) {
        return switch (code) {
            case UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNKNOWN,
                    DATA_LOSS -> true;
            // OK, and the codes that say the request itself is wrong.
            case OK, INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, FAILED_PRECONDITION,
                    OUT_OF_RANGE, UNIMPLEMENTED, ALREADY_EXISTS -> false;
        };
    }

    /**
     * {@link #retryable(Status.Code)} for what a call threw. A CANCELLED
     * status is retryable (during a Redis freeze a call can end CANCELLED
     * although nobody cancelled it) unless the caller cancelled the call: this
     * thread was interrupted (grpc-java then throws CANCELLED caused by an
     * {@link InterruptedException}) or the current {@link Context} is
     * cancelled. A throwable that carries no status (a transport's
     * IOException) counts as UNKNOWN, so it is retryable.
     *
     * <p>README.md shows both retryable methods word for word (RetryableTest
     * checks).
     */
    static boolean retryable(Throwable t) {
        for (Throwable c = t; c != null; c = c.getCause()) {
            if (c instanceof InterruptedException) {
                return false; // this thread was interrupted: the caller gave up
            }
        }
        if (Thread.currentThread().isInterrupted() || Context.current().isCancelled()) {
            return false; // the caller cancelled the call
        }
        return retryable(Status.fromThrowable(t).getCode()); // no status (a transport's IOException): UNKNOWN
    }

    private static void print(String what, SendToUserResponse response) {
        for (Delivery d : response.getDeliveriesList()) {
            System.out.printf("%s to %s: message %s (online=%b)%s%n", what,
                    d.getUserId(), d.getMessageId(), d.getOnline(),
                    d.getReplayed() ? " replayed (an earlier call with this key delivered it; nothing was pushed now)" : "");
        }
    }

    private static String envOr(String name, String fallback) {
        String v = System.getenv(name);
        return v == null || v.isBlank() ? fallback : v;
    }
}
