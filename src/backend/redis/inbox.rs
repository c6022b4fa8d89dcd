//! [`Inbox`] on Redis: one stream and one meta hash per user (and three
//! small sorted sets of per-message state, see `center.rs`), read and
//! written only by the inbox scripts (`scripts/{append,replay,unread,
//! mark_read,center_*}.lua`), so every step is atomic.

use super::center::refs;
use super::scripts::{array, bad, int, msg_id, nth};
use super::{keys, RedisBackend};
use crate::backend::{
    reused, Appended, Change, Changed, Inbox, ListQuery, NewMessage, Page, Replay,
};
use crate::error::Result;
use crate::protocol::{self, Frame, MessageId};
use async_trait::async_trait;
use redis::Value;

impl RedisBackend {
    /// How long an idle inbox lives.
    pub(super) fn ttl_ms(&self) -> u64 {
        (self.cfg.max_age.as_millis() as u64).max(1000)
    }

    pub(super) fn max_age_ms(&self) -> u64 {
        self.cfg.max_age.as_millis() as u64
    }
}

impl RedisBackend {
    /// The append script's call for each of `users` (one pipeline entry per
    /// user; a batch concatenates several messages' calls).
    fn append_cmds(&self, users: &[String], msg: &NewMessage<'_>) -> Vec<redis::Cmd> {
        // The frame around the id: the script puts the id it assigns between.
        let (head, tail) =
            protocol::message_frame_parts(msg.topic, msg.payload_json, msg.ts, false);
        let now = msg.ts.to_string();
        let max_len = self.cfg.max_messages.to_string();
        let max_age = self.max_age_ms().to_string();
        let ttl = self.ttl_ms().to_string();
        let window = msg
            .idempotency
            .map(|k| (k.window.as_millis() as u64).max(1).to_string());
        users
            .iter()
            .map(|u| {
                let (inbox, meta, ch) = (keys::inbox(u), keys::meta(u), keys::user_channel(u));
                let mut args: Vec<&[u8]> = vec![
                    now.as_bytes(),
                    head.as_bytes(),
                    tail.as_bytes(),
                    max_len.as_bytes(),
                    max_age.as_bytes(),
                    ttl.as_bytes(),
                    ch.as_bytes(),
                ];
                match (msg.idempotency, &window) {
                    (Some(k), Some(window)) => {
                        let record = keys::idem_stored(u, k.key);
                        args.push(k.fingerprint.as_bytes());
                        args.push(window.as_bytes());
                        self.scripts.append.cmd(&[&inbox, &meta, &record], &args)
                    }
                    _ => self.scripts.append.cmd(&[&inbox, &meta], &args),
                }
            })
            .collect()
    }
}

/// The append script's replies for `users`, in order.
fn appended(replies: impl Iterator<Item = Value>, users: &[String]) -> Result<Vec<Appended>> {
    replies
        .zip(users)
        .map(|(v, user)| {
            let v = array(v)?;
            match v.as_slice() {
                [_, _, flag] if int(flag)? == 2 => Err(reused(user)),
                [id, receivers, flag] => Ok(Appended {
                    id: msg_id(id)?,
                    online: int(receivers)? > 0,
                    replayed: int(flag)? == 1,
                }),
                _ => Err(bad(&Value::Array(v))),
            }
        })
        .collect()
}

#[async_trait]
impl Inbox for RedisBackend {
    async fn append(&self, users: &[String], msg: NewMessage<'_>) -> Result<Vec<Appended>> {
        let replies = self.run(self.append_cmds(users, &msg)).await?;
        appended(replies.into_iter(), users)
    }

    /// One pipeline for the whole batch: every message's script calls, in
    /// order, in one round trip (per Redis node on a cluster).
    async fn append_batch(
        &self,
        batch: &[(&[String], NewMessage<'_>)],
    ) -> Result<Vec<Result<Vec<Appended>>>> {
        let cmds = batch
            .iter()
            .flat_map(|(users, msg)| self.append_cmds(users, msg))
            .collect();
        let mut replies = self.run(cmds).await?.into_iter();
        Ok(batch
            .iter()
            .map(|(users, _)| {
                let mine: Vec<Value> = replies.by_ref().take(users.len()).collect();
                if mine.len() != users.len() {
                    return Err(crate::error::Error::Backend(
                        "a batch's pipeline reply is short".into(),
                    ));
                }
                appended(mine.into_iter(), users)
            })
            .collect())
    }

    async fn unread(&self, user: &str) -> Result<u64> {
        let now = protocol::now_ms().to_string();
        let max_age = self.max_age_ms().to_string();
        let k = keys::inbox_state(user);
        let v = self
            .run_one(
                self.scripts
                    .unread
                    .cmd(&refs(&k), &[now.as_bytes(), max_age.as_bytes()]),
            )
            .await?;
        Ok(int(&v)?.max(0) as u64)
    }

    async fn replay(&self, user: &str, since: Option<MessageId>, limit: usize) -> Result<Replay> {
        let now = protocol::now_ms().to_string();
        let max_age = self.max_age_ms().to_string();
        let since = since.map(|s| s.to_string()).unwrap_or_default();
        let limit = limit.to_string();
        let ttl = self.ttl_ms().to_string();
        let k = keys::inbox_state(user);
        let v = self
            .run_one(self.scripts.replay.cmd(
                &refs(&k),
                &[
                    now.as_bytes(),
                    max_age.as_bytes(),
                    since.as_bytes(),
                    limit.as_bytes(),
                    ttl.as_bytes(),
                ],
            ))
            .await?;
        let mut v = array(v)?;
        if v.len() < 3 {
            return Err(bad(&Value::Array(v)));
        }
        let stored = v.split_off(3);
        if stored.len() % 2 != 0 {
            return Err(bad(&Value::Array(stored)));
        }
        let mut messages = Vec::with_capacity(stored.len() / 2);
        let mut stored = stored.into_iter();
        while let (Some(id), Some(frame)) = (stored.next(), stored.next()) {
            let id = msg_id(&id)?;
            // The reply's bytes become the frame: no copy.
            let frame = match frame {
                Value::BulkString(b) => Frame::try_from(b).map_err(|e| {
                    crate::error::Error::Backend(format!("stored frame {id} is not UTF-8: {e}"))
                })?,
                other => return Err(bad(&other)),
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
        let ttl = self.ttl_ms().to_string();
        let ch = keys::user_channel(user);
        let k = keys::inbox_state(user);
        let v = self
            .run_one(self.scripts.mark_read.cmd(
                &refs(&k),
                &[
                    now.as_bytes(),
                    max_age.as_bytes(),
                    up_to.as_bytes(),
                    ttl.as_bytes(),
                    ch.as_bytes(),
                ],
            ))
            .await?;
        let v = array(v)?;
        Ok((int(nth(&v, 0))?.max(0) as u64, int(nth(&v, 1))? == 1))
    }

    async fn list(&self, user: &str, q: &ListQuery<'_>) -> Result<Page> {
        self.center_list(user, q).await
    }

    async fn change(&self, user: &str, change: Change<'_>) -> Result<Changed> {
        self.center_change(user, change).await
    }

    async fn unread_in(&self, user: &str, prefix: &str) -> Result<u64> {
        self.center_count(user, prefix).await
    }
}
