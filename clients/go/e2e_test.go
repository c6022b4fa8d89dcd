package heraldv1_test

// End-to-end test of the generated stubs against a live Herald node.
//
// Skipped unless HERALD_GRPC_ADDR is set. Environment:
//
//	HERALD_GRPC_ADDR    host:port of a node's gRPC control API (required)
//	HERALD_WS_URL       the node's WebSocket endpoint, e.g. ws://127.0.0.1:8080/ws (required)
//	HERALD_JWT_SECRET   the HS256 secret the node verifies tokens with (required)
//	HERALD_GRPC_ADDR_2  a second node of the same Redis-backed cluster (optional)
//	HERALD_WS_URL_2     that node's WebSocket endpoint (required with HERALD_GRPC_ADDR_2)
//	HERALD_API_KEY      the key the nodes want, if they were started with --api-keys: the key
//	                    part of name:scope:key, of scope send+read or admin (optional)
//
// Every RPC of herald.v1.PushService is called and its result checked
// against what real WebSocket connections, held as the user, receive.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	heraldv1 "github.com/herald-push/herald/clients/go/heraldv1"
)

const (
	frameTimeout = 5 * time.Second
	rpcTimeout   = 10 * time.Second
)

var (
	storedID = regexp.MustCompile(`^[0-9]+-[0-9]+$`)
	liveID   = regexp.MustCompile(`^t[0-9]+-[0-9]+$`)
)

// ---------------------------------------------------------------------------
// Environment and helpers
// ---------------------------------------------------------------------------

type node struct {
	name   string
	client heraldv1.PushServiceClient
	wsURL  string
}

type env struct {
	secret string
	apiKey string
	n1     *node
	n2     *node // nil unless a second node is configured
}

func loadEnv(t *testing.T) *env {
	t.Helper()
	addr := os.Getenv("HERALD_GRPC_ADDR")
	if addr == "" {
		t.Skip("HERALD_GRPC_ADDR not set; skipping the end-to-end test against a live Herald node")
	}
	e := &env{secret: os.Getenv("HERALD_JWT_SECRET"), apiKey: os.Getenv("HERALD_API_KEY")}
	if e.secret == "" {
		t.Fatal("HERALD_GRPC_ADDR is set but HERALD_JWT_SECRET is not")
	}
	e.n1 = dialNode(t, "node1", addr, os.Getenv("HERALD_WS_URL"), "HERALD_WS_URL", e.apiKey)
	if addr2 := os.Getenv("HERALD_GRPC_ADDR_2"); addr2 != "" {
		e.n2 = dialNode(t, "node2", addr2, os.Getenv("HERALD_WS_URL_2"), "HERALD_WS_URL_2", e.apiKey)
	}
	return e
}

// bearer sends "authorization: Bearer <key>" with every call.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (b bearer) RequireTransportSecurity() bool { return false }

func dialNode(t *testing.T, name, addr, wsURL, wsVar, apiKey string) *node {
	t.Helper()
	if wsURL == "" {
		t.Fatalf("%s must be set alongside the gRPC address %s", wsVar, addr)
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if apiKey != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(apiKey)))
	}
	cc, err := grpc.NewClient(addr, opts...)
	if err != nil {
		t.Fatalf("grpc.NewClient(%s): %v", addr, err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return &node{name: name, client: heraldv1.NewPushServiceClient(cc), wsURL: wsURL}
}

func rpcCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	t.Cleanup(cancel)
	return ctx
}

func randomUser(t *testing.T, label string) string {
	t.Helper()
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return "e2e-" + label + "-" + hex.EncodeToString(b[:])
}

func (e *env) token(t *testing.T, user string, exp time.Time, secret string) string {
	t.Helper()
	claims := jwt.RegisteredClaims{
		Subject:   user,
		IssuedAt:  jwt.NewNumericDate(time.Now().Add(-time.Minute)),
		ExpiresAt: jwt.NewNumericDate(exp),
	}
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(secret))
	if err != nil {
		t.Fatalf("signing JWT: %v", err)
	}
	return s
}

func (e *env) validToken(t *testing.T, user string) string {
	return e.token(t, user, time.Now().Add(time.Hour), e.secret)
}

// parseStored splits a stored message id "<ms>-<seq>".
func parseStored(t *testing.T, id string) (ms, seq uint64) {
	t.Helper()
	if !storedID.MatchString(id) {
		t.Fatalf("%q is not a stored message id (<ms>-<seq>)", id)
	}
	a, b, _ := strings.Cut(id, "-")
	ms, err1 := strconv.ParseUint(a, 10, 64)
	seq, err2 := strconv.ParseUint(b, 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("%q: bad number in message id", id)
	}
	return ms, seq
}

func storedLess(t *testing.T, a, b string) bool {
	t.Helper()
	am, as := parseStored(t, a)
	bm, bs := parseStored(t, b)
	return am < bm || (am == bm && as < bs)
}

func wantCode(t *testing.T, what string, err error, want codes.Code) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: succeeded, want %s", what, want)
		return
	}
	st, ok := status.FromError(err)
	if !ok {
		t.Errorf("%s: error %v is not a gRPC status", what, err)
		return
	}
	if st.Code() != want {
		t.Errorf("%s: code %s (%q), want %s", what, st.Code(), st.Message(), want)
		return
	}
	if st.Message() == "" {
		t.Errorf("%s: %s without a message", what, want)
	}
	t.Logf("%s: %s %q (as expected)", what, st.Code(), st.Message())
}

// eventually retries check until it returns "" or the deadline passes; it
// absorbs propagation delays (presence updates after a socket closes, or a
// cluster's broker) without hiding a wrong final state.
func eventually(t *testing.T, what string, check func() string) {
	t.Helper()
	eventuallyWithin(t, frameTimeout, what, check)
}

