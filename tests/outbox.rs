//! The PostgreSQL outbox end to end: a real PostgreSQL, a real Redis, two
//! `herald serve` processes consuming one outbox table, WebSocket devices
//! for every user on both nodes. Inserter tasks commit (and roll back)
//! transactions that write a business row and its notification; meanwhile
//! the active consumer node is killed with SIGKILL and restarted, and
//! PostgreSQL is restarted. Every committed row must reach every device of
//! its users exactly once, in each user's commit order; no rolled-back row
//! may arrive; poison rows must land in the dead-letter table with their
//! error.

mod common;
use common::*;

use futures_util::StreamExt;
use rand::Rng;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const USERS: usize = 16;
const INSERTERS: usize = 8;
/// Transactions per inserter (about a tenth roll back; some carry two or
/// three recipients).
const TXNS: usize = 260;

/// Each user's committed tags in commit order, the rolled-back tags, and
/// when each tag committed.
#[derive(Default)]
struct Ledger {
    expected: Vec<Vec<String>>,
    rolled_back: HashSet<String>,
    committed_at: HashMap<String, Instant>,
    committed_rows: usize,
    committed_txns: usize,
}

/// What one device (a WebSocket of a user, reconnecting with `since`)
/// received, in order, and when each tag first arrived anywhere.
type Received = Arc<Mutex<Vec<String>>>;
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

fn user(i: usize) -> String {
    format!("outbox-user-{i}")
}

/// A device: reads message frames; when its node goes away it reconnects
/// (same address) with `since` = the last id it got, as the JS client does.
async fn device(
    ws: Ws,
    addr: std::net::SocketAddr,
    user: String,
    got: Received,
    arrivals: Arrivals,
) {
    let mut stream = ws.stream;
    let mut last: Option<String> = None;
    loop {
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(t) = msg else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "welcome" && last.is_some() {
                assert_eq!(v["resumed"], true, "{user} resumes completely: {v}");
            }
            if v["type"] != "message" {
                continue;
            }
            last = Some(v["id"].as_str().unwrap().to_string());
            let tag = v["data"]["t"].as_str().unwrap_or("?").to_string();
            arrivals
                .lock()
                .unwrap()
                .entry(tag.clone())
                .or_insert_with(Instant::now);
            got.lock().unwrap().push(tag);
        }
        // The node went away: reconnect until it is back.
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut url = format!("ws://{addr}/ws?token={}", token(&user));
            if let Some(s) = &last {
                url.push_str(&format!("&since={s}"));
            }
            if let Ok((s, _)) = tokio_tungstenite::connect_async(url).await {
                stream = s;
                break;
            }
        }
    }
}

