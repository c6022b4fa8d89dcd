//! [`Idempotency`] on Redis for live-only sends: one string per record,
//! written with `SET NX GET PX` (check and record in one atomic command),
//! pipelined for many users. Stored sends keep their records in the inbox
//! script instead (`scripts/append.lua`), atomically with the message.

use super::{keys, RedisBackend};
use crate::backend::{conflicts, read_claim, Claim, ClaimScope, IdemKey, Idempotency};
use crate::error::Result;
use async_trait::async_trait;

#[async_trait]
impl Idempotency for RedisBackend {
    async fn first_conflict(&self, users: &[String], key: IdemKey<'_>) -> Result<Option<usize>> {
        let mut pipe = redis::pipe();
        for u in users {
            pipe.cmd("GET").arg(keys::idem_stored(u, key.key));
            pipe.cmd("GET").arg(keys::idem_transient(u, key.key));
        }
        let seen: Vec<Option<String>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(seen
            .chunks(2)
            .position(|r| r.iter().flatten().any(|r| conflicts(r, key.fingerprint))))
    }

    async fn claim(
        &self,
        scopes: &[ClaimScope<'_>],
        key: IdemKey<'_>,
        id: &str,
    ) -> Result<Vec<Claim>> {
        let record = format!("{id} {}", key.fingerprint);
        let window = (key.window.as_millis() as u64).max(1);
        let mut pipe = redis::pipe();
        for scope in scopes {
            let name = match scope {
                ClaimScope::User(u) => keys::idem_transient(u, key.key),
                ClaimScope::Broadcast => keys::idem_broadcast(key.key),
            };
            pipe.cmd("SET")
                .arg(name)
                .arg(&record)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(window);
        }
        let seen: Vec<Option<String>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(seen
            .into_iter()
            .map(|s| match s {
                None => Claim::New,
                Some(r) => read_claim(&r, key.fingerprint),
            })
            .collect())
    }
}
