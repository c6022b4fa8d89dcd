//! The receiving side: N WebSocket clients spread over the nodes, each
//! recording the sequence numbers and latencies of the bench messages it
//! gets.
//!
//! Three client protocols share one receive path:
//! * `herald`: `ws://node/ws?token=<JWT>`; the first frame is `welcome`.
//! * `floor`: the bench protocol, `ws://host/ws?user=<id>`; the first frame is
//!   a welcome too.
//! * `socketio`: Engine.IO 4 / Socket.IO 5 over a bare WebSocket
//!   (`/socket.io/?EIO=4&transport=websocket&user=<id>`): open packet `0`,
//!   namespace connect `40`, then the server's `welcome` event. Pings (`2`)
//!   are answered with pongs (`3`).
//!
//! Every bench message carries `"seq":N` and `"t":<intended send time, ns on
//! the bench clock>` in its payload; a receiver finds both by scanning the
//! frame text, whatever the envelope around the payload.

use crate::stats::{now_ns, Hists};
use futures_util::{SinkExt, StreamExt};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpSocket;
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A Herald cluster: gRPC API, JWT-authenticated WebSockets.
    Herald,
    /// herald-floor: the bench protocol over plain WebSocket + HTTP.
    Floor,
    /// The Socket.IO comparison server (bench/socketio): bench protocol over
    /// HTTP, Socket.IO over WebSocket.
    Socketio,
    /// Centrifugo v6: its GRPC server API (--api http://H:P of the
    /// grpc_api listener), its JSON client protocol over WebSocket
    /// (ws://H:P/connection/websocket), HS256 connection tokens whose
    /// `channels` claim subscribes each client server-side to `#<user>`
    /// and `broadcast`.
    Centrifugo,
}

/// One client connection's slot. The slot survives reconnects; each
/// reconnect takes a fresh user id (generation), so Herald never replays
/// stored messages to it.
pub struct Slot {
    pub node: usize,
    pub gen: AtomicU32,
    pub connected: AtomicBool,
    /// Deliveries the senders expect on this slot in the current step.
    pub expected: AtomicU64,
    /// Sequence numbers received in the current step.
    rx: Mutex<Vec<u64>>,
}

/// Per-broadcast tracking: how many connections got it, and when the last did.
pub struct BcastSlot {
    pub target: AtomicU32,
    pub count: AtomicU32,
    pub sent_ns: AtomicU64,
    pub done_ns: AtomicU64,
    /// The first delivery (u64::MAX until one).
    pub first_ns: AtomicU64,
    pub last_ns: AtomicU64,
}

impl BcastSlot {
    /// A broadcast nobody has received yet; `target` deliveries complete it.
    pub fn new(target: u32) -> BcastSlot {
        BcastSlot {
            target: AtomicU32::new(target),
            count: AtomicU32::new(0),
            sent_ns: AtomicU64::new(0),
            done_ns: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
        }
    }
}

pub struct Bcast {
    pub base: u64,
    pub slots: Vec<BcastSlot>,
    pub done: Notify,
}

/// What one step's tally found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Tally {
    /// Deliveries the senders expected (calls that returned OK x recipients).
    pub expected: u64,
    /// Distinct (connection, seq) deliveries.
    pub delivered: u64,
    /// Deliveries of a seq a connection already had.
    pub duplicates: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Deliveries beyond what was expected (e.g. an RPC that errored but delivered).
    pub unexpected: u64,
}

impl Tally {
    /// What went wrong with these deliveries and with `call_errors`
    /// failed calls, in words for a report ("3 lost", ...); empty when
    /// nothing did.
    pub fn problems(&self, call_errors: u64) -> Vec<String> {
        let mut p = Vec::new();
        if self.lost > 0 {
            p.push(format!("{} lost", self.lost));
        }
        if self.duplicates > 0 {
            p.push(format!("{} duplicated", self.duplicates));
        }
        if call_errors > 0 {
            p.push(format!("{call_errors} call errors"));
        }
        p
    }
}