/// One inserter: serial transactions, each a business row and an outbox
/// row for one to three users. The recipients' locks are held from BEGIN
/// to the ledger entry, so each user's commit order is the ledger's order.
/// The gate's read side is held per transaction: PostgreSQL is restarted
/// only between transactions, so a commit is never in doubt.
async fn inserter(
    k: usize,
    url: String,
    locks: Arc<Vec<tokio::sync::Mutex<()>>>,
    gate: Arc<tokio::sync::RwLock<()>>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let connect = || async {
        loop {
            if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut client = connect().await;
    for n in 0..TXNS {
        let (recipients, rollback) = {
            let mut rng = rand::rng();
            let count = if rng.random_ratio(1, 7) {
                rng.random_range(2..=3)
            } else {
                1
            };
            let mut r: Vec<usize> = Vec::new();
            while r.len() < count {
                let u = rng.random_range(0..USERS);
                if !r.contains(&u) {
                    r.push(u);
                }
            }
            r.sort();
            (r, rng.random_ratio(1, 10))
        };
        let tag = format!("{k}-{n}");
        let names: Vec<String> = recipients.iter().map(|&u| user(u)).collect();
        let payload = serde_json::json!({ "t": tag, "order": n }).to_string();
        let _gate = gate.read().await;
        let mut held = Vec::new();
        for &u in &recipients {
            held.push(locks[u].lock().await);
        }
        loop {
            let attempt = async {
                let tx = client.transaction().await?;
                tx.execute("INSERT INTO orders (tag) VALUES ($1)", &[&tag])
                    .await?;
                tx.execute(
                    "INSERT INTO herald_outbox (user_ids, topic, payload) VALUES ($1, 'orders', $2)",
                    &[&names, &payload],
                )
                .await?;
                if rollback {
                    tx.rollback().await
                } else {
                    tx.commit().await
                }
            };
            match attempt.await {
                Ok(()) => break,
                // The connection died with PostgreSQL's restart, before
                // this transaction began: nothing of it committed.
                Err(_) => client = connect().await,
            }
        }
        {
            let mut l = ledger.lock().unwrap();
            if rollback {
                l.rolled_back.insert(tag);
            } else {
                for &u in &recipients {
                    l.expected[u].push(tag.clone());
                }
                l.committed_at.insert(tag, Instant::now());
                l.committed_rows += 1;
                l.committed_txns += 1;
            }
        }
        drop(held);
        let pause = rand::rng().random_range(10..50);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// The node of the two whose consumer is active, if one is.
async fn active(nodes: &[NodeProcess]) -> Option<usize> {
    for (i, n) in nodes.iter().enumerate() {
        if n.pid().is_none() {
            continue;
        }
        let Ok(mut c) = tokio::time::timeout(Duration::from_secs(2), n.client()).await else {
            continue;
        };
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_secs(2),
            c.stats(herald::proto::StatsRequest {}),
        )
        .await
        {
            if s.into_inner().outbox.is_some_and(|o| o.state == "active") {
                return Some(i);
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_rows_reach_every_device_exactly_once_in_order() {
    let redis = RedisServer::start();
    let mut pg = PostgresServer::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["outbox", "init", "--apply", "--outbox-postgres", &pg.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE orders (id bigserial PRIMARY KEY, tag text NOT NULL)")
        .await
        .unwrap();
    drop(db);

    let flags = [
        "--outbox-postgres",
        &pg.url(),
        "--outbox-poll",
        "200ms",
        "--outbox-batch",
        "64",
        "--outbox-max-backoff",
        "500ms",
    ];
    let mut nodes = vec![
        NodeProcess::start("outbox-a", &redis.url(), &flags),
        NodeProcess::start("outbox-b", &redis.url(), &flags),
    ];

    // Two devices per user, one on each node, before anything is inserted.
    let arrivals: Arrivals = Arc::default();
    let mut devices: Vec<(usize, Received)> = Vec::new();
    let mut tasks = Vec::new();
    for u in 0..USERS {
        for n in &nodes {
            let (ws, _) = n.connect(&user(u)).await;
            let got: Received = Arc::default();
            devices.push((u, got.clone()));
            tasks.push(tokio::spawn(device(
                ws,
                n.ws,
                user(u),
                got,
                arrivals.clone(),
            )));
        }
    }

    let ledger = Arc::new(Mutex::new(Ledger {
        expected: vec![Vec::new(); USERS],
        ..Default::default()
    }));
    let locks: Arc<Vec<tokio::sync::Mutex<()>>> =
        Arc::new((0..USERS).map(|_| Default::default()).collect());
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let started = Instant::now();
    let inserters: Vec<_> = (0..INSERTERS)
        .map(|k| {
            tokio::spawn(inserter(
                k,
                pg.url(),
                locks.clone(),
                gate.clone(),
                ledger.clone(),
            ))
        })
        .collect();
    let progress = |l: &Arc<Mutex<Ledger>>| l.lock().unwrap().committed_txns;
    let total = INSERTERS * TXNS * 9 / 10;

    // A third in: kill the active consumer with SIGKILL, insert poison
    // rows, restart the node.
    while progress(&ledger) < total / 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = active(&nodes).await.expect("one node's consumer is active");
    nodes[victim].kill9();
    println!(
        "killed the active consumer {} at {:?}",
        nodes[victim].node_id,
        started.elapsed()
    );
    let db = pg.client().await;
    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let big = format!("\"{}\"", "x".repeat(70_000));
    let poison: Vec<(i64, &str)> = {
        let mut ids = Vec::new();
        for (sql, what) in [
            ("INSERT INTO herald_outbox (user_ids, payload) VALUES ('{outbox-user-0}', '{not json') RETURNING id", "JSON"),
            ("INSERT INTO herald_outbox (op, user_ids, payload) VALUES ('shout', '{outbox-user-1}', '{}') RETURNING id", "unknown op"),
            ("INSERT INTO herald_outbox (user_ids, payload) VALUES (ARRAY['outbox-user-2', NULL], '{}') RETURNING id", "NULL"),
            ("INSERT INTO herald_outbox (user_ids, payload) VALUES ('{}', '{}') RETURNING id", "user"),
        ] {
            ids.push((db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0), what));
        }
        let r = db
            .query_one(
                "INSERT INTO herald_outbox (user_ids, payload) VALUES ($1, '{}') RETURNING id",
                &[&too_many],
            )
            .await
            .unwrap();
        ids.push((r.get(0), "at most 1000"));
        let r = db
            .query_one("INSERT INTO herald_outbox (user_ids, payload) VALUES ('{outbox-user-3}', $1) RETURNING id", &[&big])
            .await
            .unwrap();
        ids.push((r.get(0), "max-payload-bytes"));
        ids
    };
    drop(db);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes[victim].restart();
    println!(
        "restarted {} at {:?}",
        nodes[victim].node_id,
        started.elapsed()
    );

    // Two thirds in: restart PostgreSQL between transactions.
    while progress(&ledger) < total * 2 / 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let _all = gate.write().await;
        pg.restart();
        println!("restarted PostgreSQL at {:?}", started.elapsed());
    }
    for t in inserters {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("inserters finish")
            .unwrap();
    }
    let inserted_at = started.elapsed();

    // Wait until every device has its user's rows (or a deadline).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let l = ledger.lock().unwrap();
        let done = devices
            .iter()
            .all(|(u, got)| got.lock().unwrap().len() >= l.expected[*u].len());
        drop(l);
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Anything late or doubled would arrive now.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for t in &tasks {
        t.abort();
    }

    let l = ledger.lock().unwrap();
    let (mut delivered, mut duplicates, mut lost, mut reordered, mut rolled_back_seen) =
        (0, 0, 0, 0, 0);
    for (u, got) in &devices {
        let got = got.lock().unwrap();
        let want = &l.expected[*u];
        let mut seen = HashSet::new();
        let mut firsts = Vec::new();
        for tag in got.iter() {
            if l.rolled_back.contains(tag) {
                rolled_back_seen += 1;
            } else if !seen.insert(tag.clone()) {
                duplicates += 1;
            } else {
                firsts.push(tag.clone());
            }
        }
        delivered += firsts.len();
        let want_set: HashSet<&String> = want.iter().collect();
        lost += want.iter().filter(|t| !seen.contains(*t)).count();
        let in_order: Vec<&String> = firsts.iter().filter(|t| want_set.contains(t)).collect();
        let expected_order: Vec<&String> = want.iter().filter(|t| seen.contains(*t)).collect();
        reordered += in_order
            .iter()
            .zip(&expected_order)
            .filter(|(a, b)| a != b)
            .count();
    }
    let max_lag = l
        .committed_at
        .iter()
        .filter_map(|(tag, at)| {
            arrivals
                .lock()
                .unwrap()
                .get(tag)
                .map(|a| a.saturating_duration_since(*at))
        })
        .max()
        .unwrap_or_default();
    let sent: usize = l.expected.iter().map(Vec::len).sum::<usize>() * 2;

    let db = pg.client().await;
    let dead = db
        .query("SELECT id, error FROM herald_outbox_dead ORDER BY id", &[])
        .await
        .unwrap();
    let pending: i64 = db
        .query_one("SELECT count(*) FROM herald_outbox", &[])
        .await
        .unwrap()
        .get(0);
    let orders: i64 = db
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "outbox: rows committed {} (rolled back {}), device deliveries expected {sent}, delivered {delivered}, \
         duplicates {duplicates}, lost {lost}, reordered {reordered}, rolled-back delivered {rolled_back_seen}, \
         dead-lettered {}, pending {pending}, max lag {max_lag:?}, inserts took {inserted_at:?}",
        l.committed_rows,
        l.rolled_back.len(),
        dead.len()
    );
    for r in &dead {
        println!(
            "  dead row {}: {}",
            r.get::<_, i64>(0),
            r.get::<_, String>(1)
        );
    }
    assert_eq!(
        orders as usize, l.committed_txns,
        "business rows: committed transactions only"
    );
    assert_eq!(
        (duplicates, lost, reordered, rolled_back_seen),
        (0, 0, 0, 0)
    );
    assert_eq!(delivered, sent);
    assert_eq!(pending, 0, "every row acknowledged");
    let dead: Vec<(i64, String)> = dead.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(dead.len(), poison.len(), "{dead:?}");
    for ((id, what), (dead_id, error)) in poison.iter().zip(&dead) {
        assert_eq!(id, dead_id);
        assert!(
            error.contains(what),
            "row {id}: {error:?} should mention {what:?}"
        );
    }
    let stats: Vec<_> = futures_util::future::join_all(nodes.iter().map(|n| n.stats())).await;
    let states: Vec<String> = stats
        .iter()
        .map(|s| s.outbox.clone().unwrap().state)
        .collect();
    assert_eq!(
        states.iter().filter(|s| *s == "active").count(),
        1,
        "{states:?}"
    );
    assert!(states.contains(&"standby".to_string()), "{states:?}");
}
