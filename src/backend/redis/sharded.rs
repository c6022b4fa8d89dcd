//! The registrar on a Redis Cluster: sharded pub/sub over the crate's
//! cluster connection (RESP3; every push arrives on one channel, in each
//! shard's order), and the proof that each subscription this node needs is
//! live on the primary that owns its slot now.
//!
//! # Why a confirmation is not proof
//!
//! A channel's subscription can lapse without this node asking: a
//! resharding moves its slot (the old owner pushes `sunsubscribe`), or its
//! primary dies (the connection reports a disconnection; the replica that
//! takes over knows nothing of the subscriptions). Worse, an `SSUBSCRIBE`
//! sent while a shard fails over can be confirmed by a node that does not
//! deliver the shard's messages once the failover is over (a replica
//! accepts sharded subscriptions for its primary's slots, and the client
//! may route there while the primary is unreachable), and nothing tells
//! the subscriber. Trusting that confirmation left open devices deaf after
//! a failover (issue 20, item 0).
//!
//! So after any event that can move a subscription — a dropped shard
//! connection, an unasked `sunsubscribe`, or a change in the slot map
//! (read every [`TOPOLOGY_EVERY`] over a plain connection to one cluster
//! node, see [`Topology`]) — every user channel of this node is
//! *unproven*. The node subscribes it again (idempotent where it is still
//! live) and publishes a probe on it ([`codec::probe`], ignored by every
//! other node). Only the probe coming back proves that the primary now
//! accepting the channel's publishes delivers them here. Then, and only
//! then, the user's connections catch up from the inbox: the catch-up reads
//! what was published while nobody listened, live messages at or below it
//! are dropped by id, so every stored message arrives once and in order.
//! Unproven channels are subscribed and probed again every
//! [`PROBE_AGAIN`] until they are proven. The same events rewrite this
//! node's presence (a failover can lose the newest writes of the dead
//! primary) until a rewrite succeeds.
//!
//! The `redis` crate refreshes its slot map only on a `MOVED` reply; after a
//! failover its requests for the dead primary's slots could time out
//! against the old address for as long as the process lived. So a changed
//! slot map also replaces both connections (commands, through
//! [`super::Swappable`], and this loop's pub/sub), at the change and in
//! each of the next [`AGAIN_AFTER_A_CHANGE`] checks; so do requests that
//! time out or lose their connection while the slot map reads fine (a
//! fresh connection may have read its map from a node that had not heard
//! of the change; at most every [`REPLACE_AT_MOST_EVERY`]), and the command
//! connection when it stops answering for [`WEDGED_AFTER`] checks in a row.
//!
//! Broadcasts carry the frame itself (no room for a probe), and are not
//! stored: the broadcast channel is subscribed again after the same events.

use super::codec;
use super::keys;
use super::registrar::{sharded, Registrar, Request, Sub, Subscribed, Sweep};
use super::topology::{newly_serving, with_host, SlotMap, Topology};
use super::Target;
use crate::error::Error;
use futures_util::future::join_all;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{PushInfo, PushKind, Value};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How often unproven channels are looked at.
const REPAIR_EVERY: Duration = Duration::from_millis(200);
/// How long a probe may take to come back before the channel is subscribed
/// and probed again.
const PROBE_AGAIN: Duration = Duration::from_secs(1);
/// How often the slot map is read to notice a failover or a slot move.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);
/// The longest any one step of the loop (a renewal, a subscription sync)
/// may hold it up.
const STEP_AT_MOST: Duration = Duration::from_millis(1500);
/// Channels subscribed and probed per repair tick.
const REPAIR_BATCH: usize = 4096;

/// What this node has yet to prove after a topology event.
#[derive(Default)]
struct Unproven {
    /// User channel -> when its last probe left (`None`: not yet).
    channels: HashMap<String, Option<Instant>>,
    /// The broadcast channel must be subscribed again.
    broadcast: bool,
    /// This node's presence must be rewritten.
    presence: bool,
    /// Numbers this node's probes (diagnostics only: any of its own probes
    /// proves the channel it came back on).
    nonce: u64,
}

impl Unproven {
    /// After an event that may have moved any subscription.
    fn everything(&mut self, subscribed: &Subscribed) {
        for u in subscribed {
            self.channels.insert(keys::user_channel(u), None);
        }
        self.broadcast = true;
        self.presence = true;
        metrics::gauge!("herald_redis_unproven_subscriptions").set(self.channels.len() as f64);
    }

    fn pending(&self) -> bool {
        self.broadcast || self.presence || !self.channels.is_empty()
    }
}

