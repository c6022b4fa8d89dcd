//! The chaos run (issue 10): one redis-server with an append-only file,
//! three `herald serve` processes, a few hundred WebSocket devices and a
//! few gRPC "backends" sending a steady stream of stored messages, while
//! the test crashes a node, freezes Redis, restarts Redis and lets two
//! misbehaving clients loose. It stops by itself.
//!
//! What must hold at the end:
//! - every message a backend got an answer for is in its user's inbox
//!   exactly once (each payload carries a unique `seq`; one `seq` stored
//!   under two ids is a duplicate), and no send is lost (a send is retried
//!   with the same `idempotency_key` until it gets an answer, on
//!   UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, UNKNOWN, ABORTED, INTERNAL,
//!   DATA_LOSS and RESOURCE_EXHAUSTED, as README's retry rule says: see `retryable`);
//! - every device (except the stuck reader and the flooder) received every
//!   stored message of its user exactly once, in id order, across its
//!   reconnects (it reconnects to the next node with `since` = the last id
//!   it saw, and dedupes nothing itself);
//! - the per-user cap (`--max-connections-per-user 3`) is never exceeded,
//!   as seen by `IsOnline` and by the sockets that hold a welcome;
//! - the stuck reader is dropped (`--write-timeout 1s`) and the flooder is
//!   closed with 1008;
//! - an attacker (issue 20) holds, on every node, as many silent TCP
//!   sockets to the gRPC port as it can get (`--grpc-max-connections 48`,
//!   reopened as the node closes them after `--grpc-handshake-timeout 1s`)
//!   and keyless `Health/Watch` streams at their cap
//!   (`--grpc-max-discovery-inflight 16`; more are refused): the keyed
//!   sends above still get through, and the node closes silent sockets;
//! - no node exits (n3 is killed with SIGKILL on purpose and restarted on
//!   the same ports), and RSS stays within a generous bound.
//!
//! Timeline (fractions of the run, D = HERALD_CHAOS_SECONDS): the stuck
//! reader and the flooder at the start; kill -9 n3 at 0.15 D; n3 back at
//! 0.3 D; SIGSTOP Redis at 0.4 D for 5 s; Redis killed and restarted from
//! its AOF at 0.7 D; sends stop at D; then a quiet period until every
//! device has caught up (at most 30 s).
//!
//! Size (environment variables):
//! - `HERALD_CHAOS_CLIENTS` — WebSocket devices (default 300; keep well
//!   under the fd limit: the test process holds one fd per device);
//! - `HERALD_CHAOS_SECONDS` — length of the sending phase (default 25);
//! - `HERALD_CHAOS_RATE` — stored sends per second, all backends together
//!   (default 200);
//! - `HERALD_CHAOS_BACKENDS` — concurrent backend tasks (default 4).
//!
//! Larger run: `HERALD_CHAOS_CLIENTS=3000 HERALD_CHAOS_SECONDS=120
//! HERALD_CHAOS_RATE=1000 cargo test --release --test chaos -- --nocapture`
//! (needs `redis-server` on PATH and the release `herald` binary, which
//! cargo builds for the test).
#[allow(unused_macros)]
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use herald::proto::push_service_client::PushServiceClient;
use herald::proto::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// The attacker's budgets on every node (see the module doc).
const GRPC_SLOTS: usize = 48;
const WATCH_CAP: usize = 16;

/// What the attacker got on one node.
#[derive(Default, Debug)]
struct Attack {
    /// Silent sockets opened (each held until the node closed it).
    silent_opened: u64,
    /// Silent sockets the node closed.
    silent_closed: u64,
    /// Watch streams the node let open, and refused with RESOURCE_EXHAUSTED.
    watches_open: u64,
    watches_refused: u64,
}

