//! The probe scenario: drives and measures the clients of several `hold`
//! processes (one fleet spread over processes, each under its open-files
//! limit), from their status files (see [`crate::hold`]).
//!
//! In order, each part bounded in time:
//! 1. waits until the holders report `--expect` clients connected in all
//!    (`--connect-timeout`); the connect rate is every client over the
//!    span from the first holder's start to the last holder's end;
//! 2. `--single` broadcasts, one at a time, each timed from the send to
//!    the first and to the last delivery over every holder;
//! 3. IsOnline of `--users-per-call` connected users at `--rate` for
//!    `--duration` (open loop: latency from the intended send time), and
//!    how many of the users asked were online;
//! 4. with `--storm-kill PID`: SIGKILLs that node (the caller restarts it
//!    on the same ports); times until the holders report every client
//!    connected again, then one broadcast to all of them.
//!
//! The holders' status files are rewritten every 100 ms, so the times
//! that come from reading them (all reconnected) are late by up to that;
//! delivery times come from the holders' own receive timestamps.

use crate::api::{payload, Api};
use crate::args::BenchArgs;
use crate::hold::{BCAST_BASE, BCAST_SLOTS};
use crate::stats::{fmt_ms, monotonic_ns, small_rng, Hists, Latency};
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// How long one broadcast may take to reach everyone before it counts as
/// incomplete.
const BCAST_GIVE_UP: Duration = Duration::from_secs(30);
/// How long the storm may take to recover.
const STORM_GIVE_UP: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(20);

#[derive(Deserialize, Clone, Default)]
struct Connect {
    #[serde(default)]
    connected: u64,
    #[serde(default)]
    started_mono_ns: u64,
    #[serde(default)]
    done_mono_ns: u64,
}

#[derive(Deserialize, Clone)]
struct Delivered {
    k: usize,
    count: u64,
    first_mono_ns: u64,
    last_mono_ns: u64,
}

/// One holder's status file.
#[derive(Deserialize, Clone)]
struct Status {
    pid: u32,
    at_mono_ns: u64,
    run_id: String,
    connections: usize,
    connect: Connect,
    connected: u64,
    disconnects: u64,
    connect_failures: u64,
    broadcasts: Vec<Delivered>,
}

/// Every holder's status, or None while one is missing or unreadable.
fn read_all(a: &BenchArgs) -> Option<Vec<Status>> {
    a.holders
        .iter()
        .map(|p| {
            let text = std::fs::read(p).ok()?;
            serde_json::from_slice(&text).ok()
        })
        .collect()
}

fn connected(all: &[Status]) -> u64 {
    all.iter().map(|s| s.connected).sum()
}

