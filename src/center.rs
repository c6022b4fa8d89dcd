//! The message center's operations, whatever their entry point: a
//! client's frame (`ws::frames`) or a backend's call (`grpc`). Each entry
//! builds a [`Request`] from what its caller sent, unparsed; the node
//! validates it here once, against the limits of that entry point (one
//! table: [`Entry::limits`]), into an [`Op`], and applies it in one
//! function ([`Node::apply`]). What stays at the entry points is only the
//! shape of their own messages (a frame that names both `ids` and `all`,
//! an RPC that gives both `message_ids` and `up_to_message_id`).

use crate::backend::{Change, Changed, ListQuery, Page};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::protocol::MessageId;

/// Who asks: a client on its connection, or a backend through the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Client,
    Backend,
}

/// What one entry point may ask for at once.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The name of the id list in error messages.
    pub ids_field: &'static str,
    /// Ids per request.
    pub max_ids: usize,
    /// Messages per page when the request says 0 or nothing.
    pub default_page: usize,
    /// Messages per page at most.
    pub max_page: usize,
}

impl Entry {
    /// The limits of each entry point. A client's are tighter: its frames
    /// are untrusted, and a page goes down its one socket (a `history`
    /// frame also costs more of its frame budget, see `ws::frames`).
    pub const fn limits(self) -> Limits {
        match self {
            Entry::Client => Limits {
                ids_field: "ids",
                max_ids: 100,
                default_page: 20,
                max_page: 50,
            },
            Entry::Backend => Limits {
                ids_field: "message_ids",
                max_ids: 1000,
                default_page: 20,
                max_page: 100,
            },
        }
    }
}

