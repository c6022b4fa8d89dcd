//! The embedded backend's stored messages: one shared body per send, each
//! recipient's inbox entry pointing at it, and the node-wide accounting
//! that the memory budget reads.

use crate::config::InboxConfig;
use crate::protocol::{self, Frame, MessageId};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

/// A recipient of a stored message: the user and the message's id in their
/// inbox.
pub(super) type Recipient = (Arc<str>, MessageId);

/// What one recipient of a message costs besides the shared body: its entry
/// in the inbox and its entry in the body's recipient list.
pub(super) const PER_RECIPIENT: usize = size_of::<Stored>() + size_of::<Recipient>();

/// What a body costs besides its tail and recipients: the allocation (with
/// the two reference counts) and its entry in [`Store::by_age`].
pub(super) const PER_BODY: usize =
    size_of::<Body>() + 2 * size_of::<usize>() + size_of::<((u64, u64), Weak<Body>)>();

/// What an inbox costs besides its messages, counted in [`Store::bytes`]
/// from its creation until it is freed: the inbox and its map entry (key,
/// control byte), and the user id's allocation (two counts and the bytes).
/// Without it a budget of 64 MiB let millions of one-message inboxes hold a
/// gigabyte.
pub(super) fn inbox_cost(user: &str) -> usize {
    size_of::<(Arc<str>, UserInbox)>() + 1 + 2 * size_of::<usize>() + user.len()
}

/// The stored messages of every inbox, and the inboxes, as the node-wide
/// memory budget sees them.
pub(super) struct Store {
    /// What every counted body costs ([`Body::cost`]), each counted once
    /// however many inboxes hold it, plus what every inbox costs
    /// ([`inbox_cost`]).
    pub(super) bytes: AtomicUsize,
    /// Every counted body by `(ts, seq)`, oldest first. A body takes itself
    /// out when it drops, so this holds exactly the live ones, and the
    /// budget finds the oldest in O(log n). Lock order: an inbox shard, then
    /// this; never an inbox shard while this is held.
    pub(super) by_age: Mutex<BTreeMap<(u64, u64), Weak<Body>>>,
    /// Tells bodies of the same millisecond apart.
    pub(super) next_seq: AtomicU64,
}

impl Store {
    /// Counts and indexes a body once every recipient holds it.
    pub(super) fn finish(&self, body: &Body, recipients: Vec<Recipient>, weak: Weak<Body>) {
        if recipients.is_empty() || body.recipients.set(recipients.into()).is_err() {
            return; // Stored nowhere: never counted.
        }
        let cost = body.cost().expect("recipients set");
        self.bytes.fetch_add(cost, Ordering::Relaxed);
        self.by_age.lock().insert((body.ts, body.seq), weak);
    }

    /// Takes the oldest live body out of the index.
    pub(super) fn pop_oldest(&self) -> Option<Arc<Body>> {
        loop {
            let (_, weak) = self.by_age.lock().pop_first()?;
            // Upgraded outside the lock: dropping the last reference takes
            // the lock again.
            if let Some(body) = weak.upgrade() {
                return Some(body);
            }
        }
    }
}

/// The part of a stored message that is the same for all its recipients:
/// the frame after the id (topic, data, ts), kept once per send. Each
/// recipient's frame is built from it when it is sent.
pub(super) struct Body {
    pub(super) ts: u64,
    pub(super) seq: u64,
    pub(super) tail: Box<str>,
    /// Who holds it, under which id. Set once the send has stored it in
    /// every inbox; from then on it is counted in [`Store::bytes`] and
    /// indexed in [`Store::by_age`].
    pub(super) recipients: OnceLock<Box<[Recipient]>>,
    pub(super) store: Arc<Store>,
}

impl Body {
    pub(super) fn new(store: &Arc<Store>, ts: u64, tail: String) -> Arc<Body> {
        Arc::new(Body {
            ts,
            seq: store.next_seq.fetch_add(1, Ordering::Relaxed),
            tail: tail.into(),
            recipients: OnceLock::new(),
            store: store.clone(),
        })
    }

    /// Bytes counted for this body (None until it is counted).
    pub(super) fn cost(&self) -> Option<usize> {
        let recipients = self.recipients.get()?;
        Some(PER_BODY + self.tail.len() + recipients.len() * PER_RECIPIENT)
    }

    /// Whether the message's topic starts with `prefix`.
    pub(super) fn topic_starts_with(&self, prefix: &str) -> bool {
        if prefix.is_empty() {
            return true;
        }
        // The tail starts with `","topic":"` and the topic as JSON text;
        // escaping is per character, so prefixes compare escaped.
        let quoted = serde_json::to_string(prefix).expect("a str serializes");
        let escaped = &quoted[1..quoted.len() - 1];
        self.tail
            .strip_prefix("\",\"topic\":\"")
            .is_some_and(|t| t.starts_with(escaped))
    }

    /// The frame of the message with `id`, built for sending (and freed
    /// once sent): only the body stays in memory.
    pub(super) fn frame(&self, id: MessageId) -> Frame {
        protocol::message_frame_with_tail(&id.to_string(), &self.tail).into()
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(cost) = self.cost() {
            self.store.by_age.lock().remove(&(self.ts, self.seq));
            self.store.bytes.fetch_sub(cost, Ordering::Relaxed);
        }
    }
}

/// One message in one inbox.
pub(super) struct Stored {
    pub(super) id: MessageId,
    pub(super) body: Arc<Body>,
}

