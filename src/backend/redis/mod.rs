//! Redis-backed broker, presence and inbox: a cluster of nodes sharing one
//! Redis (7.0 or newer).
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
//! | `herald:{<user>}:ch` | channel | the user's live events | subscribed by nodes holding the user |
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
//! serializes subscribe/unsubscribe and presence writes, reading the hub's
//! current state when it acts, so concurrent connects and disconnects of
//! one user always converge. When the pub/sub connection drops it
//! reconnects with backoff, re-subscribes every local user, rewrites this
//! node's presence, and asks every local connection to catch up from the
//! inbox (what was published while it was away is not lost).

use super::{
    Backend, Broker, Cluster, Dispatch, Event, Inbox, NewMessage, NodeInfo, Presence, Replay,
};
use crate::config::{Config, InboxConfig};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::node::Node;
use crate::protocol::{self, Frame, MessageId};
use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Every Redis key and channel name Herald uses.
pub mod keys {
    pub const PREFIX: &str = "herald:";

    pub fn inbox(user: &str) -> String {
        format!("{PREFIX}{{{user}}}:inbox")
    }
    pub fn meta(user: &str) -> String {
        format!("{PREFIX}{{{user}}}:meta")
    }
    pub fn user_channel(user: &str) -> String {
        format!("{PREFIX}{{{user}}}:ch")
    }
    /// The user of a channel named by [`user_channel`].
    pub fn channel_user(channel: &str) -> Option<&str> {
        channel
            .strip_prefix(PREFIX)?
            .strip_prefix('{')?
            .strip_suffix("}:ch")
    }
    pub fn broadcast_channel() -> String {
        format!("{PREFIX}broadcast")
    }
    pub fn nodes() -> String {
        format!("{PREFIX}nodes")
    }
    /// Scripts build a node's conns key from these two parts around its id.
    pub fn node_conns_parts() -> (String, &'static str) {
        (format!("{PREFIX}node:"), ":conns")
    }
    pub fn node_conns(node: &str) -> String {
        let (a, b) = node_conns_parts();
        format!("{a}{node}{b}")
    }
}

