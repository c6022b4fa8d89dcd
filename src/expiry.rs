//! Token expiry of live connections: one ordered map for the whole node,
//! keyed by (`exp`, connection id), and one ticker task (in `server`) that
//! closes every connection whose token has expired with 4401. There is no
//! timer per connection; an entry is 24 bytes plus the map's node overhead
//! and exists exactly as long as its connection is attached, so the map
//! holds at most one entry per live connection.

use crate::hub::Conn;
use crate::protocol::Disconnect;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

/// The node's connections ordered by token expiry. The lock is a
/// `parking_lot::Mutex` held for a map insert/remove or one sweep, never
/// across an `.await`.
#[derive(Default)]
pub struct Expiries {
    map: Mutex<BTreeMap<(u64, u64), Weak<Conn>>>,
}

impl Expiries {
    /// Closes `conn` with 4401 once the clock reaches `exp` (Unix seconds).
    pub fn watch(&self, exp: u64, conn: &Arc<Conn>) {
        self.map.lock().insert((exp, conn.id), Arc::downgrade(conn));
    }

    /// Forgets a connection that ended (detach).
    pub fn forget(&self, exp: u64, conn_id: u64) {
        self.map.lock().remove(&(exp, conn_id));
    }

    /// Asks every connection whose token expired at or before `now` (Unix
    /// seconds) to close with 4401; returns how many.
    pub fn expire(&self, now: u64) -> usize {
        let due = {
            let mut map = self.map.lock();
            let rest = map.split_off(&(now + 1, 0));
            std::mem::replace(&mut *map, rest)
        };
        let mut n = 0;
        for conn in due.into_values().filter_map(|w| w.upgrade()) {
            conn.close(Disconnect::TokenExpired);
            n += 1;
        }
        if n > 0 {
            metrics::counter!("herald_token_expired_closes_total").increment(n as u64);
        }
        n
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;

    #[test]
    fn closes_due_connections_only_and_forgets_ended_ones() {
        let hub = Hub::new("n");
        let (a, _) = hub.register(
            "a",
            crate::hub::QueueLimits {
                bytes: 1 << 20,
                frames: 4,
            },
        );
        let (b, _) = hub.register(
            "b",
            crate::hub::QueueLimits {
                bytes: 1 << 20,
                frames: 4,
            },
        );
        let (c, _) = hub.register(
            "c",
            crate::hub::QueueLimits {
                bytes: 1 << 20,
                frames: 4,
            },
        );
        let e = Expiries::default();
        e.watch(100, &a);
        e.watch(101, &b);
        e.watch(100, &c);
        e.forget(100, c.id);
        assert_eq!(e.expire(99), 0);
        assert_eq!(e.expire(100), 1);
        let mut out = Vec::new();
        assert_eq!(a.take(&mut out).close, Some(Disconnect::TokenExpired));
        assert_eq!(b.take(&mut out).close, None);
        assert_eq!(c.take(&mut out).close, None);
        assert_eq!(e.len(), 1);
        // A connection dropped without forget costs nothing at expiry.
        hub.unregister(&b);
        drop(b);
        assert_eq!(e.expire(200), 0);
        assert_eq!(e.len(), 0);
    }
}
