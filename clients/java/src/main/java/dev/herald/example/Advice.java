package dev.herald.example;

import io.grpc.Status;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import javax.net.ssl.SSLHandshakeException;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.SSLSocketFactory;

/**
 * What to change when a call to a Herald node failed: a failed call says
 * {@code UNAVAILABLE: io exception} or {@code INTERNAL: http2 exception}, and
 * the reason is in its causes. {@link #of} tells apart, in this order:
 *
 * <ul>
 *   <li>UNAUTHENTICATED: no key, a wrong key, or a whole name:scope:key instead of the key;</li>
 *   <li>PERMISSION_DENIED: the key lacks the scope the call needs (the node's message names it);</li>
 *   <li>a TLS client at a plaintext node, and a plaintext client at a TLS node;</li>
 *   <li>the node's certificate not trusted, or not naming the host;</li>
 *   <li>the node wanting a client certificate, or refusing the one sent;</li>
 *   <li>nothing listening, a host name that does not resolve;</li>
 *   <li>an address that is the node's WebSocket or admin listener, not its gRPC one.</li>
 * </ul>
 */
final class Advice {

    private Advice() {}

    /** How the example reaches the node: what advice can point at. Blank strings mean unset. */
    record Settings(String addr, String apiKey, String tlsCa, String clientCert, String clientKey, String serverName) {
        /** A CA file or a client certificate means TLS; neither means plaintext. */
        boolean tls() {
            return set(tlsCa) || set(clientCert);
        }
    }

    /**
     * @param text what to change
     * @param setup a setup problem that a retry cannot fix; the connection did
     *     not get as far as sending the request, so giving up loses nothing
     */
    record Hint(String text, boolean setup) {}

    private static final String KEY_HELP =
            "the key part of one of the node's --api-keys name:scope:key values, sent as `authorization: Bearer <key>`";
    private static final String CLIENT_CERT_VARS =
            "set HERALD_TLS_CLIENT_CERT and HERALD_TLS_CLIENT_KEY to a PEM client certificate and its key";
    private static final Pattern SCOPED_SPEC = Pattern.compile("^[^:]+:(send|read|admin|send\\+read|read\\+send):.");
    private static final Pattern NEEDS_SCOPE = Pattern.compile("needs a key with scope \"([a-z+]+)\"");
    /** The scope each RPC needs (the server's src/apikey.rs), for a node whose message does not name it. */
    private static final Map<String, String> SCOPE_OF = Map.of(
            "SendToUser", "send", "Broadcast", "send", "MarkRead", "send", "MarkUnread", "send",
            "DeleteMessages", "send", "ListMessages", "send", "DisconnectUser", "send",
            "IsOnline", "read", "UnreadCount", "read", "Stats", "read");

    /** Advice for {@code rpc} having thrown {@code t}; null when there is nothing to add to the status. */
    static Hint of(String rpc, Throwable t, Settings s) {
        Status st = Status.fromThrowable(t);
        String description = st.getDescription() == null ? "" : st.getDescription();
        return switch (st.getCode()) {
            case UNAUTHENTICATED -> new Hint(keyAdvice(description, s), true);
            case PERMISSION_DENIED -> new Hint(scopeAdvice(rpc, description), true);
            case UNAVAILABLE, INTERNAL, UNKNOWN -> transport(causes(t), s);
            default -> null;
        };
    }

    static String keyAdvice(String description, Settings s) {
        if (!set(s.apiKey())) {
            return "the node requires an API key: set HERALD_API_KEY to " + KEY_HELP;
        }
        if (SCOPED_SPEC.matcher(s.apiKey()).find()) {
            return "the node does not know this API key: HERALD_API_KEY looks like a whole name:scope:key spec; "
                    + "set it to the key part only (what follows the second ':')";
        }
        return "the node does not know this API key: HERALD_API_KEY must be " + KEY_HELP;
    }

    static String scopeAdvice(String rpc, String description) {
        Matcher m = NEEDS_SCOPE.matcher(description);
        String scope = m.find() ? m.group(1) : SCOPE_OF.get(rpc.split(" ")[0]);
        if (scope == null) {
            return "the API key lacks the scope this call needs: use a key with the scope the node names, or admin";
        }
        String fitting = scope.equals("admin") ? "admin" : scope + ", send+read or admin";
        return String.format("the API key's scope does not allow %s, which needs scope \"%s\": set HERALD_API_KEY to a "
                + "key whose scope is %s (on the node: --api-keys name:%s:<key>)", rpc, scope, fitting, scope);
    }

    /** Every throwable of the chain as "class: message", lower case, one per line. */
    static String causes(Throwable t) {
        List<String> parts = new ArrayList<>();
        for (Throwable c = t; c != null && parts.size() < 20; c = c.getCause()) {
            parts.add(c.getClass().getName() + ": " + c.getMessage());
        }
        return String.join("\n", parts).toLowerCase(Locale.ROOT);
    }

