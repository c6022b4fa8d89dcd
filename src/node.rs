//! The core of a node: routing and inbox semantics, on top of the hub (this
//! node's connections) and the shared backend. The gRPC service and the
//! WebSocket gateway call only this; neither knows which backend runs.
//!
//! Input is validated here, so every entry point gets the same checks and
//! the same messages.

use crate::backend::{Backend, Cluster, Event, NewMessage, Replay};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hub::{Conn, Hub};
use crate::protocol::{self, Frame, MessageId};
use serde_json::value::RawValue;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// The result of a send, per user, in request order.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub user_id: String,
    pub message_id: String,
    pub online: bool,
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub node: NodeStats,
    pub cluster: Cluster,
}

#[derive(Debug, Clone)]
pub struct NodeStats {
    pub node_id: String,
    pub connections: u64,
    pub users: u64,
    pub uptime_seconds: u64,
    pub messages_delivered: u64,
    pub broker_events_received: u64,
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
            hub.clone(),
            &cfg.node_id,
            cfg.inbox.clone(),
        )
        .backend();
        Node::new(cfg, hub, backend)
    }

    /// A node on the Redis backend at `url`.
    pub async fn on_redis(cfg: Config, url: &str) -> Result<Arc<Node>> {
        let hub = Hub::new(&cfg.node_id);
        let backend = crate::backend::redis::connect(&cfg, url, hub.clone()).await?;
        Ok(Node::new(cfg, hub, backend))
    }

    fn check_user(&self, user: &str) -> Result<()> {
        if user.is_empty() {
            return Err(Error::invalid("user id must not be empty"));
        }
        if user.len() > self.cfg.limits.max_user_id_bytes {
            return Err(Error::invalid(format!(
                "user id of {} bytes exceeds the limit of {} bytes",
                user.len(),
                self.cfg.limits.max_user_id_bytes
            )));
        }
        Ok(())
    }

    fn check_users(&self, users: &[String]) -> Result<()> {
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

    fn check_message(&self, topic: &str, payload_json: &str) -> Result<()> {
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

    fn parse_id(field: &str, id: &str) -> Result<MessageId> {
        id.parse()
            .map_err(|e| Error::invalid(format!("{field}: {e}")))
    }

    pub async fn send_to_user(
        &self,
        users: &[String],
        topic: &str,
        payload_json: &str,
        transient: bool,
    ) -> Result<Vec<Delivery>> {
        self.check_users(users)?;
        self.check_message(topic, payload_json)?;
        let ts = protocol::now_ms();
        // `online` comes from the publish itself (did a node holding the
        // user receive it?), so a send costs no separate presence lookup.
        let (ids, online): (Vec<String>, Vec<bool>) = if transient {
            let id = protocol::live_id();
            let frame: Frame = protocol::message_frame(&id, topic, payload_json, ts, true).into();
            let events = users
                .iter()
                .map(|u| Event::Message {
                    user: Arc::from(u.as_str()),
                    id: None,
                    frame: frame.clone(),
                })
                .collect();
            let online = self.backend.broker.publish(events).await?;
            (vec![id; users.len()], online)
        } else {
            let stored = self
                .backend
                .inbox
                .append(
                    users,
                    NewMessage {
                        topic,
                        payload_json,
                        ts,
                    },
                )
                .await?;
            stored
                .into_iter()
                .map(|(id, online)| (id.to_string(), online))
                .unzip()
        };
        metrics::counter!("herald_messages_pushed_total", "kind" => if transient { "transient" } else { "stored" })
            .increment(users.len() as u64);
        Ok(users
            .iter()
            .zip(ids)
            .zip(online)
            .map(|((u, message_id), online)| Delivery {
                user_id: u.clone(),
                message_id,
                online,
            })
            .collect())
    }

    pub async fn broadcast(&self, topic: &str, payload_json: &str) -> Result<String> {
        self.check_message(topic, payload_json)?;
        let id = protocol::live_id();
        let frame =
            protocol::message_frame(&id, topic, payload_json, protocol::now_ms(), true).into();
        self.backend.broker.broadcast(frame).await?;
        metrics::counter!("herald_messages_pushed_total", "kind" => "broadcast").increment(1);
        Ok(id)
    }

    pub async fn is_online(&self, users: &[String]) -> Result<Vec<u32>> {
        self.check_users(users)?;
        self.backend.presence.lookup(users).await
    }

    pub async fn unread_count(&self, user: &str) -> Result<u64> {
        self.check_user(user)?;
        self.backend.inbox.unread(user).await
    }

    /// Moves the read cursor and, when the count changed, tells every
    /// connection of the user (on every node).
    pub async fn mark_read(&self, user: &str, up_to: &str) -> Result<u64> {
        self.check_user(user)?;
        let up_to = if up_to.is_empty() {
            None
        } else {
            Some(Self::parse_id("up_to_message_id", up_to)?)
        };
        self.mark_read_at(user, up_to).await
    }

    async fn mark_read_at(&self, user: &str, up_to: Option<MessageId>) -> Result<u64> {
        let (count, changed) = self.backend.inbox.mark_read(user, up_to).await?;
        if changed {
            self.backend
                .broker
                .publish(vec![Event::Unread {
                    user: Arc::from(user),
                    count,
                }])
                .await?;
        }
        Ok(count)
    }

    pub async fn disconnect_user(&self, user: &str, reason: &str) -> Result<u32> {
        self.check_user(user)?;
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

    pub fn local_stats(&self) -> NodeStats {
        NodeStats {
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
        let existing = self.backend.presence.lookup(&[user.to_string()]).await?[0];
        if existing >= cap {
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
            return Err(e);
        }
        Ok(conn)
    }

    /// What a newly attached connection sends before live traffic.
    pub async fn replay(&self, user: &str, since: Option<MessageId>) -> Result<Replay> {
        self.backend
            .inbox
            .replay(user, since, self.cfg.inbox.replay_limit)
            .await
    }

    /// A client's `read` frame.
    pub async fn client_read(&self, user: &str, up_to: &str) -> Result<u64> {
        let id = Self::parse_id("up_to", up_to)?;
        self.mark_read_at(user, Some(id)).await
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
    }
}