func eventuallyWithin(t *testing.T, within time.Duration, what string, check func() string) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(within)
	for tries := 1; ; tries++ {
		msg := check()
		if msg == "" {
			if tries > 1 {
				t.Logf("%s: settled after %v", what, time.Since(start).Round(time.Millisecond))
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s", what, msg)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------------
// A WebSocket client holding a connection as one user
// ---------------------------------------------------------------------------

// frame is any server frame; fields are pointers where "absent" matters.
type frame struct {
	Type      string          `json:"type"`
	Conn      string          `json:"conn"`
	User      string          `json:"user"`
	Unread    *uint64         `json:"unread"`
	Resumed   *bool           `json:"resumed"`
	ID        string          `json:"id"`
	Topic     string          `json:"topic"`
	Data      json.RawMessage `json:"data"`
	TS        *int64          `json:"ts"`
	Transient *bool           `json:"transient"`
	Count     *uint64         `json:"count"`
	Code      string          `json:"code"`
	Message   string          `json:"message"`

	raw string
}

type wsClient struct {
	t      *testing.T
	name   string
	conn   *websocket.Conn
	frames chan frame
	done   chan struct{} // closed when the read loop ends
	mu     sync.Mutex
	endErr error // why the read loop ended
	cancel context.CancelFunc
}

func (c *wsClient) readLoop(ctx context.Context) {
	defer close(c.done)
	for {
		typ, data, err := c.conn.Read(ctx)
		if err != nil {
			c.mu.Lock()
			c.endErr = err
			c.mu.Unlock()
			return
		}
		if typ != websocket.MessageText {
			c.t.Errorf("%s: got a %v frame, the protocol uses text frames only", c.name, typ)
			continue
		}
		var f frame
		if err := json.Unmarshal(data, &f); err != nil {
			c.t.Errorf("%s: frame is not JSON: %v: %s", c.name, err, data)
			continue
		}
		f.raw = string(data)
		if f.Type == "changed" {
			// Message-center sync (which ids were read, unread or deleted)
			// follows every unread frame; these checks follow the badge
			// through the unread frames and skip it, as a client without a
			// message center does.
			continue
		}
		select {
		case c.frames <- f:
		case <-ctx.Done():
			return
		}
	}
}

// dialWS connects as user; header=true sends the JWT as "Authorization:
// Bearer" instead of ?token=. It returns the connection and its welcome frame.
func (e *env) dialWS(t *testing.T, n *node, name, user, since string, header bool) (*wsClient, frame) {
	t.Helper()
	u, err := url.Parse(n.wsURL)
	if err != nil {
		t.Fatalf("bad WebSocket URL %q: %v", n.wsURL, err)
	}
	q := u.Query()
	tok := e.validToken(t, user)
	opts := &websocket.DialOptions{}
	if header {
		opts.HTTPHeader = http.Header{"Authorization": []string{"Bearer " + tok}}
	} else {
		q.Set("token", tok)
	}
	if since != "" {
		q.Set("since", since)
	}
	u.RawQuery = q.Encode()

	dctx, dcancel := context.WithTimeout(context.Background(), frameTimeout)
	defer dcancel()
	conn, resp, err := websocket.Dial(dctx, u.String(), opts)
	if err != nil {
		code := 0
		if resp != nil {
			code = resp.StatusCode
		}
		t.Fatalf("%s: WebSocket dial to %s as %s failed (HTTP %d): %v", name, n.name, user, code, err)
	}
	conn.SetReadLimit(1 << 20)
	ctx, cancel := context.WithCancel(context.Background())
	c := &wsClient{t: t, name: name, conn: conn, frames: make(chan frame, 256), done: make(chan struct{}), cancel: cancel}
	go c.readLoop(ctx)
	t.Cleanup(func() {
		_ = conn.Close(websocket.StatusNormalClosure, "test done")
		cancel()
		<-c.done
	})

	w := c.next(t)
	if w.Type != "welcome" {
		t.Fatalf("%s: first frame is %s, want a welcome frame", name, w.raw)
	}
	if w.User != user {
		t.Errorf("%s: welcome user %q, want %q", name, w.User, user)
	}
	if w.Conn == "" {
		t.Errorf("%s: welcome without a conn id: %s", name, w.raw)
	}
	if w.Unread == nil {
		t.Errorf("%s: welcome without an unread count: %s", name, w.raw)
	}
	if since == "" && w.Resumed != nil {
		t.Errorf("%s: welcome carries \"resumed\" although no since was given: %s", name, w.raw)
	}
	if since != "" && w.Resumed == nil {
		t.Errorf("%s: welcome lacks \"resumed\" although since was given: %s", name, w.raw)
	}
	return c, w
}

func (c *wsClient) next(t *testing.T) frame {
	t.Helper()
	select {
	case f := <-c.frames:
		return f
	case <-c.done:
		// Frames read before the close are still buffered.
		select {
		case f := <-c.frames:
			return f
		default:
		}
		t.Fatalf("%s: connection ended while waiting for a frame: %v", c.name, c.err())
	case <-time.After(frameTimeout):
		t.Fatalf("%s: no frame within %v", c.name, frameTimeout)
	}
	return frame{}
}

// expectNoFrame checks that nothing arrives for a short while.
func (c *wsClient) expectNoFrame(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case f := <-c.frames:
		t.Errorf("%s: unexpected frame %s", c.name, f.raw)
	case <-time.After(d):
	}
}

func (c *wsClient) err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.endErr
}

func (c *wsClient) send(t *testing.T, v any) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), frameTimeout)
	defer cancel()
	if err := c.conn.Write(ctx, websocket.MessageText, b); err != nil {
		t.Fatalf("%s: write %s: %v", c.name, b, err)
	}
}

