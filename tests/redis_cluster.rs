//! Herald on Redis Cluster: three `herald serve` processes on a local
//! cluster of three primaries with one replica each (`redis+cluster://`),
//! user channels as sharded pub/sub. The same cross-node checks as
//! tests/cluster.rs, then a slot migration and a primary failover during a
//! stream of stored messages.
mod common;

use common::*;
use herald::proto::*;
use serde_json::json;
use std::time::Duration;

fn herald_on(cluster: &RedisCluster, n: usize) -> Vec<NodeProcess> {
    (0..n)
        .map(|i| NodeProcess::start(&format!("c{}", i + 1), &cluster.url(), &[]))
        .collect()
}

#[tokio::test]
async fn cross_node_delivery_presence_unread_badge_and_broadcast() {
    let rc = RedisCluster::start();
    let nodes = herald_on(&rc, 3);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let u = uid("rc");
    let mut ca = a.client().await;
    let mut cc = c.client().await;
    assert_eq!(online(&mut cc, &u).await, 0);

    // Stored before anyone connects: unread agrees everywhere.
    let ids = send_numbered(&mut cc, &u, 3).await;
    assert_eq!(unread(&mut ca, &u).await, 3);
    let (mut phone, w) = a.connect(&u).await;
    let (mut laptop, w2) = b.connect(&u).await;
    assert_eq!(w["unread"], 3);
    assert_eq!(w2["unread"], 3);
    for _ in 0..3 {
        phone.next_of("message").await;
        laptop.next_of("message").await;
    }
    let before = c.stats().await.node.unwrap().broker_events_received;

    // Sent through the node without the user: both devices, nothing on c.
    for i in 0..50 {
        let r = send(&mut cc, &[&u], &i.to_string()).await;
        assert!(r.deliveries[0].online, "SPUBLISH reached a subscribed node");
        let id = r.deliveries[0].message_id.clone();
        assert_eq!(phone.next_of("message").await["id"], id.as_str());
        assert_eq!(laptop.next_of("message").await["id"], id.as_str());
    }
    assert_eq!(
        c.stats().await.node.unwrap().broker_events_received,
        before,
        "node c holds no connection of the user"
    );

    // IsOnline for a batch of users in different slots, from every node.
    let others: Vec<String> = (0..20).map(|i| uid(&format!("o{i}"))).collect();
    let (mut other_ws, _) = c.connect(&others[7]).await;
    let mut batch = others.clone();
    batch.push(u.clone());
    for n in &nodes {
        let r = n
            .client()
            .await
            .is_online(IsOnlineRequest {
                user_ids: batch.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let counts: Vec<u32> = r.users.iter().map(|x| x.connections).collect();
        let mut want = vec![0u32; 21];
        want[7] = 1;
        want[20] = 2;
        assert_eq!(counts, want, "IsOnline batch from {}", n.node_id);
    }
    // Stats: every node, the connections and the distinct users.
    let s = c.stats().await;
    let names: Vec<String> = s.nodes.iter().map(|n| n.node_id.clone()).collect();
    assert_eq!(names, vec!["c1", "c2", "c3"]);
    assert_eq!(s.connections, 3);
    assert_eq!(s.online_users, 2);

    // Badge sync: a read on a's device moves b's badge.
    phone
        .send_json(json!({"type":"read","up_to": ids[1]}))
        .await;
    assert_eq!(laptop.next_of("unread").await["count"], 51);
    assert_eq!(phone.next_of("unread").await["count"], 51);
    cc.mark_read(MarkReadRequest {
        user_id: u.clone(),
        up_to_message_id: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(phone.next_of("unread").await["count"], 0);
    assert_eq!(laptop.next_of("unread").await["count"], 0);

    // Broadcast reaches every node once.
    let r = cc
        .broadcast(BroadcastRequest {
            topic: "all".into(),
            payload_json: "1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for ws in [&mut phone, &mut laptop, &mut other_ws] {
        assert_eq!(ws.next_of("message").await["id"], r.message_id.as_str());
        ws.expect_silence(Duration::from_millis(200)).await;
    }

    // Resume on another node from the middle.
    drop(laptop);
    let more = send_numbered(&mut ca, &u, 5).await;
    let (mut back, w) = c.connect_since(&u, Some(&ids[2])).await;
    assert_eq!(w["resumed"], true);
    for _ in 0..50 {
        back.next_of("message").await;
    }
    for id in &more {
        assert_eq!(back.next_of("message").await["id"], id.as_str());
    }

    // DisconnectUser closes every device of the user, cluster-wide.
    let d = ca
        .disconnect_user(DisconnectUserRequest {
            user_id: u.clone(),
            reason: "bye".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.closed, 2);
    assert_eq!(phone.expect_close().await.0, 4001);
    assert_eq!(back.expect_close().await.0, 4001);
    eventually("offline", || {
        let (mut c, u) = (cc.clone(), u.clone());
        async move { online(&mut c, &u).await == 0 }
    })
    .await;
}
