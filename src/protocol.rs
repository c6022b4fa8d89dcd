//! Wire protocol v1: message ids, the JSON frames the server sends, and the
//! frames it accepts from clients.
//!
//! Server frames are serialized exactly once, into a [`Frame`] (a
//! reference-counted UTF-8 buffer), and that one buffer is shared by every
//! connection that sends it: fan-out to N sockets costs N reference-count
//! increments, not N serializations.

use serde::Deserialize;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A serialized server frame, shared between connections. Cloning is cheap.
pub type Frame = tokio_tungstenite::tungstenite::Utf8Bytes;

/// Position of a stored message in one user's inbox: `"<unix ms>-<seq>"`,
/// the same shape as a Redis stream id, ordered by `(ms, seq)`.
///
/// Ids only compare within one user's inbox. `0-0` sorts before every real
/// message and serves as "nothing read yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub ms: u64,
    pub seq: u64,
}

impl MessageId {
    pub const ZERO: MessageId = MessageId { ms: 0, seq: 0 };

    /// The next id after `self` at wall-clock time `now_ms`; never goes
    /// backwards, even if the clock does.
    pub fn next(self, now_ms: u64) -> MessageId {
        if now_ms > self.ms {
            MessageId { ms: now_ms, seq: 0 }
        } else {
            MessageId {
                ms: self.ms,
                seq: self.seq + 1,
            }
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Why a string is not a stored-message id.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not a stored message id (expected \"<unix ms>-<seq>\", e.g. \"1732390000000-0\")"
)]
pub struct BadMessageId(pub String);

impl FromStr for MessageId {
    type Err = BadMessageId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadMessageId(s.chars().take(64).collect());
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(bad());
        }
        Ok(MessageId {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An id for a live-only message (transient send or broadcast): `t<ms>-<n>`.
/// The `t` keeps it from ever being mistaken for a resume position.
pub fn live_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // A random start keeps ids of different processes apart; they are labels,
    // never positions, so uniqueness is all they need.
    let base = *START.get_or_init(|| rand::random::<u32>() as u64);
    format!(
        "t{}-{}",
        now_ms(),
        base.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed))
    )
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a str always serializes")
}

/// `{"type":"message",...}`. `payload_json` must already be validated JSON;
/// it is copied in verbatim so the browser sees exactly what the caller sent.
pub fn message_frame(
    id: &str,
    topic: &str,
    payload_json: &str,
    ts: u64,
    transient: bool,
) -> String {
    message_frame_with_tail(id, &message_frame_tail(topic, payload_json, ts, transient))
}

/// The start of every message frame, up to its id.
const MESSAGE_FRAME_HEAD: &str = "{\"type\":\"message\",\"id\":\"";

/// A message frame split around its id, for a backend that assigns the id
/// while storing (the Redis inbox script joins `head + id + tail`). Ids are
/// made of digits, `-` and `t` only, so they need no JSON escaping.
pub fn message_frame_parts(
    topic: &str,
    payload_json: &str,
    ts: u64,
    transient: bool,
) -> (String, String) {
    (
        MESSAGE_FRAME_HEAD.to_string(),
        message_frame_tail(topic, payload_json, ts, transient),
    )
}

/// The part of a message frame after its id: the same for every recipient
/// of one send, so a backend can keep it once and join it with each id
/// ([`message_frame_with_tail`]) when it sends.
pub fn message_frame_tail(topic: &str, payload_json: &str, ts: u64, transient: bool) -> String {
    let mut tail = String::with_capacity(48 + topic.len() + payload_json.len());
    tail.push_str("\",\"topic\":");
    tail.push_str(&json_str(topic));
    tail.push_str(",\"data\":");
    tail.push_str(payload_json);
    tail.push_str(",\"ts\":");
    tail.push_str(&ts.to_string());
    if transient {
        tail.push_str(",\"transient\":true");
    }
    tail.push('}');
    tail
}

/// The message frame of `id` with a tail from [`message_frame_tail`].
pub fn message_frame_with_tail(id: &str, tail: &str) -> String {
    let mut s = String::with_capacity(MESSAGE_FRAME_HEAD.len() + id.len() + tail.len());
    s.push_str(MESSAGE_FRAME_HEAD);
    s.push_str(id);
    s.push_str(tail);
    s
}

/// `replay` is the number of stored messages that follow before live
/// traffic, so a client can tell replayed messages (already counted in
/// `unread`) from new ones.
pub fn welcome_frame(
    conn: &str,
    user: &str,
    unread: u64,
    replay: usize,
    resumed: Option<bool>,
) -> Frame {
    let mut s = format!(
        "{{\"type\":\"welcome\",\"conn\":{},\"user\":{},\"unread\":{},\"replay\":{}",
        json_str(conn),
        json_str(user),
        unread,
        replay
    );
    if let Some(r) = resumed {
        s.push_str(if r {
            ",\"resumed\":true"
        } else {
            ",\"resumed\":false"
        });
    }
    s.push('}');
    s.into()
}

pub fn unread_frame(count: u64) -> Frame {
    format!("{{\"type\":\"unread\",\"count\":{count}}}").into()
}

/// `{"type":"changed",...}`: what a message-center change did, for every
/// connection of the user. `op` is `read`, `unread` or `delete`; `ids` the
/// messages that changed, or `up_to` (read up to that id), or `all`
/// (everything deleted); `count` the unread count after it. The Redis
/// scripts build the same text (`changed_frame` in `prelude.lua`).
pub fn changed_frame(
    op: &str,
    ids: Option<&[MessageId]>,
    up_to: Option<MessageId>,
    all: bool,
    count: u64,
) -> Frame {
    let mut s = format!("{{\"type\":\"changed\",\"op\":\"{op}\",");
    if let Some(ids) = ids {
        s.push_str("\"ids\":[");
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('"');
            s.push_str(&id.to_string());
            s.push('"');
        }
        s.push_str("],");
    }
    if let Some(id) = up_to {
        s.push_str(&format!("\"up_to\":\"{id}\","));
    }
    if all {
        s.push_str("\"all\":true,");
    }
    s.push_str(&format!("\"count\":{count}}}"));
    s.into()
}

