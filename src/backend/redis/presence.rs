//! [`Presence`] on Redis: each node keeps a hash of its users' connection
//! counts (written by the registrar) and a lease in the nodes sorted set;
//! lookups sum the hashes of live nodes in a script.

use super::scripts::{array, bad, int, nth, text};
use super::{keys, RedisBackend};
use crate::backend::{Cluster, NodeInfo, Presence};
use crate::error::Result;
use async_trait::async_trait;
use redis::Value;

#[async_trait]
impl Presence for RedisBackend {
    async fn reserve(&self, user: &str, cap: u32) -> Result<std::result::Result<(), u32>> {
        let cap = cap.to_string();
        let v = self
            .run_one(self.scripts.reserve.cmd(
                &[&keys::user_conns(user), &keys::nodes(), &keys::boots()],
                &[self.incarnation.as_bytes(), cap.as_bytes()],
            ))
            .await?;
        let v = array(v)?;
        let count = int(nth(&v, 1))?.max(0) as u32;
        Ok(if int(nth(&v, 0))? == 1 {
            Ok(())
        } else {
            Err(count)
        })
    }

    async fn release(&self, user: &str) -> Result<()> {
        self.run_one(
            self.scripts
                .release
                .cmd(&[&keys::user_conns(user)], &[self.incarnation.as_bytes()]),
        )
        .await?;
        Ok(())
    }

    async fn connected(&self, user: &str) -> Result<()> {
        // The registrar writes this node's count for the user; waiting for
        // it makes IsOnline true as soon as the welcome frame is out.
        self.registrar.sync(user).await
    }

    async fn disconnected(&self, user: &str) -> Result<()> {
        self.registrar.sync_later(user);
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
        let args: [&[u8]; 3] = [
            a.as_bytes(),
            b.as_bytes(),
            keys::NODE_STATS_SUFFIX.as_bytes(),
        ];
        let v = array(
            self.run_one(self.scripts.cluster.cmd(&[&keys::nodes()], &args))
                .await?,
        )?;
        let online_users = int(v.first().ok_or_else(|| bad(&Value::Nil))?)? as u64;
        let now = crate::protocol::now_ms();
        let nodes = v[1..]
            .chunks(6)
            .map(|c| {
                let started = int(nth(c, 3))?.max(0) as u64;
                Ok(NodeInfo {
                    node_id: text(&c[0])?.to_string(),
                    connections: int(nth(c, 1))? as u64,
                    users: int(nth(c, 2))? as u64,
                    uptime_seconds: if started == 0 {
                        0
                    } else {
                        now.saturating_sub(started) / 1000
                    },
                    messages_delivered: int(nth(c, 4))?.max(0) as u64,
                    broker_events_received: int(nth(c, 5))?.max(0) as u64,
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
            .arg(keys::node_stats(&self.node_id))
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }
}
