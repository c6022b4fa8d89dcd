// The Socket.IO sender alone: sender.js's open-loop schedule emitting into
// Redis with no Socket.IO server and no client, to show that the sender
// used for the comparison is not what limits Socket.IO's figures.
//
//   REDIS_URL=redis://127.0.0.1:6379/0 node alone.js \
//     --rates 10000,30000,max --duration 4 [--users 10000] [--users-per-call 1] \
//     [--payload-bytes 100] [--redis-pid PID] [--label NAME] [--out FILE]
//
// Each rate runs one step (`max`: emits back to back, 256 per turn of the
// event loop, for the duration: the sender's ceiling). Prints one line per
// step and writes a JSON summary ({"label", "sender_alone": [step, ...]})
// to --out. Redis CPU is read from /proc/<pid>/stat when --redis-pid is
// given (clock ticks: 10 ms resolution).
"use strict";

const fs = require("fs");
const os = require("os");
const Redis = require("ioredis");
const { Emitter } = require("@socket.io/redis-emitter");
const { runStep, payload, autoPipelining } = require("./sender");

function args(argv) {
  const a = { rates: ["10000"], duration: 4, users: 10000, upc: 1, bytes: 100, redisPid: 0, label: "sender-alone-socketio", out: "" };
  for (let i = 2; i < argv.length; i++) {
    const v = argv[i + 1];
    switch (argv[i]) {
      case "--rates": a.rates = v.split(",").filter(Boolean); i++; break;
      case "--duration": a.duration = Number(v); i++; break;
      case "--users": a.users = Number(v); i++; break;
      case "--users-per-call": a.upc = Number(v); i++; break;
      case "--payload-bytes": a.bytes = Number(v); i++; break;
      case "--redis-pid": a.redisPid = Number(v); i++; break;
      case "--label": a.label = v; i++; break;
      case "--out": a.out = v; i++; break;
      default: throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  if (!(a.duration > 0) || !(a.users > 0) || !(a.upc >= 1)) throw new Error("--duration, --users and --users-per-call must be positive");
  for (const r of a.rates) if (r !== "max" && !(Number(r) > 0)) throw new Error(`--rates: ${r} is neither a rate nor max`);
  return a;
}

// utime+stime of a process in µs (0 when unreadable).
function procCpuUs(pid) {
  if (!pid) return 0;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return ((Number(f[11]) + Number(f[12])) * 1e6) / 100; // USER_HZ is 100 on Linux
  } catch {
    return 0;
  }
}

// Closed loop: as many emits as the process can make in `duration_s`.
async function maxStep(emitter, redis, users, a) {
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const stop = t0 + BigInt(Math.round(a.duration * 1e9));
  let n = 0;
  while (process.hrtime.bigint() < stop) {
    for (let j = 0; j < 256; j++, n++) {
      const to = a.upc === 1 ? users[n % users.length] : Array.from({ length: a.upc }, (_, i) => users[(n * a.upc + i) % users.length]);
      emitter.to(to).emit("m", payload(n, Number(process.hrtime.bigint()), a.bytes));
    }
    await new Promise((r) => setImmediate(r));
  }
  await redis.ping();
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  return { calls: n, unsent: 0, secs, cpu_us: cpu.user + cpu.system, lag_us: null };
}

async function main() {
  const a = args(process.argv);
  const url = process.env.REDIS_URL;
  if (!url) throw new Error("REDIS_URL is required");
  const redis = new Redis(url, { lazyConnect: true, enableAutoPipelining: autoPipelining() });
  await redis.connect();
  const emitter = new Emitter(redis);
  const users = Array.from({ length: a.users }, (_, i) => `alone-${i}`);
  // Two halves, as two Socket.IO processes' clients.
  const half = Math.ceil(a.users / 2);
  const nodes = [users.slice(0, half), users.slice(half)].map((l, n) => l.map((u, i) => [n * half + i, u]));
  // Warm-up (not reported): the first step would otherwise pay for the JIT.
  const warm = Number(process.hrtime.bigint());
  await runStep(emitter, redis, { rate: 2000, duration_s: 0.5, users_per_call: 1, payload_bytes: a.bytes, seq_base: 0, n_calls: 1000, bench_ns: warm, mono_ns: warm, nodes });
  const steps = [];
  let seq = 1;
  for (const r of a.rates) {
    const redis0 = procCpuUs(a.redisPid);
    let s;
    if (r === "max") {
      s = await maxStep(emitter, redis, users, a);
    } else {
      const rate = Number(r);
      const nCalls = Math.max(1, Math.round((rate / a.upc) * a.duration));
      const mono = Number(process.hrtime.bigint());
      const out = await runStep(emitter, redis, {
        rate, duration_s: a.duration, users_per_call: a.upc, payload_bytes: a.bytes,
        seq_base: seq, n_calls: nCalls, bench_ns: mono, mono_ns: mono, nodes,
      });
      seq += nCalls;
      s = { calls: out.calls, unsent: out.unsent, secs: (out.end_ns - out.start_ns) / 1e9, cpu_us: out.cpu_us, lag_us: out.lag_us };
    }
    const redisUs = procCpuUs(a.redisPid) - redis0;
    const step = {
      offered_per_s: r === "max" ? null : Number(r),
      duration_s: a.duration,
      users_per_call: a.upc,
      calls: s.calls,
      unsent: s.unsent,
      emitted_per_s: s.secs > 0 ? (s.calls * a.upc) / s.secs : 0,
      lag_us: s.lag_us,
      sender_cpu_us_per_call: s.calls ? s.cpu_us / s.calls : null,
      redis_cpu_us_per_call: a.redisPid && s.calls ? redisUs / s.calls : null,
    };
    steps.push(step);
    console.log(
      `  ${r === "max" ? "max" : `${r}/s`}: ${step.calls} emits, ${step.emitted_per_s.toFixed(0)} deliveries/s emitted, unsent ${step.unsent}` +
        (s.lag_us ? `, late p50 ${(s.lag_us.p50 / 1000).toFixed(2)} ms p99 ${(s.lag_us.p99 / 1000).toFixed(2)} ms max ${(s.lag_us.max / 1000).toFixed(1)} ms` : "") +
        `, sender ${step.sender_cpu_us_per_call ? step.sender_cpu_us_per_call.toFixed(1) : "?"} CPU-µs/emit` +
        (step.redis_cpu_us_per_call != null ? `, redis ${step.redis_cpu_us_per_call.toFixed(1)} CPU-µs/emit` : ""),
    );
  }
  const report = { label: a.label, scenario: "sender-alone", target: "socketio", host_cpus: os.cpus().length, sender_alone: steps, ok: steps.every((s) => s.unsent === 0), problems: steps.filter((s) => s.unsent > 0).map((s) => `${s.offered_per_s}/s: ${s.unsent} unsent`) };
  if (a.out) fs.writeFileSync(a.out, JSON.stringify(report, null, 1) + "\n");
  redis.disconnect();
}

main().catch((e) => {
  console.error("alone:", e);
  process.exit(1);
});