pub struct Fleet {
    pub target: Target,
    pub run_id: String,
    secret: Option<String>,
    /// ws URL of each node (without query).
    pub ws_urls: Vec<String>,
    ws_addrs: Vec<SocketAddr>,
    src_ips: Vec<Ipv4Addr>,
    pub slots: Vec<Slot>,
    /// Slot indices per node.
    pub by_node: Vec<Vec<usize>>,
    pub hists: Hists,
    pub step_base: AtomicU64,
    pub received: AtomicU64,
    pub stale: AtomicU64,
    pub last_rx_ns: AtomicU64,
    pub connected: AtomicUsize,
    /// Initial connection attempts finished (success or failure).
    pub first_attempts: AtomicUsize,
    pub connect_ok: AtomicU64,
    pub connect_failures: AtomicU64,
    pub disconnects: AtomicU64,
    errors: Mutex<Vec<String>>,
    pub error_count: AtomicU64,
    pub bcast: OnceLock<Bcast>,
    stopping: AtomicBool,
    stop: Notify,
    pub reconnect: bool,
}

pub struct FleetConfig {
    pub target: Target,
    pub secret: Option<String>,
    pub ws_urls: Vec<String>,
    pub connections: usize,
    pub src_ips: usize,
    pub reconnect: bool,
    /// The prefix of every user id (a random one if None): another process
    /// that knows it can name this fleet's users (`<run_id>-<slot>-<gen>`).
    pub run_id: Option<String>,
}

impl Fleet {
    pub fn new(c: FleetConfig) -> Result<Arc<Fleet>, String> {
        if c.ws_urls.is_empty() {
            return Err("no --ws node URL".into());
        }
        let mut ws_addrs = Vec::new();
        for u in &c.ws_urls {
            let rest = u
                .strip_prefix("ws://")
                .ok_or_else(|| format!("{u:?}: expected ws://host:port/path"))?;
            let hp = rest.split('/').next().unwrap_or("");
            let addr = hp
                .to_socket_addrs()
                .map_err(|e| format!("{u:?}: {e}"))?
                .find(|a| a.is_ipv4())
                .ok_or_else(|| format!("{u:?}: no IPv4 address"))?;
            if !addr.ip().is_loopback() {
                eprintln!("herald-bench: note: {u} is not a loopback address");
            }
            ws_addrs.push(addr);
        }
        let n_nodes = c.ws_urls.len();
        // Ephemeral ports run out near 28k per source address: use several
        // loopback source addresses beyond 20k connections per node.
        let per_node = c.connections.div_ceil(n_nodes);
        let n_src = if c.src_ips > 0 {
            c.src_ips
        } else if per_node > 20_000 {
            per_node.div_ceil(20_000)
        } else {
            0
        };
        if n_src > 0 && !ws_addrs.iter().all(|a| a.ip().is_loopback()) {
            return Err("several source addresses are only used with loopback nodes".into());
        }
        let src_ips = (0..n_src.min(250))
            .map(|k| Ipv4Addr::new(127, 0, 0, 1 + k as u8))
            .collect();
        let slots: Vec<Slot> = (0..c.connections)
            .map(|i| Slot {
                node: i % n_nodes,
                gen: AtomicU32::new(0),
                connected: AtomicBool::new(false),
                expected: AtomicU64::new(0),
                rx: Mutex::new(Vec::new()),
            })
            .collect();
        let mut by_node = vec![Vec::new(); n_nodes];
        for (i, s) in slots.iter().enumerate() {
            by_node[s.node].push(i);
        }
        let run_id = c
            .run_id
            .unwrap_or_else(|| format!("b{:08x}", rand::random::<u32>()));
        Ok(Arc::new(Fleet {
            target: c.target,
            run_id,
            secret: c.secret,
            ws_urls: c.ws_urls,
            ws_addrs,
            src_ips,
            slots,
            by_node,
            hists: Hists::new(64),
            step_base: AtomicU64::new(0),
            received: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            last_rx_ns: AtomicU64::new(0),
            connected: AtomicUsize::new(0),
            first_attempts: AtomicUsize::new(0),
            connect_ok: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            error_count: AtomicU64::new(0),
            bcast: OnceLock::new(),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            reconnect: c.reconnect,
        }))
    }

