//! The Lua scripts (one `.lua` file each under `scripts/`), how they are
//! run (EVALSHA, pipelined, reloaded once when Redis has lost them), and
//! how their replies are read.

use super::Conn;
use crate::error::{Error, Result};
use crate::protocol::{self, MessageId};
use redis::Value;

/// Helpers shared by the inbox scripts, put in front of each.
const PRELUDE: &str = include_str!("scripts/prelude.lua");
pub(super) const APPEND: &str = include_str!("scripts/append.lua");
const REPLAY: &str = include_str!("scripts/replay.lua");
const UNREAD: &str = include_str!("scripts/unread.lua");
const MARK_READ: &str = include_str!("scripts/mark_read.lua");
const CENTER_LIST: &str = include_str!("scripts/center_list.lua");
const CENTER_MARK: &str = include_str!("scripts/center_mark.lua");
const CENTER_DELETE: &str = include_str!("scripts/center_delete.lua");
const CENTER_COUNT: &str = include_str!("scripts/center_count.lua");
const RENEW: &str = include_str!("scripts/renew.lua");
const RESERVE: &str = include_str!("scripts/reserve.lua");
const RELEASE: &str = include_str!("scripts/release.lua");

/// A Lua script (with the prelude, for the inbox scripts) and its SHA1 for
/// EVALSHA.
pub(super) struct Script {
    inner: redis::Script,
}

impl Script {
    /// `publish` is the command the inbox scripts publish with (`PUBLISH`,
    /// or `SPUBLISH` on a cluster), defined in front of the prelude.
    fn new(body: &str, prelude: bool, publish: &str) -> Script {
        let code = if prelude {
            format!("local PUBLISH = '{publish}'\n{PRELUDE}\n{body}")
        } else {
            body.to_string()
        };
        Script {
            inner: redis::Script::new(&code),
        }
    }

    /// An EVALSHA command, for pipelines (run them with [`eval`]).
    pub(super) fn cmd(&self, keys: &[&str], args: &[&[u8]]) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(self.inner.get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        c
    }
}

/// Every script Herald runs; each file's header says its KEYS, ARGV and
/// reply.
pub(super) struct Scripts {
    pub(super) append: Script,
    pub(super) replay: Script,
    pub(super) unread: Script,
    pub(super) mark_read: Script,
    pub(super) center_list: Script,
    pub(super) center_mark: Script,
    pub(super) center_delete: Script,
    pub(super) center_count: Script,
    pub(super) renew: Script,
    pub(super) reserve: Script,
    pub(super) release: Script,
}

impl Scripts {
    /// `sharded`: cluster mode, where user channels are sharded channels
    /// (published with `SPUBLISH` from the script, in the user's slot).
    pub(super) fn new(sharded: bool) -> Scripts {
        let publish = if sharded { "SPUBLISH" } else { "PUBLISH" };
        let s = |body, prelude| Script::new(body, prelude, publish);
        Scripts {
            append: s(APPEND, true),
            replay: s(REPLAY, true),
            unread: s(UNREAD, true),
            mark_read: s(MARK_READ, true),
            center_list: s(CENTER_LIST, true),
            center_mark: s(CENTER_MARK, true),
            center_delete: s(CENTER_DELETE, true),
            center_count: s(CENTER_COUNT, true),
            renew: s(RENEW, false),
            reserve: s(RESERVE, false),
            release: s(RELEASE, false),
        }
    }

    fn all(&self) -> [&Script; 11] {
        [
            &self.append,
            &self.replay,
            &self.unread,
            &self.mark_read,
            &self.center_list,
            &self.center_mark,
            &self.center_delete,
            &self.center_count,
            &self.renew,
            &self.reserve,
            &self.release,
        ]
    }

