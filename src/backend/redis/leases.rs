//! Which node incarnations are alive, as this node last read them: the
//! lease of each node in `herald:nodes` (scored by expiry, Redis clock) and
//! each node's current boot id in `herald:boots`.
//!
//! Presence reads (IsOnline, the per-user cap) filter a user's reservation
//! hash (`herald:{<user>}:conns`, fields `<node>|<boot>`) through this
//! cache instead of reading every node's keys in one script: that keeps
//! each script in one user's slot, which Redis Cluster requires. The
//! registrar refreshes the cache with every lease renewal (every lease/3);
//! a reader that meets an incarnation the cache does not know (a node that
//! just started), or one whose cached lease has run out, refreshes it at
//! once (at most every [`MIN_REFRESH`]).
//!
//! A `parking_lot` mutex guards the cache; it is never held across an
//! `.await`.

use super::scripts::{array, int, text, Scripts};
use super::{keys, Conn};
use crate::error::Result;
use parking_lot::Mutex;
use redis::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The shortest time between two refreshes asked for by readers.
const MIN_REFRESH: Duration = Duration::from_millis(100);

/// What a reservation field is, as far as the cache knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// The node's lease is live and this is its current incarnation.
    Live,
    /// The node's current incarnation, but its lease has run out (it may
    /// come back): not counted, kept.
    Lapsed,
    /// A node gone from the nodes set, or an older incarnation of a node
    /// that restarted: its reservations can be deleted.
    Dead,
}

#[derive(Default)]
struct Snapshot {
    /// When it was read (this node's clock).
    at: Option<Instant>,
    /// Redis's clock minus this node's, in ms, at the read.
    offset_ms: i64,
    /// node id -> lease expiry (Redis clock, ms).
    leases: HashMap<String, i64>,
    /// node id -> current boot id.
    boots: HashMap<String, String>,
}

/// The cache (see the module doc).
#[derive(Default)]
pub(super) struct Leases {
    snap: Mutex<Snapshot>,
}

impl Leases {
    /// Stores what a renewal or a read returned: Redis's clock and the
    /// nodes set (`{now, node1, expiry1, ...}`, from `scripts/renew.lua`),
    /// and the boots hash.
    pub(super) fn store(&self, nodes: Value, boots: HashMap<String, String>) -> Result<()> {
        let v = array(nodes)?;
        let now = int(v.first().unwrap_or(&Value::Nil))?;
        let mut leases = HashMap::with_capacity(v.len() / 2);
        for pair in v[1..].chunks(2) {
            if let [node, expiry] = pair {
                leases.insert(text(node)?.to_string(), int(expiry)?);
            }
        }
        *self.snap.lock() = Snapshot {
            at: Some(Instant::now()),
            offset_ms: now - crate::protocol::now_ms() as i64,
            leases,
            boots,
        };
        Ok(())
    }

    /// Reads the nodes set and the boots hash again (no write).
    pub(super) async fn refresh(&self, conn: &Conn, scripts: &Scripts) -> Result<()> {
        let nodes = keys::nodes();
        let mut pipe = redis::pipe();
        pipe.add_command(scripts.renew.cmd(&[&nodes], &[b"", b"0"]));
        pipe.cmd("HGETALL").arg(keys::boots());
        let (nodes, boots): (Value, HashMap<String, String>) = {
            let mut v = scripts.eval(&mut conn.clone(), &pipe).await?.into_iter();
            let nodes = v.next().unwrap_or(Value::Nil);
            let boots = redis::from_redis_value(v.next().unwrap_or(Value::Nil))
                .map_err(|e| crate::error::Error::Backend(e.to_string()))?;
            (nodes, boots)
        };
        self.store(nodes, boots)
    }

    /// Refreshes unless the cache was read within [`MIN_REFRESH`].
    pub(super) async fn refresh_if_old(&self, conn: &Conn, scripts: &Scripts) -> Result<()> {
        let fresh = self
            .snap
            .lock()
            .at
            .is_some_and(|at| at.elapsed() < MIN_REFRESH);
        if fresh {
            return Ok(());
        }
        self.refresh(conn, scripts).await
    }

    /// What the reservation field `field` (`<node>|<boot>`) is; `None` when
    /// the cache cannot tell (a node it has not seen yet, or one whose
    /// cached lease has run out: the node may have renewed since).
    pub(super) fn state(&self, field: &str) -> Option<State> {
        let snap = self.snap.lock();
        let (node, boot) = field.rsplit_once('|')?;
        let now = crate::protocol::now_ms() as i64 + snap.offset_ms;
        match (snap.leases.get(node), snap.boots.get(node)) {
            (Some(_), Some(current)) if current != boot => Some(State::Dead),
            (Some(&expiry), Some(_)) if expiry >= now => Some(State::Live),
            (Some(_), Some(_)) => None,
            (None, _) => None,
            (Some(_), None) => None,
        }
    }

    /// Like [`Leases::state`] right after a refresh: what is still unknown
    /// is dead (gone from the nodes set) or lapsed.
    pub(super) fn state_fresh(&self, field: &str) -> State {
        match self.state(field) {
            Some(s) => s,
            None => {
                let snap = self.snap.lock();
                let node = field.rsplit_once('|').map_or(field, |(n, _)| n);
                if snap.leases.contains_key(node) {
                    State::Lapsed
                } else {
                    State::Dead
                }
            }
        }
    }

    /// The incarnations the cache holds live, and those lapsed (arguments
    /// of `scripts/reserve.lua`).
    pub(super) fn live_and_lapsed(&self) -> (Vec<String>, Vec<String>) {
        let snap = self.snap.lock();
        let now = crate::protocol::now_ms() as i64 + snap.offset_ms;
        let (mut live, mut lapsed) = (vec![], vec![]);
        for (node, &expiry) in &snap.leases {
            if let Some(boot) = snap.boots.get(node) {
                let field = super::registrar::incarnation(node, boot);
                if expiry >= now {
                    live.push(field);
                } else {
                    lapsed.push(field);
                }
            }
        }
        (live, lapsed)
    }

    /// The live node ids (for `Stats`).
    pub(super) fn live_nodes(&self) -> Vec<String> {
        let snap = self.snap.lock();
        let now = crate::protocol::now_ms() as i64 + snap.offset_ms;
        let mut nodes: Vec<String> = snap
            .leases
            .iter()
            .filter(|(_, &e)| e >= now)
            .map(|(n, _)| n.clone())
            .collect();
        nodes.sort();
        nodes
    }
}
