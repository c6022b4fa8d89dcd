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
import io.grpc.Context;
import io.grpc.Grpc;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.stub.MetadataUtils;
import java.io.File;
import java.io.IOException;
import java.util.UUID;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.function.Predicate;

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
 * The environment says how to reach the node:
 *
 * <ul>
 *   <li>HERALD_API_KEY: for a node with --api-keys name:scope:key, the key part
 *       (scope send+read or admin: the example also calls IsOnline and UnreadCount);</li>
 *   <li>HERALD_TLS_CA: for a node with --tls-cert, the PEM file of the CA that
 *       signed its certificate;</li>
 *   <li>HERALD_TLS_CLIENT_CERT, HERALD_TLS_CLIENT_KEY: for a node with
 *       --grpc-tls-client-ca, a PEM client certificate signed by that CA and its
 *       PEM (PKCS#8) private key;</li>
 *   <li>HERALD_TLS_SERVER_NAME: a name to check the node's certificate against,
 *       other than the host of the address.</li>
 * </ul>
 *
 * <p>Without HERALD_TLS_CA and a client certificate the channel is plaintext.
 * When a call fails, the example says what to change ({@link Advice}).
 */
public final class SendExample {

    /** Attempts of a send (retried as {@link #retryable(Throwable)} says), and the deadline of each. */
    private static final int SEND_ATTEMPTS = 8;
    private static final long ATTEMPT_DEADLINE_MS = 5_000;

    private SendExample() {}

    /**
     * Plaintext (a node on loopback or a private network), or TLS when there
     * is a CA file or a client certificate. TLS verifies the node's
     * certificate against the CA file (without one, against the JVM's
     * trusted CAs) and presents the client certificate, if any, to a node that
     * requires one (--grpc-tls-client-ca).
     */
    static ManagedChannel channel(Advice.Settings s) {
        if (!s.tls()) {
            return ManagedChannelBuilder.forTarget(s.addr()).usePlaintext().build();
        }
        TlsChannelCredentials.Builder tls = TlsChannelCredentials.newBuilder();
        if (set(s.tlsCa())) {
            try {
                tls.trustManager(new File(s.tlsCa()));
            } catch (IOException e) {
                throw new IllegalArgumentException("HERALD_TLS_CA: cannot read " + s.tlsCa() + ": " + e.getMessage(), e);
            }
        }
        if (set(s.clientCert()) != set(s.clientKey())) {
            throw new IllegalArgumentException("set both HERALD_TLS_CLIENT_CERT and HERALD_TLS_CLIENT_KEY, or neither");
        }
        if (set(s.clientCert())) {
            try {
                tls.keyManager(new File(s.clientCert()), new File(s.clientKey()));
            } catch (IOException | RuntimeException e) {
                throw new IllegalArgumentException("HERALD_TLS_CLIENT_CERT, HERALD_TLS_CLIENT_KEY: cannot use "
                        + s.clientCert() + " and " + s.clientKey() + " (" + e.getMessage() + "); the key must be a "
                        + "PEM PKCS#8 key (BEGIN PRIVATE KEY): openssl pkcs8 -topk8 -nocrypt -in client.key -out client.pk8", e);
            }
        }
        ManagedChannelBuilder<?> b = Grpc.newChannelBuilder(s.addr(), tls.build());
        if (set(s.serverName())) {
            b.overrideAuthority(s.serverName());
        }
        return b.build();
    }

    public static void main(String[] args) throws InterruptedException {
        String addr = args.length > 0 ? args[0] : envOr("HERALD_GRPC_ADDR", "127.0.0.1:50051");
        String user = args.length > 1 ? args[1] : "alice";
        // One key per logical send, made before the first attempt.
        String key = args.length > 2 ? args[2] : UUID.randomUUID().toString();
        String apiKey = System.getenv("HERALD_API_KEY");
        Advice.Settings settings = new Advice.Settings(addr, apiKey, System.getenv("HERALD_TLS_CA"),
                System.getenv("HERALD_TLS_CLIENT_CERT"), System.getenv("HERALD_TLS_CLIENT_KEY"),
                System.getenv("HERALD_TLS_SERVER_NAME"));

        ManagedChannel channel;
        try {
            channel = channel(settings);
        } catch (IllegalArgumentException e) {
            System.err.println(e.getMessage());
            System.exit(2);
            return;
        }
        int exit = 0;
        String rpc = "SendToUser"; // the call under way, for the advice if it fails
        try {
            PushServiceGrpc.PushServiceBlockingStub herald = PushServiceGrpc.newBlockingStub(channel);
            if (set(apiKey)) {
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
            // A setup problem (TLS, certificates, a key, the address) is not
            // retried: the call never reached the node, and would fail the same way again.
            Predicate<StatusRuntimeException> setupProblem = e -> {
                Advice.Hint h = Advice.of("SendToUser", e, settings);
                return h != null && h.setup();
            };
            SendToUserResponse sent = sendWithRetry(herald, request, setupProblem);
            print("sent", sent);

            // The same request again, as a retry whose first attempt went
            // through but whose answer was lost: nothing is stored or pushed,
            // the answer is the first call's delivery with replayed=true.
            rpc = "SendToUser (repeat)";
            SendToUserResponse again = sendWithRetry(herald, request, setupProblem);
            print("repeat", again);
            for (int i = 0; i < again.getDeliveriesCount(); i++) {
                Delivery d = again.getDeliveries(i);
                if (!d.getReplayed() || !d.getMessageId().equals(sent.getDeliveries(i).getMessageId())) {
                    System.out.println("unexpected: the repeat with key " + key + " was not replayed: " + d);
                    exit = 1;
                }
            }

            rpc = "IsOnline";
            IsOnlineResponse presence = herald.withDeadlineAfter(5, TimeUnit.SECONDS)
                    .isOnline(IsOnlineRequest.newBuilder().addUserIds(user).build());
            for (UserPresence p : presence.getUsersList()) {
                System.out.printf("%s online=%b connections=%d%n",
                        p.getUserId(), p.getOnline(), p.getConnections());
            }

            rpc = "UnreadCount";
            long unread = herald.withDeadlineAfter(5, TimeUnit.SECONDS)
                    .unreadCount(UnreadCountRequest.newBuilder().setUserId(user).build())
                    .getCount();
            System.out.printf("%s has %d unread%n", user, unread);

            // The message center: the newest page, then one message read on
            // its own (every device of the user gets the new count and a
            // "changed" frame).
            rpc = "ListMessages";
            ListMessagesResponse page = herald.withDeadlineAfter(5, TimeUnit.SECONDS)
                    .listMessages(ListMessagesRequest.newBuilder().setUserId(user).setLimit(5).build());
            for (StoredMessage m : page.getMessagesList()) {
                System.out.printf("  %s topic=%s read=%b %s%n",
                        m.getMessageId(), m.getTopic(), m.getRead(), m.getPayloadJson());
            }
            if (page.getMessagesCount() > 0) {
                rpc = "MarkRead";
                MarkReadResponse read = herald.withDeadlineAfter(5, TimeUnit.SECONDS)
                        .markRead(MarkReadRequest.newBuilder()
                                .setUserId(user)
                                .addMessageIds(page.getMessages(0).getMessageId())
                                .build());
                System.out.printf("read %s; %s has %d unread%n",
                        read.getChangedMessageIdsList(), user, read.getUnread());
            }

            // Errors arrive as StatusRuntimeException; this payload is not JSON.
            rpc = "SendToUser (bad payload)";
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
            // What to change, when Advice knows, then the status: UNAVAILABLE
            // with a reason in its causes (TLS, certificates, the address),
            // UNAUTHENTICATED or PERMISSION_DENIED (the key), DEADLINE_EXCEEDED
            // (no answer in time). The send was retried already: see sendWithRetry.
            Status st = e.getStatus();
            String why = st.getDescription() == null ? "" : st.getDescription().lines().findFirst().orElse("");
            Advice.Hint hint = Advice.of(rpc, e, settings);
            if (hint != null) {
                System.err.printf("%s failed: %s%n  (%s: %s)%n", rpc, hint.text(), st.getCode(), why);
            } else {
                System.err.printf("%s failed: %s: %s%n", rpc, st.getCode(), why);
            }
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
     * caller cancelled (an interrupt, or a cancelled {@link Context}), and an
     * error for which {@code setupProblem} is true: a connection that failed
     * for want of the right TLS settings, say, fails the same way every time,
     * and its request never reached the node.
     */
    static SendToUserResponse sendWithRetry(PushServiceGrpc.PushServiceBlockingStub herald,
            SendToUserRequest request, Predicate<StatusRuntimeException> setupProblem) throws InterruptedException {
        long backoffMs = 100;
        for (int attempt = 1; ; attempt++) {
            try {
                // withDeadlineAfter returns a new stub: a fresh deadline per attempt.
                return herald.withDeadlineAfter(ATTEMPT_DEADLINE_MS, TimeUnit.MILLISECONDS).sendToUser(request);
            } catch (StatusRuntimeException e) {
                if (!retryable(e) || attempt >= SEND_ATTEMPTS || setupProblem.test(e)) {
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

    /** {@link #sendWithRetry(PushServiceGrpc.PushServiceBlockingStub, SendToUserRequest, Predicate)}, retrying every retryable error. */
    static SendToUserResponse sendWithRetry(PushServiceGrpc.PushServiceBlockingStub herald,
            SendToUserRequest request) throws InterruptedException {
        return sendWithRetry(herald, request, e -> false);
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

    private static boolean set(String v) {
        return v != null && !v.isBlank();
    }
}