/// A stored message frame with `"read":true|false` added, for history
/// pages (the frame is ours: it ends with `}`).
pub fn with_read_flag(frame: &str, read: bool) -> String {
    let body = frame.strip_suffix('}').unwrap_or(frame);
    format!("{body},\"read\":{read}}}")
}

/// The fields of a stored message frame (what `message_frame` wrote).
#[derive(Debug, Deserialize)]
pub struct StoredFields<'a> {
    pub topic: String,
    #[serde(borrow)]
    pub data: &'a serde_json::value::RawValue,
    pub ts: u64,
}

pub fn parse_stored_frame(frame: &str) -> Result<StoredFields<'_>, serde_json::Error> {
    serde_json::from_str(frame)
}

pub fn pong_frame() -> Frame {
    Frame::from_static("{\"type\":\"pong\"}")
}

pub fn error_frame(code: &str, message: &str) -> Frame {
    format!(
        "{{\"type\":\"error\",\"code\":{},\"message\":{}}}",
        json_str(code),
        json_str(message)
    )
    .into()
}

/// Why the server ends a connection: the close code and reason sent in the
/// close frame, and the advice a client derives from the code. Every close
/// frame the server sends is built from one of these, so codes are never
/// bare numbers and reasons always fit a control frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disconnect {
    /// 1000: the client was silent for two heartbeat intervals.
    HeartbeatTimeout,
    /// 1001: the node is shutting down; reconnect (to another node).
    Shutdown,
    /// 1009: a client frame over the limit, in bytes.
    FrameTooBig(usize),
    /// 1013: the client did not read fast enough and its send queue filled;
    /// reconnect with `since`.
    SlowClient,
    /// 1013: the shared backend is unavailable; reconnect with `since`.
    BackendUnavailable,
    /// 1002: the client broke the WebSocket protocol.
    ProtocolViolation,
    /// 1007: a text frame that is not UTF-8.
    InvalidUtf8,
    /// 1008: the client sent frames faster than its budget allows.
    RateLimited,
    /// 4001: `DisconnectUser` (logout, ban). Do not reconnect.
    Kicked(std::sync::Arc<str>),
    /// 4029: the user holds too many connections; the text says how many.
    TooManyConnections(String),
    /// 4401: the connection's token reached its `exp`. Reconnect at once
    /// with a fresh token and `since` (unlike 4001, which means stay away).
    TokenExpired,
}

