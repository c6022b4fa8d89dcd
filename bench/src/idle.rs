//! The idle scenario: connections only, resident memory per connection.

use crate::ctx::{set_phase, Ctx};
use crate::{http, stats};
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Resident memory of every watched process (or node /metrics), in bytes.
pub async fn rss_all(ctx: &Ctx) -> Vec<(String, Option<u64>)> {
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

pub async fn idle(ctx: &Arc<Ctx>, before: Vec<(String, Option<u64>)>, report: &mut Value) {
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
