//! SendBatch: independent items with a result each, the whole-call limits,
//! and exactly once per item when a batch is retried with the same keys
//! (also after a partial failure, and across nodes after Redis froze).
#[macro_use]
mod common;

use common::*;
use herald::proto::*;
use std::time::Duration;
use tonic::Code;

fn item(users: &[&str], payload: &str, transient: bool, key: &str) -> SendToUserRequest {
    SendToUserRequest {
        user_ids: users.iter().map(|u| u.to_string()).collect(),
        topic: "batch".into(),
        payload_json: payload.into(),
        transient,
        idempotency_key: key.into(),
    }
}

fn batch(items: Vec<SendToUserRequest>) -> SendBatchRequest {
    SendBatchRequest { items }
}

async fn items_are_independent_with_a_result_each(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let (x, y, z) = (uid("bx"), uid("by"), uid("bz"));
    let (mut wx, _) = node.connect(&x).await;
    let (mut wy, _) = node.connect(&y).await;
    let r = c
        .send_batch(batch(vec![
            item(&[&x], r#"{"n":0}"#, false, &uid("k")),
            item(&[&y], r#"{"n":1}"#, true, ""),
            item(&[&x, &z], r#"{"n":2}"#, false, ""),
            item(&[&x], "{not json", false, ""),
            item(&[], "1", false, ""),
            item(&[&y], r#"{"n":5}"#, true, &uid("k")),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 6);
    let ok = |i: usize| {
        assert_eq!(r.results[i].error_code, 0, "item {i}: {:?}", r.results[i]);
        &r.results[i].deliveries
    };
    assert!(ok(0)[0].online && !ok(0)[0].replayed);
    assert!(ok(1)[0].message_id.starts_with('t') && ok(1)[0].online);
    assert_eq!(ok(2).len(), 2);
    assert!(ok(2)[0].online && !ok(2)[1].online, "{:?}", ok(2));
    for (i, what) in [(3, "not valid JSON"), (4, "at least one user")] {
        let res = &r.results[i];
        assert_eq!(res.error_code, Code::InvalidArgument as i32, "item {i}");
        assert!(res.error_message.contains(what), "{}", res.error_message);
        assert!(res.deliveries.is_empty());
    }
    assert!(ok(5)[0].online);
    // x: items 0 and 2 (stored), y: items 1 and 5 (live-only); once each.
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(wx.next_of("message").await["data"]["n"].as_i64().unwrap());
    }
    seen.sort();
    assert_eq!(seen, [0, 2]);
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(wy.next_of("message").await["data"]["n"].as_i64().unwrap());
    }
    seen.sort();
    assert_eq!(seen, [1, 5]);
    wx.expect_silence(Duration::from_millis(300)).await;
    wy.expect_silence(Duration::from_millis(100)).await;
    assert_eq!(unread(&mut c, &x).await, 2);
    assert_eq!(
        unread(&mut c, &y).await,
        0,
        "live-only items are not stored"
    );
    assert_eq!(unread(&mut c, &z).await, 1, "stored for an offline user");
    node.stop().await;
}

async fn a_retried_batch_stores_each_item_once(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let users: Vec<String> = (0..6).map(|i| uid(&format!("r{i}"))).collect();
    let mut sockets = Vec::new();
    for u in &users[..3] {
        sockets.push(node.connect(u).await.0);
    }
    let keys: Vec<String> = (0..6).map(|i| uid(&format!("key{i}"))).collect();
    let items: Vec<SendToUserRequest> = (0..6)
        .map(|i| item(&[&users[i]], &format!(r#"{{"n":{i}}}"#), false, &keys[i]))
        .collect();
    // As if the first call stored items 0, 2 and 4 before it failed.
    let partial = c
        .send_batch(batch(vec![
            items[0].clone(),
            items[2].clone(),
            items[4].clone(),
        ]))
        .await
        .unwrap()
        .into_inner();
    // The backend retries the whole batch with the same keys, twice.
    let retry = c
        .send_batch(batch(items.clone()))
        .await
        .unwrap()
        .into_inner();
    let again = c.send_batch(batch(items)).await.unwrap().into_inner();
    for i in 0..6 {
        let d = &retry.results[i].deliveries[0];
        assert_eq!(retry.results[i].error_code, 0);
        assert_eq!(d.replayed, i % 2 == 0, "item {i}: {d:?}");
        if i % 2 == 0 {
            assert_eq!(
                d.message_id,
                partial.results[i / 2].deliveries[0].message_id
            );
        }
        let d2 = &again.results[i].deliveries[0];
        assert!(d2.replayed, "item {i} the second time");
        assert_eq!(d2.message_id, d.message_id);
    }
    for u in &users {
        assert_eq!(unread(&mut c, u).await, 1, "{u}: stored once");
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        assert_eq!(ws.next_of("message").await["data"]["n"], i as i64);
        ws.expect_silence(Duration::from_millis(200)).await;
    }
    // A key reused for another request fails its item alone, with nothing
    // stored for it.
    let r = c
        .send_batch(batch(vec![
            item(&[&users[0]], r#"{"other":1}"#, false, &keys[0]),
            item(&[&users[1]], r#"{"n":"new"}"#, false, ""),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].error_code, Code::InvalidArgument as i32);
    assert!(r.results[0].error_message.contains("idempotency_key"));
    assert_eq!(r.results[1].error_code, 0);
    assert_eq!(unread(&mut c, &users[0]).await, 1);
    assert_eq!(unread(&mut c, &users[1]).await, 2);
    node.stop().await;
}

async fn whole_call_limits_refuse_the_batch(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("lim");
    let (mut ws, _) = node.connect(&u).await;
    let refused = |r: Result<tonic::Response<SendBatchResponse>, tonic::Status>, what: &str| {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(what), "{}", s.message());
    };
    refused(c.send_batch(batch(vec![])).await, "at least one item");
    let many: Vec<_> = (0..1001).map(|_| item(&[&u], "1", false, "")).collect();
    refused(c.send_batch(batch(many)).await, "at most 1000");
    let wide: Vec<String> = (0..1000).map(|i| format!("{u}-{i}")).collect();
    let wide: Vec<&str> = wide.iter().map(|s| s.as_str()).collect();
    let wide_items: Vec<_> = (0..11).map(|_| item(&wide, "1", true, "")).collect();
    refused(c.send_batch(batch(wide_items)).await, "recipients");
    let big = format!("\"{}\"", "x".repeat(60_000));
    let heavy: Vec<_> = (0..18).map(|_| item(&[&u], &big, false, "")).collect();
    refused(c.send_batch(batch(heavy)).await, "bytes");
    // Nothing of any refused batch was sent.
    ws.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(unread(&mut c, &u).await, 0);
    // (The recorder is process-wide: the other backend's run counts too.)
    for reason in ["empty", "items", "recipients", "bytes"] {
        let name = format!("herald_batch_refused_total{{reason=\"{reason}\"}}");
        assert!(metric(&node, &name).await >= 1.0, "{name}");
    }
    node.stop().await;
}

on_both_backends!(
    items_are_independent_with_a_result_each,
    a_retried_batch_stores_each_item_once,
    whole_call_limits_refuse_the_batch,
);

/// A batch that failed because Redis was frozen (its writes may run when
/// Redis wakes up) is retried whole, with the same keys, through another
/// node: every recipient gets every item exactly once.
#[tokio::test]
async fn a_batch_retried_after_a_redis_freeze_is_sent_once_across_nodes() {
    let redis = RedisServer::start();
    let (n1, n2) = TestNode::pair_on(&redis).await;
    let mut c1 = n1.client().await;
    let mut c2 = n2.client().await;
    let users: Vec<String> = (0..4).map(|i| uid(&format!("fz{i}"))).collect();
    let mut sockets = Vec::new();
    for u in &users {
        sockets.push(n2.connect(u).await.0);
    }
    let items: Vec<SendToUserRequest> = users
        .iter()
        .enumerate()
        .map(|(i, u)| item(&[u], &format!(r#"{{"n":{i}}}"#), false, &uid("fk")))
        .collect();

    redis.signal("STOP");
    let mut req = tonic::Request::new(batch(items.clone()));
    req.set_timeout(Duration::from_millis(800));
    let first = c1.send_batch(req).await;
    let failed = match &first {
        Err(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        ),
        Ok(r) => r
            .get_ref()
            .results
            .iter()
            .all(|x| x.error_code == Code::Unavailable as i32),
    };
    assert!(failed, "a frozen Redis fails the batch: {first:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.signal("CONT");

    // Bounded: a Redis that never comes back fails the test, not hangs it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let answer = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retried batch did not succeed within 30 s of Redis coming back"
        );
        match c2.send_batch(batch(items.clone())).await {
            Ok(r) if r.get_ref().results.iter().all(|x| x.error_code == 0) => break r.into_inner(),
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("retry failed: {s:?}"),
        }
    };
    for (i, ws) in sockets.iter_mut().enumerate() {
        let id = answer.results[i].deliveries[0].message_id.clone();
        let m = ws.next_of("message").await;
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["data"]["n"], i as i64);
        ws.expect_silence(Duration::from_millis(300)).await;
    }
    for u in &users {
        let (c, u) = (c2.clone(), u.clone());
        eventually("the unread count settles at 1", move || {
            let (mut c, u) = (c.clone(), u.clone());
            async move { unread(&mut c, &u).await == 1 }
        })
        .await;
    }
    n1.stop().await;
    n2.stop().await;
}
