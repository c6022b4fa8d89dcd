//! The public listener: the WebSocket handshake on `/ws` (token check before
//! any upgrade) and the per-connection task.
//!
//! One task per connection does everything for it: it writes queued frames
//! (all that are queued, then one flush), reads client frames, and answers
//! the node's heartbeat ticks. There is no second task, no channel and no
//! timer per connection; the hub's queue, the socket's buffers and a small
//! task state are the connection's whole memory (see BENCHMARKS.md).

use crate::auth::{bearer, TokenVerifier, Verified};
use crate::error::Error;
use crate::expiry::Expiries;
use crate::http::{respond, ConnPermit};
use crate::hub::{Conn, Outbound};
use crate::node::{ClientOp, Node};
use crate::origin::Origins;
use crate::protocol::{self, ClientFrame, Disconnect, MessageId};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::create_response;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod client_js;
mod frames;
use frames::*;

/// The demo page, embedded in the binary so a node serves it with no files
/// beside it: (path, content type, body). The client, `/herald.js`, is
/// served by [`client_js`].
const DEMO: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../clients/js/demo/index.html"),
    ),
    (
        "/demo/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../clients/js/demo/app.js"),
    ),
    (
        "/demo/style.css",
        "text/css; charset=utf-8",
        include_str!("../clients/js/demo/style.css"),
    ),
];

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// What the public listener needs to serve a request.
pub struct Gateway {
    pub node: Arc<Node>,
    pub verifier: TokenVerifier,
    /// Connections by token expiry; the node's ticker closes them at `exp`.
    pub expiries: Arc<Expiries>,
    /// Allowed `Origin`s of handshakes (empty: all).
    pub origins: Origins,
    /// Connection tasks, so shutdown can wait for their close frames.
    pub tasks: TaskTracker,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(body.into()),
    )
}