/// Helpers shared by the inbox scripts.
const PRELUDE: &str = r#"
local function parse(id) local a, b = string.match(id, '^(%d+)-(%d+)$') return tonumber(a), tonumber(b) end
local function lt(x, y) local a1, b1 = parse(x) local a2, b2 = parse(y) return a1 < a2 or (a1 == a2 and b1 < b2) end
local function fmt(ms, seq) return string.format('%.0f-%.0f', ms, seq) end
-- Drops messages older than max_age and beyond max_len (oldest first), and
-- raises the floor to the newest id dropped: a resume from below the floor
-- is incomplete. (XINFO's max-deleted-entry-id does not count XTRIM.)
local function trim(inbox, meta, now, max_age, max_len)
  local gone = nil
  local old = redis.call('XREVRANGE', inbox, '(' .. fmt(math.max(now - max_age, 0), 0), '-', 'COUNT', 1)
  if #old > 0 then gone = old[1][1] end
  if max_len then
    local k = redis.call('XLEN', inbox) - tonumber(max_len)
    if k > 0 then
      local e = redis.call('XRANGE', inbox, '-', '+', 'COUNT', k)
      local id = e[#e][1]
      if (not gone) or lt(gone, id) then gone = id end
    end
  end
  if gone then
    local ms, seq = parse(gone)
    redis.call('XTRIM', inbox, 'MINID', fmt(ms, seq + 1))
    local floor = redis.call('HGET', meta, 'floor')
    if (not floor) or lt(floor, gone) then redis.call('HSET', meta, 'floor', gone) end
  end
end
local function unread(inbox, meta)
  local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
  local rn = tonumber(redis.call('HGET', meta, 'rn') or '0')
  local len = redis.call('XLEN', inbox)
  return seq - math.max(rn, seq - len)
end
local function ensure(meta, now)
  if redis.call('EXISTS', meta) == 0 then
    local mark = fmt(now, 0)
    redis.call('HSET', meta, 'floor', mark, 'last', mark, 'seq', 0, 'rn', 0, 'rid', '0-0')
  end
end
"#;

/// KEYS: inbox, meta. ARGV: now, frame head, frame tail, max_len, max_age,
/// ttl, channel. Assigns the id, stores, trims, publishes. Returns {id,
/// number of nodes that received the publish}.
const APPEND: &str = r#"
local now = tonumber(ARGV[1])
ensure(KEYS[2], now)
local lms, lseq = parse(redis.call('HGET', KEYS[2], 'last'))
local id
if now > lms then id = fmt(now, 0) else id = fmt(lms, lseq + 1) end
local frame = ARGV[2] .. id .. ARGV[3]
local n = redis.call('HINCRBY', KEYS[2], 'seq', 1)
redis.call('XADD', KEYS[1], id, 'n', n, 'f', frame)
redis.call('HSET', KEYS[2], 'last', id)
trim(KEYS[1], KEYS[2], now, tonumber(ARGV[5]), ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local receivers = redis.call('PUBLISH', ARGV[7], 'm' .. id .. ' ' .. frame)
return {id, receivers}
"#;

/// KEYS: inbox, meta. ARGV: now, max_age, since ('' for none), limit, ttl.
/// Returns {unread, resumed (-1 none, 0, 1), head, id1, frame1, ...}.
const REPLAY: &str = r#"
local now = tonumber(ARGV[1])
ensure(KEYS[2], now)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
trim(KEYS[1], KEYS[2], now, tonumber(ARGV[2]), nil)
local count = unread(KEYS[1], KEYS[2])
local last = redis.call('HGET', KEYS[2], 'last')
local resumed = -1
local entries = {}
if ARGV[3] ~= '' then
  if lt(ARGV[3], redis.call('HGET', KEYS[2], 'floor')) then resumed = 0 else resumed = 1 end
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[3], '+')
elseif tonumber(ARGV[4]) > 0 then
  local rev = redis.call('XREVRANGE', KEYS[1], '+', '(' .. redis.call('HGET', KEYS[2], 'rid'), 'COUNT', ARGV[4])
  for i = #rev, 1, -1 do entries[#entries + 1] = rev[i] end
end
local out = {count, resumed, last}
for _, e in ipairs(entries) do
  out[#out + 1] = e[1]
  out[#out + 1] = e[2][4]
end
return out
"#;

/// KEYS: inbox, meta. ARGV: now, max_age.
const UNREAD: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
trim(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), nil)
return unread(KEYS[1], KEYS[2])
"#;

/// KEYS: inbox, meta. ARGV: now, max_age, up_to ('' for all).
/// Returns {unread, changed (0/1)}.
const MARK_READ: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, 0} end
trim(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), nil)
local before = unread(KEYS[1], KEYS[2])
local last = redis.call('HGET', KEYS[2], 'last')
local target = ARGV[3]
if target == '' or lt(last, target) then target = last end
if not lt(redis.call('HGET', KEYS[2], 'rid'), target) then return {before, 0} end
local e = redis.call('XREVRANGE', KEYS[1], target, '-', 'COUNT', 1)
if #e > 0 then
  local n = tonumber(e[1][2][2])
  if n > tonumber(redis.call('HGET', KEYS[2], 'rn')) then redis.call('HSET', KEYS[2], 'rn', n) end
end
redis.call('HSET', KEYS[2], 'rid', target)
local after = unread(KEYS[1], KEYS[2])
if after ~= before then return {after, 1} end
return {after, 0}
"#;

/// KEYS: nodes. ARGV: conns prefix, conns suffix, user... Connections per
/// user summed over nodes whose lease is live (Redis clock).
const LOOKUP: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local counts = {}
for i = 3, #ARGV do counts[i - 2] = 0 end
if #ARGV < 3 then return counts end
for _, node in ipairs(live) do
  local vals = redis.call('HMGET', ARGV[1] .. node .. ARGV[2], unpack(ARGV, 3))
  for i, v in ipairs(vals) do if v then counts[i] = counts[i] + tonumber(v) end end
end
return counts
"#;

/// KEYS: nodes. ARGV: conns prefix, conns suffix. Returns {online users,
/// node, connections, users, node, ...} over live nodes, from the nodes'
/// presence hashes (exact, O(online users): an ops call).
const CLUSTER: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local seen, online, out = {}, 0, {0}
for _, node in ipairs(live) do
  local kv = redis.call('HGETALL', ARGV[1] .. node .. ARGV[2])
  local conns = 0
  for i = 1, #kv, 2 do
    conns = conns + tonumber(kv[i + 1])
    if not seen[kv[i]] then seen[kv[i]] = true online = online + 1 end
  end
  out[#out + 1] = node
  out[#out + 1] = conns
  out[#out + 1] = #kv / 2
end
out[1] = online
return out
"#;

/// KEYS: nodes, this node's conns. ARGV: node id, lease ms. Renews the
/// lease (Redis clock) and forgets nodes dead for a minute.
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
redis.call('PEXPIRE', KEYS[2], lease * 3)
return now
"#;

/// A Lua script with the prelude, and its SHA1 for EVALSHA.
struct Script {
    inner: redis::Script,
}

impl Script {
    fn new(body: &str, prelude: bool) -> Script {
        let code = if prelude {
            format!("{PRELUDE}\n{body}")
        } else {
            body.to_string()
        };
        Script {
            inner: redis::Script::new(&code),
        }
    }
    /// An EVALSHA command, for pipelines.
    fn cmd(&self, keys: &[&str], args: &[&[u8]]) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(self.inner.get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        c
    }
}

struct Scripts {
    append: Script,
    replay: Script,
    unread: Script,
    mark_read: Script,
    lookup: Script,
    cluster: Script,
    renew: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            append: Script::new(APPEND, true),
            replay: Script::new(REPLAY, true),
            unread: Script::new(UNREAD, true),
            mark_read: Script::new(MARK_READ, true),
            lookup: Script::new(LOOKUP, false),
            cluster: Script::new(CLUSTER, false),
            renew: Script::new(RENEW, false),
        }
    }
    fn all(&self) -> [&Script; 7] {
        [
            &self.append,
            &self.replay,
            &self.unread,
            &self.mark_read,
            &self.lookup,
            &self.cluster,
            &self.renew,
        ]
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

fn is_noscript(e: &RedisError) -> bool {
    e.code() == Some("NOSCRIPT")
}

/// Runs a pipeline of script calls; if Redis has lost the scripts (a
/// restart), loads them all once and retries.
async fn eval(
    conn: &mut ConnectionManager,
    scripts: &Scripts,
    pipe: &redis::Pipeline,
) -> Result<Vec<Value>> {
    match pipe.query_async::<Vec<Value>>(conn).await {
        Err(e) if is_noscript(&e) => {
            for s in scripts.all() {
                s.inner.prepare_invoke().load_async(conn).await?;
            }
            Ok(pipe.query_async(conn).await?)
        }
        other => Ok(other?),
    }
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(v)),
        _ => Err(bad(v)),
    }
}

fn string(v: &Value) -> Result<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| bad(v)),
        Value::SimpleString(s) => Ok(s.clone()),
        _ => Err(bad(v)),
    }
}

fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(bad(&other)),
    }
}

fn bad(v: &Value) -> Error {
    Error::Backend(format!(
        "unexpected reply from Redis: {:.200}",
        format!("{v:?}")
    ))
}

fn msg_id(v: &Value) -> Result<MessageId> {
    string(v)?
        .parse()
        .map_err(|e: protocol::BadMessageId| Error::Backend(e.to_string()))
}

/// What the registrar is asked to do.
enum Request {
    /// Make subscription and presence of `user` match the hub.
    Sync {
        user: String,
        ack: Option<oneshot::Sender<Result<()>>>,
    },
}

pub struct RedisBackend {
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    node_id: String,
    cfg: InboxConfig,
    registrar: mpsc::UnboundedSender<Request>,
}

/// Builds a node on Redis: checks the server, then starts the registrar.
pub async fn node(cfg: Config, url: &str) -> Result<Arc<Node>> {
    let client = redis::Client::open(url)
        .map_err(|e| Error::invalid(format!("--redis-url {url:?}: {e}")))?;
    let manager_cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(1000)))
        .set_response_timeout(Some(Duration::from_secs(3)))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    let mut conn = ConnectionManager::new_with_config(client.clone(), manager_cfg)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach Redis at {url}: {e}")))?;
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

    let hub = Hub::new(&cfg.node_id);
    let scripts = Arc::new(Scripts::new());
    let (tx, rx) = mpsc::unbounded_channel();
    let backend = Arc::new(RedisBackend {
        conn: conn.clone(),
        scripts: scripts.clone(),
        node_id: cfg.node_id.clone(),
        cfg: cfg.inbox.clone(),
        registrar: tx,
    });
    let registrar = Registrar {
        client,
        conn,
        scripts,
        hub: hub.clone(),
        node_id: cfg.node_id.clone(),
        lease: cfg.node_lease,
        subscribed: HashSet::new(),
    };
    let ready = registrar.spawn(rx);
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
    let backend = Backend {
        broker: backend.clone(),
        presence: backend.clone(),
        inbox: backend,
    };
    Ok(Node::new(cfg, hub, backend))
}

