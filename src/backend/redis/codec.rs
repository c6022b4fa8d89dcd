//! The pub/sub wire format: which channel an [`Event`] is published on and
//! what its payload is, written and read here only.
//!
//! On a user's channel ([`keys::user_channel`]) the first byte says what
//! the event is:
//!
//! | payload | event |
//! |---|---|
//! | `m<id> <frame>` | a stored message (published by `scripts/append.lua`, which assigns the id) |
//! | `M<frame>` | a transient message |
//! | `u<count>` | the user's unread count |
//! | `s<frame>` | a message-center change (`changed` frame; published by the `center_*`/`mark_read` scripts) |
//! | `d<reason>` | close the user's connections |
//! | `p<incarnation> <nonce>` | a node's probe of its own subscription (Redis Cluster; see `sharded`); every other node ignores it |
//!
//! On the broadcast channel ([`keys::broadcast_channel`]) the payload is
//! the frame itself.
//!
//! Encoding writes straight into the PUBLISH command (no intermediate
//! string); decoding validates the payload as UTF-8 once and copies only
//! the frame (or reason) out of it.

use super::keys;
use crate::backend::Event;
use crate::protocol::Frame;
use redis::{RedisWrite, ToRedisArgs};
use std::fmt;
use std::sync::Arc;

/// The channel `event` is published on.
pub(super) fn channel(event: &Event) -> String {
    match event {
        Event::Message { user, .. }
        | Event::Unread { user, .. }
        | Event::State { user, .. }
        | Event::Disconnect { user, .. } => keys::user_channel(user),
        Event::Broadcast { .. } => keys::broadcast_channel(),
    }
}

/// The payload of `event`, as a command argument (`.arg(Payload(&e))`).
pub(super) struct Payload<'a>(pub(super) &'a Event);

impl fmt::Display for Payload<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Event::Message {
                id: Some(id),
                frame,
                ..
            } => write!(f, "m{id} {frame}"),
            Event::Message {
                id: None, frame, ..
            } => write!(f, "M{frame}"),
            Event::Unread { count, .. } => write!(f, "u{count}"),
            Event::State { frame, .. } => write!(f, "s{frame}"),
            Event::Disconnect { reason, .. } => write!(f, "d{reason}"),
            Event::Broadcast { frame } => f.write_str(frame),
        }
    }
}

impl ToRedisArgs for Payload<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        // Formats into the command's own buffer.
        out.write_arg_fmt(self)
    }
}

/// The payload of a subscription probe by `incarnation` (see `sharded`):
/// nodes that do not know the `p` kind (older ones too) ignore it.
pub(super) fn probe(incarnation: &str, nonce: u64) -> String {
    format!("p{incarnation} {nonce}")
}

/// Whether `payload` is a probe sent by `incarnation`.
pub(super) fn is_probe_of(payload: &[u8], incarnation: &str) -> bool {
    payload
        .strip_prefix(b"p")
        .and_then(|rest| rest.strip_prefix(incarnation.as_bytes()))
        .is_some_and(|rest| rest.first() == Some(&b' '))
}

