//! The unicast scenario: fixed-rate steps, a closed loop, and the step-up
//! search for the highest sustained rate.

use crate::api::payload;
use crate::ctx::{pick, set_phase, settle, Ctx};
use crate::fleet::Tally;
use crate::stats::{fmt_ms, now_ns, small_rng, CpuMark, CpuUse, Latency, StepCounters};
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// One sending step's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Step {
    pub phase: String,
    /// Offered deliveries/s (None: closed loop).
    pub offered_per_s: Option<f64>,
    pub duration_s: f64,
    pub calls: u64,
    pub call_errors: u64,
    /// Calls the sender could not make in time (it fell too far behind).
    pub unsent: u64,
    #[serde(flatten)]
    pub tally: Tally,
    /// Deliveries of an earlier step that arrived late.
    pub stale: u64,
    pub disconnects: u64,
    pub delivered_per_s: f64,
    pub latency: Latency,
    pub cpu: CpuUse,
    /// Server CPU (the --pid processes) per delivered message, microseconds.
    pub cpu_us_per_delivery: Option<f64>,
    /// With --remote-sender: the sender process's CPU during the step
    /// (it is the load generator's, like herald-bench's own gRPC client).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_cpu_us: Option<u64>,
    pub ok: bool,
    pub why_not: Vec<String>,
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

/// One message of a SendBatch: its recipients, sequence number and
/// intended send time.
type Pending = (Vec<usize>, u64, u64);

/// Sends one SendBatch of `batch` through `node` and books each item like
/// a call of its own.
fn spawn_batch(
    ctx: &Arc<Ctx>,
    c: &Arc<StepCounters>,
    node: usize,
    batch: Vec<Pending>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (ctx, c) = (ctx.clone(), c.clone());
    tokio::spawn(async move {
        let items = batch
            .iter()
            .map(|(targets, seq, t)| {
                let users = targets.iter().map(|&i| ctx.fleet.user(i)).collect();
                (users, payload(*seq, *t, ctx.args.payload_bytes))
            })
            .collect();
        let api = ctx.api.as_ref().expect("api");
        let r = api.send_batch(node, items, ctx.args.transient).await;
        let n = batch.len() as u64;
        c.calls.fetch_add(n, Relaxed);
        ctx.progress.calls.fetch_add(n, Relaxed);
        let results = match r {
            Ok(v) => v,
            Err(e) => (0..batch.len()).map(|_| Err(e.clone())).collect(),
        };
        for ((targets, ..), r) in batch.iter().zip(results) {
            book(&ctx, &c, targets, r);
        }
        drop(permit);
    });
}

/// A permit for one more call in flight, waiting for one until `deadline`
/// (bench clock) at most; None past it (the sender gives up).
async fn acquire(sem: &Arc<Semaphore>, deadline: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(p) = sem.clone().try_acquire_owned() {
        return Some(p);
    }
    let wait = Duration::from_nanos(deadline.saturating_sub(now_ns()));
    match tokio::time::timeout(wait, sem.clone().acquire_owned()).await {
        Ok(p) => Some(p.expect("never closed")),
        Err(_) => None,
    }
}

/// One API call to `targets` through `node`, booked: an answered call
/// expects one delivery per target, a failed one counts as an error.
pub(crate) async fn call(
    ctx: &Ctx,
    c: &StepCounters,
    node: usize,
    targets: &[usize],
    seq: u64,
    t: u64,
) {
    let users: Vec<String> = targets.iter().map(|&i| ctx.fleet.user(i)).collect();
    let body = payload(seq, t, ctx.args.payload_bytes);
    let api = ctx.api.as_ref().expect("api");
    let r = api.send(node, users, body, ctx.args.transient).await;
    c.calls.fetch_add(1, Relaxed);
    ctx.progress.calls.fetch_add(1, Relaxed);
    book(ctx, c, targets, r);
}