impl RedisBackend {
    fn ttl_ms(&self) -> u64 {
        (self.cfg.max_age.as_millis() as u64).max(1000)
    }

    fn max_age_ms(&self) -> u64 {
        self.cfg.max_age.as_millis() as u64
    }

    /// Runs a pipeline of script calls (see [`eval`]).
    async fn run(&self, cmds: Vec<redis::Cmd>) -> Result<Vec<Value>> {
        let mut pipe = redis::pipe();
        for c in cmds {
            pipe.add_command(c);
        }
        eval(&mut self.conn.clone(), &self.scripts, &pipe).await
    }

    async fn run_one(&self, cmd: redis::Cmd) -> Result<Value> {
        self.run(vec![cmd])
            .await?
            .pop()
            .ok_or_else(|| Error::Backend("empty pipeline reply".into()))
    }

    /// Asks the registrar to sync `user` and waits for it.
    async fn sync(&self, user: &str) -> Result<()> {
        let (ack, done) = oneshot::channel();
        self.registrar
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
}

#[async_trait]
impl Broker for RedisBackend {
    async fn subscribe(&self, user: &str) -> Result<()> {
        self.sync(user).await
    }

    async fn unsubscribe(&self, user: &str) -> Result<()> {
        let _ = self.registrar.send(Request::Sync {
            user: user.to_string(),
            ack: None,
        });
        Ok(())
    }

    async fn publish(&self, events: Vec<Event>) -> Result<Vec<bool>> {
        let mut pipe = redis::pipe();
        for e in events {
            let (user, payload) = match e {
                Event::Message { user, frame, .. } => (user, format!("M{}", frame.as_str())),
                Event::Unread { user, count } => (user, format!("u{count}")),
                Event::Disconnect { user, reason } => (user, format!("d{reason}")),
                Event::Broadcast { frame } => {
                    pipe.cmd("PUBLISH")
                        .arg(keys::broadcast_channel())
                        .arg(frame.as_str());
                    continue;
                }
            };
            pipe.cmd("PUBLISH")
                .arg(keys::user_channel(&user))
                .arg(payload);
        }
        let mut conn = self.conn.clone();
        // PUBLISH answers with the number of subscribed nodes.
        let receivers: Vec<i64> = pipe.query_async(&mut conn).await?;
        Ok(receivers.into_iter().map(|n| n > 0).collect())
    }

