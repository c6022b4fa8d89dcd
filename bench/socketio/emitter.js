// The backend side of the Socket.IO comparison, as a backend service that
// pushes into a Socket.IO cluster does it: @socket.io/redis-emitter
// publishes straight to Redis, and every Socket.IO process (server.js with
// @socket.io/redis-adapter) delivers to its own sockets. No Socket.IO server
// handles the send. herald-bench does not count this process's CPU as
// server CPU, as it does not count its own gRPC client for Herald (it
// reports it as the sender's).
//
//   POST /unicast-step  one whole fixed-rate unicast step, run here
//                       (sender.js): the open-loop schedule, one
//                       emitter.to(users).emit("m", payload) per message,
//                       in this process; the reply says what was sent.
//                       herald-bench --remote-sender drives unicast this way.
//   POST /send       {"users":["u1",...],"payload":<JSON>}  -> emitter.to(users).emit("m", payload)
//   POST /broadcast  {"payload":<JSON>}                     -> emitter.emit("m", payload)
//                    (one HTTP call per message: used for broadcasts, where
//                    one call fans out to every connection)
//
// Environment: PORT (default 3100), HOST (default 127.0.0.1), REDIS_URL
// (required: the Redis the Socket.IO processes share), SIO_AUTO_PIPELINING
// (default 1; 0: one write per PUBLISH, see sender.js).
"use strict";

const { benchServer } = require("./protocol");
const Redis = require("ioredis");
const { Emitter } = require("@socket.io/redis-emitter");
const { runStep, autoPipelining } = require("./sender");

const port = Number(process.env.PORT || 3100);
const host = process.env.HOST || "127.0.0.1";
const redisUrl = process.env.REDIS_URL;
if (!redisUrl) {
  console.error("emitter: REDIS_URL is required");
  process.exit(2);
}

async function main() {
  const redis = new Redis(redisUrl, { lazyConnect: true, enableAutoPipelining: autoPipelining() });
  await redis.connect();
  const emitter = new Emitter(redis);
  // One step at a time: two interleaved schedules would each be late.
  let busy = false;
  const server = benchServer(() => emitter, {
    "POST /unicast-step": async (spec) => {
      if (busy) throw new Error("a step is already running");
      busy = true;
      try {
        return await runStep(emitter, redis, spec);
      } finally {
        busy = false;
      }
    },
  });
  server.listen(port, host, 4096, () => {
    console.log(`emitter ready: http=http://${host}:${port} pid=${process.pid} redis=${redisUrl}`);
  });
}

for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(0));
main().catch((e) => {
  console.error("emitter:", e);
  process.exit(1);
});
