//! Redis-backed broker, presence and inbox: a cluster of nodes sharing one
//! Redis (7.0 or newer), or a Redis Cluster (`redis+cluster://` seeds).
//!
//! Both run the same code: every file talks to Redis through [`Conn`] (a
//! connection manager, or the crate's cluster connection that routes each
//! command to the primary owning its slot), every script touches one
//! user's keys (one slot), and presence filters each user's reservation
//! hash through a cache of the node leases ([`leases`]) instead of reading
//! every node's keys in one script. What differs is pub/sub: `PUBLISH` and
//! one `SUBSCRIBE` connection on a server; sharded pub/sub (`SPUBLISH`,
//! `SSUBSCRIBE` on the shard owning the user) on a cluster, with the
//! registrar re-subscribing after a slot moves or a shard fails over.
//!
//! # Files
//!
//! * `mod.rs`: [`connect`] (checks the server, starts the registrar),
//!   [`Target`] (what `--redis-url` names), [`Conn`] and [`RedisBackend`],
//!   the handle the traits are implemented on.
//! * [`leases`]: the cache of live node incarnations.
//! * [`keys`]: every key and channel name, one function each.
//! * [`codec`]: the pub/sub payload format, encoded and decoded.
//! * [`scripts`]: the Lua scripts (`scripts/*.lua`, one per file), the
//!   EVALSHA runner that reloads them after a Redis restart, and readers
//!   for their replies.
//! * [`broker`], [`presence`], [`inbox`]: the [`Broker`](crate::backend::Broker),
//!   [`Presence`](crate::backend::Presence) and
//!   [`Inbox`](crate::backend::Inbox) implementations.
//! * [`registrar`]: the task owning the pub/sub connection and this node's
//!   presence record; [`sharded`]: its loop on a Redis Cluster, which proves
//!   each subscription live after a failover or a slot move;
//!   [`topology`]: the slot map read over a plain connection, which tells
//!   that loop when the cluster changed and which node knows it first.
//!
//! # Data in Redis
//!
//! Every key and channel name is built by a function in [`keys`]; nothing
//! else formats one. User-scoped names carry the user id in a `{hash tag}`
//! so one user's keys share a slot under Redis Cluster.
//!
//! Caller-controlled parts, `<user>`, `<key>` (an idempotency key) and
//! `<node>`, are encoded: `%`, `{`, `}`, `:` and the ASCII control bytes
//! are written as `%XX` (uppercase hex), everything else as it is. An
//! encoded part holds no `{`, `}` or `:`, so the hash tag is exactly the
//! user, every name parses back uniquely (no user, key or node can make
//! its name another's), and [`keys::channel_user`] decodes a channel back
//! to its user. An id without those bytes encodes to itself: data stored
//! by earlier versions, which wrote parts raw, keeps its names for every
//! such id. (Hash fields and set members, such as the user ids in a node's
//! conns hash, are stored as they are; none is parsed out of a name.)
//!
//! | name | type | what | lifetime |
//! |---|---|---|---|
//! | `herald:{<user>}:inbox` | stream | stored messages: id `<ms>-<seq>`, fields `n` (ordinal), `f` (the frame) | trimmed to the newest `inbox_max_messages` and `inbox_max_age`; expires `inbox_max_age` after the last write |
//! | `herald:{<user>}:meta` | hash | `last` (newest id), `seq` (messages ever stored), `rid`/`rn` (read cursor id and ordinal), `floor` (newest id gone), `tn`, `ok`, `px` (see `scripts/prelude.lua`, `append.lua`) | as the inbox |
//! | `herald:{<user>}:rd` | sorted set | message center: ids read above the cursor (score: ordinal) | as the inbox (the center scripts expire all five keys together) |
//! | `herald:{<user>}:ur` | sorted set | message center: ids unread at or below the cursor (score: ordinal) | as the inbox |
//! | `herald:{<user>}:del` | sorted set | message center: ids deleted above `tn` (score: ordinal) | as the inbox |
//! | `herald:{<user>}:ch` | channel (sharded on a cluster) | the user's live events (payloads: [`codec`]) | subscribed by nodes holding the user |
//! | `herald:{<user>}:conns` | hash | `<node>\|<boot>` -> the user's connection reservations on that node incarnation | written by `reserve.lua`/`release.lua` and a node restoring its own, each write setting the expiry `--presence-ttl` (at least 4 leases, default 1 h), which every node holding the user refreshes within about half of it ([`registrar`]); dead incarnations' entries deleted by the next reserve, and the whole hash expires when no live node holds the user |
//! | `herald:{<user>}:idem:s:<key>` | string | a stored send's record: `<id> <online> <fingerprint>` | the idempotency window |
//! | `herald:{<user>}:idem:t:<key>` | string | a transient send's record: `<id> <fingerprint>` | the idempotency window |
//! | `herald:idem:b:<key>` | string | a broadcast's record: `<id> <fingerprint>` | the idempotency window |
//! | `herald:broadcast` | channel (sharded on a cluster) | broadcast frames | every node |
//! | `herald:nodes` | sorted set | node id, scored by lease expiry (Redis clock, ms) | renewed every lease/3; entries dead for a minute removed |
//! | `herald:boots` | hash | node id -> boot id of its current incarnation | rewritten with each renewal |
//! | `herald:node:<node>:conns` | hash | user -> live connections on that node | written only by that node; expires 3 leases after its last renewal |
//! | `herald:node:<node>:stats` | hash | `started` (unix ms), `delivered`, `events` (for `Stats`) | rewritten with each renewal; as the node's conns |
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
mod leases;
mod presence;
mod registrar;
mod scripts;
mod sharded;
mod topology;

