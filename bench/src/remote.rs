//! A fixed-rate unicast step run by an external sender in its own process
//! (`--remote-sender`): bench/socketio/emitter.js runs the open-loop
//! schedule itself and calls `@socket.io/redis-emitter` in-process, one
//! emit per message, as a Node backend does; no HTTP request per message.
//!
//! herald-bench sends one `POST /unicast-step` per step with what the
//! schedule needs (rate, duration, the sequence numbers it reserved, the
//! connected clients per node, its clock) and books what the reply says was
//! sent: per client slot, how many messages; calls made and given up. The
//! receiving side (loss, duplicates, latency from each payload's `t`) is
//! the same as for every other target.

use crate::ctx::Ctx;
use crate::fleet::Fleet;
use crate::stats::{monotonic_ns, now_ns, StepCounters};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::Ordering::Relaxed;

/// What the sender reports for one step.
#[derive(Deserialize)]
struct Reply {
    start_ns: u64,
    calls: u64,
    unsent: u64,
    /// `[slot, messages sent to that slot's user]`.
    counts: Vec<(usize, u64)>,
    /// The sender's own CPU (user + system) during the step.
    cpu_us: f64,
}

/// What herald-bench keeps of a remote step.
pub struct Outcome {
    pub start_ns: u64,
    pub unsent: u64,
    pub sender_cpu_us: u64,
}

/// The connected clients of each node, as `[slot, user id]`.
fn connected(f: &Fleet) -> Vec<Vec<(usize, String)>> {
    f.by_node
        .iter()
        .map(|list| {
            list.iter()
                .filter(|&&i| f.is_connected(i))
                .map(|&i| (i, f.user(i)))
                .collect()
        })
        .collect()
}

/// Runs one step of `n_calls` calls at `rate` deliveries/s in the sender,
/// with sequence numbers from `base`, and books its outcome into `c` and
/// the fleet's per-slot expectations. A failed step is one call error.
pub async fn step(ctx: &Ctx, c: &StepCounters, rate: f64, n_calls: u64, base: u64) -> Outcome {
    let a = &ctx.args;
    let spec = json!({
        "rate": rate,
        "duration_s": a.duration.as_secs_f64(),
        "users_per_call": a.users_per_call,
        "payload_bytes": a.payload_bytes,
        "seq_base": base,
        "n_calls": n_calls,
        "bench_ns": now_ns(),
        "mono_ns": monotonic_ns(),
        "nodes": connected(&ctx.fleet),
    });
    let api = ctx.api.as_ref().expect("api");
    let started = now_ns();
    let reply = match api.post_json(0, "/unicast-step", spec.to_string()).await {
        Ok(body) => serde_json::from_slice::<Reply>(&body)
            .map_err(|e| format!("/unicast-step: unreadable reply: {e}")),
        Err(e) => Err(e),
    };
    match reply {
        Ok(r) => {
            let mut expected = 0;
            for (slot, n) in r.counts {
                if let Some(s) = ctx.fleet.slots.get(slot) {
                    s.expected.fetch_add(n, Relaxed);
                    expected += n;
                }
            }
            c.expected.fetch_add(expected, Relaxed);
            c.calls.fetch_add(r.calls, Relaxed);
            ctx.progress.calls.fetch_add(r.calls, Relaxed);
            Outcome {
                start_ns: r.start_ns,
                unsent: r.unsent,
                sender_cpu_us: r.cpu_us.max(0.0) as u64,
            }
        }
        Err(e) => {
            c.errors.fetch_add(1, Relaxed);
            ctx.fleet.note_error(e);
            Outcome {
                start_ns: started,
                unsent: n_calls,
                sender_cpu_us: 0,
            }
        }
    }
}
