//! The core of a node: routing and inbox semantics, on top of the hub (this
//! node's connections) and the shared backend. The gRPC service and the
//! WebSocket gateway call only this; neither knows which backend runs.
//!
//! Input is validated here, so every entry point gets the same checks and
//! the same messages.

use crate::backend::{
    reused, Appended, Backend, Claim, ClaimScope, Cluster, Event, IdemKey, NewMessage, NodeInfo,
    Replay,
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hub::{Conn, Hub};
use crate::protocol::{self, Frame, MessageId};
use serde_json::value::RawValue;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A `SendToUser` as the node takes it, whatever the entry point: named
/// fields, not a run of positional flags.
pub struct SendToUser<'a> {
    pub users: &'a [String],
    pub topic: &'a str,
    pub payload_json: &'a str,
    /// Live-only: not stored.
    pub transient: bool,
    /// Empty: none.
    pub idempotency_key: &'a str,
}

impl SendToUser<'_> {
    /// What the send asks for, hashed ([`fingerprint`]); empty without an
    /// idempotency key, so only keyed calls pay for hashing the payload.
    pub(crate) fn fingerprint(&self) -> String {
        if self.idempotency_key.is_empty() {
            String::new()
        } else {
            fingerprint(self.topic, self.payload_json, self.transient)
        }
    }
}

/// The result of a send, per user, in request order.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub user_id: String,
    pub message_id: String,
    pub online: bool,
    /// Made by an earlier call with the same idempotency key.
    pub replayed: bool,
}

#[derive(Debug, Clone)]
pub struct Stats {
    /// This node, live.
    pub node: NodeInfo,
    pub cluster: Cluster,
}

pub struct Node {
    pub cfg: Config,
    pub hub: Arc<Hub>,
    pub backend: Backend,
    started: Instant,
}

impl Node {
    pub fn new(cfg: Config, hub: Arc<Hub>, backend: Backend) -> Arc<Node> {
        Arc::new(Node {
            cfg,
            hub,
            backend,
            started: Instant::now(),
        })
    }

    /// A node on the embedded backend.
    pub fn in_memory(cfg: Config) -> Arc<Node> {
        let hub = Hub::new(&cfg.node_id);
        let backend = crate::backend::memory::MemoryBackend::new(
            crate::backend::Local::of(hub.clone()),
            &cfg.node_id,
            cfg.inbox.clone(),
        )
        .backend();
        Node::new(cfg, hub, backend)
    }

    /// A node on the Redis backend at `url`.
    pub async fn on_redis(cfg: Config, url: &str) -> Result<Arc<Node>> {
        let hub = Hub::new(&cfg.node_id);
        let backend =
            crate::backend::redis::connect(&cfg, url, crate::backend::Local::of(hub.clone()))
                .await?;
        Ok(Node::new(cfg, hub, backend))
    }

    /// A user id from a gRPC request: the same check as a token's `sub`
    /// ([`protocol::check_user_id`]).
    pub(crate) fn check_user(&self, user: &str) -> Result<()> {
        protocol::check_user_id(user, self.cfg.limits.max_user_id_bytes).map_err(Error::invalid)
    }

    pub(crate) fn check_users(&self, users: &[String]) -> Result<()> {
        let max = self.cfg.limits.max_users_per_call;
        if users.is_empty() {
            return Err(Error::invalid("user_ids must name at least one user"));
        }
        if users.len() > max {
            return Err(Error::invalid(format!(
                "user_ids has {} entries; at most {max} per call",
                users.len()
            )));
        }
        for (i, u) in users.iter().enumerate() {
            self.check_user(u)
                .map_err(|e| Error::invalid(format!("user_ids[{i}]: {e}")))?;
        }
        Ok(())
    }

    pub(crate) fn check_message(&self, topic: &str, payload_json: &str) -> Result<()> {
        if topic.len() > self.cfg.limits.max_topic_bytes {
            return Err(Error::invalid(format!(
                "topic of {} bytes exceeds the limit of {} bytes",
                topic.len(),
                self.cfg.limits.max_topic_bytes
            )));
        }
        let max = self.cfg.limits.max_payload_bytes;
        if payload_json.len() > max {
            return Err(Error::invalid(format!(
                "payload_json is {} bytes; the limit is {max} bytes",
                payload_json.len()
            )));
        }
        if let Err(e) = serde_json::from_str::<&RawValue>(payload_json) {
            return Err(Error::invalid(format!(
                "payload_json is not valid JSON: {e}"
            )));
        }
        Ok(())
    }