use super::{Backend, Local};
use crate::config::{Config, InboxConfig};
use crate::error::{Error, Result};
use futures_util::future::{join_all, FutureExt};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};
use scripts::Scripts;
use std::sync::Arc;
use std::time::Duration;

/// The URL scheme of cluster mode: `redis+cluster://[user:pass@]host:port[,host:port...]`
/// lists seed nodes of a Redis Cluster (any reachable one is enough).
pub(crate) const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Where the data lives: one Redis server, or a Redis Cluster.
#[derive(Clone)]
pub(crate) enum Target {
    Standalone(redis::Client),
    /// The seed nodes, each as a `redis://` URL (credentials repeated).
    Cluster(Vec<String>),
}

impl Target {
    /// Reads `--redis-url`. Errors never repeat the URL (it may hold a
    /// password).
    pub(crate) fn parse(url: &str) -> Result<Target> {
        let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
            let invalid = |e: RedisError| {
                Error::invalid(format!("--redis-url is not a valid Redis URL: {e}"))
            };
            let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(invalid)?;
            let client = redis::Client::open(info.set_tcp_settings(nodelay())).map_err(invalid)?;
            return Ok(Target::Standalone(client));
        };
        let rest = rest.trim_end_matches('/');
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((a, h)) => (format!("{a}@"), h),
            None => (String::new(), rest),
        };
        let seeds: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{auth}{h}"))
            .collect();
        if seeds.is_empty() {
            return Err(Error::invalid(
                "--redis-url redis+cluster:// names no seed node (host:port[,host:port...])",
            ));
        }
        for s in &seeds {
            redis::Client::open(s.as_str()).map_err(|e| {
                Error::invalid(format!("--redis-url has an invalid cluster seed: {e}"))
            })?;
        }
        Ok(Target::Cluster(seeds))
    }

    /// What errors may name: the address(es), never a password.
    fn describe(&self) -> String {
        match self {
            Target::Standalone(c) => c.get_connection_info().addr().to_string(),
            Target::Cluster(seeds) => {
                let hosts: Vec<&str> = seeds
                    .iter()
                    .map(|s| s.rsplit_once('@').map_or(&s[8..], |(_, h)| h))
                    .collect();
                format!("cluster {}", hosts.join(","))
            }
        }
    }

    /// A new command connection to the cluster (see [`Swappable`]).
    pub(crate) async fn cluster_connection(seeds: &[String]) -> Result<ClusterConnection> {
        let client = Target::cluster_builder(seeds)
            .build()
            .map_err(|e| Error::invalid(format!("--redis-url: {e}")))?;
        Ok(client.get_async_connection().await?)
    }

    /// Whether user channels use sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`).
    pub(crate) fn sharded(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }

    /// A cluster client for these seeds: fast timeouts and few retries, so
    /// calls fail over to `UNAVAILABLE` instead of hanging.
    fn cluster_builder(seeds: &[String]) -> redis::cluster::ClusterClientBuilder {
        redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(Duration::from_millis(1000))
            .response_timeout(Duration::from_secs(3))
            .retries(4)
            .min_retry_wait(20)
            .max_retry_wait(400)
            .tcp_settings(nodelay())
    }
}

/// The connection every backend file uses: one Redis server (a
/// reconnecting [`ConnectionManager`]) or a Redis Cluster (the crate's
/// [`ClusterConnection`], which routes each command to the primary owning
/// its slot and follows `MOVED`/`ASK`). Cheap to clone (both are handles to
/// one multiplexed connection task). Pipelines run as one round trip on a
/// server; on a cluster, a pipeline whose commands live in different slots
/// is split into single commands sent concurrently (each still pipelined on
/// its node's multiplexed connection), and a transaction must stay in one
/// slot.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(Swappable),
}

