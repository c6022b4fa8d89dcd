//! [`Idempotency`] in the embedded backend: records in sharded maps, swept
//! by the backend's background task.

use super::MemoryBackend;
use crate::backend::{Claim, ClaimScope, IdemKey, Idempotency};
use crate::error::Result;
use crate::protocol;
use async_trait::async_trait;

/// An idempotency record: what the first call with a key did.
pub(super) struct Record {
    pub(super) id: String,
    pub(super) online: bool,
    pub(super) fingerprint: Box<str>,
    /// Unix ms after which the record is gone.
    pub(super) expires: u64,
}

/// Where a record lives: `s` stored send, `t` transient send, `b`
/// broadcast; then the user (if any) and the key.
pub(super) fn record_key(kind: char, user: &str, key: &str) -> String {
    format!("{kind}\0{user}\0{key}")
}

#[async_trait]
impl Idempotency for MemoryBackend {
    async fn claim(
        &self,
        scopes: &[ClaimScope<'_>],
        key: IdemKey<'_>,
        id: &str,
    ) -> Result<Vec<Claim>> {
        let now = protocol::now_ms();
        Ok(scopes
            .iter()
            .map(|scope| {
                let rkey = match scope {
                    ClaimScope::User(u) => record_key('t', u, key.key),
                    ClaimScope::Broadcast => record_key('b', "", key.key),
                };
                // Check and record under one lock: two concurrent claims of
                // a key cannot both be new.
                let mut shard = self.records(&rkey).lock();
                match shard.get(&rkey).filter(|r| r.expires > now) {
                    Some(r) if r.fingerprint.as_ref() == key.fingerprint => {
                        Claim::Seen(r.id.clone())
                    }
                    Some(_) => Claim::Conflict,
                    None => {
                        shard.insert(
                            rkey,
                            Record {
                                id: id.to_string(),
                                online: false,
                                fingerprint: key.fingerprint.into(),
                                expires: now + key.window.as_millis() as u64,
                            },
                        );
                        Claim::New
                    }
                }
            })
            .collect())
    }
}
