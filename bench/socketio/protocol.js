// The HTTP side of herald-bench's bench protocol (BENCHMARKS.md), shared
// by server.js (sends through the Socket.IO server) and emitter.js (sends
// through @socket.io/redis-emitter):
//
//   GET  /healthz
//   POST /send       {"users":["u1",...],"payload":<JSON>}  -> target().to(users).emit("m", payload)
//   POST /broadcast  {"payload":<JSON>}                     -> target().emit("m", payload)
//
// plus, per server, `routes`: {"POST /path": async (body) => reply object}
// (emitter.js's POST /unicast-step).
"use strict";

const http = require("http");

function reply(res, status, body) {
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

// An HTTP server speaking the protocol. `target` is called per request, so
// the Socket.IO server built on top of this HTTP server can be the target.
function benchServer(target, routes = {}) {
  const server = http.createServer((req, res) => {
    if (req.method === "GET" && req.url === "/healthz") return reply(res, 200, "{\"ok\":true}");
    const route = routes[`${req.method} ${req.url}`];
    if (route) {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        Promise.resolve()
          .then(() => route(JSON.parse(Buffer.concat(chunks).toString("utf8"))))
          .then((out) => reply(res, 200, JSON.stringify(out)))
          .catch((e) => reply(res, 500, JSON.stringify({ error: String(e && e.stack ? e.stack : e) })));
      });
      return;
    }
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
        target().to(body.users).emit("m", body.payload);
      } else {
        target().emit("m", body.payload);
      }
      reply(res, 200, "{}");
    });
  });
  // Keep the bench's pooled HTTP connections open between steps.
  server.keepAliveTimeout = 120000;
  server.headersTimeout = 125000;
  return server;
}

module.exports = { benchServer };