    /// Runs a pipeline of script calls; if Redis has lost the scripts (a
    /// restart, or on a cluster a replica just promoted or a slot just
    /// migrated to a node that never ran them), loads them all once (on
    /// every primary of a cluster) and retries.
    pub(super) async fn eval(&self, conn: &mut Conn, pipe: &redis::Pipeline) -> Result<Vec<Value>> {
        if matches!(conn, Conn::Cluster(_)) && pipe.len() > 1 && !pipe.is_transaction() {
            // The commands run on several primaries, so a NOSCRIPT from one
            // must not rerun the others (a rerun append stores twice):
            // each command is retried on its own.
            let replies = futures_util::future::join_all(pipe.cmd_iter().map(|cmd| {
                let mut conn = conn.clone();
                async move {
                    let mut one = redis::pipe();
                    one.add_command(cmd.clone());
                    self.eval_all(&mut conn, &one).await
                }
            }))
            .await;
            let mut out = Vec::with_capacity(pipe.len());
            for r in replies {
                out.extend(r?);
            }
            return Ok(out);
        }
        self.eval_all(conn, pipe).await
    }

    /// Runs `pipe`; on NOSCRIPT loads every script and runs it again.
    async fn eval_all(&self, conn: &mut Conn, pipe: &redis::Pipeline) -> Result<Vec<Value>> {
        match pipe.query_async::<Vec<Value>>(conn).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                for s in self.all() {
                    s.inner.prepare_invoke().load_async(conn).await?;
                }
                Ok(pipe.query_async(conn).await?)
            }
            other => Ok(other?),
        }
    }
}

// Reading replies.

/// An integer reply (or a bulk string holding one).
pub(super) fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(v)),
        _ => Err(bad(v)),
    }
}

/// A text reply, borrowed from the reply.
pub(super) fn text(v: &Value) -> Result<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).map_err(|_| bad(v)),
        Value::SimpleString(s) => Ok(s),
        _ => Err(bad(v)),
    }
}

pub(super) fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(bad(&other)),
    }
}

/// Any reply read as `T` (hashes as maps or pair lists, optional values).
pub(super) fn parse<T: redis::FromRedisValue>(v: Value) -> Result<T> {
    redis::from_redis_value(v)
        .map_err(|e| Error::Backend(format!("unexpected reply from Redis: {e}")))
}

/// The error for a reply of an unexpected shape.
pub(super) fn bad(v: &Value) -> Error {
    Error::Backend(format!(
        "unexpected reply from Redis: {:.200}",
        format!("{v:?}")
    ))
}

pub(super) fn msg_id(v: &Value) -> Result<MessageId> {
    text(v)?
        .parse()
        .map_err(|e: protocol::BadMessageId| Error::Backend(e.to_string()))
}

/// Element `i` of a reply array, [`Value::Nil`] when it is short (its
/// reader then reports the reply as [`bad`]).
pub(super) fn nth(v: &[Value], i: usize) -> &Value {
    v.get(i).unwrap_or(&Value::Nil)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_says_its_keys_argv_and_reply() {
        for (name, code) in [
            ("append", APPEND),
            ("replay", REPLAY),
            ("unread", UNREAD),
            ("mark_read", MARK_READ),
            ("center_list", CENTER_LIST),
            ("center_mark", CENTER_MARK),
            ("center_delete", CENTER_DELETE),
            ("center_count", CENTER_COUNT),
            ("renew", RENEW),
            ("reserve", RESERVE),
            ("release", RELEASE),
        ] {
            let head: String = code
                .lines()
                .take_while(|l| l.starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n");
            for word in ["KEYS:", "ARGV:", "Returns"] {
                assert!(head.contains(word), "{name}.lua's header lacks {word}");
            }
        }
    }

    #[test]
    fn replies_of_the_wrong_shape_are_errors() {
        assert_eq!(int(&Value::Int(7)).unwrap(), 7);
        assert_eq!(int(&Value::BulkString(b"12".to_vec())).unwrap(), 12);
        assert!(int(&Value::BulkString(b"x".to_vec())).is_err());
        assert!(int(&Value::Nil).is_err());
        assert!(text(&Value::BulkString(vec![0xff])).is_err());
        assert!(msg_id(&Value::BulkString(b"1-2".to_vec())).is_ok());
        assert!(msg_id(&Value::BulkString(b"12".to_vec())).is_err());
        assert!(array(Value::Int(1)).is_err());
        assert!(int(nth(&[], 3)).is_err());
    }
}
