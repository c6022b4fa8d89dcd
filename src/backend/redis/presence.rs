//! [`Presence`] on Redis. Every read and write touches one key (one slot on
//! a cluster):
//!
//! * a user's reservation hash `herald:{<user>}:conns` (`<node>|<boot>` ->
//!   connections), written by `scripts/reserve.lua` and
//!   `scripts/release.lua`, is what `IsOnline` reads: one `HGETALL` per
//!   user, pipelined, counting the incarnations the lease cache
//!   ([`super::leases`]) holds live. Each write gives the hash the
//!   expiry `--presence-ttl`, and the registrar of every node holding the
//!   user refreshes it well within that time (see [`super::registrar`]),
//!   so the entries a crashed node left for users who never come back go
//!   with the hash;
//! * each node keeps a hash of its users' connection counts (written by the
//!   registrar) and a lease in the nodes sorted set; `Stats` reads the live
//!   nodes' hashes.

use super::leases::State;
use super::scripts::{array, int, nth, parse, text};
use super::{keys, RedisBackend};
use crate::backend::{Cluster, NodeInfo, Presence};
use crate::error::Result;
use async_trait::async_trait;
use redis::Value;
use std::collections::HashSet;

impl RedisBackend {
    /// Deletes the reservations of `fields` of `user` that a fresh read of
    /// the leases shows dead (a restarted or long-gone node).
    async fn forget_dead(&self, user: &str, fields: &[String]) -> Result<()> {
        self.leases.refresh(&self.conn, &self.scripts).await?;
        let dead: Vec<&String> = fields
            .iter()
            .filter(|f| self.leases.state_fresh(f) == State::Dead)
            .collect();
        if !dead.is_empty() {
            redis::cmd("HDEL")
                .arg(keys::user_conns(user))
                .arg(dead)
                .query_async::<()>(&mut self.conn.clone())
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Presence for RedisBackend {
    async fn reserve(&self, user: &str, cap: u32) -> Result<std::result::Result<(), u32>> {
        let cap = cap.to_string();
        let key = keys::user_conns(user);
        let mut attempt = 0;
        loop {
            let (mut live, mut lapsed) = self.leases.live_and_lapsed();
            if !lapsed.is_empty() {
                // A lease the cache saw run out may have been renewed since
                // (the cache is as old as this node's last renewal): only a
                // fresh read may leave an incarnation uncounted.
                self.leases
                    .refresh_if_old(&self.conn, &self.scripts)
                    .await?;
                (live, lapsed) = self.leases.live_and_lapsed();
            }
            let n = live.len().to_string();
            let mut args: Vec<&[u8]> = vec![
                self.incarnation.as_bytes(),
                cap.as_bytes(),
                self.presence_ttl_ms.as_bytes(),
                n.as_bytes(),
            ];
            args.extend(live.iter().map(|f| f.as_bytes()));
            args.extend(lapsed.iter().map(|f| f.as_bytes()));
            let v = array(
                self.run_one(self.scripts.reserve.cmd(&[&key], &args))
                    .await?,
            )?;
            let reserved = int(nth(&v, 0))? == 1;
            let count = int(nth(&v, 1))?.max(0) as u32;
            let unnamed = v
                .get(2..)
                .unwrap_or_default()
                .iter()
                .map(|f| text(f).map(str::to_string))
                .collect::<Result<Vec<_>>>()?;
            if !unnamed.is_empty() {
                // Incarnations the cache did not know: a node that just
                // started (counted, rightly), or one dead or restarted
                // (deleted now; a refused reserve is then tried again).
                self.forget_dead(user, &unnamed).await?;
                if !reserved && attempt == 0 {
                    attempt += 1;
                    continue;
                }
            }
            return Ok(if reserved { Ok(()) } else { Err(count) });
        }
    }

    async fn release(&self, user: &str) -> Result<()> {
        self.run_one(self.scripts.release.cmd(
            &[&keys::user_conns(user)],
            &[self.incarnation.as_bytes(), self.presence_ttl_ms.as_bytes()],
        ))
        .await?;
        Ok(())
    }

    async fn connected(&self, user: &str) -> Result<()> {
        // The registrar writes this node's count for the user (Stats).
        self.registrar.sync(user).await
    }

    async fn disconnected(&self, user: &str) -> Result<()> {
        self.registrar.departed(user);
        Ok(())
    }

    async fn lookup(&self, users: &[String]) -> Result<Vec<u32>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for u in users {
            pipe.cmd("HGETALL").arg(keys::user_conns(u));
        }
        let asked = std::time::Instant::now();
        let hashes: Vec<Vec<(String, i64)>> = pipe.query_async(&mut self.conn.clone()).await?;
        let unsure = hashes
            .iter()
            .flatten()
            .any(|(f, _)| self.leases.state(f).is_none());
        if unsure {
            self.leases
                .refresh_since(asked, &self.conn, &self.scripts)
                .await?;
        }
        Ok(hashes
            .iter()
            .map(|h| {
                h.iter()
                    .filter(|(f, _)| {
                        let s = if unsure {
                            self.leases.state_fresh(f)
                        } else {
                            self.leases.state(f).unwrap_or(State::Dead)
                        };
                        s == State::Live
                    })
                    .map(|(_, n)| (*n).max(0) as u32)
                    .sum()
            })
            .collect())
    }

    async fn cluster(&self) -> Result<Cluster> {
        self.leases.refresh(&self.conn, &self.scripts).await?;
        let live = self.leases.live_nodes();
        if live.is_empty() {
            return Ok(Cluster::default());
        }
        let mut pipe = redis::pipe();
        for node in &live {
            pipe.cmd("HGETALL").arg(keys::node_conns(node));
            pipe.cmd("HMGET")
                .arg(keys::node_stats(node))
                .arg("started")
                .arg("delivered")
                .arg("events");
        }
        let replies: Vec<Value> = pipe.query_async(&mut self.conn.clone()).await?;
        let now = crate::protocol::now_ms();
        let mut online = HashSet::new();
        let mut nodes = Vec::with_capacity(live.len());
        for (node, pair) in live.into_iter().zip(replies.chunks(2)) {
            let conns: Vec<(String, i64)> = parse(nth(pair, 0).clone())?;
            let stats: Vec<Option<u64>> = parse(nth(pair, 1).clone())?;
            let stat = |i: usize| stats.get(i).copied().flatten().unwrap_or(0);
            let started = stat(0);
            nodes.push(NodeInfo {
                node_id: node,
                connections: conns.iter().map(|(_, n)| (*n).max(0) as u64).sum(),
                users: conns.len() as u64,
                uptime_seconds: if started == 0 {
                    0
                } else {
                    now.saturating_sub(started) / 1000
                },
                messages_delivered: stat(1),
                broker_events_received: stat(2),
            });
            online.extend(conns.into_iter().map(|(u, _)| u));
        }
        Ok(Cluster {
            nodes,
            online_users: online.len() as u64,
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
            .cmd("DEL")
            .arg(keys::node_stats(&self.node_id))
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }
}
