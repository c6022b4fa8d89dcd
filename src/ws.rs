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
use crate::http::{respond, ConnPermit, Peer};
use crate::hub::{Conn, Outbound};
use crate::node::{ClientOp, Node};
use crate::origin::Origins;
use crate::protocol::{self, ClientFrame, Disconnect, MessageId};
use crate::telemetry::{self, Closed, ClosedBy, Refused};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
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

    /// Logs a refused handshake and builds its response.
    fn refuse(
        &self,
        remote: Option<SocketAddr>,
        reason: &'static str,
        status: StatusCode,
        body: String,
    ) -> Response<Full<Bytes>> {
        telemetry::handshake_refused(&Refused {
            node: &self.node.cfg.node_id,
            reason,
            remote,
            status: Some(status.as_u16()),
            code: None,
            user: None,
            origin: None,
            detail: body.trim_end(),
        });
        text(status, body)
    }

    fn upgrade(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        // Only the head matters from here on (the body of a GET is empty).
        let mut req = Request::from_parts(req.into_parts().0, ());
        let remote = req.extensions().get::<Peer>().map(|p| p.0);
        let origin = req.headers().get(header::ORIGIN);
        let origin = origin.map(|o| o.to_str().unwrap_or("\u{fffd}"));
        if !self.origins.allows(origin) {
            metrics::counter!("herald_ws_rejected_total", "reason" => "origin").increment(1);
            let detail =
                "this Origin is not allowed to open WebSockets here (see --allowed-origin)";
            telemetry::handshake_refused(&Refused {
                node: &self.node.cfg.node_id,
                reason: "origin",
                remote,
                status: Some(StatusCode::FORBIDDEN.as_u16()),
                code: None,
                user: None,
                origin: origin.map(|o| protocol::truncate_utf8(o, 200)),
                detail,
            });
            return text(StatusCode::FORBIDDEN, format!("{detail}\n"));
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
                return self.refuse(
                    remote,
                    "bad_request",
                    StatusCode::BAD_REQUEST,
                    format!("{why}\n"),
                );
            }
        };
        let Some(token) = token else {
            metrics::counter!("herald_ws_rejected_total", "reason" => "unauthorized").increment(1);
            return self.refuse(
                remote,
                "token_missing",
                StatusCode::UNAUTHORIZED,
                "missing token: pass Sec-WebSocket-Protocol: herald.v1, herald.token.<JWT>, \
                 Authorization: Bearer <JWT> or ?token=<JWT>\n"
                    .into(),
            );
        };
        let verified = match self.verifier.check(&token) {
            Ok(v) => v,
            Err(why) => {
                metrics::counter!("herald_ws_rejected_total", "reason" => "unauthorized")
                    .increment(1);
                return self.refuse(
                    remote,
                    why.reason,
                    StatusCode::UNAUTHORIZED,
                    format!("{}\n", why.message),
                );
            }
        };
        let since: Option<MessageId> = match since.as_deref().map(str::parse) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(e)) => {
                return self.refuse(
                    remote,
                    "bad_request",
                    StatusCode::BAD_REQUEST,
                    format!("since: {e}\n"),
                )
            }
        };
        // tungstenite validates the handshake (GET, HTTP/1.1 or newer,
        // Connection/Upgrade, version 13, the key) and derives the accept key.
        let mut accepted = match create_response(&req) {
            Ok(r) => r,
            Err(WsError::Protocol(
                e @ (ProtocolError::MissingConnectionUpgradeHeader
                | ProtocolError::MissingUpgradeWebSocketHeader),
            )) => {
                return self.refuse(
                    remote,
                    "not_websocket",
                    StatusCode::UPGRADE_REQUIRED,
                    format!("this endpoint speaks WebSocket only: {e}\n"),
                )
            }
            Err(e) => {
                return self.refuse(
                    remote,
                    "bad_request",
                    StatusCode::BAD_REQUEST,
                    format!("{e}\n"),
                )
            }
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
                    run(gw.node.clone(), &gw.expiries, verified, since, remote, ws).await;
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
    remote: Option<SocketAddr>,
    ws: Socket,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    let span = tracing::info_span!("conn", node = %node.cfg.node_id, user = %token.user, conn = tracing::field::Empty);
    connection(node, expiries, token, since, remote, ws).instrument(span)
}

