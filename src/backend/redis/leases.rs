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
    /// When the read was sent (this node's clock): the cache holds at least
    /// what Redis held then.
    at: Option<Instant>,
    /// Redis's clock minus this node's, in ms, at the read.
    offset_ms: i64,
    /// node id -> lease expiry (Redis clock, ms).
    leases: HashMap<String, i64>,
    /// node id -> current boot id.
    boots: HashMap<String, String>,
    /// Redis's clock at this read.
    redis_now: i64,
    /// Redis's clock when this node's contact with Redis last resumed
    /// after a gap longer than a lease (or at the first read).
    healthy_since: i64,
}

impl Snapshot {
    /// Whether a lease that ran out at `expiry` still counts at `now`
    /// (Redis clock): live, or lapsed while nobody could reach Redis. When
    /// Redis freezes or restarts, every lease runs out with no node at
    /// fault; reads queued behind the outage may run before the other
    /// nodes' renewals. For one lease after this node's contact resumed,
    /// a lapsed lease still counts (the per-user cap errs on the side of
    /// refusing, never of admitting one connection too many); a node that
    /// dies while Redis is healthy stops counting when its lease ends.
    fn counts(&self, expiry: i64, now: i64, lease_ms: i64) -> bool {
        expiry >= now || now < self.healthy_since + lease_ms
    }
}

/// The cache (see the module doc).
pub(super) struct Leases {
    snap: Mutex<Snapshot>,
    /// The node lease (`--node-lease`), in ms.
    lease_ms: i64,
}

impl Leases {
    pub(super) fn new(lease: std::time::Duration) -> Leases {
        Leases {
            snap: Mutex::new(Snapshot::default()),
            lease_ms: lease.as_millis() as i64,
        }
    }

    /// Stores what a renewal or a read returned: Redis's clock and the
    /// nodes set (`{now, node1, expiry1, ...}`, from `scripts/renew.lua`),
    /// and the boots hash, read by a request sent at `asked`.
    pub(super) fn store(
        &self,
        asked: Instant,
        nodes: Value,
        boots: HashMap<String, String>,
    ) -> Result<()> {
        let v = array(nodes)?;
        let now = int(v.first().unwrap_or(&Value::Nil))?;
        let mut leases = HashMap::with_capacity(v.len() / 2);
        for pair in v[1..].chunks(2) {
            if let [node, expiry] = pair {
                leases.insert(text(node)?.to_string(), int(expiry)?);
            }
        }
        let mut snap = self.snap.lock();
        let healthy_since = if snap.at.is_none() || now - snap.redis_now > self.lease_ms {
            now
        } else {
            snap.healthy_since
        };
        *snap = Snapshot {
            at: Some(asked),
            offset_ms: now - crate::protocol::now_ms() as i64,
            leases,
            boots,
            redis_now: now,
            healthy_since,
        };
        Ok(())
    }

    /// Reads the nodes set and the boots hash again (no write).
    pub(super) async fn refresh(&self, conn: &Conn, scripts: &Scripts) -> Result<()> {
        let nodes = keys::nodes();
        let asked = Instant::now();
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
        self.store(asked, nodes, boots)
    }