    /// The user id slot `i` has now.
    pub fn user(&self, i: usize) -> String {
        format!("{}-{}-{}", self.run_id, i, self.slots[i].gen.load(Relaxed))
    }

    pub fn note_error(&self, e: String) {
        self.error_count.fetch_add(1, Relaxed);
        let mut v = self.errors.lock().unwrap();
        if v.len() < 20 {
            v.push(e);
        }
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    fn url(&self, i: usize, user: &str) -> String {
        let base = &self.ws_urls[self.slots[i].node];
        let sep = if base.contains('?') { '&' } else { '?' };
        match self.target {
            Target::Herald => {
                let token = herald::auth::mint(
                    self.secret.as_deref().unwrap_or(""),
                    user,
                    Duration::from_secs(24 * 3600),
                );
                format!("{base}{sep}token={token}")
            }
            Target::Floor => format!("{base}{sep}user={user}"),
            Target::Socketio => format!("{base}{sep}EIO=4&transport=websocket&user={user}"),
            Target::Centrifugo => base.clone(),
        }
    }

    /// Starts every client; each holds a `concurrency` permit until its first
    /// attempt has finished.
    pub fn start(self: &Arc<Self>, concurrency: usize) {
        let sem = Arc::new(Semaphore::new(concurrency.max(1)));
        let fleet = self.clone();
        tokio::spawn(async move {
            for i in 0..fleet.slots.len() {
                let permit = sem.clone().acquire_owned().await.expect("never closed");
                if fleet.stopping.load(Relaxed) {
                    return;
                }
                tokio::spawn(client(fleet.clone(), i, permit));
            }
        });
    }

    /// Stops every client (their sockets are dropped).
    pub fn stop(&self) {
        self.stopping.store(true, Relaxed);
        self.stop.notify_waiters();
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Relaxed)
    }

    /// Starts a new step: seqs below `base` no longer count.
    pub fn reset_step(&self, base: u64) {
        self.step_base.store(base, Relaxed);
        for s in &self.slots {
            s.expected.store(0, Relaxed);
            s.rx.lock().unwrap().clear();
        }
        self.received.store(0, Relaxed);
        self.stale.store(0, Relaxed);
        self.last_rx_ns.store(0, Relaxed);
        self.hists.reset();
    }

