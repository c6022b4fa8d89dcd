//! Redis-backed broker, presence and inbox: a cluster of nodes sharing one
//! Redis (7.0 or newer).
//!
//! # Files
//!
//! * `mod.rs`: [`connect`] (checks the server, starts the registrar) and
//!   [`RedisBackend`], the handle the three traits are implemented on.
//! * [`keys`]: every key and channel name, one function each.
//! * [`codec`]: the pub/sub payload format, encoded and decoded.
//! * [`scripts`]: the Lua scripts (`scripts/*.lua`, one per file), the
//!   EVALSHA runner that reloads them after a Redis restart, and readers
//!   for their replies.
//! * [`broker`], [`presence`], [`inbox`]: the [`Broker`](crate::backend::Broker),
//!   [`Presence`](crate::backend::Presence) and
//!   [`Inbox`](crate::backend::Inbox) implementations.
//! * [`registrar`]: the task owning the pub/sub connection and this node's
//!   presence record.
//!
//! # Data in Redis
//!
//! Every key and channel name is built by a function in [`keys`]; nothing
//! else formats one. User-scoped names carry the user id in a `{hash tag}`
//! so one user's keys would share a slot under Redis Cluster.
//!
//! | name | type | what | lifetime |
//! |---|---|---|---|
//! | `herald:{<user>}:inbox` | stream | stored messages: id `<ms>-<seq>`, fields `n` (ordinal), `f` (the frame) | trimmed to the newest `inbox_max_messages` and `inbox_max_age`; expires `inbox_max_age` after the last write |
//! | `herald:{<user>}:meta` | hash | `last` (newest id), `seq` (messages ever stored), `rid`/`rn` (read cursor id and ordinal), `floor` (newest id gone) | as the inbox |
//! | `herald:{<user>}:ch` | channel | the user's live events (payloads: [`codec`]) | subscribed by nodes holding the user |
//! | `herald:broadcast` | channel | broadcast frames | every node |
//! | `herald:nodes` | sorted set | node id, scored by lease expiry (Redis clock, ms) | renewed every lease/3 |
//! | `herald:node:<id>:conns` | hash | user -> live connections on that node | written only by that node; expires 3 leases after its last renewal |
//!
//! Unread count = `seq - max(rn, seq - XLEN)`: messages stored after the
//! read cursor that are still retained, in O(1).
//!
//! # Fan-out
//!
//! Stored messages are written and published by one Lua script per user
//! (pipelined for a many-user send): ids and publishes happen in the same
//! order, so a connection can drop any live message at or below what its
//! replay already covered. A node subscribes to `herald:{user}:ch` while it
//! holds a connection of the user, so a unicast reaches only the nodes that
//! hold the user.
//!
//! One task per node, the registrar, owns the pub/sub connection. It
//! serializes subscribe/unsubscribe and presence writes, reading this
//! node's connections as they are when it acts, so concurrent connects and
//! disconnects of one user always converge. When the pub/sub connection
//! drops it reconnects with backoff, re-subscribes every local user,
//! rewrites this node's presence, and asks every local connection to catch
//! up from the inbox (what was published while it was away is not lost).

mod broker;
mod center;
mod codec;
mod idempotency;
mod inbox;
pub(crate) mod keys;
mod presence;
mod registrar;
mod scripts;

use super::{Backend, Dispatch};
use crate::config::{Config, InboxConfig};
use crate::error::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use scripts::Scripts;
use std::sync::Arc;
use std::time::Duration;

/// The Redis backend of one node; [`broker`], [`presence`] and [`inbox`]
/// implement the backend traits on it.
pub(crate) struct RedisBackend {
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    node_id: String,
    /// `<node>|<boot>`: the field of this node's connection reservations.
    incarnation: String,
    cfg: InboxConfig,
    registrar: registrar::Handle,
}

/// Connects this node to Redis: checks the server, then starts the
/// registrar, which delivers the events this node receives to `local`.
pub(crate) async fn connect(cfg: &Config, url: &str, local: Arc<dyn Dispatch>) -> Result<Backend> {
    // The URL may hold a password: errors name the address only.
    let client = client(url)?;
    let addr = client.get_connection_info().addr().to_string();
    let manager_cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(1000)))
        .set_response_timeout(Some(Duration::from_secs(3)))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    let mut conn = ConnectionManager::new_with_config(client.clone(), manager_cfg)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach Redis at {addr}: {e}")))?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("0")
        .trim()
        .to_string();
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 7 {
        return Err(Error::invalid(format!(
            "Redis {version} is too old: Herald needs Redis 7.0 or newer"
        )));
    }

    let scripts = Arc::new(Scripts::new());
    let boot = format!("{:016x}", rand::random::<u64>());
    let (registrar, ready) = registrar::Registrar {
        client,
        conn: conn.clone(),
        scripts: scripts.clone(),
        local,
        node_id: cfg.node_id.clone(),
        boot: boot.clone(),
        started_ms: crate::protocol::now_ms(),
        lease: cfg.node_lease,
    }
    .start();
    // The first pub/sub connection and presence registration must work, or
    // the node would start deaf.
    match tokio::time::timeout(Duration::from_secs(10), ready).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e),
        _ => {
            return Err(Error::Unavailable(
                "could not subscribe to Redis pub/sub".into(),
            ))
        }
    }
    let backend = Arc::new(RedisBackend {
        conn,
        scripts,
        incarnation: registrar::incarnation(&cfg.node_id, &boot),
        node_id: cfg.node_id.clone(),
        cfg: cfg.inbox.clone(),
        registrar,
    });
    Ok(Backend {
        broker: backend.clone(),
        presence: backend.clone(),
        inbox: backend.clone(),
        idempotency: backend,
    })
}

/// The Redis client of `url`, with TCP_NODELAY on every connection it
/// opens (the command connection and the pub/sub one). redis-rs leaves
/// Nagle's algorithm on by default: a command written while an earlier one
/// is still unacknowledged would then wait for Redis's delayed ACK (40 ms
/// on Linux) when no reply carries the ACK back sooner.
fn client(url: &str) -> Result<redis::Client> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| Error::invalid(format!("--redis-url is not a valid Redis URL: {e}")))?;
    let nodelay = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    redis::Client::open(info.set_tcp_settings(nodelay))
        .map_err(|e| Error::invalid(format!("--redis-url is not a valid Redis URL: {e}")))
}

impl RedisBackend {
    /// Runs a pipeline of script calls (see [`Scripts::eval`]).
    async fn run(&self, cmds: Vec<redis::Cmd>) -> Result<Vec<Value>> {
        let mut pipe = redis::pipe();
        for c in cmds {
            pipe.add_command(c);
        }
        self.scripts.eval(&mut self.conn.clone(), &pipe).await
    }

    async fn run_one(&self, cmd: redis::Cmd) -> Result<Value> {
        self.run(vec![cmd])
            .await?
            .pop()
            .ok_or_else(|| Error::Backend("empty pipeline reply".into()))
    }
}

impl From<RedisError> for Error {
    fn from(e: RedisError) -> Error {
        let busy = matches!(
            e.code(),
            Some("LOADING") | Some("BUSY") | Some("MASTERDOWN") | Some("READONLY")
        );
        if e.is_io_error()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_connection_dropped()
            || busy
        {
            Error::Unavailable(e.to_string())
        } else {
            Error::Backend(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_redis_connection_has_tcp_nodelay() {
        let c = super::client("redis://127.0.0.1:6379/0").unwrap();
        assert!(c.get_connection_info().tcp_settings().nodelay());
        assert!(super::client("not a url").is_err());
    }
}
