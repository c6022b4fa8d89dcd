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
//! (polled every [`TOPOLOGY_EVERY`]) — every user channel of this node is
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
//! Broadcasts carry the frame itself (no room for a probe), and are not
//! stored: the broadcast channel is subscribed again after the same events.

use super::codec;
use super::keys;
use super::registrar::{sharded, Registrar, Request, Sub, Subscribed};
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

impl Registrar {
    /// Redis Cluster: the registrar's loop (see the module doc).
    pub(super) async fn run_cluster(
        self,
        seeds: Vec<String>,
        mut rx: mpsc::UnboundedReceiver<Request>,
        ready: oneshot::Sender<crate::error::Result<()>>,
    ) {
        let (mut conn, mut pushes) = match pubsub_connection(&seeds).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let mut subscribed = Subscribed::new();
        let broadcast_channel = keys::broadcast_channel();
        let me = self.incarnation();
        let mut unproven = Unproven::default();
        let restored = self
            .restore(&mut Sub::Cluster(&mut conn), &mut subscribed)
            .await;
        let _ = ready.send(restored);
        let mut slots = slot_map(&mut conn).await.ok().map(|m| m.ranges);
        // Slot-map refreshes still to force after a change (see `nudge`).
        let mut nudges = 0u32;
        let mut health = Health::default();
        let mut renew = tokio::time::interval(self.lease / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await; // restore renewed just now
        let mut repair = tokio::time::interval(REPAIR_EVERY);
        repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut topology = tokio::time::interval(TOPOLOGY_EVERY);
        topology.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                push = pushes.recv() => {
                    let Some(push) = push else { return };
                    self.on_push(push, &broadcast_channel, &me, &subscribed, &mut unproven);
                }
                n = rx.recv_many(&mut batch, 1024) => {
                    if n == 0 { return }
                    let batch = std::mem::take(&mut batch);
                    let before = subscribed.clone();
                    if let Err(e) = self.process(&mut Sub::Cluster(&mut conn), &mut subscribed, batch).await {
                        tracing::warn!(error = %e, "subscription sync failed");
                    }
                    // While a topology event is being worked off, a new
                    // subscription's confirmation is no proof either.
                    if unproven.pending() {
                        for u in subscribed.difference(&before) {
                            unproven.channels.insert(keys::user_channel(u), None);
                        }
                    }
                }
                _ = renew.tick() => {
                    if let Err(e) = self.renew().await {
                        tracing::warn!(error = %e, "node lease renewal failed");
                    }
                }
                _ = topology.tick() => {
                    // Either connection wedged (see `Swappable`): a new one.
                    let commands_ok = self.commands_answer().await;
                    if health.commands.failed(commands_ok) {
                        self.replace_commands(&seeds).await;
                    }
                    let slots_read = slot_map(&mut conn).await;
                    if health.pubsub.failed(slots_read.is_ok()) {
                        if let Ok((c, p)) = pubsub_connection(&seeds).await {
                            tracing::warn!("the Redis Cluster pub/sub connection stopped answering; replaced it");
                            metrics::counter!("herald_redis_connections_replaced_total", "conn" => "pubsub").increment(1);
                            (conn, pushes) = (c, p);
                            unproven.everything(&subscribed);
                        }
                    }
                    match slots_read {
                        Ok(now) => {
                            if slots.as_ref().is_some_and(|before| *before != now.ranges) {
                                tracing::info!("the Redis Cluster slot map changed; proving every subscription again");
                                metrics::counter!("herald_redis_resubscribes_total", "why" => "topology")
                                    .increment(1);
                                unproven.everything(&subscribed);
                                nudges = 3;
                            }
                            if nudges > 0 {
                                nudges -= 1;
                                // A different replica each time, in case one is down.
                                let replica = now.replicas.get(nudges as usize % now.replicas.len().max(1));
                                self.nudge(&mut conn, replica).await;
                            }
                            slots = Some(now.ranges);
                        }
                        Err(e) => tracing::debug!(error = %e, "reading the slot map failed"),
                    }
                }
                _ = repair.tick(), if unproven.pending() => {
                    self.prove(&conn, &subscribed, &broadcast_channel, &me, &mut unproven).await;
                }
            }
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
    async fn replace_commands(&self, seeds: &[String]) {
        let super::Conn::Cluster(c) = &self.conn else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(5), Target::cluster_connection(seeds)).await
        {
            Ok(Ok(fresh)) => {
                c.replace(fresh);
                tracing::warn!(
                    "the Redis Cluster command connection stopped answering; replaced it"
                );
                metrics::counter!("herald_redis_connections_replaced_total", "conn" => "commands")
                    .increment(1);
            }
            _ => tracing::debug!("a new Redis Cluster command connection failed; retrying"),
        }
    }

