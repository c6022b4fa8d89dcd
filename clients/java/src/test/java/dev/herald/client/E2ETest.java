package dev.herald.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import dev.herald.v1.BroadcastRequest;
import dev.herald.v1.BroadcastResponse;
import dev.herald.v1.Delivery;
import dev.herald.v1.DisconnectUserRequest;
import dev.herald.v1.DisconnectUserResponse;
import dev.herald.v1.IsOnlineRequest;
import dev.herald.v1.MarkReadRequest;
import dev.herald.v1.NodeStats;
import dev.herald.v1.PushServiceGrpc;
import dev.herald.v1.SendToUserRequest;
import dev.herald.v1.SendToUserResponse;
import dev.herald.v1.StatsRequest;
import dev.herald.v1.StatsResponse;
import dev.herald.v1.UnreadCountRequest;
import dev.herald.v1.UserPresence;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.MetadataUtils;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.WebSocket;
import java.net.http.WebSocketHandshakeException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionStage;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.function.BooleanSupplier;
import java.util.regex.Pattern;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.function.Executable;

/**
 * End-to-end test of a live Herald node: every RPC of herald.v1.PushService
 * over gRPC, and delivery to real WebSocket connections held as the user.
 *
 * <p>Environment:
 * <ul>
 *   <li>HERALD_GRPC_ADDR: host:port of the node's gRPC control listener;</li>
 *   <li>HERALD_WS_URL: the WebSocket endpoint, e.g. ws://127.0.0.1:8080/ws;</li>
 *   <li>HERALD_JWT_SECRET: the node's HS256 secret (--jwt-secret);</li>
 *   <li>HERALD_API_KEY (optional): the node's --api-keys, if it has one.</li>
 * </ul>
 * Without HERALD_GRPC_ADDR the test is skipped, unless the system property
 * {@code herald.required=true} is set (ci.sh sets it), in which case it fails.
 */
class E2ETest {

    private static final ObjectMapper JSON = new ObjectMapper();
    private static final Duration FRAME_WAIT = Duration.ofSeconds(5);
    private static final long RPC_DEADLINE_SECONDS = 10;
    private static final Pattern STORED_ID = Pattern.compile("\\d+-\\d+");
    private static final Pattern LIVE_ID = Pattern.compile("t\\d+-\\d+");

    private static String grpcAddr;
    private static URI wsUrl;
    private static byte[] jwtSecret;
    private static ManagedChannel channel;
    private static Metadata apiKeyHeader; // null when the node has no API key
    private static HttpClient http;

    /** Sockets opened by the current test, closed after it. */
    private final List<Ws> opened = new ArrayList<>();