impl Gateway {
    /// Serves one HTTP request on the public listener.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, hyper::Error> {
        match (req.method(), req.uri().path()) {
            (&hyper::Method::GET, "/ws") => Ok(self.upgrade(req)),
            (&hyper::Method::GET, "/healthz") => Ok(text(StatusCode::OK, "ok\n")),
            (_, "/herald.js") => Ok(client_js::serve(&req, &self.origins)),
            (&hyper::Method::GET, path) => Ok(match DEMO.iter().find(|(p, _, _)| *p == path) {
                Some((_, ctype, body)) => {
                    let mut r = respond(StatusCode::OK, ctype, Bytes::from_static(body.as_bytes()));
                    r.headers_mut()
                        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                    r
                }
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            }),
            _ => Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")),
        }
    }

    fn upgrade(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        // Only the head matters from here on (the body of a GET is empty).
        let mut req = Request::from_parts(req.into_parts().0, ());
        let origin = req.headers().get(header::ORIGIN);
        if !self
            .origins
            .allows(origin.map(|o| o.to_str().unwrap_or("\u{fffd}")))
        {
            metrics::counter!("herald_ws_rejected_total", "reason" => "origin").increment(1);
            return text(
                StatusCode::FORBIDDEN,
                "this Origin is not allowed to open WebSockets here (see --allowed-origin)\n",
            );
        }
        let Credentials {
            token,
            since,
            subprotocol,
        } = match credentials(&req) {
            Ok(c) => c,
            Err(why) => {
                metrics::counter!("herald_ws_rejected_total", "reason" => "bad_request")
                    .increment(1);
                return text(StatusCode::BAD_REQUEST, format!("{why}\n"));
            }
        };
        let Some(token) = token else {
            metrics::counter!("herald_ws_rejected_total", "reason" => "unauthorized").increment(1);
            return text(
                StatusCode::UNAUTHORIZED,
                "missing token: pass Sec-WebSocket-Protocol: herald.v1, herald.token.<JWT>, \
                 Authorization: Bearer <JWT> or ?token=<JWT>\n",
            );
        };
        let verified = match self.verifier.verify(&token) {
            Ok(v) => v,
            Err(why) => {
                metrics::counter!("herald_ws_rejected_total", "reason" => "unauthorized")
                    .increment(1);
                return text(StatusCode::UNAUTHORIZED, format!("{why}\n"));
            }
        };
        let since: Option<MessageId> = match since.as_deref().map(str::parse) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(e)) => return text(StatusCode::BAD_REQUEST, format!("since: {e}\n")),
        };
        // tungstenite validates the handshake (GET, HTTP/1.1 or newer,
        // Connection/Upgrade, version 13, the key) and derives the accept key.
        let mut accepted = match create_response(&req) {
            Ok(r) => r,
            Err(WsError::Protocol(
                e @ (ProtocolError::MissingConnectionUpgradeHeader
                | ProtocolError::MissingUpgradeWebSocketHeader),
            )) => {
                return text(
                    StatusCode::UPGRADE_REQUIRED,
                    format!("this endpoint speaks WebSocket only: {e}\n"),
                )
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        if subprotocol {
            // RFC 6455 4.2.2: the server echoes one protocol the client
            // offered; never the token.
            accepted.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        let permit = req.extensions_mut().remove::<ConnPermit>();
        let gw = self.clone();
        self.tasks.spawn(async move {
            let _permit = permit;
            match on_upgrade.await {
                Ok(upgraded) => {
                    let limits = &gw.node.cfg.limits;
                    let config = WebSocketConfig::default()
                        .read_buffer_size(512)
                        .write_buffer_size(16 * 1024)
                        .max_write_buffer_size(8 * 1024 * 1024)
                        .max_message_size(Some(limits.max_client_frame_bytes))
                        .max_frame_size(Some(limits.max_client_frame_bytes));
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    run(gw.node.clone(), &gw.expiries, verified, since, ws).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        accepted.map(|()| Full::new(Bytes::new()))
    }
}

/// The protocol a client names in `Sec-WebSocket-Protocol`, and the one the
/// server echoes.
pub const SUBPROTOCOL: &str = "herald.v1";
/// The prefix of the protocol entry that carries a token:
/// `Sec-WebSocket-Protocol: herald.v1, herald.token.<JWT>`. A JWT is made
/// of base64url and dots, which are valid in a protocol token, so browsers
/// can send it without putting it in the URL.
pub const TOKEN_PROTOCOL_PREFIX: &str = "herald.token.";

/// What a handshake request carries: the token (from
/// `Sec-WebSocket-Protocol`, `Authorization` or `?token=`, in that order),
/// `since`, and whether `herald.v1` was offered (then it is echoed).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Credentials<'a> {
    pub token: Option<std::borrow::Cow<'a, str>>,
    pub since: Option<String>,
    pub subprotocol: bool,
}

/// Reads the token, `since` and the subprotocol offer of a handshake
/// request. Errors are fit for a 400 body. The query string is never
/// logged (it may hold a token).
pub(crate) fn credentials<T>(req: &Request<T>) -> Result<Credentials<'_>, String> {
    let mut c = Credentials::default();
    let mut offered_token = None;
    for value in req.headers().get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value
            .to_str()
            .map_err(|_| "Sec-WebSocket-Protocol is not ASCII".to_string())?;
        for p in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if p == SUBPROTOCOL {
                c.subprotocol = true;
            } else if let Some(t) = p.strip_prefix(TOKEN_PROTOCOL_PREFIX) {
                if offered_token.replace(t).is_some() {
                    return Err("Sec-WebSocket-Protocol carries two tokens".into());
                }
            }
        }
    }
    if offered_token.is_some() && !c.subprotocol {
        return Err(format!(
            "Sec-WebSocket-Protocol: offer {SUBPROTOCOL} along with {TOKEN_PROTOCOL_PREFIX}<JWT> \
             (the server must echo a protocol, and never echoes the token)"
        ));
    }
    let mut query_token = None;
    if let Some(q) = req.uri().query() {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            match &*k {
                "token" => query_token = Some(v),
                "since" if !v.is_empty() => c.since = Some(v.into_owned()),
                _ => {}
            }
        }
    }
    c.token = offered_token
        .map(std::borrow::Cow::Borrowed)
        .or_else(|| {
            req.headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer)
                .map(std::borrow::Cow::Borrowed)
        })
        .or(query_token);
    Ok(c)
}

