//! The embedded backend: broker, presence and inbox in this process's
//! memory. Single node only: nothing is shared with other nodes and
//! everything is lost when the process exits. It is the default so that a
//! fresh machine runs Herald with one command; run a cluster with Redis.

mod idempotency;
mod inbox;
mod store;

use super::reused;
use super::{Appended, Backend, Broker, Cluster, Event, Local, NewMessage, NodeInfo, Presence};
use crate::config::InboxConfig;
use crate::error::{Error, Result};
use crate::protocol::{self, Frame, MessageId};
use async_trait::async_trait;
use idempotency::{record_key, Record};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use store::{Body, Recipient, Store, Stored, UserInbox};

const SHARDS: usize = 64;

/// How often expired idempotency records and stored messages are swept and
/// empty inboxes freed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How much stored messages must shrink before freed memory is handed
/// back to the system.
const GIVE_BACK_BYTES: usize = 16 << 20;

/// At most one warning per this long while the memory limit drops messages.
const WARN_EVERY_MS: u64 = 10_000;

type Shard = HashMap<Arc<str>, UserInbox>;

pub(crate) struct MemoryBackend {
    /// This node's connections: where events go.
    local: Local,
    node_id: String,
    cfg: InboxConfig,
    hasher: RandomState,
    /// Synchronous (parking_lot) mutexes, never held across an `.await`:
    /// every critical section is a few map/deque operations and
    /// non-blocking queue pushes ([`super::EventSink`] never blocks). No method
    /// here awaits while a shard is locked; keep it so.
    inboxes: Box<[Mutex<Shard>]>,
    /// Stored bodies and their bytes, for `--inbox-memory-limit`.
    store: Arc<Store>,
    /// Inboxes held.
    inbox_count: AtomicUsize,
    /// The newest `last.ms` of any inbox freed so far. An inbox created
    /// later starts after it, so a user's ids keep increasing across a
    /// free and a re-creation even if the clock stepped back meanwhile
    /// (ids only compare within one user, so one mark for all users does).
    freed_up_to: AtomicU64,
    /// The most stored bytes a sweep has seen since memory was last handed
    /// back to the system.
    peak_bytes: AtomicUsize,
    /// When the memory limit last logged a warning (unix ms).
    warned_at: AtomicU64,
    /// Idempotency records, sharded by record key; swept every
    /// [`SWEEP_EVERY`]. Lock order: an inbox shard, then a record shard.
    records: Box<[Mutex<HashMap<String, Record>>]>,
    /// Records held (for `--idempotency-max-records`).
    record_count: AtomicUsize,
    /// Connection reservations per user (the per-user cap's count).
    reservations: Mutex<HashMap<String, u32>>,
}

