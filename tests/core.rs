//! One node, driven by real tonic and WebSocket clients. Every test runs
//! twice: on the embedded backend and on a private real redis-server.
#[macro_use]
mod common;

use common::*;
use futures_util::SinkExt;
use herald::proto::*;
use serde_json::json;
use std::time::Duration;
use tonic::Code;

async fn two_devices_receive_and_another_user_does_not(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let (mut a1, w1) = node.connect(&alice).await;
    let (mut a2, _) = node.connect(&alice).await;
    let (mut b, _) = node.connect(&bob).await;
    assert_eq!(w1["user"], alice.as_str());
    assert_eq!(w1["unread"], 0);
    assert!(w1["conn"].as_str().is_some_and(|s| !s.is_empty()));

    let payload = r#"{"title": "Invoice #7 paid", "amount":[1, 2.5, null]}"#;
    let r = send(&mut c, &[&alice], payload).await;
    assert_eq!(r.deliveries.len(), 1);
    assert!(r.deliveries[0].online);
    let id = r.deliveries[0].message_id.clone();
    for ws in [&mut a1, &mut a2] {
        let m = ws.next_of("message").await;
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["topic"], "t");
        assert_eq!(
            m["data"],
            serde_json::from_str::<serde_json::Value>(payload).unwrap()
        );
        assert!(m["ts"].as_u64().unwrap() > 1_600_000_000_000);
        assert!(m.get("transient").is_none());
    }
    b.expect_silence(Duration::from_millis(300)).await;
    node.stop().await;
}

async fn payload_reaches_the_browser_byte_for_byte(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("raw");
    let (mut ws, _) = node.connect(&u).await;
    let payload = "{ \"a\" :\t\"\\u00e9\\n\" , \"b\": 1.50e3 }";
    send(&mut c, &[&u], payload).await;
    let raw = loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws.stream))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            tokio_tungstenite::tungstenite::Message::Text(t) => break t.to_string(),
            _ => continue,
        }
    };
    assert!(raw.contains(&format!("\"data\":{payload},")), "{raw}");
    node.stop().await;
}

async fn offline_user_gets_unread_count_and_replay_on_connect(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("off");
    let mut ids = vec![];
    for i in 0..3 {
        let r = send(&mut c, &[&u], &format!("{{\"n\":{i}}}")).await;
        assert!(!r.deliveries[0].online);
        ids.push(r.deliveries[0].message_id.clone());
    }
    assert_eq!(unread(&mut c, &u).await, 3);
    let (mut ws, welcome) = node.connect(&u).await;
    assert_eq!(welcome["unread"], 3);
    assert_eq!(welcome["replay"], 3);
    assert!(welcome.get("resumed").is_none());
    for (i, id) in ids.iter().enumerate() {
        let m = ws.next_json().await;
        assert_eq!(m["type"], "message");
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["data"]["n"], i);
    }
    ws.expect_silence(Duration::from_millis(200)).await;
    node.stop().await;
}

async fn replay_is_capped_to_the_newest_unread_but_welcome_counts_all(b: Backend) {
    let mut a = args();
    a.replay_limit = 2;
    let node = TestNode::start_on(b, a).await;
    let mut c = node.client().await;
    let u = uid("cap");
    let ids = send_numbered(&mut c, &u, 5).await;
    let (mut ws, welcome) = node.connect(&u).await;
    assert_eq!(welcome["unread"], 5);
    assert_eq!(welcome["replay"], 2);
    assert_eq!(ws.next_json().await["id"], ids[3].as_str());
    assert_eq!(ws.next_json().await["id"], ids[4].as_str());
    ws.expect_silence(Duration::from_millis(200)).await;
    node.stop().await;
}

