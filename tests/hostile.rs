//! What hostile clients and careless callers can do to one node, and what
//! they get: each test here reproduces an observed defect (a close frame
//! over 125 bytes, a flood of frames, a client that stops reading, broken
//! frames, unbounded gRPC streams, keyless streams starving keyed calls,
//! silent gRPC sockets) and checks the documented answer.
#[macro_use]
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use herald::proto::*;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;

/// A ban must reach the browser as 4001 whatever the reason's script: the
/// longest reason that fits a close frame is delivered whole, a longer one
/// is refused with INVALID_ARGUMENT instead of breaking the close frame.
async fn disconnect_reason_fits_a_close_frame(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("ban");
    let (mut ws, _) = node.connect(&u).await;
    let too_long = "é".repeat(70); // 140 bytes
    let err = c
        .disconnect_user(DisconnectUserRequest {
            user_id: u.clone(),
            reason: too_long,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("123"), "{}", err.message());
    let fits = "é".repeat(61); // 122 bytes
    c.disconnect_user(DisconnectUserRequest {
        user_id: u.clone(),
        reason: fits.clone(),
    })
    .await
    .unwrap();
    let (code, reason, _) = ws.expect_close().await;
    assert_eq!(code, 4001);
    assert_eq!(reason, fits);
    node.stop().await;
}

/// A client that floods frames gets an error frame and close 1008; others
/// are unaffected.
async fn frame_flood_is_cut_off_with_1008(b: Backend) {
    let mut a = args();
    a.client_frame_rate = 20;
    a.client_frame_burst = 40;
    let node = TestNode::start_on(b, a).await;
    let u = uid("flood");
    let (mut ws, _) = node.connect(&u).await;
    let (mut calm, _) = node.connect(&uid("calm")).await;
    // Within the burst: answered.
    for _ in 0..10 {
        ws.send_json(json!({"type":"ping"})).await;
        assert_eq!(ws.next_json().await["type"], "pong");
    }
    // A flood: the socket may be closed under the sender, so ignore errors.
    for _ in 0..2_000 {
        if ws
            .stream
            .send(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let (code, _, frames) = ws.expect_close().await;
    assert_eq!(code, 1008);
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "error" && f["code"] == "rate_limited"),
        "an error frame says why: {frames:?}"
    );
    assert!(frames.iter().filter(|f| f["type"] == "pong").count() < 100);
    calm.send_json(json!({"type":"ping"})).await;
    assert_eq!(calm.next_json().await["type"], "pong");
    let metrics = node.get("/metrics").await;
    assert!(metrics.contains("reason=\"rate\""), "{metrics}");
    node.stop().await;
}

/// A burst of `read` frames is one backend write, and the badge ends at the
/// newest position asked for.
async fn read_bursts_are_coalesced(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("reads");
    let ids = send_numbered(&mut c, &u, 20).await;
    let (mut ws, w) = node.connect(&u).await;
    assert_eq!(w["unread"], 20);
    // Nineteen reads written in one go, oldest to newest.
    for id in &ids[..19] {
        ws.stream
            .feed(Message::Text(
                json!({"type":"read","up_to":id}).to_string().into(),
            ))
            .await
            .unwrap();
    }
    ws.stream.flush().await.unwrap();
    // Without coalescing every read would move the cursor and announce a
    // new count (19 frames); coalesced, the first read or two go alone and
    // the rest in one write.
    let mut counts = vec![];
    while counts.last() != Some(&1) {
        counts.push(ws.next_of("unread").await["count"].as_u64().unwrap());
    }
    assert!(
        counts.len() <= 3,
        "one write per burst, got counts {counts:?}"
    );
    assert_eq!(unread(&mut c, &u).await, 1);
    node.stop().await;
}

/// A client that stops reading is dropped after --write-timeout (and is
/// offline at once), not after two heartbeats.
async fn stuck_reader_is_dropped_after_the_write_timeout(b: Backend) {
    let mut a = args();
    a.write_timeout = Duration::from_millis(500);
    a.heartbeat = Duration::from_secs(30);
    let node = TestNode::start_on(b, a).await;
    let mut c = node.client().await;
    let u = uid("stuck");
    let (ws, _) = node.connect(&u).await;
    assert_eq!(online(&mut c, &u).await, 1);
    // Never read again; push until the kernel buffers are full.
    let big = format!("\"{}\"", "x".repeat(60_000));
    let start = Instant::now();
    let mut sent = 0;
    while online(&mut c, &u).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "still online after {:?} ({sent} sends)",
            start.elapsed()
        );
        c.send_to_user(SendToUserRequest {
            user_ids: vec![u.clone()],
            topic: "t".into(),
            payload_json: big.clone(),
            transient: true,
            ..Default::default()
        })
        .await
        .unwrap();
        sent += 1;
    }
    drop(ws);
    let metrics = node.get("/metrics").await;
    assert!(metrics.contains("herald_write_timeouts_total"), "{metrics}");
    node.stop().await;
}

