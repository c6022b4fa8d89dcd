//! The embedded backend: broker, presence and inbox in this process's
//! memory. Single node only: nothing is shared with other nodes and
//! everything is lost when the process exits. It is the default so that a
//! fresh machine runs Herald with one command; run a cluster with Redis.

use super::reused;
use super::{
    Appended, Backend, Broker, Claim, ClaimScope, Cluster, Dispatch, Event, IdemKey, Idempotency,
    Inbox, NewMessage, NodeInfo, Presence, Replay,
};
use crate::config::InboxConfig;
use crate::error::{Error, Result};
use crate::protocol::{self, Frame, MessageId};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Weak};
use std::time::Duration;

const SHARDS: usize = 64;

/// How often expired idempotency records are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// An idempotency record: what the first call with a key did.
struct Record {
    id: String,
    online: bool,
    fingerprint: Box<str>,
    /// Unix ms after which the record is gone.
    expires: u64,
}

/// Where a record lives: `s` stored send, `t` transient send, `b`
/// broadcast; then the user (if any) and the key.
fn record_key(kind: char, user: &str, key: &str) -> String {
    format!("{kind}\0{user}\0{key}")
}

struct Stored {
    id: MessageId,
    ts: u64,
    frame: Frame,
}

/// One user's inbox.
struct UserInbox {
    messages: VecDeque<Stored>,
    /// The newest id ever assigned (or the creation mark).
    last: MessageId,
    /// Everything at or below this id is gone (trimmed, or from before this
    /// inbox existed). A resume from an older position is incomplete.
    floor: MessageId,
    /// The newest id read.
    cursor: MessageId,
}

impl UserInbox {
    fn new() -> Self {
        // The creation mark is a virtual, already-trimmed message: a resume
        // position from before it (an earlier process, say) reads as lost.
        let mark = MessageId {
            ms: protocol::now_ms(),
            seq: 0,
        };
        UserInbox {
            messages: VecDeque::new(),
            last: mark,
            floor: mark,
            cursor: MessageId::ZERO,
        }
    }

    fn trim(&mut self, cfg: &InboxConfig, now: u64) {
        let min_ts = now.saturating_sub(cfg.max_age.as_millis() as u64);
        while let Some(front) = self.messages.front() {
            if self.messages.len() > cfg.max_messages || front.ts < min_ts {
                self.floor = self.floor.max(front.id);
                self.messages.pop_front();
            } else {
                break;
            }
        }
    }

    /// Index of the first message newer than `id`.
    fn after(&self, id: MessageId) -> usize {
        self.messages.partition_point(|m| m.id <= id)
    }

    fn unread(&self) -> u64 {
        (self.messages.len() - self.after(self.cursor)) as u64
    }
}

pub(crate) struct MemoryBackend {
    /// This node's connections: where events go.
    local: Arc<dyn Dispatch>,
    node_id: String,
    cfg: InboxConfig,
    hasher: RandomState,
    /// Synchronous (parking_lot) mutexes, never held across an `.await`:
    /// every critical section is a few map/deque operations and
    /// non-blocking queue pushes ([`Dispatch`] never blocks). No method
    /// here awaits while a shard is locked; keep it so.
    inboxes: Box<[Mutex<HashMap<String, UserInbox>>]>,
    /// Idempotency records, sharded by record key; swept every
    /// [`SWEEP_EVERY`]. Lock order: an inbox shard, then a record shard.
    records: Box<[Mutex<HashMap<String, Record>>]>,
    /// Connection reservations per user (the per-user cap's count).
    reservations: Mutex<HashMap<String, u32>>,
}

impl MemoryBackend {
    pub(crate) fn new(local: Arc<dyn Dispatch>, node_id: &str, cfg: InboxConfig) -> Arc<Self> {
        Arc::new(MemoryBackend {
            local,
            node_id: node_id.to_string(),
            cfg,
            hasher: RandomState::new(),
            inboxes: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            records: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            reservations: Mutex::new(HashMap::new()),
        })
        .with_sweeper()
    }

