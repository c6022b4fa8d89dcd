//! Every Redis key and channel name Herald uses, each built by one function
//! here; nothing else formats one. The table in the module doc of
//! [`super`] lists them with their types and lifetimes.
//!
//! User-scoped names carry the user id as a `{hash tag}` (built by
//! [`user_scoped`] only), so one user's keys and channel share a slot under
//! Redis Cluster: every script touches one user's keys, and the user's
//! sharded channel lives on the same shard as the inbox that publishes to
//! it. Node and cluster-wide keys have no tag; each is read and written
//! with single-key commands.
//!
//! # Caller-controlled parts
//!
//! User ids, idempotency keys and node ids come from callers and may hold
//! any character. Each reaches a name through one encoding, [`push_part`]:
//! the bytes that give a name its structure, `%` `{` `}` `:`, and the ASCII
//! control bytes (0x00 to 0x1f, 0x7f) are written as `%XX` (two uppercase
//! hex digits); every other character, non-ASCII ones included, is written
//! as it is. So an encoded part holds no `{`, `}` or `:`, and:
//!
//! * names parse back uniquely: a user-scoped name is `herald:{`, the
//!   encoded user up to the first `}`, then `}:` and a fixed suffix (or
//!   `idem:s:`/`idem:t:` and the encoded key); a node name is `herald:node:`,
//!   the encoded node id up to the next `:`, then a fixed suffix. Distinct
//!   (kind, user, key, node) never share a name (the proptest below), which
//!   they did when parts went in raw: the record of user `alice`'s key
//!   `x}:inbox` was the inbox of user `alice}:idem:s:x`;
//! * the hash tag of a user-scoped name is exactly the encoded user, so
//!   every key and the channel of one user share a slot under Redis Cluster
//!   whatever the user id holds;
//! * an id without those bytes encodes to itself, so data stored under the
//!   names of earlier versions stays where it was for every such user (and
//!   key, and node). Data of ids with them is under new names: a user's
//!   earlier inbox is left to expire, and a node id such as `host:8080`
//!   gets new node keys, which every lease renewal rewrites.
//!
//! [`channel_user`] decodes a channel name back to its user. Hash fields
//! and set members (user ids in a node's conns hash, node ids in the nodes
//! set and the boots hash) are stored as they are: they are never parsed
//! out of a longer string (a reservation field `<node>|<boot>` is split at
//! its last `|`, and a boot id is hex).

use std::borrow::Cow;

/// What every name starts with.
const PREFIX: &str = "herald:";