/// Books one answered send: one expected delivery per target, or an error.
fn book(ctx: &Ctx, c: &StepCounters, targets: &[usize], r: Result<(), String>) {
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
pub(crate) async fn drain(ctx: &Ctx, expected: u64) {
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
            if a.remote_sender {
                let o = crate::remote::step(ctx, &counters, rate, n_calls, base).await;
                return finish_remote(ctx, phase, rate, o, &counters, disc0, cpu0).await;
            }
            let interval = 1e9 / calls_per_s;
            start_ns = now_ns() + 2_000_000;
            // Give up on calls that are more than 5 s late.
            let deadline = start_ns + dur.as_nanos() as u64 + 5_000_000_000;
            let mut rng = small_rng();
            let mut targets = Vec::with_capacity(upc);
            // --send-batch: messages waiting for their SendBatch, and the
            // API node it goes to.
            let mut pending: Vec<Pending> = Vec::new();
            let mut batches = 0usize;
            let linger = a.send_batch_linger.as_nanos() as u64;
            for k in 0..n_calls {
                let intended = start_ns + (k as f64 * interval) as u64;
                let now = now_ns();
                if intended > now + 200_000 {
                    // A batch leaves at its linger deadline, not with the
                    // next message.
                    if let Some(&(_, _, t0)) = pending.first() {
                        if t0 + linger < intended {
                            let wait = (t0 + linger).saturating_sub(now);
                            tokio::time::sleep(Duration::from_nanos(wait)).await;
                            let node = batches % n_api;
                            batches += 1;
                            match acquire(&sem, deadline).await {
                                Some(p) => spawn_batch(
                                    ctx,
                                    &counters,
                                    node,
                                    std::mem::take(&mut pending),
                                    p,
                                ),
                                None => {
                                    unsent += (n_calls - k) + pending.len() as u64;
                                    pending.clear();
                                    break;
                                }
                            }
                        }
                    }
                    let now = now_ns();
                    if intended > now {
                        tokio::time::sleep(Duration::from_nanos(intended - now)).await;
                    }
                }
                if a.send_batch > 0 {
                    targets.clear();
                    let node = batches % n_api;
                    pick(ctx, &mut rng, node, upc, &mut targets);
                    if targets.is_empty() {
                        unsent += 1;
                        continue;
                    }
                    pending.push((targets.clone(), base + k, intended));
                    let full = pending.len() >= a.send_batch;
                    let last = k + 1 == n_calls;
                    if full || last || now_ns() >= pending[0].2 + linger {
                        batches += 1;
                        match acquire(&sem, deadline).await {
                            Some(p) => {
                                spawn_batch(ctx, &counters, node, std::mem::take(&mut pending), p)
                            }
                            None => {
                                unsent += (n_calls - k - 1) + pending.len() as u64;
                                pending.clear();
                                break;
                            }
                        }
                    }
                    continue;
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
                    let mut rng = small_rng();
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

/// The end of a step the remote sender ran: every delivery in (bounded),
/// then the same books as a local step.
async fn finish_remote(
    ctx: &Arc<Ctx>,
    phase: &str,
    rate: f64,
    o: crate::remote::Outcome,
    counters: &StepCounters,
    disc0: u64,
    cpu0: CpuMark,
) -> Step {
    drain(ctx, counters.expected.load(Relaxed)).await;
    let cpu = cpu0.since(&ctx.watched);
    let mut s = finish_step(
        ctx,
        phase,
        Some(rate),
        o.start_ns,
        counters,
        o.unsent,
        disc0,
        cpu,
    );
    s.sender_cpu_us = Some(o.sender_cpu_us);
    s
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
        sender_cpu_us: None,
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
    let mut why = s.tally.problems(s.call_errors);
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
        eprintln!("{}", s.line());
    }
    s
}

fn step_problems(steps: &[Step], problems: &mut Vec<String>) {
    for s in steps.iter().filter(|s| s.phase == "fixed") {
        let mut p = s.tally.problems(s.call_errors);
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

pub async fn unicast(ctx: &Arc<Ctx>, report: &mut Value, problems: &mut Vec<String>) {
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

impl Step {
    /// The step as one line of the report.
    pub fn line(&self) -> String {
        let s = self;
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
}
