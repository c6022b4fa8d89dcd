//! The sequential scenario: a backend that calls `SendToUser` one call at a
//! time (one notification per business event), and the same with a few
//! callers in parallel. Closed loop: each caller waits for the answer before
//! its next call, so the figure is the time per call, which throughput
//! benchmarks with hundreds of calls in flight hide (a Nagle/delayed-ACK
//! stall of 40 ms per call barely dents their rate).
//!
//! Each step reports the per-call latency (request to answer) and the
//! delivery latency (request to the client's socket), and checks that every
//! answered call was delivered exactly once.

use crate::ctx::{pick, set_phase, settle, Ctx};
use crate::fleet::Tally;
use crate::stats::StepCounters;
use crate::stats::{fmt_ms, now_ns, small_rng, CpuMark, CpuUse, Hists, Latency};
use crate::unicast::{call, drain};
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// One step: `callers` closed-loop callers for `--duration`.
#[derive(Clone, Debug, Serialize)]
pub struct SeqStep {
    pub callers: usize,
    pub calls: u64,
    pub call_errors: u64,
    pub calls_per_s: f64,
    /// Request to answer, per call.
    pub call_latency: Latency,
    /// Request to the recipient's socket.
    pub delivery_latency: Latency,
    #[serde(flatten)]
    pub tally: Tally,
    pub cpu: CpuUse,
    /// Server CPU (the --pid processes) per call, microseconds.
    pub cpu_us_per_call: Option<f64>,
}

async fn step(ctx: &Arc<Ctx>, callers: usize) -> SeqStep {
    let f = &ctx.fleet;
    let n_api = ctx.api.as_ref().expect("api").nodes();
    set_phase(ctx, format!("sequential x{callers}"));
    let counters = Arc::new(StepCounters {
        calls: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        expected: AtomicU64::new(0),
    });
    let hists = Arc::new(Hists::new(callers));
    let base = ctx.seq.load(Relaxed);
    f.reset_step(base);
    let cpu0 = CpuMark::take(&ctx.watched);
    let t0 = now_ns();
    let stop_at = t0 + ctx.args.duration.as_nanos() as u64;
    let mut workers = Vec::new();
    for w in 0..callers {
        let (ctx, c, hists) = (ctx.clone(), counters.clone(), hists.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = small_rng();
            let mut targets = Vec::with_capacity(1);
            let mut k = w;
            while now_ns() < stop_at {
                targets.clear();
                let node = k % n_api;
                k += 1;
                pick(&ctx, &mut rng, node, 1, &mut targets);
                if targets.is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                let seq = ctx.seq.fetch_add(1, Relaxed);
                let s = now_ns();
                call(&ctx, &c, node, &targets, seq, s).await;
                hists.record(w, now_ns().saturating_sub(s));
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let secs = (now_ns() - t0) as f64 / 1e9;
    drain(ctx, counters.expected.load(Relaxed)).await;
    let cpu = cpu0.since(&ctx.watched);
    let calls = counters.calls.load(Relaxed);
    let s = SeqStep {
        callers,
        calls,
        call_errors: counters.errors.load(Relaxed),
        calls_per_s: calls as f64 / secs.max(1e-6),
        call_latency: Latency::of(&hists.merged()),
        delivery_latency: Latency::of(&f.hists.merged()),
        tally: f.tally(),
        cpu_us_per_call: if ctx.watched.is_empty() || calls == 0 {
            None
        } else {
            Some(cpu.total_us as f64 / calls as f64)
        },
        cpu,
    };
    if !ctx.args.quiet {
        eprintln!("{}", line(&s));
    }
    s
}

pub fn line(s: &SeqStep) -> String {
    format!(
        "  sequential x{:<3} {:>7.0} calls/s  per call p50 {} p99 {}  delivery p50 {} p99 {}  lost {} dup {} err {}{}",
        s.callers,
        s.calls_per_s,
        fmt_ms(s.call_latency.p50_ms),
        fmt_ms(s.call_latency.p99_ms),
        fmt_ms(s.delivery_latency.p50_ms),
        fmt_ms(s.delivery_latency.p99_ms),
        s.tally.lost,
        s.tally.duplicates,
        s.call_errors,
        s.cpu_us_per_call
            .map_or(String::new(), |c| format!("  {c:.1} server-CPU-µs/call")),
    )
}

pub async fn sequential(ctx: &Arc<Ctx>, report: &mut Value, problems: &mut Vec<String>) {
    let mut steps = Vec::new();
    for &n in &ctx.args.callers {
        settle(ctx).await;
        let s = step(ctx, n.max(1)).await;
        let mut p = s.tally.problems(s.call_errors);
        if s.tally.delivered == 0 {
            p.push("nothing delivered".into());
        }
        if !p.is_empty() {
            problems.push(format!("sequential x{}: {}", s.callers, p.join(", ")));
        }
        steps.push(s);
    }
    report["sequential"] = json!(steps);
}