/// The attacker against one node's gRPC port, until `sending` ends: keeps
/// `GRPC_SLOTS` silent sockets open (a closed one is replaced) and
/// `WATCH_CAP + 4` Watch streams asked for.
async fn attack(addr: SocketAddr, sending: Arc<AtomicBool>) -> Attack {
    let mut got = Attack::default();
    let mut silent: Vec<tokio::net::TcpStream> = vec![];
    let mut watches = vec![];
    let mut health: Option<tonic_health::pb::health_client::HealthClient<Channel>> = None;
    while sending.load(Ordering::Relaxed) {
        // Drop what the node closed.
        let before = silent.len();
        silent.retain(|s| {
            let mut b = [0u8; 1];
            match s.try_read(&mut b) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            }
        });
        got.silent_closed += (before - silent.len()) as u64;
        while silent.len() < GRPC_SLOTS {
            match tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => {
                    silent.push(s);
                    got.silent_opened += 1;
                }
                _ => break,
            }
        }
        // Watch streams: (re)opened while fewer than asked are live.
        watches.retain(|w: &tokio::task::JoinHandle<()>| !w.is_finished());
        if watches.len() < WATCH_CAP + 4 {
            if health.is_none() {
                if let Ok(ch) = Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_timeout(Duration::from_millis(500))
                    .connect()
                    .await
                {
                    health = Some(tonic_health::pb::health_client::HealthClient::new(ch));
                }
            }
            if let Some(h) = health.as_mut() {
                let asked = h
                    .watch(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                match asked {
                    Ok(s) => {
                        got.watches_open += 1;
                        let mut s = s.into_inner();
                        watches.push(tokio::spawn(async move {
                            while let Some(Ok(_)) = s.next().await {}
                        }));
                    }
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        got.watches_refused += 1;
                        // At the cap: hold a placeholder for a while.
                        watches.push(tokio::spawn(tokio::time::sleep(Duration::from_secs(1))));
                    }
                    Err(_) => health = None,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in watches {
        w.abort();
    }
    got
}

/// Per-user cap passed to every node.
const CAP: u32 = 3;
/// Concurrent connects the capped user tries per round.
const CAP_TRIES: usize = 10;
/// How long a fresh connect may take before the device moves on.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of one SendToUser attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long after the sending phase a backend keeps retrying one send.
const GRACE: Duration = Duration::from_secs(20);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A stored message id `<ms>-<seq>` as a comparable pair.
type Id = (u64, u64);

fn parse_id(s: &str) -> Option<Id> {
    let (a, b) = s.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn fmt_id(id: Id) -> String {
    format!("{}-{}", id.0, id.1)
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// What one device saw over its whole life.
#[derive(Default)]
struct DeviceLog {
    /// Every stored message frame, in arrival order, across reconnects:
    /// (id, payload seq).
    got: Vec<(Id, u64)>,
    /// The id to resume from.
    last: Option<Id>,
    connects: u64,
    /// Welcomes with `resumed: false` on a connect with `since`.
    not_resumed: u64,
    /// Close codes (or "eof"/"error") that ended a connection.
    ends: BTreeMap<String, u64>,
}

struct Device {
    user: String,
    first_node: usize,
    log: Arc<Mutex<DeviceLog>>,
}

/// The loopback addresses of the three nodes (stable: a restarted node
/// comes back on the same ports).
#[derive(Clone)]
struct Cluster {
    ws: Vec<SocketAddr>,
    grpc: Vec<PushServiceClient<Channel>>,
}

impl Cluster {
    fn ws_url(&self, node: usize, user: &str, since: Option<Id>) -> String {
        match since {
            Some(id) => format!(
                "ws://{}/ws?token={}&since={}",
                self.ws[node],
                token(user),
                fmt_id(id)
            ),
            None => format!("ws://{}/ws?token={}", self.ws[node], token(user)),
        }
    }
}

fn close_label(msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> String {
    match msg {
        Some(Ok(Message::Close(Some(c)))) => u16::from(c.code).to_string(),
        Some(Ok(Message::Close(None))) => "close-no-code".into(),
        Some(Ok(_)) => "other".into(),
        Some(Err(_)) => "error".into(),
        None => "eof".into(),
    }
}

/// A device: connect, read everything, and on any end reconnect to the
/// next node with `since` = the last stored id it saw (the very first
/// connect uses `since=0-0`: everything stored). Runs until `stop`.
async fn run_device(
    cluster: Cluster,
    user: String,
    mut node: usize,
    log: Arc<Mutex<DeviceLog>>,
    mut stop: watch::Receiver<bool>,
    connected: Arc<AtomicUsize>,
) {
    let mut first = true;
    while !*stop.borrow() {
        let since = log.lock().unwrap().last.or(Some((0, 0)));
        let url = cluster.ws_url(node, &user, since);
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url));
        let mut ws = match attempt.await {
            Ok(Ok((ws, _))) => ws,
            _ => {
                node = (node + 1) % cluster.ws.len();
                backoff().await;
                continue;
            }
        };
        // The welcome.
        let welcome = tokio::time::timeout(CONNECT_TIMEOUT, ws.next()).await;
        let welcome = match welcome {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(t.as_str()).unwrap(),
            Ok(other) => {
                *log.lock()
                    .unwrap()
                    .ends
                    .entry(format!("before-welcome:{}", close_label(other)))
                    .or_default() += 1;
                node = (node + 1) % cluster.ws.len();
                backoff().await;
                continue;
            }
            Err(_) => {
                *log.lock()
                    .unwrap()
                    .ends
                    .entry("welcome-timeout".into())
                    .or_default() += 1;
                node = (node + 1) % cluster.ws.len();
                continue;
            }
        };
        assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
        {
            let mut l = log.lock().unwrap();
            l.connects += 1;
            if since != Some((0, 0)) && welcome["resumed"] == false {
                l.not_resumed += 1;
            }
        }
        if first {
            first = false;
            connected.fetch_add(1, Ordering::Relaxed);
        }
        // Messages until the socket ends or the run stops.
        let end = loop {
            let next = tokio::select! {
                m = ws.next() => m,
                _ = stop.changed() => {
                    let _ = ws.close(None).await;
                    return;
                }
            };
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] != "message" {
                        continue;
                    }
                    let Some(id) = v["id"].as_str().and_then(parse_id) else {
                        continue; // live-only ("t...")
                    };
                    let seq = v["data"]["seq"].as_u64().expect("payload has seq");
                    let mut l = log.lock().unwrap();
                    l.got.push((id, seq));
                    l.last = Some(id);
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break close_label(next),
                Some(Ok(_)) => continue,
            }
        };
        *log.lock().unwrap().ends.entry(end).or_default() += 1;
        node = (node + 1) % cluster.ws.len();
        backoff().await;
    }
}

async fn backoff() {
    let ms = 50 + rand::random::<u64>() % 200;
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// One acknowledged send.
struct Acked {
    user: String,
    seq: u64,
    id: Id,
    attempts: u32,
    replayed: bool,
}

#[derive(Default)]
struct BackendStats {
    acked: Vec<Acked>,
    /// (user, seq, last error) of sends that never got an answer.
    lost: Vec<(String, u64, String)>,
    /// Sends that failed with a status a retry cannot fix.
    rejected: Vec<(String, u64, String)>,
    retries: u64,
    /// When each successful answer arrived.
    successes: Vec<Instant>,
    /// When each failed attempt ended, with its code.
    failures: Vec<(Instant, Code)>,
}

fn retryable(c: Code) -> bool {
    matches!(
        c,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
            | Code::DataLoss
            | Code::ResourceExhausted
    )
}

/// Sends one stored message to `user`, retrying the SAME request (same
/// idempotency key) round-robin over the nodes until an answer or
/// `give_up`.
async fn send_until_answered(
    cluster: &Cluster,
    start_node: usize,
    user: &str,
    seq: u64,
    key: String,
    give_up: Instant,
    stats: &Mutex<BackendStats>,
) {
    let req = SendToUserRequest {
        user_ids: vec![user.to_string()],
        topic: "chaos".into(),
        payload_json: format!(r#"{{"seq":{seq}}}"#),
        transient: false,
        idempotency_key: key,
    };
    let mut attempts = 0u32;
    loop {
        let node = (start_node + attempts as usize) % cluster.grpc.len();
        attempts += 1;
        let mut c = cluster.grpc[node].clone();
        let mut r = tonic::Request::new(req.clone());
        r.set_timeout(ATTEMPT_TIMEOUT);
        let res = tokio::time::timeout(
            ATTEMPT_TIMEOUT + Duration::from_millis(500),
            c.send_to_user(r),
        )
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("client-side timeout")));
        let now = Instant::now();
        match res {
            Ok(resp) => {
                let d = &resp.get_ref().deliveries[0];
                let id = parse_id(&d.message_id).expect("stored message id");
                let mut s = stats.lock().unwrap();
                s.successes.push(now);
                s.acked.push(Acked {
                    user: user.to_string(),
                    seq,
                    id,
                    attempts,
                    replayed: d.replayed,
                });
                return;
            }
            Err(e) => {
                let code = e.code();
                let last_err = format!("{code:?} on n{}: {}", node + 1, e.message());
                let mut s = stats.lock().unwrap();
                s.failures.push((now, code));
                if !retryable(code) {
                    s.rejected.push((user.to_string(), seq, last_err));
                    return;
                }
                if now >= give_up {
                    s.lost.push((user.to_string(), seq, last_err));
                    return;
                }
                s.retries += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20 + rand::random::<u64>() % 80)).await;
    }
}

/// What the capped user saw.
#[derive(Default)]
struct CapStats {
    rounds: u64,
    welcomes: u64,
    closed_4029: u64,
    other_rejects: BTreeMap<String, u64>,
    /// Most sockets holding a welcome and still open at one moment.
    max_open: usize,
    /// Rounds where more than CAP sockets got a welcome.
    rounds_over: u64,
    /// The largest `connections` IsOnline reported for the capped user.
    max_is_online: u32,
    is_online_samples: u64,
}

/// One round: CAP_TRIES concurrent connects of `user` spread over the
/// nodes, held for a while, then closed.
async fn cap_round(
    cluster: &Cluster,
    user: &str,
    stats: &Mutex<CapStats>,
    open: &Arc<AtomicUsize>,
) {
    let (release_tx, release_rx) = watch::channel(false);
    let mut tasks = vec![];
    let welcomed = Arc::new(AtomicUsize::new(0));
    for i in 0..CAP_TRIES {
        let url = cluster.ws_url(i % cluster.ws.len(), user, None);
        let mut release = release_rx.clone();
        let open = open.clone();
        let welcomed = welcomed.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(Ok((mut ws, _))) =
                tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url)).await
            else {
                return Err("connect-failed".to_string());
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("\"welcome\"") => {}
                Ok(other) => return Err(close_label(other)),
                Err(_) => return Err("welcome-timeout".into()),
            }
            welcomed.fetch_add(1, Ordering::SeqCst);
            let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
            // Hold it until released, or until the server ends it.
            let res = loop {
                tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(Message::Text(_))) | Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
                        other => break Err(format!("after-welcome:{}", close_label(other))),
                    },
                    _ = release.changed() => break Ok(()),
                }
            };
            open.fetch_sub(1, Ordering::SeqCst);
            let _ = ws.close(None).await;
            res.map(|_| now_open)
        }));
    }
    // Sample the open count while the round settles and holds.
    let hold_until = Instant::now() + Duration::from_millis(1500);
    let mut max_open = 0;
    while Instant::now() < hold_until {
        max_open = max_open.max(open.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = release_tx.send(true);
    let mut results = vec![];
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let mut s = stats.lock().unwrap();
    s.rounds += 1;
    for r in results {
        match r {
            Ok(n) => {
                s.welcomes += 1;
                max_open = max_open.max(n);
            }
            Err(e) if e == "4029" => s.closed_4029 += 1,
            Err(e) => *s.other_rejects.entry(e).or_default() += 1,
        }
    }
    s.max_open = s.max_open.max(max_open);
    if welcomed.load(Ordering::SeqCst) > CAP as usize {
        s.rounds_over += 1;
    }
}

async fn is_online(c: &mut PushServiceClient<Channel>, user: &str) -> Option<u32> {
    let mut r = tonic::Request::new(IsOnlineRequest {
        user_ids: vec![user.to_string()],
    });
    r.set_timeout(Duration::from_secs(1));
    let r = tokio::time::timeout(Duration::from_millis(1500), c.is_online(r))
        .await
        .ok()?
        .ok()?;
    Some(r.into_inner().users[0].connections)
}

async fn is_online_many(
    c: &mut PushServiceClient<Channel>,
    users: &[String],
) -> Result<Vec<UserPresence>, tonic::Status> {
    let mut r = tonic::Request::new(IsOnlineRequest {
        user_ids: users.to_vec(),
    });
    r.set_timeout(Duration::from_secs(2));
    Ok(c.is_online(r).await?.into_inner().users)
}

/// Everything stored for `user`: a fresh connect with `since=0-0`.
async fn inbox(cluster: &Cluster, user: &str, node: usize) -> Result<Vec<(Id, u64)>, String> {
    let url = cluster.ws_url(node, user, Some((0, 0)));
    let (mut ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let mut next = async || -> Result<Value, String> {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    return serde_json::from_str(t.as_str()).map_err(|e| e.to_string())
                }
                Ok(Some(Ok(Message::Close(c)))) => return Err(format!("closed: {c:?}")),
                Ok(Some(Ok(_))) => continue,
                Ok(other) => return Err(format!("socket ended: {other:?}")),
                Err(_) => return Err("no frame within 5 s".into()),
            }
        }
    };
    let welcome = next().await?;
    if welcome["type"] != "welcome" {
        return Err(format!("no welcome: {welcome}"));
    }
    // `resumed` is false here: 0-0 is below every inbox's creation mark.
    // The nodes run with limits that never trim, so this is everything.
    let n = welcome["replay"].as_u64().unwrap_or(0);
    let mut out = vec![];
    while (out.len() as u64) < n {
        let m = next().await?;
        if m["type"] != "message" {
            continue;
        }
        let id = m["id"]
            .as_str()
            .and_then(parse_id)
            .ok_or(format!("bad id: {m}"))?;
        out.push((id, m["data"]["seq"].as_u64().ok_or(format!("no seq: {m}"))?));
    }
    let _ = ws.close(None).await;
    Ok(out)
}

