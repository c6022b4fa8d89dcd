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

/// What every name starts with.
const PREFIX: &str = "herald:";

/// `herald:{<user>}:<what>`.
fn user_scoped(user: &str, what: &str) -> String {
    format!("{PREFIX}{{{user}}}:{what}")
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
    user_scoped(user, &format!("idem:s:{key}"))
}

/// String: the record of a transient send to `user` with key `key`:
/// `"<id> <fingerprint>"`, for the idempotency window.
pub(crate) fn idem_transient(user: &str, key: &str) -> String {
    user_scoped(user, &format!("idem:t:{key}"))
}

/// String: the record of a broadcast with key `key`: `"<id> <fingerprint>"`.
pub(crate) fn idem_broadcast(key: &str) -> String {
    format!("{PREFIX}idem:b:{key}")
}

/// Hash: the user's connection reservations, cluster-wide: `<node>|<boot>`
/// (a node incarnation, see [`boots`]) -> connections. Written only by the
/// reserve and release scripts and by a node restoring its own entries.
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

/// The user of a channel named by [`user_channel`].
pub(crate) fn channel_user(channel: &str) -> Option<&str> {
    channel
        .strip_prefix(PREFIX)?
        .strip_prefix('{')?
        .strip_suffix("}:ch")
}

/// Channel: broadcast frames, subscribed by every node.
pub(crate) fn broadcast_channel() -> String {
    format!("{PREFIX}broadcast")
}

/// Sorted set: live nodes, scored by lease expiry.
pub(crate) fn nodes() -> String {
    format!("{PREFIX}nodes")
}

/// What every per-node key starts with.
fn node_scoped(node: &str, what: &str) -> String {
    format!("{PREFIX}node:{node}:{what}")
}

/// Hash: user -> live connections on node `node`.
pub(crate) fn node_conns(node: &str) -> String {
    node_scoped(node, "conns")
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn channel_user_inverts_user_channel() {
        for user in ["bob", "", "a}:ch", "{x}", "ünï côdé"] {
            assert_eq!(channel_user(&user_channel(user)), Some(user));
        }
        assert_eq!(channel_user(&broadcast_channel()), None);
        assert_eq!(channel_user(&inbox("bob")), None);
        assert_eq!(channel_user("other:{bob}:ch"), None);
    }
}

/// Hash: what node `node` last reported of itself (`started` unix ms,
/// `delivered`, `events`), written with each lease renewal.
pub(crate) fn node_stats(node: &str) -> String {
    node_scoped(node, "stats")
}