/// Broken frames get the close code RFC 6455 names, not a bare TCP close.
async fn broken_frames_get_1007_and_1002(b: Backend) {
    let node = TestNode::start(b).await;
    let mut ws = node.connect(&uid("utf8")).await.0;
    let bad = Frame::message(vec![0xff, 0xfe, 0x41], OpCode::Data(Data::Text), true);
    ws.stream.send(Message::Frame(bad)).await.unwrap();
    assert_eq!(ws.expect_close().await.0, 1007);
    let mut ws = node.connect(&uid("proto")).await.0;
    let bad = Frame::message(vec![1, 2, 3], OpCode::Data(Data::Reserved(3)), true);
    ws.stream.send(Message::Frame(bad)).await.unwrap();
    assert_eq!(ws.expect_close().await.0, 1002);
    node.stop().await;
}

/// `Authorization: bearer <jwt>` (lower-case scheme) is accepted; an
/// HTTP/1.0 upgrade is refused with 400, never answered with 101.
async fn handshake_edge_cases(b: Backend) {
    let node = TestNode::start(b).await;
    let u = uid("bearer");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", node.ws),
    )
    .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("bearer {}", token(&u)).parse().unwrap(),
    );
    let (stream, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut ws = Ws { stream };
    assert_eq!(ws.next_json().await["type"], "welcome");

    let mut s = tokio::net::TcpStream::connect(node.ws).await.unwrap();
    s.write_all(
        format!(
            "GET /ws?token={} HTTP/1.0\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            token(&u)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = vec![0u8; 512];
    let n = tokio::time::timeout(WAIT, s.read(&mut out))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&out[..n]);
    assert!(head.contains(" 400 "), "{head}");
    node.stop().await;
}

/// Issue 20, item 1: keyless streams (Health/Watch needs no key) have a
/// budget of their own (--grpc-max-discovery-inflight): over it they get
/// RESOURCE_EXHAUSTED, and however many are open, keyed PushService calls
/// (their own --grpc-max-inflight) keep succeeding. Before, the Watch
/// streams counted against --grpc-max-inflight and refused every send.
async fn keyless_streams_never_starve_keyed_calls(b: Backend) {
    let mut a = args();
    a.grpc_max_inflight = 5;
    a.grpc_max_discovery_inflight = 5;
    a.api_keys =
        vec![herald::apikey::KeySpec::parse("backend:send+read:k-1234567890abcdef").unwrap()];
    let node = TestNode::start_on(b, a).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let mut streams = vec![];
    for _ in 0..5 {
        let mut s = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        s.next().await.unwrap().unwrap();
        streams.push(s);
    }
    let err = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--grpc-max-discovery-inflight"),
        "{err:?}"
    );
    let key = Some("k-1234567890abcdef".to_string());
    let mut c = herald::proto::push_service_client::PushServiceClient::new(ch.clone());
    for i in 0..20 {
        let r = c
            .send_to_user(herald::cli::with_key(
                &key,
                SendToUserRequest {
                    user_ids: vec!["starved?".into()],
                    topic: "t".into(),
                    payload_json: i.to_string(),
                    ..Default::default()
                },
            ))
            .await;
        assert!(r.is_ok(), "keyed send {i} with 5 Watch streams open: {r:?}");
    }
    // Streams that end give their slots back.
    drop(streams);
    eventually("discovery slots freed", || {
        let mut h = health.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok()
        }
    })
    .await;
    node.stop().await;
}

/// Reads `s` until the node closes it (what it writes first, its HTTP/2
/// SETTINGS, is skipped); panics if it stays open for `d`.
async fn closed_within(mut s: tokio::net::TcpStream, d: Duration) {
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(d, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the node kept the connection open for {d:?}"
    );
}

/// Issue 20, item 2: a TCP connection to the gRPC port that never speaks
/// HTTP/2 is closed after --grpc-handshake-timeout, so such sockets cannot
/// hold --grpc-max-connections: a backend connecting after them gets
/// through. Before, the silent sockets held every slot forever.
async fn silent_grpc_sockets_are_closed_after_the_handshake_timeout(b: Backend) {
    let mut a = args();
    a.grpc_max_connections = 3;
    a.grpc_handshake_timeout = Duration::from_millis(300);
    let node = TestNode::start_on(b, a).await;
    let mut silent = vec![];
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(node.grpc).await.unwrap());
    }
    let t0 = Instant::now();
    let mut c = tokio::time::timeout(Duration::from_secs(5), node.client())
        .await
        .expect("a backend gets a slot once the silent sockets are closed");
    c.stats(StatsRequest {}).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    for s in silent {
        closed_within(s, Duration::from_secs(2)).await;
    }
    // The registry is one per process (both backends' tests run in it).
    let closed = metric(
        &node,
        r#"herald_grpc_closed_total{reason="handshake_timeout"}"#,
    )
    .await;
    assert!(closed >= 3.0, "{closed}");
    node.stop().await;
}

