//! The per-connection task: attach, the loop that writes queued frames,
//! reads client frames and answers heartbeats, catch-up from the inbox, and
//! the closing handshake. One task per connection, nothing else.

use super::*;
use std::ops::ControlFlow;

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
pub(super) fn run<'a>(
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

/// Serves an attached connection until it ends: the welcome and replay,
/// then one event at a time, each handled by a [`Session`] method.
///
/// While idle, the task waits here on two things only: its hub entry
/// (frames, close, resync, heartbeat ticks from the node's one heartbeat
/// timer) and the socket. No per-connection timer exists.
async fn serve(node: &Node, conn: &Conn, since: Option<MessageId>, ws: &mut Socket) -> End {
    let mut s = match Session::start(node, conn, since, ws).await {
        Ok(s) => s,
        Err(end) => return end,
    };
    loop {
        let step = tokio::select! {
            // Outbound work first, then every client frame that is already
            // readable, and only then the coalesced read.
            biased;
            _ = conn.wait() => s.on_hub().await,
            msg = s.ws.next() => s.on_frame(msg).await,
            _ = std::future::ready(()), if s.pending_read.is_some() => s.on_read().await,
        };
        if let ControlFlow::Break(end) = step {
            return end;
        }
    }
}

/// What an event handler says: go on, or the connection ends so.
type Step = ControlFlow<End>;

/// The state of one attached connection's loop, kept in its task (so in
/// the memory every idle connection costs: keep it small).
struct Session<'a> {
    node: &'a Node,
    conn: &'a Conn,
    ws: &'a mut Socket,
    /// The newest stored message written to the socket: live frames at or
    /// below it are dropped (already sent by a replay or a catch-up).
    head: MessageId,
    /// Frames taken from the hub queue, written together then one flush;
    /// reused between wake-ups (shrunk after a burst).
    batch: Vec<Outbound>,
    /// The client's frame budget and when it last sent anything.
    budget: Budget,
    /// The newest `read` position the client asked for and the backend has
    /// not been told yet: a burst of reads costs the backend one write.
    pending_read: Option<MessageId>,
}