/// The longest close reason the protocol allows: a close frame is a control
/// frame (at most 125 bytes), 2 of which are the code.
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

impl Disconnect {
    pub const HEARTBEAT_TIMEOUT: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const KICKED: u16 = 4001;
    pub const TOO_MANY_CONNECTIONS: u16 = 4029;
    pub const TOKEN_EXPIRED: u16 = 4401;

    pub fn code(&self) -> u16 {
        match self {
            Disconnect::HeartbeatTimeout => Self::HEARTBEAT_TIMEOUT,
            Disconnect::Shutdown => Self::GOING_AWAY,
            Disconnect::FrameTooBig(_) => Self::TOO_BIG,
            Disconnect::SlowClient | Disconnect::BackendUnavailable => Self::TRY_AGAIN_LATER,
            Disconnect::ProtocolViolation => Self::PROTOCOL_ERROR,
            Disconnect::InvalidUtf8 => Self::INVALID_DATA,
            Disconnect::RateLimited => Self::POLICY,
            Disconnect::Kicked(_) => Self::KICKED,
            Disconnect::TooManyConnections(_) => Self::TOO_MANY_CONNECTIONS,
            Disconnect::TokenExpired => Self::TOKEN_EXPIRED,
        }
    }

    /// The close reason, cut to [`MAX_CLOSE_REASON_BYTES`] on a character
    /// boundary (a longer one would make the whole close frame invalid and
    /// the browser would see 1006 instead of the code).
    pub fn reason(&self) -> String {
        let text: std::borrow::Cow<'_, str> = match self {
            Disconnect::HeartbeatTimeout => "heartbeat timeout".into(),
            Disconnect::Shutdown => "server shutting down".into(),
            Disconnect::FrameTooBig(max) => format!("frame exceeds {max} bytes").into(),
            Disconnect::SlowClient => "send queue full: client too slow".into(),
            Disconnect::BackendUnavailable => "backend unavailable, reconnect with since".into(),
            Disconnect::ProtocolViolation => "WebSocket protocol violation".into(),
            Disconnect::InvalidUtf8 => "text frame is not valid UTF-8".into(),
            Disconnect::RateLimited => "too many frames: client frame budget exceeded".into(),
            Disconnect::Kicked(reason) => (&**reason).into(),
            Disconnect::TooManyConnections(why) => why.as_str().into(),
            Disconnect::TokenExpired => "token expired: reconnect with a fresh token".into(),
        };
        truncate_utf8(&text, MAX_CLOSE_REASON_BYTES).to_string()
    }

    /// Whether a client should reconnect after this close.
    pub fn reconnect(&self) -> bool {
        !matches!(self, Disconnect::Kicked(_))
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The longest user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;

/// The one check of a user id, wherever it comes from: a gRPC request, a
/// token's `sub`, `herald token`. An id is 1 to `max` bytes of UTF-8 with
/// no control character (U+0000 to U+001F, U+007F to U+009F: NUL, line
/// breaks, tabs, terminal escapes) and no line or paragraph separator
/// (U+2028, U+2029). So every user a token can make is one a backend can
/// address, and no id can split or forge a log line. The error says what
/// is wrong without echoing the id.
pub fn check_user_id(user: &str, max: usize) -> Result<(), String> {
    if user.is_empty() {
        return Err("user id must not be empty".into());
    }
    if user.len() > max {
        return Err(format!(
            "user id of {} bytes exceeds the limit of {max} bytes",
            user.len()
        ));
    }
    if let Some((at, c)) = user
        .char_indices()
        .find(|(_, c)| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        return Err(format!(
            "user id contains the control character U+{:04X} at byte {at}; user ids must not \
             contain control characters or line separators",
            c as u32
        ));
    }
    Ok(())
}

/// What a client may send. Anything else is answered with an error frame.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientFrame {
    /// Marks messages read: `up_to` and every older one, or the `ids`, or
    /// everything (`all`). Exactly one of them.
    Read {
        up_to: Option<String>,
        ids: Option<Vec<String>>,
        all: Option<bool>,
    },
    /// Marks the `ids` unread again.
    Unread {
        ids: Vec<String>,
    },
    /// Deletes the `ids`, or everything (`all`).
    Delete {
        ids: Option<Vec<String>>,
        all: Option<bool>,
    },
    /// Asks for a page of stored messages (answered with a `history`
    /// frame echoing `req`).
    History {
        cursor: Option<String>,
        limit: Option<u32>,
        oldest_first: Option<bool>,
        unread_only: Option<bool>,
        topic: Option<String>,
        req: Option<String>,
    },
    Ping,
}

