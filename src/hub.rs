//! This node's connections: who is connected here, and each connection's
//! bounded outbound queue.
//!
//! The registry is sharded by user id; each shard is a `parking_lot::Mutex`
//! (it cannot be poisoned: a panic elsewhere never turns every later lock
//! into a panic) held only for map updates and non-blocking queue pushes,
//! never across an `.await`.
//! Lock order is shard, then connection; a connection task takes only its
//! own connection lock.
//!
//! Each connection's queue is a `VecDeque` behind the connection's own lock,
//! woken through a `Notify`. An idle connection's queue owns no heap memory
//! (a channel would preallocate a block of slots per connection).
//!
//! The queue is bounded in bytes ([`QueueLimits::bytes`], the frames' text),
//! with a frame count as a backstop ([`QueueLimits::frames`]): what measures
//! a client falling behind is how much it has not read, so a burst of many
//! small frames (600 broadcasts of 100 bytes) passes while a client that
//! stops reading is cut off once its socket buffers and this budget are
//! full. When a push would exceed either bound, the client is too slow: the
//! connection is marked for close with 1013 and its frames are dropped;
//! stored messages stay in the inbox for the client's resume. The bytes
//! count what the client would have to read, not what the node holds: a
//! broadcast frame is shared by every queue it is in.

use crate::backend::{Event, EventSink, LocalView};
pub use crate::config::QueueLimits;
use crate::protocol::{self, Disconnect, Frame, MessageId};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// Shards of the connection map (each its own lock); also the most parts
/// a heartbeat interval is cut into (see [`Hub::heartbeat_part`]).
pub const SHARDS: usize = 64;

/// One queued frame. `id` is set for stored messages only.
pub struct Outbound {
    pub id: Option<MessageId>,
    pub frame: Frame,
}

struct ConnState {
    queue: VecDeque<Outbound>,
    /// Bytes of frame text in `queue`.
    queued_bytes: usize,
    close: Option<Disconnect>,
    /// Live delivery had a gap (the broker reconnected): catch up from the
    /// inbox before trusting live traffic again.
    resync: bool,
    /// The node's heartbeat ticked: check for silence, send a ping.
    heartbeat: bool,
}

/// What a connection task must do besides writing its queued frames.
#[derive(Debug, Default)]
pub struct Pending {
    pub close: Option<Disconnect>,
    pub resync: bool,
    pub heartbeat: bool,
}

/// A connection as the hub and its task share it. Dropped when both the
/// registry entry and the task are gone.
pub struct Conn {
    pub id: u64,
    pub user: Arc<str>,
    limits: QueueLimits,
    state: Mutex<ConnState>,
    wake: Notify,
}