impl<'a> Session<'a> {
    /// Writes the welcome and what the inbox holds after `since`.
    async fn start(
        node: &'a Node,
        conn: &'a Conn,
        since: Option<MessageId>,
        ws: &'a mut Socket,
    ) -> Result<Session<'a>, End> {
        let replay = match Box::pin(node.replay(&conn.user, since)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "replay failed");
                return Err(End::Server(Disconnect::BackendUnavailable));
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
        let write_timeout = node.cfg.limits.write_timeout;
        if let Err(what) = Box::pin(write(ws, &mut batch, &mut head, write_timeout, false)).await {
            return Err(End::Lost(what));
        }
        Ok(Session {
            node,
            conn,
            ws,
            head,
            batch: Vec::new(),
            budget: Budget::new(node.cfg.limits.client_frame_burst),
            pending_read: None,
        })
    }

    /// Writes the batch (and a ping), ending the connection if the socket
    /// fails or the client stopped reading.
    async fn flush(&mut self, ping: bool) -> Step {
        let timeout = self.node.cfg.limits.write_timeout;
        match Box::pin(write(
            self.ws,
            &mut self.batch,
            &mut self.head,
            timeout,
            ping,
        ))
        .await
        {
            Ok(()) => ControlFlow::Continue(()),
            Err(what) => ControlFlow::Break(End::Lost(what)),
        }
    }

    /// The hub woke the task: frames to write, a resync, a heartbeat tick
    /// or a close.
    async fn on_hub(&mut self) -> Step {
        let pending = self.conn.take(&mut self.batch);
        if pending.resync {
            // Live delivery had a gap: fetch what was stored after the last
            // message this connection saw, then go on (live frames at or
            // below it are dropped in write).
            match Box::pin(catch_up(self.node, &self.conn.user, self.head)).await {
                Ok(r) => {
                    let mut caught: Vec<Outbound> =
                        Vec::with_capacity(r.messages.len() + self.batch.len());
                    caught.extend(r.messages.into_iter().map(|(id, frame)| Outbound {
                        id: Some(id),
                        frame,
                    }));
                    caught.append(&mut self.batch);
                    self.batch = caught;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catch-up after broker reconnect failed");
                    return ControlFlow::Break(End::Server(Disconnect::BackendUnavailable));
                }
            }
        }
        if pending.heartbeat && self.budget.last_seen.elapsed() >= self.node.cfg.heartbeat * 2 {
            metrics::counter!("herald_heartbeat_timeouts_total").increment(1);
            return ControlFlow::Break(End::Server(Disconnect::HeartbeatTimeout));
        }
        if !self.batch.is_empty() || pending.heartbeat {
            self.flush(pending.heartbeat).await?;
            if self.batch.capacity() > 64 {
                self.batch = Vec::new(); // give back what a burst grew
            }
        }
        match pending.close {
            Some(why) => ControlFlow::Break(End::Server(why)),
            None => ControlFlow::Continue(()),
        }
    }

    /// Something arrived on the socket (or it ended).
    async fn on_frame(&mut self, msg: Option<Result<Message, WsError>>) -> Step {
        let limits = &self.node.cfg.limits;
        let Some(msg) = msg else {
            return ControlFlow::Break(End::Lost("the connection ended without a close frame"));
        };
        if !self
            .budget
            .take(limits.client_frame_rate, limits.client_frame_burst)
        {
            metrics::counter!("herald_client_frames_rejected_total", "reason" => "rate")
                .increment(1);
            self.conn.send(protocol::error_frame(
                "rate_limited",
                &format!(
                    "more than {} frames/s (burst {}): closing",
                    limits.client_frame_rate, limits.client_frame_burst
                ),
            ));
            self.conn.close(Disconnect::RateLimited);
            return ControlFlow::Continue(()); // the queued error frame goes out before the close
        }
        match msg {
            Err(e) => ControlFlow::Break(refused_frame(e, limits.max_client_frame_bytes)),
            Ok(Message::Text(t)) => match client_frame(t.as_str()) {
                Asked::Read(id) => {
                    self.pending_read = self.pending_read.max(Some(id));
                    ControlFlow::Continue(())
                }
                Asked::Reply(reply) => {
                    self.conn.send(reply);
                    ControlFlow::Continue(())
                }
                Asked::Center(op) => self.on_center(op).await,
            },
            Ok(Message::Binary(_)) => {
                self.conn.send(protocol::error_frame(
                    "bad_frame",
                    "binary frames are not part of the protocol; send JSON text frames",
                ));
                ControlFlow::Continue(())
            }
            // tungstenite queued the pong; push it out now.
            Ok(Message::Ping(_)) => self.flush(false).await,
            Ok(Message::Close(frame)) => {
                let _ = Box::pin(tokio::time::timeout(
                    Duration::from_secs(2),
                    self.ws.flush(),
                ))
                .await;
                ControlFlow::Break(match frame {
                    Some(f) => End::Client(f.code.into(), f.reason.as_str().to_string()),
                    None => End::Client(NO_STATUS, String::new()),
                })
            }
            Ok(_) => ControlFlow::Continue(()),
        }
    }

    /// A message-center request, its shape checked; `Node::center` validates
    /// and applies it.
    async fn on_center(&mut self, op: ClientOp) -> Step {
        // A history page costs more of the budget: its reply can be large.
        if matches!(op, ClientOp::History { .. }) && !self.budget.take_more(HISTORY_EXTRA_COST) {
            metrics::counter!("herald_client_frames_rejected_total", "reason" => "rate")
                .increment(1);
            self.conn.send(protocol::error_frame(
                "rate_limited",
                "history pages too fast: closing",
            ));
            self.conn.close(Disconnect::RateLimited);
            return ControlFlow::Continue(());
        }
        let (node, conn) = (self.node, self.conn);
        // Reads queued before this frame go first: the client's order is
        // kept.
        if let Some(up_to) = self.pending_read.take() {
            center_reply(
                conn,
                Box::pin(node.client_read(&conn.user, up_to))
                    .await
                    .map(|_| None),
            );
        }
        let done = Box::pin(node.center(&conn.user, Entry::Client, op.request())).await;
        center_reply(
            conn,
            done.map(|d| match (d, &op) {
                (Done::Page(page), ClientOp::History { req, .. }) => {
                    let messages: Vec<(String, bool)> = page
                        .messages
                        .iter()
                        .map(|m| (m.frame.to_string(), m.read))
                        .collect();
                    Some(protocol::history_frame(
                        req.as_deref(),
                        &messages,
                        page.next,
                        page.unread,
                    ))
                }
                _ => None,
            }),
        );
        ControlFlow::Continue(())
    }

    /// Tells the backend the newest position the client read (the reads
    /// that arrived together, as one write). Every connection of the user,
    /// this one included, gets the new count through the broker when it
    /// changed.
    async fn on_read(&mut self) -> Step {
        let Some(up_to) = self.pending_read.take() else {
            return ControlFlow::Continue(());
        };
        let conn = self.conn;
        match Box::pin(self.node.client_read(&conn.user, up_to)).await {
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
        ControlFlow::Continue(())
    }
}

