//! The message center: listing, per-message read and unread, deletion,
//! counts per topic prefix, and how every device stays in sync.

#[macro_use]
mod common;
use common::*;

/// What a stored `SendToUser` costs Redis with a full inbox (each send
/// trims one message), the figure the message center must not raise: one
/// script call per send, at most 11 commands inside it. Prints EVALSHA's
/// usec_per_call too (`--nocapture`); timings are the bench's business.
#[tokio::test]
async fn redis_cost_of_a_stored_send() {
    let mut args = args();
    args.inbox_max_messages = 200;
    // No lease renewal (a script call of its own) while the sends are
    // counted: the first comes after a third of the lease.
    args.node_lease = std::time::Duration::from_secs(900);
    let node = TestNode::start_on(Backend::Redis, args).await;
    let port = node.redis_port().expect("redis");
    let cli = |a: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(a)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mut c = node.client().await;
    for round in 0..2 {
        let user = uid("cost");
        send_numbered(&mut c, &user, 300).await; // fills the inbox
        cli(&["CONFIG", "RESETSTAT"]);
        send_numbered(&mut c, &user, 2000).await;
        let stats = cli(&["INFO", "commandstats"]);
        let line = stats
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .expect("evalsha stats")
            .to_string();
        println!("round {round}: {line}");
        let calls: u64 = line
            .split(['=', ','])
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("calls=N");
        assert_eq!(calls, 2000, "one script call per stored send: {line}");
        let others: Vec<&str> = stats
            .lines()
            .filter(|l| l.starts_with("cmdstat_"))
            .filter(|l| {
                ![
                    "cmdstat_evalsha:",
                    "cmdstat_info:",
                    "cmdstat_config|resetstat:",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .filter(|l| !l.contains("_ping:") && !l.contains("cmdstat_client|"))
            .collect();
        println!("round {round}: other commands {others:?}");
        // Inside the script, at the cap: HMGET, XADD, HSET (3), PUBLISH and
        // the trim (XRANGE 2, XLEN, XTRIM, HGET): 11 commands per send.
        let inside: u64 = others
            .iter()
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        assert!(
            inside <= 11 * 2000,
            "{inside} commands ran inside 2000 stored sends, more than 11 each: {others:?}"
        );
    }
}

use herald::proto::push_service_client::PushServiceClient;
use herald::proto::*;
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Code;

type Client = PushServiceClient<Channel>;

async fn send_topic(c: &mut Client, user: &str, topic: &str, payload: &str) -> String {
    c.send_to_user(SendToUserRequest {
        user_ids: vec![user.into()],
        topic: topic.into(),
        payload_json: payload.into(),
        ..Default::default()
    })
    .await
    .expect("SendToUser succeeds")
    .into_inner()
    .deliveries[0]
        .message_id
        .clone()
}

async fn list(c: &mut Client, req: ListMessagesRequest) -> ListMessagesResponse {
    c.list_messages(req)
        .await
        .expect("ListMessages")
        .into_inner()
}

/// Ids and read flags of a page.
fn page(r: &ListMessagesResponse) -> Vec<(String, bool)> {
    r.messages
        .iter()
        .map(|m| (m.message_id.clone(), m.read))
        .collect()
}

fn ids(v: &[&String]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn read_ids(c: &mut Client, user: &str, v: &[&String]) -> MarkReadResponse {
    c.mark_read(MarkReadRequest {
        user_id: user.into(),
        message_ids: ids(v),
        ..Default::default()
    })
    .await
    .expect("MarkRead by ids")
    .into_inner()
}

async fn unread_ids(c: &mut Client, user: &str, v: &[&String]) -> MarkUnreadResponse {
    c.mark_unread(MarkUnreadRequest {
        user_id: user.into(),
        message_ids: ids(v),
    })
    .await
    .expect("MarkUnread")
    .into_inner()
}

async fn delete_ids(c: &mut Client, user: &str, v: &[&String]) -> DeleteMessagesResponse {
    c.delete_messages(DeleteMessagesRequest {
        user_id: user.into(),
        message_ids: ids(v),
        all: false,
    })
    .await
    .expect("DeleteMessages")
    .into_inner()
}

async fn read_up_to(c: &mut Client, user: &str, id: &str) -> u64 {
    c.mark_read(MarkReadRequest {
        user_id: user.into(),
        up_to_message_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("MarkRead up_to")
    .into_inner()
    .unread
}

async fn browse_read_unread_delete(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("mc");
    let m = send_numbered(&mut c, &u, 5).await;

    // Newest first, two at a time, to the end.
    let req = |cursor: &str| ListMessagesRequest {
        user_id: u.clone(),
        cursor: cursor.into(),
        limit: 2,
        ..Default::default()
    };
    let p1 = list(&mut c, req("")).await;
    assert_eq!(
        page(&p1),
        vec![(m[4].clone(), false), (m[3].clone(), false)]
    );
    assert_eq!(p1.unread, 5);
    assert_eq!(p1.messages[0].payload_json, "4");
    assert_eq!(p1.messages[0].topic, "t");
    assert!(p1.messages[0].timestamp_ms > 0);
    let p2 = list(&mut c, req(&p1.next_cursor)).await;
    assert_eq!(
        page(&p2),
        vec![(m[2].clone(), false), (m[1].clone(), false)]
    );
    let p3 = list(&mut c, req(&p2.next_cursor)).await;
    assert_eq!(page(&p3), vec![(m[0].clone(), false)]);
    assert_eq!(p3.next_cursor, "", "the end");
    // Oldest first.
    let o = list(
        &mut c,
        ListMessagesRequest {
            user_id: u.clone(),
            oldest_first: true,
            cursor: m[1].clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(o.messages.len(), 3);
    assert_eq!(o.messages[0].message_id, m[2]);

    // Read one in the middle: the cursor stays, the count drops.
    let r = read_ids(&mut c, &u, &[&m[2]]).await;
    assert_eq!(
        (r.unread, r.changed_message_ids.clone()),
        (4, vec![m[2].clone()])
    );
    let r = read_ids(&mut c, &u, &[&m[2]]).await;
    assert_eq!(
        (r.unread, r.changed_message_ids.len()),
        (4, 0),
        "already read"
    );
    assert_eq!(unread(&mut c, &u).await, 4);
    // Unread it again.
    let r = unread_ids(&mut c, &u, &[&m[2]]).await;
    assert_eq!(
        (r.unread, r.changed_message_ids.clone()),
        (5, vec![m[2].clone()])
    );
    // Cursor up to m1, then one below it unread again.
    read_ids(&mut c, &u, &[&m[3]]).await;
    assert_eq!(read_up_to(&mut c, &u, &m[1]).await, 2);
    assert_eq!(unread_ids(&mut c, &u, &[&m[0]]).await.unread, 3);
    let all = list(
        &mut c,
        ListMessagesRequest {
            user_id: u.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        page(&all),
        vec![
            (m[4].clone(), false),
            (m[3].clone(), true),
            (m[2].clone(), false),
            (m[1].clone(), true),
            (m[0].clone(), false),
        ]
    );
    let only = list(
        &mut c,
        ListMessagesRequest {
            user_id: u.clone(),
            unread_only: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(only.messages.len(), 3);

    // A connect without since replays the unread ones, oldest first.
    let (mut ws, welcome) = node.connect(&u).await;
    assert_eq!(welcome["unread"], 3);
    assert_eq!(welcome["replay"], 3);
    for id in [&m[0], &m[2], &m[4]] {
        assert_eq!(ws.next_of("message").await["id"], id.as_str());
    }

    // Delete: one read, one unread below the cursor.
    let d = delete_ids(&mut c, &u, &[&m[3], &m[0], &m[0]]).await;
    assert_eq!(d.deleted, 2);
    assert_eq!(d.unread, 2);
    assert_eq!(unread(&mut c, &u).await, 2);
    let ch = ws.next_of("changed").await;
    assert_eq!(
        ch,
        json!({"type":"changed","op":"delete","ids":[m[3], m[0]],"count":2})
    );
    // Resume after deletions is complete and skips them.
    let (mut ws2, w2) = node.connect_since(&u, Some(&m[0])).await;
    assert_eq!(w2["resumed"], true);
    assert_eq!(w2["replay"], 3);
    for id in [&m[1], &m[2], &m[4]] {
        let got = ws2.next_json().await;
        assert_eq!(got["id"], id.as_str(), "{got}");
    }
    // Mark all read.
    assert_eq!(read_up_to(&mut c, &u, "").await, 0);
    let ch = ws.next_of("changed").await;
    assert_eq!(ch["op"], "read");
    assert_eq!(ch["up_to"], m[4].as_str());
    assert_eq!(ch["count"], 0);
    assert_eq!(ws2.next_of("unread").await["count"], 0);
    // Delete all; ids keep increasing afterwards.
    let d = c
        .delete_messages(DeleteMessagesRequest {
            user_id: u.clone(),
            all: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted, 3);
    assert_eq!(ws.next_of("changed").await["all"], true);
    let all = list(
        &mut c,
        ListMessagesRequest {
            user_id: u.clone(),
            ..Default::default()
        },
    )
    .await;
    assert!(all.messages.is_empty());
    let n = send_topic(&mut c, &u, "x", "1").await;
    assert!(
        n.split_once('-').unwrap().0.parse::<u64>().unwrap()
            >= m[4].split_once('-').unwrap().0.parse().unwrap()
    );
    assert_ne!(n, m[4]);
    assert_eq!(unread(&mut c, &u).await, 1);
    node.stop().await;
}

async fn topic_prefixes(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("topics");
    let a1 = send_topic(&mut c, &u, "billing.invoice", "1").await;
    let _a2 = send_topic(&mut c, &u, "billing.refund", "2").await;
    let _s = send_topic(&mut c, &u, "security", "3").await;
    let q = send_topic(&mut c, &u, "bill\"ing", "4").await;
    let count = |c: &mut Client, p: &str| {
        let mut c = c.clone();
        let p = p.to_string();
        let u = u.clone();
        async move {
            c.unread_count(UnreadCountRequest {
                user_id: u,
                topic_prefix: p,
            })
            .await
            .unwrap()
            .into_inner()
            .count
        }
    };
    assert_eq!(count(&mut c, "billing.").await, 2);
    assert_eq!(count(&mut c, "bill").await, 3);
    assert_eq!(count(&mut c, "bill\"").await, 1);
    assert_eq!(count(&mut c, "").await, 4);
    read_ids(&mut c, &u, &[&a1]).await;
    assert_eq!(count(&mut c, "billing.").await, 1);
    let l = list(
        &mut c,
        ListMessagesRequest {
            user_id: u.clone(),
            topic_prefix: "bill\"".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(page(&l), vec![(q.clone(), false)]);
    assert_eq!(l.messages[0].topic, "bill\"ing");
    node.stop().await;
}

async fn validation(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("val");
    let m = send_numbered(&mut c, &u, 1).await;
    fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(s) => (s.code(), s.message().to_string()),
        }
    }
    let (k, msg) = code(
        c.mark_read(MarkReadRequest {
            user_id: u.clone(),
            message_ids: vec![m[0].clone(), "nope".into()],
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::InvalidArgument);
    assert!(msg.contains("message_ids[1]"), "{msg}");
    let (k, msg) = code(
        c.mark_read(MarkReadRequest {
            user_id: u.clone(),
            message_ids: vec![m[0].clone()],
            up_to_message_id: m[0].clone(),
        })
        .await,
    );
    assert_eq!(k, Code::InvalidArgument, "{msg}");
    let (k, msg) = code(
        c.mark_unread(MarkUnreadRequest {
            user_id: u.clone(),
            message_ids: vec![m[0].clone(); 1001],
        })
        .await,
    );
    assert_eq!(k, Code::InvalidArgument);
    assert!(msg.contains("at most 1000"), "{msg}");
    let (k, _) = code(
        c.mark_unread(MarkUnreadRequest {
            user_id: u.clone(),
            message_ids: vec![],
        })
        .await,
    );
    assert_eq!(k, Code::InvalidArgument);
    let (k, msg) = code(
        c.list_messages(ListMessagesRequest {
            user_id: u.clone(),
            limit: 101,
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::InvalidArgument);
    assert!(msg.contains("cap of 100"), "{msg}");
    let (k, msg) = code(
        c.list_messages(ListMessagesRequest {
            user_id: u.clone(),
            cursor: "x".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::InvalidArgument);
    assert!(msg.starts_with("cursor"), "{msg}");
    let (k, _) = code(
        c.list_messages(ListMessagesRequest {
            user_id: u.clone(),
            topic_prefix: "x".repeat(257),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::InvalidArgument);
    for (ids, all) in [(vec![], false), (vec![m[0].clone()], true)] {
        let (k, _) = code(
            c.delete_messages(DeleteMessagesRequest {
                user_id: u.clone(),
                message_ids: ids,
                all,
            })
            .await,
        );
        assert_eq!(k, Code::InvalidArgument);
    }
    let (k, _) = code(
        c.list_messages(ListMessagesRequest {
            user_id: "".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::InvalidArgument);
    // Unknown ids and users are no error: nothing to change.
    let r = read_ids(&mut c, &u, &[&"1-0".to_string()]).await;
    assert_eq!((r.unread, r.changed_message_ids.len()), (1, 0));
    let nobody = list(
        &mut c,
        ListMessagesRequest {
            user_id: uid("nobody"),
            ..Default::default()
        },
    )
    .await;
    assert!(nobody.messages.is_empty() && nobody.next_cursor.is_empty());
    // Cursors at the ends of the id space.
    for cursor in ["0-0", "18446744073709551615-18446744073709551615"] {
        for oldest_first in [false, true] {
            list(
                &mut c,
                ListMessagesRequest {
                    user_id: u.clone(),
                    cursor: cursor.into(),
                    oldest_first,
                    ..Default::default()
                },
            )
            .await;
        }
    }
    node.stop().await;
}

/// Every connection of the user sees every change, in order, with the
/// count; a read on one device updates the other.
async fn devices_stay_in_sync(b: Backend) {
    let node = TestNode::start(b).await;
    let mut c = node.client().await;
    let u = uid("sync");
    let m = send_numbered(&mut c, &u, 3).await;
    let (mut a, _) = node.connect(&u).await;
    let (mut b2, _) = node.connect(&u).await;
    read_ids(&mut c, &u, &[&m[1]]).await;
    for ws in [&mut a, &mut b2] {
        assert_eq!(ws.next_of("unread").await["count"], 2);
        assert_eq!(
            ws.next_of("changed").await,
            json!({"type":"changed","op":"read","ids":[m[1]],"count":2})
        );
    }
    unread_ids(&mut c, &u, &[&m[1]]).await;
    for ws in [&mut a, &mut b2] {
        let ch = ws.next_of("changed").await;
        assert_eq!(
            (ch["op"].clone(), ch["count"].clone()),
            (json!("unread"), json!(3))
        );
    }
    node.stop().await;
}

on_both_backends!(
    browse_read_unread_delete,
    topic_prefixes,
    validation,
    devices_stay_in_sync,
    expiry_with_per_message_state,
    bad_center_frames
);

/// Two devices on two nodes of a cluster: a read on one updates the
/// other's list and badge; a delete disappears everywhere.
#[tokio::test]
async fn two_devices_on_two_nodes() {
    let redis = RedisServer::start();
    let n1 = NodeProcess::start("mc1", &redis.url(), &[]);
    let n2 = NodeProcess::start("mc2", &redis.url(), &[]);
    let u = uid("xmc");
    let mut c1 = n1.client().await;
    let m = send_numbered(&mut c1, &u, 4).await;
    let (mut d1, _) = n1.connect(&u).await;
    let (mut d2, w2) = n2.connect(&u).await;
    assert_eq!(w2["unread"], 4);
    for _ in 0..4 {
        d1.next_of("message").await;
        d2.next_of("message").await;
    }
    // Device 1 reads one through the WebSocket.
    d1.send_json(json!({"type":"read","ids":[m[2]]})).await;
    for d in [&mut d1, &mut d2] {
        assert_eq!(d.next_of("unread").await["count"], 3, "the badge");
        let ch = d.next_of("changed").await;
        assert_eq!(
            ch,
            json!({"type":"changed","op":"read","ids":[m[2]],"count":3})
        );
    }
    // Device 2 deletes one through the WebSocket; both see it.
    d2.send_json(json!({"type":"delete","ids":[m[0]]})).await;
    for d in [&mut d1, &mut d2] {
        let ch = d.next_of("changed").await;
        assert_eq!(
            ch,
            json!({"type":"changed","op":"delete","ids":[m[0]],"count":2})
        );
    }
    // Device 2's list (through its own node) agrees.
    d2.send_json(json!({"type":"history","limit":10,"req":"p1"}))
        .await;
    let h = d2.next_of("history").await;
    assert_eq!(h["req"], "p1");
    let got: Vec<(String, bool)> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v: &Value| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["read"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (m[3].clone(), false),
            (m[2].clone(), true),
            (m[1].clone(), false)
        ]
    );
    assert_eq!(h["unread"], 2);
    let mut c2 = n2.client().await;
    assert_eq!(unread(&mut c2, &u).await, 2);
}

/// Expiry by age with per-message state: a deleted newest message and
/// read/unread marks on messages that expire must not leave a phantom
/// count behind (the trim re-anchors `tn` below the oldest kept message).
async fn expiry_with_per_message_state(b: Backend) {
    let mut args = args();
    args.inbox_max_age = std::time::Duration::from_secs(2);
    let node = TestNode::start_on(b, args).await;
    let mut c = node.client().await;
    let u = uid("age");
    let m = send_numbered(&mut c, &u, 4).await;
    read_ids(&mut c, &u, &[&m[3]]).await; // read above the cursor
    read_up_to(&mut c, &u, &m[0]).await;
    unread_ids(&mut c, &u, &[&m[0]]).await; // unread below it
    delete_ids(&mut c, &u, &[&m[2]]).await; // deleted above it
    assert_eq!(unread(&mut c, &u).await, 2, "m0 and m1");
    tokio::time::sleep(std::time::Duration::from_millis(2300)).await;
    assert_eq!(unread(&mut c, &u).await, 0, "everything expired");
    let fresh = send_numbered(&mut c, &u, 2).await;
    assert_eq!(unread(&mut c, &u).await, 2);
    read_ids(&mut c, &u, &[&fresh[0]]).await;
    assert_eq!(unread(&mut c, &u).await, 1);
    let l = list(
        &mut c,
        ListMessagesRequest {
            user_id: u.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        page(&l),
        vec![(fresh[1].clone(), false), (fresh[0].clone(), true)]
    );
    node.stop().await;
}

/// Message-center client frames are validated: the connection stays and
/// gets a precise error frame.
async fn bad_center_frames(b: Backend) {
    let node = TestNode::start(b).await;
    let u = uid("badmc");
    let (mut ws, _) = node.connect(&u).await;
    let many: Vec<String> = (0..101).map(|i| format!("1-{i}")).collect();
    for (frame, needle) in [
        (json!({"type":"read","ids":["x"]}), "ids[0]"),
        (json!({"type":"read","ids":many}), "at most 100"),
        (json!({"type":"unread","ids":[]}), "at least one"),
        (
            json!({"type":"read","ids":["1-0"],"up_to":"1-0"}),
            "exactly one",
        ),
        (json!({"type":"delete"}), "exactly one"),
        (json!({"type":"delete","all":false}), "exactly one"),
        (json!({"type":"history","limit":51}), "cap of 50"),
        (json!({"type":"history","cursor":"t1-0"}), "cursor"),
        (json!({"type":"history","req":"x".repeat(65)}), "req"),
        (json!({"type":"history","topic":"x".repeat(257)}), "topic"),
    ] {
        ws.send_json(frame.clone()).await;
        let e = ws.next_of("error").await;
        assert_eq!(e["code"], "bad_request", "{frame}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{frame}: {e}"
        );
    }
    // Still served.
    ws.send_json(json!({"type":"history"})).await;
    let h = ws.next_of("history").await;
    assert_eq!(h["messages"], json!([]));
    assert_eq!(h["next"], Value::Null);
    assert_eq!(h["req"], Value::Null);
    node.stop().await;
}

/// Devices on two nodes mark, unmark and delete at once; afterwards the
/// count equals the number of unread messages listed, and every change
/// frame arrived in an order whose last count is the final one.
#[tokio::test]
async fn concurrent_changes_from_two_nodes_keep_the_count_exact() {
    let redis = RedisServer::start();
    let n1 = NodeProcess::start("cc1", &redis.url(), &[]);
    let n2 = NodeProcess::start("cc2", &redis.url(), &[]);
    let u = uid("conc");
    let mut c1 = n1.client().await;
    let m = send_numbered(&mut c1, &u, 40).await;
    let (mut watcher, _) = n1.connect(&u).await;
    let mut tasks = Vec::new();
    for (k, node) in [&n1, &n2, &n1, &n2].into_iter().enumerate() {
        let mut c = node.client().await;
        let (u, m) = (u.clone(), m.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..15usize {
                let pick: Vec<String> = (0..3)
                    .map(|j| m[(k * 7 + round * 3 + j) % 40].clone())
                    .collect();
                match (k + round) % 4 {
                    0 => {
                        c.mark_read(MarkReadRequest {
                            user_id: u.clone(),
                            message_ids: pick,
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    }
                    1 => {
                        c.mark_unread(MarkUnreadRequest {
                            user_id: u.clone(),
                            message_ids: pick,
                        })
                        .await
                        .unwrap();
                    }
                    2 if round % 5 == 0 => {
                        c.delete_messages(DeleteMessagesRequest {
                            user_id: u.clone(),
                            message_ids: pick[..1].to_vec(),
                            all: false,
                        })
                        .await
                        .unwrap();
                    }
                    _ => {
                        c.mark_read(MarkReadRequest {
                            user_id: u.clone(),
                            up_to_message_id: pick[0].clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let l = list(
        &mut c1,
        ListMessagesRequest {
            user_id: u.clone(),
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    let listed_unread = l.messages.iter().filter(|x| !x.read).count() as u64;
    assert_eq!(unread(&mut c1, &u).await, listed_unread);
    assert_eq!(l.unread, listed_unread);
    // The watcher's last "changed" count is the final count.
    let mut last = None;
    while let Ok(v) =
        tokio::time::timeout(std::time::Duration::from_millis(500), watcher.next_json()).await
    {
        if v["type"] == "changed" {
            last = v["count"].as_u64();
        }
    }
    assert_eq!(last, Some(listed_unread));
}
