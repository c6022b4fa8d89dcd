// The in-process open-loop sender of the Socket.IO comparison: what a Node
// backend pushing into a Socket.IO cluster does, one
// `emitter.to(users).emit("m", payload)` per message, with no HTTP hop or
// other process in between. herald-bench generates Herald's calls the same
// way (bench/src/unicast.rs): a fixed schedule (message k is due at
// start + k / rate), each message stamped with its *intended* send time,
// so a sender that falls behind shows up as latency, never as a slower
// schedule; messages more than 5 s late are given up and counted unsent.
//
// Used by emitter.js (POST /unicast-step, one call per herald-bench step)
// and by alone.js (the sender with no Socket.IO server: its own ceiling).
"use strict";

// herald-bench's clock is its own (ns since it started, on CLOCK_MONOTONIC);
// process.hrtime reads CLOCK_MONOTONIC too, so `bench_ns` and `mono_ns`,
// read by herald-bench at the same moment, translate exactly.
function benchClock(benchNs, monoNs) {
  const offset = benchNs - monoNs;
  return () => Number(process.hrtime.bigint()) + offset;
}

// The bench payload of herald-bench's api::payload: {"seq":N,"t":T,"p":"xx.."},
// `bytes` long as JSON. Socket.IO is given the object, as a backend does.
const pads = new Map();
function payload(seq, t, bytes) {
  const head = `{"seq":${seq},"t":${t},"p":"`.length;
  const n = Math.max(0, bytes - head - 2);
  let p = pads.get(n);
  if (p === undefined) {
    p = "x".repeat(n);
    pads.set(n, p);
  }
  return { seq, t, p };
}

function percentile(sorted, q) {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

// Timers have a 1 ms resolution: a wait of 200 µs or more sleeps at least
// 1 ms (herald-bench's tokio timer does the same), shorter ones only yield.
const sleep = (ms) => new Promise((r) => (ms >= 0.2 ? setTimeout(r, Math.max(1, ms)) : setImmediate(r)));

// Runs one open-loop step and returns what it sent.
//
//   spec.rate            offered deliveries/s (a call to k users counts k)
//   spec.duration_s      length of the schedule
//   spec.users_per_call  distinct recipients per emit (k)
//   spec.payload_bytes   payload size
//   spec.seq_base        the first sequence number (herald-bench reserves them)
//   spec.n_calls         calls of the schedule (herald-bench's rounding)
//   spec.bench_ns, spec.mono_ns   herald-bench's clock and CLOCK_MONOTONIC, read together
//   spec.nodes           per Socket.IO process: [[slot, user id], ...] of its
//                        connected clients; a recipient is a uniformly random
//                        process, then a uniformly random client of it
//                        (herald-bench's ctx::pick without --remote-share)
//
// Returns {start_ns, end_ns, calls, unsent, counts: [[slot, deliveries], ...],
// lag_us: {p50, p99, max}, cpu_us}: lag is how late each emit ran against
// its schedule; cpu_us is this process's user+system CPU during the step.
async function runStep(emitter, redis, spec) {
  const now = benchClock(spec.bench_ns, spec.mono_ns);
  const upc = Math.max(1, spec.users_per_call | 0);
  const nodes = (spec.nodes || []).filter((l) => l.length > 0);
  const nCalls = spec.n_calls;
  const interval = 1e9 / (spec.rate / upc);
  const cpu0 = process.cpuUsage();
  const start = now() + 2e6;
  const deadline = start + spec.duration_s * 1e9 + 5e9;
  const counts = new Map();
  const lags = new Float64Array(nCalls);
  let k = 0;
  let unsent = 0;
  let emitted = 0;
  const users = [];
  const slots = [];
  while (k < nCalls) {
    const t = now();
    if (t > deadline) {
      unsent += nCalls - k;
      break;
    }
    // At most 256 emits per turn of the event loop, so that Redis replies
    // are read in between however far behind the schedule is.
    // Like herald-bench's loop, a message due within 200 µs goes now.
    const due = Math.min(nCalls, Math.floor((t + 2e5 - start) / interval) + 1, k + 256);
    for (; k < due; k++) {
      const intended = Math.round(start + k * interval);
      users.length = 0;
      slots.length = 0;
      for (let j = 0; j < upc && nodes.length > 0; j++) {
        for (let tries = 0; tries < 64; tries++) {
          const list = nodes[Math.floor(Math.random() * nodes.length)];
          const [slot, user] = list[Math.floor(Math.random() * list.length)];
          if (!slots.includes(slot)) {
            slots.push(slot);
            users.push(user);
            break;
          }
        }
      }
      if (users.length === 0) {
        unsent++;
        continue;
      }
      emitter.to(users.length === 1 ? users[0] : users).emit("m", payload(spec.seq_base + k, intended, spec.payload_bytes));
      for (const s of slots) counts.set(s, (counts.get(s) || 0) + 1);
      lags[emitted++] = (now() - intended) / 1e3;
    }
    if (k >= nCalls) break;
    // Until the next message is due (at once when behind); I/O (Redis
    // replies) runs meanwhile.
    await sleep((start + k * interval - now()) / 1e6);
  }
  const end = now();
  // Redis answers in order: once PING is answered, so is every PUBLISH.
  await redis.ping();
  const cpu = process.cpuUsage(cpu0);
  const sorted = lags.subarray(0, emitted).sort();
  return {
    start_ns: Math.round(start),
    end_ns: Math.round(end),
    calls: emitted,
    unsent,
    counts: [...counts.entries()],
    lag_us: { p50: percentile(sorted, 0.5), p99: percentile(sorted, 0.99), max: sorted.length ? sorted[sorted.length - 1] : 0 },
    cpu_us: cpu.user + cpu.system,
  };
}

// ioredis's auto-pipelining (commands issued in one turn of the event loop
// go out in one write) is on unless SIO_AUTO_PIPELINING=0: the emitter's
// best showing, which a backend sending many messages would choose.
function autoPipelining() {
  return process.env.SIO_AUTO_PIPELINING !== "0";
}

module.exports = { runStep, payload, benchClock, autoPipelining };
