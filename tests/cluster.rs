//! A cluster: several `herald serve` processes sharing one real
//! redis-server.
mod common;

use common::*;
use herald::proto::*;
use serde_json::json;
use std::time::Duration;
use tonic::Code;

fn cluster(n: usize) -> (RedisServer, Vec<NodeProcess>) {
    let redis = RedisServer::start();
    let nodes = (0..n)
        .map(|i| NodeProcess::start(&format!("n{}", i + 1), &redis.url(), &[]))
        .collect();
    (redis, nodes)
}

#[tokio::test]
async fn cross_node_delivery_reaches_only_involved_nodes() {
    let (_redis, nodes) = cluster(3);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let u = uid("xnode");
    let (mut on_a, _) = a.connect(&u).await;
    let (mut on_b, _) = b.connect(&u).await;
    let before = c.stats().await.node.unwrap().broker_events_received;

    // Sent through the node that holds none of the user's connections.
    let mut via_c = c.client().await;
    let r = send(&mut via_c, &[&u], r#"{"n":1}"#).await;
    assert!(r.deliveries[0].online, "presence is cluster-wide");
    let id = &r.deliveries[0].message_id;
    assert_eq!(on_a.next_of("message").await["id"], id.as_str());
    assert_eq!(on_b.next_of("message").await["id"], id.as_str());

    // 100 unicasts later, the uninvolved node has received none of them.
    for i in 0..100 {
        send(&mut via_c, &[&u], &i.to_string()).await;
    }
    for _ in 0..100 {
        on_a.next_of("message").await;
        on_b.next_of("message").await;
    }
    let sc = c.stats().await;
    assert_eq!(
        sc.node.unwrap().broker_events_received,
        before,
        "node c holds no connection of the user"
    );
    let sa = a.stats().await.node.unwrap();
    assert!(sa.broker_events_received >= 101);
    assert!(sa.messages_delivered >= 101);
    // Stats lists the live nodes, each with the figures it last reported
    // (renewed with its lease).
    eventually("node a's counters reach node c's Stats", || async {
        let s = c.stats().await;
        s.nodes
            .iter()
            .any(|n| n.node_id == "n1" && n.messages_delivered >= 101 && n.uptime_seconds < 600)
    })
    .await;
    let sc = c.stats().await;
    let ids: Vec<String> = sc.nodes.iter().map(|n| n.node_id.clone()).collect();
    assert_eq!(ids, vec!["n1", "n2", "n3"]);
    assert_eq!(sc.connections, 2);
    assert_eq!(sc.online_users, 1);
}

#[tokio::test]
async fn presence_unread_and_badge_agree_across_nodes() {
    let (_redis, nodes) = cluster(2);
    let (a, b) = (&nodes[0], &nodes[1]);
    let u = uid("agree");
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    assert_eq!(online(&mut ca, &u).await, 0);
    let ids: Vec<String> = {
        let mut v = vec![];
        for i in 0..3 {
            v.push(
                send(&mut ca, &[&u], &i.to_string()).await.deliveries[0]
                    .message_id
                    .clone(),
            );
        }
        v
    };
    assert_eq!(unread(&mut ca, &u).await, 3);
    assert_eq!(unread(&mut cb, &u).await, 3);

    let (mut phone, w) = a.connect(&u).await;
    let (mut laptop, w2) = b.connect(&u).await;
    assert_eq!(w["unread"], 3);
    assert_eq!(w2["unread"], 3);
    for n in [&mut ca, &mut cb] {
        assert_eq!(online(n, &u).await, 2);
    }
    for _ in 0..3 {
        phone.next_of("message").await;
        laptop.next_of("message").await;
    }
    // A read on node a's device moves the badge on node b's device.
    phone
        .send_json(json!({"type":"read","up_to": ids[1]}))
        .await;
    assert_eq!(laptop.next_of("unread").await["count"], 1);
    assert_eq!(
        phone.next_of("unread").await["count"],
        1,
        "the reading device too"
    );
    assert_eq!(unread(&mut cb, &u).await, 1);
    // MarkRead through b reaches a.
    cb.mark_read(MarkReadRequest {
        user_id: u.clone(),
        up_to_message_id: String::new(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(phone.next_of("unread").await["count"], 0);
    // DisconnectUser through a closes the device on b too.
    let d = ca
        .disconnect_user(DisconnectUserRequest {
            user_id: u.clone(),
            reason: "logout".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.closed, 2);
    assert_eq!(laptop.expect_close().await.0, 4001);
    assert_eq!(phone.expect_close().await.0, 4001);
    eventually("offline everywhere", || {
        let (mut ca, mut cb, u) = (ca.clone(), cb.clone(), u.clone());
        async move { online(&mut ca, &u).await == 0 && online(&mut cb, &u).await == 0 }
    })
    .await;
    // Broadcast reaches both nodes once.
    let (mut x, _) = a.connect(&uid("bx")).await;
    let (mut y, _) = b.connect(&uid("by")).await;
    let r = cb
        .broadcast(BroadcastRequest {
            topic: "all".into(),
            payload_json: "1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(x.next_of("message").await["id"], r.message_id.as_str());
    assert_eq!(y.next_of("message").await["id"], r.message_id.as_str());
    x.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn killed_node_goes_offline_within_the_lease_and_devices_resume_elsewhere() {
    let (_redis, mut nodes) = cluster(2);
    let u = uid("crash");
    let mut sender = nodes[1].client().await;
    let (mut dev, _) = nodes[0].connect(&u).await;
    let mut got = vec![];
    for i in 0..5 {
        send(&mut sender, &[&u], &i.to_string()).await;
        got.push(
            dev.next_of("message").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(online(&mut sender, &u).await, 1);
    nodes[0].kill9();
    let killed_at = std::time::Instant::now();
    // Messages stored while the device has no node.
    let mut missed = vec![];
    for i in 5..10 {
        missed.push(
            send(&mut sender, &[&u], &i.to_string()).await.deliveries[0]
                .message_id
                .clone(),
        );
    }
    eventually("killed node's user reads offline", || {
        let (mut c, u) = (sender.clone(), u.clone());
        async move { online(&mut c, &u).await == 0 }
    })
    .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(4),
        "offline within the 1 s lease (plus renew slack)"
    );
    let s = nodes[1].stats().await;
    assert_eq!(s.nodes.len(), 1, "the dead node left Stats");

    // The device reconnects to the surviving node with `since`.
    let (mut dev, w) = nodes[1].connect_since(&u, Some(got.last().unwrap())).await;
    assert_eq!(w["resumed"], true);
    for id in &missed {
        assert_eq!(dev.next_json().await["id"], id.as_str());
    }
    dev.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn burst_during_reconnect_loses_and_duplicates_nothing() {
    let (_redis, nodes) = cluster(2);
    let u = uid("burst");
    let total = 400usize;
    let sender = {
        let mut c = nodes[1].client().await;
        let u = u.clone();
        tokio::spawn(async move {
            let mut ids = vec![];
            for i in 0..total {
                ids.push(
                    send(&mut c, &[&u], &i.to_string()).await.deliveries[0]
                        .message_id
                        .clone(),
                );
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            ids
        })
    };
    let mut got: Vec<String> = vec![];
    let mut hops = 0;
    let (mut ws, _) = nodes[0].connect(&u).await;
    while got.len() < total {
        let m = ws.next_of("message").await;
        got.push(m["id"].as_str().unwrap().to_string());
        // Every 60 messages the device drops its socket and reconnects
        // to the other node from where it was.
        if got.len() % 60 == 0 && got.len() < total {
            hops += 1;
            drop(ws);
            let (next, w) = nodes[hops % 2]
                .connect_since(&u, Some(got.last().unwrap()))
                .await;
            assert_eq!(w["resumed"], true);
            ws = next;
        }
    }
    let sent = sender.await.unwrap();
    assert_eq!(
        got, sent,
        "every message exactly once, in order, across {hops} reconnects"
    );
    ws.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn redis_outage_is_unavailable_then_full_service_without_restart() {
    let (mut redis, nodes) = cluster(2);
    let (a, b) = (&nodes[0], &nodes[1]);
    let u = uid("outage");
    let (mut on_a, _) = a.connect(&u).await;
    let (mut on_b, _) = b.connect(&u).await;
    let mut cb = b.client().await;
    let first = send(&mut cb, &[&u], "1").await.deliveries[0]
        .message_id
        .clone();
    on_a.next_of("message").await;
    on_b.next_of("message").await;

    redis.stop();
    let started = std::time::Instant::now();
    let e = cb
        .send_to_user(SendToUserRequest {
            user_ids: vec![u.clone()],
            topic: "t".into(),
            payload_json: "2".into(),
            transient: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("unavailable"), "{}", e.message());
    assert!(started.elapsed() < Duration::from_secs(5), "fails fast");
    let e = cb
        .unread_count(UnreadCountRequest {
            user_id: u.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    // Nodes keep their sockets and answer pings.
    on_a.send_json(json!({"type":"ping"})).await;
    assert_eq!(on_a.next_of("pong").await["type"], "pong");

    redis.restart();
    // Full service again, same processes.
    eventually("SendToUser works again", || {
        let (mut c, u) = (cb.clone(), u.clone());
        async move {
            c.send_to_user(SendToUserRequest {
                user_ids: vec![u],
                topic: "t".into(),
                payload_json: "3".into(),
                transient: false,
                ..Default::default()
            })
            .await
            .is_ok()
        }
    })
    .await;
    // The devices that stayed connected get the new message live
    // (re-subscribed), and nothing twice.
    let m = on_a.next_of("message").await;
    assert_eq!(m["data"], 3);
    let m = on_b.next_of("message").await;
    assert_eq!(m["data"], 3);
    assert_eq!(unread(&mut cb, &u).await, 2);
    let mut ca = a.client().await;
    eventually("presence re-registered", || {
        let (mut c, u) = (ca.clone(), u.clone());
        async move { online(&mut c, &u).await == 2 }
    })
    .await;
    let (_w, welcome) = a.connect_since(&uid("fresh"), None).await;
    assert_eq!(welcome["unread"], 0);
    let r = send(&mut ca, &[&u], "4").await;
    assert_ne!(r.deliveries[0].message_id, first);
    assert_eq!(on_b.next_of("message").await["data"], 4);
}

/// A device that leaves while Redis is away is not counted online once
/// Redis is back, even after its node gave up retrying the release of its
/// reservation (about 12 s): the presence rewrite after the reconnect also
/// covers the users who left the node lately, not only those still on it.
/// (The same rewrite follows a Redis Cluster failover, which can lose a
/// release the dead primary had not replicated.)
#[tokio::test]
async fn a_device_that_left_while_redis_was_away_is_not_counted_after_it_returns() {
    let (mut redis, nodes) = cluster(2);
    let (a, b) = (&nodes[0], &nodes[1]);
    let u = uid("departed");
    let (_stays, _) = b.connect(&u).await;
    let (leaves, _) = a.connect(&u).await;
    let mut cb = b.client().await;
    assert_eq!(online(&mut cb, &u).await, 2);

    redis.stop();
    drop(leaves);
    // Node a retries the release 5 times (0.4 s, then doubling) and gives
    // it up; the reservation stays in the append-only file.
    let given_up = "herald_presence_releases_given_up_total 1";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !http_get(a.admin, "/metrics").await.contains(given_up) {
        assert!(
            std::time::Instant::now() < deadline,
            "node a gave up the release"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    redis.restart();
    // (The first calls may meet connections Redis's restart broke.)
    eventually("only the device still connected is counted", || {
        let (mut c, u) = (cb.clone(), u.clone());
        async move {
            let r = c.is_online(IsOnlineRequest { user_ids: vec![u] }).await;
            r.is_ok_and(|r| r.into_inner().users[0].connections == 1)
        }
    })
    .await;
}

/// The per-user cap is cluster-wide and exact under concurrent connects
/// spread over nodes, and a node killed with its connections gives their
/// slots back when its lease ends.
#[tokio::test]
async fn per_user_cap_is_exact_across_nodes_and_freed_by_a_dead_node() {
    let redis = RedisServer::start();
    let extra = ["--max-connections-per-user", "4"];
    let mut nodes: Vec<NodeProcess> = (1..=3)
        .map(|i| NodeProcess::start(&format!("cap{i}"), &redis.url(), &extra))
        .collect();
    let u = uid("capx");
    let urls: Vec<String> = (0..60)
        .map(|i| format!("ws://{}/ws?token={}", nodes[i % 3].ws, token(&u)))
        .collect();
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            tokio::spawn(async move {
                use futures_util::StreamExt;
                use tokio_tungstenite::tungstenite::Message;
                let (mut stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                match tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
                    Some(Ok(Message::Text(_))) => Some(stream),
                    Some(Ok(Message::Close(Some(f)))) => {
                        assert_eq!(u16::from(f.code), 4029);
                        None
                    }
                    other => panic!("unexpected {other:?}"),
                }
            })
        })
        .collect();
    let mut held = vec![];
    for t in tasks {
        if let Some(s) = t.await.unwrap() {
            held.push(s);
        }
    }
    assert_eq!(held.len(), 4, "exactly the cap, across three nodes");
    let mut c = nodes[0].client().await;
    assert_eq!(online(&mut c, &u).await, 4);
    // Slots come back when connections close.
    drop(held);
    let mut on_c = vec![];
    for _ in 0..4 {
        let mut attempt = 0;
        loop {
            let mut ws = nodes[2].connect_raw_ws(&u).await;
            match ws.first_frame().await {
                Ok(()) => {
                    on_c.push(ws);
                    break;
                }
                Err(code) => {
                    assert_eq!(code, 4029);
                    attempt += 1;
                    assert!(attempt < 100, "closed connections never freed their slots");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // A node killed with all four: they count until its lease (1 s) ends,
    // then no longer.
    nodes[2].kill9();
    let mut ws = nodes[1].connect_raw_ws(&u).await;
    assert_eq!(
        ws.first_frame().await,
        Err(4029),
        "the dead node's lease is still live"
    );
    eventually("the dead node's reservations stop counting", || {
        let node = &nodes[1];
        let u = u.clone();
        async move { node.connect_raw_ws(&u).await.first_frame().await.is_ok() }
    })
    .await;
    drop(on_c);
    for n in nodes.iter_mut() {
        n.terminate();
    }
}

/// PTTL of `key` (ms): -2 when it does not exist, -1 without an expiry.
async fn pttl(redis: &RedisServer, key: &str) -> i64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Issue 20: a user's reservation hash (`herald:{<user>}:conns`) had no
/// expiry, so a node killed with -9 left its entries there forever for
/// users who never came back. Every write gives it `--presence-ttl` (at
/// least 4 leases: 4 s with the test nodes' 1 s lease), and each node
/// refreshes its users' hashes in a slow sweep: the dead node's users'
/// hashes expire, the live node's users keep theirs past the TTL (two TTLs
/// here), online all along.
#[tokio::test]
async fn a_dead_nodes_reservations_expire_and_a_live_nodes_are_refreshed() {
    let redis = RedisServer::start();
    let ttl = ["--presence-ttl", "1s"];
    let mut dying = NodeProcess::start("dies", &redis.url(), &ttl);
    let live = NodeProcess::start("lives", &redis.url(), &ttl);
    let gone: Vec<String> = (0..3).map(|i| uid(&format!("gone{i}"))).collect();
    let kept: Vec<String> = (0..3).map(|i| uid(&format!("kept{i}"))).collect();
    let mut sockets = vec![];
    for u in &gone {
        sockets.push(dying.connect(u).await.0);
    }
    for u in &kept {
        sockets.push(live.connect(u).await.0);
    }
    let conns = |u: &str| format!("herald:{{{u}}}:conns");
    for u in gone.iter().chain(&kept) {
        let t = pttl(&redis, &conns(u)).await;
        assert!(0 < t && t <= 4000, "{u}'s reservations expire in {t} ms");
    }

    dying.kill9();
    let killed = std::time::Instant::now();
    let mut c = live.client().await;
    let mut expired = None;
    while killed.elapsed() < Duration::from_secs(9) {
        for u in &kept {
            let t = pttl(&redis, &conns(u)).await;
            assert!(
                t > 0,
                "{u} is still connected to a live node, {:?} after the kill its hash has PTTL {t}",
                killed.elapsed()
            );
        }
        if expired.is_none() {
            let mut left = 0;
            for u in &gone {
                if pttl(&redis, &conns(u)).await != -2 {
                    left += 1;
                }
            }
            if left == 0 {
                expired = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let expired = expired.expect("the dead node's users' hashes expire");
    assert!(
        expired <= Duration::from_secs(5),
        "gone {expired:?} after the kill: within the TTL of their last write"
    );
    for u in &kept {
        assert_eq!(online(&mut c, u).await, 1, "{u} is online on the live node");
    }
    for u in &gone {
        assert_eq!(online(&mut c, u).await, 0);
    }
    drop(sockets);
}
