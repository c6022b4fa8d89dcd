package dev.herald.example;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.herald.v1.Delivery;
import dev.herald.v1.PushServiceGrpc;
import dev.herald.v1.SendToUserRequest;
import dev.herald.v1.SendToUserResponse;
import io.grpc.Context;
import io.grpc.ManagedChannel;
import io.grpc.Server;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.inprocess.InProcessChannelBuilder;
import io.grpc.inprocess.InProcessServerBuilder;
import io.grpc.stub.StreamObserver;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.EnumMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

/** The retry rule of SendExample, without a Herald node. */
class RetryableTest {

    @Test
    void everyStatusCode() {
        Map<Status.Code, Boolean> want = new EnumMap<>(Status.Code.class);
        want.put(Status.Code.OK, false);
        want.put(Status.Code.CANCELLED, true); // unless the caller cancelled: see below
        want.put(Status.Code.UNKNOWN, true); // e.g. a transport error the library cannot classify
        want.put(Status.Code.INVALID_ARGUMENT, false);
        want.put(Status.Code.DEADLINE_EXCEEDED, true);
        want.put(Status.Code.NOT_FOUND, false);
        want.put(Status.Code.ALREADY_EXISTS, false);
        want.put(Status.Code.PERMISSION_DENIED, false);
        want.put(Status.Code.RESOURCE_EXHAUSTED, true);
        want.put(Status.Code.FAILED_PRECONDITION, false);
        want.put(Status.Code.ABORTED, true);
        want.put(Status.Code.OUT_OF_RANGE, false);
        want.put(Status.Code.UNIMPLEMENTED, false);
        want.put(Status.Code.INTERNAL, true); // e.g. an HTTP/2 protocol error
        want.put(Status.Code.UNAVAILABLE, true);
        want.put(Status.Code.DATA_LOSS, true);
        want.put(Status.Code.UNAUTHENTICATED, false);
        for (Status.Code code : Status.Code.values()) {
            assertTrue(want.containsKey(code), "the table lacks " + code);
            assertEquals(want.get(code), SendExample.retryable(code), code.name());
            assertEquals(want.get(code), SendExample.retryable(code.toStatus().asRuntimeException()),
                    code.name() + " thrown");
        }
    }

    @Test
    void errorsThatAreNotStatuses() {
        // A transport's own exception carries no status: it is retryable.
        assertTrue(SendExample.retryable(new IOException("Connection reset by peer")));
        assertTrue(SendExample.retryable(Status.UNKNOWN.withCause(new IOException("h2 protocol error")).asRuntimeException()));
    }

    @Test
    void cancelledByTheCallerIsNotRetried() throws Exception {
        // grpc-java's blocking stub, interrupted, throws CANCELLED caused by the interrupt.
        assertFalse(SendExample.retryable(Status.CANCELLED.withDescription("Thread interrupted")
                .withCause(new InterruptedException()).asRuntimeException()));
        // A call made in a Context the caller cancelled.
        Context.CancellableContext ctx = Context.current().withCancellation();
        ctx.cancel(null);
        assertFalse(ctx.call(() -> SendExample.retryable(Status.CANCELLED.asRuntimeException())));
        // The same status when nobody cancelled anything: retried.
        assertTrue(SendExample.retryable(Status.CANCELLED.asRuntimeException()));
    }

    /** README.md's copy of the two retryable methods is the example's code. */
    @Test
    void readmeShowsTheExamplesCode() throws IOException {
        String readme = Files.readString(Path.of("README.md"));
        String source = Files.readString(Path.of("src/main/java/dev/herald/example/SendExample.java"));
        for (String signature : List.of("static boolean retryable(Throwable t) {",
                "static boolean retryable(Status.Code code) {")) {
            assertEquals(method(source, signature), method(readme, signature), signature);
        }
    }

    /** The lines of the method that starts with signature, up to its closing brace, each stripped. */
    private static List<String> method(String text, String signature) {
        List<String> lines = text.lines().map(String::strip).toList();
        int start = lines.indexOf(signature);
        assertTrue(start >= 0, "no " + signature);
        int depth = 0;
        for (int i = start; i < lines.size(); i++) {
            String line = lines.get(i).replaceAll("//.*", "");
            depth += line.chars().filter(c -> c == '{').count() - line.chars().filter(c -> c == '}').count();
            if (depth == 0) {
                return lines.subList(start, i + 1);
            }
        }
        throw new AssertionError("no end of " + signature);
    }

    // sendWithRetry against an in-process stand-in server.

    private final List<SendToUserRequest> seen = new CopyOnWriteArrayList<>();
    private Server server;
    private ManagedChannel channel;

