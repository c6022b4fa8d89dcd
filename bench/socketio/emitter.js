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

const http = require("http");
const Redis = require("ioredis");
const { Emitter } = require("@socket.io/redis-emitter");

const port = Number(process.env.PORT || 3100);
const host = process.env.HOST || "127.0.0.1";
const redisUrl = process.env.REDIS_URL;
if (!redisUrl) {
  console.error("emitter: REDIS_URL is required");
  process.exit(2);
}

function reply(res, status, body) {
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

async function main() {
  const redis = new Redis(redisUrl, { lazyConnect: true });
  await redis.connect();
  const emitter = new Emitter(redis);
  const server = http.createServer((req, res) => {
    if (req.method === "GET" && req.url === "/healthz") return reply(res, 200, "{\"ok\":true}");
    if (req.method !== "POST" || (req.url !== "/send" && req.url !== "/broadcast")) {
      return reply(res, 404, "{\"error\":\"not found\"}");
    }
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
      } catch (e) {
        return reply(res, 400, JSON.stringify({ error: String(e) }));
      }
      if (req.url === "/send") {
        if (!Array.isArray(body.users) || body.users.length === 0) {
          return reply(res, 400, "{\"error\":\"users must be a non-empty array\"}");
        }
        emitter.to(body.users).emit("m", body.payload);
      } else {
        emitter.emit("m", body.payload);
      }
      reply(res, 200, "{}");
    });
  });
  server.keepAliveTimeout = 120000;
  server.headersTimeout = 125000;
  server.listen(port, host, 4096, () => {
    console.log(`emitter ready: http=http://${host}:${port} pid=${process.pid} redis=${redisUrl}`);
  });
}

for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(0));
main().catch((e) => {
  console.error("emitter:", e);
  process.exit(1);
});