/// How a socket error ends the connection: a refusal of what the client
/// sent (counted), or a peer that went away.
fn refused_frame(e: WsError, max_frame_bytes: usize) -> End {
    let refuse = |reason: &'static str, why: Disconnect| {
        metrics::counter!("herald_client_frames_rejected_total", "reason" => reason).increment(1);
        End::Server(why)
    };
    match e {
        WsError::Capacity(_) => refuse("too_big", Disconnect::FrameTooBig(max_frame_bytes)),
        WsError::Utf8(_) => refuse("utf8", Disconnect::InvalidUtf8),
        // The peer went away without a close frame (a tab closed, a network
        // gone): not a protocol violation.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            End::Lost("the connection ended without a close frame")
        }
        WsError::Protocol(e) => {
            tracing::debug!(error = %e, "client broke the WebSocket protocol");
            refuse("protocol", Disconnect::ProtocolViolation)
        }
        WsError::Io(_) => End::Lost("the connection was reset"),
        _ => End::Lost("the socket failed"),
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
/// backend is unavailable before it closes with 1013. A Redis Cluster
/// shard failing over is away for its `cluster-node-timeout` (15 s by
/// default) plus an election, and a reconnect could not read the inbox any
/// sooner: waiting here keeps the device quiet instead of sending it round
/// a reconnect that fails too. Frames that arrive meanwhile wait in the
/// connection's bounded queue.
const CATCH_UP_PATIENCE: Duration = Duration::from_secs(30);
/// The longest one inbox read of a catch-up may take before it is given up
/// and tried again: a read stuck on a connection the registrar has since
/// replaced (see `backend::redis::sharded`) must not hold the catch-up;
/// the next read takes the current connection.
const CATCH_UP_ATTEMPT: Duration = Duration::from_secs(2);

/// Reads what was stored after `head`, retrying with backoff while the
/// backend is unavailable (for up to [`CATCH_UP_PATIENCE`], each read
/// bounded by [`CATCH_UP_ATTEMPT`]).
async fn catch_up(
    node: &Node,
    user: &str,
    head: MessageId,
) -> crate::error::Result<crate::backend::Replay> {
    let deadline = tokio::time::Instant::now() + CATCH_UP_PATIENCE;
    let mut backoff = Duration::from_millis(100);
    loop {
        let read = tokio::time::timeout(CATCH_UP_ATTEMPT, node.replay(user, Some(head)))
            .await
            .unwrap_or_else(|_| {
                Err(Error::Unavailable(
                    "an inbox read for a catch-up timed out".into(),
                ))
            });
        match read {
            Err(Error::Unavailable(_)) if tokio::time::Instant::now() + backoff < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}
