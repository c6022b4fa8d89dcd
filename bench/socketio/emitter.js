// The backend side of the Socket.IO comparison, as a backend service that
// pushes into a Socket.IO cluster usually does it: @socket.io/redis-emitter
// publishes straight to Redis, and every Socket.IO process (server.js with
// @socket.io/redis-adapter) delivers to its own sockets. No Socket.IO server
// handles the send. This process only turns herald-bench's bench protocol
// into emitter calls; herald-bench does not count its CPU as server CPU, as
// it does not count its own gRPC client for Herald.
//
//   POST /send       {"users":["u1",...],"payload":<JSON>}  -> emitter.to(users).emit("m", payload)
//   POST /broadcast  {"payload":<JSON>}                     -> emitter.emit("m", payload)
//
// Environment: PORT (default 3100), HOST (default 127.0.0.1), REDIS_URL
// (required: the Redis the Socket.IO processes share).
"use strict";

const { benchServer } = require("./protocol");
const Redis = require("ioredis");
const { Emitter } = require("@socket.io/redis-emitter");

const port = Number(process.env.PORT || 3100);
const host = process.env.HOST || "127.0.0.1";
const redisUrl = process.env.REDIS_URL;
if (!redisUrl) {
  console.error("emitter: REDIS_URL is required");
  process.exit(2);
}

async function main() {
  const redis = new Redis(redisUrl, { lazyConnect: true });
  await redis.connect();
  const emitter = new Emitter(redis);
  const server = benchServer(() => emitter);
  server.listen(port, host, 4096, () => {
    console.log(`emitter ready: http=http://${host}:${port} pid=${process.pid} redis=${redisUrl}`);
  });
}

for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(0));
main().catch((e) => {
  console.error("emitter:", e);
  process.exit(1);
});