    /// Starts the background task that frees what has expired; it ends
    /// when the backend is dropped.
    fn with_sweeper(self: Arc<Self>) -> Arc<Self> {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak: Weak<Self> = Arc::downgrade(&self);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                loop {
                    tick.tick().await;
                    let Some(me) = weak.upgrade() else { return };
                    me.sweep(protocol::now_ms());
                }
            });
        }
        self
    }

    /// Frees expired idempotency records, one shard lock at a time.
    fn sweep(&self, now: u64) {
        for shard in self.records.iter() {
            shard.lock().retain(|_, r| r.expires > now);
        }
    }

    fn records(&self, key: &str) -> &Mutex<HashMap<String, Record>> {
        &self.records[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    pub(crate) fn backend(self: &Arc<Self>) -> Backend {
        Backend {
            broker: self.clone(),
            presence: self.clone(),
            inbox: self.clone(),
            idempotency: self.clone(),
        }
    }

    fn shard(&self, user: &str) -> &Mutex<HashMap<String, UserInbox>> {
        &self.inboxes[(self.hasher.hash_one(user) as usize) % SHARDS]
    }

    fn with_inbox<T>(
        &self,
        user: &str,
        create: bool,
        f: impl FnOnce(Option<&mut UserInbox>) -> T,
    ) -> T {
        let now = protocol::now_ms();
        let mut shard = self.shard(user).lock();
        if create && !shard.contains_key(user) {
            shard.insert(user.to_string(), UserInbox::new());
        }
        let inbox = shard.get_mut(user);
        match inbox {
            Some(i) => {
                i.trim(&self.cfg, now);
                f(Some(i))
            }
            None => f(None),
        }
    }
}

#[async_trait]
impl Broker for MemoryBackend {
    async fn subscribe(&self, _user: &str) -> Result<()> {
        Ok(()) // Every event is dispatched here; it reaches whoever is connected.
    }
    async fn unsubscribe(&self, _user: &str) -> Result<()> {
        Ok(())
    }
    async fn publish(&self, events: Vec<Event>) -> Result<Vec<bool>> {
        Ok(events
            .into_iter()
            .map(|e| {
                let online = match &e {
                    Event::Message { user, .. }
                    | Event::Unread { user, .. }
                    | Event::Disconnect { user, .. } => self.local.has_user(user),
                    Event::Broadcast { .. } => self.local.connections() > 0,
                };
                self.local.dispatch(e);
                online
            })
            .collect())
    }
    async fn broadcast(&self, frame: Frame) -> Result<()> {
        self.local.dispatch(Event::Broadcast { frame });
        Ok(())
    }
}

#[async_trait]
impl Presence for MemoryBackend {
    async fn reserve(&self, user: &str, cap: u32) -> Result<std::result::Result<(), u32>> {
        let mut held = self.reservations.lock();
        let n = held.entry(user.to_string()).or_insert(0);
        if *n >= cap {
            let full = *n;
            if full == 0 {
                held.remove(user);
            }
            return Ok(Err(full));
        }
        *n += 1;
        Ok(Ok(()))
    }
    async fn release(&self, user: &str) -> Result<()> {
        let mut held = self.reservations.lock();
        if let Some(n) = held.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(user);
            }
        }
        Ok(())
    }
    async fn connected(&self, _user: &str) -> Result<()> {
        Ok(())
    }
    async fn disconnected(&self, _user: &str) -> Result<()> {
        Ok(())
    }
    async fn lookup(&self, users: &[String]) -> Result<Vec<u32>> {
        Ok(self.local.local_counts(users))
    }
    async fn cluster(&self) -> Result<Cluster> {
        let users = self.local.users();
        Ok(Cluster {
            nodes: vec![NodeInfo {
                node_id: self.node_id.clone(),
                connections: self.local.connections(),
                users,
                // This node's own entry is filled in by the node itself.
                ..Default::default()
            }],
            online_users: users,
        })
    }
}

