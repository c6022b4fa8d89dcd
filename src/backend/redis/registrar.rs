//! The registrar: the one task per node that owns the pub/sub connection
//! and this node's presence record (see "Fan-out" in [`super`]): one
//! `SUBSCRIBE` connection on a Redis server ([`Registrar::run`]), sharded
//! subscriptions over the cluster connection on a Redis Cluster
//! (`Registrar::run_cluster` in [`super::sharded`], which also proves
//! subscriptions live again after a slot moves or a shard fails over).
//!
//! With each lease renewal it also refreshes, a batch at a time, the expiry
//! of its users' reservation hashes ([`Registrar::sweep`]).
//!
//! Backends reach it through a [`Handle`]: each request names a user whose
//! subscription and presence the registrar makes match this node's
//! connections as they are when it acts, so concurrent connects and
//! disconnects of one user always converge.

use super::codec;
use super::keys;
use super::leases::Leases;
use super::scripts::Scripts;
use super::{Conn, Target};
use crate::backend::Local;
use crate::error::{Error, Result};
use futures_util::future::join_all;
use futures_util::StreamExt;
use redis::cluster_async::ClusterConnection;
use redis::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What the registrar is asked to do.
pub(super) enum Request {
    /// Make subscription and presence of `user` match this node's
    /// connections.
    Sync {
        user: String,
        ack: Option<oneshot::Sender<Result<()>>>,
    },
}

/// How the backend asks the registrar for work.
pub(super) struct Handle {
    tx: mpsc::UnboundedSender<Request>,
    departures: Arc<Departures>,
}

/// How long a user whose connection closed here is remembered for the
/// presence rewrites (see [`Departures`]): longer than a failover takes to
/// be noticed and than a failed release is retried.
const DEPARTURES_KEPT: Duration = Duration::from_secs(120);
/// At most this many departures are remembered (the oldest go first).
const DEPARTURES_AT_MOST: usize = 65_536;

/// Users whose connections on this node closed lately, noted by the
/// [`Handle`] and read by each presence rewrite
/// ([`Registrar::rewrite_presence`]), which sets this incarnation's
/// reservation of these users to what the node holds (deleting it when
/// none). A departure's release can be lost: a failover drops the newest
/// writes the dead primary had not replicated, and a release that kept
/// failing while Redis was away is given up (see `Node::release`). Without
/// this, the rewrite after either event restored only the users still
/// here, and a departed device counted online until its hash expired
/// (`--presence-ttl`). A std mutex: held for a push or a copy, never across
/// an `.await`.
#[derive(Default)]
pub(super) struct Departures(std::sync::Mutex<VecDeque<(Instant, String)>>);

impl Departures {
    fn note(&self, user: &str) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= DEPARTURES_AT_MOST {
            q.pop_front();
        }
        q.push_back((Instant::now(), user.to_string()));
    }

    /// The users who left within [`DEPARTURES_KEPT`]; older ones are
    /// forgotten.
    fn recent(&self) -> HashSet<String> {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while q
            .front()
            .is_some_and(|(t, _)| t.elapsed() > DEPARTURES_KEPT)
        {
            q.pop_front();
        }
        q.iter().map(|(_, u)| u.clone()).collect()
    }
}

impl Handle {
    /// Syncs `user` and waits until it is done: the user's events reach
    /// this node and presence counts the user here.
    pub(super) async fn sync(&self, user: &str) -> Result<()> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Request::Sync {
                user: user.to_string(),
                ack: Some(ack),
            })
            .map_err(|_| Error::Unavailable("registrar stopped".into()))?;
        match tokio::time::timeout(Duration::from_secs(5), done).await {
            Ok(Ok(r)) => r,
            _ => Err(Error::Unavailable(
                "Redis pub/sub did not confirm in time".into(),
            )),
        }
    }

    /// Syncs `user` soon, without waiting (a user leaving this node).
    pub(super) fn sync_later(&self, user: &str) {
        let _ = self.tx.send(Request::Sync {
            user: user.to_string(),
            ack: None,
        });
    }

    /// A connection of `user` closed here: syncs the user soon and
    /// remembers the departure for the next presence rewrites.
    pub(super) fn departed(&self, user: &str) {
        self.departures.note(user);
        self.sync_later(user);
    }
}

