//! The per-connection task: attach, the loop that writes queued frames,
//! reads client frames and answers heartbeats, catch-up from the inbox, and
//! the closing handshake. One task per connection, nothing else.

use super::*;

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
