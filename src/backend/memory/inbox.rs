//! [`Inbox`] in the embedded backend: ids, delivery and idempotency records
//! under one inbox lock.

use super::store::Body;
use super::MemoryBackend;
use crate::backend::{Appended, Inbox, NewMessage, Replay};
use crate::error::Result;
use crate::protocol::{self, MessageId};
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
            let (start, resumed) = match since {
                Some(since) => (inbox.after(since), Some(since >= inbox.floor)),
                None => {
                    let first_unread = inbox.after(inbox.cursor);
                    (
                        first_unread.max(inbox.messages.len().saturating_sub(limit)),
                        None,
                    )
                }
            };
            let bodies: Vec<(MessageId, Arc<Body>)> = inbox
                .messages
                .range(start..)
                .map(|m| (m.id, m.body.clone()))
                .collect();
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
            inbox.cursor = inbox.cursor.max(target);
            let after = inbox.unread();
            (after, after != before)
        }))
    }
}
