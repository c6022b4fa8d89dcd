//! The message center on Redis: listing, per-message read and unread,
//! deletion and per-topic counts, one script each
//! (`scripts/center_{list,mark,delete,count}.lua`), every one atomic on one
//! user's keys (inbox, meta and the sets `rd`, `ur`, `del`; see
//! `scripts/prelude.lua` for the representation and why a count stays
//! O(log n)).

use super::scripts::{array, bad, int, msg_id, nth, text};
use super::{keys, RedisBackend};
use crate::backend::{Change, Changed, ListQuery, Listed, Page};
use crate::error::{Error, Result};
use crate::protocol::{self, Frame, MessageId};
use redis::Value;

/// The key names as the script calls take them.
pub(super) fn refs(k: &[String; 5]) -> [&str; 5] {
    [&k[0], &k[1], &k[2], &k[3], &k[4]]
}

/// A topic prefix as it reads inside the JSON string of a stored frame
/// (JSON escaping is per character, so a prefix of the topic escapes to a
/// prefix of the escaped topic, and back).
fn escaped(prefix: &str) -> String {
    let quoted = serde_json::to_string(prefix).expect("a str serializes");
    quoted[1..quoted.len() - 1].to_string()
}

impl RedisBackend {
    pub(super) async fn center_list(&self, user: &str, q: &ListQuery<'_>) -> Result<Page> {
        let k = keys::inbox_state(user);
        let now = protocol::now_ms().to_string();
        let max_age = self.max_age_ms().to_string();
        let cursor = q.cursor.map(|c| c.to_string()).unwrap_or_default();
        let limit = q.limit.max(1).to_string();
        let prefix = escaped(q.topic_prefix);
        let max_scan = self.cfg.max_messages.max(q.limit).to_string();
        let v = self
            .run_one(self.scripts.center_list.cmd(
                &refs(&k),
                &[
                    now.as_bytes(),
                    max_age.as_bytes(),
                    cursor.as_bytes(),
                    if q.oldest_first { b"old" } else { b"new" },
                    limit.as_bytes(),
                    if q.unread_only { b"1" } else { b"0" },
                    prefix.as_bytes(),
                    max_scan.as_bytes(),
                ],
            ))
            .await?;
        let mut v = array(v)?;
        if v.len() < 2 || (v.len() - 2) % 3 != 0 {
            return Err(bad(&Value::Array(v)));
        }
        let rest = v.split_off(2);
        let next = match text(&v[1])? {
            "" => None,
            id => Some(
                id.parse()
                    .map_err(|e: protocol::BadMessageId| Error::Backend(e.to_string()))?,
            ),
        };
        let mut messages = Vec::with_capacity(rest.len() / 3);
        let mut it = rest.into_iter();
        while let (Some(id), Some(read), Some(frame)) = (it.next(), it.next(), it.next()) {
            let id = msg_id(&id)?;
            let frame = match frame {
                Value::BulkString(b) => Frame::try_from(b)
                    .map_err(|e| Error::Backend(format!("stored frame {id} is not UTF-8: {e}")))?,
                other => return Err(bad(&other)),
            };
            messages.push(Listed {
                id,
                read: int(&read)? == 1,
                frame,
            });
        }
        Ok(Page {
            unread: int(&v[0])?.max(0) as u64,
            messages,
            next,
        })
    }

    pub(super) async fn center_change(&self, user: &str, change: Change<'_>) -> Result<Changed> {
        let k = keys::inbox_state(user);
        let now = protocol::now_ms().to_string();
        let max_age = self.max_age_ms().to_string();
        let ttl = self.ttl_ms().to_string();
        let ch = keys::user_channel(user);
        let (script, op, ids): (_, &[u8], &[MessageId]) = match change {
            Change::Read(ids) => (&self.scripts.center_mark, b"read", ids),
            Change::Unread(ids) => (&self.scripts.center_mark, b"unread", ids),
            Change::Delete(ids) => (&self.scripts.center_delete, b"0", ids),
            Change::DeleteAll => (&self.scripts.center_delete, b"1", &[]),
        };
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let mut args: Vec<&[u8]> = vec![
            now.as_bytes(),
            max_age.as_bytes(),
            ttl.as_bytes(),
            ch.as_bytes(),
            op,
        ];
        args.extend(ids.iter().map(|i| i.as_bytes()));
        let v = array(self.run_one(script.cmd(&refs(&k), &args)).await?)?;
        let unread = int(nth(&v, 0))?.max(0) as u64;
        if let Change::DeleteAll = change {
            return Ok(Changed {
                unread,
                ids: Vec::new(),
                deleted: int(nth(&v, 1))?.max(0) as u64,
            });
        }
        let ids = v[1..].iter().map(msg_id).collect::<Result<Vec<_>>>()?;
        let deleted = match change {
            Change::Delete(_) => ids.len() as u64,
            _ => 0,
        };
        Ok(Changed {
            unread,
            ids,
            deleted,
        })
    }

    pub(super) async fn center_count(&self, user: &str, prefix: &str) -> Result<u64> {
        let k = keys::inbox_state(user);
        let now = protocol::now_ms().to_string();
        let max_age = self.max_age_ms().to_string();
        let prefix = escaped(prefix);
        let v = self
            .run_one(self.scripts.center_count.cmd(
                &refs(&k),
                &[now.as_bytes(), max_age.as_bytes(), prefix.as_bytes()],
            ))
            .await?;
        Ok(int(&v)?.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_escape_like_topics() {
        assert_eq!(escaped("billing."), "billing.");
        assert_eq!(escaped("a\"b\\"), "a\\\"b\\\\");
        let topic = "é\n\"x";
        let frame = protocol::message_frame("1-0", topic, "1", 5, false);
        for cut in [0, 2, 3, 4, topic.len()] {
            let p = escaped(&topic[..cut]);
            assert!(frame.contains(&format!("\"topic\":\"{p}")), "{p}");
        }
    }
}