    /// Counts deliveries, duplicates and losses of the current step.
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for s in &self.slots {
            let mut rx = s.rx.lock().unwrap();
            let total = rx.len() as u64;
            rx.sort_unstable();
            rx.dedup();
            let uniq = rx.len() as u64;
            let expected = s.expected.load(Relaxed);
            t.expected += expected;
            t.delivered += uniq;
            t.duplicates += total - uniq;
            t.lost += expected.saturating_sub(uniq);
            t.unexpected += uniq.saturating_sub(expected);
        }
        t
    }

    /// How many clients of each node are connected now.
    pub fn connected_by_node(&self) -> Vec<usize> {
        self.by_node
            .iter()
            .map(|list| list.iter().filter(|&&i| self.is_connected(i)).count())
            .collect()
    }

    /// Connected slots of `node` (indices), for picking targets.
    pub fn is_connected(&self, i: usize) -> bool {
        self.slots[i].connected.load(Relaxed)
    }

    fn on_frame(&self, i: usize, text: &str) {
        let Some(seq) = scan_u64(text, "\"seq\":") else {
            return;
        };
        let t = scan_u64(text, "\"t\":").unwrap_or(0);
        let now = now_ns();
        if seq < self.step_base.load(Relaxed) {
            self.stale.fetch_add(1, Relaxed);
            return;
        }
        self.received.fetch_add(1, Relaxed);
        self.last_rx_ns.fetch_max(now, Relaxed);
        self.hists.record(i, now.saturating_sub(t));
        self.slots[i].rx.lock().unwrap().push(seq);
        if let Some(b) = self.bcast.get() {
            if let Some(k) = seq.checked_sub(b.base) {
                if let Some(bs) = b.slots.get(k as usize) {
                    bs.first_ns.fetch_min(now, Relaxed);
                    bs.last_ns.fetch_max(now, Relaxed);
                    let c = bs.count.fetch_add(1, Relaxed) + 1;
                    if c == bs.target.load(Relaxed) {
                        bs.done_ns.store(now, Relaxed);
                        b.done.notify_waiters();
                    }
                }
            }
        }
    }

    async fn connect(&self, i: usize) -> Result<Ws, String> {
        let user = self.user(i);
        let url = self.url(i, &user);
        let node = self.slots[i].node;
        let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        if !self.src_ips.is_empty() {
            let ip = self.src_ips[(i / self.ws_urls.len()) % self.src_ips.len()];
            bind_address_no_port(&sock);
            sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        let stream = sock
            .connect(self.ws_addrs[node])
            .await
            .map_err(|e| format!("connect {}: {e}", self.ws_addrs[node]))?;
        let _ = stream.set_nodelay(true);
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(1 << 20));
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        if self.target == Target::Centrifugo {
            let token = crate::centrifugo::token(self.secret.as_deref().unwrap_or(""), &user);
            ws.send(Message::text(format!(
                "{{\"id\":1,\"connect\":{{\"token\":\"{token}\",\"name\":\"herald-bench\"}}}}"
            )))
            .await
            .map_err(|e| format!("connect command: {e}"))?;
        }
        // Wait for the server's welcome: until then a message could be lost.
        loop {
            let msg = ws
                .next()
                .await
                .ok_or("closed before welcome")?
                .map_err(|e| format!("before welcome: {e}"))?;
            match msg {
                Message::Text(t) => {
                    let s = t.as_str();
                    match self.target {
                        Target::Herald | Target::Floor => break,
                        // The connect reply lists the server-side
                        // subscriptions: publications flow from here on.
                        Target::Centrifugo => {
                            if s.contains("\"connect\":") {
                                break;
                            }
                            if s.contains("\"error\":") {
                                return Err(format!("centrifugo connect error: {s}"));
                            }
                        }
                        Target::Socketio => {
                            if s.starts_with('0') {
                                ws.send(Message::text("40"))
                                    .await
                                    .map_err(|e| e.to_string())?;
                            } else if s == "2" {
                                ws.send(Message::text("3"))
                                    .await
                                    .map_err(|e| e.to_string())?;
                            } else if s.starts_with("42") {
                                break;
                            } else if s.starts_with("44") {
                                return Err(format!("socket.io connect error: {s}"));
                            }
                        }
                    }
                }
                Message::Ping(_) => ws.flush().await.map_err(|e| e.to_string())?,
                Message::Close(c) => return Err(format!("closed before welcome: {c:?}")),
                _ => {}
            }
        }
        Ok(ws)
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Leaves the choice of the source port to `connect`, which needs it
/// unique for the whole (source, destination) pair, instead of `bind`,
/// which reserves it on that address for every destination
/// (IP_BIND_ADDRESS_NO_PORT). Without it the ports of one source address
/// run out at ~28k connections in all, not per node.
#[cfg(target_os = "linux")]
fn bind_address_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and an option value of the size given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_: &TcpSocket) {}

