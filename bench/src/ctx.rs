//! What every scenario shares: the parsed arguments, the client fleet, the
//! API, the watched processes, and the progress line.

use crate::api::Api;
use crate::args::BenchArgs;
use crate::fleet::Fleet;
use crate::stats::{fmt_ms, Latency, Watched};
use rand::rngs::SmallRng;
use rand::Rng;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Live counters of the running phase, for the progress line.
pub struct Progress {
    pub phase: Mutex<String>,
    pub calls: AtomicU64,
    pub started: Instant,
}

pub struct Ctx {
    pub args: BenchArgs,
    pub fleet: Arc<Fleet>,
    pub api: Option<Arc<Api>>,
    pub watched: Vec<Watched>,
    pub seq: AtomicU64,
    pub progress: Arc<Progress>,
}

pub async fn progress_loop(ctx: Arc<Ctx>) {
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

pub fn set_phase(ctx: &Ctx, p: impl Into<String>) {
    *ctx.progress.phase.lock().unwrap() = p.into();
}

/// Opens every client; returns the connect figures.
pub async fn connect_all(ctx: &Arc<Ctx>) -> Value {
    let f = &ctx.fleet;
    let n = f.slots.len();
    let t0 = Instant::now();
    let started_mono = crate::stats::monotonic_ns();
    f.start(ctx.args.connect_concurrency);
    let deadline = t0 + ctx.args.connect_timeout;
    while f.first_attempts.load(Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let done_mono = crate::stats::monotonic_ns();
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
        // On the machine's monotonic clock, to combine several bench
        // processes' connect phases (the hold scenario).
        "started_mono_ns": started_mono,
        "done_mono_ns": done_mono,
    })
}

/// Waits for reconnecting clients before a new step (bounded).
pub async fn settle(ctx: &Ctx) {
    let f = &ctx.fleet;
    let target = f.connect_ok.load(Relaxed).min(f.slots.len() as u64) as usize;
    let t0 = Instant::now();
    while f.connected.load(Relaxed) < target && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Picks `k` distinct connected recipients for a call made through API node
/// `api_node`.
pub fn pick(ctx: &Ctx, rng: &mut SmallRng, api_node: usize, k: usize, out: &mut Vec<usize>) {
    let f = &ctx.fleet;
    let nodes = f.by_node.len();
    for _ in 0..k {
        for _ in 0..64 {
            let node = if nodes == 1 {
                0
            } else {
                match ctx.args.remote_share {
                    None => rng.random_range(0..nodes),
                    Some(p) => {
                        let local = api_node % nodes;
                        if rng.random_bool(p) {
                            (local + 1 + rng.random_range(0..nodes - 1)) % nodes
                        } else {
                            local
                        }
                    }
                }
            };
            let list = &f.by_node[node];
            let i = list[rng.random_range(0..list.len())];
            if f.is_connected(i) && !out.contains(&i) {
                out.push(i);
                break;
            }
        }
    }
}