async fn read_on_one_device_updates_the_badge_on_the_other(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("badge");
    let r1 = send(&mut c, &[&u], "1").await.deliveries[0]
        .message_id
        .clone();
    let _r2 = send(&mut c, &[&u], "2").await;
    let (mut phone, _) = node.connect(&u).await;
    let (mut laptop, w) = node.connect(&u).await;
    assert_eq!(w["unread"], 2);
    phone.next_of("message").await;
    phone.next_of("message").await;
    laptop.next_of("message").await;
    laptop.next_of("message").await;
    phone.send_json(json!({"type":"read","up_to": r1})).await;
    assert_eq!(laptop.next_of("unread").await["count"], 1);
    assert_eq!(phone.next_of("unread").await["count"], 1);
    // Then what changed, for the message center.
    for d in [&mut laptop, &mut phone] {
        let ch = d.next_json().await;
        assert_eq!(ch["type"], "changed", "{ch}");
        assert_eq!(ch["up_to"], r1.as_str());
    }
    assert_eq!(unread(&mut c, &u).await, 1);
    // Re-reading the same message changes nothing and sends nothing.
    phone.send_json(json!({"type":"read","up_to": r1})).await;
    laptop.expect_silence(Duration::from_millis(200)).await;
    // MarkRead over gRPC reaches both.
    let left = c
        .mark_read(MarkReadRequest {
            user_id: u.clone(),
            up_to_message_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(left.into_inner().unread, 0);
    assert_eq!(laptop.next_of("unread").await["count"], 0);
    assert_eq!(phone.next_of("unread").await["count"], 0);
    // A bad id over gRPC is INVALID_ARGUMENT, over the socket an error frame.
    let e = c
        .mark_read(MarkReadRequest {
            user_id: u.clone(),
            up_to_message_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("up_to_message_id"), "{}", e.message());
    phone.send_json(json!({"type":"read","up_to":"nope"})).await;
    let err = phone.next_of("error").await;
    assert_eq!(err["code"], "bad_request");
    node.stop().await;
}

async fn mark_read_partial_and_never_backwards(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("mr");
    let ids = send_numbered(&mut c, &u, 4).await;
    let mr = |id: &str| MarkReadRequest {
        user_id: u.clone(),
        up_to_message_id: id.to_string(),
        ..Default::default()
    };
    assert_eq!(
        c.mark_read(mr(&ids[1])).await.unwrap().into_inner().unread,
        2
    );
    assert_eq!(
        c.mark_read(mr(&ids[0])).await.unwrap().into_inner().unread,
        2,
        "cursor never moves back"
    );
    assert_eq!(
        c.mark_read(mr("99999999999999-0"))
            .await
            .unwrap()
            .into_inner()
            .unread,
        0,
        "clamped to newest"
    );
    let later = send(&mut c, &[&u], "4").await;
    assert!(!later.deliveries[0].message_id.is_empty());
    assert_eq!(
        unread(&mut c, &u).await,
        1,
        "a future id does not swallow later messages"
    );
    // Unknown user: zero, not an error.
    assert_eq!(unread(&mut c, &uid("nobody")).await, 0);
    node.stop().await;
}

async fn is_online_disconnect_user_and_stats(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("pres");
    assert_eq!(online(&mut c, &u).await, 0);
    let (mut a, _) = node.connect(&u).await;
    let (mut b, _) = node.connect(&u).await;
    assert_eq!(online(&mut c, &u).await, 2);
    let r = c
        .is_online(IsOnlineRequest {
            user_ids: vec![u.clone(), "ghost".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.users[0].user_id, u);
    assert!(r.users[0].online);
    assert!(!r.users[1].online);
    assert_eq!(r.users[1].user_id, "ghost");

    let s = c.stats(StatsRequest {}).await.unwrap().into_inner();
    let me = s.node.unwrap();
    assert_eq!(me.node_id, node.node_id);
    assert!(me.connections >= 2);
    assert_eq!(s.nodes.len(), 1);
    assert!(s.online_users >= 1);

    // Closing one device: one left.
    a.stream.close(None).await.unwrap();
    eventually("one connection left", || {
        let mut c = c.clone();
        let u = u.clone();
        async move { online(&mut c, &u).await == 1 }
    })
    .await;

    let d = c
        .disconnect_user(DisconnectUserRequest {
            user_id: u.clone(),
            reason: "banned for spam".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.closed, 1);
    let (code, reason, _) = b.expect_close().await;
    assert_eq!(code, 4001);
    assert_eq!(reason, "banned for spam");
    eventually("offline after DisconnectUser", || {
        let mut c = c.clone();
        let u = u.clone();
        async move { online(&mut c, &u).await == 0 }
    })
    .await;
    node.stop().await;
}

async fn broadcast_reaches_everyone_live_only(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let (u1, u2) = (uid("b1"), uid("b2"));
    let (mut w1, _) = node.connect(&u1).await;
    let (mut w2, _) = node.connect(&u2).await;
    let r = c
        .broadcast(BroadcastRequest {
            topic: "maintenance".into(),
            payload_json: r#"{"in":"5m"}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.message_id.starts_with('t'));
    for ws in [&mut w1, &mut w2] {
        let m = ws.next_of("message").await;
        assert_eq!(m["id"], r.message_id.as_str());
        assert_eq!(m["transient"], true);
        assert_eq!(m["data"]["in"], "5m");
    }
    // Not stored.
    assert_eq!(unread(&mut c, &u1).await, 0);
    let e = c
        .broadcast(BroadcastRequest {
            topic: String::new(),
            payload_json: "{".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    node.stop().await;
}

async fn transient_messages_are_live_only(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let (on, off) = (uid("on"), uid("off"));
    let (mut ws, _) = node.connect(&on).await;
    let r = c
        .send_to_user(SendToUserRequest {
            user_ids: vec![on.clone(), off.clone()],
            topic: "typing".into(),
            payload_json: "true".into(),
            transient: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deliveries.len(), 2);
    assert!(r.deliveries[0].online && !r.deliveries[1].online);
    assert!(r.deliveries[0].message_id.starts_with('t'));
    let m = ws.next_of("message").await;
    assert_eq!(m["transient"], true);
    assert_eq!(m["data"], true);
    assert_eq!(unread(&mut c, &on).await, 0);
    assert_eq!(unread(&mut c, &off).await, 0);
    let (_w, welcome) = node.connect(&off).await;
    assert_eq!(welcome["unread"], 0);
    node.stop().await;
}

async fn resume_with_since_gets_exactly_the_missed_messages(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("resume");
    let (mut ws, _) = node.connect(&u).await;
    let first = send(&mut c, &[&u], "1").await.deliveries[0]
        .message_id
        .clone();
    assert_eq!(ws.next_of("message").await["id"], first.as_str());
    drop(ws); // the connection drops without a close handshake
    let mut missed = vec![];
    for i in 2..=4 {
        missed.push(
            send(&mut c, &[&u], &i.to_string()).await.deliveries[0]
                .message_id
                .clone(),
        );
    }
    let (mut ws, welcome) = node.connect_since(&u, Some(&first)).await;
    assert_eq!(welcome["resumed"], true);
    assert_eq!(welcome["unread"], 4);
    for id in &missed {
        assert_eq!(ws.next_json().await["id"], id.as_str());
    }
    ws.expect_silence(Duration::from_millis(200)).await;

    // A position the inbox no longer holds (or never held): resumed false.
    let (mut old, welcome) = node.connect_since(&u, Some("1000-0")).await;
    assert_eq!(welcome["resumed"], false);
    // ... and it still gets everything that is stored.
    for id in std::iter::once(&first).chain(&missed) {
        assert_eq!(old.next_json().await["id"], id.as_str());
    }
    node.stop().await;
}

async fn retention_trims_and_resume_reports_the_gap(b: Backend) {
    let mut a = args();
    a.inbox_max_messages = 3;
    let node = TestNode::start_on(b, a).await;
    let mut c = node.client().await;
    let u = uid("trim");
    let ids = send_numbered(&mut c, &u, 5).await;
    assert_eq!(unread(&mut c, &u).await, 3);
    let (_ws, w) = node.connect_since(&u, Some(&ids[0])).await;
    assert_eq!(w["resumed"], false, "ids[1] was trimmed");
    let (_ws, w) = node.connect_since(&u, Some(&ids[1])).await;
    assert_eq!(w["resumed"], true, "everything after ids[1] is stored");
    node.stop().await;
}

async fn messages_sent_while_connecting_arrive_once_in_order(b: Backend) {
    let node = TestNode::start(b).await;
    let c = node.client().await;
    for round in 0..5 {
        let u = uid(&format!("race{round}"));
        let sender = {
            let mut c = c.clone();
            let u = u.clone();
            tokio::spawn(async move {
                let mut ids = vec![];
                for i in 0..60 {
                    ids.push(
                        send(&mut c, &[&u], &i.to_string()).await.deliveries[0]
                            .message_id
                            .clone(),
                    );
                }
                ids
            })
        };
        tokio::time::sleep(Duration::from_millis(5 * round)).await;
        let (mut ws, _) = node.connect(&u).await;
        let sent = sender.await.unwrap();
        let mut got = vec![];
        while got.len() < sent.len() {
            got.push(
                ws.next_of("message").await["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
            // Replay may be capped (100 by default; 60 fit).
        }
        assert_eq!(got, sent, "round {round}: every message once, in order");
        ws.expect_silence(Duration::from_millis(100)).await;
    }
    node.stop().await;
}

async fn bad_rpc_input_is_invalid_argument_and_node_keeps_serving(b: Backend) {
    let mut a = args();
    a.max_payload_bytes = 1024;
    let node = TestNode::start_on(b, a).await;
    let mut c = node.client().await;
    let req = |users: Vec<String>, payload: &str| SendToUserRequest {
        user_ids: users,
        topic: "t".into(),
        payload_json: payload.into(),
        transient: false,
        ..Default::default()
    };
    let cases: Vec<(SendToUserRequest, &str)> = vec![
        (req(vec![], "1"), "at least one user"),
        (
            req((0..1001).map(|i| i.to_string()).collect(), "1"),
            "at most 1000",
        ),
        (
            req(vec!["a".into(), "".into()], "1"),
            "user_ids[1]: user id must not be empty",
        ),
        (
            req(vec!["x".repeat(300)], "1"),
            "exceeds the limit of 256 bytes",
        ),
        (req(vec!["a".into()], "{not json"), "not valid JSON"),
        (req(vec!["a".into()], ""), "not valid JSON"),
        (
            req(vec!["a".into()], &format!("\"{}\"", "x".repeat(2000))),
            "the limit is 1024 bytes",
        ),
        (
            SendToUserRequest {
                topic: "t".repeat(300),
                ..req(vec!["a".into()], "1")
            },
            "topic of 300 bytes",
        ),
    ];
    for (r, want) in cases {
        let e = c.send_to_user(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains(want),
            "{:?} should contain {want:?}",
            e.message()
        );
    }
    for e in [
        c.is_online(IsOnlineRequest { user_ids: vec![] })
            .await
            .unwrap_err(),
        c.unread_count(UnreadCountRequest {
            user_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.mark_read(MarkReadRequest {
            user_id: String::new(),
            up_to_message_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.disconnect_user(DisconnectUserRequest {
            user_id: String::new(),
            reason: String::new(),
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // Nothing was stored for "a" by the rejected calls, and the node still serves.
    assert_eq!(unread(&mut c, "a").await, 0);
    assert_eq!(send(&mut c, &["a"], "1").await.deliveries.len(), 1);
    node.stop().await;
}

async fn bad_client_frames(b: Backend) {
    let mut a = args();
    a.max_client_frame_bytes = 4096;
    let node = TestNode::start_on(b, a).await;
    let mut c = node.client().await;
    let u = uid("frames");
    let (mut ws, _) = node.connect(&u).await;
    for bad in [
        "not json",
        "{}",
        r#"{"type":"shout"}"#,
        r#"{"type":"read","up_to":7}"#,
        "[1,2]",
    ] {
        ws.send_text(bad).await;
        let e = ws.next_json().await;
        assert_eq!(e["type"], "error", "{bad}");
        assert_eq!(e["code"], "bad_frame");
        assert!(e["message"].as_str().unwrap().contains("malformed frame"));
    }
    // A read that names nothing to read is well-formed but wrong.
    ws.send_text(r#"{"type":"read"}"#).await;
    assert_eq!(ws.next_json().await["code"], "bad_request");
    ws.stream
        .send(tokio_tungstenite::tungstenite::Message::Binary(
            vec![1, 2, 3].into(),
        ))
        .await
        .unwrap();
    assert_eq!(ws.next_json().await["code"], "bad_frame");
    ws.send_json(json!({"type":"ping"})).await;
    assert_eq!(ws.next_json().await["type"], "pong");
    // Still delivering.
    send(&mut c, &[&u], "1").await;
    assert_eq!(ws.next_of("message").await["data"], 1);
    // Over the frame limit: 1009.
    ws.send_text(&format!(
        "{{\"type\":\"ping\",\"pad\":\"{}\"}}",
        "x".repeat(5000)
    ))
    .await;
    let (code, _, _) = ws.expect_close().await;
    assert_eq!(code, 1009);
    // Others unaffected.
    let (mut other, _) = node.connect(&u).await;
    other.send_json(json!({"type":"ping"})).await;
    assert_eq!(other.next_of("pong").await["type"], "pong");
    node.stop().await;
}
async fn slow_client_is_closed_with_1013_and_keeps_its_messages(b: Backend) {
    let mut a = args();
    a.send_queue = 8;
    let node = TestNode::start_on(b, a).await;
    let mut c = node.client().await;
    let (slow, fast) = (uid("slow"), uid("fast"));
    let (mut slow_ws, _) = node.connect(&slow).await;
    let (mut fast_ws, _) = node.connect(&fast).await;
    // The slow client reads nothing while big messages pile up.
    let big = format!("\"{}\"", "x".repeat(60_000));
    let mut ids = vec![];
    for _ in 0..120 {
        let r = send(&mut c, &[&slow, &fast], &big).await;
        ids.push(r.deliveries[0].message_id.clone());
        // The fast client keeps up.
        let m = fast_ws.next_of("message").await;
        assert_eq!(m["id"], r.deliveries[1].message_id.as_str());
    }
    let (code, reason, got) = slow_ws.expect_close().await;
    assert_eq!(code, 1013, "{reason}");
    assert!(got.len() < ids.len());
    // Everything is still stored: a resume from the last frame it got
    // delivers the rest.
    let last = got
        .iter()
        .rev()
        .find(|f| f["type"] == "message")
        .map(|f| f["id"].as_str().unwrap().to_string());
    let (mut again, w) = node
        .connect_since(&slow, last.as_deref().or(Some("0-0")))
        .await;
    let _ = w;
    let skip = got.iter().filter(|f| f["type"] == "message").count();
    for id in &ids[skip..] {
        assert_eq!(again.next_json().await["id"], id.as_str());
    }
    node.stop().await;
}

async fn connection_cap_per_user(b: Backend) {
    let mut a = args();
    a.max_connections_per_user = 2;
    let node = TestNode::start_on(b, a).await;
    let u = uid("cap");
    let (_a, _) = node.connect(&u).await;
    let (_b, _) = node.connect(&u).await;
    let mut third = node.connect_raw(&u, None).await;
    let (code, reason, frames) = third.expect_close().await;
    assert_eq!(code, 4029);
    assert!(reason.contains("limit is 2"), "{reason}");
    assert!(frames.is_empty());
    node.stop().await;
}

async fn handshake_rejections_are_http_errors_without_upgrade(b: Backend) {
    let node = TestNode::start(b).await;
    use tokio_tungstenite::tungstenite::Error;
    let expired = expired_token();
    for (url, status) in [
        (format!("ws://{}/ws", node.ws), 401),
        (format!("ws://{}/ws?token=garbage", node.ws), 401),
        (
            format!(
                "ws://{}/ws?token={}",
                node.ws,
                herald::auth::mint("another-secret-xyz", "u", Duration::from_secs(60))
            ),
            401,
        ),
        (format!("ws://{}/ws?token={expired}", node.ws), 401),
        (
            format!("ws://{}/ws?token={}&since=yesterday", node.ws, token("u")),
            400,
        ),
        (format!("ws://{}/nope?token={}", node.ws, token("u")), 404),
    ] {
        match tokio_tungstenite::connect_async(&url).await {
            Err(Error::Http(r)) => assert_eq!(r.status().as_u16(), status, "{url}"),
            other => panic!("{url}: expected HTTP {status}, got {other:?}"),
        }
    }
    // Authorization header works as well as ?token=.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", node.ws),
    )
    .unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token("hdr")).parse().unwrap(),
    );
    let (stream, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let w = Ws { stream }.next_json().await;
    assert_eq!(w["user"], "hdr");
    node.stop().await;
}

/// A token whose `exp` is two minutes ago (beyond the leeway), signed with the test secret.
fn expired_token() -> String {
    #[derive(serde::Serialize)]
    struct Claims {
        sub: &'static str,
        exp: u64,
    }
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 120;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims { sub: "u", exp },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn heartbeat_closes_silent_connections(b: Backend) {
    let mut a = args();
    a.heartbeat = Duration::from_millis(150);
    let node = TestNode::start_on(b, a).await;
    let u = uid("hb");
    let (mut ws, _) = node.connect(&u).await;
    // Not polling the socket means not answering pings.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (code, reason, _) = ws.expect_close().await;
    assert_eq!(code, 1000);
    assert!(reason.contains("heartbeat"));
    // An attentive client stays: polling answers pings.
    let (mut live, _) = node.connect(&u).await;
    live.expect_silence(Duration::from_millis(700)).await;
    live.send_json(json!({"type":"ping"})).await;
    assert_eq!(live.next_json().await["type"], "pong");
    node.stop().await;
}

async fn graceful_shutdown_closes_sockets_with_1001(b: Backend) {
    let node = TestNode::start(b).await;
    let (mut ws, _) = node.connect(&uid("bye")).await;
    let stopping = tokio::spawn(node.stop());
    let (code, _, _) = ws.expect_close().await;
    assert_eq!(code, 1001);
    stopping.await.unwrap();
}

async fn reflection_health_and_metrics(b: Backend) {
    let node = TestNode::start(b).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "herald.v1.PushService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(futures_util::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"herald.v1.PushService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let mut c = node.client().await;
    send(&mut c, &[&uid("m")], "1").await;
    let health = node.get("/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = node.get("/metrics").await;
    assert!(metrics.contains("herald_rpc_total"), "{metrics}");
    assert!(metrics.contains("herald_messages_pushed_total"));
    node.stop().await;
}

#[tokio::test]
async fn api_key_guards_the_push_service_but_not_health() {
    let mut a = args();
    a.api_keys = vec![herald::apikey::KeySpec::parse("k-123456").unwrap()];
    let node = TestNode::start_on(Backend::Memory, a).await;
    let mut c = node.client().await;
    let e = c.stats(StatsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("authorization"), "{}", e.message());
    let e = c
        .stats(herald::cli::with_key(
            &Some("wrong".into()),
            StatsRequest {},
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let ok = c
        .stats(herald::cli::with_key(
            &Some("k-123456".into()),
            StatsRequest {},
        ))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().node.unwrap().node_id, node.node_id);
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    assert!(health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new()
        })
        .await
        .is_ok());
    node.stop().await;
}

/// The proto's word on DisconnectUser's reason is what the node does: at
/// most 123 bytes of UTF-8 reach the browser whole, a longer one is
/// INVALID_ARGUMENT (never cut), an empty one is "disconnected by the
/// server".
#[tokio::test]
async fn disconnect_reason_limit_is_what_the_proto_says() {
    let proto = include_str!("../proto/herald/v1/push.proto");
    // A close frame holds 125 bytes, 2 of them the code.
    let max = 123;
    let doc = &proto[proto.find("message DisconnectUserRequest").unwrap()..];
    let doc = &doc[..doc.find("string reason").unwrap()];
    assert!(doc.contains(&format!("at most {max}")), "{doc}");
    assert!(
        doc.contains("INVALID_ARGUMENT") && !doc.contains("truncated"),
        "{doc}"
    );
    assert!(
        doc.contains("\"disconnected by the\n  // server\""),
        "{doc}"
    );

    let node = TestNode::start(Backend::Memory).await;
    let c = node.client().await;
    let u = uid("reason");
    let (mut ws, _) = node.connect(&u).await;
    let disconnect = |reason: String| {
        let mut c = c.clone();
        let u = u.clone();
        async move {
            c.disconnect_user(DisconnectUserRequest { user_id: u, reason })
                .await
        }
    };
    // 124 bytes, of two-byte characters: refused, and the socket stays.
    let e = disconnect("é".repeat(62)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(&max.to_string()), "{}", e.message());
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next_of("pong").await["type"], "pong");
    // 123 bytes: whole.
    let exact = format!("{}x", "é".repeat(61));
    assert_eq!(exact.len(), max);
    disconnect(exact.clone()).await.unwrap();
    let (code, reason, _) = ws.expect_close().await;
    assert_eq!((code, reason), (4001, exact));
    // Empty: the default.
    let (mut ws, _) = node.connect(&u).await;
    disconnect(String::new()).await.unwrap();
    let (code, reason, _) = ws.expect_close().await;
    assert_eq!(
        (code, reason.as_str()),
        (4001, "disconnected by the server")
    );
    node.stop().await;
}

on_both_backends!(
    two_devices_receive_and_another_user_does_not,
    payload_reaches_the_browser_byte_for_byte,
    offline_user_gets_unread_count_and_replay_on_connect,
    replay_is_capped_to_the_newest_unread_but_welcome_counts_all,
    read_on_one_device_updates_the_badge_on_the_other,
    mark_read_partial_and_never_backwards,
    is_online_disconnect_user_and_stats,
    broadcast_reaches_everyone_live_only,
    transient_messages_are_live_only,
    resume_with_since_gets_exactly_the_missed_messages,
    retention_trims_and_resume_reports_the_gap,
    messages_sent_while_connecting_arrive_once_in_order,
    bad_rpc_input_is_invalid_argument_and_node_keeps_serving,
    bad_client_frames,
    slow_client_is_closed_with_1013_and_keeps_its_messages,
    connection_cap_per_user,
    handshake_rejections_are_http_errors_without_upgrade,
    heartbeat_closes_silent_connections,
    graceful_shutdown_closes_sockets_with_1001,
    reflection_health_and_metrics
);
