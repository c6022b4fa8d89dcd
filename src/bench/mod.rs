//! `herald bench`: a load generator for Herald clusters, and for the two
//! comparison servers of `bench/` (Socket.IO and herald-floor) through a tiny
//! common bench protocol.
//!
//! It opens N WebSocket clients spread over the nodes, drives the API at a
//! fixed offered rate (open loop: each message carries its *intended* send
//! time, so a stalled server or a queue in front of it shows up as latency
//! instead of hiding as a slower send) or as fast as it can (closed loop),
//! and reports deliveries/s, end-to-end latency percentiles (HdrHistogram),
//! loss and duplicates per (connection, sequence number), the connect rate,
//! and the CPU and memory of the server processes named with `--pid`.
//!
//! Scenarios:
//! * `unicast`: sends to random connected users (`--users-per-call` per
//!   call, `--remote-share` of them on another node than the one called).
//! * `broadcast`: one message to every connection; the time until the last
//!   one has it, then sustained fan-out with `--in-flight` broadcasts pending.
//! * `idle`: connections only; resident memory per connection.
//! * `control`: IsOnline / UnreadCount queries per second (Herald only).
//!
//! Every loop is bounded by count and time (`--duration`, `--time-limit`).

mod api;
mod fleet;
mod http;
mod stats;

use api::{payload, Api};
use clap::Args;
use fleet::{Bcast, BcastSlot, Fleet, FleetConfig, Tally, Target};
use serde::Serialize;
use serde_json::{json, Value};
use stats::{fmt_ms, now_ns, CpuMark, CpuUse, Latency, Rng, Watched};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Messages to random connected users at a fixed rate, a ramp, or max rate.
    Unicast,
    /// Messages to every connection: time to reach all, then sustained fan-out.
    Broadcast,
    /// Connections only: connect rate, resident memory per connection.
    Idle,
    /// IsOnline / UnreadCount queries per second (Herald only).
    Control,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlOp {
    IsOnline,
    Unread,
    Mixed,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 500ms, 30s)"))
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// What kind of server the URLs point at.
    #[arg(long, value_enum, default_value = "herald")]
    pub target: Target,
    /// WebSocket URL of each node (repeat or comma-separate). Clients are
    /// spread over them round-robin. [herald: ws://127.0.0.1:8080/ws;
    /// floor: ws://H:P/ws; socketio: ws://H:P/socket.io/]
    #[arg(
        long = "ws",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    pub ws: Vec<String>,
    /// API URL of each node, paired by position with --ws: gRPC for herald
    /// (http://127.0.0.1:50051), the bench protocol's HTTP base for floor and
    /// socketio. Calls go round-robin over them.
    #[arg(long = "api", value_delimiter = ',')]
    pub api: Vec<String>,
    /// HS256 secret of the cluster, to mint client tokens (herald).
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// API key for the gRPC API, if the nodes require one.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// WebSocket clients to open (one user each).
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub connections: usize,
    /// Handshakes in progress at once while connecting.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Loopback source addresses (127.0.0.1, .2, ...) to spread clients over;
    /// 0 picks enough for the count (one per 20k connections per node).
    #[arg(long, default_value_t = 0)]
    pub src_ips: usize,
    /// Offered rate in deliveries/s (a call to k users counts k); several
    /// values run as fixed-rate steps in order. Unicast and control.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// After the --rate steps, step the rate up (x2 from --ramp-start) until
    /// p99 exceeds --slo-p99 or anything is lost, then bisect --ramp-refine
    /// times; reports the highest rate that held.
    #[arg(long)]
    pub ramp: bool,
    #[arg(long, default_value_t = 2000.0)]
    pub ramp_start: f64,
    #[arg(long, default_value_t = 4_000_000.0)]
    pub ramp_max: f64,
    #[arg(long, default_value_t = 2)]
    pub ramp_refine: u32,
    /// A ramp step that fails on latency alone (nothing lost) is run again
    /// this many times before it counts as failed: one stall of a shared
    /// machine should not end the search.
    #[arg(long, default_value_t = 1)]
    pub ramp_retries: u32,
    /// The latency objective a step must meet to count as sustained.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    pub slo_p99: Duration,
    /// Closed loop instead: --concurrency callers send as fast as answers come.
    #[arg(long)]
    pub max_rate: bool,
    /// Callers of the closed loop (--max-rate, and control without --rate).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Length of each sending step.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub duration: Duration,
    /// Recipients per SendToUser call (distinct users).
    #[arg(long, default_value_t = 1)]
    pub users_per_call: usize,
    /// Live-only sends (SendToUser transient=true); the comparison servers
    /// are always live-only.
    #[arg(long)]
    pub transient: bool,
    /// Share of recipients connected to another node than the API node
    /// called (0..1). Default: recipients uniformly at random.
    #[arg(long)]
    pub remote_share: Option<f64>,
    /// Payload size in bytes ({"seq":N,"t":T,"p":"xx..."}).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Calls in flight at most; beyond, the sender queues (and the queueing
    /// counts as latency: the intended send time is kept).
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// gRPC connections per API node.
    #[arg(long, default_value_t = 4)]
    pub grpc_channels: usize,
    /// HTTP keep-alive connections per API node (bench protocol).
    #[arg(long, default_value_t = 64)]
    pub http_conns: usize,
    /// Broadcast: broadcasts sent one at a time (each waits for the last
    /// delivery) to time one broadcast reaching everyone.
    #[arg(long, default_value_t = 10)]
    pub single: usize,
    /// Broadcast: broadcasts sent for the sustained fan-out phase.
    #[arg(long, default_value_t = 50)]
    pub broadcasts: usize,
    /// Broadcast: broadcasts pending (not yet everywhere) at most during the
    /// sustained phase.
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// Idle: how long to hold the connections after they are all up.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub hold: Duration,
    /// Control: which query.
    #[arg(long, value_enum, default_value = "mixed")]
    pub op: ControlOp,
    /// A server process to watch, as LABEL=PID or PID (repeat): CPU time
    /// (utime+stime) per step, resident memory for idle.
    #[arg(long = "pid")]
    pub pid: Vec<String>,
    /// A node's admin /metrics URL: process_resident_memory_bytes is read
    /// from it for idle when no --pid is given.
    #[arg(long = "metrics")]
    pub metrics: Vec<String>,
    /// How long to wait for outstanding deliveries after a step.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// How long to wait for all clients to connect.
    #[arg(long, default_value = "120s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// Hard limit on the whole run; the bench exits (code 4) past it.
    #[arg(long, default_value = "15m", value_parser = duration)]
    pub time_limit: Duration,
    /// Reconnect dropped clients (with a fresh user id) between and during steps.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub reconnect: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Write the JSON summary to this file as well.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// A name for this run, copied into the summary.
    #[arg(long)]
    pub label: Option<String>,
    /// Exit 3 on any error, failed connect, disconnect, lost or duplicated
    /// message in a fixed-rate step or broadcast (never on timings). For CI.
    #[arg(long)]
    pub check: bool,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// Live counters of the running phase, for the progress line.
