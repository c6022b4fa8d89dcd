//! Test harness: real nodes on ephemeral loopback ports, real tonic and
//! WebSocket clients. Every node a test starts is stopped by the test (or
//! aborted on drop).
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use herald::config::{Config, ServeArgs};
use herald::proto::push_service_client::PushServiceClient;
use herald::proto::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::transport::Channel;

/// Runs each test on both backends (each file that uses it imports
/// `common::*`, which brings `Backend`).
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Memory).await } )*
        }
        mod redis {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Redis).await } )*
        }
    };
}

pub const SECRET: &str = "test-secret-0123456789";
pub const WAIT: Duration = Duration::from_secs(5);

pub fn args() -> ServeArgs {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    ServeArgs {
        ws_listen: any,
        grpc_listen: any,
        admin_listen: any,
        jwt_secret: Some(SECRET.into()),
        ..Default::default()
    }
}

pub struct TestNode {
    pub ws: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub node_id: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// A private Redis for a single-node test on the Redis backend.
    redis: Option<RedisServer>,
}

/// Which backend a single-node test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
}

impl TestNode {
    pub async fn start(b: Backend) -> TestNode {
        Self::start_on(b, args()).await
    }

    /// A node on backend `b` with `args`; on Redis, with a private
    /// redis-server that lives as long as the node.
    pub async fn start_on(b: Backend, mut args: ServeArgs) -> TestNode {
        let redis = match b {
            Backend::Memory => None,
            Backend::Redis => {
                let r = RedisServer::start();
                args.redis_url = Some(r.url());
                Some(r)
            }
        };
        let mut node = Self::start_with(args).await;
        node.redis = redis;
        node
    }

    /// Two in-process nodes sharing `redis`.
    pub async fn pair_on(redis: &RedisServer) -> (TestNode, TestNode) {
        let on = || {
            let mut a = args();
            a.redis_url = Some(redis.url());
            a
        };
        (Self::start_with(on()).await, Self::start_with(on()).await)
    }

    pub async fn start_with(args: ServeArgs) -> TestNode {
        Self::try_start_with(args).await.expect("node starts")
    }

