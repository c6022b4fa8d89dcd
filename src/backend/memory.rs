//! The embedded backend: broker, presence and inbox in this process's
//! memory. Single node only: nothing is shared with other nodes and
//! everything is lost when the process exits. It is the default so that a
//! fresh machine runs Herald with one command; run a cluster with Redis.

use super::{
    Backend, Broker, Cluster, Dispatch, Event, Inbox, NewMessage, NodeInfo, Presence, Replay,
};
use crate::config::InboxConfig;
use crate::error::Result;
use crate::protocol::{self, Frame, MessageId};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

const SHARDS: usize = 64;

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
}

impl MemoryBackend {
    pub(crate) fn new(local: Arc<dyn Dispatch>, node_id: &str, cfg: InboxConfig) -> Arc<Self> {
        Arc::new(MemoryBackend {
            local,
            node_id: node_id.to_string(),
            cfg,
            hasher: RandomState::new(),
            inboxes: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    pub(crate) fn backend(self: &Arc<Self>) -> Backend {
        Backend {
            broker: self.clone(),
            presence: self.clone(),
            inbox: self.clone(),
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
            }],
            online_users: users,
        })
    }
}

#[async_trait]
impl Inbox for MemoryBackend {
    async fn append(
        &self,
        users: &[String],
        msg: NewMessage<'_>,
    ) -> Result<Vec<(MessageId, bool)>> {
        let mut ids = Vec::with_capacity(users.len());
        for user in users {
            // Id assignment and delivery under one lock: connections see a
            // user's stored messages in id order.
            self.with_inbox(user, true, |inbox| {
                let inbox = inbox.expect("created");
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
                ids.push((id, online));
            });
        }
        Ok(ids)
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