    static Hint transport(String m, Settings s) {
        String addr = s.addr();
        if (m.contains("notsslrecordexception") || m.contains("not an ssl/tls record")) {
            return new Hint("the node at " + addr + " speaks plaintext (it has no --tls-cert) but this client uses TLS: "
                    + "unset HERALD_TLS_CA and the client certificate, or give the node a certificate", true);
        }
        if (m.contains("no_application_protocol") || m.contains("alpn")) {
            return new Hint(addr + " speaks TLS but not gRPC (HTTP/2): it is probably the node's --ws-listen or "
                    + "--admin-listen address; use its --grpc-listen address (HERALD_GRPC_ADDR)", true);
        }
        if (m.contains("certificateexpiredexception") || m.contains("certificatenotyetvalidexception")) {
            return new Hint("the node's certificate has expired (or is not valid yet): renew it; the node re-reads "
                    + "its --tls-cert on change", true);
        }
        if (m.contains("no subject alternative") || m.contains("no name matching")) {
            String name = set(s.serverName()) ? "\"" + s.serverName() + "\" (HERALD_TLS_SERVER_NAME)" : "the host of " + addr;
            return new Hint("the node's certificate does not name " + name + ": connect by a name the certificate "
                    + "holds (HERALD_GRPC_ADDR), or set HERALD_TLS_SERVER_NAME to one", true);
        }
        if (m.contains("pkix path") || m.contains("certpathbuilderexception") || m.contains("certpathvalidatorexception")
                || m.contains("unable to find valid certification path")) {
            if (!set(s.tlsCa())) {
                return new Hint("the node's certificate is not trusted by this machine: set HERALD_TLS_CA to the PEM "
                        + "file of the CA that signed it", true);
            }
            return new Hint("the node's certificate is not trusted: " + s.tlsCa() + " (HERALD_TLS_CA) is not the CA "
                    + "that signed it; set HERALD_TLS_CA to the PEM file of the CA that did", true);
        }
        if (m.contains("certificate_required") || m.contains("bad_certificate") || m.contains("unknown_ca")
                || m.contains("certificate_unknown") || m.contains("access_denied")) {
            // An alert from the node during the handshake: the only
            // certificate it checks is this client's.
            if (!set(s.clientCert())) {
                return new Hint("the node requires a client certificate (it runs with --grpc-tls-client-ca): "
                        + CLIENT_CERT_VARS + ", signed by that CA", true);
            }
            return new Hint("the node refused the client certificate " + s.clientCert() + " (HERALD_TLS_CLIENT_CERT, "
                    + "HERALD_TLS_CLIENT_KEY): it must be signed by the CA of the node's --grpc-tls-client-ca, be valid "
                    + "now and allow client authentication", true);
        }
        if (m.contains("first received frame was not settings")) {
            // What came instead: 15 03 or 16 03 starts a TLS record, 48 54 54 50 is "HTTP".
            if (m.contains("bytes: 1503") || m.contains("bytes: 1603")) {
                return plaintextToTls(addr);
            }
            if (m.contains("bytes: 48545450")) {
                return new Hint(addr + " answers HTTP/1.1, not gRPC: it is probably the node's --ws-listen or "
                        + "--admin-listen address; use its --grpc-listen address (HERALD_GRPC_ADDR)", true);
            }
        }
        if (m.contains("unknownhostexception") || m.contains("unable to resolve host")) {
            return new Hint("the host name of " + addr + " does not resolve: check HERALD_GRPC_ADDR (host:port of the "
                    + "node's gRPC listener)", false);
        }
        if (m.contains("connection refused")) {
            return new Hint("nothing accepts connections at " + addr + ": is the node running, and is this its "
                    + "--grpc-listen address? (HERALD_GRPC_ADDR)", false);
        }
        if (m.contains("no route to host") || m.contains("timed out") || m.contains("network is unreachable")) {
            return new Hint(addr + " does not answer: a firewall, or not the node's address (HERALD_GRPC_ADDR)", false);
        }
        if (m.contains("network closed") || m.contains("connection reset") || m.contains("http2 exception")) {
            if (!s.tls() && speaksTls(addr)) {
                return plaintextToTls(addr);
            }
            return new Hint(addr + " closed the connection without a gRPC answer: is it the node's --grpc-listen "
                    + "address (not --ws-listen or --admin-listen)? (HERALD_GRPC_ADDR)", false);
        }
        return null;
    }

    private static Hint plaintextToTls(String addr) {
        return new Hint("the node at " + addr + " speaks TLS but this client uses plaintext: set HERALD_TLS_CA to the "
                + "PEM file of the CA that signed the node's certificate; if the node runs with --grpc-tls-client-ca, "
                + "also " + CLIENT_CERT_VARS, true);
    }

    /**
     * Whether addr answers a TLS handshake: it does if the handshake goes
     * through, or fails over the node's certificate (this machine does not
     * trust it) or with an alert from the node. A probe for advice only: it
     * sends nothing after the handshake.
     */
    static boolean speaksTls(String addr) {
        int colon = addr.lastIndexOf(':');
        if (colon < 0) {
            return false;
        }
        String host = addr.substring(0, colon).replaceAll("^\\[|\\]$", "");
        try (Socket plain = new Socket()) {
            plain.connect(new InetSocketAddress(host, Integer.parseInt(addr.substring(colon + 1))), 3_000);
            plain.setSoTimeout(3_000);
            try (SSLSocket tls = (SSLSocket) ((SSLSocketFactory) SSLSocketFactory.getDefault())
                    .createSocket(plain, host, plain.getPort(), false)) {
                SSLParameters p = tls.getSSLParameters();
                p.setApplicationProtocols(new String[] {"h2"});
                tls.setSSLParameters(p);
                tls.startHandshake();
                return true;
            }
        } catch (SSLHandshakeException e) {
            String m = causes(e);
            return m.contains("certificate") || m.contains("pkix") || m.contains("received fatal alert");
        } catch (IOException | RuntimeException e) {
            return false;
        }
    }

    private static boolean set(String v) {
        return v != null && !v.isBlank();
    }
}
