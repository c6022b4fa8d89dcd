//! What the nodes of a cluster share, one trait per concern:
//!
//! * [`Broker`]: fan-out of live events between nodes. A node subscribes to
//!   a user's events while it holds at least one of that user's connections
//!   and receives nothing for other users.
//! * [`Presence`]: which users are connected, how often, on which live nodes.
//! * [`Inbox`]: stored messages, read cursors and unread counts; a stored
//!   send's idempotency record is kept with the message, atomically.
//! * [`Idempotency`]: the records of live-only sends (transient, broadcast).
//!
//! Two implementations: [`memory`] (embedded, single node, the default) and
//! [`redis`] (a cluster of nodes sharing one Redis). The gRPC and WebSocket
//! layers see only these traits, through the node.
//!
//! Backends reach this node's connections through [`Local`]: an
//! [`EventSink`] where the events a broker receives are handed,
//! synchronously and without blocking (a dispatch only queues frames), and
//! a [`LocalView`] that presence reads its counts from (the node's hub
//! implements both). Nothing here names the hub or the node.

pub(crate) mod memory;
pub(crate) mod redis;

use crate::error::Result;
use crate::protocol::{Frame, MessageId};
use async_trait::async_trait;
use std::sync::Arc;

/// A live event for the connections of one user, or of everyone.
#[derive(Clone, Debug)]
pub enum Event {
    /// A message frame for every connection of `user`. `id` is set for stored
    /// messages, so a connection can drop what its replay already sent.
    Message {
        user: Arc<str>,
        id: Option<MessageId>,
        frame: Frame,
    },
    /// The user's unread count changed.
    Unread { user: Arc<str>, count: u64 },
    /// A control frame for every connection of `user` (the message
    /// center's `changed`): not a message, never dropped as replayed.
    State { user: Arc<str>, frame: Frame },
    /// Close every connection of the user (close code 4001).
    Disconnect { user: Arc<str>, reason: Arc<str> },
    /// A frame for every connection on every node.
    Broadcast { frame: Frame },
}

/// Where a backend hands the live events it receives for this node's
/// connections (the hub implements it). Every method only queues frames or
/// sets flags: none blocks or awaits, so backends call them under their own
/// locks and on the pub/sub task.
pub(crate) trait EventSink: Send + Sync + 'static {
    /// Queues the event's frames on the connections it is for.
    fn dispatch(&self, event: Event);
    /// Asks every connection here to catch up from the inbox: live
    /// delivery had a gap.
    fn resync_all(&self);
    /// Asks the connections of `user` here to catch up from the inbox: the
    /// user's live delivery had a gap (on Redis Cluster, the user's slot
    /// moved or its shard failed over).
    fn resync(&self, user: &str);
}

/// What a backend may ask about this node's connections (the hub answers):
/// counts read under the hub's shard locks, never awaited.
pub(crate) trait LocalView: Send + Sync + 'static {
    /// Whether `user` has a connection here.
    fn has_user(&self, user: &str) -> bool;
    /// Connections here.
    fn connections(&self) -> u64;
    /// Distinct users with a connection here.
    fn users(&self) -> u64;
    /// Connections here of each of `users`, in order.
    fn local_counts(&self, users: &[String]) -> Vec<u32>;
    /// Every user with a connection here.
    fn users_snapshot(&self) -> Vec<String>;
    /// Message frames queued to connections here, and events received from
    /// the broker, since the node started (for other nodes' `Stats`).
    fn counters(&self) -> (u64, u64);
}

/// This node's connections as a backend holds them: where events go and
/// what it may ask, each behind its own narrow trait; backends never name
/// the hub. Cheap to clone (two handles to one hub).
#[derive(Clone)]
pub(crate) struct Local {
    pub(crate) sink: Arc<dyn EventSink>,
    pub(crate) view: Arc<dyn LocalView>,
}

impl Local {
    /// Both sides of one hub.
    pub(crate) fn of<H: EventSink + LocalView>(hub: Arc<H>) -> Local {
        Local {
            sink: hub.clone(),
            view: hub,
        }
    }
}

/// One message to store: the inbox assigns the id and builds the frame.
#[derive(Clone, Copy)]
pub struct NewMessage<'a> {
    pub topic: &'a str,
    /// Validated JSON, copied verbatim into the frame.
    pub payload_json: &'a str,
    pub ts: u64,
    /// The caller's idempotency key, if any.
    pub idempotency: Option<IdemKey<'a>>,
}

/// A caller's idempotency key for one send (see `idempotency_key` in the
/// proto): a repeat within `window` with the same fingerprint is answered
/// from the first call's record; with another fingerprint it is refused.
#[derive(Clone, Copy, Debug)]
pub struct IdemKey<'a> {
    /// Validated: 1 to 128 printable ASCII characters, no spaces.
    pub key: &'a str,
    /// What the request asked for (topic, payload, transient), hashed; no
    /// spaces.
    pub fingerprint: &'a str,
    pub window: std::time::Duration,
}