    pub(crate) fn parse_id(field: &str, id: &str) -> Result<MessageId> {
        id.parse()
            .map_err(|e| Error::invalid(format!("{field}: {e}")))
    }

    /// The caller's idempotency key, checked; None when the call has none.
    pub(crate) fn idem_key<'a>(
        &self,
        key: &'a str,
        fingerprint: &'a str,
    ) -> Result<Option<IdemKey<'a>>> {
        if key.is_empty() {
            return Ok(None);
        }
        if key.len() > MAX_IDEMPOTENCY_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} printable ASCII \
                 characters without spaces"
            )));
        }
        Ok(Some(IdemKey {
            key,
            fingerprint,
            window: self.cfg.idempotency_window,
        }))
    }

    /// Checks one send (users, topic, payload, key) before any effect.
    /// `print` is the send's [`SendToUser::fingerprint`], which the key
    /// borrows.
    pub(crate) fn check_send<'a>(
        &self,
        send: &SendToUser<'a>,
        print: &'a str,
    ) -> Result<Option<IdemKey<'a>>> {
        self.check_users(send.users)?;
        self.check_message(send.topic, send.payload_json)?;
        self.idem_key(send.idempotency_key, print)
    }

    /// All or nothing: a key used for another request (for any of the
    /// users, stored or transient) refuses the send before anything is
    /// stored, pushed or recorded.
    pub(crate) async fn refuse_reused(
        &self,
        users: &[String],
        idem: Option<IdemKey<'_>>,
    ) -> Result<()> {
        if let Some(k) = idem {
            if let Some(i) = self.backend.idempotency.first_conflict(users, k).await? {
                return Err(reused(&users[i]));
            }
        }
        Ok(())
    }

    /// Stores (unless `transient`) and pushes a message to each user. With
    /// an idempotency key, a user that an earlier call with the key already
    /// served gets nothing now and that call's delivery (`replayed`).
    pub async fn send_to_user(&self, send: SendToUser<'_>) -> Result<Vec<Delivery>> {
        // Hashing the payload costs only calls that carry a key.
        let print = send.fingerprint();
        let idem = self.check_send(&send, &print)?;
        let SendToUser {
            users,
            topic,
            payload_json,
            transient,
            ..
        } = send;
        self.refuse_reused(users, idem).await?;
        let ts = protocol::now_ms();
        // `online` comes from the publish itself (did a node holding the
        // user receive it?), so a send costs no separate presence lookup.
        let deliveries: Vec<Delivery> = if transient {
            let id = protocol::live_id();
            let claims = match idem {
                None => vec![Claim::New; users.len()],
                Some(k) => {
                    let scopes: Vec<ClaimScope> =
                        users.iter().map(|u| ClaimScope::User(u)).collect();
                    self.backend.idempotency.claim(&scopes, k, &id).await?
                }
            };
            let frame: Frame = protocol::message_frame(&id, topic, payload_json, ts, true).into();
            let events = live_events(users, &claims, &frame)?;
            let online = self.backend.broker.publish(events).await?;
            live_deliveries(users, claims, &id, online.into_iter())
        } else {
            let msg = NewMessage {
                topic,
                payload_json,
                ts,
                idempotency: idem,
            };
            let stored = self.backend.inbox.append(users, msg).await?;
            self.stored_deliveries(users, stored)
        };
        let pushed = deliveries.iter().filter(|d| !d.replayed).count() as u64;
        metrics::counter!("herald_messages_pushed_total", "kind" => if transient { "transient" } else { "stored" })
            .increment(pushed);
        let replayed = deliveries.len() as u64 - pushed;
        if replayed > 0 {
            metrics::counter!("herald_idempotent_replays_total").increment(replayed);
        }
        Ok(deliveries)
    }

    /// Pushes a live-only message to every connection. Returns its id and
    /// whether an earlier call with the same idempotency key made it.
    pub async fn broadcast(
        &self,
        topic: &str,
        payload_json: &str,
        idempotency_key: &str,
    ) -> Result<(String, bool)> {
        self.check_message(topic, payload_json)?;
        let fingerprint = (!idempotency_key.is_empty())
            .then(|| fingerprint(topic, payload_json, true))
            .unwrap_or_default();
        let id = protocol::live_id();
        if let Some(k) = self.idem_key(idempotency_key, &fingerprint)? {
            let claim = self
                .backend
                .idempotency
                .claim(&[ClaimScope::Broadcast], k, &id)
                .await?;
            match claim.into_iter().next() {
                Some(Claim::Seen(first)) => {
                    metrics::counter!("herald_idempotent_replays_total").increment(1);
                    return Ok((first, true));
                }
                Some(Claim::Conflict) => {
                    return Err(Error::invalid(
                        "idempotency_key was already used for a different broadcast; use a new key",
                    ))
                }
                _ => {}
            }
        }
        let frame =
            protocol::message_frame(&id, topic, payload_json, protocol::now_ms(), true).into();
        self.backend.broker.broadcast(frame).await?;
        metrics::counter!("herald_messages_pushed_total", "kind" => "broadcast").increment(1);
        Ok((id, false))
    }

    pub async fn is_online(&self, users: &[String]) -> Result<Vec<u32>> {
        self.check_users(users)?;
        self.backend.presence.lookup(users).await
    }

    /// The unread count, optionally among topics starting with `prefix`.
    pub async fn unread_count(&self, user: &str, prefix: &str) -> Result<u64> {
        self.check_user(user)?;
        Self::check_prefix(prefix, self.cfg.limits.max_topic_bytes)?;
        if prefix.is_empty() {
            self.backend.inbox.unread(user).await
        } else {
            self.backend.inbox.unread_in(user, prefix).await
        }
    }

    /// A topic prefix of at most `max` bytes (`--max-topic-bytes`).
    pub(crate) fn check_prefix(prefix: &str, max: usize) -> Result<()> {
        if prefix.len() > max {
            return Err(Error::invalid(format!(
                "topic_prefix of {} bytes exceeds the limit of {max} bytes",
                prefix.len(),
            )));
        }
        Ok(())
    }

    /// Parses a list of message ids: 1 to `max`, each a stored-message id.
    pub fn parse_ids(field: &str, ids: &[String], max: usize) -> Result<Vec<MessageId>> {
        if ids.is_empty() {
            return Err(Error::invalid(format!(
                "{field} must name at least one message"
            )));
        }
        if ids.len() > max {
            return Err(Error::invalid(format!(
                "{field} has {} ids; at most {max} per call",
                ids.len()
            )));
        }
        ids.iter()
            .enumerate()
            .map(|(i, id)| Self::parse_id(&format!("{field}[{i}]"), id))
            .collect()
    }

    pub async fn disconnect_user(&self, user: &str, reason: &str) -> Result<u32> {
        self.check_user(user)?;
        if reason.len() > protocol::MAX_CLOSE_REASON_BYTES {
            // A close frame has room for 123 bytes of reason; cutting it
            // silently would change what the user is told.
            return Err(Error::invalid(format!(
                "reason is {} bytes; a close reason holds at most {} bytes (UTF-8)",
                reason.len(),
                protocol::MAX_CLOSE_REASON_BYTES
            )));
        }
        let reason = if reason.is_empty() {
            "disconnected by the server"
        } else {
            reason
        };
        let n = self.backend.presence.lookup(&[user.to_string()]).await?[0];
        self.backend
            .broker
            .publish(vec![Event::Disconnect {
                user: Arc::from(user),
                reason: Arc::from(reason),
            }])
            .await?;
        Ok(n)
    }

    pub fn local_stats(&self) -> NodeInfo {
        NodeInfo {
            node_id: self.cfg.node_id.clone(),
            connections: self.hub.connections(),
            users: self.hub.users(),
            uptime_seconds: self.started.elapsed().as_secs(),
            messages_delivered: self.hub.delivered.load(Ordering::Relaxed),
            broker_events_received: self.hub.events_received.load(Ordering::Relaxed),
        }
    }

    pub async fn stats(&self) -> Result<Stats> {
        Ok(Stats {
            node: self.local_stats(),
            cluster: self.backend.presence.cluster().await?,
        })
    }

    /// Registers a new connection of `user` and makes sure this node receives
    /// the user's events before anything is read from the inbox.
    pub async fn attach(&self, user: &str) -> Result<Arc<Conn>> {
        let cap = self.cfg.limits.max_connections_per_user;
        // Reserve first: the cap holds exactly, whatever connects at once.
        if let Err(existing) = self.backend.presence.reserve(user, cap).await? {
            return Err(Error::ResourceExhausted(format!(
                "user already has {existing} connections; the limit is {cap}"
            )));
        }
        let (conn, first) = self.hub.register(user, self.cfg.limits.send_queue);
        let subscribed = if first {
            self.backend.broker.subscribe(user).await
        } else {
            Ok(())
        };
        let registered = match subscribed {
            Ok(()) => self.backend.presence.connected(user).await,
            Err(e) => Err(e),
        };
        if let Err(e) = registered {
            if self.hub.unregister(&conn) {
                let _ = self.backend.broker.unsubscribe(user).await;
            }
            self.release(user).await;
            return Err(e);
        }
        Ok(conn)
    }

    /// Gives back a connection reservation; a failure (Redis away) is
    /// retried a few times in the background, and a node that reconnects to
    /// Redis (or sees a Redis Cluster fail over) rewrites the reservations
    /// of its users and of those who left it lately anyway.
    async fn release(&self, user: &str) {
        if self.backend.presence.release(user).await.is_ok() {
            return;
        }
        let presence = self.backend.presence.clone();
        let user = user.to_string();
        tokio::spawn(async move {
            for attempt in 1..=5u32 {
                tokio::time::sleep(std::time::Duration::from_millis(200 * 2u64.pow(attempt))).await;
                if presence.release(&user).await.is_ok() {
                    return;
                }
            }
            metrics::counter!("herald_presence_releases_given_up_total").increment(1);
            tracing::warn!(
                user,
                "could not release a connection reservation; it is rewritten when Redis returns"
            );
        });
    }

    /// What a newly attached connection sends before live traffic.
    pub async fn replay(&self, user: &str, since: Option<MessageId>) -> Result<Replay> {
        self.backend
            .inbox
            .replay(user, since, self.cfg.inbox.replay_limit)
            .await
    }

    /// The deliveries of a stored send, per user in order. A connection
    /// on this node is proof enough of `online`: it gets a stored message
    /// live, or from the inbox when its subscription is re-proven after a
    /// Redis failover, while the publish may have reached nobody yet.
    pub(crate) fn stored_deliveries(
        &self,
        users: &[String],
        stored: Vec<Appended>,
    ) -> Vec<Delivery> {
        users
            .iter()
            .zip(stored)
            .map(|(u, a)| Delivery {
                user_id: u.clone(),
                message_id: a.id.to_string(),
                online: a.online || self.hub.has_user(u),
                replayed: a.replayed,
            })
            .collect()
    }

    /// Leaves the cluster (clean shutdown).
    pub async fn shutdown(&self) {
        if let Err(e) = self.backend.presence.leave().await {
            tracing::warn!(error = %e, "could not leave the cluster cleanly; the lease will expire");
        }
    }

    /// Undoes [`Node::attach`] when the connection ends.
    pub async fn detach(&self, conn: &Conn) {
        let last = self.hub.unregister(conn);
        if last {
            if let Err(e) = self.backend.broker.unsubscribe(&conn.user).await {
                tracing::warn!(error = %e, "unsubscribe failed");
            }
        }
        if let Err(e) = self.backend.presence.disconnected(&conn.user).await {
            tracing::warn!(error = %e, "presence update failed");
        }
        self.release(&conn.user).await;
    }
}