async fn connection(
    node: Arc<Node>,
    expiries: &Expiries,
    token: Verified,
    since: Option<MessageId>,
    remote: Option<SocketAddr>,
    mut ws: Socket,
) {
    let user = token.user;
    // Futures awaited once (attach, close) are boxed so that they do not
    // widen the state every idle connection's task keeps.
    let conn = match Box::pin(node.attach(&user)).await {
        Ok(c) => c,
        Err(e) => {
            let (why, reason) = match e {
                Error::ResourceExhausted(m) => {
                    metrics::counter!("herald_ws_rejected_total", "reason" => "too_many_connections")
                        .increment(1);
                    (Disconnect::TooManyConnections(m), "per_user_cap")
                }
                e => (
                    Disconnect::BackendUnavailable,
                    if matches!(e, Error::Unavailable(_)) {
                        "backend_unavailable"
                    } else {
                        "backend_error"
                    },
                ),
            };
            let detail = why.reason();
            telemetry::handshake_refused(&Refused {
                node: &node.cfg.node_id,
                reason,
                remote,
                status: None,
                code: Some(why.code()),
                user: Some(user.as_str()),
                origin: None,
                detail: &detail,
            });
            return Box::pin(send_close(&mut ws, &why)).await;
        }
    };
    let opened = Instant::now();
    metrics::counter!("herald_ws_connections_total").increment(1);
    {
        // The id the client's welcome frame carries, in every line.
        let label = node.hub.conn_label(&conn);
        tracing::Span::current().record("conn", label.as_str());
        let devices = node.hub.user_connections(&user);
        telemetry::conn_open(&node.cfg.node_id, &label, &user, remote, devices);
    }
    expiries.watch(token.exp, &conn);
    let end = serve(&node, &conn, since, &mut ws).await;
    expiries.forget(token.exp, conn.id);
    Box::pin(node.detach(&conn)).await;
    let (code, reason, by, close) = match end {
        End::Server(why) => (why.code(), why.reason(), ClosedBy::Server, Some(why)),
        End::Client(code, reason) => (code, reason, ClosedBy::Client, None),
        End::Lost(what) => (CLOSED_ABNORMALLY, what.into(), ClosedBy::Lost, None),
    };
    // Logged when the node knows how the connection ends (its closing
    // handshake, below, may take up to 2 s more).
    telemetry::conn_close(&Closed {
        node: &node.cfg.node_id,
        conn: &node.hub.conn_label(&conn),
        user: &user,
        remote,
        devices: node.hub.user_connections(&user),
        code,
        reason: &reason,
        by,
        duration: opened.elapsed(),
    });
    if let Some(why) = close {
        Box::pin(send_close(&mut ws, &why)).await;
    }
}

/// The close code of a connection that ended without a close frame (RFC
/// 6455 7.1.5; never sent on the wire).
const CLOSED_ABNORMALLY: u16 = 1006;
/// The close code of a close frame without a code (RFC 6455 7.1.5).
const NO_STATUS: u16 = 1005;

/// How a connection ended.
enum End {
    /// The node closes it with this (a close frame goes out).
    Server(Disconnect),
    /// The client sent a close frame: its code (1005 for none) and reason.
    Client(u16, String),
    /// The socket ended without a close frame, or cannot be written: what
    /// the node saw. A peer that vanished is not a protocol violation.
    Lost(&'static str),
}

async fn serve(node: &Node, conn: &Conn, since: Option<MessageId>, ws: &mut Socket) -> End {
    let heartbeat = node.cfg.heartbeat;
    let limits = &node.cfg.limits;
    let write_timeout = limits.write_timeout;
    let replay = match Box::pin(node.replay(&conn.user, since)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "replay failed");
            return End::Server(Disconnect::BackendUnavailable);
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
    if let Err(what) = Box::pin(write(ws, &mut batch, &mut head, write_timeout, false)).await {
        return End::Lost(what);
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
                            return End::Server(Disconnect::BackendUnavailable);
                        }
                    }
                }
                if pending.heartbeat && budget.last_seen.elapsed() >= heartbeat * 2 {
                    metrics::counter!("herald_heartbeat_timeouts_total").increment(1);
                    return End::Server(Disconnect::HeartbeatTimeout);
                }
                if !batch.is_empty() || pending.heartbeat {
                    if let Err(what) = Box::pin(write(ws, &mut batch, &mut head, write_timeout, pending.heartbeat)).await {
                        return End::Lost(what);
                    }
                    if batch.capacity() > 64 {
                        batch = Vec::new(); // give back what a burst grew
                    }
                }
                if let Some(why) = pending.close {
                    return End::Server(why);
                }
            }
            msg = ws.next() => {
                let Some(msg) = msg else { return End::Lost("the connection ended without a close frame") };
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
                        return End::Server(Disconnect::FrameTooBig(limits.max_client_frame_bytes));
                    }
                    Err(WsError::Utf8(_)) => {
                        metrics::counter!("herald_client_frames_rejected_total", "reason" => "utf8").increment(1);
                        return End::Server(Disconnect::InvalidUtf8);
                    }
                    // The peer went away without a close frame (a tab
                    // closed, a network gone): not a protocol violation.
                    Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                        return End::Lost("the connection ended without a close frame");
                    }
                    Err(WsError::Protocol(e)) => {
                        metrics::counter!("herald_client_frames_rejected_total", "reason" => "protocol").increment(1);
                        tracing::debug!(error = %e, "client broke the WebSocket protocol");
                        return End::Server(Disconnect::ProtocolViolation);
                    }
                    Err(WsError::Io(_)) => return End::Lost("the connection was reset"),
                    Err(_) => return End::Lost("the socket failed"),
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
                        if let Err(what) = Box::pin(write(ws, &mut batch, &mut head, write_timeout, false)).await {
                            return End::Lost(what);
                        }
                    }
                    Ok(Message::Close(frame)) => {
                        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(2), ws.flush())).await;
                        return match frame {
                            Some(f) => End::Client(f.code.into(), f.reason.as_str().to_string()),
                            None => End::Client(NO_STATUS, String::new()),
                        };
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
/// `head`. With `ping`, a WebSocket ping goes out after the batch. An error
/// (what happened, for the log) when the socket failed or the write took
/// longer than `timeout` (a peer that stopped reading).
async fn write(
    ws: &mut Socket,
    batch: &mut Vec<Outbound>,
    head: &mut MessageId,
    timeout: Duration,
    ping: bool,
) -> Result<(), &'static str> {
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
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("a write to the socket failed"),
        Err(_) => {
            metrics::counter!("herald_write_timeouts_total").increment(1);
            Err("a write timed out: the client stopped reading")
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