/// Time from `at` until the first successful answer after it, and the
/// longest gap between answers in [from, to].
fn recovery(
    successes: &[Instant],
    at: Instant,
    from: Instant,
    to: Instant,
) -> (Option<Duration>, Duration) {
    let first = successes.iter().find(|t| **t >= at).map(|t| *t - at);
    let mut prev = from;
    let mut gap = Duration::ZERO;
    for t in successes.iter().filter(|t| **t >= from && **t <= to) {
        gap = gap.max(*t - prev);
        prev = *t;
    }
    (first, gap)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let clients = env_or("HERALD_CHAOS_CLIENTS", 300).max(12) as usize;
    let seconds = env_or("HERALD_CHAOS_SECONDS", 25).max(10);
    let rate = env_or("HERALD_CHAOS_RATE", 200).max(1);
    let backends = env_or("HERALD_CHAOS_BACKENDS", 4).max(1) as usize;
    let run = format!("{:08x}", rand::random::<u32>());
    let t0 = Instant::now();
    println!(
        "chaos {run}: {clients} devices, {seconds} s of sends at {rate}/s from {backends} backends"
    );

    let mut redis = RedisServer::start();
    let flags: Vec<String> = [
        "--max-connections-per-user",
        &CAP.to_string(),
        "--write-timeout",
        "1s",
        "--inbox-max-messages",
        "1000000",
        "--replay-limit",
        "1000000",
        "--worker-threads",
        "1",
        "--grpc-max-connections",
        &GRPC_SLOTS.to_string(),
        "--grpc-max-discovery-inflight",
        &WATCH_CAP.to_string(),
        "--grpc-handshake-timeout",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let flag_refs: Vec<&str> = flags.iter().map(|s| s.as_str()).collect();
    let mut nodes: Vec<NodeProcess> = (1..=3)
        .map(|i| NodeProcess::start_logging(&format!("n{i}"), &redis.url(), &flag_refs, "error"))
        .collect();
    let mut grpc = vec![];
    for n in &nodes {
        let ch = Endpoint::from_shared(format!("http://{}", n.grpc))
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy();
        grpc.push(PushServiceClient::new(ch));
    }
    let cluster = Cluster {
        ws: nodes.iter().map(|n| n.ws).collect(),
        grpc,
    };

    // Users: a quarter of the devices pair up (two devices of one user on
    // different nodes), the rest are alone.
    let pairs = clients / 4;
    let singles = clients - 2 * pairs;
    let mut devices: Vec<Device> = vec![];
    let mut users: Vec<String> = vec![];
    for k in 0..pairs + singles {
        let u = format!("chaos-{run}-u{k}");
        devices.push(Device {
            user: u.clone(),
            first_node: k % 3,
            log: Default::default(),
        });
        if k < pairs {
            devices.push(Device {
                user: u.clone(),
                first_node: (k + 1) % 3,
                log: Default::default(),
            });
        }
        users.push(u);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let connected = Arc::new(AtomicUsize::new(0));
    let mut device_tasks = vec![];
    for d in &devices {
        device_tasks.push(tokio::spawn(run_device(
            cluster.clone(),
            d.user.clone(),
            d.first_node,
            d.log.clone(),
            stop_rx.clone(),
            connected.clone(),
        )));
        if device_tasks.len() % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while connected.load(Ordering::Relaxed) < devices.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} devices connected within 30 s",
            connected.load(Ordering::Relaxed),
            devices.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let baseline_rss: Vec<Option<u64>> = nodes.iter().map(|n| n.rss_kib()).collect();
    println!(
        "chaos: {} devices connected after {} ms; baseline RSS KiB {:?}",
        devices.len(),
        ms(t0.elapsed()),
        baseline_rss
    );

    // The backends.
    let stats = Arc::new(Mutex::new(BackendStats::default()));
    let next_seq = Arc::new(AtomicU64::new(1));
    let sending = Arc::new(AtomicBool::new(true));
    let start = Instant::now();
    let end_of_sends = start + Duration::from_secs(seconds);
    let give_up = end_of_sends + GRACE;
    let users = Arc::new(users);
    let mut backend_tasks = vec![];
    let per_backend = Duration::from_secs_f64(backends as f64 / rate as f64);
    for b in 0..backends {
        let (cluster, stats, next_seq, sending, users, run) = (
            cluster.clone(),
            stats.clone(),
            next_seq.clone(),
            sending.clone(),
            users.clone(),
            run.clone(),
        );
        backend_tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(per_backend);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut inflight = tokio::task::JoinSet::new();
            let mut rr = b;
            while sending.load(Ordering::Relaxed) {
                tick.tick().await;
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                let user = users[rand::random::<u64>() as usize % users.len()].clone();
                let key = format!("chaos-{run}-{seq}");
                rr += 1;
                let (cluster, stats) = (cluster.clone(), stats.clone());
                let node = rr % 3;
                // Each send runs on its own so a stuck attempt does not hold
                // up the stream (a backend serving many requests).
                inflight.spawn(async move {
                    send_until_answered(&cluster, node, &user, seq, key, give_up, &stats).await
                });
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        }));
    }

    // Misbehaving clients, right at the start.
    // 1. The stuck reader: connects to n1, then never polls its socket again.
    let stuck_user = format!("chaos-{run}-stuck");
    let (stuck_ws, _) = nodes[0].connect(&stuck_user).await;
    let stuck_task = {
        let mut c = cluster.grpc[1].clone();
        let u = stuck_user.clone();
        tokio::spawn(async move {
            let big = format!("\"{}\"", "x".repeat(60_000));
            let started = Instant::now();
            let mut sent = 0u64;
            loop {
                if started.elapsed() > Duration::from_secs(15) {
                    return (None, sent);
                }
                if let Some(0) = is_online(&mut c, &u).await {
                    return (Some(started.elapsed()), sent);
                }
                for _ in 0..10 {
                    let _ = c
                        .send_to_user(SendToUserRequest {
                            user_ids: vec![u.clone()],
                            topic: "big".into(),
                            payload_json: big.clone(),
                            transient: true,
                            ..Default::default()
                        })
                        .await;
                    sent += 1;
                }
            }
        })
    };
    // 4. The attacker, on every node.
    let attack_tasks: Vec<_> = nodes
        .iter()
        .map(|n| tokio::spawn(attack(n.grpc, sending.clone())))
        .collect();
    // 2. The flooder: pings as fast as it can on n2.
    let flood_task = {
        let (ws, _) = nodes[1].connect(&format!("chaos-{run}-flood")).await;
        tokio::spawn(async move {
            let (mut tx, mut rx) = ws.stream.split();
            let writer = tokio::spawn(async move {
                let mut n = 0u64;
                for _ in 0..50 {
                    for _ in 0..100 {
                        if tx
                            .feed(Message::Text(r#"{"type":"ping"}"#.into()))
                            .await
                            .is_err()
                        {
                            return n;
                        }
                        n += 1;
                    }
                    if tx.flush().await.is_err() {
                        return n;
                    }
                }
                n
            });
            let code = loop {
                match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
                    Ok(Some(Ok(Message::Close(c)))) => {
                        break c
                            .map(|c| u16::from(c.code).to_string())
                            .unwrap_or("none".into())
                    }
                    Ok(Some(Ok(_))) => continue,
                    Ok(other) => break format!("no close frame: {other:?}"),
                    Err(_) => break "no close within 10 s".into(),
                }
            };
            (code, writer.await.unwrap_or(0))
        })
    };

    // 3. The capped user: rounds of 10 concurrent connects all run long,
    // and an IsOnline sampler.
    let cap_user = format!("chaos-{run}-capped");
    let cap_stats = Arc::new(Mutex::new(CapStats::default()));
    let cap_task = {
        let (cluster, cap_stats, sending, u) = (
            cluster.clone(),
            cap_stats.clone(),
            sending.clone(),
            cap_user.clone(),
        );
        tokio::spawn(async move {
            let open = Arc::new(AtomicUsize::new(0));
            let mut c = cluster.grpc[0].clone();
            while sending.load(Ordering::Relaxed) {
                cap_round(&cluster, &u, &cap_stats, &open).await;
                // Let the cluster see the closes before the next round.
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until && is_online(&mut c, &u).await != Some(0) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
    };
    let sampler = {
        let (cluster, cap_stats, sending, u) = (
            cluster.clone(),
            cap_stats.clone(),
            sending.clone(),
            cap_user.clone(),
        );
        tokio::spawn(async move {
            let mut k = 0usize;
            while sending.load(Ordering::Relaxed) {
                k += 1;
                let mut c = cluster.grpc[k % 2].clone(); // n1, n2: never killed
                if let Some(n) = is_online(&mut c, &u).await {
                    let mut s = cap_stats.lock().unwrap();
                    s.max_is_online = s.max_is_online.max(n);
                    s.is_online_samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // The faults.
    let at = |f: f64| start + Duration::from_secs_f64(seconds as f64 * f);
    let sleep_until = |t: Instant| tokio::time::sleep_until(tokio::time::Instant::from_std(t));
    let mut faults: Vec<(&str, Instant, Instant)> = vec![];
    sleep_until(at(0.15)).await;
    let f0 = Instant::now();
    nodes[2].kill9();
    println!("chaos: t={:.1}s kill -9 n3", (f0 - start).as_secs_f64());
    faults.push(("kill -9 n3", f0, f0));
    sleep_until(at(0.3)).await;
    let f1 = Instant::now();
    nodes[2].restart();
    println!(
        "chaos: t={:.1}s n3 restarted on the same ports ({} ms to ready)",
        (f1 - start).as_secs_f64(),
        ms(f1.elapsed())
    );
    faults.push(("n3 restarted", f1, Instant::now()));
    sleep_until(at(0.4)).await;
    let f2 = Instant::now();
    redis.freeze();
    println!("chaos: t={:.1}s SIGSTOP redis", (f2 - start).as_secs_f64());
    tokio::time::sleep(Duration::from_secs(5)).await;
    redis.thaw();
    let f2e = Instant::now();
    println!("chaos: t={:.1}s SIGCONT redis", (f2e - start).as_secs_f64());
    faults.push(("redis frozen 5 s", f2, f2e));
    sleep_until(at(0.7)).await;
    let f3 = Instant::now();
    redis.restart();
    let f3e = Instant::now();
    println!(
        "chaos: t={:.1}s redis killed and restarted from its AOF ({} ms)",
        (f3 - start).as_secs_f64(),
        ms(f3e - f3)
    );
    faults.push(("redis restarted", f3, f3e));
    sleep_until(end_of_sends).await;
    sending.store(false, Ordering::Relaxed);
    println!("chaos: t={:.1}s sends stop", start.elapsed().as_secs_f64());

    // Quiet period: every send answered (or given up), then every device
    // catches up to its user's inbox.
    for t in backend_tasks {
        t.await.unwrap();
    }
    let _ = cap_task.await;
    let _ = sampler.await;
    let (stuck_dropped, stuck_sent) = stuck_task.await.unwrap();
    let (flood_code, flood_sent) = flood_task.await.unwrap();
    let mut attacks = vec![];
    for t in attack_tasks {
        attacks.push(t.await.unwrap());
    }
    println!(
        "chaos: t={:.1}s every send settled",
        start.elapsed().as_secs_f64()
    );

    let mut stored: HashMap<String, Vec<(Id, u64)>> = HashMap::new();
    let mut failures: Vec<String> = vec![];
    for (k, u) in users.iter().enumerate() {
        let mut got = Err(String::new());
        for attempt in 0..3 {
            got = inbox(&cluster, u, (k + attempt) % 3).await;
            if got.is_ok() {
                break;
            }
        }
        match got {
            Ok(v) => {
                stored.insert(u.clone(), v);
            }
            Err(e) => failures.push(format!("could not read the inbox of {u}: {e}")),
        }
    }
    let catch_up_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let behind = devices
            .iter()
            .filter(|d| {
                let want = stored
                    .get(&d.user)
                    .and_then(|v| v.iter().map(|m| m.0).max());
                want.is_some() && d.log.lock().unwrap().last < want
            })
            .count();
        if behind == 0 {
            break;
        }
        if Instant::now() > catch_up_deadline {
            println!("chaos: {behind} devices still behind after 30 s of quiet");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Presence while every device is connected: IsOnline must count
    // exactly the user's devices (a stale entry left by the crash or the
    // Redis restart would count too many, and the cap would refuse a
    // legitimate device).
    let mut want_conns: HashMap<&str, u32> = HashMap::new();
    for d in &devices {
        *want_conns.entry(d.user.as_str()).or_default() += 1;
    }
    // The inbox reads above just closed their sockets: give the nodes a
    // moment to see that (a count that stays wrong for 5 s is stale).
    let mut presence_over: Vec<String>;
    let mut presence_under: Vec<String>;
    let mut c = cluster.grpc[0].clone();
    let settle = Instant::now() + Duration::from_secs(5);
    loop {
        presence_over = vec![];
        presence_under = vec![];
        for chunk in users.chunks(1000) {
            match is_online_many(&mut c, chunk).await {
                Ok(r) => {
                    for p in r {
                        let want = want_conns[p.user_id.as_str()];
                        if p.connections > want {
                            presence_over.push(format!("{} {} > {want}", p.user_id, p.connections));
                        } else if p.connections < want {
                            presence_under
                                .push(format!("{} {} < {want}", p.user_id, p.connections));
                        }
                    }
                }
                Err(e) => presence_over.push(format!("IsOnline failed: {e}")),
            }
        }
        if (presence_over.is_empty() && presence_under.is_empty()) || Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_tx.send(true);
    for t in device_tasks {
        let _ = t.await;
    }
    let end_rss: Vec<Option<u64>> = nodes.iter().map(|n| n.rss_kib()).collect();

    // Accounting.
    let s = stats.lock().unwrap();
    let sent = next_seq.load(Ordering::Relaxed) - 1;
    let mut by_seq_acked: HashMap<u64, &Acked> = HashMap::new();
    for a in &s.acked {
        by_seq_acked.insert(a.seq, a);
    }
    let mut stored_total = 0usize;
    let mut dup_stored = 0usize; // extra copies of one seq in an inbox
    let mut dup_examples = vec![];
    let mut dup_example_seqs = HashSet::new();
    let mut orphan = 0usize; // stored, never acked (its send gave up)
    let mut acked_missing = 0usize;
    let mut acked_wrong = 0usize; // acked id holds another payload
    for (u, msgs) in &stored {
        stored_total += msgs.len();
        let mut seen: HashMap<u64, Id> = HashMap::new();
        for (id, seq) in msgs {
            if let Some(first) = seen.insert(*seq, *id) {
                dup_stored += 1;
                if dup_examples.len() < 5 && dup_example_seqs.insert(*seq) {
                    let a = by_seq_acked.get(seq);
                    dup_examples.push(format!(
                        "{u} seq {seq} stored as {} and {} (acked {:?} after {} attempts)",
                        fmt_id(first),
                        fmt_id(*id),
                        a.map(|a| fmt_id(a.id)),
                        a.map(|a| a.attempts).unwrap_or(0)
                    ));
                }
            }
            if !by_seq_acked.contains_key(seq) {
                orphan += 1;
            }
        }
        let ids: HashMap<Id, u64> = msgs.iter().map(|(i, q)| (*i, *q)).collect();
        for a in s.acked.iter().filter(|a| &a.user == u) {
            match ids.get(&a.id) {
                None => acked_missing += 1,
                Some(q) if *q != a.seq => acked_wrong += 1,
                _ => {}
            }
        }
    }
    for a in &s.acked {
        if !stored.contains_key(&a.user) {
            acked_missing += 1;
        }
    }
    let lost = s.lost.len() + s.rejected.len() + acked_missing + acked_wrong;

    // Per device: exactly the inbox, in order, across reconnects.
    let mut delivered = 0usize;
    let mut expected = 0usize;
    let mut dev_dups = 0usize;
    let mut dev_missing = 0usize;
    let mut dev_out_of_order = 0usize;
    let mut dev_bad = 0usize;
    let mut dev_examples = vec![];
    let mut reconnects = 0u64;
    let mut not_resumed = 0u64;
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    for d in &devices {
        let l = d.log.lock().unwrap();
        reconnects += l.connects.saturating_sub(1);
        not_resumed += l.not_resumed;
        for (k, v) in &l.ends {
            *ends.entry(k.clone()).or_default() += v;
        }
        delivered += l.got.len();
        let want = stored.get(&d.user).cloned().unwrap_or_default();
        expected += want.len();
        let mut seen = HashSet::new();
        let mut dups = 0;
        let mut ooo = 0;
        for (i, (id, _)) in l.got.iter().enumerate() {
            if !seen.insert(*id) {
                dups += 1;
            }
            if i > 0 && *id <= l.got[i - 1].0 {
                ooo += 1;
            }
        }
        let want_ids: HashSet<Id> = want.iter().map(|m| m.0).collect();
        let missing = want_ids.difference(&seen).count();
        dev_dups += dups;
        dev_out_of_order += ooo;
        dev_missing += missing;
        if dups + ooo + missing > 0 {
            dev_bad += 1;
            if dev_examples.len() < 5 {
                let first_missing = want
                    .iter()
                    .map(|m| m.0)
                    .find(|i| !seen.contains(i))
                    .map(fmt_id);
                dev_examples.push(format!(
                    "device of {} (first node n{}): {} frames, {} stored, {dups} duplicate, {ooo} out of order, {missing} missing (first {first_missing:?}), {} connects, ends {:?}",
                    d.user,
                    d.first_node + 1,
                    l.got.len(),
                    want.len(),
                    l.connects,
                    l.ends
                ));
            }
        }
    }
    let replayed = s.acked.iter().filter(|a| a.replayed).count();
    let cap = cap_stats.lock().unwrap();

    println!("================ chaos summary ({run}) ================");
    println!(
        "devices {} ({} users, {} with two devices on different nodes); wall time {:.1} s",
        devices.len(),
        users.len(),
        pairs,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "sent {sent} | answered {} (replayed {replayed}) | retried attempts {} | given up {} | rejected {}",
        s.acked.len(),
        s.retries,
        s.lost.len(),
        s.rejected.len()
    );
    println!(
        "stored {stored_total} | duplicates stored {dup_stored} | stored but never answered {orphan} | answered but missing from inbox {acked_missing} | answered id holds another payload {acked_wrong}"
    );
    println!(
        "delivered {delivered} frames (expected {expected}: each device its user's inbox) | device duplicates {dev_dups} | device missing {dev_missing} | out of order {dev_out_of_order} | devices wrong {dev_bad}"
    );
    println!(
        "reconnects {reconnects} | resumes with resumed=false {not_resumed} | connection ends {ends:?}"
    );
    let mut successes = s.successes.clone();
    successes.sort();
    for (k, (name, from, to)) in faults.iter().enumerate() {
        // The window: from the fault until the next one starts (or the
        // sends stop).
        let window_end = faults.get(k + 1).map(|f| f.1).unwrap_or(end_of_sends);
        let (first, gap) = recovery(&successes, *to, *from, window_end);
        let fails = s
            .failures
            .iter()
            .filter(|(t, _)| *t >= *from && *t <= window_end)
            .count();
        println!(
            "fault '{name}' at t={:.1}s ({:.1} s window): first answer {} after it ended; longest gap between answers {} ms; failed attempts {fails}",
            (*from - start).as_secs_f64(),
            (window_end - *from).as_secs_f64(),
            first.map(|d| format!("{} ms", ms(d))).unwrap_or("never".into()),
            ms(gap)
        );
    }
    println!(
        "presence after the quiet period (settled up to 5 s): {} users counted with more connections than devices, {} with fewer; e.g. {:?}",
        presence_over.len(),
        presence_under.len(),
        presence_over.iter().chain(presence_under.iter()).take(3).collect::<Vec<_>>()
    );
    println!(
        "capped user (cap {CAP}, {CAP_TRIES} tries/round): {} rounds, {} welcomes, {} closed 4029, other {:?}; most open at once {} ; rounds with > {CAP} welcomes {}; IsOnline max {} over {} samples",
        cap.rounds,
        cap.welcomes,
        cap.closed_4029,
        cap.other_rejects,
        cap.max_open,
        cap.rounds_over,
        cap.max_is_online,
        cap.is_online_samples
    );
    println!(
        "stuck reader: {} after {stuck_sent} big transient sends; flooder: close {flood_code} after {flood_sent} pings",
        stuck_dropped
            .map(|d| format!("offline after {} ms", ms(d)))
            .unwrap_or("NOT dropped within 15 s".into())
    );
    for (i, a) in attacks.iter().enumerate() {
        println!(
            "attacker on n{}: {} silent sockets opened, {} closed by the node; {} Watch streams open, {} refused",
            i + 1,
            a.silent_opened,
            a.silent_closed,
            a.watches_open,
            a.watches_refused
        );
    }
    println!(
        "RSS KiB baseline {:?} end {:?} (n3 was restarted: its baseline is the killed process)",
        baseline_rss, end_rss
    );
    for e in dup_examples.iter().chain(dev_examples.iter()) {
        println!("  {e}");
    }
    for (u, q, e) in s.lost.iter().chain(s.rejected.iter()).take(5) {
        println!("  lost: {u} seq {q}: {e}");
    }
    println!("======================================================");

    // Verdict.
    if dup_stored > 0 {
        failures.push(format!(
            "{dup_stored} duplicate(s): a message (one payload seq) stored under two ids; e.g. {}",
            dup_examples.first().cloned().unwrap_or_default()
        ));
    }
    if lost > 0 {
        failures.push(format!(
            "{lost} lost: {} given up after retries, {} rejected, {acked_missing} answered but not in the inbox, {acked_wrong} answered id holds another payload",
            s.lost.len(),
            s.rejected.len()
        ));
    }
    if dev_bad > 0 {
        failures.push(format!(
            "{dev_bad} device(s) did not receive their inbox exactly once in order: {dev_dups} duplicate frames, {dev_missing} missing, {dev_out_of_order} out of order; e.g. {}",
            dev_examples.first().cloned().unwrap_or_default()
        ));
    }
    if cap.max_open > CAP as usize || cap.max_is_online > CAP {
        failures.push(format!(
            "per-user cap {CAP} exceeded: up to {} sockets held a welcome at once, IsOnline reported up to {}, {} of {} rounds welcomed more than {CAP}",
            cap.max_open, cap.max_is_online, cap.rounds_over, cap.rounds
        ));
    }
    if cap.rounds == 0 || cap.closed_4029 == 0 {
        failures.push(format!(
            "the capped user was never refused with 4029 ({} rounds)",
            cap.rounds
        ));
    }
    if !presence_over.is_empty() {
        failures.push(format!(
            "stale presence: {} users counted with more connections than they hold (e.g. {})",
            presence_over.len(),
            presence_over[0]
        ));
    }
    if stuck_dropped.is_none() {
        failures.push("the stuck reader was not dropped within 15 s".into());
    }
    for (i, a) in attacks.iter().enumerate().take(2) {
        // n1 and n2 run throughout (n3 is killed and restarted).
        if a.silent_closed == 0 || a.watches_refused == 0 || a.watches_open < WATCH_CAP as u64 {
            failures.push(format!(
                "the attacker on n{} was not held to its budgets: {a:?}",
                i + 1
            ));
        }
    }
    if flood_code != "1008" {
        failures.push(format!("the flooder got close {flood_code}, expected 1008"));
    }
    for (i, n) in nodes.iter_mut().enumerate() {
        if let Some(st) = n.exited() {
            failures.push(format!("node n{} exited: {st}", i + 1));
        }
    }
    for i in 0..2 {
        if let (Some(b), Some(e)) = (baseline_rss[i], end_rss[i]) {
            if e > b * 3 + 100 * 1024 {
                failures.push(format!("node n{} RSS grew from {b} KiB to {e} KiB", i + 1));
            }
        }
    }
    drop(stuck_ws);
    drop(s);
    drop(cap);
    nodes.clear();
    drop(redis);
    assert!(
        failures.is_empty(),
        "chaos run {run} failed:\n- {}",
        failures.join("\n- ")
    );
}