/// One client's life: connect (holding the connect permit), receive until
/// the socket ends, reconnect with a fresh user id if asked to.
async fn client(fleet: Arc<Fleet>, i: usize, permit: tokio::sync::OwnedSemaphorePermit) {
    let mut permit = Some(permit);
    let slot = &fleet.slots[i];
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(20), fleet.connect(i)).await;
        let first = permit.take().is_some();
        if first {
            fleet.first_attempts.fetch_add(1, Relaxed);
        }
        match attempt {
            Ok(Ok(mut ws)) => {
                fleet.connect_ok.fetch_add(1, Relaxed);
                slot.connected.store(true, Relaxed);
                fleet.connected.fetch_add(1, Relaxed);
                backoff = Duration::from_millis(200);
                let why = receive(&fleet, i, &mut ws).await;
                slot.connected.store(false, Relaxed);
                fleet.connected.fetch_sub(1, Relaxed);
                if fleet.stopping() {
                    return;
                }
                fleet.disconnects.fetch_add(1, Relaxed);
                fleet.note_error(format!("connection {i} ended: {why}"));
            }
            Ok(Err(e)) => {
                if fleet.stopping() {
                    return;
                }
                fleet.connect_failures.fetch_add(1, Relaxed);
                fleet.note_error(format!("connection {i}: {e}"));
            }
            Err(_) => {
                fleet.connect_failures.fetch_add(1, Relaxed);
                fleet.note_error(format!("connection {i}: no welcome within 20s"));
            }
        }
        if !fleet.reconnect || fleet.stopping() {
            return;
        }
        slot.gen.fetch_add(1, Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = fleet.stop.notified() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn receive(fleet: &Fleet, i: usize, ws: &mut Ws) -> String {
    let stop = fleet.stop.notified();
    tokio::pin!(stop);
    if fleet.stopping() {
        return "stopped".into();
    }
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = &mut stop => return "stopped".into(),
        };
        match msg {
            None => return "closed by the server (EOF)".into(),
            Some(Err(e)) => return format!("error: {e}"),
            Some(Ok(Message::Text(t))) => {
                let s = t.as_str();
                if fleet.target == Target::Socketio && s == "2" {
                    if ws.send(Message::text("3")).await.is_err() {
                        return "could not answer a ping".into();
                    }
                    continue;
                }
                if fleet.target == Target::Centrifugo {
                    // Replies and pushes, several per frame separated by
                    // newlines; an empty object is the server's ping.
                    for line in s.split('\n') {
                        if line == "{}" {
                            if ws.send(Message::text("{}")).await.is_err() {
                                return "could not answer a ping".into();
                            }
                        } else {
                            fleet.on_frame(i, line);
                        }
                    }
                    continue;
                }
                fleet.on_frame(i, s);
            }
            Some(Ok(Message::Ping(_))) => {
                if ws.flush().await.is_err() {
                    return "could not answer a ping".into();
                }
            }
            Some(Ok(Message::Close(c))) => return format!("closed by the server: {c:?}"),
            Some(Ok(_)) => {}
        }
    }
}

/// The unsigned integer right after the first `key` in `s`.
pub fn scan_u64(s: &str, key: &str) -> Option<u64> {
    let at = s.find(key)? + key.len();
    let digits = s.as_bytes()[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    s[at..at + digits].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::scan_u64;

    #[test]
    fn scans_seq_and_t_in_any_envelope() {
        let herald = r#"{"type":"message","id":"t1-2","topic":"","data":{"seq":42,"t":123456,"p":"xx"},"ts":99,"transient":true}"#;
        assert_eq!(scan_u64(herald, "\"seq\":"), Some(42));
        assert_eq!(scan_u64(herald, "\"t\":"), Some(123456));
        let sio = r#"42["m",{"seq":7,"t":8,"p":""}]"#;
        assert_eq!(scan_u64(sio, "\"seq\":"), Some(7));
        assert_eq!(scan_u64(sio, "\"t\":"), Some(8));
        assert_eq!(scan_u64(r#"{"type":"welcome"}"#, "\"seq\":"), None);
    }
}
