package dev.herald.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import dev.herald.v1.Delivery;
import dev.herald.v1.PushServiceGrpc;
import dev.herald.v1.SendToUserRequest;
import dev.herald.v1.SendToUserResponse;
import io.grpc.ManagedChannel;
import io.grpc.MethodDescriptor;
import io.grpc.Server;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.inprocess.InProcessChannelBuilder;
import io.grpc.inprocess.InProcessServerBuilder;
import io.grpc.stub.StreamObserver;
import java.util.List;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;

/** Checks the stubs generated from proto/herald/v1/push.proto, without a Herald node. */
class GeneratedStubsTest {

    @Test
    void serviceHasEveryRpc() {
        var sd = PushServiceGrpc.getServiceDescriptor();
        assertEquals("herald.v1.PushService", sd.getName());
        List<String> names = sd.getMethods().stream().map(MethodDescriptor::getFullMethodName).sorted().toList();
        assertEquals(List.of(
                "herald.v1.PushService/Broadcast",
                "herald.v1.PushService/DeleteMessages",
                "herald.v1.PushService/DisconnectUser",
                "herald.v1.PushService/IsOnline",
                "herald.v1.PushService/ListMessages",
                "herald.v1.PushService/MarkRead",
                "herald.v1.PushService/MarkUnread",
                "herald.v1.PushService/SendBatch",
                "herald.v1.PushService/SendToUser",
                "herald.v1.PushService/Stats",
                "herald.v1.PushService/UnreadCount"), names);
        for (MethodDescriptor<?, ?> m : sd.getMethods()) {
            assertEquals(MethodDescriptor.MethodType.UNARY, m.getType(), m.getFullMethodName());
        }
    }

    /** A stand-in server shows how results and errors reach a stub. */
    @Test
    void roundTripAndStatusErrors() throws Exception {
        String name = InProcessServerBuilder.generateName();
        Server server = InProcessServerBuilder.forName(name).directExecutor()
                .addService(new PushServiceGrpc.PushServiceImplBase() {
                    @Override
                    public void sendToUser(SendToUserRequest req, StreamObserver<SendToUserResponse> out) {
                        if (req.getUserIdsCount() == 0) {
                            out.onError(Status.INVALID_ARGUMENT.withDescription("user_ids is empty").asRuntimeException());
                            return;
                        }
                        SendToUserResponse.Builder r = SendToUserResponse.newBuilder();
                        for (String u : req.getUserIdsList()) {
                            r.addDeliveries(Delivery.newBuilder().setUserId(u).setMessageId("1-0"));
                        }
                        out.onNext(r.build());
                        out.onCompleted();
                    }
                })
                .build().start();
        ManagedChannel ch = InProcessChannelBuilder.forName(name).directExecutor().build();
        try {
            var stub = PushServiceGrpc.newBlockingStub(ch);
            SendToUserResponse ok = stub.sendToUser(SendToUserRequest.newBuilder()
                    .addUserIds("a").addUserIds("b").setPayloadJson("{}").build());
            assertEquals(List.of("a", "b"), ok.getDeliveriesList().stream().map(Delivery::getUserId).toList());

            StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
                    () -> stub.sendToUser(SendToUserRequest.newBuilder().setPayloadJson("{}").build()));
            assertEquals(Status.Code.INVALID_ARGUMENT, e.getStatus().getCode());
            assertEquals("user_ids is empty", e.getStatus().getDescription());
        } finally {
            ch.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
            server.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
        }
    }
}
