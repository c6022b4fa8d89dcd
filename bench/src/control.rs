//! The control scenario: IsOnline / UnreadCount queries per second (Herald
//! only).

use crate::args::ControlOp;
use crate::ctx::{pick, set_phase, Ctx};
use crate::stats::{now_ns, small_rng, CpuMark, Latency};
use rand::rngs::SmallRng;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

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
        move |k: u64, rng: &mut SmallRng| {
            let (ctx, api, calls, errors) =
                (ctx.clone(), api.clone(), calls.clone(), errors.clone());
            let mut targets = Vec::new();
            let is_online = match ctx.args.op {
                ControlOp::IsOnline => true,
                ControlOp::Unread => false,
                ControlOp::Mixed => k.is_multiple_of(2),
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
            let mut rng = small_rng();
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
                    let mut rng = small_rng();
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

pub async fn control(ctx: &Arc<Ctx>, report: &mut Value, problems: &mut Vec<String>) {
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
