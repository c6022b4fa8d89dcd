//! The broadcast scenario: single broadcasts timed until the last client has
//! each, then sustained fan-out with a bounded number pending.

use crate::api::payload;
use crate::ctx::{set_phase, settle, Ctx};
use crate::fleet::{Bcast, BcastSlot};
use crate::stats::{fmt_ms, now_ns, CpuMark, Latency};
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Median of a list (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub async fn broadcast(ctx: &Arc<Ctx>, report: &mut Value, problems: &mut Vec<String>) {
    let a = &ctx.args;
    let f = &ctx.fleet;
    let api = ctx.api.clone().expect("api");
    let n_api = api.nodes();
    let total = a.single + a.broadcasts;
    let base = ctx.seq.fetch_add(total as u64, Relaxed);
    let slots: Vec<BcastSlot> = (0..total).map(|_| BcastSlot::new(u32::MAX)).collect();
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
