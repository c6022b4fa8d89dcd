//! [`Inbox`] in the embedded backend: ids, delivery and idempotency records
//! under one inbox lock.

use super::store::Body;
use super::MemoryBackend;
use crate::backend::{
    Appended, Change, Changed, Event, Inbox, ListQuery, Listed, NewMessage, Page, Replay,
};
use crate::error::Result;
use crate::protocol::{self, Frame, MessageId};
use async_trait::async_trait;
use std::sync::Arc;

#[async_trait]
impl Inbox for MemoryBackend {
    async fn append(&self, users: &[String], msg: NewMessage<'_>) -> Result<Vec<Appended>> {
        // One body for every recipient: what stays in memory is one copy of
        // the payload per send, however many inboxes hold it.
        let body = Body::new(
            &self.store,
            msg.ts,
            protocol::message_frame_tail(msg.topic, msg.payload_json, msg.ts, false),
        );
        let mut out = Vec::with_capacity(users.len());
        let mut recipients = Vec::with_capacity(users.len());
        let mut failed = None;
        for user in users {
            match self.append_one(user, &msg, &body) {
                Ok((done, stored)) => {
                    out.push(done);
                    recipients.extend(stored);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Counted even when a user refused the call: the users before it
        // hold the message.
        self.store.finish(&body, recipients, Arc::downgrade(&body));
        drop(body);
        self.enforce_limit();
        self.report();
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    async fn unread(&self, user: &str) -> Result<u64> {
        Ok(self.with_inbox(user, false, |i| i.map_or(0, |i| i.unread())))
    }

    async fn replay(&self, user: &str, since: Option<MessageId>, limit: usize) -> Result<Replay> {
        let (replay, bodies) = self.with_inbox(user, true, |inbox| {
            let inbox = inbox.expect("created");
            let unread = inbox.unread();
            let mut resumed = None;
            let bodies: Vec<(MessageId, Arc<Body>)> = match since {
                Some(since) => {
                    resumed = Some(since >= inbox.floor);
                    inbox
                        .messages
                        .range(inbox.after(since)..)
                        .map(|m| (m.id, m.body.clone()))
                        .collect()
                }
                None => {
                    // The newest `limit` unread: above the cursor (minus
                    // those read one by one), then those marked unread
                    // below it (all older).
                    let first_unread = inbox.after(inbox.cursor);
                    let mut picked: Vec<(MessageId, Arc<Body>)> = inbox
                        .messages
                        .range(first_unread..)
                        .rev()
                        .filter(|m| !inbox.read_above.contains(&m.id))
                        .take(limit)
                        .map(|m| (m.id, m.body.clone()))
                        .collect();
                    for id in inbox.unread_below.iter().rev() {
                        if picked.len() >= limit {
                            break;
                        }
                        if let Some(i) = inbox.position(*id) {
                            picked.push((*id, inbox.messages[i].body.clone()));
                        }
                    }
                    picked.reverse();
                    picked
                }
            };
            let replay = Replay {
                unread,
                messages: Vec::new(),
                resumed,
                head: inbox.last,
            };
            (replay, bodies)
        });
        // The frames are built outside the lock.
        Ok(Replay {
            messages: bodies.iter().map(|(id, b)| (*id, b.frame(*id))).collect(),
            ..replay
        })
    }

    async fn mark_read(&self, user: &str, up_to: Option<MessageId>) -> Result<(u64, bool)> {
        Ok(self.with_inbox(user, false, |inbox| {
            let Some(inbox) = inbox else {
                return (0, false);
            };
            let before = inbox.unread();
            let target = up_to.unwrap_or(inbox.last).min(inbox.last);
            inbox.read_up_to(target);
            let after = inbox.unread();
            if after != before {
                // Under the inbox lock, like the Redis script's publish:
                // devices see changes in the order they happened.
                self.announce(
                    &inbox.user,
                    before,
                    after,
                    protocol::changed_frame("read", None, Some(target), false, after),
                );
            }
            (after, after != before)
        }))
    }

    async fn list(&self, user: &str, q: &ListQuery<'_>) -> Result<Page> {
        let max_scan = self.cfg.max_messages.max(q.limit);
        let (page, bodies) = self.with_inbox(user, false, |inbox| {
            let Some(inbox) = inbox else {
                return (Page::default(), Vec::new());
            };
            let mut page = Page {
                unread: inbox.unread(),
                ..Page::default()
            };
            let mut picked: Vec<(MessageId, bool, Arc<Body>)> = Vec::new();
            let (start, end) = match (q.oldest_first, q.cursor) {
                (true, Some(c)) => (inbox.after(c), inbox.messages.len()),
                (true, None) => (0, inbox.messages.len()),
                (false, Some(c)) => (0, inbox.messages.partition_point(|m| m.id < c)),
                (false, None) => (0, inbox.messages.len()),
            };
            let range = inbox.messages.range(start..end);
            let iter: Box<dyn Iterator<Item = &super::store::Stored>> = if q.oldest_first {
                Box::new(range)
            } else {
                Box::new(range.rev())
            };
            for (scanned, m) in iter.enumerate() {
                if !q.topic_prefix.is_empty() && !m.body.topic_starts_with(q.topic_prefix) {
                    if scanned + 1 >= max_scan {
                        page.next = Some(m.id);
                        break;
                    }
                    continue;
                }
                let read = inbox.is_read(m.id);
                if !(q.unread_only && read) {
                    picked.push((m.id, read, m.body.clone()));
                    if picked.len() >= q.limit {
                        page.next = Some(m.id);
                        break;
                    }
                }
                if scanned + 1 >= max_scan {
                    page.next = Some(m.id);
                    break;
                }
            }
            (page, picked)
        });
        // Frames are built outside the lock.
        Ok(Page {
            messages: bodies
                .into_iter()
                .map(|(id, read, body)| Listed {
                    id,
                    read,
                    frame: body.frame(id),
                })
                .collect(),
            ..page
        })
    }

    async fn change(&self, user: &str, change: Change<'_>) -> Result<Changed> {
        Ok(self.with_inbox(user, false, |inbox| {
            let Some(inbox) = inbox else {
                return Changed::default();
            };
            let before = inbox.unread();
            let mut done = Vec::new();
            let mut deleted = 0u64;
            let (op, all) = match change {
                Change::Read(ids) | Change::Unread(ids) => {
                    let read = matches!(change, Change::Read(_));
                    for &id in ids {
                        if inbox.set_read(id, read) {
                            done.push(id);
                        }
                    }
                    (if read { "read" } else { "unread" }, false)
                }
                Change::Delete(ids) => {
                    for &id in ids {
                        if inbox.delete(id) {
                            done.push(id);
                        }
                    }
                    deleted = done.len() as u64;
                    ("delete", false)
                }
                Change::DeleteAll => {
                    deleted = inbox.messages.len() as u64;
                    inbox.messages.clear();
                    inbox.read_above.clear();
                    inbox.unread_below.clear();
                    ("delete", true)
                }
            };
            let after = inbox.unread();
            if !done.is_empty() || (all && deleted > 0) {
                let ids = (!all).then_some(&done[..]);
                self.announce(
                    &inbox.user,
                    before,
                    after,
                    protocol::changed_frame(op, ids, None, all, after),
                );
            }
            Changed {
                unread: after,
                ids: done,
                deleted,
            }
        }))
    }

    async fn unread_in(&self, user: &str, prefix: &str) -> Result<u64> {
        Ok(self.with_inbox(user, false, |inbox| {
            let Some(inbox) = inbox else { return 0 };
            inbox
                .messages
                .iter()
                .filter(|m| m.body.topic_starts_with(prefix) && !inbox.is_read(m.id))
                .count() as u64
        }))
    }
}

impl MemoryBackend {
    /// Tells the user's connections here: the count when it changed, then
    /// the `changed` frame. Called under the inbox lock (dispatch only
    /// queues).
    fn announce(&self, user: &Arc<str>, before: u64, after: u64, frame: Frame) {
        if after != before {
            self.local.sink.dispatch(Event::Unread {
                user: user.clone(),
                count: after,
            });
        }
        self.local.sink.dispatch(Event::State {
            user: user.clone(),
            frame,
        });
    }
}