// expectMessage reads the next frame and checks it is the given message.
func (c *wsClient) expectMessage(t *testing.T, id, topic, payload string, transient bool) frame {
	t.Helper()
	f := c.next(t)
	if f.Type != "message" {
		t.Fatalf("%s: got %s, want message %s", c.name, f.raw, id)
	}
	if f.ID != id {
		t.Errorf("%s: message id %q, want %q (frame %s)", c.name, f.ID, id, f.raw)
	}
	if f.Topic != topic {
		t.Errorf("%s: topic %q, want %q", c.name, f.Topic, topic)
	}
	if !bytes.Equal(f.Data, []byte(payload)) {
		t.Errorf("%s: data is not the payload byte for byte:\n got  %s\n want %s", c.name, f.Data, payload)
	}
	if f.TS == nil {
		t.Errorf("%s: message without ts: %s", c.name, f.raw)
	} else if d := time.Since(time.UnixMilli(*f.TS)); d > time.Minute || d < -time.Minute {
		t.Errorf("%s: ts %d is %v away from now", c.name, *f.TS, d)
	}
	if transient {
		if f.Transient == nil || !*f.Transient {
			t.Errorf("%s: live-only message lacks \"transient\":true: %s", c.name, f.raw)
		}
		if !liveID.MatchString(f.ID) {
			t.Errorf("%s: live-only id %q does not look like t<ms>-<n>", c.name, f.ID)
		}
	} else {
		if f.Transient != nil && *f.Transient {
			t.Errorf("%s: stored message marked transient: %s", c.name, f.raw)
		}
		if !storedID.MatchString(f.ID) {
			t.Errorf("%s: stored id %q does not look like <ms>-<seq>", c.name, f.ID)
		}
	}
	return f
}

func (c *wsClient) expectUnread(t *testing.T, want uint64) {
	t.Helper()
	f := c.next(t)
	if f.Type != "unread" || f.Count == nil {
		t.Fatalf("%s: got %s, want {\"type\":\"unread\",\"count\":%d}", c.name, f.raw, want)
	}
	if *f.Count != want {
		t.Errorf("%s: unread count %d, want %d", c.name, *f.Count, want)
	}
}

// expectClosed waits for the server to close the connection and checks the
// close code and reason.
func (c *wsClient) expectClosed(t *testing.T, code websocket.StatusCode, reason string) {
	t.Helper()
	deadline := time.After(frameTimeout)
	for {
		select {
		case f := <-c.frames:
			t.Errorf("%s: unexpected frame before close: %s", c.name, f.raw)
			continue
		case <-c.done:
		case <-deadline:
			t.Fatalf("%s: not closed within %v", c.name, frameTimeout)
		}
		break
	}
	err := c.err()
	var ce websocket.CloseError
	if !errors.As(err, &ce) {
		t.Fatalf("%s: connection ended without a close frame: %v", c.name, err)
	}
	if ce.Code != code {
		t.Errorf("%s: close code %d, want %d", c.name, ce.Code, code)
	}
	if ce.Reason != reason {
		t.Errorf("%s: close reason %q, want %q", c.name, ce.Reason, reason)
	}
}

// ---------------------------------------------------------------------------
// RPC wrappers that fail the test on error
// ---------------------------------------------------------------------------

func send(t *testing.T, n *node, req *heraldv1.SendToUserRequest) []*heraldv1.Delivery {
	t.Helper()
	resp, err := n.client.SendToUser(rpcCtx(t), req)
	if err != nil {
		t.Fatalf("%s SendToUser: %v", n.name, err)
	}
	if len(resp.GetDeliveries()) != len(req.GetUserIds()) {
		t.Fatalf("%s SendToUser: %d deliveries for %d users", n.name, len(resp.GetDeliveries()), len(req.GetUserIds()))
	}
	for i, d := range resp.GetDeliveries() {
		if d.GetUserId() != req.GetUserIds()[i] {
			t.Errorf("%s SendToUser: delivery %d is for %q, want %q (request order)", n.name, i, d.GetUserId(), req.GetUserIds()[i])
		}
		if req.GetTransient() {
			if !liveID.MatchString(d.GetMessageId()) {
				t.Errorf("transient delivery id %q does not look like t<ms>-<n>", d.GetMessageId())
			}
		} else if !storedID.MatchString(d.GetMessageId()) {
			t.Errorf("delivery id %q does not look like <ms>-<seq>", d.GetMessageId())
		}
	}
	return resp.GetDeliveries()
}

func unread(t *testing.T, n *node, user string) uint64 {
	t.Helper()
	resp, err := n.client.UnreadCount(rpcCtx(t), &heraldv1.UnreadCountRequest{UserId: user})
	if err != nil {
		t.Fatalf("%s UnreadCount(%s): %v", n.name, user, err)
	}
	return resp.GetCount()
}

func presence(t *testing.T, n *node, users ...string) []*heraldv1.UserPresence {
	t.Helper()
	resp, err := n.client.IsOnline(rpcCtx(t), &heraldv1.IsOnlineRequest{UserIds: users})
	if err != nil {
		t.Fatalf("%s IsOnline: %v", n.name, err)
	}
	if len(resp.GetUsers()) != len(users) {
		t.Fatalf("%s IsOnline: %d entries for %d users", n.name, len(resp.GetUsers()), len(users))
	}
	for i, p := range resp.GetUsers() {
		if p.GetUserId() != users[i] {
			t.Fatalf("%s IsOnline: entry %d is %q, want %q (request order)", n.name, i, p.GetUserId(), users[i])
		}
	}
	return resp.GetUsers()
}

// presenceIs checks IsOnline for one user, allowing for propagation delay.
func presenceIs(t *testing.T, n *node, user string, conns uint32) {
	t.Helper()
	eventually(t, n.name+" IsOnline("+user+")", func() string {
		p := presence(t, n, user)[0]
		if p.GetOnline() != (conns > 0) || p.GetConnections() != conns {
			return fmt.Sprintf("online=%v connections=%d, want online=%v connections=%d", p.GetOnline(), p.GetConnections(), conns > 0, conns)
		}
		return ""
	})
}

// clusterSettle bounds how long cluster-wide Stats aggregates may lag behind
// reality: a clustered node may publish its counts with its heartbeat.
const clusterSettle = 12 * time.Second