    async fn broadcast(&self, frame: Frame) -> Result<()> {
        self.publish(vec![Event::Broadcast { frame }])
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Presence for RedisBackend {
    async fn connected(&self, user: &str) -> Result<()> {
        // The registrar writes this node's count for the user; waiting for
        // it makes IsOnline true as soon as the welcome frame is out.
        self.sync(user).await
    }

    async fn disconnected(&self, user: &str) -> Result<()> {
        let _ = self.registrar.send(Request::Sync {
            user: user.to_string(),
            ack: None,
        });
        Ok(())
    }

    async fn lookup(&self, users: &[String]) -> Result<Vec<u32>> {
        let (a, b) = keys::node_conns_parts();
        let mut args: Vec<&[u8]> = vec![a.as_bytes(), b.as_bytes()];
        args.extend(users.iter().map(|u| u.as_bytes()));
        let v = self
            .run_one(self.scripts.lookup.cmd(&[&keys::nodes()], &args))
            .await?;
        array(v)?
            .iter()
            .map(|c| int(c).map(|n| n.max(0) as u32))
            .collect()
    }

    async fn cluster(&self) -> Result<Cluster> {
        let (a, b) = keys::node_conns_parts();
        let args: [&[u8]; 2] = [a.as_bytes(), b.as_bytes()];
        let v = array(
            self.run_one(self.scripts.cluster.cmd(&[&keys::nodes()], &args))
                .await?,
        )?;
        let online_users = int(v.first().ok_or_else(|| bad(&Value::Nil))?)? as u64;
        let nodes = v[1..]
            .chunks(3)
            .map(|c| {
                Ok(NodeInfo {
                    node_id: string(&c[0])?,
                    connections: int(c.get(1).unwrap_or(&Value::Nil))? as u64,
                    users: int(c.get(2).unwrap_or(&Value::Nil))? as u64,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Cluster {
            nodes,
            online_users,
        })
    }

    async fn leave(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .cmd("ZREM")
            .arg(keys::nodes())
            .arg(&self.node_id)
            .ignore()
            .cmd("DEL")
            .arg(keys::node_conns(&self.node_id))
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Inbox for RedisBackend {
    async fn append(
        &self,
        users: &[String],
        msg: NewMessage<'_>,
    ) -> Result<Vec<(MessageId, bool)>> {
        // The frame around the id: the script puts the id it assigns between.
        let (head, tail) =
            protocol::message_frame_parts(msg.topic, msg.payload_json, msg.ts, false);
        let now = msg.ts.to_string();
        let max_len = self.cfg.max_messages.to_string();
        let max_age = self.max_age_ms().to_string();
        let ttl = self.ttl_ms().to_string();
        let cmds = users
            .iter()
            .map(|u| {
                let (inbox, meta, ch) = (keys::inbox(u), keys::meta(u), keys::user_channel(u));
                self.scripts.append.cmd(
                    &[&inbox, &meta],
                    &[
                        now.as_bytes(),
                        head.as_bytes(),
                        tail.as_bytes(),
                        max_len.as_bytes(),
                        max_age.as_bytes(),
                        ttl.as_bytes(),
                        ch.as_bytes(),
                    ],
                )
            })
            .collect();
        self.run(cmds)
            .await?
            .into_iter()
            .map(|v| {
                let v = array(v)?;
                match v.as_slice() {
                    [id, receivers] => Ok((msg_id(id)?, int(receivers)? > 0)),
                    _ => Err(bad(&Value::Array(v))),
                }
            })
            .collect()
    }

    async fn unread(&self, user: &str) -> Result<u64> {
        let now = protocol::now_ms().to_string();
        let max_age = self.max_age_ms().to_string();
        let v = self
            .run_one(self.scripts.unread.cmd(
                &[&keys::inbox(user), &keys::meta(user)],
                &[now.as_bytes(), max_age.as_bytes()],
            ))
            .await?;
        Ok(int(&v)?.max(0) as u64)
    }

    async fn replay(&self, user: &str, since: Option<MessageId>, limit: usize) -> Result<Replay> {
        let now = protocol::now_ms().to_string();
        let max_age = self.max_age_ms().to_string();
        let since = since.map(|s| s.to_string()).unwrap_or_default();
        let limit = limit.to_string();
        let ttl = self.ttl_ms().to_string();
        let v = self
            .run_one(self.scripts.replay.cmd(
                &[&keys::inbox(user), &keys::meta(user)],
                &[
                    now.as_bytes(),
                    max_age.as_bytes(),
                    since.as_bytes(),
                    limit.as_bytes(),
                    ttl.as_bytes(),
                ],
            ))
            .await?;
        let v = array(v)?;
        if v.len() < 3 {
            return Err(bad(&Value::Array(v)));
        }
        let mut messages = Vec::with_capacity((v.len() - 3) / 2);
        for pair in v[3..].chunks(2) {
            let id = msg_id(&pair[0])?;
            let frame = match pair.get(1) {
                Some(Value::BulkString(b)) => {
                    Frame::try_from(bytes::Bytes::copy_from_slice(b)).map_err(|_| bad(&pair[1]))?
                }
                other => return Err(bad(other.unwrap_or(&Value::Nil))),
            };
            messages.push((id, frame));
        }
        Ok(Replay {
            unread: int(&v[0])?.max(0) as u64,
            resumed: match int(&v[1])? {
                0 => Some(false),
                1 => Some(true),
                _ => None,
            },
            head: msg_id(&v[2])?,
            messages,
        })
    }

    async fn mark_read(&self, user: &str, up_to: Option<MessageId>) -> Result<(u64, bool)> {
        let now = protocol::now_ms().to_string();
        let max_age = self.max_age_ms().to_string();
        let up_to = up_to.map(|s| s.to_string()).unwrap_or_default();
        let v = self
            .run_one(self.scripts.mark_read.cmd(
                &[&keys::inbox(user), &keys::meta(user)],
                &[now.as_bytes(), max_age.as_bytes(), up_to.as_bytes()],
            ))
            .await?;
        let v = array(v)?;
        Ok((
            int(v.first().unwrap_or(&Value::Nil))?.max(0) as u64,
            int(v.get(1).unwrap_or(&Value::Nil))? == 1,
        ))
    }
}

/// The task that owns this node's pub/sub connection and presence record.
struct Registrar {
    client: redis::Client,
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    hub: Arc<Hub>,
    node_id: String,
    lease: Duration,
    /// Users whose channel this node is subscribed to right now.
    subscribed: HashSet<String>,
}

/// Turns a pub/sub message into an event for the hub.
fn decode(broadcast_channel: &str, channel: &str, payload: &[u8]) -> Option<Event> {
    let text = std::str::from_utf8(payload).ok()?;
    if channel == broadcast_channel {
        return Some(Event::Broadcast {
            frame: Frame::from(text),
        });
    }
    let user: Arc<str> = Arc::from(keys::channel_user(channel)?);
    let (kind, rest) = text.split_at_checked(1)?;
    Some(match kind {
        "m" => {
            let (id, frame) = rest.split_once(' ')?;
            Event::Message {
                user,
                id: Some(id.parse().ok()?),
                frame: Frame::from(frame),
            }
        }
        "M" => Event::Message {
            user,
            id: None,
            frame: Frame::from(rest),
        },
        "u" => Event::Unread {
            user,
            count: rest.parse().ok()?,
        },
        "d" => Event::Disconnect {
            user,
            reason: Arc::from(rest),
        },
        _ => return None,
    })
}

impl Registrar {
    /// Starts the task; the returned channel reports the first connection.
    fn spawn(self, rx: mpsc::UnboundedReceiver<Request>) -> oneshot::Receiver<Result<()>> {
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(self.run(rx, ready_tx));
        ready_rx
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Request>,
        ready: oneshot::Sender<Result<()>>,
    ) {
        let mut ready = Some(ready);
        let mut backoff = Duration::from_millis(100);
        let broadcast_channel = keys::broadcast_channel();
        let mut renew = tokio::time::interval(self.lease / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let connected = async {
                let pubsub =
                    tokio::time::timeout(Duration::from_secs(2), self.client.get_async_pubsub())
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
            let restored = self.restore(&mut sink).await;
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
                        users = self.subscribed.len(),
                        "Redis pub/sub restored; connections catch up from their inboxes"
                    );
                    metrics::counter!("herald_redis_reconnects_total").increment(1);
                    self.hub.resync_all();
                }
            }
            // Serve until the pub/sub connection drops.
            loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(m) => {
                            if let Some(e) = decode(&broadcast_channel, m.get_channel_name(), m.get_payload_bytes()) {
                                self.hub.dispatch(e);
                            }
                        }
                        None => {
                            tracing::warn!("Redis pub/sub connection lost");
                            break;
                        }
                    },
                    req = rx.recv() => {
                        let Some(first) = req else { return };
                        let mut batch = vec![first];
                        while batch.len() < 1024 {
                            match rx.try_recv() {
                                Ok(r) => batch.push(r),
                                Err(_) => break,
                            }
                        }
                        if let Err(e) = self.process(&mut sink, batch).await {
                            tracing::warn!(error = %e, "subscription sync failed");
                        }
                    }
                    _ = renew.tick() => {
                        if let Err(e) = self.renew().await {
                            tracing::warn!(error = %e, "node lease renewal failed");
                        }
                    }
                }
            }
        }
    }

    /// After (re)connecting: subscribe to broadcasts and every local user,
    /// rewrite this node's presence from the hub, renew the lease.
    async fn restore(&mut self, sink: &mut redis::aio::PubSubSink) -> Result<()> {
        self.subscribed.clear();
        sink.subscribe(keys::broadcast_channel()).await?;
        let users = self.hub.users_snapshot();
        for chunk in users.chunks(1000) {
            let channels: Vec<String> = chunk.iter().map(|u| keys::user_channel(u)).collect();
            sink.subscribe(channels).await?;
            self.subscribed.extend(chunk.iter().cloned());
        }
        let counts = self.hub.local_counts(&users);
        let conns = keys::node_conns(&self.node_id);
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
        self.renew().await
    }

    async fn renew(&self) -> Result<()> {
        let (nodes, conns) = (keys::nodes(), keys::node_conns(&self.node_id));
        let lease = self.lease.as_millis().to_string();
        let mut pipe = redis::pipe();
        pipe.add_command(self.scripts.renew.cmd(
            &[&nodes, &conns],
            &[self.node_id.as_bytes(), lease.as_bytes()],
        ));
        eval(&mut self.conn.clone(), &self.scripts, &pipe).await?;
        Ok(())
    }

    /// Makes subscriptions and presence of the batch's users match the hub
    /// as it is now, then acknowledges.
    async fn process(
        &mut self,
        sink: &mut redis::aio::PubSubSink,
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
        let counts = self.hub.local_counts(&users);
        let (mut sub, mut unsub) = (vec![], vec![]);
        for (u, n) in users.iter().zip(&counts) {
            match (*n > 0, self.subscribed.contains(u)) {
                (true, false) => sub.push(u.clone()),
                (false, true) => unsub.push(u.clone()),
                _ => {}
            }
        }
        let result = async {
            if !sub.is_empty() {
                sink.subscribe(
                    sub.iter()
                        .map(|u| keys::user_channel(u))
                        .collect::<Vec<_>>(),
                )
                .await?;
                self.subscribed.extend(sub);
            }
            if !unsub.is_empty() {
                sink.unsubscribe(
                    unsub
                        .iter()
                        .map(|u| keys::user_channel(u))
                        .collect::<Vec<_>>(),
                )
                .await?;
                for u in &unsub {
                    self.subscribed.remove(u);
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
