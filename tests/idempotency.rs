//! Idempotency keys: a backend that retries with the same key stores and
//! pushes a message exactly once, on one node or across nodes, also when
//! the first call failed because Redis was frozen and ran it later.
#[macro_use]
mod common;

use common::*;
use herald::proto::*;
use std::time::Duration;
use tonic::Code;

fn keyed(users: &[&str], payload: &str, key: &str) -> SendToUserRequest {
    SendToUserRequest {
        user_ids: users.iter().map(|u| u.to_string()).collect(),
        topic: "orders".into(),
        payload_json: payload.into(),
        transient: false,
        idempotency_key: key.into(),
    }
}

async fn a_repeated_key_stores_and_pushes_once(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("idem");
    let (mut ws, _) = node.connect(&u).await;
    let key = uid("order-42");
    let first = c
        .send_to_user(keyed(&[&u], r#"{"n":1}"#, &key))
        .await
        .unwrap()
        .into_inner();
    let d1 = &first.deliveries[0];
    assert!(!d1.replayed && d1.online);
    let again = c
        .send_to_user(keyed(&[&u], r#"{"n":1}"#, &key))
        .await
        .unwrap()
        .into_inner();
    let d2 = &again.deliveries[0];
    assert!(d2.replayed, "the retry is answered from the first call");
    assert_eq!(d2.message_id, d1.message_id);
    assert_eq!(d2.online, d1.online);
    assert_eq!(ws.next_of("message").await["id"], d1.message_id.as_str());
    ws.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(unread(&mut c, &u).await, 1);
    // A new key is a new message.
    let other = send(&mut c, &[&u], r#"{"n":1}"#).await;
    assert_ne!(other.deliveries[0].message_id, d1.message_id);
    assert_eq!(unread(&mut c, &u).await, 2);
    node.stop().await;
}

async fn a_partly_done_multi_user_send_completes_on_retry(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let (x, y) = (uid("x"), uid("y"));
    let key = uid("k");
    // As if the first call stored for x only before it failed.
    let first = c
        .send_to_user(keyed(&[&x], "1", &key))
        .await
        .unwrap()
        .into_inner();
    let retry = c
        .send_to_user(keyed(&[&x, &y], "1", &key))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.deliveries[0].replayed);
    assert_eq!(
        retry.deliveries[0].message_id,
        first.deliveries[0].message_id
    );
    assert!(!retry.deliveries[1].replayed);
    assert_eq!(unread(&mut c, &x).await, 1);
    assert_eq!(unread(&mut c, &y).await, 1);
    node.stop().await;
}

async fn a_key_reused_for_another_request_is_refused(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("reuse");
    let key = uid("k");
    c.send_to_user(keyed(&[&u], "1", &key)).await.unwrap();
    let err = c.send_to_user(keyed(&[&u], "2", &key)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("different request"),
        "{}",
        err.message()
    );
    for bad in ["has space", &"k".repeat(129), "tab\there", "é"] {
        let err = c.send_to_user(keyed(&[&u], "1", bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
        assert!(err.message().contains("idempotency_key"));
    }
    assert_eq!(unread(&mut c, &u).await, 1);
    node.stop().await;
}

async fn transient_and_broadcast_keys_push_once(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("live");
    let (mut ws, _) = node.connect(&u).await;
    let key = uid("typing");
    let mut req = keyed(&[&u], "\"typing\"", &key);
    req.transient = true;
    let first = c.send_to_user(req.clone()).await.unwrap().into_inner();
    let again = c.send_to_user(req).await.unwrap().into_inner();
    assert!(!first.deliveries[0].replayed && again.deliveries[0].replayed);
    assert_eq!(
        again.deliveries[0].message_id,
        first.deliveries[0].message_id
    );
    assert_eq!(ws.next_of("message").await["data"], "typing");
    let bkey = uid("maintenance");
    let req = BroadcastRequest {
        topic: "ops".into(),
        payload_json: "\"restart at 2am\"".into(),
        idempotency_key: bkey.clone(),
    };
    let b1 = c.broadcast(req.clone()).await.unwrap().into_inner();
    let b2 = c.broadcast(req).await.unwrap().into_inner();
    assert!(!b1.replayed && b2.replayed);
    assert_eq!(b1.message_id, b2.message_id);
    assert_eq!(ws.next_of("message").await["id"], b1.message_id.as_str());
    ws.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(unread(&mut c, &u).await, 0);
    node.stop().await;
}

/// Issue 20, item 5: a call refused because its key conflicts for one of
/// its users did nothing for the others: nothing stored or pushed, no key
/// recorded (before, it stored and pushed for the others, so a caller that
/// believed the error and retried without the key got doubles).
async fn a_refused_call_has_no_side_effects(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let (x, y, z) = (uid("x"), uid("y"), uid("z"));
    let (mut wx, _) = node.connect(&x).await;
    let key = uid("k");
    c.send_to_user(keyed(&[&y], "1", &key)).await.unwrap();
    let err = c
        .send_to_user(keyed(&[&x, &y, &z], "2", &key))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains(y.as_str()), "{}", err.message());
    assert_eq!(unread(&mut c, &x).await, 0, "nothing stored for x");
    assert_eq!(unread(&mut c, &z).await, 0, "nothing stored for z");
    wx.expect_silence(Duration::from_millis(300)).await;
    // Live-only: the refused call recorded no key for x either.
    let key2 = uid("k2");
    let mut first = keyed(&[&y], "\"a\"", &key2);
    first.transient = true;
    c.send_to_user(first).await.unwrap();
    let mut other = keyed(&[&x, &y], "\"b\"", &key2);
    other.transient = true;
    let err = c.send_to_user(other).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    wx.expect_silence(Duration::from_millis(300)).await;
    let mut to_x = keyed(&[&x], "\"b\"", &key2);
    to_x.transient = true;
    let r = c.send_to_user(to_x).await.unwrap().into_inner();
    assert!(
        !r.deliveries[0].replayed,
        "x's record was not written by the refused call"
    );
    assert_eq!(wx.next_of("message").await["data"], "b");
    wx.expect_silence(Duration::from_millis(300)).await;
    node.stop().await;
}

/// Issue 20, item 6: a key is one request whichever its `transient` flag:
/// reused with the other flag, it is refused (before, stored and transient
/// records lived apart and both sends went out).
async fn a_key_reused_with_the_other_transient_flag_is_refused(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("flag");
    let (mut ws, _) = node.connect(&u).await;
    let key = uid("k");
    c.send_to_user(keyed(&[&u], "1", &key)).await.unwrap();
    assert_eq!(ws.next_of("message").await["data"], 1);
    let mut live = keyed(&[&u], "1", &key);
    live.transient = true;
    let err = c.send_to_user(live).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("transient"), "{}", err.message());
    let key2 = uid("k2");
    let mut live = keyed(&[&u], "2", &key2);
    live.transient = true;
    c.send_to_user(live).await.unwrap();
    assert_eq!(ws.next_of("message").await["data"], 2);
    let err = c.send_to_user(keyed(&[&u], "2", &key2)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    ws.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(unread(&mut c, &u).await, 1);
    node.stop().await;
}

on_both_backends!(
    a_refused_call_has_no_side_effects,
    a_key_reused_with_the_other_transient_flag_is_refused,
    a_repeated_key_stores_and_pushes_once,
    a_partly_done_multi_user_send_completes_on_retry,
    a_key_reused_for_another_request_is_refused,
    transient_and_broadcast_keys_push_once,
);

/// Issue 20: user ids and idempotency keys went into Redis names raw, so
/// user `alice`'s record of the key `x}:inbox` (`herald:{alice}:idem:s:x}:inbox`)
/// was the inbox of the user `alice}:idem:s:x`, whose sends then failed
/// with INTERNAL (WRONGTYPE); the other way round, an inbox stood where a
/// transient send's record was to go. Every part is encoded now: each is
/// its own name, and both users get their messages.
#[tokio::test]
async fn an_idempotency_key_cannot_take_another_users_inbox() {
    let node = TestNode::start(Backend::Redis).await;
    let mut c = node.client().await;
    let victim = "alice}:idem:s:x";
    let (mut ws, _) = node.connect(victim).await;
    let (mut alice, _) = node.connect("alice").await;

    let keyed_send = c
        .send_to_user(keyed(&["alice"], r#"{"for":"alice"}"#, "x}:inbox"))
        .await
        .expect("the keyed send to alice")
        .into_inner();
    let plain = c
        .send_to_user(keyed(&[victim], r#"{"for":"victim"}"#, ""))
        .await
        .expect("a send to the user whose inbox the record was")
        .into_inner();
    let d = &plain.deliveries[0];
    assert!(d.online && !d.replayed, "{d:?}");
    let m = ws.next_of("message").await;
    assert_eq!(m["id"], d.message_id.as_str());
    assert_eq!(m["data"]["for"], "victim");
    let m = alice.next_of("message").await;
    assert_eq!(m["id"], keyed_send.deliveries[0].message_id.as_str());
    assert_eq!(unread(&mut c, victim).await, 1);
    assert_eq!(unread(&mut c, "alice").await, 1);
    // The record still answers a retry.
    let again = c
        .send_to_user(keyed(&["alice"], r#"{"for":"alice"}"#, "x}:inbox"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.deliveries[0].replayed);
    assert_eq!(
        again.deliveries[0].message_id,
        keyed_send.deliveries[0].message_id
    );

    // The other way round: an inbox first, then a transient send's record
    // under what was the same name.
    let squatter = "bob}:idem:t:y";
    send(&mut c, &[squatter], "1").await;
    let (mut bob, _) = node.connect("bob").await;
    let mut live = keyed(&["bob"], r#""typing""#, "y}:inbox");
    live.transient = true;
    let r = c
        .send_to_user(live)
        .await
        .expect("a transient keyed send to bob")
        .into_inner();
    assert!(r.deliveries[0].online && !r.deliveries[0].replayed);
    assert_eq!(bob.next_of("message").await["data"], "typing");
    assert_eq!(unread(&mut c, squatter).await, 1);
    node.stop().await;
}

/// The observed defect: with Redis frozen, SendToUser answered UNAVAILABLE
/// and its write ran when Redis woke up, so a retry stored the message a
/// second time. With a key, the retry (on another node) finds the first
/// call's record whichever of the two Redis runs first.
#[tokio::test]
async fn a_retry_after_a_redis_freeze_stores_once_across_nodes() {
    let redis = RedisServer::start();
    let (n1, n2) = TestNode::pair_on(&redis).await;
    let mut c1 = n1.client().await;
    let mut c2 = n2.client().await;
    let u = uid("frozen");
    let (mut ws, _) = n2.connect(&u).await;
    let key = uid("invoice-7");

    redis.signal("STOP");
    let mut req = tonic::Request::new(keyed(&[&u], r#"{"invoice":7}"#, &key));
    req.set_timeout(Duration::from_millis(800));
    let first = c1.send_to_user(req).await;
    assert!(
        matches!(
            first.as_ref().map_err(|s| s.code()),
            Err(Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)
        ),
        "a frozen Redis fails the call: {first:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.signal("CONT");

    // The backend retries with the same key, through the other node, until
    // it gets an answer.
    let answer = loop {
        match c2
            .send_to_user(keyed(&[&u], r#"{"invoice":7}"#, &key))
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("retry failed: {s:?}"),
        }
    };
    let id = answer.deliveries[0].message_id.clone();
    // Stored once, pushed once.
    eventually("the unread count settles", || {
        let mut c = c2.clone();
        let u = u.clone();
        async move { unread(&mut c, &u).await == 1 }
    })
    .await;
    assert_eq!(ws.next_of("message").await["id"], id.as_str());
    ws.expect_silence(Duration::from_millis(500)).await;
    let (_, welcome) = n1.connect_since(&u, Some("0-0")).await;
    assert_eq!(welcome["replay"], 1, "{welcome}");
    n1.stop().await;
    n2.stop().await;
}