    private static final SendToUserRequest KEYED = SendToUserRequest.newBuilder()
            .addUserIds("alice")
            .setTopic("billing.invoice")
            .setPayloadJson("{\"invoice\":42}")
            .setIdempotencyKey("invoice-42-paid")
            .build();

    /** Fails the n-th SendToUser with script[n-1], answers once the script is spent; null: never answers. */
    private PushServiceGrpc.PushServiceBlockingStub serve(Status... script) throws IOException {
        String name = InProcessServerBuilder.generateName();
        server = InProcessServerBuilder.forName(name)
                .addService(new PushServiceGrpc.PushServiceImplBase() {
                    @Override
                    public void sendToUser(SendToUserRequest req, StreamObserver<SendToUserResponse> out) {
                        seen.add(req);
                        int n = seen.size();
                        if (script == null) {
                            return; // no answer: the caller has to give up
                        }
                        if (n <= script.length) {
                            out.onError(script[n - 1].asRuntimeException());
                            return;
                        }
                        out.onNext(SendToUserResponse.newBuilder()
                                .addDeliveries(Delivery.newBuilder().setUserId("alice").setMessageId("1-0").setReplayed(n > 1))
                                .build());
                        out.onCompleted();
                    }
                })
                .build().start();
        channel = InProcessChannelBuilder.forName(name).build();
        return PushServiceGrpc.newBlockingStub(channel);
    }

    @AfterEach
    void stop() throws InterruptedException {
        Thread.interrupted();
        if (channel != null) {
            channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
        }
        if (server != null) {
            server.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
        }
    }

    /** What a Redis freeze can end a call with, which the old advice dropped, is retried with the same key. */
    @Test
    void retriesTransientOutcomesWithTheSameRequest() throws Exception {
        var herald = serve(
                Status.CANCELLED.withDescription("stream reset"),
                Status.INTERNAL.withDescription("h2 protocol error"),
                Status.UNKNOWN.withDescription("connection reset"));
        SendToUserResponse r = SendExample.sendWithRetry(herald, KEYED);
        assertTrue(r.getDeliveries(0).getReplayed());
        assertEquals(4, seen.size());
        for (SendToUserRequest req : seen) {
            assertEquals(KEYED, req, "every attempt sends the same request, so the same key");
        }
    }

    @Test
    void aWrongRequestIsNotRetried() throws Exception {
        var herald = serve(Status.INVALID_ARGUMENT.withDescription("payload_json is not JSON"));
        StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
                () -> SendExample.sendWithRetry(herald, KEYED));
        assertEquals(Status.Code.INVALID_ARGUMENT, e.getStatus().getCode());
        assertEquals(1, seen.size());
    }

    /** A setup problem is not retried, though its status (UNAVAILABLE) would be; a refused connection is. */
    @Test
    void aSetupProblemIsNotRetried() throws Exception {
        Advice.Settings s = new Advice.Settings("localhost:50051", null, "ca.pem", null, null, null);
        java.util.function.Predicate<StatusRuntimeException> setup = e -> {
            Advice.Hint h = Advice.of("SendToUser", e, s);
            return h != null && h.setup();
        };
        var herald = serve(Status.UNAVAILABLE.withDescription("ssl exception: TLSV1_ALERT_CERTIFICATE_REQUIRED"));
        StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
                () -> SendExample.sendWithRetry(herald, KEYED, setup));
        assertEquals(Status.Code.UNAVAILABLE, e.getStatus().getCode());
        assertEquals(1, seen.size());
        stop();
        seen.clear();
        var again = serve(Status.UNAVAILABLE.withDescription("io exception: Connection refused"));
        SendExample.sendWithRetry(again, KEYED, setup);
        assertEquals(2, seen.size());
    }

    @Test
    void anInterruptedCallIsNotRetried() throws Exception {
        var herald = serve((Status[]) null);
        Thread caller = Thread.currentThread();
        Thread interrupter = new Thread(() -> {
            try {
                Thread.sleep(200);
            } catch (InterruptedException ignored) {
                return;
            }
            caller.interrupt();
        });
        interrupter.start();
        long start = System.nanoTime();
        StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
                () -> SendExample.sendWithRetry(herald, KEYED));
        // grpc-java sets the interrupt again when it throws; clear it, or the
        // join throws InterruptedException while the interrupter is still alive.
        Thread.interrupted();
        interrupter.join();
        assertEquals(Status.Code.CANCELLED, e.getStatus().getCode());
        assertInstanceOf(InterruptedException.class, e.getCause());
        assertEquals(1, seen.size());
        assertTrue(System.nanoTime() - start < TimeUnit.SECONDS.toNanos(3), "gave up at once");
    }
}