/// The closing handshake: send our close frame, then keep reading (and
/// dropping) until the client's close frame arrives, so the client reads
/// our frame before the TCP connection goes away. Bounded by 2 s.
async fn send_close(ws: &mut Socket, why: &Disconnect) {
    tracing::debug!(code = why.code(), reason = %why.reason(), reconnect = why.reconnect(), "closing connection");
    let frame = CloseFrame {
        code: why.code().into(),
        reason: why.reason().into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// One connection's whole life, from attach to detach. Everything it logs
/// carries the node, the user and (once attached) the connection id.
///
/// Not an `async fn` under `#[tracing::instrument]`: that keeps the
/// arguments (the socket among them) in the outer future and again in the
/// instrumented inner one, for the connection's whole life; here they are
/// captured once.
fn run<'a>(
    node: Arc<Node>,
    expiries: &'a Expiries,
    token: Verified,
    since: Option<MessageId>,
    ws: Socket,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    let span = tracing::info_span!("conn", node = %node.cfg.node_id, user = %token.user, conn = tracing::field::Empty);
    connection(node, expiries, token, since, ws).instrument(span)
}

async fn connection(
    node: Arc<Node>,
    expiries: &Expiries,
    token: Verified,
    since: Option<MessageId>,
    mut ws: Socket,
) {
    let user = token.user;
    // Futures awaited once (attach, close) are boxed so that they do not
    // widen the state every idle connection's task keeps.
    let conn = match Box::pin(node.attach(&user)).await {
        Ok(c) => c,
        Err(Error::ResourceExhausted(m)) => {
            metrics::counter!("herald_ws_rejected_total", "reason" => "too_many_connections")
                .increment(1);
            return Box::pin(send_close(&mut ws, &Disconnect::TooManyConnections(m))).await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot attach connection");
            return Box::pin(send_close(&mut ws, &Disconnect::BackendUnavailable)).await;
        }
    };
    tracing::Span::current().record("conn", conn.id);
    metrics::counter!("herald_ws_connections_total").increment(1);
    expiries.watch(token.exp, &conn);
    let end = serve(&node, &conn, since, &mut ws).await;
    expiries.forget(token.exp, conn.id);
    Box::pin(node.detach(&conn)).await;
    if let Some(why) = end {
        Box::pin(send_close(&mut ws, &why)).await;
    }
}

/// Why a connection ended: `Some` to send a close frame, `None` if the
/// socket is already gone or closed.
type End = Option<Disconnect>;

async fn serve(node: &Node, conn: &Conn, since: Option<MessageId>, ws: &mut Socket) -> End {
    let heartbeat = node.cfg.heartbeat;
    let limits = &node.cfg.limits;
    let write_timeout = limits.write_timeout;
    let replay = match Box::pin(node.replay(&conn.user, since)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "replay failed");
            return Some(Disconnect::BackendUnavailable);
        }
    };
    let welcome = protocol::welcome_frame(
        &node.hub.conn_label(conn),
        &conn.user,
        replay.unread,
        replay.messages.len(),
        replay.resumed,
    );
    let mut head = replay.head;
    let mut batch: Vec<Outbound> = Vec::with_capacity(replay.messages.len() + 1);
    batch.push(Outbound {
        id: None,
        frame: welcome,
    });
    batch.extend(
        replay
            .messages
            .into_iter()
            .map(|(_, frame)| Outbound { id: None, frame }),
    );
    if !Box::pin(write(ws, &mut batch, &mut head, write_timeout, false)).await {
        return None;
    }
    batch = Vec::new();

    // While idle, the task waits here on two things only: its hub entry
    // (frames, close, resync, heartbeat ticks from the node's one heartbeat
    // timer) and the socket. No per-connection timer exists.
    let mut budget = Budget::new(limits.client_frame_burst);
    // The newest `read` position the client asked for and the backend has
    // not been told yet: a burst of reads costs the backend one write.
    let mut pending_read: Option<MessageId> = None;
    loop {
        tokio::select! {
            // Outbound work first, then every client frame that is already
            // readable, and only then the coalesced read.
            biased;
            _ = conn.wait() => {
                let pending = conn.take(&mut batch);
                if pending.resync {
                    // Live delivery had a gap: fetch what was stored after
                    // the last message this connection saw, then go on
                    // (live frames at or below it are dropped in write).
                    match Box::pin(catch_up(&node, &conn.user, head)).await {
                        Ok(r) => {
                            let mut caught: Vec<Outbound> = Vec::with_capacity(r.messages.len() + batch.len());
                            caught.extend(r.messages.into_iter().map(|(id, frame)| Outbound { id: Some(id), frame }));
                            caught.append(&mut batch);
                            batch = caught;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "catch-up after broker reconnect failed");
                            return Some(Disconnect::BackendUnavailable);
                        }
                    }
                }
                if pending.heartbeat && budget.last_seen.elapsed() >= heartbeat * 2 {
                    metrics::counter!("herald_heartbeat_timeouts_total").increment(1);
                    return Some(Disconnect::HeartbeatTimeout);
                }
                if !batch.is_empty() || pending.heartbeat {
                    if !Box::pin(write(ws, &mut batch, &mut head, write_timeout, pending.heartbeat)).await {
                        return None;
                    }
                    if batch.capacity() > 64 {
                        batch = Vec::new(); // give back what a burst grew
                    }
                }
                if pending.close.is_some() {
                    return pending.close;
                }
            }
            msg = ws.next() => {
                let Some(msg) = msg else { return None };
                if !budget.take(limits.client_frame_rate, limits.client_frame_burst) {
                    metrics::counter!("herald_client_frames_rejected_total", "reason" => "rate").increment(1);
                    conn.send(protocol::error_frame("rate_limited", &format!(
                        "more than {} frames/s (burst {}): closing",
                        limits.client_frame_rate, limits.client_frame_burst
                    )));
                    conn.close(Disconnect::RateLimited);
                    continue; // the queued error frame goes out before the close
                }
                match msg {
                    Err(WsError::Capacity(_)) => {
                        metrics::counter!("herald_client_frames_rejected_total", "reason" => "too_big").increment(1);
                        return Some(Disconnect::FrameTooBig(limits.max_client_frame_bytes));
                    }
                    Err(WsError::Utf8(_)) => {
                        metrics::counter!("herald_client_frames_rejected_total", "reason" => "utf8").increment(1);
                        return Some(Disconnect::InvalidUtf8);
                    }
                    Err(WsError::Protocol(e)) => {
                        metrics::counter!("herald_client_frames_rejected_total", "reason" => "protocol").increment(1);
                        tracing::debug!(error = %e, "client broke the WebSocket protocol");
                        return Some(Disconnect::ProtocolViolation);
                    }
                    Err(_) => return None,
                    Ok(Message::Text(t)) => match client_frame(t.as_str(), limits.max_topic_bytes) {
                        Asked::Read(id) => pending_read = pending_read.max(Some(id)),
                        Asked::Reply(reply) => {
                            conn.send(reply);
                        }
                        Asked::Center(op) => {
                            // A history page costs more of the budget: its
                            // reply can be large.
                            if matches!(op, ClientOp::History { .. }) && !budget.take_more(HISTORY_EXTRA_COST) {
                                metrics::counter!("herald_client_frames_rejected_total", "reason" => "rate").increment(1);
                                conn.send(protocol::error_frame("rate_limited", "history pages too fast: closing"));
                                conn.close(Disconnect::RateLimited);
                                continue;
                            }
                            // Reads queued before this frame go first: the
                            // client's order is kept.
                            if let Some(up_to) = pending_read.take() {
                                center_reply(conn, Box::pin(node.client_read(&conn.user, up_to)).await.map(|_| None));
                            }
                            center_reply(conn, Box::pin(node.client_center(&conn.user, op)).await);
                        }
                    },
                    Ok(Message::Binary(_)) => {
                        conn.send(protocol::error_frame("bad_frame", "binary frames are not part of the protocol; send JSON text frames"));
                    }
                    Ok(Message::Ping(_)) => {
                        // tungstenite queued the pong; push it out now.
                        if !Box::pin(write(ws, &mut batch, &mut head, write_timeout, false)).await {
                            return None;
                        }
                    }
                    Ok(Message::Close(_)) => {
                        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(2), ws.flush())).await;
                        return None;
                    }
                    Ok(_) => {}
                }
            }
            _ = std::future::ready(()), if pending_read.is_some() => {
                let up_to = pending_read.take().expect("guarded");
                // Every connection of the user, this one included, gets the
                // new count through the broker when it changed.
                match Box::pin(node.client_read(&conn.user, up_to)).await {
                    Ok(_) => {}
                    Err(Error::InvalidArgument(m)) => {
                        conn.send(protocol::error_frame("bad_request", &m));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "read failed");
                        conn.send(protocol::error_frame(
                            "unavailable",
                            "could not mark read: backend unavailable, retry shortly",
                        ));
                    }
                }
            }
        }
    }
}