/// The task that owns this node's pub/sub connection and presence record.
pub(super) struct Registrar {
    pub(super) target: Target,
    pub(super) conn: Conn,
    pub(super) scripts: Arc<Scripts>,
    pub(super) leases: Arc<Leases>,
    /// This node's connections: where received events go, and what
    /// subscriptions and presence are made to match.
    pub(super) local: Local,
    pub(super) node_id: String,
    /// This incarnation of the node (see `keys::boots`).
    pub(super) boot: String,
    /// When this node started (unix ms), reported with each renewal.
    pub(super) started_ms: u64,
    pub(super) lease: Duration,
    /// `--presence-ttl`: the expiry of the reservation hashes of this
    /// node's users, refreshed by [`Registrar::sweep`].
    pub(super) presence_ttl: Duration,
    /// Shared with the [`Handle`], which notes them.
    pub(super) departures: Arc<Departures>,
}

/// Users whose channel this node is subscribed to right now.
pub(super) type Subscribed = HashSet<String>;

/// Where the refresh of reservation expiries stands (see
/// [`Registrar::sweep`]).
#[derive(Default)]
pub(super) struct Sweep {
    /// Users of this round not refreshed yet.
    todo: Vec<String>,
    /// Users refreshed per renewal tick in this round.
    per_tick: usize,
    /// When this round began.
    started: Option<std::time::Instant>,
}

impl Registrar {
    /// Starts the task. The receiver reports whether the first pub/sub
    /// connection and presence registration worked.
    pub(super) fn start(self) -> (Handle, oneshot::Receiver<Result<()>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let departures = self.departures.clone();
        match self.target.clone() {
            Target::Standalone(client) => tokio::spawn(self.run(client, rx, ready_tx)),
            Target::Cluster(seeds) => tokio::spawn(self.run_cluster(seeds, rx, ready_tx)),
        };
        let handle = Handle { tx, departures };
        (handle, ready_rx)
    }

