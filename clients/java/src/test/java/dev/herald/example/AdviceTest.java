package dev.herald.example;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.herald.v1.PushServiceGrpc;
import dev.herald.v1.SendToUserRequest;
import io.grpc.Grpc;
import io.grpc.InsecureServerCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Server;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.security.cert.CertPathBuilderException;
import java.security.cert.CertificateException;
import java.util.concurrent.TimeUnit;
import javax.net.ssl.SSLException;
import javax.net.ssl.SSLHandshakeException;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

/**
 * What {@link Advice} says for each way of reaching a node wrongly. The
 * cases that need no certificates are made for real, through the example's
 * own channel; the certificate cases from the exceptions grpc-java raises
 * for them (clients/java/tls-check.sh makes those for real against a node).
 */
class AdviceTest {

    /** A CA certificate whose key was thrown away: a CA file that signed nothing here. */
    private static final String UNRELATED_CA = Path.of("src/test/resources/unrelated-ca.pem").toString();

    /** The TLS client test makes the server log a failed transport at INFO, with a stack trace: quiet it. */
    private static final java.util.logging.Logger SERVER_TRANSPORT =
            java.util.logging.Logger.getLogger("io.grpc.netty.shaded.io.grpc.netty.NettyServerTransport");

    static {
        SERVER_TRANSPORT.setLevel(java.util.logging.Level.WARNING);
    }

    private Server server;
    private ServerSocket raw;

    @AfterEach
    void stop() throws Exception {
        if (server != null) {
            server.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
        }
        if (raw != null) {
            raw.close();
        }
    }

    private static Advice.Settings settings(String addr, String apiKey, String ca, String clientCert) {
        return new Advice.Settings(addr, apiKey, ca, clientCert, clientCert == null ? null : "client.key", null);
    }

    /** One SendToUser through the example's own channel: what it throws. */
    private static StatusRuntimeException send(Advice.Settings s) throws InterruptedException {
        ManagedChannel channel = SendExample.channel(s);
        try {
            return assertThrows(StatusRuntimeException.class, () -> PushServiceGrpc.newBlockingStub(channel)
                    .withDeadlineAfter(10, TimeUnit.SECONDS)
                    .sendToUser(SendToUserRequest.newBuilder().addUserIds("alice").setPayloadJson("{}").build()));
        } finally {
            channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
        }
    }

    private static void assertAdvice(Advice.Hint hint, boolean setup, String... fragments) {
        assertNotNull(hint, "no advice");
        for (String f : fragments) {
            assertTrue(hint.text().contains(f), "advice \"" + hint.text() + "\" lacks \"" + f + "\"");
        }
        assertEquals(setup, hint.setup(), "setup problem, for: " + hint.text());
    }

    /** A loopback server that reads what it is sent, answers these bytes and closes: another protocol. */
    private String answering(byte[] answer) throws IOException {
        raw = new ServerSocket(0, 50, InetAddress.getLoopbackAddress());
        Thread t = new Thread(() -> {
            while (!raw.isClosed()) {
                try (Socket c = raw.accept()) {
                    InputStream in = c.getInputStream();
                    OutputStream out = c.getOutputStream();
                    in.read(new byte[512]);
                    out.write(answer);
                    out.flush();
                } catch (IOException e) {
                    return;
                }
            }
        });
        t.setDaemon(true);
        t.start();
        return "127.0.0.1:" + raw.getLocalPort();
    }

    @Test
    void tlsClientAtAPlaintextNode() throws Exception {
        server = Grpc.newServerBuilderForPort(0, InsecureServerCredentials.create()).build().start();
        Advice.Settings s = settings("127.0.0.1:" + server.getPort(), null, UNRELATED_CA, null);
        assertAdvice(Advice.of("SendToUser", send(s), s), true, "speaks plaintext", "unset HERALD_TLS_CA");
    }

    @Test
    void plaintextClientAtATlsNode() throws Exception {
        // What a TLS server answers bytes that are not TLS: an alert record (handshake_failure).
        String addr = answering(new byte[] {0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28});
        Advice.Settings s = settings(addr, null, null, null);
        assertAdvice(Advice.of("SendToUser", send(s), s), true,
                "speaks TLS but this client uses plaintext", "HERALD_TLS_CA", "HERALD_TLS_CLIENT_CERT");
    }

    @Test
    void anHttp1Listener() throws Exception {
        String addr = answering("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".getBytes(StandardCharsets.US_ASCII));
        Advice.Settings s = settings(addr, null, null, null);
        assertAdvice(Advice.of("SendToUser", send(s), s), true, "answers HTTP/1.1", "--grpc-listen");
    }