/// Writes `batch` (all of it, then one flush), skipping stored messages at
/// or below `head` (already sent by a replay, or duplicates) and advancing
/// `head`. With `ping`, a WebSocket ping goes out after the batch. False
/// when the socket failed or the write took longer than `timeout` (a peer
/// that stopped reading).
async fn write(
    ws: &mut Socket,
    batch: &mut Vec<Outbound>,
    head: &mut MessageId,
    timeout: Duration,
    ping: bool,
) -> bool {
    let io = async {
        for out in batch.drain(..) {
            if let Some(id) = out.id {
                if id <= *head {
                    continue;
                }
                *head = id;
            }
            ws.feed(Message::Text(out.frame)).await?;
        }
        if ping {
            ws.feed(Message::Ping(Bytes::new())).await?;
        }
        ws.flush().await
    };
    match tokio::time::timeout(timeout, io).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            metrics::counter!("herald_write_timeouts_total").increment(1);
            false
        }
    }
}

/// How long a connection keeps trying to catch up from the inbox while the
/// backend is unavailable (a Redis Cluster shard failing over takes about
/// its `cluster-node-timeout` plus an election) before it closes with 1013.
const CATCH_UP_PATIENCE: Duration = Duration::from_secs(10);

/// Reads what was stored after `head`, retrying with backoff while the
/// backend is unavailable (for up to [`CATCH_UP_PATIENCE`]). Frames that
/// arrive meanwhile wait in the connection's bounded queue.
async fn catch_up(
    node: &Node,
    user: &str,
    head: MessageId,
) -> crate::error::Result<crate::backend::Replay> {
    let deadline = tokio::time::Instant::now() + CATCH_UP_PATIENCE;
    let mut backoff = Duration::from_millis(100);
    loop {
        match node.replay(user, Some(head)).await {
            Err(crate::error::Error::Unavailable(_))
                if tokio::time::Instant::now() + backoff < deadline =>
            {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Property tests of the handshake's untrusted inputs: the
    //! `Sec-WebSocket-Protocol` list, `Authorization` and the query string.
    //! Failing inputs are kept in `proptest-regressions/ws.txt`.
    use super::*;
    use proptest::prelude::*;

    fn request(protocol: Option<&str>, auth: Option<&str>, query: &str) -> Option<Request<()>> {
        let mut b = Request::builder().uri(format!("/ws?{query}"));
        if let Some(p) = protocol {
            b = b.header(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(()).ok()
    }

    #[test]
    fn token_sources_in_order() {
        let r = request(
            Some("herald.v1, herald.token.AAA.BBB.CCC"),
            Some("Bearer hdr"),
            "token=q&since=1-0",
        )
        .unwrap();
        let c = credentials(&r).unwrap();
        assert_eq!(c.token.as_deref(), Some("AAA.BBB.CCC"));
        assert!(c.subprotocol);
        assert_eq!(c.since.as_deref(), Some("1-0"));
        let r = request(None, Some("bearer hdr"), "token=q").unwrap();
        assert_eq!(credentials(&r).unwrap().token.as_deref(), Some("hdr"));
        let r = request(None, None, "token=q%2Bx").unwrap();
        assert_eq!(credentials(&r).unwrap().token.as_deref(), Some("q+x"));
        let r = request(Some("herald.token.x"), None, "").unwrap();
        assert!(credentials(&r).unwrap_err().contains("herald.v1"));
        let r = request(Some("herald.v1,herald.token.a,herald.token.b"), None, "").unwrap();
        assert!(credentials(&r).unwrap_err().contains("two tokens"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Whatever the headers and query say, reading credentials never
        /// panics, a protocol-borne token needs herald.v1, and a token
        /// found is a substring of what was sent.
        #[test]
        fn credentials_never_panic(
            protocol in proptest::option::of("[ -~]{0,120}"),
            auth in proptest::option::of("[ -~]{0,80}"),
            query in "[ -~&=%]{0,120}",
        ) {
            let Some(req) = request(protocol.as_deref(), auth.as_deref(), &query) else {
                return Ok(()); // not a valid request head: hyper would refuse it
            };
            match credentials(&req) {
                Ok(c) => {
                    if let Some(t) = &c.token {
                        let from_header = protocol.as_deref().is_some_and(|p| p.contains(&**t))
                            || auth.as_deref().is_some_and(|a| a.contains(&**t));
                        prop_assert!(from_header || !query.is_empty());
                        prop_assert!(t.len() <= 240);
                    }
                    if protocol.as_deref().is_some_and(|p| p.split(',').any(|x| x.trim().starts_with(TOKEN_PROTOCOL_PREFIX))) {
                        prop_assert!(c.subprotocol);
                    }
                }
                Err(m) => prop_assert!(m.len() < 300),
            }
        }

        /// Any token text is refused or accepted without panicking, and the
        /// refusal never echoes the token.
        #[test]
        fn token_verification_never_panics(token in "[A-Za-z0-9_\\-.=]{0,400}|\\PC{0,100}") {
            let v = TokenVerifier::new("proptest-secret", 256);
            if let Err(why) = v.verify(&token) {
                prop_assert!(why.len() < 300);
                if token.len() > 8 {
                    prop_assert!(!why.contains(&token));
                }
            }
        }

        /// A minted token verifies exactly when its subject is a valid
        /// user id (`protocol::check_user_id`, the rule gRPC applies too),
        /// and then names that user.
        #[test]
        fn minted_tokens_verify_exactly_when_the_subject_is_a_valid_user_id(
            user in "\\PC{1,64}|[a-z]{0,4}[\\x00-\\x1f\\x7f\\u{85}\\u{2028}\\u{2029}][a-z]{0,4}",
        ) {
            let v = TokenVerifier::new("proptest-secret", 256);
            let t = crate::auth::mint("proptest-secret", &user, Duration::from_secs(60));
            match protocol::check_user_id(&user, 256) {
                Ok(()) => prop_assert_eq!(v.verify(&t).unwrap().user, user),
                Err(_) => prop_assert!(v.verify(&t).unwrap_err().contains("not a valid user id")),
            }
        }
    }
}