impl MemoryBackend {
    pub(crate) fn new(local: Local, node_id: &str, cfg: InboxConfig) -> Arc<Self> {
        Arc::new(MemoryBackend {
            local,
            node_id: node_id.to_string(),
            cfg,
            hasher: RandomState::new(),
            inboxes: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            store: Arc::new(Store {
                bytes: AtomicUsize::new(0),
                by_age: Mutex::new(BTreeMap::new()),
                next_seq: AtomicU64::new(0),
            }),
            inbox_count: AtomicUsize::new(0),
            freed_up_to: AtomicU64::new(0),
            peak_bytes: AtomicUsize::new(0),
            warned_at: AtomicU64::new(0),
            records: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            record_count: AtomicUsize::new(0),
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

    /// Frees expired idempotency records and stored messages, and the
    /// inboxes nothing is left in, one shard lock at a time.
    ///
    /// An inbox is freed when it holds no message (so nothing is unread and
    /// its cursor means nothing) and its user has no connection here: such
    /// an inbox is only its marks, and a new one behaves the same except
    /// that a resume from before it reads `resumed:false` (see
    /// [`UserInbox::new`]). A connected user's inbox stays, so their other
    /// devices' resumes are answered exactly; there are at most as many as
    /// connections.
    fn sweep(&self, now: u64) {
        for shard in self.records.iter() {
            let mut shard = shard.lock();
            let before = shard.len();
            shard.retain(|_, r| r.expires > now);
            self.record_count
                .fetch_sub(before - shard.len(), Ordering::Relaxed);
            let len = shard.len();
            if shard.capacity() > 64 && shard.capacity() > 4 * len {
                shard.shrink_to(2 * len);
            }
        }
        for shard in self.inboxes.iter() {
            let mut shard = shard.lock();
            shard.retain(|user, inbox| {
                inbox.trim(&self.cfg, now);
                if !inbox.messages.is_empty() || self.local.view.has_user(user) {
                    let m = &mut inbox.messages;
                    if m.capacity() > 64 && m.capacity() > 4 * m.len() {
                        m.shrink_to(2 * m.len());
                    }
                    return true;
                }
                self.forget_inbox(user, inbox);
                false
            });
            let len = shard.len();
            if shard.capacity() > 64 && shard.capacity() > 4 * len {
                shard.shrink_to(2 * len);
            }
        }
        self.report();
        self.give_back_memory();
    }

    /// Takes a freed inbox off the counts; called while its shard is still
    /// locked (a re-creation must see `freed_up_to`).
    fn forget_inbox(&self, user: &str, inbox: &UserInbox) -> usize {
        self.freed_up_to.fetch_max(inbox.last.ms, Ordering::Relaxed);
        self.inbox_count.fetch_sub(1, Ordering::Relaxed);
        let cost = store::inbox_cost(user);
        self.store.bytes.fetch_sub(cost, Ordering::Relaxed);
        cost
    }

    /// Once stored messages have shrunk by [`GIVE_BACK_BYTES`] since the
    /// last time, asks the allocator to return its free pages to the system
    /// (glibc keeps them otherwise, and the node's RSS would stay at its
    /// peak long after the messages are gone).
    fn give_back_memory(&self) {
        let now = self.store.bytes.load(Ordering::Relaxed);
        let peak = self.peak_bytes.fetch_max(now, Ordering::Relaxed).max(now);
        if peak - now >= GIVE_BACK_BYTES {
            self.peak_bytes.store(now, Ordering::Relaxed);
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases free memory of the allocator.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Sets the gauges of what is stored.
    fn report(&self) {
        metrics::gauge!("herald_inboxes").set(self.inbox_count.load(Ordering::Relaxed) as f64);
        metrics::gauge!("herald_idempotency_records")
            .set(self.record_count.load(Ordering::Relaxed) as f64);
        metrics::gauge!("herald_inbox_memory_bytes")
            .set(self.store.bytes.load(Ordering::Relaxed) as f64);
    }

    /// Drops the oldest stored messages node-wide, a whole send at a time,
    /// until what is stored fits `--inbox-memory-limit`. Each inbox a
    /// message leaves raises its floor: a resume from before it reads
    /// `resumed:false`.
    fn enforce_limit(&self) {
        let limit = self.cfg.memory_limit;
        // Counted down by what each dropped body weighs, not re-read: a body
        // a replay still holds is freed a moment later, and must not make
        // this drop more.
        let mut over = self
            .store
            .bytes
            .load(Ordering::Relaxed)
            .saturating_sub(limit);
        let mut dropped = 0u64;
        while over > 0 {
            let Some(body) = self.store.pop_oldest() else {
                break;
            };
            over = over.saturating_sub(body.cost().expect("indexed bodies are counted"));
            for (user, id) in body.recipients.get().into_iter().flatten() {
                let mut shard = self.shard(user).lock();
                let Some(inbox) = shard.get_mut(user) else {
                    continue;
                };
                dropped += inbox.drop_message(*id, &body) as u64;
                // An inbox left with nothing (and no connection here) goes
                // too, as the sweep would free it: the budget counts it.
                if inbox.messages.is_empty() && !self.local.view.has_user(user) {
                    if let Some((user, inbox)) = shard.remove_entry(user.as_ref()) {
                        over = over.saturating_sub(self.forget_inbox(&user, &inbox));
                    }
                }
            }
            // The last reference to `body` drops here, with no lock held,
            // and takes its bytes off the count.
        }
        if dropped == 0 {
            return;
        }
        metrics::counter!("herald_inbox_dropped_total", "reason" => "memory").increment(dropped);
        let now = protocol::now_ms();
        let warned = self.warned_at.load(Ordering::Relaxed);
        if now >= warned + WARN_EVERY_MS
            && self
                .warned_at
                .compare_exchange(warned, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped,
                limit,
                "stored messages exceed --inbox-memory-limit: the oldest were dropped \
                 (clients resuming from before them get resumed:false; see \
                 herald_inbox_dropped_total{{reason=\"memory\"}}); raise the limit or lower \
                 --inbox-max-age / --inbox-max-messages"
            );
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

    fn shard(&self, user: &str) -> &Mutex<Shard> {
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
            let user: Arc<str> = Arc::from(user);
            let mark = now.max(self.freed_up_to.load(Ordering::Relaxed) + 1);
            self.store
                .bytes
                .fetch_add(store::inbox_cost(&user), Ordering::Relaxed);
            shard.insert(user.clone(), UserInbox::new(user, mark));
            self.inbox_count.fetch_add(1, Ordering::Relaxed);
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

    /// Stores `body` for `user` (unless the key's record says it already
    /// was) and pushes it to the user's connections here.
    fn append_one(
        &self,
        user: &str,
        msg: &NewMessage<'_>,
        body: &Arc<Body>,
    ) -> Result<(Appended, Option<Recipient>)> {
        // Id assignment, delivery and the idempotency record under one
        // inbox lock: connections see a user's stored messages in id
        // order, and a key stores at most once per user.
        self.with_inbox(user, true, |inbox| {
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
                        let done = Appended {
                            id,
                            online,
                            replayed: true,
                        };
                        return Ok((done, None));
                    }
                    Some((false, _, _)) => return Err(reused(user)),
                    None => {}
                }
            }
            let id = inbox.last.next(msg.ts);
            inbox.last = id;
            inbox.messages.push_back(Stored {
                id,
                body: body.clone(),
            });
            inbox.trim(&self.cfg, msg.ts);
            // Only a connected user's frame is built, and it is freed once
            // sent. One who connects after this check reads the message in
            // the replay, which waits for this lock.
            let online = self.local.view.has_user(user);
            if online {
                self.local.sink.dispatch(Event::Message {
                    user: inbox.user.clone(),
                    id: Some(id),
                    frame: body.frame(id),
                });
            }
            if let Some((k, rkey)) = record {
                self.insert_record(
                    rkey,
                    Record {
                        id: id.to_string(),
                        online,
                        fingerprint: k.fingerprint.into(),
                        expires: msg.ts + k.window.as_millis() as u64,
                    },
                );
            }
            let done = Appended {
                id,
                online,
                replayed: false,
            };
            Ok((done, Some((inbox.user.clone(), id))))
        })
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
                    | Event::State { user, .. }
                    | Event::Disconnect { user, .. } => self.local.view.has_user(user),
                    Event::Broadcast { .. } => self.local.view.connections() > 0,
                };
                self.local.sink.dispatch(e);
                online
            })
            .collect())
    }
    async fn broadcast(&self, frame: Frame) -> Result<()> {
        self.local.sink.dispatch(Event::Broadcast { frame });
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
        Ok(self.local.view.local_counts(users))
    }
    async fn cluster(&self) -> Result<Cluster> {
        let users = self.local.view.users();
        Ok(Cluster {
            nodes: vec![NodeInfo {
                node_id: self.node_id.clone(),
                connections: self.local.view.connections(),
                users,
                // This node's own entry is filled in by the node itself.
                ..Default::default()
            }],
            online_users: users,
        })
    }
}
