//! [`Idempotency`] in the embedded backend: records in sharded maps, swept
//! by the backend's background task.

use super::MemoryBackend;
use crate::backend::{conflicts, Claim, ClaimScope, IdemKey, Idempotency};
use crate::error::{Error, Result};
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

impl MemoryBackend {
    /// Refuses a call that would need `more` records beyond
    /// `--idempotency-max-records` (checked before any effect; concurrent
    /// calls may overshoot it by what they claim at once).
    pub(super) fn room_for_records(&self, more: usize) -> Result<()> {
        let held = self.record_count.load(std::sync::atomic::Ordering::Relaxed);
        if held + more > self.cfg.idempotency_max_records {
            metrics::counter!("herald_idempotency_refused_total").increment(1);
            return Err(Error::ResourceExhausted(format!(
                "this node already remembers {held} idempotency keys \
                 (--idempotency-max-records {}): retry after older keys expire \
                 (--idempotency-window), or send without a key",
                self.cfg.idempotency_max_records
            )));
        }
        Ok(())
    }

    /// Inserts a record; counts it if it is new.
    pub(super) fn insert_record(&self, rkey: String, record: Record) {
        if self.records(&rkey).lock().insert(rkey, record).is_none() {
            self.record_count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl Idempotency for MemoryBackend {
    async fn first_conflict(&self, users: &[String], key: IdemKey<'_>) -> Result<Option<usize>> {
        let now = protocol::now_ms();
        let conflict = users.iter().position(|u| {
            ['s', 't'].into_iter().any(|kind| {
                let rkey = record_key(kind, u, key.key);
                self.records(&rkey)
                    .lock()
                    .get(&rkey)
                    .filter(|r| r.expires > now)
                    .is_some_and(|r| conflicts(&r.fingerprint, key.fingerprint))
            })
        });
        if conflict.is_none() {
            self.room_for_records(users.len())?;
        }
        Ok(conflict)
    }

    async fn claim(
        &self,
        scopes: &[ClaimScope<'_>],
        key: IdemKey<'_>,
        id: &str,
    ) -> Result<Vec<Claim>> {
        let now = protocol::now_ms();
        self.room_for_records(scopes.len())?;
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
                        let fresh = shard.insert(
                            rkey,
                            Record {
                                id: id.to_string(),
                                online: false,
                                fingerprint: key.fingerprint.into(),
                                expires: now + key.window.as_millis() as u64,
                            },
                        );
                        if fresh.is_none() {
                            self.record_count
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Claim::New
                    }
                }
            })
            .collect())
    }
}