// Ids per frame and messages per `history` page: `crate::center`'s
// limits of `Entry::Client`.
/// The longest `req` tag a client may attach to a `history` request.
pub const MAX_REQ_TAG_BYTES: usize = 64;

/// Parses an untrusted client frame; the error is the message for the
/// error frame sent back.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, String> {
    serde_json::from_str(text).map_err(|e| {
        // serde's message quotes the client's text (an unknown `type`), so
        // it is cut on a character boundary: a byte cut could panic.
        let e = e.to_string();
        let m = truncate_utf8(&e, 200);
        format!("malformed frame: {m}; expected a frame of type read, unread, delete, history or ping (see the wire protocol)")
    })
}

/// `{"type":"history","req":...,"messages":[...],"next":...,"unread":N}`:
/// a page of stored messages, each its message frame with `"read"`.
pub fn history_frame(
    req: Option<&str>,
    messages: &[(String, bool)],
    next: Option<MessageId>,
    unread: u64,
) -> Frame {
    let mut s =
        String::with_capacity(64 + messages.iter().map(|(f, _)| f.len() + 16).sum::<usize>());
    s.push_str("{\"type\":\"history\",\"req\":");
    match req {
        Some(r) => s.push_str(&json_str(r)),
        None => s.push_str("null"),
    }
    s.push_str(",\"messages\":[");
    for (i, (frame, read)) in messages.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&with_read_flag(frame, *read));
    }
    s.push_str("],\"next\":");
    match next {
        Some(id) => s.push_str(&format!("\"{id}\"")),
        None => s.push_str("null"),
    }
    s.push_str(&format!(",\"unread\":{unread}}}"));
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_1_to_max_bytes_without_control_characters() {
        for ok in [
            "a",
            "alice@example.com",
            "user 42",
            "émile",
            "用户",
            &"x".repeat(256),
        ] {
            assert_eq!(check_user_id(ok, 256), Ok(()), "{ok:?}");
        }
        assert!(check_user_id("", 256).unwrap_err().contains("empty"));
        assert!(check_user_id(&"x".repeat(257), 256)
            .unwrap_err()
            .contains("257 bytes"));
        for (bad, code) in [
            ("a\nb", "U+000A"),
            ("a\0b", "U+0000"),
            ("a\rb", "U+000D"),
            ("\tx", "U+0009"),
            ("\u{1b}[31mred", "U+001B"),
            ("a\u{7f}", "U+007F"),
            ("a\u{85}b", "U+0085"),
            ("a\u{2028}b", "U+2028"),
        ] {
            let e = check_user_id(bad, 256).unwrap_err();
            assert!(e.contains(code), "{bad:?}: {e}");
            assert!(!e.contains(bad), "the id is not echoed: {e}");
        }
    }

    #[test]
    fn ids_order_and_parse() {
        let a: MessageId = "1700000000000-2".parse().unwrap();
        let b: MessageId = "1700000000000-10".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.to_string(), "1700000000000-10");
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "t1-2",
            "1 -2",
            "99999999999999999999999-1",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad:?}");
        }
        assert_eq!(a.next(a.ms - 5), MessageId { ms: a.ms, seq: 3 });
        assert_eq!(
            a.next(a.ms + 1),
            MessageId {
                ms: a.ms + 1,
                seq: 0
            }
        );
    }

    #[test]
    fn frames_are_valid_json_with_payload_verbatim() {
        let f = message_frame("1-0", "a\"b", "{ \"x\" : [1, 2] }", 5, false);
        assert!(f.contains("\"data\":{ \"x\" : [1, 2] }"));
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["topic"], "a\"b");
        let w: serde_json::Value =
            serde_json::from_str(welcome_frame("c", "u\n", 3, 0, Some(false)).as_str()).unwrap();
        assert_eq!(w["resumed"], false);
        assert!(live_id().starts_with('t'));
    }

    #[test]
    fn close_reasons_fit_a_control_frame_on_a_char_boundary() {
        let long: String = "é".repeat(70); // 140 bytes
        let d = Disconnect::Kicked(long.as_str().into());
        let r = d.reason();
        assert!(r.len() <= MAX_CLOSE_REASON_BYTES, "{}", r.len());
        assert_eq!(r, "é".repeat(61));
        assert_eq!(d.code(), 4001);
        assert!(!d.reconnect());
        assert_eq!(truncate_utf8("abc", 2), "ab");
        assert_eq!(truncate_utf8("€", 2), "");
        assert!(Disconnect::SlowClient.reconnect());
    }

    #[test]
    fn client_frames() {
        assert!(matches!(
            parse_client_frame(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping)
        ));
        assert!(matches!(
            parse_client_frame(r#"{"type":"read","up_to":"1-0"}"#),
            Ok(ClientFrame::Read { .. })
        ));
        assert!(matches!(
            parse_client_frame(r#"{"type":"unread","ids":["1-0"]}"#),
            Ok(ClientFrame::Unread { .. })
        ));
        assert!(matches!(
            parse_client_frame(r#"{"type":"history","limit":5,"req":"a"}"#),
            Ok(ClientFrame::History { .. })
        ));
        assert!(parse_client_frame(r#"{"type":"delete","ids":["1-0"],"x":1}"#).is_err());
        assert!(parse_client_frame(r#"{"type":"nope"}"#).is_err());
        assert!(parse_client_frame("not json").is_err());
    }

    mod properties {
        //! Property tests of what clients send: frames and message ids.
        //! Inputs that ever failed are kept in
        //! `proptest-regressions/protocol.txt` and replayed first.
        use super::super::*;
        use proptest::prelude::*;

        /// JSON-ish text: frames with random types, keys and values, plus
        /// arbitrary strings.
        fn frame_text() -> impl Strategy<Value = String> {
            let word = || proptest::string::string_regex("[a-zé\\u{1F600}\"\\\\ ]{0,300}").unwrap();
            prop_oneof![
                any::<String>(),
                (word(), word()).prop_map(|(t, v)| format!(
                    "{{\"type\":{},\"up_to\":{}}}",
                    serde_json::Value::String(t),
                    serde_json::Value::String(v)
                )),
                word().prop_map(|t| format!("{{\"type\":\"{t}\"}}")),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn client_frame_parser_never_panics_and_errors_stay_short(text in frame_text()) {
                match parse_client_frame(&text) {
                    Ok(ClientFrame::Ping) => prop_assert!(text.contains("ping")),
                    Ok(ClientFrame::Read { up_to, .. }) => prop_assert!(text.contains("read") && up_to.map_or(0, |u| u.len()) <= text.len()),
                    Ok(_) => {}
                    Err(m) => prop_assert!(m.len() < 400, "{}", m.len()),
                }
            }

            #[test]
            fn message_ids_round_trip(ms in any::<u64>(), seq in any::<u64>()) {
                let id = MessageId { ms, seq };
                prop_assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id);
            }

            #[test]
            fn message_id_order_is_numeric(a in any::<(u64, u64)>(), b in any::<(u64, u64)>()) {
                let (x, y) = (MessageId { ms: a.0, seq: a.1 }, MessageId { ms: b.0, seq: b.1 });
                prop_assert_eq!(x.cmp(&y), a.cmp(&b));
            }

            #[test]
            fn message_id_parser_accepts_exactly_digits_dash_digits(s in "[0-9t \\-+]{0,45}|\\PC{0,30}") {
                let ok = s.parse::<MessageId>();
                let shape = s.split_once('-').is_some_and(|(a, b)| {
                    [a, b].iter().all(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|c| c.is_ascii_digit()) && p.parse::<u64>().is_ok())
                });
                prop_assert_eq!(ok.is_ok(), shape, "{:?}", s);
                if let Err(e) = ok {
                    prop_assert!(e.to_string().len() < 400);
                }
            }
        }
    }
}