    pub async fn try_start_with(args: ServeArgs) -> Result<TestNode, String> {
        let cfg = Config::resolve(args)?;
        let node_id = cfg.node_id.clone();
        let listeners = herald::server::Listeners::bind(&cfg)
            .await
            .map_err(|e| e.to_string())?;
        let (ws, grpc, admin) = listeners.addrs();
        let (tx, rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            let shutdown = async {
                let _ = rx.await;
            };
            // Report startup errors (a Redis that is not there) to the caller.
            let res = herald::server::run(cfg, listeners, async {
                if let Some(t) = ready_tx.take() {
                    let _ = t.send(Ok(()));
                }
                shutdown.await
            })
            .await;
            if let (Err(e), Some(t)) = (res, ready_tx.take()) {
                let _ = t.send(Err(e.to_string()));
            }
        });
        ready_rx
            .await
            .map_err(|_| "node task ended".to_string())??;
        Ok(TestNode {
            ws,
            grpc,
            admin,
            node_id,
            stop: Some(tx),
            task: Some(task),
            redis: None,
        })
    }

    pub async fn client(&self) -> PushServiceClient<Channel> {
        PushServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("gRPC connects")
    }

    /// The port of the node's private redis-server (Redis backend only).
    pub fn redis_port(&self) -> Option<u16> {
        self.redis.as_ref().map(|r| r.port)
    }

    pub fn ws_url(&self, token: &str, since: Option<&str>) -> String {
        match since {
            Some(s) => format!("ws://{}/ws?token={token}&since={s}", self.ws),
            None => format!("ws://{}/ws?token={token}", self.ws),
        }
    }

    /// Connects as `user` and returns the socket and its welcome frame.
    pub async fn connect(&self, user: &str) -> (Ws, Value) {
        self.connect_since(user, None).await
    }

    pub async fn connect_since(&self, user: &str, since: Option<&str>) -> (Ws, Value) {
        let mut ws = self.connect_raw(user, since).await;
        let welcome = ws.next_json().await;
        assert_eq!(
            welcome["type"], "welcome",
            "first frame is welcome: {welcome}"
        );
        (ws, welcome)
    }

    pub async fn connect_raw(&self, user: &str, since: Option<&str>) -> Ws {
        let url = self.ws_url(&token(user), since);
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket connects");
        Ws { stream }
    }

    /// Stops the node (graceful shutdown) and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
    }

    /// Stops the node abruptly: no close frames, no clean leave (like a
    /// crash, as far as the cluster can tell).
    pub fn kill(mut self) {
        self.stop.take();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    pub async fn get(&self, path: &str) -> String {
        http_get(self.admin, path).await
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub fn token(user: &str) -> String {
    herald::auth::mint(SECRET, user, Duration::from_secs(3600))
}

pub fn uid(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// A bare HTTP/1.1 GET; returns status line, headers and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .expect("response in time")
        .unwrap();
    out
}

/// The value of the sample `name` (with its labels, if any) on the node's
/// `/metrics` (0 if absent).
pub async fn metric(node: &TestNode, name: &str) -> f64 {
    let text = node.get("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    /// The next JSON text frame (control frames skipped); panics after 5 s.
    pub async fn next_json(&mut self) -> Value {
        self.next_json_within(WAIT).await
    }

    /// The next JSON text frame (control frames skipped); panics after `d`.
    pub async fn next_json_within(&mut self, d: Duration) -> Value {
        loop {
            let msg = tokio::time::timeout(d, self.stream.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("no socket error");
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).expect("frames are JSON")
                }
                Message::Close(c) => panic!("unexpected close: {c:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame of `type` `kind`, skipping others.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let v = self.next_json().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Asserts no text frame arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Text(t)))) => panic!("expected silence, got {t}"),
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes; returns the close code (text frames
    /// before it are returned too).
    pub async fn expect_close(&mut self) -> (u16, String, Vec<Value>) {
        let mut frames = vec![];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.stream.next())
                .await
                .expect("close within 10 s")
            {
                Some(Ok(Message::Close(Some(c)))) => {
                    return (u16::from(c.code), c.reason.to_string(), frames)
                }
                Some(Ok(Message::Close(None))) => {
                    return (u16::from(CloseCode::Status), String::new(), frames)
                }
                Some(Ok(Message::Text(t))) => {
                    frames.push(serde_json::from_str(t.as_str()).unwrap())
                }
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Ok when the first frame is a text frame (welcome), the close code
    /// when the server closes first.
    pub async fn first_frame(&mut self) -> Result<(), u16> {
        match tokio::time::timeout(WAIT, self.stream.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => Ok(()),
            Ok(Some(Ok(Message::Close(Some(f))))) => Err(u16::from(f.code)),
            other => panic!("expected a first frame, got {other:?}"),
        }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.stream
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, t: &str) {
        self.stream
            .send(Message::Text(t.to_string().into()))
            .await
            .unwrap();
    }
}

pub async fn send(
    c: &mut PushServiceClient<Channel>,
    users: &[&str],
    payload: &str,
) -> SendToUserResponse {
    c.send_to_user(SendToUserRequest {
        user_ids: users.iter().map(|u| u.to_string()).collect(),
        topic: "t".into(),
        payload_json: payload.into(),
        transient: false,
        ..Default::default()
    })
    .await
    .expect("SendToUser succeeds")
    .into_inner()
}

/// Sends the payloads `0`, `1`, ... `n - 1` to `user`, one call each;
/// returns their message ids in order.
pub async fn send_numbered(
    c: &mut PushServiceClient<Channel>,
    user: &str,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            send(c, &[user], &i.to_string()).await.deliveries[0]
                .message_id
                .clone(),
        );
    }
    ids
}

pub async fn online(c: &mut PushServiceClient<Channel>, user: &str) -> u32 {
    c.is_online(IsOnlineRequest {
        user_ids: vec![user.into()],
    })
    .await
    .unwrap()
    .into_inner()
    .users[0]
        .connections
}

pub async fn unread(c: &mut PushServiceClient<Channel>, user: &str) -> u64 {
    c.unread_count(UnreadCountRequest {
        user_id: user.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .count
}

/// Polls `f` until it returns true or `WAIT` passes.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A real `redis-server` on a free loopback port, with an append-only file
/// (fsync always) in a private directory so a restart keeps the data.
/// Killed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir =
            std::env::temp_dir().join(format!("herald-test-redis-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = RedisServer {
            port: free_port(),
            dir,
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
            ])
            .args([
                "--appendfsync",
                "always",
                "--loglevel",
                "warning",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (Debian: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .map(|n| buf[..n].starts_with(b"+PONG"))
                        .unwrap_or(false)
                {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The redis-server process id (None while stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGSTOP: the process freezes with its sockets open (clients see
    /// timeouts, not refused connections) until [`RedisServer::thaw`].
    pub fn freeze(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "-STOP");
        }
    }

    /// SIGCONT after [`RedisServer::freeze`].
    pub fn thaw(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "-CONT");
        }
    }

    /// Kills the server (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes (`STOP`) or thaws (`CONT`) the server process, as a stalled
    /// machine would.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node as a real `herald serve` process (so it can be killed with
/// SIGKILL like a crashed machine). Killed on drop.
pub struct NodeProcess {
    pub ws: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub node_id: String,
    child: Option<std::process::Child>,
    redis_url: String,
    extra: Vec<String>,
    log: String,
}

/// Sends `sig` (such as "-STOP") to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status();
}

impl NodeProcess {
    /// Starts a node on `redis_url` with a short lease; `extra` flags are
    /// appended.
    pub fn start(node_id: &str, redis_url: &str, extra: &[&str]) -> NodeProcess {
        Self::start_logging(node_id, redis_url, extra, "warn")
    }

    /// As [`NodeProcess::start`], with `RUST_LOG` set to `log`.
    pub fn start_logging(node_id: &str, redis_url: &str, extra: &[&str], log: &str) -> NodeProcess {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Self::spawn(
            node_id,
            redis_url,
            &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            log,
            [any, any, any],
        )
    }

    /// After [`NodeProcess::kill9`]: the same node id, flags and ports
    /// again (a crashed machine coming back).
    pub fn restart(&mut self) {
        self.kill9();
        let again = Self::spawn(
            &self.node_id,
            &self.redis_url,
            &self.extra,
            &self.log,
            [self.ws, self.grpc, self.admin],
        );
        *self = again;
    }

    fn spawn(
        node_id: &str,
        redis_url: &str,
        extra: &[String],
        log: &str,
        [ws, grpc, admin]: [SocketAddr; 3],
    ) -> NodeProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["serve", "--ws-listen", &ws.to_string()])
            .args(["--grpc-listen", &grpc.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args([
                "--jwt-secret",
                SECRET,
                "--node-id",
                node_id,
                "--redis-url",
                redis_url,
                "--node-lease",
                "1s",
            ])
            .args(extra)
            .env("RUST_LOG", log)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("herald binary runs");
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("herald ready:") => break l,
                Some(Ok(_)) => continue,
                _ => {
                    let _ = child.kill();
                    panic!("node {node_id} exited before it was ready");
                }
            }
        };
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let field = |k: &str| ready_addr(&ready, k);
        NodeProcess {
            ws: field("ws="),
            grpc: field("grpc="),
            admin: field("admin="),
            node_id: node_id.to_string(),
            child: Some(child),
            redis_url: redis_url.to_string(),
            extra: extra.to_vec(),
            log: log.to_string(),
        }
    }

    /// The process id (None once killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` if the process has exited on its own (None while it
    /// runs, and after [`NodeProcess::kill9`]).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Resident memory (VmRSS) in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    pub async fn client(&self) -> PushServiceClient<Channel> {
        PushServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("gRPC connects")
    }

    pub async fn connect(&self, user: &str) -> (Ws, Value) {
        self.connect_since(user, None).await
    }

    pub async fn connect_since(&self, user: &str, since: Option<&str>) -> (Ws, Value) {
        let url = match since {
            Some(s) => format!("ws://{}/ws?token={}&since={s}", self.ws, token(user)),
            None => format!("ws://{}/ws?token={}", self.ws, token(user)),
        };
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket connects");
        let mut ws = Ws { stream };
        let welcome = ws.next_json().await;
        assert_eq!(
            welcome["type"], "welcome",
            "first frame is welcome: {welcome}"
        );
        (ws, welcome)
    }

    /// SIGKILL: no close frames, no leaving the cluster.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the graceful path.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A WebSocket as `user`, before its first frame.
    pub async fn connect_raw_ws(&self, user: &str) -> Ws {
        let url = format!("ws://{}/ws?token={}", self.ws, token(user));
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket connects");
        Ws { stream }
    }

    pub async fn stats(&self) -> StatsResponse {
        self.client()
            .await
            .stats(StatsRequest {})
            .await
            .unwrap()
            .into_inner()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A free loopback port for a Redis Cluster node: at most 55535 (its
/// cluster bus listens 10000 higher), with the bus port free too.
pub fn free_cluster_port() -> u16 {
    loop {
        let p: u16 = rand::random_range(20000..55535);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(p) && free(p + 10000) {
            return p;
        }
    }
}

/// A local Redis Cluster: six `redis-server` processes on free loopback
/// ports (three primaries, one replica each, made by `redis-cli --cluster
/// create`), data in a private temp dir, a short `cluster-node-timeout` so
/// a failover takes about a second. Every process is killed by PID on
/// drop.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
    children: Vec<Option<std::process::Child>>,
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    pub failed: bool,
    /// The primary's id, for a replica.
    pub primary_id: Option<String>,
    /// Slot ranges served (primaries).
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "herald-test-cluster-{:016x}",
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ports: Vec<u16> = (0..6).map(|_| free_cluster_port()).collect();
        let mut c = RedisCluster {
            ports: ports.clone(),
            dir,
            children: Vec::new(),
        };
        for &p in &ports {
            let child = c.spawn(p);
            c.children.push(Some(child));
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH (Debian: apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        c.wait_healthy();
        c
    }

    fn spawn(&self, port: u16) -> std::process::Child {
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (Debian: apt-get install redis-server)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Self::cli_at(port, &["PING"]).trim() != "PONG" {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Runs redis-cli against one node; returns its stdout.
    pub fn cli_at(port: u16, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A port of a running node.
    fn any_port(&self) -> u16 {
        self.ports
            .iter()
            .zip(&self.children)
            .find(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .unwrap()
    }

    /// `CLUSTER NODES` as a live node sees it.
    pub fn nodes(&self) -> Vec<ClusterNode> {
        Self::cli_at(self.any_port(), &["CLUSTER", "NODES"])
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 8 {
                    return None;
                }
                let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
                let flags = f[2];
                let slots = f[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|x| (x, x)),
                    })
                    .collect();
                Some(ClusterNode {
                    id: f[0].to_string(),
                    port,
                    primary: flags.contains("master"),
                    failed: flags.contains("fail"),
                    primary_id: (f[3] != "-").then(|| f[3].to_string()),
                    slots,
                })
            })
            .collect()
    }

    /// The hash slot of `key`.
    pub fn slot(&self, key: &str) -> u16 {
        Self::cli_at(self.any_port(), &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap()
    }

    /// The primary serving `slot`.
    pub fn owner(&self, slot: u16) -> ClusterNode {
        self.nodes()
            .into_iter()
            .find(|n| {
                n.primary && !n.failed && n.slots.iter().any(|(a, b)| *a <= slot && slot <= *b)
            })
            .expect("a primary serves the slot")
    }

    /// Waits until every live node reports `cluster_state:ok` and every
    /// replica's link to its primary is up.
    pub fn wait_healthy(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ok = self.ports.iter().zip(&self.children).all(|(p, c)| {
                c.is_none() || {
                    let info = Self::cli_at(*p, &["CLUSTER", "INFO"]);
                    let repl = Self::cli_at(*p, &["INFO", "replication"]);
                    info.contains("cluster_state:ok")
                        && (repl.contains("role:master") || repl.contains("master_link_status:up"))
                }
            });
            if ok {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cluster did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Moves `slot` to the primary on `to` with its keys, as `redis-cli
    /// --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE in batches,
    /// then SETSLOT NODE on both ends (the old owner then unsubscribes the
    /// slot's sharded channels).
    pub fn migrate_slot(&self, slot: u16, to: &ClusterNode) {
        let from = self.owner(slot);
        assert_ne!(from.id, to.id);
        let s = slot.to_string();
        let ok = |r: String| assert!(r.trim() == "OK", "{r}");
        ok(Self::cli_at(
            to.port,
            &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from.id],
        ));
        ok(Self::cli_at(
            from.port,
            &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to.id],
        ));
        loop {
            let keys = Self::cli_at(from.port, &["CLUSTER", "GETKEYSINSLOT", &s, "10"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter());
            ok(Self::cli_at(from.port, &args));
        }
        ok(Self::cli_at(
            to.port,
            &["CLUSTER", "SETSLOT", &s, "NODE", &to.id],
        ));
        ok(Self::cli_at(
            from.port,
            &["CLUSTER", "SETSLOT", &s, "NODE", &to.id],
        ));
    }

    /// Kills the primary serving `slot` (SIGKILL) and has its replica take
    /// over (`CLUSTER FAILOVER FORCE`: no handshake with the dead primary);
    /// returns once the replica serves the slot and the cluster is healthy.
    pub fn kill_primary_of(&mut self, slot: u16) {
        self.kill_primary(slot, true)
    }

    /// Kills the primary serving `slot` (SIGKILL) and lets the cluster
    /// fail over by itself (the replica's election after
    /// `cluster-node-timeout`, as in production); returns once the replica
    /// serves the slot and every live node reports `cluster_state:ok`.
    pub fn kill_primary_and_wait_promotion(&mut self, slot: u16) {
        self.kill_primary(slot, false)
    }

    fn kill_primary(&mut self, slot: u16, force: bool) {
        let primary = self.owner(slot);
        let replica = self
            .nodes()
            .into_iter()
            .find(|n| n.primary_id.as_deref() == Some(primary.id.as_str()))
            .expect("the primary has a replica");
        let i = self.ports.iter().position(|p| *p == primary.port).unwrap();
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if force {
                let _ = Self::cli_at(replica.port, &["CLUSTER", "FAILOVER", "FORCE"]);
            }
            std::thread::sleep(Duration::from_millis(if force { 200 } else { 100 }));
            let owner = self
                .nodes()
                .into_iter()
                .find(|n| n.primary && n.slots.iter().any(|(a, b)| *a <= slot && slot <= *b));
            if owner.is_some_and(|o| o.id == replica.id) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the replica was not promoted"
            );
        }
        self.wait_ok_only();
    }

    /// Starts again every node killed by [`RedisCluster::kill_primary_of`]
    /// (same port and data directory: it rejoins from its `nodes.conf` as a
    /// replica of the primary that replaced it) and waits until the
    /// cluster is healthy, each primary with a replica again.
    pub fn restart_killed(&mut self) {
        for i in 0..self.ports.len() {
            if self.children[i].is_none() {
                let child = self.spawn(self.ports[i]);
                self.children[i] = Some(child);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let nodes = self.nodes();
            let paired = nodes.iter().filter(|n| n.primary && !n.failed).all(|p| {
                nodes
                    .iter()
                    .any(|r| !r.failed && r.primary_id.as_deref() == Some(p.id.as_str()))
            });
            if paired && nodes.iter().all(|n| !n.failed) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the restarted node did not rejoin as a replica"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.wait_healthy();
    }

    /// Waits until every live node reports `cluster_state:ok`.
    fn wait_ok_only(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.ports.iter().zip(&self.children).all(|(p, c)| {
            c.is_none() || Self::cli_at(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
        }) {
            assert!(std::time::Instant::now() < deadline, "cluster not ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The address after `key` (`ws=`, `grpc=`, `admin=`) in a node's
/// `herald ready:` line, without its scheme and `/ws`.
pub fn ready_addr(ready: &str, key: &str) -> SocketAddr {
    let v = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in the ready line: {ready}"));
    v.split("://")
        .last()
        .unwrap()
        .trim_end_matches("/ws")
        .parse()
        .unwrap()
}

/// The directory of PostgreSQL's server programs: `initdb` on PATH, or
/// Debian's `/usr/lib/postgresql/<version>/bin` (the newest).
pub fn postgres_bin_dir() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
    }) {
        return p;
    }
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL installed (Debian: apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().expect("initdb under /usr/lib/postgresql/*/bin")
}

/// A real PostgreSQL server on a free loopback port, in a temporary data
/// directory, with trust authentication for the user `herald`. Tests run
/// as root and PostgreSQL refuses root, so it runs as the `postgres`
/// system user (Debian's package creates it) through `setpriv`, which
/// execs (unlike `runuser`, which forks): the child's PID is the
/// postmaster's, so stopping it by PID stops the server. Stopped (and its
/// directory removed) on drop.
pub struct PostgresServer {
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PostgresServer {
    pub fn start() -> PostgresServer {
        let bin = postgres_bin_dir();
        let dir =
            std::env::temp_dir().join(format!("herald-test-pg-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown runs")
            .success();
        assert!(
            ok,
            "chown postgres {} (the postgres user exists?)",
            dir.display()
        );
        let out = Self::as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "herald", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = PostgresServer {
            port: free_port(),
            dir,
            bin,
            child: None,
        };
        pg.spawn();
        pg
    }

    fn as_postgres(program: &std::path::Path) -> std::process::Command {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    }

    fn spawn(&mut self) {
        let child = Self::as_postgres(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-p",
                &self.port.to_string(),
            ])
            .args(["-c", "fsync=off", "-c", "max_connections=50"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("server.log")).unwrap())
            .spawn()
            .expect("setpriv runs postgres");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            // Debian ships pg_isready on PATH, not beside postgres.
            let isready = Some(self.bin.join("pg_isready"))
                .filter(|p| p.is_file())
                .unwrap_or_else(|| "pg_isready".into());
            let ready = std::process::Command::new(isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "postgres did not start on port {}: {}",
                self.port,
                std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://herald@127.0.0.1:{}/postgres", self.port)
    }

    /// A client of the server (its connection driven by a task).
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL accepts a connection");
        tokio::spawn(conn);
        client
    }

    /// Stops the server: SIGINT (fast shutdown: clients cut off, data
    /// kept), or SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "-INT");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it and starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
