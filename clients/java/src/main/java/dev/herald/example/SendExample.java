package dev.herald.example;

import dev.herald.v1.Delivery;
import dev.herald.v1.IsOnlineRequest;
import dev.herald.v1.IsOnlineResponse;
import dev.herald.v1.PushServiceGrpc;
import dev.herald.v1.SendToUserRequest;
import dev.herald.v1.SendToUserResponse;
import dev.herald.v1.UnreadCountRequest;
import dev.herald.v1.UserPresence;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.MetadataUtils;
import java.util.concurrent.TimeUnit;

/**
 * Pushes one message to a user over Herald's control API, asks whether the
 * user is online and how many messages they have unread, then shows how an
 * INVALID_ARGUMENT error arrives.
 *
 * <p>Usage: {@code SendExample [host:port] [user-id]}. The address defaults
 * to $HERALD_GRPC_ADDR, then to 127.0.0.1:50051; the user to "alice".
 * When the node runs with an API key (--api-key), put it in $HERALD_API_KEY.
 */
public final class SendExample {

    private SendExample() {}

    public static void main(String[] args) throws InterruptedException {
        String addr = args.length > 0 ? args[0] : envOr("HERALD_GRPC_ADDR", "127.0.0.1:50051");
        String user = args.length > 1 ? args[1] : "alice";

        // The control API is an internal listener without TLS.
        ManagedChannel channel = ManagedChannelBuilder.forTarget(addr).usePlaintext().build();
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

            SendToUserResponse sent = herald.withDeadlineAfter(5, TimeUnit.SECONDS)
                    .sendToUser(SendToUserRequest.newBuilder()
                            .addUserIds(user)
                            .setTopic("billing.invoice")
                            .setPayloadJson("{\"invoice\":42,\"amount\":\"19.99\"}")
                            .build());
            for (Delivery d : sent.getDeliveriesList()) {
                System.out.printf("sent to %s: message %s (online=%b)%n",
                        d.getUserId(), d.getMessageId(), d.getOnline());
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
            // DEADLINE_EXCEEDED: it did not answer in time.
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

    private static String envOr(String name, String fallback) {
        String v = System.getenv(name);
        return v == null || v.isBlank() ? fallback : v;
    }
}