/// The registrar's loop state on a Redis Cluster: the pub/sub connection
/// and what this node must still prove (see the module doc). Owned by the
/// loop's task; nothing else touches it.
struct Shards {
    seeds: Vec<String>,
    /// The pub/sub connection and the pushes it delivers (replaced with a
    /// new pair when its topology may be stale).
    conn: ClusterConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    subscribed: Subscribed,
    broadcast_channel: String,
    /// This node's incarnation: the probes it recognises as its own.
    me: String,
    unproven: Unproven,
    topology: Topology,
    /// The slot map at the last successful read.
    slots: Option<SlotMap>,
    /// A subscribe or probe of this loop's connection timed out or lost
    /// its connection since the last topology check.
    pubsub_trouble: bool,
    /// Topology checks left in which the connections are replaced again
    /// after a slot-map change: a fresh connection reads its map from one
    /// node, which may not have heard of the change yet.
    again: u32,
    health: Health,
    sweep: Sweep,
    /// A primary that took slots over in the last slot-map change, as a
    /// seed URL: new connections read their first slot map from it (see
    /// [`Registrar::on_topology`]).
    newest: Option<String>,
}

impl Shards {
    /// The seeds a new connection starts from: the primary that knows the
    /// newest slot map alone, when there is one, then every seed.
    fn seeds_for_new(&self) -> Vec<Vec<String>> {
        let mut tries = Vec::with_capacity(2);
        if let Some(n) = &self.newest {
            tries.push(vec![n.clone()]);
        }
        tries.push(self.seeds.clone());
        tries
    }
}

