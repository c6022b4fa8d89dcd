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

const { benchServer } = require("./protocol");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || "127.0.0.1";
const redisUrl = process.env.REDIS_URL || "";

const httpServer = benchServer(() => io);

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
