package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// settings is how the example reaches the node: what advice can point at.
type settings struct {
	addr                  string // -grpc-addr / HERALD_GRPC_ADDR
	apiKey                string // -api-key / HERALD_API_KEY
	tlsCA                 string // -tls-ca / HERALD_TLS_CA
	tlsServerName         string // -tls-server-name / HERALD_TLS_SERVER_NAME
	clientCert, clientKey string // -tls-client-cert, -tls-client-key / HERALD_TLS_CLIENT_CERT, HERALD_TLS_CLIENT_KEY
}

// useTLS: a CA file or a client certificate means TLS (with the system's
// roots when there is no CA file); neither means plaintext.
func (s settings) useTLS() bool { return s.tlsCA != "" || s.clientCert != "" }

// advice says what to change when a call to the node failed with err, and
// whether the failure is a setup problem that a retry cannot fix (the
// connection did not get as far as sending the request, so giving up loses
// nothing). It returns "" for an error it has nothing to add to.
//
// The cases, in the order they are told apart:
//   - UNAUTHENTICATED: no key, a wrong key, or name:scope:key instead of the key;
//   - PERMISSION_DENIED: the key lacks the scope the call needs (the node's
//     message names it);
//   - the node speaks TLS and the client plaintext (confirmed by a TLS probe,
//     see speaksTLS), or the other way round;
//   - the node's certificate is not trusted, or does not name the host;
//   - the node wants a client certificate, or refused the one sent;
//   - nothing listens there, the host name does not resolve, no route;
//   - the address is a listener of the node that is not gRPC (WebSocket, admin).
func advice(rpc string, err error, s settings) (string, bool) {
	st, ok := status.FromError(err)
	if !ok {
		return "", false
	}
	switch st.Code() {
	case codes.Unauthenticated:
		return keyAdvice(st.Message(), s), true
	case codes.PermissionDenied:
		return scopeAdvice(rpc, st.Message()), true
	case codes.Unavailable:
		return transportAdvice(st.Message(), s)
	}
	return "", false
}

const keyHelp = "the key part of one of the node's --api-keys name:scope:key values, sent as `authorization: Bearer <key>`"

func keyAdvice(msg string, s settings) string {
	switch {
	case s.apiKey == "":
		return "the node requires an API key: pass -api-key <key> or set HERALD_API_KEY, " + keyHelp
	case scopedSpec.MatchString(s.apiKey):
		return "the node does not know this API key: -api-key / HERALD_API_KEY looks like a whole name:scope:key spec; " +
			"pass only its key part (what follows the second ':')"
	case strings.Contains(msg, "requires `authorization"):
		return "the node got no API key: check -api-key / HERALD_API_KEY (" + keyHelp + ")"
	}
	return "the node does not know this API key: -api-key / HERALD_API_KEY must be " + keyHelp
}

// scopedSpec matches a whole `name:scope:key` spec of the node's --api-keys.
var scopedSpec = regexp.MustCompile(`^[^:]+:(send|read|admin|send\+read|read\+send):.`)

// needsScope finds the scope in the node's PERMISSION_DENIED message:
// `API key "ops" has scope "read"; SendToUser needs a key with scope "send"`.
var needsScope = regexp.MustCompile(`needs a key with scope "([a-z+]+)"`)

// scopeOf is the scope each RPC needs (the server's src/apikey.rs), for a
// node whose message does not name it.
var scopeOf = map[string]string{
	"SendToUser": "send", "Broadcast": "send", "MarkRead": "send", "MarkUnread": "send",
	"DeleteMessages": "send", "ListMessages": "send", "DisconnectUser": "send",
	"IsOnline": "read", "UnreadCount": "read", "Stats": "read",
}

func scopeAdvice(rpc, msg string) string {
	scope := ""
	if m := needsScope.FindStringSubmatch(msg); m != nil {
		scope = m[1]
	} else if sc, ok := scopeOf[strings.Fields(rpc + " ")[0]]; ok {
		scope = sc // rpc may be "SendToUser (repeat)"
	}
	if scope == "" {
		return "the API key lacks the scope this call needs: use a key with scope admin or the one the node names"
	}
	fitting := scope + ", send+read or admin"
	if scope == "admin" {
		fitting = "admin"
	}
	return fmt.Sprintf("the API key's scope does not allow %s, which needs scope %q: pass a key whose scope is %s "+
		"(-api-key / HERALD_API_KEY; on the node: --api-keys name:%s:<key>)", rpc, scope, fitting, scope)
}

