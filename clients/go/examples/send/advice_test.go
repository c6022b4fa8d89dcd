package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	heraldv1 "github.com/herald-push/herald/clients/go/heraldv1"
)

// pki is a CA with a node certificate (localhost, 127.0.0.1) and a client
// certificate, plus an unrelated CA with a client certificate of its own,
// written as PEM files the way a user has them.
type pki struct {
	dir                          string
	caPool                       *x509.CertPool
	node                         tls.Certificate
	ca, clientCert, clientKey    string
	otherCA, otherCert, otherKey string
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	p := &pki{dir: t.TempDir()}
	ca, caKey := p.issue(t, "test CA", nil, nil, true, nil)
	other, otherKey := p.issue(t, "some other CA", nil, nil, true, nil)
	p.caPool = x509.NewCertPool()
	p.caPool.AddCert(ca)
	nodeCert, nodeKey := p.issue(t, "localhost", ca, caKey, false, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth})
	p.node = tls.Certificate{Certificate: [][]byte{nodeCert.Raw}, PrivateKey: nodeKey}
	p.ca = p.write(t, "ca.pem", "CERTIFICATE", ca.Raw)
	p.otherCA = p.write(t, "other-ca.pem", "CERTIFICATE", other.Raw)
	c, k := p.issue(t, "backend", ca, caKey, false, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})
	p.clientCert, p.clientKey = p.writePair(t, "client", c, k)
	c, k = p.issue(t, "stranger", other, otherKey, false, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})
	p.otherCert, p.otherKey = p.writePair(t, "stranger", c, k)
	return p
}

func (p *pki) issue(t *testing.T, cn string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, isCA bool,
	usage []x509.ExtKeyUsage) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		BasicConstraintsValid: true,
		IsCA:                  isCA,
		ExtKeyUsage:           usage,
		KeyUsage:              x509.KeyUsageDigitalSignature,
	}
	if isCA {
		tmpl.KeyUsage |= x509.KeyUsageCertSign
		parent, parentKey = tmpl, key
	}
	if cn == "localhost" {
		tmpl.DNSNames = []string{"localhost"}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func (p *pki) write(t *testing.T, name, typ string, der []byte) string {
	t.Helper()
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func (p *pki) writePair(t *testing.T, name string, c *x509.Certificate, k *ecdsa.PrivateKey) (string, string) {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return p.write(t, name+".pem", "CERTIFICATE", c.Raw), p.write(t, name+".key", "PRIVATE KEY", der)
}

// answering is a PushService whose SendToUser always delivers.
type answering struct {
	heraldv1.UnimplementedPushServiceServer
}

func (answering) SendToUser(_ context.Context, req *heraldv1.SendToUserRequest) (*heraldv1.SendToUserResponse, error) {
	return &heraldv1.SendToUserResponse{Deliveries: []*heraldv1.Delivery{{UserId: req.GetUserIds()[0], MessageId: "1-0"}}}, nil
}

// listen serves PushService on a loopback port, over TLS with creds if not nil.
func listen(t *testing.T, creds credentials.TransportCredentials) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var opts []grpc.ServerOption
	if creds != nil {
		opts = append(opts, grpc.Creds(creds))
	}
	gs := grpc.NewServer(opts...)
	heraldv1.RegisterPushServiceServer(gs, answering{})
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	return lis.Addr().String()
}

// send makes one SendToUser call the way main does (connect, then call).
func send(t *testing.T, s settings) error {
	t.Helper()
	conn, err := connect(s)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = heraldv1.NewPushServiceClient(conn).SendToUser(ctx, &heraldv1.SendToUserRequest{UserIds: []string{"alice"}, PayloadJson: "{}"})
	return err
}

// Each way of reaching a node wrongly, made for real against a gRPC server
// on loopback, gets the advice that names the fix; the right settings work.
func TestAdviceForConnectionProblems(t *testing.T) {
	p := newPKI(t)
	mtls := listen(t, credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{p.node},
		ClientCAs:    p.caPool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}))
	plain := listen(t, nil)
	_, mtlsPort, _ := net.SplitHostPort(mtls)
	localhost := "localhost:" + mtlsPort

	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := closed.Addr().String()
	closed.Close()

	httpLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	httpSrv := &http.Server{Handler: http.NotFoundHandler()}
	go httpSrv.Serve(httpLis)
	t.Cleanup(func() { httpSrv.Close() })

	mutual := settings{addr: localhost, tlsCA: p.ca, clientCert: p.clientCert, clientKey: p.clientKey}
	if err := send(t, mutual); err != nil {
		t.Fatalf("with the CA and a client certificate: %v", err)
	}

	with := func(change func(*settings)) settings { s := mutual; change(&s); return s }
	cases := []struct {
		name  string
		s     settings
		want  []string
		setup bool
	}{
		{"plaintext to a TLS node", settings{addr: localhost},
			[]string{"speaks TLS but this client uses plaintext", "-tls-ca", "HERALD_TLS_CA", "-tls-client-cert"}, true},
		{"another CA", with(func(s *settings) { s.tlsCA = p.otherCA }),
			[]string{"not trusted", p.otherCA, "is not the CA that signed it"}, true},
		{"no CA file", with(func(s *settings) { s.tlsCA = "" }),
			[]string{"not trusted by this machine", "-tls-ca", "HERALD_TLS_CA"}, true},
		{"a name the certificate lacks", with(func(s *settings) { s.tlsServerName = "push.example.com" }),
			[]string{`does not name "push.example.com"`, "-tls-server-name"}, true},
		{"no client certificate", with(func(s *settings) { s.clientCert, s.clientKey = "", "" }),
			[]string{"requires a client certificate", "-tls-client-cert", "HERALD_TLS_CLIENT_CERT", "HERALD_TLS_CLIENT_KEY"}, true},
		{"a client certificate of another CA", with(func(s *settings) { s.clientCert, s.clientKey = p.otherCert, p.otherKey }),
			[]string{"refused the client certificate", p.otherCert, "--grpc-tls-client-ca"}, true},
		{"TLS to a plaintext node", settings{addr: plain, tlsCA: p.ca},
			[]string{"speaks plaintext", "drop -tls-ca"}, true},
		{"an HTTP/1.1 listener", settings{addr: httpLis.Addr().String()},
			[]string{"answers HTTP/1.1", "--grpc-listen"}, true},
		{"nothing listening", settings{addr: refused},
			[]string{"nothing accepts connections at " + refused, "is the node running"}, false},
		{"a host name that does not resolve", settings{addr: "no-such-host.invalid:50051"},
			[]string{`"no-such-host.invalid" does not resolve`, "HERALD_GRPC_ADDR"}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := send(t, tc.s)
			if err == nil {
				t.Fatal("the call went through")
			}
			hint, setup := advice("SendToUser", err, tc.s)
			for _, w := range tc.want {
				if !strings.Contains(hint, w) {
					t.Errorf("advice for %v\n  = %q\n  lacks %q", err, hint, w)
				}
			}
			if setup != tc.setup {
				t.Errorf("setup problem = %v, want %v (%v)", setup, tc.setup, err)
			}
		})
	}
}

