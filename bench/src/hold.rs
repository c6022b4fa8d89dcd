//! The hold scenario: one of several client processes of a fleet too big
//! for one process (each connection is a file descriptor, and the
//! open-files limit is per process). It connects its clients, holds them
//! (reconnecting dropped ones with fresh user ids), and replaces its
//! `--status` file every [`STATUS_EVERY`] with what a `probe` in another
//! process needs: how many clients are connected (per node), the connect
//! phase's times, and per broadcast how many clients got it and when the
//! first and the last did. Times are on the machine's monotonic clock
//! ([`stats::monotonic_ns`]), which every process reads alike.
//!
//! It stops after `--hold`, or at SIGTERM, writing a last status.

use crate::ctx::{set_phase, Ctx};
use crate::fleet::{Bcast, BcastSlot};
use crate::stats;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The sequence number of broadcast 0; broadcast `k` carries
/// `BCAST_BASE + k`. Far above what any other scenario numbers.
pub const BCAST_BASE: u64 = 1 << 40;
/// Broadcasts a holder tracks (a probe sends a handful per phase).
pub const BCAST_SLOTS: usize = 256;
/// How often the status file is replaced.
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// The holder's state now, as the status file holds it.
fn status(ctx: &Ctx, connect: &Value, phase: &str) -> Value {
    let f = &ctx.fleet;
    let mut broadcasts = Vec::new();
    if let Some(b) = f.bcast.get() {
        for (k, s) in b.slots.iter().enumerate() {
            let count = s.count.load(Relaxed);
            if count > 0 {
                broadcasts.push(json!({
                    "k": k,
                    "count": count,
                    "first_mono_ns": stats::to_monotonic(s.first_ns.load(Relaxed)),
                    "last_mono_ns": stats::to_monotonic(s.last_ns.load(Relaxed)),
                }));
            }
        }
    }
    json!({
        "pid": std::process::id(),
        "phase": phase,
        "at_mono_ns": stats::monotonic_ns(),
        "run_id": f.run_id,
        "connections": f.slots.len(),
        "nodes": f.ws_urls.len(),
        "connect": connect,
        "connected": f.connected.load(Relaxed),
        "connected_by_node": f.connected_by_node(),
        "connect_ok": f.connect_ok.load(Relaxed),
        "connect_failures": f.connect_failures.load(Relaxed),
        "disconnects": f.disconnects.load(Relaxed),
        "errors": f.errors(),
        "broadcasts": broadcasts,
    })
}

/// Replaces `path` with `v` (written beside it, then renamed: a reader
/// never sees half a file).
fn write_status(path: &Path, v: &Value) {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string(v).expect("serializable");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

pub async fn hold(ctx: &Arc<Ctx>, report: &mut Value) {
    let f = &ctx.fleet;
    let _ = f.bcast.set(Bcast {
        base: BCAST_BASE,
        slots: (0..BCAST_SLOTS).map(|_| BcastSlot::new(u32::MAX)).collect(),
        done: tokio::sync::Notify::new(),
    });
    let connect = report["connect"].clone();
    set_phase(ctx, "hold");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let until = Instant::now() + ctx.args.hold;
    let mut tick = tokio::time::interval(STATUS_EVERY);
    let why = loop {
        if let Some(p) = &ctx.args.status {
            write_status(p, &status(ctx, &connect, "holding"));
        }
        if Instant::now() >= until {
            break "hold elapsed";
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = async { term.as_mut().expect("checked").recv().await }, if term.is_some() => {
                break "SIGTERM";
            }
        }
    };
    let last = status(ctx, &connect, "done");
    if let Some(p) = &ctx.args.status {
        write_status(p, &last);
    }
    if !ctx.args.quiet {
        eprintln!(
            "  hold: stopped ({why}); {} of {} connected",
            last["connected"],
            f.slots.len()
        );
    }
    report["hold"] = last;
    report["stopped_by"] = json!(why);
}