/// Polls the status files until `done` holds for them, or `limit` passes;
/// returns the last statuses read and whether `done` held.
async fn wait_for(
    a: &BenchArgs,
    limit: Duration,
    mut done: impl FnMut(&[Status]) -> bool,
) -> (Vec<Status>, bool) {
    let t0 = Instant::now();
    let mut last = Vec::new();
    loop {
        if let Some(all) = read_all(a) {
            if done(&all) {
                return (all, true);
            }
            last = all;
        }
        if t0.elapsed() > limit {
            return (last, false);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The next unused broadcast number.
fn next_k(all: &[Status]) -> usize {
    all.iter()
        .flat_map(|s| s.broadcasts.iter().map(|b| b.k + 1))
        .max()
        .unwrap_or(0)
}

/// Sends broadcast `k` through API node `node` and waits until every
/// client connected at the send has it (or [`BCAST_GIVE_UP`]).
async fn one_broadcast(a: &BenchArgs, api: &Api, node: usize, k: usize) -> Value {
    let expected = read_all(a).map_or(0, |all| connected(&all));
    let sent = monotonic_ns();
    if let Err(e) = api
        .broadcast(node, payload(BCAST_BASE + k as u64, 0, a.payload_bytes))
        .await
    {
        return json!({ "k": k, "error": e });
    }
    let count = |all: &[Status]| -> u64 {
        let mine = all
            .iter()
            .flat_map(|s| s.broadcasts.iter().filter(|b| b.k == k));
        mine.map(|b| b.count).sum()
    };
    let (all, complete) = wait_for(a, BCAST_GIVE_UP, |all| count(all) >= expected).await;
    let mine: Vec<&Delivered> = all
        .iter()
        .flat_map(|s| s.broadcasts.iter().filter(|b| b.k == k))
        .collect();
    let first = mine.iter().map(|b| b.first_mono_ns).min().unwrap_or(sent);
    let last = mine.iter().map(|b| b.last_mono_ns).max().unwrap_or(sent);
    let ms = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
    json!({
        "k": k,
        "expected": expected,
        "delivered": count(&all),
        "complete": complete,
        "send_to_first_ms": ms(sent, first),
        "send_to_last_ms": ms(sent, last),
        "first_to_last_ms": ms(first, last),
        "sent_mono_ns": sent,
        "last_mono_ns": last,
    })
}

async fn broadcasts(a: &BenchArgs, api: &Api, n: usize, problems: &mut Vec<String>) -> Value {
    let mut out = Vec::new();
    for j in 0..n {
        let k = read_all(a).map_or(0, |all| next_k(&all));
        if k >= BCAST_SLOTS {
            problems.push("the holders track no more broadcasts".into());
            break;
        }
        let r = one_broadcast(a, api, j % api.nodes(), k).await;
        if !r["complete"].as_bool().unwrap_or(false) {
            problems.push(format!("broadcast {k} did not reach every client: {r}"));
        }
        if !a.quiet {
            eprintln!(
                "  broadcast {k}: {}/{} clients; send to first {}, to last {}, first to last {}",
                r["delivered"],
                r["expected"],
                fmt_ms(r["send_to_first_ms"].as_f64().unwrap_or(0.0)),
                fmt_ms(r["send_to_last_ms"].as_f64().unwrap_or(0.0)),
                fmt_ms(r["first_to_last_ms"].as_f64().unwrap_or(0.0)),
            );
        }
        out.push(r);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    json!(out)
}

/// IsOnline at `rate` calls/s for `--duration`, each for `--users-per-call`
/// users drawn from the holders' first-generation users (connected since
/// the connect phase).
async fn is_online(a: &BenchArgs, api: &Arc<Api>, all: &[Status], rate: f64) -> Value {
    let n = (rate * a.duration.as_secs_f64()).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let hists = Arc::new(Hists::new(16));
    let asked = Arc::new(AtomicU64::new(0));
    let online = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(Semaphore::new(a.max_in_flight.max(1)));
    let mut rng = small_rng();
    let mut unsent = 0;
    let t0 = Instant::now();
    let deadline = t0 + a.duration + Duration::from_secs(5);
    for k in 0..n {
        let intended = t0 + interval * k as u32;
        tokio::time::sleep_until(intended.into()).await;
        let Ok(Ok(permit)) =
            tokio::time::timeout_at(deadline.into(), sem.clone().acquire_owned()).await
        else {
            unsent = n - k;
            break;
        };
        let users: Vec<String> = (0..a.users_per_call.max(1))
            .map(|_| {
                let s = &all[rng.random_range(0..all.len())];
                format!("{}-{}-0", s.run_id, rng.random_range(0..s.connections))
            })
            .collect();
        let (api, hists, asked, online, errors) = (
            api.clone(),
            hists.clone(),
            asked.clone(),
            online.clone(),
            errors.clone(),
        );
        tokio::spawn(async move {
            asked.fetch_add(users.len() as u64, Relaxed);
            match api.is_online(k as usize % api.nodes(), users).await {
                Ok(n) => {
                    online.fetch_add(n as u64, Relaxed);
                }
                Err(_) => {
                    errors.fetch_add(1, Relaxed);
                }
            }
            hists.record(k as usize, intended.elapsed().as_nanos() as u64);
            drop(permit);
        });
    }
    let all_permits = a.max_in_flight.max(1) as u32;
    let _ = tokio::time::timeout(Duration::from_secs(30), sem.acquire_many(all_permits)).await;
    let secs = t0.elapsed().as_secs_f64();
    let lat = Latency::of(&hists.merged());
    if !a.quiet {
        eprintln!(
            "  IsOnline at {rate:.0}/s: {}  online {}/{} errors {}",
            lat.line(),
            online.load(Relaxed),
            asked.load(Relaxed),
            errors.load(Relaxed)
        );
    }
    json!({
        "offered_per_s": rate,
        "users_per_call": a.users_per_call,
        "calls": lat.count,
        "calls_per_s": lat.count as f64 / secs.max(1e-6),
        "unsent": unsent,
        "errors": errors.load(Relaxed),
        "users_asked": asked.load(Relaxed),
        "users_online": online.load(Relaxed),
        "latency": lat,
    })
}

/// SIGKILLs node `pid` and times the holders' reconnect storm.
async fn storm(a: &BenchArgs, api: &Api, pid: u32, problems: &mut Vec<String>) -> Value {
    let before = read_all(a).unwrap_or_default();
    let n0 = connected(&before);
    let disc0: u64 = before.iter().map(|s| s.disconnects).sum();
    let fail0: u64 = before.iter().map(|s| s.connect_failures).sum();
    let t0 = monotonic_ns();
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
        problems.push(format!("storm: cannot kill {pid}"));
        return json!({ "error": format!("kill {pid}: {}", std::io::Error::last_os_error()) });
    }
    let mut lowest = n0;
    let (after, recovered) = wait_for(a, STORM_GIVE_UP, |all| {
        let c = connected(all);
        lowest = lowest.min(c);
        let dropped: u64 = all.iter().map(|s| s.disconnects).sum::<u64>() - disc0;
        dropped > 0 && c >= n0
    })
    .await;
    let at = after.iter().map(|s| s.at_mono_ns).max().unwrap_or(t0);
    let dropped = after.iter().map(|s| s.disconnects).sum::<u64>() - disc0;
    let failed = after.iter().map(|s| s.connect_failures).sum::<u64>() - fail0;
    let secs = |to: u64| to.saturating_sub(t0) as f64 / 1e9;
    if !recovered {
        problems.push(format!(
            "storm: {} of {n0} connected again after {STORM_GIVE_UP:?}",
            connected(&after)
        ));
    }
    let k = next_k(&after);
    let b = one_broadcast(a, api, 0, k).await;
    if !b["complete"].as_bool().unwrap_or(false) {
        problems.push(format!(
            "storm: the broadcast after it did not reach every client: {b}"
        ));
    }
    let receiving = secs(b["last_mono_ns"].as_u64().unwrap_or(t0));
    if !a.quiet {
        eprintln!(
            "  storm: {dropped} dropped ({failed} failed attempts while reconnecting); all {n0} connected again {:.2}s after the kill; a broadcast then reached {}/{} at {receiving:.2}s",
            secs(at),
            b["delivered"],
            b["expected"]
        );
    }
    json!({
        "connected_before": n0,
        "dropped": dropped,
        "lowest_connected_seen": lowest,
        "failed_attempts": failed,
        "recovered": recovered,
        "all_connected_after_s": secs(at),
        "broadcast": b,
        "all_receiving_after_s": receiving,
    })
}

/// Runs the probe (see the module doc); returns its report and problems.
pub async fn probe(a: &BenchArgs, api: Arc<Api>) -> (Value, Vec<String>) {
    let mut problems = Vec::new();
    let mut report = json!({ "scenario": "probe", "label": a.label, "holders": a.holders.len() });
    let expect = a.expect as u64;
    let (all, ok) = wait_for(a, a.connect_timeout, |all| connected(all) >= expect).await;
    let got = connected(&all);
    if !ok {
        problems.push(format!(
            "{got} of {expect} clients connected within {:?}",
            a.connect_timeout
        ));
    }
    if a.storm_kill.is_none() {
        // The connect phase: every holder's, from the first start to the last end.
        let start = all
            .iter()
            .map(|s| s.connect.started_mono_ns)
            .min()
            .unwrap_or(0);
        let end = all
            .iter()
            .map(|s| s.connect.done_mono_ns)
            .max()
            .unwrap_or(0);
        let n: u64 = all.iter().map(|s| s.connect.connected).sum();
        let secs = end.saturating_sub(start) as f64 / 1e9;
        report["connect"] = json!({
            "connected": n,
            "secs": secs,
            "per_s": n as f64 / secs.max(1e-9),
            "failed_attempts": all.iter().map(|s| s.connect_failures).sum::<u64>(),
            "holder_pids": all.iter().map(|s| s.pid).collect::<Vec<_>>(),
        });
        if !a.quiet {
            eprintln!(
                "  connect: {n} clients in {secs:.2}s ({:.0}/s)",
                n as f64 / secs.max(1e-9)
            );
        }
    }
    report["connected"] = json!(got);
    if got == 0 {
        report["problems"] = json!(problems);
        return (report, problems);
    }
    if let Some(pid) = a.storm_kill {
        report["storm"] = storm(a, &api, pid, &mut problems).await;
    } else {
        report["broadcasts"] = broadcasts(a, &api, a.single, &mut problems).await;
        let mut steps = Vec::new();
        for &r in &a.rate {
            let s = is_online(a, &api, &all, r).await;
            let asked = s["users_asked"].as_u64().unwrap_or(0);
            let online = s["users_online"].as_u64().unwrap_or(0);
            let failed = s["errors"].as_u64().unwrap_or(0) + s["unsent"].as_u64().unwrap_or(0);
            if failed > 0 || online < asked {
                problems.push(format!(
                    "IsOnline at {r}/s: {failed} calls failed or unsent, {online} of {asked} users online"
                ));
            }
            steps.push(s);
        }
        report["is_online"] = json!(steps);
    }
    report["problems"] = json!(problems);
    report["ok"] = json!(problems.is_empty());
    (report, problems)
}