    /// Makes both of this node's cluster connections (commands, and pub/sub)
    /// read the slot map again. The client refreshes its map only on a
    /// `MOVED`; a request for a slot whose primary died goes on to the dead
    /// address (connection refused, reconnect, again) and never gets one,
    /// so sends and subscriptions of that slot failed long after the
    /// replica took over. Any key command sent to a replica is answered
    /// `MOVED`: one to each connection is enough.
    async fn nudge(&self, pubsub: &mut ClusterConnection, replica: Option<&(String, u16)>) {
        let Some((host, port)) = replica else {
            return;
        };
        let route = || {
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            })
        };
        let probe = || redis::cmd("EXISTS").arg(keys::slot_map_nudge()).clone();
        let mut conns = vec![pubsub.clone()];
        if let super::Conn::Cluster(c) = &self.conn {
            conns.push(c.current());
        }
        for mut c in conns {
            let asked =
                tokio::time::timeout(Duration::from_secs(2), c.route_command(probe(), route()));
            if let Ok(Err(e)) = asked.await {
                tracing::debug!(error = %e, "slot-map nudge failed");
            }
        }
    }

    /// One repair step: the broadcast subscription, presence, then a batch
    /// of due channels subscribed and probed.
    async fn prove(
        &self,
        conn: &ClusterConnection,
        subscribed: &Subscribed,
        broadcast_channel: &str,
        me: &str,
        unproven: &mut Unproven,
    ) {
        // Users who left meanwhile need no subscription.
        unproven
            .channels
            .retain(|ch, _| keys::channel_user(ch).is_some_and(|u| subscribed.contains(u)));
        if unproven.broadcast {
            let channel = [broadcast_channel.to_string()];
            match tokio::time::timeout(Duration::from_secs(2), sharded(conn, &channel, true)).await
            {
                Ok(Ok(())) => unproven.broadcast = false,
                Ok(Err(e)) => tracing::debug!(error = %e, "re-subscribing broadcasts failed"),
                Err(_) => tracing::debug!("re-subscribing broadcasts timed out"),
            }
        }
        if unproven.presence {
            let users: Vec<String> = subscribed.iter().cloned().collect();
            match tokio::time::timeout(Duration::from_secs(2), self.rewrite_presence(&users)).await
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
            return;
        }
        for ch in &due {
            unproven.channels.insert(ch.clone(), Some(now));
        }
        // Subscribe (a no-op where the subscription is live), then probe:
        // the probe goes to the channel's primary, which delivers it here
        // only through a live subscription.
        if let Ok(Err(e)) | Err(e) =
            tokio::time::timeout(Duration::from_secs(2), sharded(conn, &due, true))
                .await
                .map_err(|_| Error::Unavailable("timed out".into()))
        {
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
            if tokio::time::timeout(Duration::from_secs(2), sent)
                .await
                .is_err()
            {
                tracing::debug!("probing unproven channels timed out; retrying");
                break;
            }
        }
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
                            self.local.resync(u);
                        }
                    }
                    return;
                }
                if let Some(e) = codec::decode(broadcast_channel, ch, payload) {
                    self.local.dispatch(e);
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
                } else if keys::channel_user(&ch).is_some_and(|u| subscribed.contains(u)) {
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
}

impl Streak {
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

/// The slot map as a live node reports it.
struct SlotMap {
    /// (first slot, last slot, primary) per range, sorted. Compared, not
    /// interpreted: any change is a reason to prove subscriptions again.
    ranges: Vec<(i64, i64, String)>,
    /// Replicas' addresses (for [`Registrar::nudge`]).
    replicas: Vec<(String, u16)>,
}

async fn slot_map(conn: &mut ClusterConnection) -> crate::error::Result<SlotMap> {
    let v = tokio::time::timeout(
        Duration::from_secs(2),
        conn.route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        ),
    )
    .await
    .map_err(|_| Error::Unavailable("CLUSTER SLOTS timed out".into()))??;
    let Value::Array(ranges) = v else {
        return Err(Error::Backend("CLUSTER SLOTS: not an array".into()));
    };
    let mut map = Vec::with_capacity(ranges.len());
    let mut replicas = Vec::new();
    for r in ranges {
        let Value::Array(f) = r else { continue };
        let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(primary))) =
            (f.first(), f.get(1), f.get(2))
        else {
            continue;
        };
        // [host, port, id, ...]: the id names the node across restarts.
        let who = primary
            .iter()
            .map(|x| match x {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::Int(i) => i.to_string(),
                _ => String::new(),
            })
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        map.push((*a, *b, who));
        for node in f.iter().skip(3) {
            if let Value::Array(n) = node {
                if let (Some(Value::BulkString(h)), Some(Value::Int(p))) = (n.first(), n.get(1)) {
                    if let Ok(p) = u16::try_from(*p) {
                        replicas.push((String::from_utf8_lossy(h).into_owned(), p));
                    }
                }
            }
        }
    }
    map.sort();
    Ok(SlotMap {
        ranges: map,
        replicas,
    })
}