func transportAdvice(msg string, s settings) (string, bool) {
	m := strings.ToLower(msg)
	host, _, _ := net.SplitHostPort(s.addr)
	clientFlags := "pass -tls-client-cert client.pem -tls-client-key client.key (or set HERALD_TLS_CLIENT_CERT and HERALD_TLS_CLIENT_KEY)"
	switch {
	case strings.Contains(m, "first record does not look like a tls handshake"):
		return fmt.Sprintf("the node at %s speaks plaintext (it has no --tls-cert) but this client uses TLS: "+
			"drop -tls-ca / HERALD_TLS_CA and the client certificate, or give the node a certificate", s.addr), true
	case strings.Contains(m, "no application protocol"):
		return fmt.Sprintf("%s speaks TLS but not gRPC (HTTP/2): it is probably the node's --ws-listen or --admin-listen "+
			"address; use its --grpc-listen address (-grpc-addr / HERALD_GRPC_ADDR)", s.addr), true
	case strings.Contains(m, "x509: certificate has expired or is not yet valid"):
		return "the node's certificate has expired (or is not valid yet): renew it; the node re-reads its --tls-cert " +
			"on change", true
	case strings.Contains(m, "x509: certificate is valid for") || strings.Contains(m, "x509: certificate is not valid for any names"):
		return fmt.Sprintf("the node's certificate does not name %q: connect by a name the certificate holds "+
			"(-grpc-addr / HERALD_GRPC_ADDR), or set -tls-server-name / HERALD_TLS_SERVER_NAME to one", serverName(s, host)), true
	case strings.Contains(m, "x509:") || strings.Contains(m, "failed to verify certificate"):
		if s.tlsCA == "" {
			return "the node's certificate is not trusted by this machine: pass the PEM file of the CA that signed it " +
				"with -tls-ca ca.pem (or set HERALD_TLS_CA)", true
		}
		return fmt.Sprintf("the node's certificate is not trusted: %s (-tls-ca / HERALD_TLS_CA) is not the CA that "+
			"signed it (or the certificate has expired); pass the PEM file of the CA that did", s.tlsCA), true
	case strings.Contains(m, "remote error: tls:"):
		// An alert from the node during the handshake: the only certificate
		// it checks is this client's.
		if s.clientCert == "" {
			return "the node requires a client certificate (it runs with --grpc-tls-client-ca): " + clientFlags +
				", signed by that CA", true
		}
		return fmt.Sprintf("the node refused the client certificate %s (%s): it must be signed by the CA of the "+
			"node's --grpc-tls-client-ca, be valid now and allow client authentication; "+
			"-tls-client-cert/-tls-client-key (HERALD_TLS_CLIENT_CERT, HERALD_TLS_CLIENT_KEY)", s.clientCert, alert(m)), true
	case strings.Contains(m, "looked like an http/1.1 header"):
		return fmt.Sprintf("%s answers HTTP/1.1, not gRPC: it is probably the node's --ws-listen or --admin-listen "+
			"address; use its --grpc-listen address (-grpc-addr / HERALD_GRPC_ADDR)", s.addr), true
	case strings.Contains(m, "connection refused"):
		return fmt.Sprintf("nothing accepts connections at %s: is the node running, and is this its --grpc-listen "+
			"address? (-grpc-addr / HERALD_GRPC_ADDR)", s.addr), false
	case strings.Contains(m, "produced zero addresses") || strings.Contains(m, "no such host"):
		return fmt.Sprintf("the host name %q does not resolve: check -grpc-addr / HERALD_GRPC_ADDR (host:port of the "+
			"node's gRPC listener)", host), false
	case strings.Contains(m, "i/o timeout") || strings.Contains(m, "no route to host") || strings.Contains(m, "network is unreachable"):
		return fmt.Sprintf("%s does not answer: a firewall, or not the node's address (-grpc-addr / HERALD_GRPC_ADDR)", s.addr), false
	case closedEarly(m):
		// The node closed the connection before a word of HTTP/2, or while
		// this client was still writing: the reason (a TLS alert, say) is
		// lost. Ask again, outside gRPC, to learn it.
		if s.useTLS() {
			if perr := tlsProbe(s); perr != nil && !closedEarly(strings.ToLower(perr.Error())) {
				return transportAdvice(perr.Error(), s)
			}
		} else if speaksTLS(s.addr) {
			return fmt.Sprintf("the node at %s speaks TLS but this client uses plaintext: pass -tls-ca ca.pem (or set "+
				"HERALD_TLS_CA) with the CA that signed the node's certificate; if the node runs with "+
				"--grpc-tls-client-ca, also %s", s.addr, clientFlags), true
		}
		return fmt.Sprintf("%s closed the connection without a gRPC answer: is it the node's --grpc-listen address "+
			"(not --ws-listen or --admin-listen)? (-grpc-addr / HERALD_GRPC_ADDR)", s.addr), false
	}
	return "", false
}

// closedEarly: the connection ended before an answer, for a reason the error
// does not tell.
func closedEarly(m string) bool {
	for _, s := range []string{"server preface", "broken pipe", "connection reset", "eof"} {
		if strings.Contains(m, s) {
			return true
		}
	}
	return false
}

func serverName(s settings, host string) string {
	if s.tlsServerName != "" {
		return s.tlsServerName
	}
	return host
}

// alert is the TLS alert in a handshake error ("certificate required").
func alert(m string) string {
	_, a, _ := strings.Cut(m, "remote error: tls: ")
	a, _, _ = strings.Cut(a, "\"")
	return "its answer: " + strings.TrimSpace(a)
}

// speaksTLS reports whether addr answers a TLS handshake. It is a probe for
// advice only: it sends nothing after the handshake and skips checking the
// certificate, since all it asks is whether the other side speaks TLS.
func speaksTLS(addr string) bool {
	conn, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return false
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	err = tls.Client(conn, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}).Handshake()
	// An alert from the other side (say, "certificate required" from a
	// TLS 1.2 node that wants a client certificate) is TLS too.
	return err == nil || strings.Contains(err.Error(), "remote error: tls:")
}

// tlsProbe makes a TLS connection to the node with the example's settings
// and reads the node's first bytes: the error says why the node ends such a
// connection (under TLS 1.3 a node that refuses the client's certificate
// says so only after the handshake). nil: the node answered.
func tlsProbe(s settings) error {
	cfg, err := tlsConfig(s)
	if err != nil {
		return err
	}
	cfg.NextProtos = []string{"h2"}
	if cfg.ServerName == "" {
		cfg.ServerName, _, _ = net.SplitHostPort(s.addr)
	}
	conn, err := net.DialTimeout("tcp", s.addr, 3*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	tc := tls.Client(conn, cfg)
	if err := tc.Handshake(); err != nil {
		return err
	}
	_, err = tc.Read(make([]byte, 1))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return nil // the node kept the connection: it waits for the client to speak first
	}
	return err
}
