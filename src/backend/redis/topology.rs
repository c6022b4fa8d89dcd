//! The Redis Cluster's slot map as Herald reads it for itself, over a
//! plain connection to one node at a time and not through the `redis`
//! crate's cluster connection, whose routing is what may be stale after a
//! failover (see [`super::sharded`]): what the registrar compares to notice
//! a failover or a slot move, and where it finds a node that already knows
//! the new map.

use crate::error::Error;
use redis::Value;
use std::time::Duration;

/// The slot map as a live node reports it: (first slot, last slot,
/// primary) per range, sorted. Compared, not interpreted: any change is a
/// reason to replace the connections and prove subscriptions again.
pub(super) type SlotMap = Vec<(i64, i64, String)>;

/// Reads the slot map over a plain connection to one cluster node at a
/// time, not through the crate's cluster connection, whose routing is what
/// may be stale: the seeds first, then every primary a map named; a node
/// that fails is left for the next.
pub(super) struct Topology {
    nodes: Vec<String>,
    next: usize,
    conn: Option<redis::aio::MultiplexedConnection>,
}

impl Topology {
    pub(super) fn new(seeds: &[String]) -> Self {
        Topology {
            nodes: seeds.to_vec(),
            next: 0,
            conn: None,
        }
    }

    /// Asks the next node from the next read on: the one asked so far may
    /// not have heard of a change yet (called while requests fail).
    pub(super) fn rotate(&mut self) {
        self.conn = None;
        self.next += 1;
    }

    pub(super) async fn read(&mut self) -> crate::error::Result<SlotMap> {
        let mut last = Error::Unavailable("no cluster node to ask".into());
        for _ in 0..self.nodes.len() {
            if self.conn.is_none() {
                let url = &self.nodes[self.next % self.nodes.len()];
                let connected = async {
                    let client = redis::Client::open(url.as_str())?;
                    client.get_multiplexed_async_connection().await
                };
                match tokio::time::timeout(Duration::from_millis(500), connected).await {
                    Ok(Ok(c)) => self.conn = Some(c),
                    _ => {
                        self.next += 1;
                        continue;
                    }
                }
            }
            let conn = self.conn.as_mut().expect("just connected");
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SLOTS");
            let asked = cmd.query_async::<Value>(conn);
            match tokio::time::timeout(Duration::from_secs(1), asked).await {
                Ok(Ok(v)) => {
                    let (map, primaries) = parse_slots(v)?;
                    // Auth and options as in the seeds (the first one's).
                    for (host, port) in primaries {
                        let url = with_host(&self.nodes[0], &host, port);
                        if !self.nodes.contains(&url) {
                            self.nodes.push(url);
                        }
                    }
                    return Ok(map);
                }
                Ok(Err(e)) => last = e.into(),
                Err(_) => last = Error::Unavailable("CLUSTER SLOTS timed out".into()),
            }
            self.conn = None;
            self.next += 1;
        }
        Err(last)
    }
}

/// The address of a primary serving, in `now`, a range it did not serve in
/// `before` (a promoted replica, or a slot's new owner).
pub(super) fn newly_serving(before: &SlotMap, now: &SlotMap) -> Option<(String, u16)> {
    let (_, _, who) = now.iter().find(|r| !before.contains(r))?;
    let mut f = who.split(' ');
    let host = f.next()?.to_string();
    let port = f.next()?.parse().ok()?;
    Some((host, port))
}

/// `seed` (a `redis://[auth@]host:port` URL) with another host and port.
pub(super) fn with_host(seed: &str, host: &str, port: u16) -> String {
    let rest = seed.strip_prefix("redis://").unwrap_or(seed);
    match rest.rsplit_once('@') {
        Some((auth, _)) => format!("redis://{auth}@{host}:{port}"),
        None => format!("redis://{host}:{port}"),
    }
}

/// The slot map of a `CLUSTER SLOTS` reply, and its primaries' addresses.
fn parse_slots(v: Value) -> crate::error::Result<(SlotMap, Vec<(String, u16)>)> {
    let mut primaries = Vec::new();
    let Value::Array(ranges) = v else {
        return Err(Error::Backend("CLUSTER SLOTS: not an array".into()));
    };
    let mut map = Vec::with_capacity(ranges.len());
    for r in ranges {
        let Value::Array(f) = r else { continue };
        let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(primary))) =
            (f.first(), f.get(1), f.get(2))
        else {
            continue;
        };
        // [host, port, id, ...]: the id names the node across restarts.
        let who = primary
            .iter()
            .map(|x| match x {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::Int(i) => i.to_string(),
                _ => String::new(),
            })
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        if let (Some(Value::BulkString(h)), Some(Value::Int(p))) = (primary.first(), primary.get(1))
        {
            if let Ok(p) = u16::try_from(*p) {
                primaries.push((String::from_utf8_lossy(h).into_owned(), p));
            }
        }
        map.push((*a, *b, who));
    }
    map.sort();
    Ok((map, primaries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(a: i64, b: i64, who: &str) -> (i64, i64, String) {
        (a, b, who.to_string())
    }

    #[test]
    fn the_newly_serving_primary_is_the_one_that_took_a_range_over() {
        let before = vec![
            range(0, 5460, "127.0.0.1 7000 a"),
            range(5461, 10922, "127.0.0.1 7001 b"),
        ];
        let now = vec![
            range(0, 5460, "127.0.0.1 7000 a"),
            range(5461, 10922, "127.0.0.1 7004 e"),
        ];
        assert_eq!(
            newly_serving(&before, &now),
            Some(("127.0.0.1".to_string(), 7004))
        );
        assert_eq!(newly_serving(&now, &now), None);
    }

    #[test]
    fn a_seed_keeps_its_credentials_with_another_address() {
        assert_eq!(
            with_host("redis://u:p@10.0.0.1:7000", "10.0.0.2", 7004),
            "redis://u:p@10.0.0.2:7004"
        );
        assert_eq!(
            with_host("redis://10.0.0.1:7000", "10.0.0.2", 7004),
            "redis://10.0.0.2:7004"
        );
    }
}
