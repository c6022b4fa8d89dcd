// Socket.IO 4 comparison server for `herald-bench --target socketio`.
//
// Several of these processes share one Redis through @socket.io/redis-adapter,
// the usual way to run Socket.IO on more than one process. Each client joins
// a room named after its user id; the bench protocol's HTTP endpoints emit to
// rooms:
//
//   WebSocket  /socket.io/?EIO=4&transport=websocket&user=<id>
//              (first event after connect: "welcome"; messages: event "m")
//   POST /send       {"users":["u1",...],"payload":<JSON>}  -> io.to(users).emit("m", payload)
//   POST /broadcast  {"payload":<JSON>}                     -> io.emit("m", payload)
//
// Environment: PORT (default 3000), HOST (default 127.0.0.1), REDIS_URL
// (redis://127.0.0.1:6379/0; empty: in-memory adapter, one process only).
"use strict";

const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || "127.0.0.1";
const redisUrl = process.env.REDIS_URL || "";

function reply(res, status, body) {
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

const httpServer = http.createServer((req, res) => {
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
      io.to(body.users).emit("m", body.payload);
    } else {
      io.emit("m", body.payload);
    }
    reply(res, 200, "{}");
  });
});
// Keep the bench's pooled HTTP connections open between steps.
httpServer.keepAliveTimeout = 120000;
httpServer.headersTimeout = 125000;

const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
  httpCompression: false,
  pingInterval: 25000,
  pingTimeout: 20000,
  maxHttpBufferSize: 1e5,
});

io.on("connection", (socket) => {
  const user = socket.handshake.query.user;
  if (typeof user !== "string" || user === "") {
    socket.disconnect(true);
    return;
  }
  socket.join(user);
  socket.emit("welcome", { user });
});

async function main() {
  if (redisUrl) {
    const Redis = require("ioredis");
    const { createAdapter } = require("@socket.io/redis-adapter");
    const pub = new Redis(redisUrl, { lazyConnect: true });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
  }
  httpServer.listen(port, host, 4096, () => {
    console.log(`socketio ready: ws=ws://${host}:${port}/socket.io/ http=http://${host}:${port} pid=${process.pid}` +
      (redisUrl ? ` redis=${redisUrl}` : " (in-memory adapter)"));
  });
}

for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(0));
main().catch((e) => {
  console.error("socketio server:", e);
  process.exit(1);
});
