//! The Redis inbox scripts' cost and age trimming, read from Redis itself.

#[macro_use]
mod common;

use common::*;
use std::time::Duration;

/// Calls of one Redis command since the last `CONFIG RESETSTAT`, from
/// `INFO commandstats`.
async fn calls(redis_url: &str, command: &str) -> u64 {
    let client = redis::Client::open(redis_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Storing a message with nothing old enough to expire reads the oldest
/// entry only: the backwards scan for expired entries (XREVRANGE from an id
/// older than every entry walks the whole stream) runs only when the
/// oldest entry is past `--inbox-max-age`.
#[tokio::test]
async fn append_does_not_scan_the_inbox_when_nothing_expires() {
    let redis = RedisServer::start();
    let mut a = args();
    a.redis_url = Some(redis.url());
    let node = TestNode::start_with(a).await;
    let mut c = node.client().await;
    let u = uid("noscan");
    let before = calls(&redis.url(), "xrevrange").await;
    let ids = send_numbered(&mut c, &u, 50).await;
    assert_eq!(ids.len(), 50);
    assert_eq!(calls(&redis.url(), "xrevrange").await, before);
    assert_eq!(unread(&mut c, &u).await, 50);
    node.stop().await;
}

/// A stored send with nothing due runs four commands in the script
/// (HMGET, XADD, HSET, PUBLISH): no EXISTS, no trim reads (XRANGE, XLEN)
/// while no message can be too old or too many, no expiry refresh (PEXPIRE)
/// within 1/32 of the inbox's lifetime of the last one; the keys still live
/// at least `--inbox-max-age` after the last send.
#[tokio::test]
async fn a_plain_stored_send_runs_four_commands() {
    let redis = RedisServer::start();
    let mut a = args();
    a.redis_url = Some(redis.url());
    let node = TestNode::start_with(a).await;
    let mut c = node.client().await;
    let u = uid("slim");
    // The first send creates the inbox, sets its expiry and learns its
    // oldest message.
    send_numbered(&mut c, &u, 1).await;
    let skipped = ["exists", "xrange", "xlen", "pexpire", "hincrby", "hget"];
    let mut before = Vec::new();
    for cmd in skipped {
        before.push(calls(&redis.url(), cmd).await);
    }
    let (xadd, publish) = (
        calls(&redis.url(), "xadd").await,
        calls(&redis.url(), "publish").await,
    );
    send_numbered(&mut c, &u, 40).await;
    for (cmd, n) in skipped.iter().zip(before) {
        assert_eq!(
            calls(&redis.url(), cmd).await,
            n,
            "{cmd} ran in a plain stored send"
        );
    }
    assert_eq!(calls(&redis.url(), "xadd").await, xadd + 40);
    assert_eq!(calls(&redis.url(), "publish").await, publish + 40);
    assert_eq!(unread(&mut c, &u).await, 41);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    for key in ["inbox", "meta"] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("herald:{{{u}}}:{key}"))
            .query_async(&mut r)
            .await
            .unwrap();
        assert!(ttl >= 7 * 24 * 3600 * 1000 - 60_000, "{key} lives {ttl} ms");
    }
    node.stop().await;
}

/// A message older than `--inbox-max-age` is dropped by the next store
/// (the keys themselves expire that long after the last write), and a
/// resume from before it reports the gap.
#[tokio::test]
async fn messages_past_max_age_are_dropped_on_redis() {
    let redis = RedisServer::start();
    let mut a = args();
    a.redis_url = Some(redis.url());
    a.inbox_max_age = Duration::from_secs(1);
    let node = TestNode::start_with(a).await;
    let mut c = node.client().await;
    let u = uid("age");
    let first = send_numbered(&mut c, &u, 1).await.remove(0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = send_numbered(&mut c, &u, 1).await.remove(0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // `first` is 1.2 s old now: this store drops it.
    let third = send_numbered(&mut c, &u, 1).await.remove(0);
    assert_eq!(unread(&mut c, &u).await, 2, "the first one expired");
    let (_ws, w) = node.connect_since(&u, Some("1-0")).await;
    assert_eq!(w["resumed"], false, "the first message was dropped");
    let (mut ws, w) = node.connect_since(&u, Some(&first)).await;
    assert_eq!(w["resumed"], true, "everything after the first is stored");
    assert_eq!(ws.next_of("message").await["id"], second.as_str());
    assert_eq!(ws.next_of("message").await["id"], third.as_str());
    node.stop().await;
}