/// The event a pub/sub message carries; `None` for anything this module
/// did not write. `broadcast_channel` is [`keys::broadcast_channel`],
/// built once by the caller.
pub(super) fn decode(broadcast_channel: &str, channel: &str, payload: &[u8]) -> Option<Event> {
    let text = std::str::from_utf8(payload).ok()?;
    if channel == broadcast_channel {
        return Some(Event::Broadcast {
            frame: Frame::from(text),
        });
    }
    let user: Arc<str> = Arc::from(keys::channel_user(channel)?);
    let (kind, rest) = text.split_at_checked(1)?;
    Some(match kind {
        "m" => {
            let (id, frame) = rest.split_once(' ')?;
            Event::Message {
                user,
                id: Some(id.parse().ok()?),
                frame: Frame::from(frame),
            }
        }
        "M" => Event::Message {
            user,
            id: None,
            frame: Frame::from(rest),
        },
        "u" => Event::Unread {
            user,
            count: rest.parse().ok()?,
        },
        "s" => Event::State {
            user,
            frame: Frame::from(rest),
        },
        "d" => Event::Disconnect {
            user,
            reason: Arc::from(rest),
        },
        // Probes ("p") and kinds of later versions: nothing to deliver.
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageId;
    use proptest::prelude::*;

    /// The bytes a PUBLISH of `e` carries, decoded as the subscriber does.
    fn round_trip(e: &Event) -> Option<Event> {
        let args = Payload(e).to_redis_args();
        assert_eq!(args.len(), 1, "one payload argument");
        decode(&keys::broadcast_channel(), &channel(e), &args[0])
    }

    /// Event has no PartialEq (Frame compares only with strings); its
    /// Debug form shows every field.
    fn same(a: &Option<Event>, b: &Event) -> bool {
        format!("{a:?}") == format!("{:?}", Some(b))
    }

    fn message(user: &str, id: Option<MessageId>, frame: &str) -> Event {
        Event::Message {
            user: user.into(),
            id,
            frame: frame.into(),
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let id = Some(MessageId {
            ms: 1_732_390_000_000,
            seq: 3,
        });
        let events = [
            message("alice", id, r#"{"type":"message","id":"x y"}"#),
            message("alice", None, r#"{"type":"message"}"#),
            message("alice", id, ""),
            message("alice", None, ""),
            Event::Unread {
                user: "bob".into(),
                count: u64::MAX,
            },
            Event::Disconnect {
                user: "bob".into(),
                reason: "banned: see ünïcödé 🚫 reasons".into(),
            },
            Event::Disconnect {
                user: "bob".into(),
                reason: "".into(),
            },
            Event::Broadcast { frame: "".into() },
            Event::Broadcast {
                frame: "m1-0 not a user event".into(),
            },
        ];
        for e in &events {
            assert!(same(&round_trip(e), e), "{e:?}");
        }
    }

    #[test]
    fn payloads_are_as_documented() {
        let id = Some(MessageId { ms: 5, seq: 1 });
        let text = |e: &Event| Payload(e).to_string();
        assert_eq!(text(&message("a", id, "F")), "m5-1 F");
        assert_eq!(text(&message("a", None, "F")), "MF");
        assert_eq!(
            text(&Event::Unread {
                user: "a".into(),
                count: 4
            }),
            "u4"
        );
        assert_eq!(channel(&message("a", None, "F")), keys::user_channel("a"));
        assert_eq!(
            channel(&Event::Broadcast { frame: "F".into() }),
            keys::broadcast_channel()
        );
    }

    /// `scripts/append.lua` builds a stored message's payload itself, from
    /// the id it assigns; this holds it to the format above.
    #[test]
    fn append_script_writes_the_stored_message_payload() {
        assert!(super::super::scripts::APPEND
            .contains("redis.call(PUBLISH, ARGV[7], 'm' .. id .. ' ' .. frame)"));
        // What the script builds from id `5-1` and frame `F`.
        let lua = "m".to_string() + "5-1" + " " + "F";
        assert!(same(
            &decode("b", &keys::user_channel("a"), lua.as_bytes()),
            &message("a", Some(MessageId { ms: 5, seq: 1 }), "F")
        ));
    }

    /// A probe is delivered to no connection, and a node recognises only
    /// its own (an incarnation that is a prefix of another's is not it).
    #[test]
    fn probes_are_ignored_by_decode_and_told_apart_by_incarnation() {
        let p = probe("n1|00ab", 7);
        assert_eq!(p, "pn1|00ab 7");
        assert!(decode("b", &keys::user_channel("a"), p.as_bytes()).is_none());
        assert!(is_probe_of(p.as_bytes(), "n1|00ab"));
        assert!(!is_probe_of(p.as_bytes(), "n1|00a"));
        assert!(!is_probe_of(p.as_bytes(), "n2|00ab"));
        assert!(!is_probe_of(b"m1-0 pn1|00ab 7", "n1|00ab"));
    }

    #[test]
    fn bad_input_is_none() {
        let ch = keys::user_channel("a");
        let bc = keys::broadcast_channel();
        for payload in [
            &b""[..],
            b"x",
            b"m",
            b"m1-0",                  // no space before the frame
            b"m1 F",                  // not an id
            b"m-1-0 F",               // not an id
            b"u",                     // no count
            b"u-1",                   // negative
            b"u18446744073709551616", // overflows u64
            b"u1 ",                   // trailing space
            b"\xc3",                  // invalid UTF-8
            b"M\xff",                 // invalid UTF-8 in a frame
            "é".as_bytes(),           // multi-byte first char
        ] {
            assert!(decode(&bc, &ch, payload).is_none(), "{payload:?}");
        }
        assert!(decode(&bc, &bc, b"\xff").is_none());
        // Channels that are neither a user's nor the broadcast channel.
        for channel in ["", "?", "herald:nodes", "herald:{a}:inbox", "x:{a}:ch"] {
            assert!(decode(&bc, channel, b"MF").is_none(), "{channel}");
        }
    }

    /// Any string, control characters and all (`any::<String>()` leaves
    /// those out).
    fn text() -> impl Strategy<Value = String> + Clone {
        proptest::collection::vec(any::<char>(), 0..40).prop_map(String::from_iter)
    }

    fn event() -> impl Strategy<Value = Event> {
        let user = text().prop_map(|u| Arc::<str>::from(u.as_str()));
        let id = proptest::option::of((any::<u64>(), any::<u64>()))
            .prop_map(|o| o.map(|(ms, seq)| MessageId { ms, seq }));
        prop_oneof![
            (user.clone(), id, text()).prop_map(|(user, id, f)| Event::Message {
                user,
                id,
                frame: Frame::from(f),
            }),
            (user.clone(), any::<u64>()).prop_map(|(user, count)| Event::Unread { user, count }),
            (user.clone(), text()).prop_map(|(user, f)| Event::State {
                user,
                frame: Frame::from(f),
            }),
            (user, text()).prop_map(|(user, r)| Event::Disconnect {
                user,
                reason: Arc::from(r.as_str()),
            }),
            text().prop_map(|f| Event::Broadcast {
                frame: Frame::from(f)
            }),
        ]
    }

    proptest! {
        #[test]
        fn any_event_round_trips(e in event()) {
            prop_assert!(same(&round_trip(&e), &e), "{:?}", e);
        }

        #[test]
        fn any_input_decodes_without_panic(
            channel in prop_oneof![text(), text().prop_map(|u| keys::user_channel(&u))],
            payload in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                ("[mMuds]", text()).prop_map(|(k, s)| (k + &s).into_bytes()),
            ],
        ) {
            let _ = decode(&keys::broadcast_channel(), &channel, &payload);
        }
    }
}