struct Progress {
    phase: Mutex<String>,
    calls: AtomicU64,
    started: Instant,
}

struct Ctx {
    args: BenchArgs,
    fleet: Arc<Fleet>,
    api: Option<Arc<Api>>,
    watched: Vec<Watched>,
    seq: AtomicU64,
    progress: Arc<Progress>,
}

/// One sending step's outcome.
#[derive(Clone, Debug, Default, Serialize)]
struct Step {
    phase: String,
    /// Offered deliveries/s (None: closed loop).
    offered_per_s: Option<f64>,
    duration_s: f64,
    calls: u64,
    call_errors: u64,
    /// Calls the sender could not make in time (it fell too far behind).
    unsent: u64,
    #[serde(flatten)]
    tally: Tally,
    /// Deliveries of an earlier step that arrived late.
    stale: u64,
    disconnects: u64,
    delivered_per_s: f64,
    latency: Latency,
    cpu: CpuUse,
    /// Server CPU (the --pid processes) per delivered message, microseconds.
    cpu_us_per_delivery: Option<f64>,
    ok: bool,
    why_not: Vec<String>,
}

pub async fn run(args: BenchArgs) -> ExitCode {
    match run_inner(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("herald bench: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_inner(mut args: BenchArgs) -> Result<ExitCode, String> {
    let limit = args.time_limit;
    tokio::spawn(async move {
        tokio::time::sleep(limit).await;
        eprintln!("herald bench: --time-limit of {limit:?} reached; stopping");
        std::process::exit(4);
    });
    now_ns();
    let fd_limit = stats::raise_fd_limit();
    if args.connections as u64 + 256 > fd_limit {
        eprintln!(
            "herald bench: warning: {} connections need more open files than this process may have ({fd_limit}); raise the hard limit (ulimit -Hn) to go further",
            args.connections
        );
    }
    let watched: Vec<Watched> = args
        .pid
        .iter()
        .map(|p| Watched::parse(p))
        .collect::<Result<_, _>>()?;
    if args.api.is_empty() && args.target == Target::Herald {
        args.api = vec!["http://127.0.0.1:50051".into()];
    }
    if args.target == Target::Herald && args.jwt_secret.is_none() {
        return Err("--jwt-secret (or HERALD_JWT_SECRET) is needed to mint client tokens".into());
    }
    if args.scenario == Scenario::Control && args.target != Target::Herald {
        return Err("the control scenario queries Herald's gRPC API; use --target herald".into());
    }
    if args.users_per_call == 0 {
        return Err("--users-per-call must be at least 1".into());
    }
    let needs_api = args.scenario != Scenario::Idle;
    if needs_api && args.api.is_empty() {
        return Err("--api is needed: the HTTP base URL of each node (http://H:P)".into());
    }
    let api = if needs_api {
        Some(Arc::new(match args.target {
            Target::Herald => {
                Api::grpc(&args.api, args.grpc_channels, args.api_key.clone()).await?
            }
            _ => Api::http(&args.api, args.http_conns)?,
        }))
    } else {
        None
    };
    let fleet = Fleet::new(FleetConfig {
        target: args.target,
        secret: args.jwt_secret.clone(),
        ws_urls: args.ws.clone(),
        connections: args.connections,
        src_ips: args.src_ips,
        reconnect: args.reconnect && args.scenario != Scenario::Idle,
    })?;
    let progress = Arc::new(Progress {
        phase: Mutex::new("connect".into()),
        calls: AtomicU64::new(0),
        started: Instant::now(),
    });
    let ctx = Arc::new(Ctx {
        args,
        fleet: fleet.clone(),
        api,
        watched,
        seq: AtomicU64::new(1),
        progress,
    });
    let printer = if ctx.args.quiet {
        None
    } else {
        Some(tokio::spawn(progress_loop(ctx.clone())))
    };

    let rss_before = rss_all(&ctx).await;
    let connect = connect_all(&ctx).await;
    let mut report = json!({
        "label": ctx.args.label,
        "scenario": ctx.args.scenario,
        "target": ctx.args.target,
        "nodes": ctx.args.ws.len(),
        "connections": ctx.args.connections,
        "users_per_call": ctx.args.users_per_call,
        "transient": ctx.args.transient,
        "payload_bytes": ctx.args.payload_bytes,
        "connect": connect,
    });
    let mut problems: Vec<String> = Vec::new();
    let connected = fleet.connected.load(Relaxed);
    if connected == 0 {
        problems.push("no client could connect".into());
    } else {
        match ctx.args.scenario {
            Scenario::Unicast => unicast(&ctx, &mut report, &mut problems).await,
            Scenario::Broadcast => broadcast(&ctx, &mut report, &mut problems).await,
            Scenario::Idle => idle(&ctx, rss_before, &mut report).await,
            Scenario::Control => control(&ctx, &mut report, &mut problems).await,
        }
    }
    fleet.stop();
    if let Some(p) = printer {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    let cf = fleet.connect_failures.load(Relaxed);
    let dis = fleet.disconnects.load(Relaxed);
    if cf > 0 {
        problems.push(format!("{cf} connection attempts failed"));
    }
    if dis > 0 {
        problems.push(format!("{dis} connections dropped"));
    }
    report["client_errors"] = json!(fleet.errors());
    report["problems"] = json!(problems);
    report["ok"] = json!(problems.is_empty());
    if let Some(path) = &ctx.args.out {
        let text = serde_json::to_string_pretty(&report).expect("serializable");
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if ctx.args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
    } else {
        print_human(&report);
    }
    if ctx.args.check && !problems.is_empty() {
        eprintln!("herald bench: check failed: {}", problems.join("; "));
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

async fn progress_loop(ctx: Arc<Ctx>) {
    let tty = std::io::stderr().is_terminal();
    let f = &ctx.fleet;
    let mut last = (Instant::now(), 0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let calls = ctx.progress.calls.load(Relaxed);
        let rx = f.received.load(Relaxed);
        let dt = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let rx_rate = rx.saturating_sub(last.2) as f64 / dt;
        let call_rate = calls.saturating_sub(last.1) as f64 / dt;
        last = (now, calls, rx);
        let p99 = Latency::of(&f.hists.merged()).p99_ms;
        let line = format!(
            "[{:6.1}s] {:<14} conns {}/{} calls {} ({:.0}/s) delivered {} ({:.0}/s) p99 {} errors {}",
            ctx.progress.started.elapsed().as_secs_f64(),
            ctx.progress.phase.lock().unwrap(),
            f.connected.load(Relaxed),
            f.slots.len(),
            calls,
            call_rate,
            rx,
            rx_rate,
            fmt_ms(p99),
            f.error_count.load(Relaxed),
        );
        if tty {
            eprint!("\r{line:<130}");
        } else {
            eprintln!("{line}");
        }
    }
}

fn set_phase(ctx: &Ctx, p: impl Into<String>) {
    *ctx.progress.phase.lock().unwrap() = p.into();
}

/// Opens every client; returns the connect figures.
async fn connect_all(ctx: &Arc<Ctx>) -> Value {
    let f = &ctx.fleet;
    let n = f.slots.len();
    let t0 = Instant::now();
    f.start(ctx.args.connect_concurrency);
    let deadline = t0 + ctx.args.connect_timeout;
    while f.first_attempts.load(Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let ok = f.connected.load(Relaxed);
    // Let the servers finish their own bookkeeping (presence, subscriptions).
    tokio::time::sleep(Duration::from_millis(500)).await;
    json!({
        "requested": n,
        "connected": ok,
        "failed": f.connect_failures.load(Relaxed),
        "secs": secs,
        "per_s": ok as f64 / secs.max(1e-6),
        "timed_out": f.first_attempts.load(Relaxed) < n,
    })
}

/// Picks `k` distinct connected recipients for a call made through API node
/// `api_node`.
fn pick(ctx: &Ctx, rng: &mut Rng, api_node: usize, k: usize, out: &mut Vec<usize>) {
    let f = &ctx.fleet;
    let nodes = f.by_node.len();
    for _ in 0..k {
        for _ in 0..64 {
            let node = if nodes == 1 {
                0
            } else {
                match ctx.args.remote_share {
                    None => rng.below(nodes),
                    Some(p) => {
                        let local = api_node % nodes;
                        if rng.chance(p) {
                            (local + 1 + rng.below(nodes - 1)) % nodes
                        } else {
                            local
                        }
                    }
                }
            };
            let list = &f.by_node[node];
            let i = list[rng.below(list.len())];
            if f.is_connected(i) && !out.contains(&i) {
                out.push(i);
                break;
            }
        }
    }
}

struct StepCounters {
    calls: AtomicU64,
    errors: AtomicU64,
    expected: AtomicU64,
}

/// Sends one call and books its outcome.
fn spawn_call(
    ctx: &Arc<Ctx>,
    c: &Arc<StepCounters>,
    node: usize,
    targets: &[usize],
    seq: u64,
    t: u64,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let targets: Vec<usize> = targets.to_vec();
    let (ctx, c) = (ctx.clone(), c.clone());
    tokio::spawn(async move {
        call(&ctx, &c, node, &targets, seq, t).await;
        drop(permit);
    });
}

/// One API call to `targets` through `node`, booked: an answered call
/// expects one delivery per target, a failed one counts as an error.
async fn call(ctx: &Ctx, c: &StepCounters, node: usize, targets: &[usize], seq: u64, t: u64) {
    let users: Vec<String> = targets.iter().map(|&i| ctx.fleet.user(i)).collect();
    let body = payload(seq, t, ctx.args.payload_bytes);
    let api = ctx.api.as_ref().expect("api");
    let r = api.send(node, users, body, ctx.args.transient).await;
    c.calls.fetch_add(1, Relaxed);
    ctx.progress.calls.fetch_add(1, Relaxed);
    match r {
        Ok(()) => {
            for &i in targets {
                ctx.fleet.slots[i].expected.fetch_add(1, Relaxed);
            }
            c.expected.fetch_add(targets.len() as u64, Relaxed);
        }
        Err(e) => {
            c.errors.fetch_add(1, Relaxed);
            ctx.fleet.note_error(e);
        }
    }
}

/// Waits until every delivery the senders expect has arrived, or until
/// `drain_timeout` passes without any progress.
async fn drain(ctx: &Ctx, expected: u64) {
    let f = &ctx.fleet;
    let mut last = f.received.load(Relaxed);
    let mut quiet_since = Instant::now();
    while f.received.load(Relaxed) < expected {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = f.received.load(Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= ctx.args.drain_timeout {
            break;
        }
    }
    // Late duplicates would arrive about now.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Waits for reconnecting clients before a new step (bounded).
async fn settle(ctx: &Ctx) {
    let f = &ctx.fleet;
    let target = f.connect_ok.load(Relaxed).min(f.slots.len() as u64) as usize;
    let t0 = Instant::now();
    while f.connected.load(Relaxed) < target && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One unicast step: open loop at `rate` deliveries/s, or closed loop.
async fn unicast_step(ctx: &Arc<Ctx>, rate: Option<f64>, phase: &str) -> Step {
    let a = &ctx.args;
    let f = &ctx.fleet;
    let upc = a.users_per_call;
    let dur = a.duration;
    let n_api = ctx.api.as_ref().expect("api").nodes();
    set_phase(
        ctx,
        match rate {
            Some(r) => format!("{phase} {r:.0}/s"),
            None => format!("{phase} max"),
        },
    );
    let counters = Arc::new(StepCounters {
        calls: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        expected: AtomicU64::new(0),
    });
    let sem = Arc::new(Semaphore::new(a.max_in_flight.max(1)));
    let disc0 = f.disconnects.load(Relaxed);
    let mut unsent = 0u64;
    let start_ns;
    let cpu0;
    let base;
    match rate {
        Some(rate) => {
            let calls_per_s = rate / upc as f64;
            let n_calls = (calls_per_s * dur.as_secs_f64()).round().max(1.0) as u64;
            base = ctx.seq.fetch_add(n_calls, Relaxed);
            f.reset_step(base);
            cpu0 = CpuMark::take(&ctx.watched);
            let interval = 1e9 / calls_per_s;
            start_ns = now_ns() + 2_000_000;
            // Give up on calls that are more than 5 s late.
            let deadline = start_ns + dur.as_nanos() as u64 + 5_000_000_000;
            let mut rng = Rng::new();
            let mut targets = Vec::with_capacity(upc);
            for k in 0..n_calls {
                let intended = start_ns + (k as f64 * interval) as u64;
                let now = now_ns();
                if intended > now + 200_000 {
                    tokio::time::sleep(Duration::from_nanos(intended - now)).await;
                }
                let permit = match sem.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        let wait = Duration::from_nanos(deadline.saturating_sub(now_ns()));
                        match tokio::time::timeout(wait, sem.clone().acquire_owned()).await {
                            Ok(p) => p.expect("never closed"),
                            Err(_) => {
                                unsent += n_calls - k;
                                break;
                            }
                        }
                    }
                };
                if now_ns() > deadline {
                    unsent += n_calls - k;
                    break;
                }
                targets.clear();
                let node = (k as usize) % n_api;
                pick(ctx, &mut rng, node, upc, &mut targets);
                if targets.is_empty() {
                    unsent += 1;
                    continue;
                }
                spawn_call(ctx, &counters, node, &targets, base + k, intended, permit);
            }
        }
        None => {
            base = ctx.seq.load(Relaxed);
            f.reset_step(base);
            cpu0 = CpuMark::take(&ctx.watched);
            start_ns = now_ns();
            let stop_at = start_ns + dur.as_nanos() as u64;
            let mut workers = Vec::new();
            for w in 0..a.concurrency.max(1) {
                let (ctx, c) = (ctx.clone(), counters.clone());
                workers.push(tokio::spawn(async move {
                    let mut rng = Rng::new();
                    let mut targets = Vec::with_capacity(upc);
                    let mut k = w;
                    while now_ns() < stop_at {
                        targets.clear();
                        let node = k % n_api;
                        k += 1;
                        pick(&ctx, &mut rng, node, upc, &mut targets);
                        if targets.is_empty() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                        let seq = ctx.seq.fetch_add(1, Relaxed);
                        call(&ctx, &c, node, &targets, seq, now_ns()).await;
                    }
                }));
            }
            for w in workers {
                let _ = w.await;
            }
        }
    }
    // Every call answered (bounded), then every delivery in (bounded).
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        sem.acquire_many(a.max_in_flight.max(1) as u32),
    )
    .await;
    drain(ctx, counters.expected.load(Relaxed)).await;
    let cpu = cpu0.since(&ctx.watched);
    finish_step(ctx, phase, rate, start_ns, &counters, unsent, disc0, cpu)
}

#[allow(clippy::too_many_arguments)]
fn finish_step(
    ctx: &Ctx,
    phase: &str,
    rate: Option<f64>,
    start_ns: u64,
    c: &StepCounters,
    unsent: u64,
    disc0: u64,
    cpu: CpuUse,
) -> Step {
    let f = &ctx.fleet;
    let tally = f.tally();
    let latency = Latency::of(&f.hists.merged());
    let last = f.last_rx_ns.load(Relaxed);
    let active_s = if last > start_ns {
        (last - start_ns) as f64 / 1e9
    } else {
        0.0
    };
    let mut s = Step {
        phase: phase.into(),
        offered_per_s: rate,
        duration_s: ctx.args.duration.as_secs_f64(),
        calls: c.calls.load(Relaxed),
        call_errors: c.errors.load(Relaxed),
        unsent,
        stale: f.stale.load(Relaxed),
        disconnects: f.disconnects.load(Relaxed) - disc0,
        delivered_per_s: if active_s > 0.0 {
            tally.delivered as f64 / active_s
        } else {
            0.0
        },
        cpu_us_per_delivery: if ctx.watched.is_empty() || tally.delivered == 0 {
            None
        } else {
            Some(cpu.total_us as f64 / tally.delivered as f64)
        },
        latency,
        cpu,
        tally,
        ok: true,
        why_not: vec![],
    };
    let mut why = Vec::new();
    if s.tally.lost > 0 {
        why.push(format!("{} lost", s.tally.lost));
    }
    if s.tally.duplicates > 0 {
        why.push(format!("{} duplicated", s.tally.duplicates));
    }
    if s.call_errors > 0 {
        why.push(format!("{} call errors", s.call_errors));
    }
    if s.unsent > 0 {
        why.push(format!("{} calls not sent in time", s.unsent));
    }
    if s.disconnects > 0 {
        why.push(format!("{} disconnects", s.disconnects));
    }
    if s.tally.delivered == 0 {
        why.push("nothing delivered".into());
    }
    if s.latency.p99_ms > ctx.args.slo_p99.as_secs_f64() * 1000.0 {
        why.push(format!(
            "p99 {} > {}",
            fmt_ms(s.latency.p99_ms),
            fmt_ms(ctx.args.slo_p99.as_secs_f64() * 1000.0)
        ));
    }
    s.ok = why.is_empty();
    s.why_not = why;
    if !ctx.args.quiet {
        eprintln!("{}", step_line(&s));
    }
    s
}

fn step_line(s: &Step) -> String {
    format!(
        "  {:<6} {:>10} -> {:>9.0} deliveries/s  {}  lost {} dup {} err {}{}{}",
        s.phase,
        s.offered_per_s
            .map_or("max".to_string(), |r| format!("{r:.0}/s")),
        s.delivered_per_s,
        s.latency.line(),
        s.tally.lost,
        s.tally.duplicates,
        s.call_errors,
        s.cpu_us_per_delivery
            .map_or(String::new(), |c| format!("  {c:.1} server-CPU-µs/msg")),
        if s.ok {
            String::new()
        } else {
            format!("  [{}]", s.why_not.join(", "))
        },
    )
}

fn step_problems(steps: &[Step], problems: &mut Vec<String>) {
    for s in steps.iter().filter(|s| s.phase == "fixed") {
        let mut p = Vec::new();
        if s.tally.lost > 0 {
            p.push(format!("{} lost", s.tally.lost));
        }
        if s.tally.duplicates > 0 {
            p.push(format!("{} duplicated", s.tally.duplicates));
        }
        if s.call_errors > 0 {
            p.push(format!("{} call errors", s.call_errors));
        }
        if s.unsent > 0 {
            p.push(format!("{} calls unsent", s.unsent));
        }
        if s.tally.delivered == 0 {
            p.push("nothing delivered".into());
        }
        if !p.is_empty() {
            problems.push(format!(
                "step at {}: {}",
                s.offered_per_s
                    .map_or("max".into(), |r| format!("{r:.0}/s")),
                p.join(", ")
            ));
        }
    }
}

/// One ramp step, run again (up to --ramp-retries) when it failed on
/// latency alone; every run is kept in `steps`.
async fn ramp_step(ctx: &Arc<Ctx>, rate: f64, steps: &mut Vec<Step>) -> Step {
    let mut tries = 0;
    loop {
        settle(ctx).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = unicast_step(ctx, Some(rate), "ramp").await;
        steps.push(s.clone());
        let latency_only = !s.ok && s.why_not.iter().all(|w| w.starts_with("p99 "));
        if s.ok || !latency_only || tries >= ctx.args.ramp_retries {
            return s;
        }
        tries += 1;
    }
}

async fn unicast(ctx: &Arc<Ctx>, report: &mut Value, problems: &mut Vec<String>) {
    let a = &ctx.args;
    let mut steps: Vec<Step> = Vec::new();
    let rates: Vec<f64> = if a.rate.is_empty() && !a.ramp && !a.max_rate {
        vec![1000.0]
    } else {
        a.rate.clone()
    };
    for r in rates {
        settle(ctx).await;
        steps.push(unicast_step(ctx, Some(r), "fixed").await);
    }
    if a.max_rate {
        settle(ctx).await;
        steps.push(unicast_step(ctx, None, "max").await);
    }
    let mut best: Option<Step> = None;
    if a.ramp {
        let mut r = a.ramp_start.max(1.0);
        let mut fail: Option<f64> = None;
        loop {
            let s = ramp_step(ctx, r, &mut steps).await;
            if s.ok {
                best = Some(s);
                if r >= a.ramp_max {
                    break;
                }
                r = (r * 2.0).min(a.ramp_max);
            } else {
                fail = Some(r);
                break;
            }
        }
        // Bisect between the last rate that held and the first that did not
        // (or downwards if even the first failed).
        if let Some(mut hi) = fail {
            let mut lo = best.as_ref().and_then(|b| b.offered_per_s).unwrap_or(0.0);
            for _ in 0..a.ramp_refine {
                let mid = if lo > 0.0 { (lo + hi) / 2.0 } else { hi / 2.0 };
                if mid < 100.0 {
                    break;
                }
                let s = ramp_step(ctx, mid, &mut steps).await;
                if s.ok {
                    lo = mid;
                    best = Some(s);
                } else {
                    hi = mid;
                }
            }
        }
    }
    step_problems(&steps, problems);
    report["steps"] = json!(steps);
    report["slo_p99_ms"] = json!(a.slo_p99.as_secs_f64() * 1000.0);
    if !a.ramp {
        return;
    }
    report["max_sustained"] = match &best {
        Some(b) => json!({
            "offered_per_s": b.offered_per_s,
            "delivered_per_s": b.delivered_per_s,
            "p50_ms": b.latency.p50_ms,
            "p99_ms": b.latency.p99_ms,
            "cpu_us_per_delivery": b.cpu_us_per_delivery,
        }),
        None => Value::Null,
    };
}

/// Median of a list (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn broadcast(ctx: &Arc<Ctx>, report: &mut Value, problems: &mut Vec<String>) {
    let a = &ctx.args;
    let f = &ctx.fleet;
    let api = ctx.api.clone().expect("api");
    let n_api = api.nodes();
    let total = a.single + a.broadcasts;
    let base = ctx.seq.fetch_add(total as u64, Relaxed);
    let slots: Vec<BcastSlot> = (0..total)
        .map(|_| BcastSlot {
            target: AtomicU32::new(u32::MAX),
            count: AtomicU32::new(0),
            sent_ns: AtomicU64::new(0),
            done_ns: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
        })
        .collect();
    let _ = f.bcast.set(Bcast {
        base,
        slots,
        done: tokio::sync::Notify::new(),
    });
    let b = f.bcast.get().expect("set");
    let give_up = Duration::from_secs(10);

    // Books one broadcast as expected by every connected client, then sends it.
    let send = |j: usize| {
        let api = api.clone();
        async move {
            let bs = &b.slots[j];
            let mut target = 0u32;
            for s in &f.slots {
                if s.connected.load(Relaxed) {
                    s.expected.fetch_add(1, Relaxed);
                    target += 1;
                }
            }
            bs.target.store(target, Relaxed);
            let t = now_ns();
            bs.sent_ns.store(t, Relaxed);
            ctx.progress.calls.fetch_add(1, Relaxed);
            let r = api
                .broadcast(j % n_api, payload(base + j as u64, t, a.payload_bytes))
                .await;
            if let Err(e) = &r {
                // Not delivered: take the booking back.
                for s in &f.slots {
                    if s.connected.load(Relaxed) {
                        s.expected.fetch_sub(1, Relaxed);
                    }
                }
                f.note_error(e.clone());
            }
            r.is_ok()
        }
    };
    let complete = |j: usize| {
        let bs = &b.slots[j];
        bs.count.load(Relaxed) >= bs.target.load(Relaxed)
    };
    let time_to_all_ms = |j: usize| {
        let bs = &b.slots[j];
        let end = if complete(j) {
            bs.done_ns.load(Relaxed)
        } else {
            bs.last_ns.load(Relaxed)
        };
        end.saturating_sub(bs.sent_ns.load(Relaxed)) as f64 / 1e6
    };

    // Phase 1: one at a time.
    set_phase(ctx, "single");
    f.reset_step(base);
    let disc0 = f.disconnects.load(Relaxed);
    let mut errors = 0u64;
    let mut single_times = Vec::new();
    let mut incomplete_single = 0;
    let cpu0 = CpuMark::take(&ctx.watched);
    for j in 0..a.single {
        settle(ctx).await;
        let ok = send(j).await;
        if !ok {
            errors += 1;
            continue;
        }
        let t0 = Instant::now();
        while !complete(j) && t0.elapsed() < give_up {
            let n = b.done.notified();
            if complete(j) {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(5), n).await;
        }
        if !complete(j) {
            incomplete_single += 1;
        }
        single_times.push(time_to_all_ms(j));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = cpu0;
    let single_tally = f.tally();
    let single_lat = Latency::of(&f.hists.merged());
    let single_disc = f.disconnects.load(Relaxed) - disc0;
    let mut st = single_times.clone();
    let single = json!({
        "broadcasts": a.single,
        "errors": errors,
        "incomplete": incomplete_single,
        "time_to_all_ms": single_times,
        "time_to_all_median_ms": median(&mut st),
        "time_to_all_max_ms": st.last().copied().unwrap_or(0.0),
        "tally": single_tally,
        "latency": single_lat,
        "disconnects": single_disc,
    });
    if !ctx.args.quiet {
        eprintln!(
            "  single: {} broadcasts to {} connections: time to all median {} max {}; lost {} dup {}",
            a.single,
            f.connected.load(Relaxed),
            fmt_ms(single["time_to_all_median_ms"].as_f64().unwrap_or(0.0)),
            fmt_ms(single["time_to_all_max_ms"].as_f64().unwrap_or(0.0)),
            single_tally.lost,
            single_tally.duplicates
        );
    }

    // Phase 2: sustained, at most `in_flight` pending.
    set_phase(ctx, "sustained");
    settle(ctx).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    f.reset_step(base + a.single as u64);
    let disc1 = f.disconnects.load(Relaxed);
    let cpu0 = CpuMark::take(&ctx.watched);
    let start = now_ns();
    let mut oldest = a.single;
    let mut errors2 = 0u64;
    let mut sent_ok = Vec::new();
    let stop_at = Instant::now() + a.duration.max(Duration::from_secs(1)) * 4 + give_up;
    for j in a.single..total {
        loop {
            while oldest < j
                && (complete(oldest)
                    || now_ns().saturating_sub(b.slots[oldest].sent_ns.load(Relaxed))
                        > give_up.as_nanos() as u64)
            {
                oldest += 1;
            }
            if j - oldest < a.in_flight.max(1) {
                break;
            }
            let n = b.done.notified();
            let _ = tokio::time::timeout(Duration::from_millis(2), n).await;
        }
        if Instant::now() > stop_at {
            break;
        }
        if send(j).await {
            sent_ok.push(j);
        } else {
            errors2 += 1;
        }
    }
    let t0 = Instant::now();
    while sent_ok.iter().any(|&j| !complete(j)) && t0.elapsed() < give_up {
        let n = b.done.notified();
        let _ = tokio::time::timeout(Duration::from_millis(5), n).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cpu = cpu0.since(&ctx.watched);
    let tally = f.tally();
    let lat = Latency::of(&f.hists.merged());
    let last = sent_ok
        .iter()
        .map(|&j| b.slots[j].last_ns.load(Relaxed))
        .max()
        .unwrap_or(start);
    let secs = (last.saturating_sub(start)) as f64 / 1e9;
    let mut tta: Vec<f64> = sent_ok.iter().map(|&j| time_to_all_ms(j)).collect();
    let tta_median = median(&mut tta);
    let incomplete = sent_ok.iter().filter(|&&j| !complete(j)).count();
    let disc = f.disconnects.load(Relaxed) - disc1;
    let sustained = json!({
        "broadcasts": sent_ok.len(),
        "in_flight": a.in_flight,
        "errors": errors2,
        "incomplete": incomplete,
        "secs": secs,
        "deliveries_per_s": if secs > 0.0 { tally.delivered as f64 / secs } else { 0.0 },
        "broadcasts_per_s": if secs > 0.0 { sent_ok.len() as f64 / secs } else { 0.0 },
        "time_to_all_median_ms": tta_median,
        "time_to_all_max_ms": tta.last().copied().unwrap_or(0.0),
        "tally": tally,
        "latency": lat,
        "cpu": cpu,
        "cpu_us_per_delivery": if ctx.watched.is_empty() || tally.delivered == 0 { Value::Null } else { json!(cpu.total_us as f64 / tally.delivered as f64) },
        "disconnects": disc,
    });
    if !ctx.args.quiet {
        eprintln!(
            "  sustained: {} broadcasts, {:.0} deliveries/s, {}; time to all median {}; lost {} dup {}",
            sent_ok.len(),
            sustained["deliveries_per_s"].as_f64().unwrap_or(0.0),
            lat.line(),
            fmt_ms(tta_median),
            tally.lost,
            tally.duplicates
        );
    }
    for (name, t, e, inc) in [
        ("single", &single_tally, errors, incomplete_single),
        ("sustained", &tally, errors2, incomplete),
    ] {
        if t.lost > 0 || t.duplicates > 0 || e > 0 || inc > 0 {
            problems.push(format!(
                "broadcast {name}: {} lost, {} duplicated, {e} call errors, {inc} incomplete",
                t.lost, t.duplicates
            ));
        }
        if t.delivered == 0 {
            problems.push(format!("broadcast {name}: nothing delivered"));
        }
    }
    report["single"] = single;
    report["sustained"] = sustained;
}

/// Resident memory of every watched process (or node /metrics), in bytes.
async fn rss_all(ctx: &Ctx) -> Vec<(String, Option<u64>)> {
    let mut v: Vec<(String, Option<u64>)> = ctx
        .watched
        .iter()
        .map(|w| (w.label.clone(), stats::rss_bytes(w.pid)))
        .collect();
    if ctx.watched.is_empty() {
        for m in &ctx.args.metrics {
            let rss = http::get(m).await.ok().and_then(|body| {
                body.lines()
                    .find(|l| l.starts_with("process_resident_memory_bytes "))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|x| x.parse::<f64>().ok())
                    .map(|x| x as u64)
            });
            v.push((m.clone(), rss));
        }
    }
    v
}

async fn idle(ctx: &Arc<Ctx>, before: Vec<(String, Option<u64>)>, report: &mut Value) {
    let f = &ctx.fleet;
    set_phase(ctx, "idle");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected = f.connected.load(Relaxed) as u64;
    let after = rss_all(ctx).await;
    let disc0 = f.disconnects.load(Relaxed);
    tokio::time::sleep(ctx.args.hold).await;
    let after_hold = rss_all(ctx).await;
    let mut per = Vec::new();
    let mut total_delta = 0i64;
    let mut measured = false;
    for ((label, b), (_, a)) in before.iter().zip(after.iter()) {
        if let (Some(b), Some(a)) = (b, a) {
            let d = *a as i64 - *b as i64;
            total_delta += d;
            measured = true;
            per.push(json!({
                "process": label,
                "rss_before": b,
                "rss_after": a,
                "bytes_per_connection": if connected > 0 { d as f64 / connected as f64 } else { 0.0 },
            }));
        } else {
            per.push(json!({ "process": label, "rss_before": b, "rss_after": a }));
        }
    }
    let bpc = if measured && connected > 0 {
        Some(total_delta as f64 / connected as f64)
    } else {
        None
    };
    let still = f.connected.load(Relaxed) as u64;
    report["idle"] = json!({
        "connected": connected,
        "still_connected_after_hold": still,
        "hold_s": ctx.args.hold.as_secs_f64(),
        "disconnects_during_hold": f.disconnects.load(Relaxed) - disc0,
        "processes": per,
        "rss_after_hold": after_hold,
        "bytes_per_connection": bpc,
    });
    if !ctx.args.quiet {
        eprintln!(
            "  idle: {connected} connected, {still} still after {:?}; RSS per connection {}",
            ctx.args.hold,
            bpc.map_or("n/a (give --pid)".into(), |b| format!(
                "{:.0} bytes ({:.2} KiB)",
                b,
                b / 1024.0
            ))
        );
    }
}

async fn control_step(ctx: &Arc<Ctx>, rate: Option<f64>) -> Value {
    let a = &ctx.args;
    let f = &ctx.fleet;
    let api = ctx.api.clone().expect("api");
    let n_api = api.nodes();
    set_phase(
        ctx,
        match rate {
            Some(r) => format!("control {r:.0}/s"),
            None => "control max".into(),
        },
    );
    f.hists.reset();
    let calls = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let cpu0 = CpuMark::take(&ctx.watched);
    let t0 = now_ns();
    let dur_ns = a.duration.as_nanos() as u64;
    let one = {
        let (ctx, api, calls, errors) = (ctx.clone(), api.clone(), calls.clone(), errors.clone());
        move |k: u64, rng: &mut Rng| {
            let (ctx, api, calls, errors) =
                (ctx.clone(), api.clone(), calls.clone(), errors.clone());
            let mut targets = Vec::new();
            let is_online = match ctx.args.op {
                ControlOp::IsOnline => true,
                ControlOp::Unread => false,
                ControlOp::Mixed => k % 2 == 0,
            };
            pick(
                &ctx,
                rng,
                k as usize % n_api,
                if is_online {
                    ctx.args.users_per_call
                } else {
                    1
                },
                &mut targets,
            );
            let users: Vec<String> = targets.iter().map(|&i| ctx.fleet.user(i)).collect();
            async move {
                if users.is_empty() {
                    return;
                }
                let node = k as usize % n_api;
                let r = if is_online {
                    api.is_online(node, users).await.map(|_| ())
                } else {
                    api.unread(node, users.into_iter().next().expect("one"))
                        .await
                        .map(|_| ())
                };
                calls.fetch_add(1, Relaxed);
                ctx.progress.calls.fetch_add(1, Relaxed);
                if let Err(e) = r {
                    errors.fetch_add(1, Relaxed);
                    ctx.fleet.note_error(e);
                }
            }
        }
    };
    let mut unsent = 0u64;
    match rate {
        Some(r) => {
            let n = (r * a.duration.as_secs_f64()).round().max(1.0) as u64;
            let interval = 1e9 / r;
            let sem = Arc::new(Semaphore::new(a.max_in_flight.max(1)));
            let mut rng = Rng::new();
            let deadline = t0 + dur_ns + 5_000_000_000;
            for k in 0..n {
                let intended = t0 + (k as f64 * interval) as u64;
                let now = now_ns();
                if intended > now + 200_000 {
                    tokio::time::sleep(Duration::from_nanos(intended - now)).await;
                }
                let Ok(Ok(permit)) = tokio::time::timeout(
                    Duration::from_nanos(deadline.saturating_sub(now_ns())),
                    sem.clone().acquire_owned(),
                )
                .await
                else {
                    unsent = n - k;
                    break;
                };
                let fut = one(k, &mut rng);
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    fut.await;
                    ctx.fleet
                        .hists
                        .record(k as usize, now_ns().saturating_sub(intended));
                    drop(permit);
                });
            }
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                sem.acquire_many(a.max_in_flight.max(1) as u32),
            )
            .await;
        }
        None => {
            let mut workers = Vec::new();
            for w in 0..a.concurrency.max(1) {
                let one = one.clone();
                let ctx = ctx.clone();
                workers.push(tokio::spawn(async move {
                    let mut rng = Rng::new();
                    let stride = ctx.args.concurrency.max(1) as u64;
                    let mut k = w as u64;
                    while now_ns() < t0 + dur_ns {
                        let s = now_ns();
                        one(k, &mut rng).await;
                        ctx.fleet.hists.record(w, now_ns().saturating_sub(s));
                        k += stride;
                    }
                }));
            }
            for w in workers {
                let _ = w.await;
            }
        }
    }
    let secs = (now_ns() - t0) as f64 / 1e9;
    let cpu = cpu0.since(&ctx.watched);
    let lat = Latency::of(&f.hists.merged());
    let n = calls.load(Relaxed);
    let v = json!({
        "offered_per_s": rate,
        "queries": n,
        "errors": errors.load(Relaxed),
        "unsent": unsent,
        "queries_per_s": n as f64 / secs.max(1e-6),
        "latency": lat,
        "cpu": cpu,
        "cpu_us_per_query": if ctx.watched.is_empty() || n == 0 { Value::Null } else { json!(cpu.total_us as f64 / n as f64) },
    });
    if !a.quiet {
        eprintln!(
            "  control {:>8}: {:.0} queries/s  {}  errors {}",
            rate.map_or("max".into(), |r| format!("{r:.0}/s")),
            v["queries_per_s"].as_f64().unwrap_or(0.0),
            lat.line(),
            v["errors"]
        );
    }
    v
}

async fn control(ctx: &Arc<Ctx>, report: &mut Value, problems: &mut Vec<String>) {
    let mut steps = Vec::new();
    for &r in &ctx.args.rate {
        steps.push(control_step(ctx, Some(r)).await);
    }
    if ctx.args.rate.is_empty() || ctx.args.max_rate {
        steps.push(control_step(ctx, None).await);
    }
    for s in &steps {
        let e = s["errors"].as_u64().unwrap_or(0) + s["unsent"].as_u64().unwrap_or(0);
        if e > 0 {
            problems.push(format!("control: {e} queries failed or were not sent"));
        }
    }
    report["steps"] = json!(steps);
}

/// The human-readable summary.
fn print_human(r: &Value) {
    let c = &r["connect"];
    println!(
        "herald bench {} against {} ({} node(s)){}",
        r["scenario"].as_str().unwrap_or("?"),
        r["target"].as_str().unwrap_or("?"),
        r["nodes"],
        r["label"]
            .as_str()
            .map_or(String::new(), |l| format!(" [{l}]"))
    );
    println!(
        "  connections: {}/{} in {:.2}s ({:.0}/s), {} failed",
        c["connected"],
        c["requested"],
        c["secs"].as_f64().unwrap_or(0.0),
        c["per_s"].as_f64().unwrap_or(0.0),
        c["failed"]
    );
    if let Some(steps) = r["steps"].as_array() {
        for s in steps {
            if s.get("queries").is_some() {
                println!(
                    "  control {}: {:.0} queries/s, latency p50 {} p99 {} max {}, errors {}",
                    s["offered_per_s"]
                        .as_f64()
                        .map_or("max".into(), |x| format!("{x:.0}/s")),
                    s["queries_per_s"].as_f64().unwrap_or(0.0),
                    fmt_ms(s["latency"]["p50_ms"].as_f64().unwrap_or(0.0)),
                    fmt_ms(s["latency"]["p99_ms"].as_f64().unwrap_or(0.0)),
                    fmt_ms(s["latency"]["max_ms"].as_f64().unwrap_or(0.0)),
                    s["errors"]
                );
            } else if let Ok(step) = serde_json::from_value::<StepView>(s.clone()) {
                println!("{}", step.line());
            }
        }
    }
    if let Some(m) = r.get("max_sustained").filter(|m| !m.is_null()) {
        println!(
            "  max sustained (p99 <= {}, nothing lost): {:.0} deliveries/s offered, {:.0} delivered/s, p50 {} p99 {}",
            fmt_ms(r["slo_p99_ms"].as_f64().unwrap_or(0.0)),
            m["offered_per_s"].as_f64().unwrap_or(0.0),
            m["delivered_per_s"].as_f64().unwrap_or(0.0),
            fmt_ms(m["p50_ms"].as_f64().unwrap_or(0.0)),
            fmt_ms(m["p99_ms"].as_f64().unwrap_or(0.0)),
        );
    } else if r.get("max_sustained").is_some() {
        println!("  max sustained: no step met the objective");
    }
    if let Some(s) = r.get("single") {
        println!(
            "  one broadcast to all: median {} max {} ({} broadcasts, {} incomplete)",
            fmt_ms(s["time_to_all_median_ms"].as_f64().unwrap_or(0.0)),
            fmt_ms(s["time_to_all_max_ms"].as_f64().unwrap_or(0.0)),
            s["broadcasts"],
            s["incomplete"]
        );
    }
    if let Some(s) = r.get("sustained") {
        println!(
            "  sustained broadcast: {:.0} deliveries/s ({:.1} broadcasts/s, {} pending at most), latency p50 {} p99 {} max {}, lost {} dup {}{}",
            s["deliveries_per_s"].as_f64().unwrap_or(0.0),
            s["broadcasts_per_s"].as_f64().unwrap_or(0.0),
            s["in_flight"],
            fmt_ms(s["latency"]["p50_ms"].as_f64().unwrap_or(0.0)),
            fmt_ms(s["latency"]["p99_ms"].as_f64().unwrap_or(0.0)),
            fmt_ms(s["latency"]["max_ms"].as_f64().unwrap_or(0.0)),
            s["tally"]["lost"],
            s["tally"]["duplicates"],
            s["cpu_us_per_delivery"].as_f64().map_or(String::new(), |c| format!(", {c:.2} server-CPU-µs/delivery")),
        );
    }
    if let Some(i) = r.get("idle") {
        println!(
            "  idle: {} connected, {} after {}s hold; RSS per connection: {}",
            i["connected"],
            i["still_connected_after_hold"],
            i["hold_s"],
            i["bytes_per_connection"]
                .as_f64()
                .map_or("n/a".into(), |b| format!(
                    "{b:.0} bytes ({:.2} KiB)",
                    b / 1024.0
                ))
        );
        if let Some(ps) = i["processes"].as_array() {
            for p in ps {
                if let Some(b) = p["bytes_per_connection"].as_f64() {
                    println!(
                        "    {}: {:.0} bytes/connection",
                        p["process"].as_str().unwrap_or("?"),
                        b
                    );
                }
            }
        }
    }
    if let Some(p) = r["problems"].as_array().filter(|p| !p.is_empty()) {
        println!("  problems:");
        for x in p {
            println!("    - {}", x.as_str().unwrap_or(""));
        }
        if let Some(e) = r["client_errors"].as_array().filter(|e| !e.is_empty()) {
            println!("  first client errors:");
            for x in e.iter().take(5) {
                println!("    - {}", x.as_str().unwrap_or(""));
            }
        }
    } else {
        println!("  ok: no errors, nothing lost or duplicated");
    }
}

/// The fields of a step the summary prints.
#[derive(serde::Deserialize)]
struct StepView {
    phase: String,
    offered_per_s: Option<f64>,
    delivered_per_s: f64,
    latency: Latency,
    lost: u64,
    duplicates: u64,
    call_errors: u64,
    cpu_us_per_delivery: Option<f64>,
    ok: bool,
    why_not: Vec<String>,
}

impl StepView {
    fn line(self) -> String {
        let s = Step {
            phase: self.phase,
            offered_per_s: self.offered_per_s,
            delivered_per_s: self.delivered_per_s,
            latency: self.latency,
            tally: Tally {
                lost: self.lost,
                duplicates: self.duplicates,
                ..Default::default()
            },
            call_errors: self.call_errors,
            cpu_us_per_delivery: self.cpu_us_per_delivery,
            ok: self.ok,
            why_not: self.why_not,
            ..Default::default()
        };
        step_line(&s)
    }
}