    @Test
    void nothingListening() throws Exception {
        int port;
        try (ServerSocket s = new ServerSocket(0, 50, InetAddress.getLoopbackAddress())) {
            port = s.getLocalPort();
        }
        Advice.Settings s = settings("127.0.0.1:" + port, null, null, null);
        assertAdvice(Advice.of("SendToUser", send(s), s), false, "nothing accepts connections at 127.0.0.1:" + port);
    }

    @Test
    void aHostNameThatDoesNotResolve() throws Exception {
        Advice.Settings s = settings("no-such-host.invalid:50051", null, null, null);
        assertAdvice(Advice.of("SendToUser", send(s), s), false, "does not resolve", "HERALD_GRPC_ADDR");
    }

    /** UNAVAILABLE: io exception, caused by cause: how grpc-java reports a failed handshake. */
    private static StatusRuntimeException io(Throwable cause) {
        return Status.UNAVAILABLE.withDescription("io exception").withCause(cause).asRuntimeException();
    }

    @Test
    void certificates() {
        Advice.Settings withCa = settings("localhost:50051", null, "ca.pem", null);
        Advice.Settings noCa = settings("localhost:50051", null, null, "client.pem");
        SSLHandshakeException untrusted = new SSLHandshakeException("General OpenSslEngine problem");
        untrusted.initCause(new CertPathBuilderException("unable to find valid certification path to requested target"));
        assertAdvice(Advice.of("SendToUser", io(untrusted), withCa), true, "not trusted", "ca.pem (HERALD_TLS_CA) is not the CA");
        assertAdvice(Advice.of("SendToUser", io(untrusted), noCa), true, "not trusted by this machine", "set HERALD_TLS_CA");

        SSLHandshakeException name = new SSLHandshakeException("General OpenSslEngine problem");
        name.initCause(new CertificateException("No subject alternative DNS name matching push.internal found."));
        assertAdvice(Advice.of("SendToUser", io(name), withCa), true, "does not name the host of localhost:50051");

        // The node's alert, as netty's OpenSSL engine and as the JDK's own TLS report it.
        for (Throwable alert : new Throwable[] {
                new SSLException("error:1000045c:SSL routines:OPENSSL_internal:TLSV1_ALERT_CERTIFICATE_REQUIRED"),
                new SSLHandshakeException("Received fatal alert: certificate_required"),
                new SSLException("error:10000412:SSL routines:OPENSSL_internal:SSLV3_ALERT_BAD_CERTIFICATE")}) {
            StatusRuntimeException e = Status.UNAVAILABLE.withDescription("ssl exception").withCause(alert).asRuntimeException();
            assertAdvice(Advice.of("SendToUser", e, withCa), true, "requires a client certificate",
                    "HERALD_TLS_CLIENT_CERT", "HERALD_TLS_CLIENT_KEY");
            assertAdvice(Advice.of("SendToUser", e, noCa), true, "refused the client certificate client.pem",
                    "--grpc-tls-client-ca");
        }
    }

    @Test
    void keysAndScopes() {
        StatusRuntimeException missing = Status.UNAUTHENTICATED
                .withDescription("this node requires `authorization: Bearer <api key>` metadata").asRuntimeException();
        StatusRuntimeException unknown = Status.UNAUTHENTICATED
                .withDescription("the API key in `authorization: Bearer <key>` is not one this node knows").asRuntimeException();
        StatusRuntimeException denied = Status.PERMISSION_DENIED
                .withDescription("API key \"ops\" has scope \"read\"; SendToUser needs a key with scope \"send\"")
                .asRuntimeException();
        String addr = "localhost:50051";
        assertAdvice(Advice.of("SendToUser", missing, settings(addr, null, null, null)), true,
                "requires an API key", "HERALD_API_KEY", "key part", "name:scope:key");
        assertAdvice(Advice.of("SendToUser", unknown, settings(addr, "0123456789abcdef", null, null)), true,
                "does not know this API key", "HERALD_API_KEY");
        assertAdvice(Advice.of("SendToUser", unknown, settings(addr, "backend:send:0123456789abcdef", null, null)), true,
                "whole name:scope:key", "key part only");
        assertAdvice(Advice.of("SendToUser", denied, settings(addr, "k", null, null)), true,
                "needs scope \"send\"", "send, send+read or admin");
        StatusRuntimeException bare = Status.PERMISSION_DENIED.asRuntimeException();
        assertAdvice(Advice.of("IsOnline", bare, settings(addr, "k", null, null)), true,
                "needs scope \"read\"", "read, send+read or admin");
        assertAdvice(Advice.of("SendToUser (repeat)", bare, settings(addr, "k", null, null)), true, "needs scope \"send\"");
        assertNull(Advice.of("SendToUser", Status.INVALID_ARGUMENT.withDescription("payload_json is not valid JSON")
                .asRuntimeException(), settings(addr, null, null, null)));
    }
}
