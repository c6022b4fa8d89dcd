//! The event log an operator reads (README "Event log"): a real `herald
//! serve` process with `--log-format json`, real WebSocket and tonic
//! clients, and the node's standard error read back line by line.

mod common;
use common::*;

use futures_util::{SinkExt, StreamExt};
use herald::proto::push_service_client::PushServiceClient;
use herald::proto::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;
use tonic::transport::Channel;
use tonic::Code;

/// The flag that configures API keys (one place to change if it is renamed).
const API_KEY_FLAG: &str = "--api-keys";
const READ_KEY: &str = "ops-read-key-0123456789abcdef";
const SEND_KEY: &str = "backend-send-key-fedcba9876543210";
const WRONG_KEY: &str = "nobody-configured-this-key-42424242";

/// A `herald serve` process whose standard error goes to a file.
struct LoggedNode {
    ws: SocketAddr,
    grpc: SocketAddr,
    admin: SocketAddr,
    node_id: String,
    child: Child,
    dir: PathBuf,
}

impl LoggedNode {
    /// Starts a node (embedded backend, ephemeral ports) with `extra` flags
    /// and `env`; `RUST_LOG` and `HERALD_*` settings of the test's own
    /// environment are left out.
    fn start(extra: &[&str], env: &[(&str, &str)]) -> LoggedNode {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("herald-evlog-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let node_id = uid("evlog");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["serve", "--jwt-secret", SECRET, "--node-id", &node_id])
            .args(["--ws-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
        for (k, _) in std::env::vars() {
            if k.starts_with("HERALD_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("herald runs");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("herald ready:") => break l,
                Some(Ok(_)) => continue,
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let err = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
                    panic!("the node exited before it was ready: {err}");
                }
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let field = |k: &str| ready_addr(&ready, k);
        LoggedNode {
            ws: field("ws="),
            grpc: field("grpc="),
            admin: field("admin="),
            node_id,
            child,
            dir,
        }
    }

    /// Everything the node wrote to standard error so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap()
    }

    /// Every complete line, each parsed as JSON (a line that is not JSON
    /// fails the test).
    fn lines(&self) -> Vec<Value> {
        let log = self.log();
        let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// The lines of event `event` for which `pred` holds.
    fn events(&self, event: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["event"] == event && pred(l))
            .collect()
    }

    /// Waits (up to 15 s) for a line of `event` for which `pred` holds.
    async fn wait_for(&self, event: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(l) = self.events(event, &pred).into_iter().next() {
                return l;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("no {event} line as expected in:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.ws)
    }

    async fn connect(&self, token: &str) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(self.ws_url(token))
            .await
            .expect("WebSocket connects");
        Ws { stream }
    }

    /// The HTTP status of a handshake (101 when it succeeds), with an
    /// optional `Origin`.
    async fn handshake_status(&self, token: &str, origin: Option<&str>) -> u16 {
        let mut req = self.ws_url(token).into_client_request().unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("{e}"),
        }
    }

    async fn client(&self) -> PushServiceClient<Channel> {
        PushServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("gRPC connects")
    }
}

impl Drop for LoggedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A request carrying `authorization: Bearer <key>`.
fn with_key<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// Sends a close frame with `code` and waits for the server's answer.
async fn close_with(ws: &mut Ws, code: u16, reason: &str) {
    ws.stream
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        })))
        .await
        .unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.stream.next()).await {}
}

fn is_user(l: &Value, user: &str) -> bool {
    l["user"] == user
}