func stats(t *testing.T, n *node) *heraldv1.StatsResponse {
	t.Helper()
	return statsWhere(t, n, "consistent Stats", nil)
}

// statsWhere polls Stats until its invariants and cond (if any) hold.
func statsWhere(t *testing.T, n *node, what string, cond func(*heraldv1.StatsResponse) string) *heraldv1.StatsResponse {
	t.Helper()
	var resp *heraldv1.StatsResponse
	eventuallyWithin(t, clusterSettle, n.name+" "+what, func() string {
		var err error
		resp, err = n.client.Stats(rpcCtx(t), &heraldv1.StatsRequest{})
		if err != nil {
			t.Fatalf("%s Stats: %v", n.name, err)
		}
		self := resp.GetNode()
		if self.GetNodeId() == "" {
			t.Fatalf("%s Stats: node without node_id: %v", n.name, resp)
		}
		found := false
		for _, o := range resp.GetNodes() {
			if o.GetNodeId() == self.GetNodeId() {
				found = true
			}
		}
		switch {
		case !found:
			return fmt.Sprintf("nodes %v does not include the answering node %q", resp.GetNodes(), self.GetNodeId())
		case resp.GetConnections() < self.GetConnections():
			return fmt.Sprintf("cluster connections %d < this node's %d (%v)", resp.GetConnections(), self.GetConnections(), resp)
		case resp.GetOnlineUsers() < self.GetUsers():
			return fmt.Sprintf("cluster online_users %d < this node's users %d (%v)", resp.GetOnlineUsers(), self.GetUsers(), resp)
		case self.GetUsers() > self.GetConnections():
			return fmt.Sprintf("%d users but only %d connections (%v)", self.GetUsers(), self.GetConnections(), resp)
		case resp.GetOnlineUsers() > resp.GetConnections():
			return fmt.Sprintf("cluster online_users %d > cluster connections %d (%v)", resp.GetOnlineUsers(), resp.GetConnections(), resp)
		}
		if cond != nil {
			return cond(resp)
		}
		return ""
	})
	return resp
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

// TestE2E drives one node through every RPC with real sockets attached.
func TestE2E(t *testing.T) {
	e := loadEnv(t)
	n := e.n1

	alice := randomUser(t, "alice") // online, two sockets
	bob := randomUser(t, "bob")     // offline while messages arrive
	topic := "e2e.test"
	// Odd spacing and non-ASCII: the browser must get these exact bytes.
	payload1 := `{"n":1, "s":"h\u00e9llo ✓", "arr":[1,2.5,null,true]}`
	payload2 := `[ "second" ,  {"k":{}} ]`

	before := stats(t, n)
	t.Logf("Stats before: node=%v online_users=%d connections=%d", before.GetNode(), before.GetOnlineUsers(), before.GetConnections())

	// Two sockets for alice: one authenticates with ?token=, one with the
	// Authorization header.
	ws1, w1 := e.dialWS(t, n, "alice#1", alice, "", false)
	ws2, w2 := e.dialWS(t, n, "alice#2", alice, "", true)
	if w1.Conn == w2.Conn {
		t.Errorf("two connections share the conn id %q", w1.Conn)
	}
	if *w1.Unread != 0 || *w2.Unread != 0 {
		t.Errorf("fresh user: welcome unread %d/%d, want 0", *w1.Unread, *w2.Unread)
	}

	t.Run("IsOnline", func(t *testing.T) {
		presenceIs(t, n, alice, 2)
		ps := presence(t, n, alice, bob, alice)
		if !ps[0].GetOnline() || ps[0].GetConnections() != 2 || !ps[2].GetOnline() || ps[2].GetConnections() != 2 {
			t.Errorf("alice: %v / %v, want online with 2 connections (asked twice)", ps[0], ps[2])
		}
		if ps[1].GetOnline() || ps[1].GetConnections() != 0 {
			t.Errorf("bob (never connected): %v, want offline with 0 connections", ps[1])
		}
	})

	t.Run("StatsWithSockets", func(t *testing.T) {
		s := statsWhere(t, n, "Stats with alice's 2 sockets open", func(s *heraldv1.StatsResponse) string {
			if s.GetNode().GetConnections() < 2 || s.GetNode().GetUsers() < 1 {
				return fmt.Sprintf("node stats %v, want connections >= 2 and users >= 1", s.GetNode())
			}
			if s.GetConnections() < 2 || s.GetOnlineUsers() < 1 {
				return fmt.Sprintf("cluster connections=%d online_users=%d, want >= 2 and >= 1", s.GetConnections(), s.GetOnlineUsers())
			}
			return ""
		})
		if s.GetNode().GetUptimeSeconds() < before.GetNode().GetUptimeSeconds() {
			t.Errorf("uptime went backwards: %d -> %d", before.GetNode().GetUptimeSeconds(), s.GetNode().GetUptimeSeconds())
		}
	})

	var aliceID1, aliceID2, bobID1 string
	sendOK := t.Run("SendToUser", func(t *testing.T) {
		ds := send(t, n, &heraldv1.SendToUserRequest{UserIds: []string{alice, bob}, Topic: topic, PayloadJson: payload1})
		if !ds[0].GetOnline() {
			t.Errorf("alice has 2 live sockets but delivery says offline: %v", ds[0])
		}
		if ds[1].GetOnline() {
			t.Errorf("bob has no socket but delivery says online: %v", ds[1])
		}
		aliceID1, bobID1 = ds[0].GetMessageId(), ds[1].GetMessageId()
		ws1.expectMessage(t, aliceID1, topic, payload1, false)
		ws2.expectMessage(t, aliceID1, topic, payload1, false)

		if got := unread(t, n, alice); got != 1 {
			t.Errorf("UnreadCount(alice) = %d after one message, want 1", got)
		}
		if got := unread(t, n, bob); got != 1 {
			t.Errorf("UnreadCount(bob) = %d after one message while offline, want 1", got)
		}

		ds = send(t, n, &heraldv1.SendToUserRequest{UserIds: []string{alice}, Topic: "", PayloadJson: payload2})
		aliceID2 = ds[0].GetMessageId()
		if !storedLess(t, aliceID1, aliceID2) {
			t.Errorf("ids not increasing: %s then %s", aliceID1, aliceID2)
		}
		ws1.expectMessage(t, aliceID2, "", payload2, false)
		ws2.expectMessage(t, aliceID2, "", payload2, false)
		if got := unread(t, n, alice); got != 2 {
			t.Errorf("UnreadCount(alice) = %d after two messages, want 2", got)
		}
	})
	if !sendOK {
		t.FailNow() // the rest builds on these messages
	}

	t.Run("ScalarPayloads", func(t *testing.T) {
		// Any JSON value is a valid payload, not just objects.
		for _, p := range []string{`"just a string"`, `42`, `-1.5e3`, `true`, `null`} {
			ds := send(t, n, &heraldv1.SendToUserRequest{UserIds: []string{alice}, Topic: "scalar", PayloadJson: p, Transient: true})
			ws1.expectMessage(t, ds[0].GetMessageId(), "scalar", p, true)
			ws2.expectMessage(t, ds[0].GetMessageId(), "scalar", p, true)
		}
	})

	t.Run("WebSocketReadAndPing", func(t *testing.T) {
		ws1.send(t, map[string]string{"type": "read", "up_to": aliceID1})
		ws1.expectUnread(t, 1)
		ws2.expectUnread(t, 1) // every connection of the user hears about it
		if got := unread(t, n, alice); got != 1 {
			t.Errorf("UnreadCount(alice) = %d after reading the first of two, want 1", got)
		}
		ws2.send(t, map[string]string{"type": "ping"})
		if f := ws2.next(t); f.Type != "pong" {
			t.Errorf("ping answered with %s, want pong", f.raw)
		}
	})

	t.Run("TransientSend", func(t *testing.T) {
		ds := send(t, n, &heraldv1.SendToUserRequest{UserIds: []string{alice}, Topic: "typing", PayloadJson: `{"typing":true}`, Transient: true})
		if !ds[0].GetOnline() {
			t.Errorf("transient delivery to online alice says offline")
		}
		ws1.expectMessage(t, ds[0].GetMessageId(), "typing", `{"typing":true}`, true)
		ws2.expectMessage(t, ds[0].GetMessageId(), "typing", `{"typing":true}`, true)
		if got := unread(t, n, alice); got != 1 {
			t.Errorf("UnreadCount(alice) = %d after a transient send, want 1 (transient is never counted)", got)
		}
	})

	t.Run("Broadcast", func(t *testing.T) {
		resp, err := n.client.Broadcast(rpcCtx(t), &heraldv1.BroadcastRequest{Topic: "announce", PayloadJson: `{"all":"hands"}`})
		if err != nil {
			t.Fatalf("Broadcast: %v", err)
		}
		if !liveID.MatchString(resp.GetMessageId()) {
			t.Errorf("Broadcast id %q does not look like t<ms>-<n>", resp.GetMessageId())
		}
		// Other users' sockets (from other tests on a shared node) cannot
		// reach these connections, so the next frame must be the broadcast.
		ws1.expectMessage(t, resp.GetMessageId(), "announce", `{"all":"hands"}`, true)
		ws2.expectMessage(t, resp.GetMessageId(), "announce", `{"all":"hands"}`, true)
		if got := unread(t, n, alice); got != 1 {
			t.Errorf("UnreadCount(alice) = %d after a broadcast, want 1", got)
		}
	})

	t.Run("MarkRead", func(t *testing.T) {
		resp, err := n.client.MarkRead(rpcCtx(t), &heraldv1.MarkReadRequest{UserId: alice})
		if err != nil {
			t.Fatalf("MarkRead: %v", err)
		}
		if resp.GetUnread() != 0 {
			t.Errorf("MarkRead(all) returned unread=%d, want 0", resp.GetUnread())
		}
		ws1.expectUnread(t, 0)
		ws2.expectUnread(t, 0)
		if got := unread(t, n, alice); got != 0 {
			t.Errorf("UnreadCount(alice) = %d after MarkRead(all), want 0", got)
		}
		// The cursor never moves backwards, and an unchanged count sends
		// no unread frame.
		resp, err = n.client.MarkRead(rpcCtx(t), &heraldv1.MarkReadRequest{UserId: alice, UpToMessageId: aliceID1})
		if err != nil {
			t.Fatalf("MarkRead(older id): %v", err)
		}
		if resp.GetUnread() != 0 {
			t.Errorf("MarkRead(older id) after MarkRead(all) returned unread=%d, want 0 (cursor moved backwards)", resp.GetUnread())
		}
		ws1.expectNoFrame(t, 300*time.Millisecond)

		// Bob, offline: mark his one message read by id.
		resp, err = n.client.MarkRead(rpcCtx(t), &heraldv1.MarkReadRequest{UserId: bob, UpToMessageId: bobID1})
		if err != nil {
			t.Fatalf("MarkRead(bob, id): %v", err)
		}
		if resp.GetUnread() != 0 || unread(t, n, bob) != 0 {
			t.Errorf("MarkRead(bob, %s) left unread=%d, want 0", bobID1, resp.GetUnread())
		}
	})

	t.Run("ReplayAndResume", func(t *testing.T) {
		carol := randomUser(t, "carol")
		var ids []string
		for i := 0; i < 3; i++ {
			ds := send(t, n, &heraldv1.SendToUserRequest{UserIds: []string{carol}, Topic: "inbox", PayloadJson: fmt.Sprintf(`{"i":%d}`, i)})
			if ds[0].GetOnline() {
				t.Errorf("carol has no socket but delivery %d says online", i)
			}
			ids = append(ids, ds[0].GetMessageId())
		}
		if got := unread(t, n, carol); got != 3 {
			t.Errorf("UnreadCount(carol) = %d, want 3", got)
		}
		// Plain connect: welcome with unread=3, then all three, oldest first.
		c, w := e.dialWS(t, n, "carol#1", carol, "", false)
		if *w.Unread != 3 {
			t.Errorf("welcome unread=%d, want 3", *w.Unread)
		}
		for i, id := range ids {
			c.expectMessage(t, id, "inbox", fmt.Sprintf(`{"i":%d}`, i), false)
		}
		// Reading over the socket.
		c.send(t, map[string]string{"type": "read", "up_to": ids[1]})
		c.expectUnread(t, 1)
		_ = c.conn.Close(websocket.StatusNormalClosure, "bye")
		presenceIs(t, n, carol, 0)

		// Resume after the first message: the second and third come back.
		r, w := e.dialWS(t, n, "carol#2", carol, ids[0], true)
		if w.Resumed == nil || !*w.Resumed {
			t.Errorf("welcome after since=%s: %s, want resumed=true", ids[0], w.raw)
		}
		if *w.Unread != 1 {
			t.Errorf("welcome unread=%d after reading 2 of 3, want 1", *w.Unread)
		}
		r.expectMessage(t, ids[1], "inbox", `{"i":1}`, false)
		r.expectMessage(t, ids[2], "inbox", `{"i":2}`, false)
	})

	t.Run("InvalidArgument", func(t *testing.T) {
		ctx := rpcCtx(t)
		_, err := n.client.SendToUser(ctx, &heraldv1.SendToUserRequest{UserIds: nil, Topic: topic, PayloadJson: `{}`})
		wantCode(t, "SendToUser with no user_ids", err, codes.InvalidArgument)
		_, err = n.client.SendToUser(ctx, &heraldv1.SendToUserRequest{UserIds: []string{alice}, Topic: topic, PayloadJson: `{not json`})
		wantCode(t, "SendToUser with a non-JSON payload", err, codes.InvalidArgument)
		_, err = n.client.SendToUser(ctx, &heraldv1.SendToUserRequest{UserIds: []string{alice}, Topic: topic, PayloadJson: ``})
		wantCode(t, "SendToUser with an empty payload", err, codes.InvalidArgument)
		_, err = n.client.SendToUser(ctx, &heraldv1.SendToUserRequest{UserIds: []string{alice, ""}, Topic: topic, PayloadJson: `{}`})
		wantCode(t, "SendToUser with an empty user id", err, codes.InvalidArgument)
		_, err = n.client.Broadcast(ctx, &heraldv1.BroadcastRequest{Topic: topic, PayloadJson: `nope`})
		wantCode(t, "Broadcast with a non-JSON payload", err, codes.InvalidArgument)
		_, err = n.client.IsOnline(ctx, &heraldv1.IsOnlineRequest{})
		wantCode(t, "IsOnline with no user_ids", err, codes.InvalidArgument)
		_, err = n.client.UnreadCount(ctx, &heraldv1.UnreadCountRequest{})
		wantCode(t, "UnreadCount with an empty user_id", err, codes.InvalidArgument)
		_, err = n.client.MarkRead(ctx, &heraldv1.MarkReadRequest{})
		wantCode(t, "MarkRead with an empty user_id", err, codes.InvalidArgument)
		_, err = n.client.MarkRead(ctx, &heraldv1.MarkReadRequest{UserId: alice, UpToMessageId: "not-an-id"})
		wantCode(t, "MarkRead with a malformed message id", err, codes.InvalidArgument)
		_, err = n.client.DisconnectUser(ctx, &heraldv1.DisconnectUserRequest{})
		wantCode(t, "DisconnectUser with an empty user_id", err, codes.InvalidArgument)
		// The rejected sends reached nobody.
		ws1.expectNoFrame(t, 300*time.Millisecond)
	})

	t.Run("Unauthenticated", func(t *testing.T) {
		u, err := url.Parse(n.wsURL)
		if err != nil {
			t.Fatal(err)
		}
		cases := map[string]string{
			"no token":      "",
			"garbage token": "not.a.jwt",
			"wrong secret":  e.token(t, alice, time.Now().Add(time.Hour), e.secret+"-wrong"),
			"expired token": e.token(t, alice, time.Now().Add(-time.Hour), e.secret),
		}
		for name, tok := range cases {
			q := u.Query()
			if tok != "" {
				q.Set("token", tok)
			}
			u2 := *u
			u2.RawQuery = q.Encode()
			ctx, cancel := context.WithTimeout(context.Background(), frameTimeout)
			conn, resp, err := websocket.Dial(ctx, u2.String(), nil)
			cancel()
			if err == nil {
				_ = conn.Close(websocket.StatusNormalClosure, "")
				t.Errorf("%s: WebSocket upgrade succeeded, want HTTP 401", name)
				continue
			}
			if resp == nil || resp.StatusCode != http.StatusUnauthorized {
				code := 0
				if resp != nil {
					code = resp.StatusCode
				}
				t.Errorf("%s: HTTP %d (%v), want 401", name, code, err)
			}
		}
		// A bad token never shows up as a connection.
		presenceIs(t, n, alice, 2)
	})

	t.Run("APIKey", func(t *testing.T) {
		if e.apiKey == "" {
			t.Skip("HERALD_API_KEY not set: the node is expected to run without --api-keys")
		}
		for name, key := range map[string]string{"no key": "", "wrong key": e.apiKey + "-wrong"} {
			bad := dialNode(t, "node1 ("+name+")", os.Getenv("HERALD_GRPC_ADDR"), n.wsURL, "HERALD_WS_URL", key)
			_, err := bad.client.Stats(rpcCtx(t), &heraldv1.StatsRequest{})
			wantCode(t, "Stats with "+name, err, codes.Unauthenticated)
			_, err = bad.client.SendToUser(rpcCtx(t), &heraldv1.SendToUserRequest{UserIds: []string{alice}, PayloadJson: `{}`})
			wantCode(t, "SendToUser with "+name, err, codes.Unauthenticated)
		}
		ws1.expectNoFrame(t, 300*time.Millisecond)
	})

	var statsBeforeDisconnect *heraldv1.StatsResponse
	t.Run("DisconnectUser", func(t *testing.T) {
		statsBeforeDisconnect = stats(t, n)
		resp, err := n.client.DisconnectUser(rpcCtx(t), &heraldv1.DisconnectUserRequest{UserId: alice, Reason: "e2e logout"})
		if err != nil {
			t.Fatalf("DisconnectUser: %v", err)
		}
		if resp.GetClosed() != 2 {
			t.Errorf("DisconnectUser closed %d connections, want 2", resp.GetClosed())
		}
		ws1.expectClosed(t, 4001, "e2e logout")
		ws2.expectClosed(t, 4001, "e2e logout")
		presenceIs(t, n, alice, 0)

		// Nobody left to disconnect.
		resp, err = n.client.DisconnectUser(rpcCtx(t), &heraldv1.DisconnectUserRequest{UserId: alice, Reason: "again"})
		if err != nil {
			t.Fatalf("DisconnectUser (second time): %v", err)
		}
		if resp.GetClosed() != 0 {
			t.Errorf("second DisconnectUser closed %d connections, want 0", resp.GetClosed())
		}
		// A send now finds alice offline, and counts as unread.
		ds := send(t, n, &heraldv1.SendToUserRequest{UserIds: []string{alice}, Topic: topic, PayloadJson: `{}`})
		if ds[0].GetOnline() {
			t.Errorf("delivery to disconnected alice says online")
		}
		if got := unread(t, n, alice); got != 1 {
			t.Errorf("UnreadCount(alice) = %d, want 1", got)
		}
	})

	t.Run("StatsAfter", func(t *testing.T) {
		s := statsWhere(t, n, "messages_delivered", func(s *heraldv1.StatsResponse) string {
			if s.GetNode().GetMessagesDelivered() <= before.GetNode().GetMessagesDelivered() {
				return fmt.Sprintf("messages_delivered %d -> %d after frames were delivered to this node's sockets",
					before.GetNode().GetMessagesDelivered(), s.GetNode().GetMessagesDelivered())
			}
			return ""
		})
		if statsBeforeDisconnect != nil {
			// Connections on this node dropped by at least alice's two
			// (exactly two on an otherwise idle node).
			was := statsBeforeDisconnect.GetNode().GetConnections()
			if was < 2 {
				t.Errorf("node connections were %d with alice's 2 sockets open", was)
			}
			s = statsWhere(t, n, "node connections after DisconnectUser", func(s *heraldv1.StatsResponse) string {
				if now := s.GetNode().GetConnections(); now+2 > was {
					return fmt.Sprintf("%d before, %d after closing 2", was, now)
				}
				return ""
			})
		}
		t.Logf("Stats after: node=%v online_users=%d connections=%d", s.GetNode(), s.GetOnlineUsers(), s.GetConnections())
	})
}

// TestE2EIdempotency checks the retry contract of idempotency_key: the same
// SendToUser request with the same key, sent again (as a retry after a lost
// answer would), is answered with the first call's delivery and Replayed set,
// and the WebSocket client gets the message once; the inbox holds it once.
// With a second node the repeat goes through it too: keys are cluster-wide.
// Broadcast keys work the same way, in their own scope.
func TestE2EIdempotency(t *testing.T) {
	e := loadEnv(t)
	n := e.n1
	erin := randomUser(t, "erin")
	ws, _ := e.dialWS(t, n, "erin#1", erin, "", false)
	presenceIs(t, n, erin, 1)

	key := randomUser(t, "key") // any unique printable ASCII string
	topic, payload := "billing.invoice", `{"invoice":"INV-42", "amount":1999}`
	req := &heraldv1.SendToUserRequest{UserIds: []string{erin}, Topic: topic, PayloadJson: payload, IdempotencyKey: key}

	first := send(t, n, req)[0]
	if first.GetReplayed() {
		t.Errorf("the first send with a fresh key says replayed: %v", first)
	}
	if !first.GetOnline() {
		t.Errorf("erin has a socket but the delivery says offline: %v", first)
	}
	ws.expectMessage(t, first.GetMessageId(), topic, payload, false)

	vias := []*node{n}
	if e.n2 != nil {
		vias = append(vias, e.n2)
	}
	for _, via := range vias {
		again := send(t, via, req)[0]
		if !again.GetReplayed() {
			t.Errorf("%s: the repeat with the same key is not replayed: %v", via.name, again)
		}
		if again.GetMessageId() != first.GetMessageId() {
			t.Errorf("%s: the repeat has message id %q, want the first call's %q", via.name, again.GetMessageId(), first.GetMessageId())
		}
		if again.GetOnline() != first.GetOnline() {
			t.Errorf("%s: the repeat says online=%v, want the first call's %v", via.name, again.GetOnline(), first.GetOnline())
		}
	}

	// Pushed once: the next frame is a marker sent after the repeats, not a
	// second copy; stored once: the message and the marker are unread.
	marker := send(t, n, &heraldv1.SendToUserRequest{UserIds: []string{erin}, Topic: "marker", PayloadJson: `{"marker":1}`})[0]
	if marker.GetReplayed() {
		t.Errorf("a send without a key says replayed: %v", marker)
	}
	ws.expectMessage(t, marker.GetMessageId(), "marker", `{"marker":1}`, false)
	if got := unread(t, n, erin); got != 2 {
		t.Errorf("UnreadCount(erin) = %d, want 2 (the keyed message once, and the marker)", got)
	}

	// The same key with a different request is a caller bug.
	_, err := n.client.SendToUser(rpcCtx(t), &heraldv1.SendToUserRequest{
		UserIds: []string{erin}, Topic: topic, PayloadJson: `{"invoice":"INV-43"}`, IdempotencyKey: key,
	})
	wantCode(t, "SendToUser reusing a key with another payload", err, codes.InvalidArgument)

	// Broadcast: the same key string is a fresh key there (separate scope);
	// the repeat is replayed and pushes nothing.
	bcast := &heraldv1.BroadcastRequest{Topic: "announce", PayloadJson: `{"keyed":true}`, IdempotencyKey: key}
	b1, err := n.client.Broadcast(rpcCtx(t), bcast)
	if err != nil {
		t.Fatalf("Broadcast: %v", err)
	}
	if b1.GetReplayed() {
		t.Errorf("the first Broadcast with the key says replayed (SendToUser keys must not count): %v", b1)
	}
	ws.expectMessage(t, b1.GetMessageId(), "announce", `{"keyed":true}`, true)
	for _, via := range vias {
		b2, err := via.client.Broadcast(rpcCtx(t), bcast)
		if err != nil {
			t.Fatalf("%s Broadcast (repeat): %v", via.name, err)
		}
		if !b2.GetReplayed() || b2.GetMessageId() != b1.GetMessageId() {
			t.Errorf("%s: repeated Broadcast answered %v, want replayed with id %s", via.name, b2, b1.GetMessageId())
		}
	}
	// Nothing else arrives: no second copy of either message.
	ws.expectNoFrame(t, 500*time.Millisecond)
}

// TestE2ECrossNode proves that two nodes of one Redis-backed cluster act as
// one: a socket on node 2 receives what node 1 is asked to send.
func TestE2ECrossNode(t *testing.T) {
	e := loadEnv(t)
	if e.n2 == nil {
		t.Skip("HERALD_GRPC_ADDR_2 not set; skipping the cross-node test")
	}
	n1, n2 := e.n1, e.n2

	s1, s2 := stats(t, n1), stats(t, n2)
	id1, id2 := s1.GetNode().GetNodeId(), s2.GetNode().GetNodeId()
	if id1 == id2 {
		t.Fatalf("both addresses answer as node %q; the cross-node test needs two nodes", id1)
	}
	for _, n := range []*node{n1, n2} {
		statsWhere(t, n, "Stats lists both nodes", func(s *heraldv1.StatsResponse) string {
			ids := map[string]bool{}
			for _, o := range s.GetNodes() {
				ids[o.GetNodeId()] = true
			}
			if !ids[id1] || !ids[id2] {
				return fmt.Sprintf("nodes %v, want both %s and %s", s.GetNodes(), id1, id2)
			}
			return ""
		})
	}

	dave := randomUser(t, "dave")
	ws, _ := e.dialWS(t, n2, "dave@node2", dave, "", false)

	// Presence agrees on both nodes.
	presenceIs(t, n1, dave, 1)
	presenceIs(t, n2, dave, 1)

	// Send through node 1, receive on node 2.
	payload := `{"cross":"node", "n":[1,2,3]}`
	ds := send(t, n1, &heraldv1.SendToUserRequest{UserIds: []string{dave}, Topic: "x.node", PayloadJson: payload})
	if !ds[0].GetOnline() {
		t.Errorf("node 1 reports dave offline although he is connected to node 2")
	}
	ws.expectMessage(t, ds[0].GetMessageId(), "x.node", payload, false)
	for _, n := range []*node{n1, n2} {
		if got := unread(t, n, dave); got != 1 {
			t.Errorf("%s UnreadCount(dave) = %d, want 1", n.name, got)
		}
	}

	// Transient and broadcast cross too.
	ds = send(t, n1, &heraldv1.SendToUserRequest{UserIds: []string{dave}, Topic: "typing", PayloadJson: `true`, Transient: true})
	ws.expectMessage(t, ds[0].GetMessageId(), "typing", `true`, true)
	b, err := n1.client.Broadcast(rpcCtx(t), &heraldv1.BroadcastRequest{Topic: "announce", PayloadJson: `{"x":1}`})
	if err != nil {
		t.Fatalf("node1 Broadcast: %v", err)
	}
	ws.expectMessage(t, b.GetMessageId(), "announce", `{"x":1}`, true)

	// MarkRead on node 1 notifies the socket on node 2.
	mr, err := n1.client.MarkRead(rpcCtx(t), &heraldv1.MarkReadRequest{UserId: dave})
	if err != nil {
		t.Fatalf("node1 MarkRead: %v", err)
	}
	if mr.GetUnread() != 0 {
		t.Errorf("MarkRead(all) via node 1 returned unread=%d, want 0", mr.GetUnread())
	}
	ws.expectUnread(t, 0)
	if got := unread(t, n2, dave); got != 0 {
		t.Errorf("node2 UnreadCount(dave) = %d after MarkRead via node 1, want 0", got)
	}

	// Cluster-wide stats count dave's socket from either node.
	for _, n := range []*node{n1, n2} {
		statsWhere(t, n, "cluster Stats with dave connected to node 2", func(s *heraldv1.StatsResponse) string {
			if s.GetConnections() < 1 || s.GetOnlineUsers() < 1 {
				return fmt.Sprintf("cluster connections=%d online_users=%d, want >= 1", s.GetConnections(), s.GetOnlineUsers())
			}
			return ""
		})
	}
	if s := stats(t, n2); s.GetNode().GetConnections() < 1 || s.GetNode().GetUsers() < 1 {
		t.Errorf("node2 Stats: node %v with dave connected to it, want connections >= 1 and users >= 1", s.GetNode())
	}

	// DisconnectUser via node 1 closes the socket held by node 2.
	dr, err := n1.client.DisconnectUser(rpcCtx(t), &heraldv1.DisconnectUserRequest{UserId: dave, Reason: "cross-node logout"})
	if err != nil {
		t.Fatalf("node1 DisconnectUser: %v", err)
	}
	if dr.GetClosed() != 1 {
		t.Errorf("node1 DisconnectUser closed %d, want 1 (the socket on node 2)", dr.GetClosed())
	}
	ws.expectClosed(t, 4001, "cross-node logout")
	presenceIs(t, n1, dave, 0)
	presenceIs(t, n2, dave, 0)
}