#[async_trait]
impl Inbox for MemoryBackend {
    async fn append(&self, users: &[String], msg: NewMessage<'_>) -> Result<Vec<Appended>> {
        let mut out = Vec::with_capacity(users.len());
        for user in users {
            // Id assignment, delivery and the idempotency record under one
            // inbox lock: connections see a user's stored messages in id
            // order, and a key stores at most once per user.
            let done = self.with_inbox(user, true, |inbox| {
                let inbox = inbox.expect("created");
                let record = msg.idempotency.map(|k| (k, record_key('s', user, k.key)));
                if let Some((k, rkey)) = &record {
                    let seen = self
                        .records(rkey)
                        .lock()
                        .get(rkey)
                        .filter(|r| r.expires > msg.ts)
                        .map(|r| {
                            (
                                r.fingerprint.as_ref() == k.fingerprint,
                                r.id.clone(),
                                r.online,
                            )
                        });
                    match seen {
                        Some((true, id, online)) => {
                            let id: MessageId = id
                                .parse()
                                .map_err(|_| Error::Backend("corrupt idempotency record".into()))?;
                            return Ok(Appended {
                                id,
                                online,
                                replayed: true,
                            });
                        }
                        Some((false, _, _)) => return Err(reused(user)),
                        None => {}
                    }
                }
                let id = inbox.last.next(msg.ts);
                inbox.last = id;
                let frame: Frame = protocol::message_frame(
                    &id.to_string(),
                    msg.topic,
                    msg.payload_json,
                    msg.ts,
                    false,
                )
                .into();
                inbox.messages.push_back(Stored {
                    id,
                    ts: msg.ts,
                    frame: frame.clone(),
                });
                inbox.trim(&self.cfg, msg.ts);
                let online = self.local.has_user(user);
                self.local.dispatch(Event::Message {
                    user: Arc::from(user.as_str()),
                    id: Some(id),
                    frame,
                });
                if let Some((k, rkey)) = record {
                    self.records(&rkey).lock().insert(
                        rkey,
                        Record {
                            id: id.to_string(),
                            online,
                            fingerprint: k.fingerprint.into(),
                            expires: msg.ts + k.window.as_millis() as u64,
                        },
                    );
                }
                Ok(Appended {
                    id,
                    online,
                    replayed: false,
                })
            })?;
            out.push(done);
        }
        Ok(out)
    }

    async fn unread(&self, user: &str) -> Result<u64> {
        Ok(self.with_inbox(user, false, |i| i.map_or(0, |i| i.unread())))
    }

    async fn replay(&self, user: &str, since: Option<MessageId>, limit: usize) -> Result<Replay> {
        Ok(self.with_inbox(user, true, |inbox| {
            let inbox = inbox.expect("created");
            let unread = inbox.unread();
            let (start, resumed) = match since {
                Some(since) => (inbox.after(since), Some(since >= inbox.floor)),
                None => {
                    let first_unread = inbox.after(inbox.cursor);
                    (
                        first_unread.max(inbox.messages.len().saturating_sub(limit)),
                        None,
                    )
                }
            };
            Replay {
                unread,
                messages: inbox
                    .messages
                    .range(start..)
                    .map(|m| (m.id, m.frame.clone()))
                    .collect(),
                resumed,
                head: inbox.last,
            }
        }))
    }

    async fn mark_read(&self, user: &str, up_to: Option<MessageId>) -> Result<(u64, bool)> {
        Ok(self.with_inbox(user, false, |inbox| {
            let Some(inbox) = inbox else {
                return (0, false);
            };
            let before = inbox.unread();
            let target = up_to.unwrap_or(inbox.last).min(inbox.last);
            inbox.cursor = inbox.cursor.max(target);
            let after = inbox.unread();
            (after, after != before)
        }))
    }
}

#[async_trait]
impl Idempotency for MemoryBackend {
    async fn claim(
        &self,
        scopes: &[ClaimScope<'_>],
        key: IdemKey<'_>,
        id: &str,
    ) -> Result<Vec<Claim>> {
        let now = protocol::now_ms();
        Ok(scopes
            .iter()
            .map(|scope| {
                let rkey = match scope {
                    ClaimScope::User(u) => record_key('t', u, key.key),
                    ClaimScope::Broadcast => record_key('b', "", key.key),
                };
                // Check and record under one lock: two concurrent claims of
                // a key cannot both be new.
                let mut shard = self.records(&rkey).lock();
                match shard.get(&rkey).filter(|r| r.expires > now) {
                    Some(r) if r.fingerprint.as_ref() == key.fingerprint => {
                        Claim::Seen(r.id.clone())
                    }
                    Some(_) => Claim::Conflict,
                    None => {
                        shard.insert(
                            rkey,
                            Record {
                                id: id.to_string(),
                                online: false,
                                fingerprint: key.fingerprint.into(),
                                expires: now + key.window.as_millis() as u64,
                            },
                        );
                        Claim::New
                    }
                }
            })
            .collect())
    }
}