/// What a stored send did for one user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub id: MessageId,
    /// A node holding the user received the message.
    pub online: bool,
    /// An earlier call with the same key stored it; nothing was done now.
    pub replayed: bool,
}

/// A live-only send's record, as [`Idempotency::claim`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// No earlier call: this one may push.
    New,
    /// An earlier call with the same fingerprint pushed, with this id.
    Seen(String),
    /// An earlier call used the key for another request.
    Conflict,
}

/// The scope of a live-only idempotency record.
#[derive(Clone, Copy, Debug)]
pub enum ClaimScope<'a> {
    /// A transient `SendToUser` to this user.
    User(&'a str),
    /// A `Broadcast`.
    Broadcast,
}

/// Records of live-only sends. Claiming and pushing are two steps, so a
/// push that fails after its claim is not retried by a repeat: live-only
/// messages are at most once.
#[async_trait]
pub trait Idempotency: Send + Sync + 'static {
    /// Before any effect of a keyed `SendToUser`: the index of the first
    /// of `users` whose records under `key` (stored or transient: a key is
    /// one request, whichever kind) were written for another request.
    /// Makes a rejected call free of side effects; only two different
    /// requests racing with one key can still get past it (each is then
    /// refused per recipient by the atomic write). The embedded backend
    /// also refuses here, with `ResourceExhausted`, when its record budget
    /// cannot take one more record per user.
    async fn first_conflict(&self, users: &[String], key: IdemKey<'_>) -> Result<Option<usize>>;

    /// For each scope: records `id` under `key` unless a record exists
    /// within `key.window`, and says what was there.
    async fn claim(
        &self,
        scopes: &[ClaimScope<'_>],
        key: IdemKey<'_>,
        id: &str,
    ) -> Result<Vec<Claim>>;
}

/// The error for a key reused with another request.
pub(crate) fn reused(user: &str) -> crate::error::Error {
    crate::error::Error::invalid(format!(
        "idempotency_key was already used for user {user:?} with a different request \
         (topic, payload or transient); use a new key for a new send"
    ))
}

/// Whether a record (`"<id> <fingerprint>"`, or a stored send's
/// `"<id> <online> <fingerprint>"`) was written for another request.
pub(crate) fn conflicts(record: &str, fingerprint: &str) -> bool {
    record.rsplit(' ').next() != Some(fingerprint)
}

/// Reads a record written as `"<id> <fingerprint>"` against `fingerprint`.
pub(crate) fn read_claim(record: &str, fingerprint: &str) -> Claim {
    match record.split_once(' ') {
        Some((id, fp)) if fp == fingerprint => Claim::Seen(id.to_string()),
        _ => Claim::Conflict,
    }
}

/// What a connecting client gets before live messages.
#[derive(Debug, Default)]
pub struct Replay {
    /// The user's full unread count.
    pub unread: u64,
    /// Frames to send, oldest first.
    pub messages: Vec<(MessageId, Frame)>,
    /// With `since`: whether every message after it is still stored.
    pub resumed: Option<bool>,
    /// The newest id in the inbox when the replay was read. Live stored
    /// messages with an id at or below it were already part of the replay.
    pub head: MessageId,
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Starts delivering the user's events to this node. Resolves once every
    /// event published after it will arrive, so a replay read afterwards
    /// cannot miss a message. Idempotent.
    async fn subscribe(&self, user: &str) -> Result<()>;
    /// Stops delivering the user's events here (their last local connection
    /// has gone). Idempotent.
    async fn unsubscribe(&self, user: &str) -> Result<()>;
    /// Publishes live events to the nodes that hold each user (pipelined).
    /// Returns, per event, whether some node holding the user (any node,
    /// for a broadcast) received it: the user was online.
    async fn publish(&self, events: Vec<Event>) -> Result<Vec<bool>>;
    /// Publishes a frame to every node once.
    async fn broadcast(&self, frame: Frame) -> Result<()>;
}

/// A live node of the cluster, as presence sees it.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub node_id: String,
    pub connections: u64,
    pub users: u64,
    /// As the node last reported them (every lease/3 on Redis).
    pub uptime_seconds: u64,
    pub messages_delivered: u64,
    pub broker_events_received: u64,
}

/// The cluster as presence sees it.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub nodes: Vec<NodeInfo>,
    pub online_users: u64,
}

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Reserves one connection of `user` if the user holds fewer than `cap`
    /// across the cluster, as one atomic step (concurrent connects on any
    /// nodes cannot overshoot). `Err(n)`: full, with `n` connections.
    /// Connections of a node that dies stop counting when its lease ends.
    async fn reserve(&self, user: &str, cap: u32) -> Result<std::result::Result<(), u32>>;
    /// Gives back a reservation (the connection ended, or never started).
    async fn release(&self, user: &str) -> Result<()>;
    /// This node gained a connection of `user`.
    async fn connected(&self, user: &str) -> Result<()>;
    /// This node lost a connection of `user`.
    async fn disconnected(&self, user: &str) -> Result<()>;
    /// Live connections per user across live nodes, in request order.
    async fn lookup(&self, users: &[String]) -> Result<Vec<u32>>;
    /// Every live node, and the distinct users online across them.
    async fn cluster(&self) -> Result<Cluster>;
    /// Leaves the cluster on a clean shutdown (a killed node's lease expires
    /// instead).
    async fn leave(&self) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