/// Whether byte `b` of a caller-controlled part is written as `%XX`.
fn escaped(b: u8) -> bool {
    matches!(b, b'%' | b'{' | b'}' | b':') || b < 0x20 || b == 0x7f
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Appends caller-controlled `part` (a user id, idempotency key or node
/// id) to `name`, encoded (see the module doc): the one way such a part
/// enters a name.
fn push_part(name: &mut String, part: &str) {
    let mut rest = part;
    while let Some(i) = rest.bytes().position(escaped) {
        name.push_str(&rest[..i]);
        let b = rest.as_bytes()[i];
        name.push('%');
        name.push(HEX[(b >> 4) as usize] as char);
        name.push(HEX[(b & 15) as usize] as char);
        // `b` is ASCII, so `i + 1` is a char boundary.
        rest = &rest[i + 1..];
    }
    name.push_str(rest);
}

/// Inverts [`push_part`]; `None` for text it cannot have written (a raw
/// `{`, `}` or `:`, a bad or needless escape): one name, one part.
fn decode_part(enc: &str) -> Option<Cow<'_, str>> {
    let bytes = enc.as_bytes();
    if !bytes.iter().any(|&b| escaped(b)) {
        return Some(Cow::Borrowed(enc));
    }
    let hex = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let b = hex(*bytes.get(i + 1)?)? << 4 | hex(*bytes.get(i + 2)?)?;
                if !escaped(b) {
                    return None;
                }
                out.push(b);
                i += 3;
            }
            b if escaped(b) => return None,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII bytes were unescaped, so what was UTF-8 still is.
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// `herald:{<user>}:<what>`, the user encoded.
fn user_scoped(user: &str, what: &str) -> String {
    let mut name = String::with_capacity(PREFIX.len() + user.len() + what.len() + 8);
    name.push_str(PREFIX);
    name.push('{');
    push_part(&mut name, user);
    name.push_str("}:");
    name.push_str(what);
    name
}

/// Stream: the user's stored messages.
pub(crate) fn inbox(user: &str) -> String {
    user_scoped(user, "inbox")
}

/// Hash: the user's inbox bookkeeping (`last`, `seq`, `rid`, `rn`, `floor`,
/// `tn`; see `scripts/prelude.lua`).
pub(crate) fn meta(user: &str) -> String {
    user_scoped(user, "meta")
}

/// Sorted set: ids read above the read cursor (score: the ordinal `n`).
pub(crate) fn read_above(user: &str) -> String {
    user_scoped(user, "rd")
}

/// Sorted set: ids unread at or below the read cursor (score: `n`).
pub(crate) fn unread_below(user: &str) -> String {
    user_scoped(user, "ur")
}

/// Sorted set: ids deleted above `tn` (score: `n`).
pub(crate) fn deleted(user: &str) -> String {
    user_scoped(user, "del")
}

/// The keys of every inbox script but append, in their order: inbox, meta,
/// rd, ur, del (all under the user's hash tag: one slot).
pub(crate) fn inbox_state(user: &str) -> [String; 5] {
    [
        inbox(user),
        meta(user),
        read_above(user),
        unread_below(user),
        deleted(user),
    ]
}

/// String: the record of a stored send to `user` with idempotency key `key`:
/// `"<id> <online 0|1> <fingerprint>"`, for the idempotency window.
pub(crate) fn idem_stored(user: &str, key: &str) -> String {
    let mut name = user_scoped(user, "idem:s:");
    push_part(&mut name, key);
    name
}

/// String: the record of a transient send to `user` with key `key`:
/// `"<id> <fingerprint>"`, for the idempotency window.
pub(crate) fn idem_transient(user: &str, key: &str) -> String {
    let mut name = user_scoped(user, "idem:t:");
    push_part(&mut name, key);
    name
}

/// String: the record of a broadcast with key `key`: `"<id> <fingerprint>"`.
pub(crate) fn idem_broadcast(key: &str) -> String {
    let mut name = format!("{PREFIX}idem:b:");
    push_part(&mut name, key);
    name
}

/// Hash: the user's connection reservations, cluster-wide: `<node>|<boot>`
/// (a node incarnation, see [`boots`]) -> connections. Written only by the
/// reserve and release scripts and by a node restoring its own entries;
/// each write sets its expiry (`--presence-ttl`), which the registrar of
/// every node holding the user refreshes.
pub(crate) fn user_conns(user: &str) -> String {
    user_scoped(user, "conns")
}

/// Hash: node id -> the boot id of its current incarnation (written with
/// each lease renewal). A reservation of an older incarnation is dead.
pub(crate) fn boots() -> String {
    format!("{PREFIX}boots")
}

/// Channel: the user's live events, subscribed by nodes holding the user.
pub(crate) fn user_channel(user: &str) -> String {
    user_scoped(user, "ch")
}

/// The user of a channel named by [`user_channel`] (decoded: borrowed from
/// `channel` unless the user id has escaped bytes).
pub(crate) fn channel_user(channel: &str) -> Option<Cow<'_, str>> {
    let user = channel
        .strip_prefix(PREFIX)?
        .strip_prefix('{')?
        .strip_suffix("}:ch")?;
    decode_part(user)
}

/// Channel: broadcast frames, subscribed by every node.
pub(crate) fn broadcast_channel() -> String {
    format!("{PREFIX}broadcast")
}

/// Sorted set: live nodes, scored by lease expiry.
pub(crate) fn nodes() -> String {
    format!("{PREFIX}nodes")
}

/// `herald:node:<node>:<what>`, the node id encoded.
fn node_scoped(node: &str, what: &str) -> String {
    let mut name = format!("{PREFIX}node:");
    push_part(&mut name, node);
    name.push(':');
    name.push_str(what);
    name
}

/// Hash: user -> live connections on node `node` (fields are user ids as
/// they are: a field is never parsed).
pub(crate) fn node_conns(node: &str) -> String {
    node_scoped(node, "conns")
}

/// Hash: what node `node` last reported of itself (`started` unix ms,
/// `delivered`, `events`), written with each lease renewal.
pub(crate) fn node_stats(node: &str) -> String {
    node_scoped(node, "stats")
}