/// Issue 20, item 2: while the node is short of gRPC connection slots, a
/// connection that completes the HTTP/2 handshake but never makes a keyed
/// call (and holds no stream) is closed after --grpc-anonymous-idle, so
/// valid but idle sockets cannot lock backends out either.
async fn anonymous_idle_grpc_connections_are_closed(b: Backend) {
    let mut a = args();
    a.grpc_max_connections = 2;
    a.grpc_anonymous_idle = Duration::from_millis(300);
    let node = TestNode::start_on(b, a).await;
    let mut idle = vec![];
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(node.grpc).await.unwrap();
        // The client preface, then an empty SETTINGS frame.
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        idle.push(s);
    }
    for s in idle {
        closed_within(s, Duration::from_secs(3)).await;
    }
    let mut c = tokio::time::timeout(Duration::from_secs(3), node.client())
        .await
        .unwrap();
    c.stats(StatsRequest {}).await.unwrap();
    let closed = metric(
        &node,
        r#"herald_grpc_closed_total{reason="anonymous_idle"}"#,
    )
    .await;
    assert!(closed >= 2.0, "{closed}");
    node.stop().await;
}

/// The per-user cap holds exactly under concurrent connects (it was read
/// from a count updated only later, so 100 at once all got in).
async fn per_user_cap_holds_under_concurrent_connects(b: Backend) {
    let mut a = args();
    a.max_connections_per_user = 5;
    let node = TestNode::start_on(b, a).await;
    let mut c = node.client().await;
    let u = uid("cap");
    let attempts = (0..100).map(|_| {
        let url = node.ws_url(&token(&u), None);
        tokio::spawn(async move {
            let (stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let mut ws = Ws { stream };
            let first = tokio::time::timeout(WAIT, ws.stream.next()).await.unwrap();
            match first {
                Some(Ok(Message::Text(_))) => Ok(ws),
                Some(Ok(Message::Close(Some(f)))) => Err(u16::from(f.code)),
                other => panic!("unexpected {other:?}"),
            }
        })
    });
    let mut held = vec![];
    let mut refused = 0;
    for t in attempts.collect::<Vec<_>>() {
        match t.await.unwrap() {
            Ok(ws) => held.push(ws),
            Err(code) => {
                assert_eq!(code, 4029);
                refused += 1;
            }
        }
    }
    assert_eq!(held.len(), 5, "exactly the cap got in");
    assert_eq!(refused, 95);
    assert_eq!(online(&mut c, &u).await, 5);
    // A closed connection gives its slot back.
    let mut one = held.pop().unwrap();
    one.stream.close(None).await.unwrap();
    drop(one);
    eventually("a slot frees", || {
        let url = node.ws_url(&token(&u), None);
        async move {
            let (stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let mut ws = Ws { stream };
            let ok = matches!(
                tokio::time::timeout(WAIT, ws.stream.next()).await,
                Ok(Some(Ok(Message::Text(_))))
            );
            if ok {
                std::mem::forget(ws); // keep it open until the node stops
            }
            ok
        }
    })
    .await;
    node.stop().await;
}

/// A `since` beyond the newest id (even at the top of the id space) is a
/// complete resume with nothing to replay, on both backends (Redis used to
/// close with 1013 "backend unavailable").
async fn since_beyond_the_newest_id_is_welcomed(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("future");
    send(&mut c, &[&u], "1").await;
    for since in [
        "99999999999999-0",
        "18446744073709551615-18446744073709551615",
    ] {
        let (mut ws, w) = node.connect_since(&u, Some(since)).await;
        assert_eq!(w["resumed"], true, "{since}: {w}");
        assert_eq!(w["replay"], 0, "{since}: {w}");
        ws.expect_silence(Duration::from_millis(100)).await;
    }
    node.stop().await;
}

/// The Redis URL's password never appears in a startup error.
#[tokio::test]
async fn startup_errors_do_not_print_the_redis_password() {
    let mut a = args();
    a.redis_url = Some(format!(
        "redis://:hunter2-secret@127.0.0.1:{}/0",
        free_port()
    ));
    let err = TestNode::try_start_with(a)
        .await
        .err()
        .expect("no Redis there");
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains("127.0.0.1"), "{err}");
}

on_both_backends!(
    since_beyond_the_newest_id_is_welcomed,
    per_user_cap_holds_under_concurrent_connects,
    disconnect_reason_fits_a_close_frame,
    frame_flood_is_cut_off_with_1008,
    read_bursts_are_coalesced,
    stuck_reader_is_dropped_after_the_write_timeout,
    broken_frames_get_1007_and_1002,
    handshake_edge_cases,
    keyless_streams_never_starve_keyed_calls,
    silent_grpc_sockets_are_closed_after_the_handshake_timeout,
    anonymous_idle_grpc_connections_are_closed,
);