    /// Standalone Redis: one pub/sub connection (`SUBSCRIBE`); when it
    /// drops, everything is restored and every local connection catches up.
    async fn run(
        self,
        client: redis::Client,
        mut rx: mpsc::UnboundedReceiver<Request>,
        ready: oneshot::Sender<Result<()>>,
    ) {
        let mut ready = Some(ready);
        let mut subscribed = Subscribed::new();
        let mut sweep = Sweep::default();
        let mut backoff = Duration::from_millis(100);
        let broadcast_channel = keys::broadcast_channel();
        let mut renew = tokio::time::interval(self.lease / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let connected = async {
                let pubsub =
                    tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
                        .await
                        .map_err(|_| Error::Unavailable("pub/sub connect timed out".into()))??;
                let (sink, stream) = pubsub.split();
                Ok::<_, Error>((sink, stream))
            }
            .await;
            let (mut sink, mut stream) = match connected {
                Ok(s) => s,
                Err(e) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Err(e));
                        return;
                    }
                    tracing::warn!(error = %e, "Redis pub/sub unavailable; retrying in {backoff:?}");
                    // Answer requests while down: attaches fail fast.
                    let sleep = tokio::time::sleep(backoff);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            req = rx.recv() => match req {
                                None => return,
                                Some(Request::Sync { ack, .. }) => {
                                    if let Some(a) = ack { let _ = a.send(Err(Error::Unavailable("Redis pub/sub is reconnecting".into()))); }
                                }
                            },
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            let restored = self
                .restore(&mut Sub::Single(&mut sink), &mut subscribed)
                .await;
            if let Err(e) = restored {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, "re-subscribing after reconnect failed; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
            backoff = Duration::from_millis(100);
            match ready.take() {
                Some(r) => {
                    let _ = r.send(Ok(()));
                }
                None => {
                    tracing::info!(
                        users = subscribed.len(),
                        "Redis pub/sub restored; connections catch up from their inboxes"
                    );
                    metrics::counter!("herald_redis_reconnects_total").increment(1);
                    self.local.sink.resync_all();
                }
            }
            // Serve until the pub/sub connection drops. Subscription
            // requests are taken in batches of up to 1,024 (one round trip).
            let mut batch = Vec::new();
            loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(m) => {
                            if let Some(e) = codec::decode(&broadcast_channel, m.get_channel_name(), m.get_payload_bytes()) {
                                self.local.sink.dispatch(e);
                            }
                        }
                        None => {
                            tracing::warn!("Redis pub/sub connection lost");
                            break;
                        }
                    },
                    n = rx.recv_many(&mut batch, 1024) => {
                        if n == 0 { return }
                        let batch = std::mem::take(&mut batch);
                        if let Err(e) = self.process(&mut Sub::Single(&mut sink), &mut subscribed, batch).await {
                            tracing::warn!(error = %e, "subscription sync failed");
                        }
                    }
                    _ = renew.tick() => {
                        if let Err(e) = self.renew().await {
                            tracing::warn!(error = %e, "node lease renewal failed");
                        }
                        self.sweep(&mut sweep).await;
                    }
                }
            }
        }
    }

    /// After (re)connecting: subscribe to broadcasts and every local user,
    /// then [`Registrar::rewrite_presence`].
    pub(super) async fn restore(
        &self,
        sub: &mut Sub<'_>,
        subscribed: &mut Subscribed,
    ) -> Result<()> {
        subscribed.clear();
        sub.subscribe(&[keys::broadcast_channel()]).await?;
        let users = self.local.view.users_snapshot();
        for chunk in users.chunks(1000) {
            let channels: Vec<String> = chunk.iter().map(|u| keys::user_channel(u)).collect();
            sub.subscribe(&channels).await?;
            subscribed.extend(chunk.iter().cloned());
        }
        self.rewrite_presence(&users).await
    }

    /// Rewrites this node's presence from its connections as they are: its
    /// per-node hash, each of `users`' reservation of this incarnation
    /// (Redis may have lost them in a restart or a failover, or a release
    /// may have failed while it was away) and that of the users who left
    /// lately ([`Departures`]: set to what is held, deleted when nothing
    /// is), then renews the lease.
    pub(super) async fn rewrite_presence(&self, users: &[String]) -> Result<()> {
        let counts = self.local.view.local_counts(users);
        let conns = keys::node_conns(&self.node_id);
        // This node's hash in one transaction (one key, so one slot).
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(&conns).ignore();
        for (chunk, counts) in users.chunks(1000).zip(counts.chunks(1000)) {
            let mut c = redis::cmd("HSET");
            c.arg(&conns);
            for (u, n) in chunk.iter().zip(counts) {
                c.arg(u).arg(*n);
            }
            pipe.add_command(c).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        // The reservations and their expiry: one command per key (each in
        // the user's slot).
        let me = self.incarnation();
        let ttl = self.presence_ttl_ms();
        if !users.is_empty() {
            let mut pipe = redis::pipe();
            for (u, n) in users.iter().zip(&counts) {
                let key = keys::user_conns(u);
                pipe.cmd("HSET").arg(&key).arg(&me).arg(*n).ignore();
                pipe.cmd("PEXPIRE").arg(&key).arg(ttl).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        let held: HashSet<&String> = users.iter().collect();
        let gone: Vec<String> = (self.departures.recent().into_iter())
            .filter(|u| !held.contains(u))
            .collect();
        if !gone.is_empty() {
            let counts = self.local.view.local_counts(&gone);
            let mut pipe = redis::pipe();
            for (u, n) in gone.iter().zip(&counts) {
                let key = keys::user_conns(u);
                if *n > 0 {
                    pipe.cmd("HSET").arg(&key).arg(&me).arg(*n).ignore();
                    pipe.cmd("PEXPIRE").arg(&key).arg(ttl).ignore();
                } else {
                    pipe.cmd("HDEL").arg(&key).arg(&me).ignore();
                }
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        self.renew().await
    }

    /// `<node>|<boot>`: the field of this node's reservations.
    pub(super) fn incarnation(&self) -> String {
        keys::incarnation(&self.node_id, &self.boot)
    }

    fn presence_ttl_ms(&self) -> u64 {
        self.presence_ttl.as_millis() as u64
    }

    /// One step of the slow refresh of this node's users' reservation
    /// hashes, run after each lease renewal (every lease/3): a `PEXPIRE`
    /// of `--presence-ttl` for a batch of the users this node held when
    /// the current round began, pipelined, one key per command (each in
    /// the user's slot). A round starts at most once per quarter of the
    /// TTL, on the first tick after it, with a batch size that ends it
    /// within a quarter, so a user held all along is refreshed at most a
    /// half TTL and a tick after the last time (a user's reservation set
    /// the expiry when it connected), whatever the number of users: with
    /// the TTL at least 4 leases (12 ticks), a live node's users keep
    /// their hashes, while a crashed node's hashes of users who never come
    /// back expire. A failed batch is logged and skipped: the next round
    /// covers its users again, and a reconnect to Redis rewrites every
    /// reservation and its expiry ([`Registrar::restore`]).
    pub(super) async fn sweep(&self, sweep: &mut Sweep) {
        let quarter = self.presence_ttl / 4;
        if sweep.todo.is_empty() {
            if sweep.started.is_some_and(|t| t.elapsed() < quarter) {
                return;
            }
            sweep.todo = self.local.view.users_snapshot();
            sweep.started = Some(std::time::Instant::now());
            // Renewal ticks in a quarter of the TTL (at least 3, as the TTL
            // is at least 4 leases; a tick is lease/3).
            let ticks = (quarter.as_millis() / (self.lease / 3).as_millis().max(1)).max(1);
            sweep.per_tick = (sweep.todo.len() as u128).div_ceil(ticks) as usize;
        }
        let n = sweep.per_tick.clamp(1, sweep.todo.len().max(1));
        let batch = sweep.todo.split_off(sweep.todo.len().saturating_sub(n));
        if batch.is_empty() {
            return;
        }
        let ttl = self.presence_ttl_ms();
        let mut pipe = redis::pipe();
        for u in &batch {
            pipe.cmd("PEXPIRE")
                .arg(keys::user_conns(u))
                .arg(ttl)
                .ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut self.conn.clone()).await {
            tracing::warn!(error = %e, users = batch.len(), "refreshing reservation expiries failed");
        }
    }

    /// Renews this node's lease and stats, and refreshes the lease cache
    /// ([`Leases`]) from what Redis answers. Every command touches one key
    /// (so one slot on a cluster). The boot id is written first, so no
    /// reader sees this incarnation's lease with the previous boot.
    pub(super) async fn renew(&self) -> Result<()> {
        let lease_ms = self.lease.as_millis() as u64;
        let (delivered, events) = self.local.view.counters();
        let stats = keys::node_stats(&self.node_id);
        let mut conn = self.conn.clone();
        redis::pipe()
            .cmd("HSET")
            .arg(keys::boots())
            .arg(&self.node_id)
            .arg(&self.boot)
            .ignore()
            .cmd("PEXPIRE")
            .arg(keys::node_conns(&self.node_id))
            .arg(lease_ms * 3)
            .ignore()
            .cmd("HSET")
            .arg(&stats)
            .arg("started")
            .arg(self.started_ms)
            .arg("delivered")
            .arg(delivered)
            .arg("events")
            .arg(events)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&stats)
            .arg(lease_ms * 3)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        let lease = lease_ms.to_string();
        let asked = std::time::Instant::now();
        let mut pipe = redis::pipe();
        pipe.add_command(self.scripts.renew.cmd(
            &[&keys::nodes()],
            &[self.node_id.as_bytes(), lease.as_bytes()],
        ));
        pipe.cmd("HGETALL").arg(keys::boots());
        let mut v = self.scripts.eval(&mut conn, &pipe).await?.into_iter();
        let nodes = v.next().unwrap_or(Value::Nil);
        let boots: HashMap<String, String> = super::scripts::parse(v.next().unwrap_or(Value::Nil))?;
        self.leases.store(asked, nodes, boots)
    }

    /// Makes subscriptions and presence of the batch's users match this node
    /// as it is now, then acknowledges.
    pub(super) async fn process(
        &self,
        sink: &mut Sub<'_>,
        subscribed: &mut Subscribed,
        batch: Vec<Request>,
    ) -> Result<()> {
        let mut users: Vec<String> = Vec::with_capacity(batch.len());
        let mut acks = Vec::new();
        let mut seen = HashSet::new();
        for Request::Sync { user, ack } in batch {
            if seen.insert(user.clone()) {
                users.push(user);
            }
            acks.extend(ack);
        }
        let counts = self.local.view.local_counts(&users);
        let (mut sub, mut unsub) = (vec![], vec![]);
        for (u, n) in users.iter().zip(&counts) {
            match (*n > 0, subscribed.contains(u)) {
                (true, false) => sub.push(u.clone()),
                (false, true) => unsub.push(u.clone()),
                _ => {}
            }
        }
        let result = async {
            if !sub.is_empty() {
                sink.subscribe(
                    &sub.iter()
                        .map(|u| keys::user_channel(u))
                        .collect::<Vec<_>>(),
                )
                .await?;
                subscribed.extend(sub);
            }
            if !unsub.is_empty() {
                sink.unsubscribe(
                    &unsub
                        .iter()
                        .map(|u| keys::user_channel(u))
                        .collect::<Vec<_>>(),
                )
                .await?;
                for u in &unsub {
                    subscribed.remove(u);
                }
            }
            let conns = keys::node_conns(&self.node_id);
            let mut pipe = redis::pipe();
            for (u, n) in users.iter().zip(&counts) {
                if *n > 0 {
                    pipe.cmd("HSET").arg(&conns).arg(u).arg(*n).ignore();
                } else {
                    pipe.cmd("HDEL").arg(&conns).arg(u).ignore();
                }
            }
            let mut conn = self.conn.clone();
            pipe.query_async::<()>(&mut conn).await?;
            Ok::<(), Error>(())
        }
        .await;
        for a in acks {
            let _ = a.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(Error::Unavailable(e.to_string())),
            });
        }
        result
    }
}

/// The subscribing side of pub/sub, as [`Registrar::process`] and
/// [`Registrar::restore`] use it: one server's pub/sub connection
/// (`SUBSCRIBE`), or the cluster connection of sharded pub/sub
/// (`SSUBSCRIBE`, one command per channel: each goes to the primary that
/// owns the channel's slot; a multi-channel `SSUBSCRIBE` must stay in one
/// slot).
pub(super) enum Sub<'a> {
    Single(&'a mut redis::aio::PubSubSink),
    Cluster(&'a mut ClusterConnection),
}

impl Sub<'_> {
    async fn subscribe(&mut self, channels: &[String]) -> Result<()> {
        match self {
            Sub::Single(sink) => Ok(sink.subscribe(channels).await?),
            Sub::Cluster(conn) => sharded(conn, channels, true).await,
        }
    }

    async fn unsubscribe(&mut self, channels: &[String]) -> Result<()> {
        match self {
            Sub::Single(sink) => Ok(sink.unsubscribe(channels).await?),
            Sub::Cluster(conn) => sharded(conn, channels, false).await,
        }
    }
}

/// `SSUBSCRIBE` (or `SUNSUBSCRIBE`) each channel, concurrently; resolves
/// when every primary confirmed, or with the first error.
pub(super) async fn sharded(conn: &ClusterConnection, channels: &[String], on: bool) -> Result<()> {
    for chunk in channels.chunks(256) {
        let results = join_all(chunk.iter().map(|ch| {
            let mut conn = conn.clone();
            async move {
                if on {
                    conn.ssubscribe(ch).await
                } else {
                    conn.sunsubscribe(ch).await
                }
            }
        }))
        .await;
        for r in results {
            r?;
        }
    }
    Ok(())
}
