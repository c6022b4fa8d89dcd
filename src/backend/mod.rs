//! What the nodes of a cluster share, one trait per concern:
//!
//! * [`Broker`]: fan-out of live events between nodes. A node subscribes to
//!   a user's events while it holds at least one of that user's connections
//!   and receives nothing for other users.
//! * [`Presence`]: which users are connected, how often, on which live nodes.
//! * [`Inbox`]: stored messages, read cursors and unread counts.
//!
//! Two implementations: [`memory`] (embedded, single node, the default) and
//! [`redis`] (a cluster of nodes sharing one Redis). The gRPC and WebSocket
//! layers see only these traits, through the node.
//!
//! Backends reach this node's connections through [`Dispatch`] (the node's
//! hub implements it): events a broker receives are handed to it
//! synchronously and without blocking (a dispatch only queues frames), and
//! presence reads its counts. Nothing here names the hub or the node.

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
    /// Close every connection of the user (close code 4001).
    Disconnect { user: Arc<str>, reason: Arc<str> },
    /// A frame for every connection on every node.
    Broadcast { frame: Frame },
}

/// This node's connections, as a backend sees them: where a broker hands
/// the events it receives, and what the backends ask about who is connected
/// here. The node's hub implements it; backends hold an `Arc<dyn Dispatch>`,
/// never the hub itself.
///
/// No method blocks or awaits: they only read counts and queue frames, and
/// backends call them under their own locks and on the pub/sub task.
pub(crate) trait Dispatch: Send + Sync + 'static {
    /// Queues the event's frames on the connections it is for.
    fn dispatch(&self, event: Event);
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
    /// Asks every connection here to catch up from the inbox: live
    /// delivery had a gap.
    fn resync_all(&self);
}

/// One message to store: the inbox assigns the id and builds the frame.
pub struct NewMessage<'a> {
    pub topic: &'a str,
    /// Validated JSON, copied verbatim into the frame.
    pub payload_json: &'a str,
    pub ts: u64,
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
}

/// The cluster as presence sees it.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub nodes: Vec<NodeInfo>,
    pub online_users: u64,
}

#[async_trait]
pub trait Presence: Send + Sync + 'static {
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
    async fn append(&self, users: &[String], msg: NewMessage<'_>)
        -> Result<Vec<(MessageId, bool)>>;
    /// Stored messages newer than the read cursor.
    async fn unread(&self, user: &str) -> Result<u64>;
    /// With `since`: every stored message after it. Without: the newest
    /// `limit` unread messages. Oldest first either way.
    async fn replay(&self, user: &str, since: Option<MessageId>, limit: usize) -> Result<Replay>;
    /// Moves the read cursor to `up_to` (None: the newest message); never
    /// backwards, never past the newest message. Returns the unread count
    /// and whether it changed.
    async fn mark_read(&self, user: &str, up_to: Option<MessageId>) -> Result<(u64, bool)>;
}

/// The three shared concerns, as one node uses them.
#[derive(Clone)]
pub struct Backend {
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<dyn Presence>,
    pub inbox: Arc<dyn Inbox>,
}