/// One user's inbox.
pub(super) struct UserInbox {
    /// The user (the map's key, shared).
    pub(super) user: Arc<str>,
    pub(super) messages: VecDeque<Stored>,
    /// The newest id ever assigned (or the creation mark).
    pub(super) last: MessageId,
    /// Everything at or below this id is gone (trimmed, or from before this
    /// inbox existed). A resume from an older position is incomplete.
    pub(super) floor: MessageId,
    /// The newest id read.
    pub(super) cursor: MessageId,
    /// Message center: stored ids above the cursor read one by one.
    pub(super) read_above: BTreeSet<MessageId>,
    /// Message center: stored ids at or below the cursor marked unread.
    /// Both sets hold only ids still stored (trims, drops and deletes take
    /// theirs out), so the count is O(log n): unread above the cursor
    /// minus `read_above` plus `unread_below`.
    pub(super) unread_below: BTreeSet<MessageId>,
}

impl UserInbox {
    /// A new inbox created at `mark_ms`.
    pub(super) fn new(user: Arc<str>, mark_ms: u64) -> Self {
        // The creation mark is a virtual, already-trimmed message: a resume
        // position from before it (an earlier process, or an inbox freed
        // since) reads as lost.
        let mark = MessageId {
            ms: mark_ms,
            seq: 0,
        };
        UserInbox {
            user,
            messages: VecDeque::new(),
            last: mark,
            floor: mark,
            cursor: MessageId::ZERO,
            read_above: BTreeSet::new(),
            unread_below: BTreeSet::new(),
        }
    }

    pub(super) fn trim(&mut self, cfg: &InboxConfig, now: u64) {
        let min_ts = now.saturating_sub(cfg.max_age.as_millis() as u64);
        while let Some(front) = self.messages.front() {
            if self.messages.len() > cfg.max_messages || front.body.ts < min_ts {
                self.floor = self.floor.max(front.id);
                let id = front.id;
                self.messages.pop_front();
                self.forget(id);
            } else {
                break;
            }
        }
    }

    /// Takes out message `id` if it is `body`'s; says whether it was there.
    pub(super) fn drop_message(&mut self, id: MessageId, body: &Arc<Body>) -> bool {
        let i = self.messages.partition_point(|m| m.id < id);
        match self.messages.get(i) {
            Some(m) if m.id == id && Arc::ptr_eq(&m.body, body) => {
                self.messages.remove(i);
                self.floor = self.floor.max(id);
                self.forget(id);
                true
            }
            _ => false,
        }
    }

    /// Index of the first message newer than `id`.
    pub(super) fn after(&self, id: MessageId) -> usize {
        self.messages.partition_point(|m| m.id <= id)
    }

    pub(super) fn unread(&self) -> u64 {
        (self.messages.len() - self.after(self.cursor) - self.read_above.len()
            + self.unread_below.len()) as u64
    }

    /// Takes a message that is gone out of the per-message state.
    fn forget(&mut self, id: MessageId) {
        if !self.read_above.is_empty() {
            self.read_above.remove(&id);
        }
        if !self.unread_below.is_empty() {
            self.unread_below.remove(&id);
        }
    }

    /// Whether the stored message `id` is read.
    pub(super) fn is_read(&self, id: MessageId) -> bool {
        if id <= self.cursor {
            !self.unread_below.contains(&id)
        } else {
            self.read_above.contains(&id)
        }
    }

    /// The position of stored message `id`.
    pub(super) fn position(&self, id: MessageId) -> Option<usize> {
        let i = self.messages.partition_point(|m| m.id < id);
        (self.messages.get(i)?.id == id).then_some(i)
    }

    /// Moves the cursor to `up_to` (capped at the newest id, never
    /// backwards) and makes everything at or below `up_to` read.
    pub(super) fn read_up_to(&mut self, up_to: MessageId) {
        let target = up_to.min(self.last);
        self.cursor = self.cursor.max(target);
        keep_above(&mut self.read_above, self.cursor);
        keep_above(&mut self.unread_below, target);
    }

    /// Marks stored message `id` read or unread; true when its state
    /// changed (false for an id not stored).
    pub(super) fn set_read(&mut self, id: MessageId, read: bool) -> bool {
        if self.position(id).is_none() {
            return false;
        }
        match (id <= self.cursor, read) {
            (true, true) => self.unread_below.remove(&id),
            (true, false) => self.unread_below.insert(id),
            (false, true) => self.read_above.insert(id),
            (false, false) => self.read_above.remove(&id),
        }
    }

    /// Deletes stored message `id`; true when it was stored. The floor
    /// stays: a deletion is the user's own, not a loss.
    pub(super) fn delete(&mut self, id: MessageId) -> bool {
        match self.position(id) {
            Some(i) => {
                self.messages.remove(i);
                self.forget(id);
                true
            }
            None => false,
        }
    }
}

/// Keeps only the ids above `id` (O(log n + removed)).
fn keep_above(set: &mut BTreeSet<MessageId>, id: MessageId) {
    let next = match id.seq.checked_add(1) {
        Some(seq) => MessageId { ms: id.ms, seq },
        None => match id.ms.checked_add(1) {
            Some(ms) => MessageId { ms, seq: 0 },
            None => return set.clear(),
        },
    };
    if set.first().is_some_and(|f| *f < next) {
        *set = set.split_off(&next);
    }
}