/// `<node>|<boot>`: the field a node incarnation's reservations are kept
/// under in a user's reservation hash, and what its probes carry.
pub(super) fn incarnation(node_id: &str, boot: &str) -> String {
    format!("{node_id}|{boot}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The user [`channel_user`] reads from `user`'s channel.
    fn round_trip(user: &str) -> Option<String> {
        channel_user(&user_channel(user)).map(Cow::into_owned)
    }

    /// The "Data in Redis" table of the backend's module docs names every
    /// key and channel this module builds, and nothing it does not.
    #[test]
    fn the_data_in_redis_table_lists_every_name() {
        let (u, k, n) = ("<user>", "<key>", "<node>");
        let mut built = vec![
            inbox(u),
            meta(u),
            idem_stored(u, k),
            idem_transient(u, k),
            idem_broadcast(k),
            user_conns(u),
            boots(),
            user_channel(u),
            broadcast_channel(),
            nodes(),
            node_conns(n),
            node_stats(n),
        ];
        built.extend(inbox_state(u));
        built.sort();
        built.dedup();
        let docs = include_str!("mod.rs");
        let start = docs.find("//! | name | type |").expect("the table");
        let mut listed: Vec<String> = docs[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with("//! |"))
            .map(|l| {
                l.split('`')
                    .nth(1)
                    .expect("a name in backticks")
                    .to_string()
            })
            .collect();
        listed.sort();
        assert_eq!(listed, built);
    }

    #[test]
    fn names_are_stable() {
        assert_eq!(inbox("al ice"), "herald:{al ice}:inbox");
        assert_eq!(meta("bob"), "herald:{bob}:meta");
        for k in inbox_state("bob") {
            assert!(
                k.starts_with("herald:{bob}:"),
                "{k}: one user's keys share a slot"
            );
        }
        assert_eq!(user_channel("bob"), "herald:{bob}:ch");
        assert_eq!(broadcast_channel(), "herald:broadcast");
        assert_eq!(nodes(), "herald:nodes");
        assert_eq!(node_conns("n1"), "herald:node:n1:conns");
        assert_eq!(node_stats("n1"), "herald:node:n1:stats");
        assert_eq!(boots(), "herald:boots");
        assert_eq!(user_conns("bob"), "herald:{bob}:conns");
        assert_eq!(idem_stored("bob", "k-1"), "herald:{bob}:idem:s:k-1");
        assert_eq!(idem_transient("bob", "k-1"), "herald:{bob}:idem:t:k-1");
        assert_eq!(idem_broadcast("k-1"), "herald:idem:b:k-1");
        // Ids without structural bytes name what earlier versions named.
        assert_eq!(inbox("ünï côdé@x.org|1"), "herald:{ünï côdé@x.org|1}:inbox");
    }

    #[test]
    fn structural_bytes_are_escaped() {
        assert_eq!(inbox("a}:b"), "herald:{a%7D%3Ab}:inbox");
        assert_eq!(inbox("{%}"), "herald:{%7B%25%7D}:inbox");
        assert_eq!(inbox("t\tab\u{7f}"), "herald:{t%09ab%7F}:inbox");
        assert_eq!(idem_stored("u", "x}:y"), "herald:{u}:idem:s:x%7D%3Ay");
        assert_eq!(node_conns("host:8080"), "herald:node:host%3A8080:conns");
    }

    /// The collision of issue 20: user `alice`'s record of key `x}:inbox`
    /// was the inbox of user `alice}:idem:s:x`.
    #[test]
    fn a_record_is_never_another_users_inbox() {
        assert_ne!(idem_stored("alice", "x}:inbox"), inbox("alice}:idem:s:x"));
        assert_ne!(idem_transient("alice", "x}:meta"), meta("alice}:idem:t:x"));
    }

    #[test]
    fn channel_user_inverts_user_channel() {
        for user in ["bob", "", "a}:ch", "{x}", "ünï côdé", "%41", "%", "a\0b"] {
            assert_eq!(round_trip(user).as_deref(), Some(user));
        }
        assert!(matches!(
            channel_user("herald:{bob}:ch"),
            Some(Cow::Borrowed("bob"))
        ));
        assert_eq!(channel_user(&broadcast_channel()), None);
        assert_eq!(channel_user(&inbox("bob")), None);
        assert_eq!(channel_user("other:{bob}:ch"), None);
        // Nothing push_part writes: raw structure, bad or needless escapes.
        for bad in [
            "a}:ch", "a:b", "{a", "%", "%4", "%zz", "%7b", "%41", "%C3%A9",
        ] {
            assert_eq!(channel_user(&format!("herald:{{{bad}}}:ch")), None, "{bad}");
        }
    }

    /// Every name [`super`] builds, by what it names.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Name {
        Inbox(String),
        Meta(String),
        ReadAbove(String),
        UnreadBelow(String),
        Deleted(String),
        IdemStored(String, String),
        IdemTransient(String, String),
        IdemBroadcast(String),
        UserConns(String),
        UserChannel(String),
        NodeConns(String),
        NodeStats(String),
        Boots,
        Nodes,
        Broadcast,
    }

    impl Name {
        fn build(&self) -> String {
            match self {
                Name::Inbox(u) => inbox(u),
                Name::Meta(u) => meta(u),
                Name::ReadAbove(u) => read_above(u),
                Name::UnreadBelow(u) => unread_below(u),
                Name::Deleted(u) => deleted(u),
                Name::IdemStored(u, k) => idem_stored(u, k),
                Name::IdemTransient(u, k) => idem_transient(u, k),
                Name::IdemBroadcast(k) => idem_broadcast(k),
                Name::UserConns(u) => user_conns(u),
                Name::UserChannel(u) => user_channel(u),
                Name::NodeConns(n) => node_conns(n),
                Name::NodeStats(n) => node_stats(n),
                Name::Boots => boots(),
                Name::Nodes => nodes(),
                Name::Broadcast => broadcast_channel(),
            }
        }

        /// The user whose hash tag the name carries.
        fn user(&self) -> Option<&str> {
            match self {
                Name::Inbox(u)
                | Name::Meta(u)
                | Name::ReadAbove(u)
                | Name::UnreadBelow(u)
                | Name::Deleted(u)
                | Name::IdemStored(u, _)
                | Name::IdemTransient(u, _)
                | Name::UserConns(u)
                | Name::UserChannel(u) => Some(u),
                _ => None,
            }
        }
    }

    /// What Redis Cluster hashes of `key`: the text between the first `{`
    /// and the first `}` after it, when not empty; else the whole key.
    fn hash_tag(key: &str) -> &str {
        if let Some(open) = key.find('{') {
            if let Some(len) = key[open + 1..].find('}') {
                if len > 0 {
                    return &key[open + 1..open + 1 + len];
                }
            }
        }
        key
    }

    /// Parts made mostly of what gives names their structure (and of the
    /// words names hold), so distinct parts that could collide are common;
    /// plus any character, control characters and all.
    fn part() -> impl Strategy<Value = String> + Clone {
        let piece = prop_oneof![
            3 => prop::sample::select(vec![
                "%", "{", "}", ":", "}:", "a", "x", "%7D", "%25", "%3A", "inbox", "meta", "ch",
                "conns", "idem", "s", "t", "b", "node", "stats", "herald", "\0", "\u{7f}", "é",
                "}:inbox", "}:ch", "}:idem:s:", "}:idem:t:", ":conns", ":stats", "herald:{",
            ])
            .prop_map(str::to_string),
            1 => any::<char>().prop_map(String::from),
        ];
        prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
    }

    fn name() -> impl Strategy<Value = Name> {
        let (u, k) = (part(), part());
        prop_oneof![
            u.clone().prop_map(Name::Inbox),
            u.clone().prop_map(Name::Meta),
            u.clone().prop_map(Name::ReadAbove),
            u.clone().prop_map(Name::UnreadBelow),
            u.clone().prop_map(Name::Deleted),
            (u.clone(), k.clone()).prop_map(|(u, k)| Name::IdemStored(u, k)),
            (u.clone(), k.clone()).prop_map(|(u, k)| Name::IdemTransient(u, k)),
            k.clone().prop_map(Name::IdemBroadcast),
            u.clone().prop_map(Name::UserConns),
            u.clone().prop_map(Name::UserChannel),
            k.clone().prop_map(Name::NodeConns),
            k.prop_map(Name::NodeStats),
            Just(Name::Boots),
            Just(Name::Nodes),
            Just(Name::Broadcast),
        ]
    }

    /// Reads a name back (the grammar of the module doc): a left inverse
    /// of [`Name::build`], so no two names collide.
    fn parse(s: &str) -> Option<Name> {
        let rest = s.strip_prefix(PREFIX)?;
        let part = |p: &str| decode_part(p).map(Cow::into_owned);
        if let Some(tagged) = rest.strip_prefix('{') {
            let (u, what) = tagged.split_once("}:")?;
            let u = part(u)?;
            if let Some(k) = what.strip_prefix("idem:s:") {
                return Some(Name::IdemStored(u, part(k)?));
            }
            if let Some(k) = what.strip_prefix("idem:t:") {
                return Some(Name::IdemTransient(u, part(k)?));
            }
            return Some(match what {
                "inbox" => Name::Inbox(u),
                "meta" => Name::Meta(u),
                "rd" => Name::ReadAbove(u),
                "ur" => Name::UnreadBelow(u),
                "del" => Name::Deleted(u),
                "conns" => Name::UserConns(u),
                "ch" => Name::UserChannel(u),
                _ => return None,
            });
        }
        if let Some(k) = rest.strip_prefix("idem:b:") {
            return Some(Name::IdemBroadcast(part(k)?));
        }
        if let Some(node) = rest.strip_prefix("node:") {
            let (n, what) = node.split_once(':')?;
            return Some(match what {
                "conns" => Name::NodeConns(part(n)?),
                "stats" => Name::NodeStats(part(n)?),
                _ => return None,
            });
        }
        Some(match rest {
            "boots" => Name::Boots,
            "nodes" => Name::Nodes,
            "broadcast" => Name::Broadcast,
            _ => return None,
        })
    }

    /// Every way to read `s` with the parts taken as they are (the
    /// grammar without the encoding, ambiguous: a raw part may hold `}:`
    /// or `:`): the names most likely to collide with the one `s` is.
    fn raw_readings(s: &str) -> Vec<Name> {
        let mut out = Vec::new();
        let Some(rest) = s.strip_prefix(PREFIX) else {
            return out;
        };
        if let Some(body) = rest.strip_prefix('{') {
            for (i, _) in body.match_indices("}:") {
                let (u, what) = (body[..i].to_string(), &body[i + 2..]);
                if let Some(k) = what.strip_prefix("idem:s:") {
                    out.push(Name::IdemStored(u.clone(), k.to_string()));
                }
                if let Some(k) = what.strip_prefix("idem:t:") {
                    out.push(Name::IdemTransient(u.clone(), k.to_string()));
                }
                out.extend(match what {
                    "inbox" => Some(Name::Inbox(u)),
                    "meta" => Some(Name::Meta(u)),
                    "rd" => Some(Name::ReadAbove(u)),
                    "ur" => Some(Name::UnreadBelow(u)),
                    "del" => Some(Name::Deleted(u)),
                    "conns" => Some(Name::UserConns(u)),
                    "ch" => Some(Name::UserChannel(u)),
                    _ => None,
                });
            }
        }
        if let Some(k) = rest.strip_prefix("idem:b:") {
            out.push(Name::IdemBroadcast(k.to_string()));
        }
        if let Some(node) = rest.strip_prefix("node:") {
            for (j, _) in node.match_indices(':') {
                let n = node[..j].to_string();
                match &node[j + 1..] {
                    "conns" => out.push(Name::NodeConns(n)),
                    "stats" => out.push(Name::NodeStats(n)),
                    _ => {}
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Two random names, and the names that look like the first (its
        /// name read with raw parts, which is how `alice}:idem:s:x`'s inbox
        /// looked like `alice`'s record of `x}:inbox`): distinct names
        /// never share a name.
        #[test]
        fn distinct_names_never_collide(a in name(), b in name()) {
            let built = a.build();
            if b != a {
                prop_assert_ne!(b.build(), built.clone());
            }
            for b in raw_readings(&built) {
                if b != a {
                    prop_assert_ne!(b.build(), built.clone(), "{:?} and {:?}", a, b);
                }
            }
        }

        /// Every name reads back (with the grammar of the module doc) as
        /// what it names: [`parse`] is a left inverse of building.
        #[test]
        fn every_name_parses_back_to_what_it_names(n in name()) {
            prop_assert_eq!(parse(&n.build()), Some(n.clone()));
        }

        /// Any user (any characters, control characters and all, or any
        /// bytes made UTF-8): its channel names it, and all its names share
        /// the hash tag of its channel (one slot).
        #[test]
        fn a_users_names_share_one_slot_and_its_channel_round_trips(
            n in name(),
            raw in prop_oneof![
                prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter),
                prop::collection::vec(any::<u8>(), 0..40)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ],
        ) {
            prop_assert_eq!(round_trip(&raw), Some(raw.clone()));
            // (An empty user id, refused by every API, would have an
            // empty tag, which Redis ignores.)
            if let Some(u) = n.user().filter(|u| !u.is_empty()) {
                let ch = user_channel(u);
                let name = n.build();
                prop_assert_eq!(round_trip(u), Some(u.to_string()));
                prop_assert_ne!(hash_tag(&ch), ch.as_str(), "the user is the tag");
                prop_assert_eq!(hash_tag(&name), hash_tag(&ch));
            }
        }
    }
}