impl Registrar {
    /// Redis Cluster: the registrar's loop (see the module doc). Each
    /// event is one method; none may hold the loop for long (each Redis
    /// step is bounded), since the topology checks are what replace a
    /// stuck connection.
    pub(super) async fn run_cluster(
        self,
        seeds: Vec<String>,
        mut rx: mpsc::UnboundedReceiver<Request>,
        ready: oneshot::Sender<crate::error::Result<()>>,
    ) {
        let (conn, pushes) = match pubsub_connection(&seeds).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let mut st = Shards {
            conn,
            pushes,
            subscribed: Subscribed::new(),
            broadcast_channel: keys::broadcast_channel(),
            me: self.incarnation(),
            unproven: Unproven::default(),
            slots: None,
            pubsub_trouble: false,
            again: 0,
            health: Health::default(),
            sweep: Sweep::default(),
            topology: Topology::new(&seeds),
            newest: None,
            seeds,
        };
        let restored = self
            .restore(&mut Sub::Cluster(&mut st.conn), &mut st.subscribed)
            .await;
        let _ = ready.send(restored);
        st.slots = st.topology.read().await.ok();
        let mut renew = tokio::time::interval(self.lease / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await; // restore renewed just now
        let mut repair = tokio::time::interval(REPAIR_EVERY);
        repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut topology_tick = tokio::time::interval(TOPOLOGY_EVERY);
        topology_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                push = st.pushes.recv() => {
                    let Some(push) = push else { return };
                    self.on_push(push, &st.broadcast_channel, &st.me, &st.subscribed, &mut st.unproven);
                }
                n = rx.recv_many(&mut batch, 1024) => {
                    if n == 0 { return }
                    self.on_requests(&mut st, std::mem::take(&mut batch)).await;
                }
                _ = renew.tick() => self.on_renew(&mut st.sweep).await,
                _ = topology_tick.tick() => self.on_topology(&mut st).await,
                _ = repair.tick(), if st.unproven.pending() => {
                    st.pubsub_trouble |= !self
                        .prove(&st.conn, &st.subscribed, &st.broadcast_channel, &st.me, &mut st.unproven)
                        .await;
                }
            }
        }
    }

    /// Subscription requests (a batch of up to 1,024, one round trip).
    async fn on_requests(&self, st: &mut Shards, batch: Vec<Request>) {
        let before = st.subscribed.clone();
        let synced = tokio::time::timeout(
            STEP_AT_MOST,
            self.process(&mut Sub::Cluster(&mut st.conn), &mut st.subscribed, batch),
        )
        .await;
        match synced {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "subscription sync failed"),
            Err(_) => {
                st.pubsub_trouble = true;
                tracing::warn!("subscription sync timed out");
            }
        }
        // While a topology event is being worked off, a new subscription's
        // confirmation is no proof either.
        if st.unproven.pending() {
            for u in st.subscribed.difference(&before) {
                st.unproven.channels.insert(keys::user_channel(u), None);
            }
        }
    }

    /// The lease renewal and a step of the reservation sweep. Bounded: a
    /// connection stuck on an old slot map must not hold up the loop, whose
    /// topology checks replace it (a lapsed renewal is retried at the next
    /// tick).
    async fn on_renew(&self, sweep: &mut Sweep) {
        match tokio::time::timeout(STEP_AT_MOST, self.renew()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "node lease renewal failed"),
            Err(_) => tracing::warn!("node lease renewal timed out"),
        }
        let _ = tokio::time::timeout(STEP_AT_MOST, self.sweep(sweep)).await;
    }

    /// Reads the slot map and replaces the connections that may be stale
    /// (see `Swappable`): when the slot map changed (and again in the next
    /// [`AGAIN_AFTER_A_CHANGE`] checks); when, the map being readable,
    /// requests met timeouts or lost connections (a fresh connection may
    /// have read its map from a node that had not heard of the change
    /// yet), at most every [`REPLACE_AT_MOST_EVERY`]; and the command
    /// connection when it stops answering altogether.
    ///
    /// A new connection of the `redis` crate reads its slot map from
    /// whichever node it asks first; right after a failover most nodes may
    /// not have heard of the promotion yet (gossip takes a while on a busy
    /// machine), and a connection built on their map sends the shard's
    /// requests to the dead primary until it happens to ask a node that
    /// knows. So new connections start from the promoted primary alone:
    /// it knows it serves those slots, and what serves the others did not
    /// change.
    async fn on_topology(&self, st: &mut Shards) {
        let commands_ok = self.commands_answer().await;
        let read = st.topology.read().await;
        let read_ok = read.is_ok();
        let changed = matches!((&st.slots, &read), (Some(before), Ok(now)) if before != now);
        let renew_conns = changed || st.again > 0;
        st.again = if changed {
            AGAIN_AFTER_A_CHANGE
        } else {
            st.again.saturating_sub(1)
        };
        if let (true, Some(before), Ok(now)) = (changed, &st.slots, &read) {
            // The ranges that changed hands, as "first-last host port id".
            let moved: Vec<String> = now
                .iter()
                .filter(|r| !before.contains(r))
                .take(8)
                .map(|(a, b, who)| format!("{a}-{b} {who}"))
                .collect();
            tracing::info!(
                moved = moved.join(", "),
                "the Redis Cluster slot map changed; new connections, every subscription proven again"
            );
            metrics::counter!("herald_redis_resubscribes_total", "why" => "topology").increment(1);
        }
        match read {
            Ok(now) => {
                if let Some((host, port)) = st.slots.as_ref().and_then(|b| newly_serving(b, &now)) {
                    st.newest = Some(with_host(&st.seeds[0], &host, port));
                }
                st.slots = Some(now);
            }
            Err(ref e) => tracing::debug!(error = %e, "reading the slot map failed"),
        }
        let commands_troubled = read_ok && self.commands_troubled();
        if !commands_ok || commands_troubled {
            // Requests fail while the map reads unchanged: the node asked
            // may be one that has not heard of a failover yet (gossip is
            // slow on a busy machine); ask another next time.
            st.topology.rotate();
        }
        if renew_conns
            || st.health.commands.failed(commands_ok)
            || (commands_troubled && st.health.commands.may_replace())
        {
            self.replace_commands(&st.seeds_for_new()).await;
            st.health.commands.replaced();
        }
        let pubsub_troubled = read_ok && std::mem::take(&mut st.pubsub_trouble);
        if renew_conns || (pubsub_troubled && st.health.pubsub.may_replace()) {
            let mut made = Err(Error::Unavailable("no seeds".into()));
            for seeds in st.seeds_for_new() {
                made = pubsub_connection(&seeds).await;
                if made.is_ok() {
                    break;
                }
            }
            match made {
                Ok((c, p)) => {
                    (st.conn, st.pushes) = (c, p);
                    st.health.pubsub.replaced();
                    metrics::counter!("herald_redis_connections_replaced_total", "conn" => "pubsub")
                        .increment(1);
                    st.unproven.everything(&st.subscribed);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "a new Redis Cluster pub/sub connection failed; retrying")
                }
            }
        }
    }

    /// Whether a command met a timeout or a lost connection since the last
    /// look.
    fn commands_troubled(&self) -> bool {
        match &self.conn {
            super::Conn::Cluster(c) => c.take_trouble(),
            super::Conn::Single(_) => false,
        }
    }

    /// Whether the command connection answers a `PING` within a second.
    async fn commands_answer(&self) -> bool {
        let super::Conn::Cluster(c) = &self.conn else {
            return true;
        };
        let mut current = c.current();
        let ping = current.route_command(
            redis::cmd("PING"),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        );
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(_))
        )
    }

    /// Puts a new command connection in place of a wedged one (kept if no
    /// new one can be made now: the next check tries again).
    /// `tries`: seed lists tried in turn (see [`Shards::seeds_for_new`]).
    async fn replace_commands(&self, tries: &[Vec<String>]) {
        let super::Conn::Cluster(c) = &self.conn else {
            return;
        };
        let mut made = None;
        for seeds in tries {
            let fresh = Target::cluster_connection(seeds);
            if let Ok(Ok(fresh)) = tokio::time::timeout(Duration::from_secs(5), fresh).await {
                made = Some(fresh);
                break;
            }
        }
        match made {
            Some(fresh) => {
                c.replace(fresh);
                tracing::info!(
                    "the Redis Cluster command connection was replaced (slot map changed, or it stopped answering)"
                );
                metrics::counter!("herald_redis_connections_replaced_total", "conn" => "commands")
                    .increment(1);
            }
            None => tracing::debug!("a new Redis Cluster command connection failed; retrying"),
        }
    }

    /// One repair step: the broadcast subscription, presence, then a batch
    /// of due channels subscribed and probed. False when a subscribe or a
    /// probe timed out or failed (the connection may be stuck on an old
    /// slot map).
    async fn prove(
        &self,
        conn: &ClusterConnection,
        subscribed: &Subscribed,
        broadcast_channel: &str,
        me: &str,
        unproven: &mut Unproven,
    ) -> bool {
        let mut smooth = true;
        // Users who left meanwhile need no subscription.
        unproven.channels.retain(|ch, _| {
            keys::channel_user(ch).is_some_and(|u| subscribed.contains(u.as_ref()))
        });
        if unproven.broadcast {
            let channel = [broadcast_channel.to_string()];
            match tokio::time::timeout(Duration::from_secs(1), sharded(conn, &channel, true)).await
            {
                Ok(Ok(())) => unproven.broadcast = false,
                Ok(Err(e)) => {
                    smooth = false;
                    tracing::debug!(error = %e, "re-subscribing broadcasts failed")
                }
                Err(_) => {
                    smooth = false;
                    tracing::debug!("re-subscribing broadcasts timed out")
                }
            }
        }
        if unproven.presence {
            let users: Vec<String> = subscribed.iter().cloned().collect();
            match tokio::time::timeout(Duration::from_secs(1), self.rewrite_presence(&users)).await
            {
                Ok(Ok(())) => unproven.presence = false,
                Ok(Err(e)) => tracing::debug!(error = %e, "rewriting presence failed; retrying"),
                Err(_) => tracing::debug!("rewriting presence timed out; retrying"),
            }
        }
        let now = Instant::now();
        let due: Vec<String> = unproven
            .channels
            .iter()
            .filter(|(_, sent)| sent.is_none_or(|t| now.duration_since(t) >= PROBE_AGAIN))
            .take(REPAIR_BATCH)
            .map(|(ch, _)| ch.clone())
            .collect();
        metrics::gauge!("herald_redis_unproven_subscriptions").set(unproven.channels.len() as f64);
        if due.is_empty() {
            return smooth;
        }
        for ch in &due {
            unproven.channels.insert(ch.clone(), Some(now));
        }
        // Subscribe (a no-op where the subscription is live), then probe:
        // the probe goes to the channel's primary, which delivers it here
        // only through a live subscription.
        if let Ok(Err(e)) | Err(e) =
            tokio::time::timeout(Duration::from_secs(1), sharded(conn, &due, true))
                .await
                .map_err(|_| Error::Unavailable("timed out".into()))
        {
            smooth = false;
            tracing::debug!(error = %e, channels = due.len(), "re-subscribing unproven channels failed; retrying");
        }
        unproven.nonce += 1;
        let probe = codec::probe(me, unproven.nonce);
        for chunk in due.chunks(256) {
            let sent = join_all(chunk.iter().map(|ch| {
                let mut conn = conn.clone();
                let mut cmd = redis::cmd("SPUBLISH");
                cmd.arg(ch).arg(&probe);
                async move { cmd.query_async::<Value>(&mut conn).await }
            }));
            match tokio::time::timeout(Duration::from_secs(1), sent).await {
                Ok(replies) => smooth &= replies.iter().all(|r| r.is_ok()),
                Err(_) => {
                    tracing::debug!("probing unproven channels timed out; retrying");
                    return false;
                }
            }
        }
        smooth
    }

    /// One push of the cluster pub/sub connection (see the module doc).
    fn on_push(
        &self,
        push: PushInfo,
        broadcast_channel: &str,
        me: &str,
        subscribed: &Subscribed,
        unproven: &mut Unproven,
    ) {
        let channel = |data: &[Value]| match data.first() {
            Some(Value::BulkString(b)) => std::str::from_utf8(b).ok().map(str::to_string),
            _ => None,
        };
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                let [Value::BulkString(ch), Value::BulkString(payload), ..] = push.data.as_slice()
                else {
                    return;
                };
                let Ok(ch) = std::str::from_utf8(ch) else {
                    return;
                };
                if codec::is_probe_of(payload, me) {
                    if unproven.channels.remove(ch).is_some() {
                        metrics::counter!("herald_redis_subscriptions_proven_total").increment(1);
                        if let Some(u) = keys::channel_user(ch) {
                            self.local.sink.resync(&u);
                        }
                    }
                    return;
                }
                if let Some(e) = codec::decode(broadcast_channel, ch, payload) {
                    self.local.sink.dispatch(e);
                }
            }
            PushKind::SUnsubscribe => {
                // Unasked (this node removes a user from `subscribed`
                // before it unsubscribes): the slot moved away.
                let Some(ch) = channel(&push.data) else {
                    return;
                };
                if ch == broadcast_channel {
                    unproven.broadcast = true;
                } else if keys::channel_user(&ch).is_some_and(|u| subscribed.contains(u.as_ref())) {
                    unproven.channels.insert(ch, None);
                    metrics::counter!("herald_redis_resubscribes_total", "why" => "slot_moved")
                        .increment(1);
                }
            }
            PushKind::Disconnection => {
                // A shard's connection dropped (its primary may be failing
                // over): every channel may have lapsed, presence with it.
                tracing::warn!(
                    "a Redis Cluster connection dropped; proving every subscription again"
                );
                metrics::counter!("herald_redis_resubscribes_total", "why" => "disconnected")
                    .increment(1);
                unproven.everything(subscribed);
            }
            _ => {}
        }
    }
}