/// A cluster connection that can be replaced under every clone of it.
///
/// The crate's cluster connection can stay stuck after a primary dies: it
/// refreshes its slot map only on a `MOVED`, so requests for the dead
/// primary's slots time out against the old address for as long as the
/// process lives (seen in about one failover in twenty-five). The registrar
/// puts a fresh connection in its place when the slot map changes or the
/// connection stops answering (see `sharded`); each request clones the
/// current one (a handle) and never holds the lock across an `.await`.
#[derive(Clone)]
pub(crate) struct Swappable {
    current: Arc<parking_lot::RwLock<ClusterConnection>>,
    /// A request failed in the client (timed out, lost its connection)
    /// since the registrar last looked (see `sharded`).
    troubled: Arc<std::sync::atomic::AtomicBool>,
}

impl Swappable {
    fn new(c: ClusterConnection) -> Self {
        Swappable {
            current: Arc::new(parking_lot::RwLock::new(c)),
            troubled: Arc::default(),
        }
    }

    /// The connection in use now.
    pub(crate) fn current(&self) -> ClusterConnection {
        self.current.read().clone()
    }

    /// Puts `c` in place of the current connection for every clone.
    pub(crate) fn replace(&self, c: ClusterConnection) {
        *self.current.write() = c;
        self.troubled
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a request met a timeout or a lost connection since the last
    /// call.
    pub(crate) fn take_trouble(&self) -> bool {
        self.troubled
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Notes the outcome of a request.
    fn note<T>(&self, r: &redis::RedisResult<T>) {
        // (See `Watch` for a request dropped before its outcome.)
        if let Err(e) = r {
            // No error code: not Redis's answer but the client's (a
            // timeout, a lost or refused connection, no connection for a
            // slot); a reply such as MOVED or WRONGTYPE is not trouble.
            if e.code().is_none() {
                self.troubled
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// One request on a [`Swappable`]: its outcome is noted when it ends, and
/// a request dropped before it ends (a caller's timeout gave up on it)
/// counts as trouble too.
/// Borrows the connection handle for the request's lifetime: nothing is
/// cloned per request but the connection itself.
struct Watch<'a>(Option<&'a Swappable>);

impl<'a> Watch<'a> {
    fn new(s: &'a Swappable) -> Self {
        Watch(Some(s))
    }

    fn done<T>(mut self, r: &redis::RedisResult<T>) {
        if let Some(s) = self.0.take() {
            s.note(r);
        }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.troubled.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(s) => {
                let (watch, mut c) = (Watch::new(s), s.current());
                async move {
                    let r = c.req_packed_command(cmd).await;
                    watch.done(&r);
                    r
                }
                .boxed()
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(s) => {
                let (watch, c) = (Watch::new(s), s.current());
                if pipeline.is_transaction() || pipeline.len() <= 1 {
                    let mut c = c;
                    return async move {
                        let r = c.req_packed_commands(pipeline, offset, count).await;
                        watch.done(&r);
                        r
                    }
                    .boxed();
                }
                async move {
                    let replies = join_all(pipeline.cmd_iter().map(|cmd| {
                        let mut c = c.clone();
                        async move { c.req_packed_command(cmd).await }
                    }))
                    .await;
                    let r = replies
                        .into_iter()
                        .skip(offset)
                        .take(count)
                        .collect::<redis::RedisResult<Vec<Value>>>();
                    watch.done(&r);
                    r
                }
                .boxed()
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.current().get_db(),
        }
    }
}

/// The Redis backend of one node; [`broker`], [`presence`] and [`inbox`]
/// implement the backend traits on it.
pub(crate) struct RedisBackend {
    conn: Conn,
    scripts: Arc<Scripts>,
    node_id: String,
    /// `<node>|<boot>`: the field of this node's connection reservations.
    incarnation: String,
    /// The live node incarnations, as last read (see [`leases`]).
    leases: Arc<leases::Leases>,
    /// Cluster mode: user channels are sharded (`SPUBLISH`).
    sharded: bool,
    /// `--presence-ttl` in ms: the expiry the reserve and release scripts
    /// give a user's reservation hash.
    presence_ttl_ms: String,
    cfg: InboxConfig,
    registrar: registrar::Handle,
}

/// Connects this node to Redis: checks the server, then starts the
/// registrar, which delivers the events this node receives to `local`.
pub(crate) async fn connect(cfg: &Config, url: &str, local: Local) -> Result<Backend> {
    // The URL may hold a password: errors name the address only.
    let target = Target::parse(url)?;
    let addr = target.describe();
    let unreachable =
        |e: RedisError| Error::Unavailable(format!("cannot reach Redis at {addr}: {e}"));
    let conn = match &target {
        Target::Standalone(client) => {
            let manager_cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(1000)))
                .set_response_timeout(Some(Duration::from_secs(3)))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(500));
            Conn::Single(
                ConnectionManager::new_with_config(client.clone(), manager_cfg)
                    .await
                    .map_err(unreachable)?,
            )
        }
        Target::Cluster(seeds) => Conn::Cluster(Swappable::new(
            Target::cluster_connection(seeds)
                .await
                .map_err(|e| match e {
                    Error::InvalidArgument(_) => e,
                    other => Error::Unavailable(format!("cannot reach Redis at {addr}: {other}")),
                })?,
        )),
    };
    check_version(&conn).await?;

    let sharded = target.sharded();
    let scripts = Arc::new(Scripts::new(sharded));
    let leases = Arc::new(leases::Leases::new(cfg.node_lease));
    let boot = format!("{:016x}", rand::random::<u64>());
    let (registrar, ready) = registrar::Registrar {
        target,
        conn: conn.clone(),
        scripts: scripts.clone(),
        leases: leases.clone(),
        local,
        node_id: cfg.node_id.clone(),
        boot: boot.clone(),
        started_ms: crate::protocol::now_ms(),
        lease: cfg.node_lease,
        presence_ttl: cfg.presence_ttl,
        departures: Default::default(),
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
        incarnation: keys::incarnation(&cfg.node_id, &boot),
        node_id: cfg.node_id.clone(),
        leases,
        sharded,
        presence_ttl_ms: cfg.presence_ttl.as_millis().to_string(),
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

/// TCP_NODELAY on every connection a client opens (commands and pub/sub,
/// standalone and cluster). redis-rs leaves Nagle's algorithm on by
/// default: a command written while an earlier one is still unacknowledged
/// would then wait for Redis's delayed ACK (40 ms on Linux) when no reply
/// carries the ACK back sooner.
fn nodelay() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// Refuses a server (or, on a cluster, the node asked) older than 7.0.
async fn check_version(conn: &Conn) -> Result<()> {
    let mut info = redis::cmd("INFO");
    info.arg("server");
    let info: String = match conn.clone() {
        Conn::Single(mut c) => info.query_async(&mut c).await?,
        Conn::Cluster(c) => {
            let v = c
                .current()
                .route_command(
                    info,
                    redis::cluster_routing::RoutingInfo::SingleNode(
                        redis::cluster_routing::SingleNodeRoutingInfo::Random,
                    ),
                )
                .await?;
            scripts::text(&v)?.to_string()
        }
    };
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
    Ok(())
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
            Some("LOADING")
                | Some("BUSY")
                | Some("MASTERDOWN")
                | Some("READONLY")
                // A cluster moving a slot or failing over, past the
                // client's retries.
                | Some("TRYAGAIN")
                | Some("CLUSTERDOWN")
                | Some("MOVED")
                | Some("ASK")
        ) || e.kind() == redis::ErrorKind::ClusterConnectionNotFound;
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
    use super::*;

    #[test]
    fn cluster_urls_name_their_seeds_and_never_show_a_password() {
        let t = Target::parse("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001/").unwrap();
        let Target::Cluster(seeds) = &t else {
            panic!("a cluster")
        };
        assert_eq!(
            seeds,
            &["redis://u:pw@10.0.0.1:7000", "redis://u:pw@10.0.0.2:7001"]
        );
        assert!(t.sharded());
        assert_eq!(t.describe(), "cluster 10.0.0.1:7000,10.0.0.2:7001");
        let t = Target::parse("redis+cluster://10.0.0.1:7000").unwrap();
        assert_eq!(t.describe(), "cluster 10.0.0.1:7000");
        for bad in [
            "redis+cluster://",
            "redis+cluster://pw@",
            "redis+cluster://,",
        ] {
            let e = Target::parse(bad).err().expect(bad).to_string();
            assert!(!e.contains("pw"), "{e}");
        }
        let t = Target::parse("redis://127.0.0.1:6379/0").unwrap();
        assert!(!t.sharded());
        assert!(Target::parse("nope://x").is_err());
    }

    #[test]
    fn every_redis_connection_has_tcp_nodelay() {
        let Target::Standalone(c) = Target::parse("redis://127.0.0.1:6379/0").unwrap() else {
            panic!("standalone")
        };
        assert!(c.get_connection_info().tcp_settings().nodelay());
    }
}