/// Connections opened and closed (1000 from the client, 4001 from
/// DisconnectUser), refused handshakes (expired token, bad signature,
/// Origin, the per-user cap) and refused calls (unknown key, no key, a key
/// without the scope) each get their line with the documented fields, and
/// no secret, key or token appears anywhere in the log.
#[tokio::test]
async fn the_event_log_names_connections_refusals_and_calls() {
    let read_key = format!("ops:read:{READ_KEY}");
    let send_key = format!("backend:send:{SEND_KEY}");
    let node = LoggedNode::start(
        &[
            "--log-format",
            "json",
            API_KEY_FLAG,
            &read_key,
            API_KEY_FLAG,
            &send_key,
            "--allowed-origin",
            "https://app.example.com",
            "--max-connections-per-user",
            "1",
        ],
        &[],
    );
    let tokens = std::cell::RefCell::new(Vec::new());
    let token_for = |user: &str| {
        let t = token(user);
        tokens.borrow_mut().push(t.clone());
        t
    };

    // Opened, then closed normally by the client.
    let alice = uid("alice");
    let mut ws = node.connect(&token_for(&alice)).await;
    ws.next_of("welcome").await;
    let open = node.wait_for("conn.open", |l| is_user(l, &alice)).await;
    assert_eq!(open["node"], node.node_id.as_str(), "{open}");
    assert_eq!(open["level"], "INFO", "{open}");
    assert_eq!(open["devices"], 1, "{open}");
    assert!(
        open["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{open}"
    );
    let conn = open["conn"].as_str().expect("a connection id").to_string();
    close_with(&mut ws, 1000, "bye").await;
    let close = node.wait_for("conn.close", |l| is_user(l, &alice)).await;
    assert_eq!(close["conn"], conn.as_str(), "{close}");
    assert_eq!(close["code"], 1000, "{close}");
    assert_eq!(close["reason"], "bye", "{close}");
    assert_eq!(close["by"], "client", "{close}");
    assert_eq!(close["devices"], 0, "{close}");
    assert!(close["duration_ms"].is_u64(), "{close}");
    assert_eq!(close["remote"], open["remote"], "{close}");

    // Closed by DisconnectUser: 4001, by the server, with its reason.
    let bob = uid("bob");
    let mut ws = node.connect(&token_for(&bob)).await;
    ws.next_of("welcome").await;
    let mut c = node.client().await;
    c.disconnect_user(with_key(
        DisconnectUserRequest {
            user_id: bob.clone(),
            reason: "account suspended".into(),
        },
        SEND_KEY,
    ))
    .await
    .expect("DisconnectUser with the send key");
    assert_eq!(ws.expect_close().await.0, 4001);
    let close = node.wait_for("conn.close", |l| is_user(l, &bob)).await;
    assert_eq!(close["code"], 4001, "{close}");
    assert_eq!(close["by"], "server", "{close}");
    assert_eq!(close["reason"], "account suspended", "{close}");

    // The per-user cap (1): the second connection is refused with 4029.
    let carol = uid("carol");
    let mut first = node.connect(&token_for(&carol)).await;
    first.next_of("welcome").await;
    let mut second = node.connect(&token_for(&carol)).await;
    assert_eq!(second.first_frame().await, Err(4029));
    let refused = node
        .wait_for("handshake.refused", |l| is_user(l, &carol))
        .await;
    assert_eq!(refused["reason"], "per_user_cap", "{refused}");
    assert_eq!(refused["code"], 4029, "{refused}");
    assert_eq!(refused["node"], node.node_id.as_str(), "{refused}");
    assert!(
        refused["detail"].as_str().unwrap().contains("limit is 1"),
        "{refused}"
    );
    close_with(&mut first, 1000, "").await;

    // An expired token, and one signed with another secret.
    let expired = herald::auth::mint(SECRET, &uid("late"), Duration::ZERO);
    tokens.borrow_mut().push(expired.clone());
    assert_eq!(node.handshake_status(&expired, None).await, 401);
    let refused = node
        .wait_for("handshake.refused", |l| l["reason"] == "token_expired")
        .await;
    assert_eq!(refused["status"], 401, "{refused}");
    assert_eq!(refused["detail"], "token expired", "{refused}");
    assert!(
        refused["remote"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{refused}"
    );
    let forged = herald::auth::mint("some-other-secret-987654", &uid("forger"), WAIT);
    tokens.borrow_mut().push(forged.clone());
    assert_eq!(node.handshake_status(&forged, None).await, 401);
    node.wait_for("handshake.refused", |l| {
        l["reason"] == "token_bad_signature" && l["status"] == 401
    })
    .await;

    // An Origin that is not allowed (the allowed one passes).
    let dave_token = token_for(&uid("dave"));
    assert_eq!(
        node.handshake_status(&dave_token, Some("https://evil.example.org"))
            .await,
        403
    );
    let refused = node
        .wait_for("handshake.refused", |l| l["reason"] == "origin")
        .await;
    assert_eq!(refused["origin"], "https://evil.example.org", "{refused}");
    assert_eq!(refused["status"], 403, "{refused}");
    assert_eq!(
        node.handshake_status(&dave_token, Some("https://app.example.com"))
            .await,
        101
    );

    // Refused calls: an unknown key, no key, a key without the scope.
    let ask = || IsOnlineRequest {
        user_ids: vec![alice.clone()],
    };
    let e = c.is_online(with_key(ask(), WRONG_KEY)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let refused = node
        .wait_for("rpc.refused", |l| l["reason"] == "unknown_key")
        .await;
    assert_eq!(refused["key"], "unknown", "{refused}");
    assert_eq!(
        refused["method"], "herald.v1.PushService/IsOnline",
        "{refused}"
    );
    assert_eq!(refused["code"], "Unauthenticated", "{refused}");
    assert_eq!(refused["node"], node.node_id.as_str(), "{refused}");
    assert!(
        refused["remote"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{refused}"
    );
    let e = c.is_online(ask()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let refused = node
        .wait_for("rpc.refused", |l| l["reason"] == "missing_key")
        .await;
    assert_eq!(refused["key"], "none", "{refused}");
    let e = c
        .send_to_user(with_key(
            SendToUserRequest {
                user_ids: vec![alice.clone()],
                payload_json: "{}".into(),
                ..Default::default()
            },
            READ_KEY,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let refused = node
        .wait_for("rpc.refused", |l| l["reason"] == "scope")
        .await;
    assert_eq!(refused["key"], "ops", "{refused}");
    assert_eq!(
        refused["method"], "herald.v1.PushService/SendToUser",
        "{refused}"
    );
    assert_eq!(refused["code"], "PermissionDenied", "{refused}");
    // A call the key allows is not refused (and, at INFO, not logged).
    c.is_online(with_key(ask(), READ_KEY))
        .await
        .expect("a read call");

    // The whole log: JSON lines with a time, a level and a target; no
    // secret, key or token anywhere (not even a token's signature).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = node.lines();
    for l in &lines {
        assert!(
            l["ts"].is_string() && l["level"].is_string() && l["target"].is_string(),
            "{l}"
        );
    }
    assert!(
        node.events("rpc", |_| true).is_empty(),
        "rpc lines are DEBUG"
    );
    let log = node.log();
    for secret in [
        SECRET,
        READ_KEY,
        SEND_KEY,
        WRONG_KEY,
        "some-other-secret-987654",
    ] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
    for t in tokens.borrow().iter() {
        let signature = t.rsplit('.').next().unwrap();
        assert!(
            !log.contains(t.as_str()) && !log.contains(signature),
            "a token in the log:\n{log}"
        );
    }
}

/// A client that goes away without a close frame (a tab closed, a network
/// gone: FIN or RST) is a connection lost (1006), not a protocol violation
/// (1002): neither the log nor `herald_client_frames_rejected_total` says
/// so. A client closing with 1001 (going away) is logged as it sent it.
#[tokio::test]
async fn a_vanished_client_is_not_a_protocol_violation() {
    let node = LoggedNode::start(&["--log-format", "json"], &[]);
    for (how, rst) in [("fin", false), ("rst", true)] {
        let user = uid(how);
        let mut ws = node.connect(&token(&user)).await;
        ws.next_of("welcome").await;
        node.wait_for("conn.open", |l| is_user(l, &user)).await;
        if rst {
            let MaybeTlsStream::Plain(tcp) = ws.stream.get_mut() else {
                panic!("a plain socket")
            };
            // A zero linger resets the connection on drop (it never blocks).
            #[allow(deprecated)]
            tcp.set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(ws);
        let close = node.wait_for("conn.close", |l| is_user(l, &user)).await;
        assert_eq!(close["code"], 1006, "{how}: {close}");
        assert_eq!(close["by"], "lost", "{how}: {close}");
    }
    let user = uid("tab");
    let mut ws = node.connect(&token(&user)).await;
    ws.next_of("welcome").await;
    close_with(&mut ws, 1001, "").await;
    let close = node.wait_for("conn.close", |l| is_user(l, &user)).await;
    assert_eq!(
        (close["code"].as_u64(), close["by"].as_str()),
        (Some(1001), Some("client")),
        "{close}"
    );

    let log = node.log().to_lowercase();
    assert!(
        !log.contains("protocol violation") && !log.contains("1002"),
        "{log}"
    );
    let metrics = http_get(node.admin, "/metrics").await;
    assert!(
        !metrics.contains("herald_client_frames_rejected_total{reason=\"protocol\"}"),
        "{metrics}"
    );
}

/// True for a line from the HTTP/2, hyper, tower, tonic or TLS internals.
fn transport_line(l: &Value) -> bool {
    let t = l["target"].as_str().unwrap_or("");
    [
        "h2",
        "hyper",
        "tower",
        "tonic",
        "rustls",
        "tokio_rustls",
        "tungstenite",
    ]
    .iter()
    .any(|p| t == *p || t.starts_with(&format!("{p}::")))
}

async fn some_calls(node: &LoggedNode, user: &str) {
    let mut c = node.client().await;
    let mut ws = node.connect(&token(user)).await;
    ws.next_of("welcome").await;
    c.send_to_user(SendToUserRequest {
        user_ids: vec![user.into(), uid("nobody")],
        payload_json: "{\"n\":1}".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    ws.next_of("message").await;
    c.stats(StatsRequest {}).await.unwrap();
}

/// `--log-level debug` adds a line per call (method, key name, recipients,
/// code, microseconds) but no HTTP/2 frame tracing; `RUST_LOG=h2=debug`,
/// which names h2, does show it.
#[tokio::test]
async fn debug_level_logs_calls_and_no_http2_frames() {
    let node = LoggedNode::start(&["--log-format", "json", "--log-level", "debug"], &[]);
    let user = uid("dbg");
    some_calls(&node, &user).await;
    let rpc = node
        .wait_for("rpc", |l| l["method"] == "herald.v1.PushService/SendToUser")
        .await;
    assert_eq!(rpc["level"], "DEBUG", "{rpc}");
    assert_eq!(rpc["key"], "anonymous", "{rpc}");
    assert_eq!(rpc["recipients"], 2, "{rpc}");
    assert_eq!(rpc["code"], "OK", "{rpc}");
    assert!(rpc["micros"].is_u64(), "{rpc}");
    node.wait_for("rpc", |l| l["method"] == "herald.v1.PushService/Stats")
        .await;
    let noisy: Vec<Value> = node.lines().into_iter().filter(transport_line).collect();
    assert!(
        noisy.is_empty(),
        "transport lines at --log-level debug: {noisy:?}"
    );

    // The same calls with RUST_LOG naming h2: its frames are there (so the
    // check above can see them).
    let node = LoggedNode::start(&["--log-format", "json"], &[("RUST_LOG", "h2=debug")]);
    some_calls(&node, &uid("h2")).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !node.lines().iter().any(transport_line) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no h2 line with RUST_LOG=h2=debug"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A flood of identical refusals writes the first few lines of each
/// window, then one `log.suppressed` line counting the rest.
#[tokio::test]
async fn a_flood_of_refusals_is_rate_limited() {
    let node = LoggedNode::start(&["--log-format", "json"], &[]);
    let flood = 4 * herald::telemetry::BURST as u64;
    for _ in 0..flood {
        let expired = herald::auth::mint(SECRET, "flood", Duration::ZERO);
        assert_eq!(node.handshake_status(&expired, None).await, 401);
    }
    let suppressed = node
        .wait_for("log.suppressed", |l| l["reason"] == "token_expired")
        .await;
    assert_eq!(suppressed["of"], "handshake.refused", "{suppressed}");
    assert_eq!(suppressed["level"], "WARN", "{suppressed}");
    let written = node
        .events("handshake.refused", |l| l["reason"] == "token_expired")
        .len() as u64;
    assert_eq!(written, herald::telemetry::BURST as u64);
    assert_eq!(suppressed["suppressed"], flood - written, "{suppressed}");
}