impl Conn {
    /// Queues a frame; false if the connection is closing or just became
    /// too slow. Never blocks.
    fn push(&self, out: Outbound) -> bool {
        // Short critical section: no await, no allocation beyond the queue.
        let mut st = self.state.lock();
        if st.close.is_some() {
            return false;
        }
        let len = out.frame.len();
        let over = if st.queued_bytes + len > self.limits.bytes && !st.queue.is_empty() {
            Some("bytes")
        } else if st.queue.len() >= self.limits.frames {
            Some("frames")
        } else {
            None
        };
        if let Some(limit) = over {
            st.queue = VecDeque::new();
            st.queued_bytes = 0;
            st.close = Some(Disconnect::SlowClient);
            drop(st);
            metrics::counter!("herald_slow_client_closes_total", "limit" => limit).increment(1);
            self.wake.notify_one();
            return false;
        }
        st.queued_bytes += len;
        st.queue.push_back(out);
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Asks the connection task to close; the first request wins.
    pub fn close(&self, why: Disconnect) {
        let mut st = self.state.lock();
        if st.close.is_none() {
            st.close = Some(why);
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Waits until there is something to do.
    pub async fn wait(&self) {
        self.wake.notified().await
    }

    /// Moves every queued frame into `out` (batched writes) and reports a
    /// pending close request or resync.
    pub fn take(&self, out: &mut Vec<Outbound>) -> Pending {
        let mut st = self.state.lock();
        out.extend(st.queue.drain(..));
        st.queued_bytes = 0;
        if st.queue.capacity() > 64 {
            st.queue = VecDeque::new(); // give back what a burst grew
        }
        Pending {
            close: st.close.clone(),
            resync: std::mem::take(&mut st.resync),
            heartbeat: std::mem::take(&mut st.heartbeat),
        }
    }

    /// Raises a flag for the connection task and wakes it.
    fn flag(&self, set: impl FnOnce(&mut ConnState)) {
        set(&mut self.state.lock());
        self.wake.notify_one();
    }

    /// Pushes a frame for this connection only (replies, replay overflow).
    pub fn send(&self, frame: Frame) -> bool {
        self.push(Outbound { id: None, frame })
    }
}

/// The registry of this node's connections.
pub struct Hub {
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<Arc<str>, Vec<Arc<Conn>>>>]>,
    next_id: AtomicU64,
    node_tag: String,
    connections: AtomicUsize,
    users: AtomicUsize,
    /// Message frames queued to connections (exported to Prometheus when
    /// scraped, so delivery pays no registry lookup).
    pub delivered: AtomicU64,
    /// Events received from the broker.
    pub events_received: AtomicU64,
}

impl Hub {
    pub fn new(node_id: &str) -> Arc<Hub> {
        Arc::new(Hub {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            node_tag: node_id.to_string(),
            connections: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            events_received: AtomicU64::new(0),
        })
    }

    fn shard(&self, user: &str) -> &Mutex<HashMap<Arc<str>, Vec<Arc<Conn>>>> {
        &self.shards[(self.hasher.hash_one(user) as usize) % SHARDS]
    }

    /// Registers a new connection of `user`; returns it and whether it is the
    /// user's first on this node (the caller then subscribes the node).
    pub fn register(&self, user: &str, limits: QueueLimits) -> (Arc<Conn>, bool) {
        let mut shard = self.shard(user).lock();
        let key: Arc<str> = match shard.get_key_value(user) {
            Some((k, _)) => k.clone(),
            None => Arc::from(user),
        };
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            user: key.clone(),
            limits,
            state: Mutex::new(ConnState {
                queue: VecDeque::new(),
                queued_bytes: 0,
                close: None,
                resync: false,
                heartbeat: false,
            }),
            wake: Notify::new(),
        });
        let list = shard.entry(key).or_default();
        list.push(conn.clone());
        let first = list.len() == 1;
        drop(shard);
        self.connections.fetch_add(1, Ordering::Relaxed);
        if first {
            self.users.fetch_add(1, Ordering::Relaxed);
        }
        (conn, first)
    }

    /// Removes a connection; true if it was the user's last on this node.
    pub fn unregister(&self, conn: &Conn) -> bool {
        let mut shard = self.shard(&conn.user).lock();
        let Some(list) = shard.get_mut(&*conn.user) else {
            return false;
        };
        let before = list.len();
        list.retain(|c| c.id != conn.id);
        if list.len() == before {
            return false;
        }
        let last = list.is_empty();
        if last {
            shard.remove(&*conn.user);
        }
        drop(shard);
        self.connections.fetch_sub(1, Ordering::Relaxed);
        if last {
            self.users.fetch_sub(1, Ordering::Relaxed);
        }
        last
    }

