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
/// every frame costs (a page can be up to `Entry::Client`'s `max_page`
/// stored messages).
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
    /// A message-center request, its shape checked (the node validates it).
    Center(ClientOp),
}

pub(super) fn bad_request(m: impl AsRef<str>) -> Asked {
    Asked::Reply(protocol::error_frame("bad_request", m.as_ref()))
}

/// A client's message-center request: the frame's shape checked, what
/// it names still text (the node validates it, see `crate::center`).
#[derive(Debug)]
pub(crate) enum ClientOp {
    Read(Vec<String>),
    ReadAll,
    Unread(Vec<String>),
    Delete(Vec<String>),
    DeleteAll,
    History {
        page: HistoryPage,
        /// The client's tag, echoed in the reply.
        req: Option<String>,
    },
}

/// A `history` frame's page, as sent.
#[derive(Debug, Default)]
pub(crate) struct HistoryPage {
    pub(crate) cursor: String,
    pub(crate) limit: u32,
    pub(crate) oldest_first: bool,
    pub(crate) unread_only: bool,
    pub(crate) topic: String,
}

impl ClientOp {
    /// The request the node validates and applies.
    pub(crate) fn request(&self) -> center::Request<'_> {
        use center::Request as R;
        match self {
            ClientOp::Read(ids) => R::SetRead { ids, read: true },
            ClientOp::ReadAll => R::ReadUpTo(""),
            ClientOp::Unread(ids) => R::SetRead { ids, read: false },
            ClientOp::Delete(ids) => R::Delete(Some(ids)),
            ClientOp::DeleteAll => R::Delete(None),
            ClientOp::History { page, .. } => R::List(center::ListMessages {
                cursor: &page.cursor,
                oldest_first: page.oldest_first,
                limit: page.limit,
                unread_only: page.unread_only,
                topic_prefix: &page.topic,
            }),
        }
    }
}

/// Parses one untrusted client text frame.
pub(super) fn client_frame(text: &str) -> Asked {
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
        } => ClientOp::Read(ids),
        ClientFrame::Read {
            up_to: None,
            ids: None,
            all: Some(true),
        } => ClientOp::ReadAll,
        ClientFrame::Read { .. } => {
            return bad_request("read takes exactly one of up_to, ids or \"all\":true")
        }
        ClientFrame::Unread { ids } => ClientOp::Unread(ids),
        ClientFrame::Delete {
            ids: Some(ids),
            all: None,
        } => ClientOp::Delete(ids),
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
            if req
                .as_ref()
                .is_some_and(|r| r.len() > protocol::MAX_REQ_TAG_BYTES)
            {
                return bad_request(format!("req over {} bytes", protocol::MAX_REQ_TAG_BYTES));
            }
            ClientOp::History {
                page: HistoryPage {
                    cursor: cursor.unwrap_or_default(),
                    limit: limit.unwrap_or(0),
                    oldest_first: oldest_first.unwrap_or(false),
                    unread_only: unread_only.unwrap_or(false),
                    topic: topic.unwrap_or_default(),
                },
                req,
            }
        }
    };
    Asked::Center(op)
}
