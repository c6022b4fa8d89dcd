//! What a client sends on its connection: the frame budget (a token
//! bucket per connection) and the parsing of client frames into what the
//! connection task does with them.

use super::*;

/// A token bucket for one connection's client frames (every frame counts,
/// control frames too): `rate` a second, at most `burst` saved up. It also
/// remembers when the client last sent anything, for the heartbeat check.
pub(super) struct Budget {
    pub(super) tokens: f32,
    pub(super) last_seen: Instant,
}

impl Budget {
    pub(super) fn new(burst: usize) -> Self {
        Budget {
            tokens: burst as f32,
            last_seen: Instant::now(),
        }
    }

    /// Spends `n` more tokens for an expensive frame (after [`take`]);
    /// false when there are not enough.
    pub(super) fn take_more(&mut self, n: f32) -> bool {
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Spends one token for a frame that just arrived; false when none is
    /// left.
    pub(super) fn take(&mut self, rate: usize, burst: usize) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.last_seen).as_secs_f32() * rate as f32;
        self.tokens = (self.tokens + earned).min(burst as f32);
        self.last_seen = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A `history` request costs this many budget tokens on top of the one
/// every frame costs (a page can be up to 50 stored messages).
pub(super) const HISTORY_EXTRA_COST: f32 = 4.0;

/// Sends the reply of a message-center request, or its error frame.
pub(super) fn center_reply(conn: &Conn, r: Result<Option<protocol::Frame>, Error>) {
    match r {
        Ok(Some(frame)) => {
            conn.send(frame);
        }
        Ok(None) => {}
        Err(Error::InvalidArgument(m)) => {
            conn.send(protocol::error_frame("bad_request", &m));
        }
        Err(e) => {
            tracing::warn!(error = %e, "message center request failed");
            conn.send(protocol::error_frame(
                "unavailable",
                "backend unavailable, retry shortly",
            ));
        }
    }
}

/// What a client text frame asks for.
pub(super) enum Asked {
    /// Mark read up to this id (coalesced with reads right behind it).
    Read(MessageId),
    /// Answer with this frame (pong, or an error frame).
    Reply(protocol::Frame),
    /// A message-center request, validated.
    Center(ClientOp),
}

pub(super) fn bad_request(m: impl AsRef<str>) -> Asked {
    Asked::Reply(protocol::error_frame("bad_request", m.as_ref()))
}

/// Parses the `ids` of a client frame: 1 to [`protocol::MAX_IDS_PER_FRAME`].
pub(super) fn frame_ids(ids: &[String]) -> Result<Vec<MessageId>, Asked> {
    Node::parse_ids("ids", ids, protocol::MAX_IDS_PER_FRAME).map_err(|e| bad_request(e.to_string()))
}

/// Parses one untrusted client text frame.
pub(super) fn client_frame(text: &str, max_topic: usize) -> Asked {
    let parsed = match protocol::parse_client_frame(text) {
        Ok(f) => f,
        Err(m) => {
            metrics::counter!("herald_client_frames_rejected_total", "reason" => "malformed")
                .increment(1);
            return Asked::Reply(protocol::error_frame("bad_frame", &m));
        }
    };
    let op = match parsed {
        ClientFrame::Ping => return Asked::Reply(protocol::pong_frame()),
        ClientFrame::Read {
            up_to: Some(up_to),
            ids: None,
            all: None,
        } => {
            return match up_to.parse::<MessageId>() {
                Ok(id) => Asked::Read(id),
                Err(e) => bad_request(format!("up_to: {e}")),
            }
        }
        ClientFrame::Read {
            up_to: None,
            ids: Some(ids),
            all: None,
        } => match frame_ids(&ids) {
            Ok(ids) => ClientOp::Read(ids),
            Err(a) => return a,
        },
        ClientFrame::Read {
            up_to: None,
            ids: None,
            all: Some(true),
        } => ClientOp::ReadAll,
        ClientFrame::Read { .. } => {
            return bad_request("read takes exactly one of up_to, ids or \"all\":true")
        }
        ClientFrame::Unread { ids } => match frame_ids(&ids) {
            Ok(ids) => ClientOp::Unread(ids),
            Err(a) => return a,
        },
        ClientFrame::Delete {
            ids: Some(ids),
            all: None,
        } => match frame_ids(&ids) {
            Ok(ids) => ClientOp::Delete(ids),
            Err(a) => return a,
        },
        ClientFrame::Delete {
            ids: None,
            all: Some(true),
        } => ClientOp::DeleteAll,
        ClientFrame::Delete { .. } => {
            return bad_request("delete takes exactly one of ids or \"all\":true")
        }
        ClientFrame::History {
            cursor,
            limit,
            oldest_first,
            unread_only,
            topic,
            req,
        } => {
            let cursor = match cursor
                .filter(|c| !c.is_empty())
                .map(|c| c.parse::<MessageId>())
            {
                None => None,
                Some(Ok(id)) => Some(id),
                Some(Err(e)) => return bad_request(format!("cursor: {e}")),
            };
            let limit = match limit.unwrap_or(protocol::DEFAULT_HISTORY_LIMIT) {
                0 => protocol::DEFAULT_HISTORY_LIMIT,
                n if n > protocol::MAX_HISTORY_LIMIT => {
                    return bad_request(format!(
                        "limit {n} exceeds the cap of {} messages per page",
                        protocol::MAX_HISTORY_LIMIT
                    ))
                }
                n => n,
            };
            let topic = topic.unwrap_or_default();
            if topic.len() > max_topic {
                return bad_request(format!("topic prefix over {max_topic} bytes"));
            }
            if req
                .as_ref()
                .is_some_and(|r| r.len() > protocol::MAX_REQ_TAG_BYTES)
            {
                return bad_request(format!("req over {} bytes", protocol::MAX_REQ_TAG_BYTES));
            }
            ClientOp::History {
                cursor,
                limit: limit as usize,
                oldest_first: oldest_first.unwrap_or(false),
                unread_only: unread_only.unwrap_or(false),
                topic,
                req,
            }
        }
    };
    Asked::Center(op)
}