    /// A connection id unique in the cluster: node id plus a local counter.
    pub fn conn_label(&self, conn: &Conn) -> String {
        format!("{}-{}", self.node_tag, conn.id)
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed) as u64
    }

    pub fn users(&self) -> u64 {
        self.users.load(Ordering::Relaxed) as u64
    }

    /// Local connections of each user.
    pub fn local_counts(&self, users: &[String]) -> Vec<u32> {
        users
            .iter()
            .map(|u| {
                self.shard(u)
                    .lock()
                    .get(u.as_str())
                    .map_or(0, |l| l.len() as u32)
            })
            .collect()
    }

    /// The connections of `user` on this node.
    pub fn user_connections(&self, user: &str) -> u32 {
        self.shard(user)
            .lock()
            .get(user)
            .map_or(0, |l| l.len() as u32)
    }

    /// Whether this node holds a connection of `user` right now.
    pub fn has_user(&self, user: &str) -> bool {
        self.shard(user).lock().contains_key(user)
    }

    /// Every user connected here (for re-subscribing after a backend outage).
    pub fn users_snapshot(&self) -> Vec<String> {
        self.shards
            .iter()
            .flat_map(|s| s.lock().keys().map(|k| k.to_string()).collect::<Vec<_>>())
            .collect()
    }

    /// Asks every connection to catch up from the inbox (after a broker
    /// reconnect, when live events may have been missed).
    pub fn resync_all(&self) {
        self.for_all(|c| c.flag(|st| st.resync = true));
    }

    /// One heartbeat tick for the connections of part `part` of `parts`
    /// (the shards `k` with `k % parts == part`): each checks its silence
    /// and pings its client. The node's one heartbeat timer (no timer per
    /// connection) walks the parts in turn over an interval, so each
    /// connection is still pinged once per interval but the node's pings
    /// leave in `parts` small groups instead of one burst: 16,667 pings
    /// (and as many pongs) at once held up every other request of a loaded
    /// node for up to two seconds (bench/c100k.sh, BENCHMARKS.md).
    pub fn heartbeat_part(&self, part: usize, parts: usize) {
        let parts = parts.clamp(1, SHARDS);
        for shard in self.shards.iter().skip(part % parts).step_by(parts) {
            for conn in shard.lock().values().flatten() {
                conn.flag(|st| st.heartbeat = true);
            }
        }
    }

    /// Asks every connection to close (graceful shutdown).
    pub fn close_all(&self, why: Disconnect) {
        self.for_all(|c| c.close(why.clone()));
    }

    /// Runs `f` on every connection, one shard lock at a time.
    fn for_all(&self, mut f: impl FnMut(&Conn)) {
        for shard in self.shards.iter() {
            for conn in shard.lock().values().flatten() {
                f(conn);
            }
        }
    }

    fn for_user(&self, user: &str, mut f: impl FnMut(&Conn)) {
        if let Some(list) = self.shard(user).lock().get(user) {
            for c in list {
                f(c);
            }
        }
    }
}

/// What the backends ask of the hub; each method is the inherent method of
/// the same name.
impl LocalView for Hub {
    fn has_user(&self, user: &str) -> bool {
        Hub::has_user(self, user)
    }
    fn connections(&self) -> u64 {
        Hub::connections(self)
    }
    fn users(&self) -> u64 {
        Hub::users(self)
    }
    fn local_counts(&self, users: &[String]) -> Vec<u32> {
        Hub::local_counts(self, users)
    }
    fn users_snapshot(&self) -> Vec<String> {
        Hub::users_snapshot(self)
    }
    fn counters(&self) -> (u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.events_received.load(Ordering::Relaxed),
        )
    }
}

/// Where the backends hand the events they receive.
impl EventSink for Hub {
    fn resync_all(&self) {
        Hub::resync_all(self)
    }
    fn resync(&self, user: &str) {
        self.for_user(user, |c| c.flag(|st| st.resync = true));
    }
    fn dispatch(&self, event: Event) {
        self.events_received.fetch_add(1, Ordering::Relaxed);
        match event {
            Event::Message { user, id, frame } => {
                let mut n = 0u64;
                self.for_user(&user, |c| {
                    n += c.push(Outbound {
                        id,
                        frame: frame.clone(),
                    }) as u64
                });
                self.delivered.fetch_add(n, Ordering::Relaxed);
            }
            Event::Unread { user, count } => {
                let frame = protocol::unread_frame(count);
                self.for_user(&user, |c| {
                    c.send(frame.clone());
                });
            }
            Event::State { user, frame } => {
                self.for_user(&user, |c| {
                    c.send(frame.clone());
                });
            }
            Event::Disconnect { user, reason } => {
                self.for_user(&user, |c| c.close(Disconnect::Kicked(reason.clone())));
            }
            Event::Broadcast { frame } => {
                let mut n = 0u64;
                self.for_all(|c| {
                    n += c.push(Outbound {
                        id: None,
                        frame: frame.clone(),
                    }) as u64
                });
                self.delivered.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}