pub trait Inbox: Send + Sync + 'static {
    /// Stores one message for each user and publishes it to the user's
    /// connections in the same step, so the order in which connections see
    /// stored messages is the order of their ids. Returns, in order, each
    /// id and whether the publish reached a node holding the user (online).
    ///
    /// With an idempotency key, checking the user's record, storing and
    /// recording are one atomic step per user: a user whose record exists
    /// gets nothing stored or pushed and the record's answer
    /// (`replayed`); a record for another request is `InvalidArgument`.
    async fn append(&self, users: &[String], msg: NewMessage<'_>) -> Result<Vec<Appended>>;
    /// [`Inbox::append`] for each of several independent messages (a
    /// `SendBatch`), with a result per message: a message whose key was
    /// used for another request fails alone. `Err` when the batch as a
    /// whole failed (the backend is unreachable): some of its messages may
    /// have been stored, which a retry with the same keys finds.
    ///
    /// The default appends one message after the other; the Redis inbox
    /// sends the whole batch as one pipeline.
    async fn append_batch(
        &self,
        batch: &[(&[String], NewMessage<'_>)],
    ) -> Result<Vec<Result<Vec<Appended>>>> {
        let mut out = Vec::with_capacity(batch.len());
        for (users, msg) in batch {
            out.push(self.append(users, *msg).await);
        }
        Ok(out)
    }
    /// Stored messages newer than the read cursor.
    async fn unread(&self, user: &str) -> Result<u64>;
    /// With `since`: every stored message after it. Without: the newest
    /// `limit` unread messages. Oldest first either way.
    async fn replay(&self, user: &str, since: Option<MessageId>, limit: usize) -> Result<Replay>;
    /// Moves the read cursor to `up_to` (None: the newest message); never
    /// backwards, never past the newest message; every message at or below
    /// `up_to` is read afterwards (also those marked unread one by one).
    /// Returns the unread count and whether it changed. When it changed,
    /// the user's connections get the count and a `changed` frame, in the
    /// same atomic step (so concurrent changes reach devices in order).
    async fn mark_read(&self, user: &str, up_to: Option<MessageId>) -> Result<(u64, bool)>;
    /// A page of stored messages with their read state (message center).
    async fn list(&self, user: &str, q: &ListQuery<'_>) -> Result<Page>;
    /// Marks messages read or unread, or deletes them; tells the user's
    /// connections what changed (the new count and a `changed` frame) in
    /// the same atomic step. Ids no longer stored are skipped.
    async fn change(&self, user: &str, change: Change<'_>) -> Result<Changed>;
    /// Unread messages whose topic starts with `prefix` (reads at most the
    /// inbox).
    async fn unread_in(&self, user: &str, prefix: &str) -> Result<u64>;
}

/// Which stored messages a page lists.
#[derive(Clone, Debug)]
pub struct ListQuery<'a> {
    /// Exclusive; None starts at the newest (or oldest) end.
    pub cursor: Option<MessageId>,
    pub oldest_first: bool,
    /// 1 or more (the node caps it).
    pub limit: usize,
    pub unread_only: bool,
    /// Empty for any topic.
    pub topic_prefix: &'a str,
}

/// One listed message: its stored frame and read state.
#[derive(Clone, Debug)]
pub struct Listed {
    pub id: MessageId,
    pub read: bool,
    /// The stored message frame, as live delivery sends it.
    pub frame: Frame,
}

/// A page of [`Inbox::list`].
#[derive(Clone, Debug, Default)]
pub struct Page {
    /// The user's whole unread count.
    pub unread: u64,
    pub messages: Vec<Listed>,
    /// Where the next page starts (exclusive); None at the end.
    pub next: Option<MessageId>,
}

/// A per-message change.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    Read(&'a [MessageId]),
    Unread(&'a [MessageId]),
    Delete(&'a [MessageId]),
    DeleteAll,
}

/// What [`Inbox::change`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// The unread count after it.
    pub unread: u64,
    /// The ids whose state changed (read, unread, deleted), in request
    /// order; empty for `DeleteAll`.
    pub ids: Vec<MessageId>,
    /// Messages deleted.
    pub deleted: u64,
}

/// The four shared concerns (fan-out, presence, inboxes, idempotency
/// records), as one node uses them.
#[derive(Clone)]
pub struct Backend {
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<dyn Presence>,
    pub inbox: Arc<dyn Inbox>,
    pub idempotency: Arc<dyn Idempotency>,
}