// What the node answers a call without the right key (src/apikey.rs).
func TestAdviceForKeysAndScopes(t *testing.T) {
	missing := status.Error(codes.Unauthenticated, "this node requires `authorization: Bearer <api key>` metadata")
	unknown := status.Error(codes.Unauthenticated, "the API key in `authorization: Bearer <key>` is not one this node knows")
	denied := status.Error(codes.PermissionDenied, `API key "ops" has scope "read"; SendToUser needs a key with scope "send"`)
	cases := []struct {
		name string
		rpc  string
		err  error
		key  string
		want []string
	}{
		{"no key", "SendToUser", missing, "", []string{"requires an API key", "-api-key", "HERALD_API_KEY", "key part", "name:scope:key"}},
		{"a wrong key", "SendToUser", unknown, "0123456789abcdef", []string{"does not know this API key", "HERALD_API_KEY"}},
		{"the whole spec", "SendToUser", unknown, "backend:send:0123456789abcdef", []string{"whole name:scope:key", "only its key part"}},
		{"a read key sends", "SendToUser", denied, "0123456789abcdef", []string{`needs scope "send"`, "send, send+read or admin"}},
		{"a read key sends again", "SendToUser (repeat)", status.Error(codes.PermissionDenied, "denied"), "k", []string{`needs scope "send"`}},
		{"a send key reads", "IsOnline", status.Error(codes.PermissionDenied, "denied"), "k", []string{`needs scope "read"`, "read, send+read or admin"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			hint, _ := advice(tc.rpc, tc.err, settings{addr: "localhost:50051", apiKey: tc.key})
			for _, w := range tc.want {
				if !strings.Contains(hint, w) {
					t.Errorf("advice = %q lacks %q", hint, w)
				}
			}
		})
	}
	if hint, _ := advice("SendToUser", status.Error(codes.InvalidArgument, "payload_json is not valid JSON"), settings{}); hint != "" {
		t.Errorf("advice for INVALID_ARGUMENT = %q, want none (the node's message says it)", hint)
	}
}