    /// Refreshes unless the cache was read at or after `since`. A reader
    /// that met an incarnation the cache does not know passes the instant
    /// before it read that reservation: the node wrote its lease before
    /// reserving, so a cache read after that instant knows it. (A throttle
    /// such as [`Leases::refresh_if_old`] is wrong here: a node that started
    /// after the last read would be counted dead.)
    pub(super) async fn refresh_since(
        &self,
        since: Instant,
        conn: &Conn,
        scripts: &Scripts,
    ) -> Result<()> {
        let newer = self.snap.lock().at.is_some_and(|at| at >= since);
        if newer {
            return Ok(());
        }
        self.refresh(conn, scripts).await
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
            (Some(&expiry), Some(_)) if snap.counts(expiry, now, self.lease_ms) => {
                Some(State::Live)
            }
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
                let field = keys::incarnation(node, boot);
                if snap.counts(expiry, now, self.lease_ms) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(now: i64, leases: &[(&str, i64)], boots: &[(&str, &str)]) -> Leases {
        let mut v = vec![Value::Int(now)];
        for (n, e) in leases {
            v.push(Value::BulkString(n.as_bytes().to_vec()));
            v.push(Value::Int(*e));
        }
        let l = Leases::new(std::time::Duration::from_millis(1000));
        l.store(
            Instant::now(),
            Value::Array(v),
            boots
                .iter()
                .map(|(n, b)| (n.to_string(), b.to_string()))
                .collect(),
        )
        .unwrap();
        // In contact with Redis for long: no grace after an outage.
        l.snap.lock().healthy_since = now - 60_000;
        l
    }

    /// After Redis froze for longer than a lease, every lease has run out
    /// with no node at fault: for one lease after contact resumes, lapsed
    /// leases still count; later they do not.
    #[test]
    fn lapsed_leases_count_for_a_lease_after_an_outage() {
        let t0 = 1_000_000;
        let l = cache(
            t0,
            &[("a", t0 + 1000), ("b", t0 + 1000)],
            &[("a", "1"), ("b", "1")],
        );
        let reply = |now: i64| {
            Value::Array(vec![
                Value::Int(now),
                Value::BulkString(b"a".to_vec()),
                Value::Int(now + 1000),
                Value::BulkString(b"b".to_vec()),
                Value::Int(t0 + 1000),
            ])
        };
        let boots = || {
            [("a", "1"), ("b", "1")]
                .map(|(n, b)| (n.to_string(), b.to_string()))
                .into()
        };
        // Redis answers again 5 s later: b has not renewed yet.
        l.store(Instant::now(), reply(t0 + 5000), boots()).unwrap();
        l.snap.lock().offset_ms = t0 + 5000 - crate::protocol::now_ms() as i64;
        assert_eq!(l.state("b|1"), Some(State::Live), "within the grace");
        assert_eq!(l.live_and_lapsed().1, Vec::<String>::new());
        // A lease and more after contact resumed, b still silent: lapsed.
        l.store(Instant::now(), reply(t0 + 5500), boots()).unwrap();
        l.snap.lock().offset_ms = t0 + 6100 - crate::protocol::now_ms() as i64;
        assert_eq!(l.state("b|1"), None);
        assert_eq!(l.live_and_lapsed().1, vec!["b|1"]);
    }

    #[test]
    fn incarnations_are_live_lapsed_dead_or_unknown() {
        let now = 1_000_000;
        let l = cache(
            now,
            &[("a", now + 5000), ("b", now - 5000), ("c", now + 5000)],
            &[("a", "1"), ("b", "1"), ("c", "2")],
        );
        assert_eq!(l.state("a|1"), Some(State::Live));
        assert_eq!(l.state("c|1"), Some(State::Dead), "c restarted with boot 2");
        // Unsure until re-read: b's lease ran out (it may have renewed
        // since), d is not known at all (it may have just started).
        assert_eq!(l.state("b|1"), None);
        assert_eq!(l.state("d|9"), None);
        assert_eq!(l.state_fresh("b|1"), State::Lapsed);
        assert_eq!(l.state_fresh("d|9"), State::Dead);
        assert_eq!(l.state("no-separator"), None);
        let (mut live, lapsed) = l.live_and_lapsed();
        live.sort();
        assert_eq!(live, vec!["a|1", "c|2"]);
        assert_eq!(lapsed, vec!["b|1"]);
        assert_eq!(l.live_nodes(), vec!["a", "c"]);
    }

    #[test]
    fn node_ids_with_a_bar_keep_their_boot_apart() {
        let now = 5_000;
        let l = cache(now, &[("x|y", now + 100)], &[("x|y", "b")]);
        assert_eq!(l.state("x|y|b"), Some(State::Live));
    }
}