    @BeforeAll
    static void connect() {
        grpcAddr = env("HERALD_GRPC_ADDR");
        if (grpcAddr == null) {
            if (Boolean.getBoolean("herald.required")) {
                fail("herald.required=true but HERALD_GRPC_ADDR is not set: "
                        + "the e2e test needs a live Herald node");
            }
            return; // every test is skipped by requireNode()
        }
        String ws = env("HERALD_WS_URL");
        String secret = env("HERALD_JWT_SECRET");
        assertNotNull(ws, "HERALD_GRPC_ADDR is set, so HERALD_WS_URL must be too");
        assertNotNull(secret, "HERALD_GRPC_ADDR is set, so HERALD_JWT_SECRET must be too");
        wsUrl = URI.create(ws);
        jwtSecret = secret.getBytes(StandardCharsets.UTF_8);
        String apiKey = env("HERALD_API_KEY");
        if (apiKey != null) {
            apiKeyHeader = new Metadata();
            apiKeyHeader.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + apiKey);
        }
        channel = ManagedChannelBuilder.forTarget(grpcAddr).usePlaintext().build();
        http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();
    }

    @AfterAll
    static void disconnect() throws InterruptedException {
        if (channel != null) {
            channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
        }
    }

    @BeforeEach
    void requireNode() {
        Assumptions.assumeTrue(channel != null,
                "HERALD_GRPC_ADDR is not set: no live Herald node to test against");
    }

    @AfterEach
    void closeSockets() {
        for (Ws ws : opened) {
            ws.abort();
        }
        opened.clear();
    }

    // ---------------------------------------------------------------- tests

    @Test
    void invalidArgumentsAreRejected() {
        String user = newUser();
        assertStatus(Status.Code.INVALID_ARGUMENT, "SendToUser with no user_ids",
                () -> rpc().sendToUser(SendToUserRequest.newBuilder()
                        .setTopic("t").setPayloadJson("{}").build()));
        assertStatus(Status.Code.INVALID_ARGUMENT, "SendToUser with a non-JSON payload",
                () -> rpc().sendToUser(SendToUserRequest.newBuilder()
                        .addUserIds(user).setTopic("t").setPayloadJson("not json {").build()));
        assertStatus(Status.Code.INVALID_ARGUMENT, "SendToUser with an empty payload",
                () -> rpc().sendToUser(SendToUserRequest.newBuilder()
                        .addUserIds(user).setTopic("t").setPayloadJson("").build()));
        assertStatus(Status.Code.INVALID_ARGUMENT, "SendToUser with an empty user id",
                () -> rpc().sendToUser(SendToUserRequest.newBuilder()
                        .addUserIds("").setPayloadJson("{}").build()));
        assertStatus(Status.Code.INVALID_ARGUMENT, "Broadcast with a non-JSON payload",
                () -> rpc().broadcast(BroadcastRequest.newBuilder()
                        .setTopic("t").setPayloadJson("{\"unterminated\":").build()));
        assertStatus(Status.Code.INVALID_ARGUMENT, "IsOnline with no user_ids",
                () -> rpc().isOnline(IsOnlineRequest.getDefaultInstance()));
        assertStatus(Status.Code.INVALID_ARGUMENT, "UnreadCount with an empty user_id",
                () -> rpc().unreadCount(UnreadCountRequest.getDefaultInstance()));
        assertStatus(Status.Code.INVALID_ARGUMENT, "MarkRead with an empty user_id",
                () -> rpc().markRead(MarkReadRequest.getDefaultInstance()));
        assertStatus(Status.Code.INVALID_ARGUMENT, "DisconnectUser with an empty user_id",
                () -> rpc().disconnectUser(DisconnectUserRequest.getDefaultInstance()));
        // Nothing of the rejected sends was stored.
        assertEquals(0, unread(user), "rejected sends must not be stored");
    }

    @Test
    void apiKeyIsEnforcedWhenConfigured() {
        Assumptions.assumeTrue(apiKeyHeader != null, "HERALD_API_KEY is not set: the node is taken to have no API key");
        assertStatus(Status.Code.UNAUTHENTICATED, "Stats without the API key",
                () -> bareRpc().stats(StatsRequest.getDefaultInstance()));
        Metadata wrong = new Metadata();
        wrong.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer not-the-key");
        assertStatus(Status.Code.UNAUTHENTICATED, "SendToUser with a wrong API key",
                () -> bareRpc().withInterceptors(MetadataUtils.newAttachHeadersInterceptor(wrong))
                        .sendToUser(SendToUserRequest.newBuilder().addUserIds(newUser()).setPayloadJson("{}").build()));
        assertFalse(stats().getNode().getNodeId().isEmpty(), "with the key the same call succeeds");
    }

    @Test
    void badTokensGet401() throws Exception {
        String user = newUser();
        long now = nowSeconds();
        assertHandshakeStatus(401, "no token", wsUrl);
        assertHandshakeStatus(401, "garbage token", withQuery(wsUrl, "token=not.a.jwt"));
        assertHandshakeStatus(401, "expired token",
                withQuery(wsUrl, "token=" + jwt(user, now - 3600, jwtSecret)));
        assertHandshakeStatus(401, "token signed with another secret",
                withQuery(wsUrl, "token=" + jwt(user, now + 3600,
                        "definitely-not-the-secret".getBytes(StandardCharsets.UTF_8))));
        assertFalse(presence(user).getOnline(), "a refused socket must not count as online");
    }

    @Test
    void offlineMessagesAreCountedReplayedAndMarkedRead() throws Exception {
        String user = newUser();
        UserPresence p = presence(user);
        assertEquals(user, p.getUserId());
        assertFalse(p.getOnline(), "a fresh user is offline");
        assertEquals(0, p.getConnections());
        assertEquals(0, unread(user), "a fresh user has nothing unread");

        String payload1 = "{\"n\":1}";
        String payload2 = "[1, \"two\", {\"three\": 3.0}]";
        Delivery d1 = sendOne(user, "inbox", payload1, false);
        Delivery d2 = sendOne(user, "inbox", payload2, false);
        for (Delivery d : List.of(d1, d2)) {
            assertEquals(user, d.getUserId());
            assertFalse(d.getOnline(), "user has no connection, delivery must say offline");
            assertTrue(STORED_ID.matcher(d.getMessageId()).matches(),
                    "stored message id must look like <ms>-<seq>: " + d.getMessageId());
        }
        assertTrue(compareIds(d1.getMessageId(), d2.getMessageId()) < 0,
                "ids of one inbox must increase: " + d1.getMessageId() + " then " + d2.getMessageId());
        assertEquals(2, unread(user), "two stored messages to an offline user are unread");

        // A transient send to an offline user is lost and not counted.
        Delivery t = sendOne(user, "typing", "true", true);
        assertFalse(t.getOnline());
        assertTrue(LIVE_ID.matcher(t.getMessageId()).matches(),
                "transient id must look like t<ms>-<n>: " + t.getMessageId());
        assertEquals(2, unread(user), "a transient send must not be counted as unread");

        // Connecting replays the unread messages, oldest first, after the welcome.
        Ws ws = open(user, null);
        JsonNode welcome = ws.expect("welcome");
        assertEquals(user, welcome.path("user").asText());
        assertFalse(welcome.path("conn").asText().isEmpty(), "welcome carries a conn id: " + welcome);
        assertEquals(2, welcome.path("unread").asLong(-1), "welcome.unread: " + welcome);
        assertFalse(welcome.has("resumed"), "resumed is only present when since was given: " + welcome);
        assertMessage(ws.expectRaw("message"), d1.getMessageId(), "inbox", payload1, false);
        assertMessage(ws.expectRaw("message"), d2.getMessageId(), "inbox", payload2, false);
        ws.pingPong(); // nothing else (e.g. the lost transient message) was replayed
        ws.close();

        // Resuming after the first message replays only the second.
        Ws resumed = open(user, d1.getMessageId());
        JsonNode welcome2 = resumed.expect("welcome");
        assertTrue(welcome2.path("resumed").isBoolean(), "resumed must be present with since: " + welcome2);
        assertTrue(welcome2.path("resumed").asBoolean(), "resume from a retained id: " + welcome2);
        assertEquals(2, welcome2.path("unread").asLong(-1), "resuming reads nothing: " + welcome2);
        assertMessage(resumed.expectRaw("message"), d2.getMessageId(), "inbox", payload2, false);
        resumed.pingPong();
        resumed.close();
        awaitTrue(() -> !presence(user).getOnline(), "user offline after closing every socket");

        // MarkRead moves the cursor; an older id afterwards does not move it back.
        assertEquals(1, markRead(user, d1.getMessageId()), "MarkRead up to the first of two");
        assertEquals(1, unread(user));
        assertEquals(0, markRead(user, ""), "MarkRead with empty up_to marks everything read");
        assertEquals(0, unread(user));
        assertEquals(0, markRead(user, d1.getMessageId()), "the read cursor never moves backwards");
        assertEquals(0, unread(user));

        // Nothing is replayed any more.
        Ws again = open(user, null);
        JsonNode welcome3 = again.expect("welcome");
        assertEquals(0, welcome3.path("unread").asLong(-1), "welcome.unread after MarkRead: " + welcome3);
        again.pingPong();
    }

    @Test
    void liveDeliveryReadsBroadcastStatsAndDisconnect() throws Exception {
        String user = newUser();
        String offline = newUser();

        Ws a = open(user, null);
        Ws b = open(user, null);
        JsonNode wa = a.expect("welcome");
        JsonNode wb = b.expect("welcome");
        for (JsonNode w : List.of(wa, wb)) {
            assertEquals(user, w.path("user").asText(), "welcome.user: " + w);
            assertEquals(0, w.path("unread").asLong(-1), "welcome.unread: " + w);
            assertFalse(w.has("resumed"), "resumed only with since: " + w);
        }
        assertNotEquals(wa.path("conn").asText(), wb.path("conn").asText(), "each socket has its own conn id");

        awaitTrue(() -> presence(user).getConnections() == 2, "IsOnline reports the 2 open sockets");
        var presences = rpc().isOnline(IsOnlineRequest.newBuilder()
                .addUserIds(user).addUserIds(offline).build()).getUsersList();
        assertEquals(2, presences.size());
        assertEquals(user, presences.get(0).getUserId(), "IsOnline answers in request order");
        assertTrue(presences.get(0).getOnline());
        assertEquals(2, presences.get(0).getConnections());
        assertEquals(offline, presences.get(1).getUserId());
        assertFalse(presences.get(1).getOnline());
        assertEquals(0, presences.get(1).getConnections());

        StatsResponse withUs = stats();
        assertNodeStats(withUs);
        assertTrue(withUs.getConnections() >= 2, "cluster connections include our 2 sockets: " + withUs);
        assertTrue(withUs.getOnlineUsers() >= 1);
        assertTrue(withUs.getNode().getConnections() >= 2);
        assertTrue(withUs.getNode().getUsers() >= 1);

        // A stored send to [user, offline, user]: deliveries in request order,
        // the user named twice gets it twice, on every socket.
        String payload = "{\"b\": [1, 2.50, \"x\\u00e9\"],   \"a\": null}";
        SendToUserResponse sent = rpc().sendToUser(SendToUserRequest.newBuilder()
                .addUserIds(user).addUserIds(offline).addUserIds(user)
                .setTopic("billing.invoice").setPayloadJson(payload).build());
        List<Delivery> ds = sent.getDeliveriesList();
        assertEquals(3, ds.size(), "one Delivery per requested user: " + sent);
        assertEquals(List.of(user, offline, user), ds.stream().map(Delivery::getUserId).toList(),
                "deliveries in request order");
        assertTrue(ds.get(0).getOnline(), "user has live sockets, delivery must say online");
        assertFalse(ds.get(1).getOnline(), "other user has none");
        assertTrue(ds.get(2).getOnline());
        for (Delivery d : ds) {
            assertTrue(STORED_ID.matcher(d.getMessageId()).matches(), "stored id: " + d.getMessageId());
        }
        String m1 = ds.get(0).getMessageId();
        String m2 = ds.get(2).getMessageId();
        assertTrue(compareIds(m1, m2) < 0, "the second copy has a later id: " + m1 + ", " + m2);
        for (Ws ws : List.of(a, b)) {
            assertMessage(ws.expectRaw("message"), m1, "billing.invoice", payload, false);
            assertMessage(ws.expectRaw("message"), m2, "billing.invoice", payload, false);
        }
        assertEquals(2, unread(user), "both copies are unread");
        assertEquals(1, unread(offline), "the offline user's copy is unread");

        // A transient send reaches every socket, marked transient, not counted.
        Delivery tr = sendOne(user, "typing", "{\"typing\":true}", true);
        assertTrue(tr.getOnline());
        assertTrue(LIVE_ID.matcher(tr.getMessageId()).matches(), "transient id: " + tr.getMessageId());
        for (Ws ws : List.of(a, b)) {
            assertMessage(ws.expectRaw("message"), tr.getMessageId(), "typing", "{\"typing\":true}", true);
        }
        assertEquals(2, unread(user), "transient messages are not unread");

        // A read frame on one socket updates every socket of the user.
        a.send("{\"type\":\"read\",\"up_to\":\"" + m1 + "\"}");
        for (Ws ws : List.of(a, b)) {
            JsonNode u = ws.expect("unread");
            assertEquals(1, u.path("count").asLong(-1), "unread after reading the first: " + u);
        }
        assertEquals(1, unread(user));

        // MarkRead with an empty id marks everything read and tells every socket.
        assertEquals(0, markRead(user, ""));
        for (Ws ws : List.of(a, b)) {
            JsonNode u = ws.expect("unread");
            assertEquals(0, u.path("count").asLong(-1), "unread after MarkRead: " + u);
        }
        assertEquals(0, unread(user));

        // Ping / pong.
        a.pingPong();
        b.pingPong();

        // Broadcast reaches every connection with the same live-only id.
        String bpayload = "{\"maintenance\":\"in 5 minutes\"}";
        BroadcastResponse bc = rpc().broadcast(BroadcastRequest.newBuilder()
                .setTopic("system").setPayloadJson(bpayload).build());
        assertTrue(LIVE_ID.matcher(bc.getMessageId()).matches(), "broadcast id: " + bc.getMessageId());
        for (Ws ws : List.of(a, b)) {
            assertMessage(ws.expectRaw("message"), bc.getMessageId(), "system", bpayload, true);
        }
        assertEquals(0, unread(user), "broadcasts are not unread");

        StatsResponse after = stats();
        assertNodeStats(after);
        // 2 sockets x (2 stored + 1 transient + 1 broadcast) message frames.
        assertTrue(after.getNode().getMessagesDelivered() >= withUs.getNode().getMessagesDelivered() + 8,
                "messages_delivered grew by at least 8: " + withUs.getNode().getMessagesDelivered()
                        + " -> " + after.getNode().getMessagesDelivered());

        // DisconnectUser closes both sockets with 4001 and the reason.
        String reason = "logged out by e2e test";
        DisconnectUserResponse dc = rpc().disconnectUser(DisconnectUserRequest.newBuilder()
                .setUserId(user).setReason(reason).build());
        assertEquals(2, dc.getClosed(), "DisconnectUser closed both sockets");
        for (Ws ws : List.of(a, b)) {
            Ws.Close c = ws.awaitClose(FRAME_WAIT);
            assertEquals(4001, c.code(), "close code");
            assertEquals(reason, c.reason(), "close reason");
        }
        awaitTrue(() -> !presence(user).getOnline() && presence(user).getConnections() == 0,
                "user offline after DisconnectUser");
        assertEquals(0, rpc().disconnectUser(DisconnectUserRequest.newBuilder()
                .setUserId(user).setReason("again").build()).getClosed(), "nothing left to close");
        awaitTrue(() -> stats().getConnections() <= withUs.getConnections() - 2,
                "cluster connections shrink after DisconnectUser");
    }

    @Test
    void aRepeatWithTheSameIdempotencyKeyIsReplayedAndPushedOnce() throws Exception {
        String user = newUser();
        Ws ws = open(user, null);
        ws.expect("welcome");
        awaitTrue(() -> presence(user).getConnections() == 1, "IsOnline counts the socket");

        // The retry contract: the same request with the same key, sent again
        // (as after a lost answer), stores and pushes nothing and returns the
        // first call's delivery with replayed set.
        String key = UUID.randomUUID().toString();
        String payload = "{\"invoice\":\"INV-42\", \"amount\":1999}";
        SendToUserRequest request = SendToUserRequest.newBuilder()
                .addUserIds(user).setTopic("billing.invoice").setPayloadJson(payload)
                .setIdempotencyKey(key).build();
        SendToUserResponse r1 = rpc().sendToUser(request);
        assertEquals(1, r1.getDeliveriesCount());
        Delivery first = r1.getDeliveries(0);
        assertFalse(first.getReplayed(), "the first send with a fresh key is not a replay: " + first);
        assertTrue(first.getOnline(), "the user has a socket: " + first);
        assertMessage(ws.expectRaw("message"), first.getMessageId(), "billing.invoice", payload, false);

        SendToUserResponse r2 = rpc().sendToUser(request);
        assertEquals(1, r2.getDeliveriesCount());
        Delivery again = r2.getDeliveries(0);
        assertEquals(user, again.getUserId());
        assertTrue(again.getReplayed(), "the repeat with the same key is replayed: " + again);
        assertEquals(first.getMessageId(), again.getMessageId(), "the repeat returns the first call's message id");
        assertEquals(first.getOnline(), again.getOnline(), "the repeat returns the first call's online flag");

        // Pushed once: the next frame is a marker sent after the repeat, not a
        // second copy. Stored once: the message and the marker are unread.
        Delivery marker = sendOne(user, "marker", "{\"marker\":1}", false);
        assertFalse(marker.getReplayed(), "a send without a key is never a replay");
        assertMessage(ws.expectRaw("message"), marker.getMessageId(), "marker", "{\"marker\":1}", false);
        ws.pingPong();
        assertEquals(2, unread(user), "the keyed message is stored once");

        // The same key with a different request is a caller bug.
        assertStatus(Status.Code.INVALID_ARGUMENT, "SendToUser reusing a key with another payload",
                () -> rpc().sendToUser(request.toBuilder().setPayloadJson("{\"invoice\":\"INV-43\"}").build()));

        // Broadcast keys have their own scope: the same string is a fresh key
        // there, and its repeat is replayed.
        BroadcastRequest bcast = BroadcastRequest.newBuilder()
                .setTopic("system").setPayloadJson("{\"keyed\":true}").setIdempotencyKey(key).build();
        BroadcastResponse b1 = rpc().broadcast(bcast);
        assertFalse(b1.getReplayed(), "a SendToUser key does not make a Broadcast a replay: " + b1);
        assertMessage(ws.expectRaw("message"), b1.getMessageId(), "system", "{\"keyed\":true}", true);
        BroadcastResponse b2 = rpc().broadcast(bcast);
        assertTrue(b2.getReplayed(), "the repeated Broadcast is replayed: " + b2);
        assertEquals(b1.getMessageId(), b2.getMessageId());
        ws.pingPong(); // and nothing was pushed again
    }

    @Test
    void authorizationHeaderIsAccepted() throws Exception {
        String user = newUser();
        Ws ws = open(user, null, true);
        JsonNode welcome = ws.expect("welcome");
        assertEquals(user, welcome.path("user").asText());
        awaitTrue(() -> presence(user).getConnections() == 1, "IsOnline counts the header-authenticated socket");
        ws.pingPong();
        ws.close();
    }

    // -------------------------------------------------------------- helpers

    private static PushServiceGrpc.PushServiceBlockingStub rpc() {
        PushServiceGrpc.PushServiceBlockingStub stub = bareRpc();
        return apiKeyHeader == null ? stub : stub.withInterceptors(MetadataUtils.newAttachHeadersInterceptor(apiKeyHeader));
    }

    /** A stub that sends no API key. */
    private static PushServiceGrpc.PushServiceBlockingStub bareRpc() {
        return PushServiceGrpc.newBlockingStub(channel).withDeadlineAfter(RPC_DEADLINE_SECONDS, TimeUnit.SECONDS);
    }

    private static String newUser() {
        return "java-e2e-" + UUID.randomUUID();
    }

    private static Delivery sendOne(String user, String topic, String payload, boolean isTransient) {
        SendToUserResponse r = rpc().sendToUser(SendToUserRequest.newBuilder()
                .addUserIds(user).setTopic(topic).setPayloadJson(payload).setTransient(isTransient).build());
        assertEquals(1, r.getDeliveriesCount(), "one Delivery per requested user: " + r);
        assertEquals(user, r.getDeliveries(0).getUserId());
        return r.getDeliveries(0);
    }

    private static UserPresence presence(String user) {
        var users = rpc().isOnline(IsOnlineRequest.newBuilder().addUserIds(user).build()).getUsersList();
        assertEquals(1, users.size());
        assertEquals(user, users.get(0).getUserId());
        return users.get(0);
    }

    private static long unread(String user) {
        return rpc().unreadCount(UnreadCountRequest.newBuilder().setUserId(user).build()).getCount();
    }

    private static long markRead(String user, String upTo) {
        return rpc().markRead(MarkReadRequest.newBuilder().setUserId(user).setUpToMessageId(upTo).build())
                .getUnread();
    }

    private static StatsResponse stats() {
        return rpc().stats(StatsRequest.getDefaultInstance());
    }

    private static void assertNodeStats(StatsResponse s) {
        NodeStats node = s.getNode();
        assertFalse(node.getNodeId().isEmpty(), "Stats.node.node_id: " + s);
        assertTrue(s.getNodesList().stream().anyMatch(n -> n.getNodeId().equals(node.getNodeId())),
                "Stats.nodes includes the answering node: " + s);
        long sum = s.getNodesList().stream().mapToLong(NodeStats::getConnections).sum();
        assertEquals(sum, s.getConnections(), "cluster connections = sum over nodes: " + s);
        assertTrue(s.getOnlineUsers() <= s.getConnections(), "online users <= connections: " + s);
    }

    private static void assertStatus(Status.Code expected, String what, Executable call) {
        StatusRuntimeException e = assertThrows(StatusRuntimeException.class, call, what + " must fail");
        assertEquals(expected, e.getStatus().getCode(), what + ": " + e.getStatus());
        String desc = e.getStatus().getDescription();
        assertTrue(desc != null && !desc.isBlank(), what + ": the status should carry a description");
    }

    /** Checks a message frame, its payload byte for byte (raw) and as JSON. */
    private static void assertMessage(Ws.Frame f, String id, String topic, String payload, boolean isTransient)
            throws Exception {
        JsonNode m = f.json();
        assertEquals("message", m.path("type").asText(), "frame: " + f.raw());
        assertEquals(id, m.path("id").asText(), "message id: " + f.raw());
        assertEquals(topic, m.path("topic").asText(), "topic: " + f.raw());
        assertEquals(JSON.readTree(payload), m.get("data"), "data: " + f.raw());
        assertTrue(f.raw().contains(payload), "data must be the payload verbatim: payload " + payload
                + " frame " + f.raw());
        assertTrue(m.path("ts").isIntegralNumber(), "ts is a number: " + f.raw());
        long ts = m.path("ts").asLong();
        long now = System.currentTimeMillis();
        assertTrue(Math.abs(now - ts) < 600_000, "ts is unix ms near now: " + ts + " vs " + now);
        if (isTransient) {
            assertTrue(m.path("transient").asBoolean(false), "transient:true expected: " + f.raw());
            assertTrue(id.startsWith("t"), "live-only id starts with t: " + id);
        } else {
            assertNull(m.get("transient"), "stored messages carry no transient field: " + f.raw());
        }
    }

    /** "<ms>-<seq>" ids compared numerically. */
    private static int compareIds(String x, String y) {
        String[] a = x.split("-", 2);
        String[] b = y.split("-", 2);
        int c = Long.compare(Long.parseLong(a[0]), Long.parseLong(b[0]));
        return c != 0 ? c : Long.compare(Long.parseLong(a[1]), Long.parseLong(b[1]));
    }

    private static void awaitTrue(BooleanSupplier cond, String what) throws InterruptedException {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
        while (!cond.getAsBoolean()) {
            if (System.nanoTime() > deadline) {
                fail("timed out waiting: " + what);
            }
            Thread.sleep(50);
        }
    }

    private static long nowSeconds() {
        return System.currentTimeMillis() / 1000;
    }

    /** An HS256 JWT with sub and exp, base64url without padding. */
    static String jwt(String sub, long exp, byte[] secret) throws Exception {
        Base64.Encoder b64 = Base64.getUrlEncoder().withoutPadding();
        String header = b64.encodeToString("{\"alg\":\"HS256\",\"typ\":\"JWT\"}".getBytes(StandardCharsets.UTF_8));
        String claims = b64.encodeToString(JSON.writeValueAsBytes(Map.of("sub", sub, "exp", exp)));
        String signingInput = header + "." + claims;
        Mac mac = Mac.getInstance("HmacSHA256");
        mac.init(new SecretKeySpec(secret, "HmacSHA256"));
        return signingInput + "." + b64.encodeToString(mac.doFinal(signingInput.getBytes(StandardCharsets.US_ASCII)));
    }

    private static URI withQuery(URI base, String query) {
        String s = base.toString();
        return URI.create(s + (s.contains("?") ? "&" : "?") + query);
    }

    private Ws open(String user, String since) throws Exception {
        return open(user, since, false);
    }

    private Ws open(String user, String since, boolean viaHeader) throws Exception {
        String token = jwt(user, nowSeconds() + 3600, jwtSecret);
        WebSocket.Builder builder = http.newWebSocketBuilder().connectTimeout(Duration.ofSeconds(5));
        URI uri = wsUrl;
        if (viaHeader) {
            builder.header("Authorization", "Bearer " + token);
        } else {
            uri = withQuery(uri, "token=" + URLEncoder.encode(token, StandardCharsets.UTF_8));
        }
        if (since != null) {
            uri = withQuery(uri, "since=" + URLEncoder.encode(since, StandardCharsets.UTF_8));
        }
        Ws ws = new Ws();
        try {
            ws.socket = builder.buildAsync(uri, ws).get(10, TimeUnit.SECONDS);
        } catch (ExecutionException e) {
            String why = e.getCause() instanceof WebSocketHandshakeException h
                    ? "HTTP " + h.getResponse().statusCode() + " " + h.getResponse().body()
                    : String.valueOf(e.getCause());
            throw new AssertionError("WebSocket connect to " + wsUrl + " as " + user + " failed: " + why, e.getCause());
        }
        opened.add(ws);
        return ws;
    }

    private static void assertHandshakeStatus(int expected, String what, URI uri) throws Exception {
        Ws ws = new Ws();
        try {
            WebSocket s = http.newWebSocketBuilder().connectTimeout(Duration.ofSeconds(5))
                    .buildAsync(uri, ws).get(10, TimeUnit.SECONDS);
            s.abort();
            fail(what + ": the upgrade must be refused with HTTP " + expected + " but it succeeded");
        } catch (ExecutionException e) {
            WebSocketHandshakeException h = assertInstanceOf(WebSocketHandshakeException.class, e.getCause(),
                    what + ": expected an HTTP refusal, got " + e.getCause());
            assertEquals(expected, h.getResponse().statusCode(), what + ": HTTP status");
        }
    }

    private static String env(String name) {
        String v = System.getenv(name);
        return v == null || v.isBlank() ? null : v.trim();
    }

    /** A WebSocket held as a user: collects whole text frames and the close. */
    static final class Ws implements WebSocket.Listener {
        record Frame(String raw, JsonNode json) {}

        record Close(int code, String reason) {}

        WebSocket socket;
        private final LinkedBlockingQueue<Object> events = new LinkedBlockingQueue<>();
        private final CompletableFuture<Close> closed = new CompletableFuture<>();
        private final StringBuilder partial = new StringBuilder();

        @Override
        public void onOpen(WebSocket webSocket) {
            webSocket.request(1);
        }

        @Override
        public CompletionStage<?> onText(WebSocket webSocket, CharSequence data, boolean last) {
            partial.append(data);
            if (last) {
                events.add(partial.toString());
                partial.setLength(0);
            }
            webSocket.request(1);
            return null;
        }

        @Override
        public CompletionStage<?> onBinary(WebSocket webSocket, java.nio.ByteBuffer data, boolean last) {
            events.add(new AssertionError("unexpected binary frame"));
            webSocket.request(1);
            return null;
        }

        @Override
        public CompletionStage<?> onClose(WebSocket webSocket, int statusCode, String reason) {
            Close c = new Close(statusCode, reason);
            closed.complete(c);
            events.add(c);
            return null;
        }

        @Override
        public void onError(WebSocket webSocket, Throwable error) {
            closed.completeExceptionally(error);
            events.add(error);
        }

        void send(String text) throws Exception {
            socket.sendText(text, true).get(5, TimeUnit.SECONDS);
        }

        /** The next text frame, which must be of the given type. */
        Frame expectRaw(String type) throws Exception {
            while (true) {
                Frame f = nextRaw(type);
                // Message-center sync (which ids were read, unread or
                // deleted) follows every unread frame; these checks follow
                // the badge through the unread frames and skip it, as a
                // client without a message center does.
                if (!type.equals("changed") && f.json().path("type").asText().equals("changed")) {
                    continue;
                }
                assertEquals(type, f.json().path("type").asText(), "expected a " + type + " frame, got " + f.raw());
                return f;
            }
        }

        private Frame nextRaw(String type) throws Exception {
            Object ev = events.poll(FRAME_WAIT.toMillis(), TimeUnit.MILLISECONDS);
            if (ev == null) {
                fail("no frame within " + FRAME_WAIT + " (expected type " + type + ")");
            }
            if (ev instanceof Close c) {
                fail("socket closed (" + c.code() + " " + c.reason() + ") while expecting a " + type + " frame");
            }
            if (ev instanceof Throwable t) {
                throw new AssertionError("socket error while expecting a " + type + " frame", t);
            }
            String raw = (String) ev;
            return new Frame(raw, JSON.readTree(raw));
        }

        JsonNode expect(String type) throws Exception {
            return expectRaw(type).json();
        }

        void pingPong() throws Exception {
            send("{\"type\":\"ping\"}");
            expect("pong");
        }

        Close awaitClose(Duration wait) throws Exception {
            try {
                return closed.get(wait.toMillis(), TimeUnit.MILLISECONDS);
            } catch (TimeoutException e) {
                throw new AssertionError("socket not closed within " + wait + "; pending events " + events, e);
            }
        }

        void close() throws Exception {
            socket.sendClose(WebSocket.NORMAL_CLOSURE, "bye").get(5, TimeUnit.SECONDS);
            try {
                closed.get(5, TimeUnit.SECONDS);
            } catch (TimeoutException | ExecutionException e) {
                // the server need not answer; drop the connection
            }
            socket.abort();
        }

        void abort() {
            if (socket != null) {
                socket.abort();
            }
        }
    }
}