/// Checks in a row a connection failed before it counts as wedged, and
/// checks to wait after replacing one before judging it again.
const WEDGED_AFTER: u32 = 4;
const GRACE_AFTER_REPLACING: u32 = 10;
/// Topology checks after a slot-map change in which both connections are
/// replaced again.
const AGAIN_AFTER_A_CHANGE: u32 = 3;
/// A connection whose requests met trouble is replaced at most this often.
const REPLACE_AT_MOST_EVERY: Duration = Duration::from_secs(2);

/// The health of the two cluster connections, one check per
/// [`TOPOLOGY_EVERY`].
#[derive(Default)]
struct Health {
    commands: Streak,
    pubsub: Streak,
}

#[derive(Default)]
struct Streak {
    failures: u32,
    grace: u32,
    replaced_at: Option<Instant>,
}

impl Streak {
    /// Whether the connection was last replaced long enough ago.
    fn may_replace(&self) -> bool {
        self.replaced_at
            .is_none_or(|t| t.elapsed() >= REPLACE_AT_MOST_EVERY)
    }

    fn replaced(&mut self) {
        self.replaced_at = Some(Instant::now());
    }

    /// Records one check; true when the connection should be replaced (a
    /// whole cluster down fails every check too: a replacement then just
    /// fails to connect, and is tried again after the grace period).
    fn failed(&mut self, ok: bool) -> bool {
        if self.grace > 0 {
            self.grace -= 1;
        }
        self.failures = if ok { 0 } else { self.failures + 1 };
        if self.failures >= WEDGED_AFTER && self.grace == 0 {
            self.failures = 0;
            self.grace = GRACE_AFTER_REPLACING;
            return true;
        }
        false
    }
}

/// A pub/sub connection to the cluster (RESP3) and the pushes it delivers.
async fn pubsub_connection(
    seeds: &[String],
) -> crate::error::Result<(ClusterConnection, mpsc::UnboundedReceiver<PushInfo>)> {
    let (push_tx, pushes) = mpsc::unbounded_channel::<PushInfo>();
    let client = Target::cluster_builder(seeds)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(push_tx)
        .build()
        .map_err(|e| Error::invalid(format!("--redis-url: {e}")))?;
    match tokio::time::timeout(Duration::from_secs(5), client.get_async_connection()).await {
        Ok(Ok(c)) => Ok((c, pushes)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Error::Unavailable(
            "Redis Cluster pub/sub connect timed out".into(),
        )),
    }
}