/// The longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// What a send asked for, hashed (64-bit FNV-1a, stable across versions and
/// nodes): a key reused with another request is refused rather than
/// answered with the first request's result.
pub(crate) fn fingerprint(topic: &str, payload_json: &str, transient: bool) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let parts: [&[u8]; 5] = [
        topic.as_bytes(),
        &[0],
        payload_json.as_bytes(),
        &[0],
        &[transient as u8],
    ];
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The events of a live-only send: one per user its claims let through
/// (`New`), each sharing `frame`; a key reused for another request
/// (`Conflict`) refuses the send.
pub(crate) fn live_events(users: &[String], claims: &[Claim], frame: &Frame) -> Result<Vec<Event>> {
    let mut events = Vec::with_capacity(users.len());
    for (u, claim) in users.iter().zip(claims) {
        match claim {
            Claim::New => events.push(Event::Message {
                user: Arc::from(u.as_str()),
                id: None,
                frame: frame.clone(),
            }),
            Claim::Seen(_) => {}
            Claim::Conflict => return Err(reused(u)),
        }
    }
    Ok(events)
}

/// The deliveries of a live-only send, per user in order: a user an
/// earlier call with the same key already reached gets that call's id
/// (replayed); the others get `id`, and whether the publish reached a node
/// holding them (`online`: one answer per user published to, in order).
pub(crate) fn live_deliveries(
    users: &[String],
    claims: Vec<Claim>,
    id: &str,
    mut online: impl Iterator<Item = bool>,
) -> Vec<Delivery> {
    users
        .iter()
        .zip(claims)
        .map(|(u, claim)| match claim {
            Claim::Seen(first) => Delivery {
                user_id: u.clone(),
                message_id: first,
                online: false,
                replayed: true,
            },
            _ => Delivery {
                user_id: u.clone(),
                message_id: id.to_string(),
                online: online.next().unwrap_or(false),
                replayed: false,
            },
        })
        .collect()
}