/// A message-center request as its caller sent it (ids, cursors: text).
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    /// Move the read cursor up to this id; empty: everything.
    ReadUpTo(&'a str),
    /// Mark these messages read (`read`) or unread.
    SetRead { ids: &'a [String], read: bool },
    /// Delete these messages; `None`: all of them.
    Delete(Option<&'a [String]>),
    /// A page of the user's stored messages.
    List(ListMessages<'a>),
}

/// A page request, as its caller sent it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListMessages<'a> {
    /// Empty: from the newest (or the oldest, with `oldest_first`).
    pub cursor: &'a str,
    pub oldest_first: bool,
    /// 0: the entry point's default.
    pub limit: u32,
    pub unread_only: bool,
    pub topic_prefix: &'a str,
}

/// A validated operation.
#[derive(Debug)]
pub enum Op<'a> {
    /// `None`: everything.
    ReadUpTo(Option<MessageId>),
    SetRead(Vec<MessageId>, bool),
    /// `None`: all.
    Delete(Option<Vec<MessageId>>),
    List(ListQuery<'a>),
}

/// What an operation did.
#[derive(Debug)]
pub enum Done {
    /// The unread count after a read-cursor move.
    Unread(u64),
    /// The messages whose state changed, and the unread count.
    Changed(Changed),
    Page(Page),
}

impl<'a> Request<'a> {
    /// Checks the request against `entry`'s limits (and the node's topic
    /// length) and parses what it names.
    pub fn validate(self, entry: Entry, max_topic_bytes: usize) -> Result<Op<'a>> {
        let limits = entry.limits();
        let ids = |ids: &[String]| Node::parse_ids(limits.ids_field, ids, limits.max_ids);
        Ok(match self {
            Request::ReadUpTo("") => Op::ReadUpTo(None),
            Request::ReadUpTo(id) => Op::ReadUpTo(Some(Node::parse_id("up_to_message_id", id)?)),
            Request::SetRead { ids: list, read } => Op::SetRead(ids(list)?, read),
            Request::Delete(None) => Op::Delete(None),
            Request::Delete(Some(list)) => Op::Delete(Some(ids(list)?)),
            Request::List(q) => {
                Node::check_prefix(q.topic_prefix, max_topic_bytes)?;
                let cursor = match q.cursor {
                    "" => None,
                    c => Some(Node::parse_id("cursor", c)?),
                };
                let limit = match q.limit as usize {
                    0 => limits.default_page,
                    n if n > limits.max_page => {
                        return Err(Error::invalid(format!(
                            "limit {n} exceeds the cap of {} messages per page",
                            limits.max_page
                        )))
                    }
                    n => n,
                };
                Op::List(ListQuery {
                    cursor,
                    oldest_first: q.oldest_first,
                    limit,
                    unread_only: q.unread_only,
                    topic_prefix: q.topic_prefix,
                })
            }
        })
    }
}

impl Node {
    /// A message-center request of `user` from `entry`: validated, then
    /// applied. Every change reaches every connection of the user (on
    /// every node) through the backend.
    pub async fn center(&self, user: &str, entry: Entry, req: Request<'_>) -> Result<Done> {
        self.check_user(user)?;
        let op = req.validate(entry, self.cfg.limits.max_topic_bytes)?;
        self.apply(user, op).await
    }

    /// A client's `read` frame (the reads that arrived together, as one
    /// move of the read cursor: parsed already, to keep the newest).
    pub async fn client_read(&self, user: &str, up_to: MessageId) -> Result<u64> {
        match self.apply(user, Op::ReadUpTo(Some(up_to))).await? {
            Done::Unread(n) => Ok(n),
            other => Err(Error::Backend(format!("a read answered {other:?}"))),
        }
    }

    /// Applies a validated operation: the one place the message center
    /// reaches the inbox.
    pub(crate) async fn apply(&self, user: &str, op: Op<'_>) -> Result<Done> {
        let inbox = &self.backend.inbox;
        Ok(match op {
            Op::ReadUpTo(up_to) => Done::Unread(inbox.mark_read(user, up_to).await?.0),
            Op::SetRead(ids, true) => Done::Changed(inbox.change(user, Change::Read(&ids)).await?),
            Op::SetRead(ids, false) => {
                Done::Changed(inbox.change(user, Change::Unread(&ids)).await?)
            }
            Op::Delete(Some(ids)) => Done::Changed(inbox.change(user, Change::Delete(&ids)).await?),
            Op::Delete(None) => Done::Changed(inbox.change(user, Change::DeleteAll).await?),
            Op::List(q) => Done::Page(inbox.list(user, &q).await?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(r: Result<Op<'_>>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn each_entry_point_has_its_own_limits_in_one_table() {
        let many: Vec<String> = (0..101).map(|i| format!("1-{i}")).collect();
        let del = Request::Delete(Some(&many));
        assert!(invalid(del.validate(Entry::Client, 256)).contains("ids has 101 ids; at most 100"));
        assert!(
            matches!(del.validate(Entry::Backend, 256), Ok(Op::Delete(Some(v))) if v.len() == 101)
        );
        let page = |limit| {
            Request::List(ListMessages {
                limit,
                ..Default::default()
            })
        };
        assert!(invalid(page(51).validate(Entry::Client, 256)).contains("cap of 50"));
        assert!(matches!(page(51).validate(Entry::Backend, 256), Ok(Op::List(q)) if q.limit == 51));
        assert!(invalid(page(101).validate(Entry::Backend, 256)).contains("cap of 100"));
        assert!(matches!(page(0).validate(Entry::Client, 256), Ok(Op::List(q)) if q.limit == 20));
    }

    #[test]
    fn what_a_request_names_is_parsed_and_checked() {
        let bad = ["x".to_string()];
        let set = Request::SetRead {
            ids: &bad,
            read: true,
        };
        assert!(invalid(set.validate(Entry::Backend, 256)).contains("message_ids[0]"));
        assert!(invalid(
            Request::SetRead {
                ids: &[],
                read: false
            }
            .validate(Entry::Client, 256)
        )
        .contains("at least one"));
        assert!(
            invalid(Request::ReadUpTo("nope").validate(Entry::Backend, 256))
                .contains("up_to_message_id")
        );
        assert!(matches!(
            Request::ReadUpTo("").validate(Entry::Client, 256),
            Ok(Op::ReadUpTo(None))
        ));
        let topic = "t".repeat(9);
        let long = Request::List(ListMessages {
            topic_prefix: &topic,
            ..Default::default()
        });
        assert!(invalid(long.validate(Entry::Client, 8)).contains("topic_prefix of 9 bytes"));
        let cursor = Request::List(ListMessages {
            cursor: "t1-0",
            ..Default::default()
        });
        assert!(invalid(cursor.validate(Entry::Client, 8)).contains("cursor"));
    }
}
