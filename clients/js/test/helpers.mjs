// Test harness: real Herald nodes (and Redis) as child processes, tokens,
// and a gRPC client for the control API. Shared by the unit tests and the
// browser end-to-end test. Every process started here is stopped by
// stopAll() and, as a last resort, when the test process exits.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

export const JS_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const PROTO = path.resolve(JS_DIR, '../../proto/herald/v1/push.proto');
export const HERALD_BIN = process.env.HERALD_BIN
  ? path.resolve(process.env.HERALD_BIN)
  : path.resolve(JS_DIR, '../../target/release/herald');
export const SECRET = 'herald-js-test-secret';

const children = new Set();

process.on('exit', () => {
  for (const c of children) {
    try {
      c.kill('SIGKILL');
    } catch {
      // gone already
    }
  }
});

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** A TCP port on 127.0.0.1 that nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Polls `fn` until it returns a truthy value; returns that value. */
export async function waitFor(fn, { timeout = 10_000, interval = 25, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await sleep(interval);
  }
}

function b64url(buf) {
  return Buffer.from(buf).toString('base64url');
}

/** An HS256 JWT for `user`, valid for `ttlSeconds` (negative: already expired). */
export function mintToken(user, { secret = SECRET, ttlSeconds = 3600 } = {}) {
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const claims = b64url(JSON.stringify({ sub: user, exp: Math.floor(Date.now() / 1000) + ttlSeconds }));
  const sig = b64url(createHmac('sha256', secret).update(`${header}.${claims}`).digest());
  return `${header}.${claims}.${sig}`;
}

function spawnTracked(cmd, args, name) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  child.logs = '';
  const keep = (d) => {
    child.logs += d.toString();
    if (child.logs.length > 200_000) child.logs = child.logs.slice(-100_000);
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  child.exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    });
  });
  child.on('error', (e) => {
    child.logs += `\n[${name}: ${e.message}]`;
  });
  return child;
}

async function stopChild(child, signal = 'SIGTERM', graceMs = 12_000) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  const t = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await child.exited;
  clearTimeout(t);
}

/** Stops every process this harness started. */
export async function stopAll() {
  await Promise.all([...children].map((c) => stopChild(c, 'SIGKILL')));
}

/** A throwaway redis-server on 127.0.0.1 (no persistence). */
export async function startRedis() {
  const port = await freePort();
  const bin = process.env.REDIS_SERVER || '/usr/bin/redis-server';
  const proc = spawnTracked(bin, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], 'redis-server');
  await waitFor(() => proc.logs.includes('Ready to accept connections') || proc.exitCode !== null, { timeout: 10_000, what: 'redis-server to start' });
  if (proc.exitCode !== null) throw new Error(`redis-server exited:\n${proc.logs}`);
  return {
    port,
    url: `redis://127.0.0.1:${port}/0`,
    proc,
    stop: () => stopChild(proc, 'SIGTERM', 5000),
  };
}

/**
 * A Herald node. `ports` pins the listeners (to restart a node in place);
 * `redisUrl` joins a Redis cluster; `args` adds flags.
 */
export async function startNode({ nodeId = 'n1', ports, redisUrl, args = [], secret = SECRET } = {}) {
  if (!existsSync(HERALD_BIN)) throw new Error(`no herald binary at ${HERALD_BIN}: build it (cargo build --release) or set HERALD_BIN`);
  ports = ports || { ws: await freePort(), grpc: await freePort(), admin: await freePort() };
  const argv = [
    'serve',
    '--ws-listen', `127.0.0.1:${ports.ws}`,
    '--grpc-listen', `127.0.0.1:${ports.grpc}`,
    '--admin-listen', `127.0.0.1:${ports.admin}`,
    '--jwt-secret', secret,
    '--node-id', nodeId,
    ...(redisUrl ? ['--redis-url', redisUrl] : []),
    ...args,
  ];
  // A port freed a moment ago can take a little while to bind again.
  let proc;
  for (let tries = 0; ; tries++) {
    proc = spawnTracked(HERALD_BIN, argv, `herald ${nodeId}`);
    await waitFor(() => proc.logs.includes('herald ready') || proc.exitCode !== null, { timeout: 20_000, what: `herald ${nodeId} to start` });
    if (proc.exitCode === null) break;
    await proc.exited;
    if (tries >= 20 || !/address already in use/i.test(proc.logs)) throw new Error(`herald ${nodeId} exited (${proc.exitCode}):\n${proc.logs}`);
    await sleep(250);
  }
  const node = {
    nodeId,
    ports,
    proc,
    wsUrl: `ws://127.0.0.1:${ports.ws}/ws`,
    httpUrl: `http://127.0.0.1:${ports.ws}`,
    grpcAddr: `127.0.0.1:${ports.grpc}`,
    get logs() {
      return proc.logs;
    },
    /** Graceful stop (SIGTERM: connections get 1001), or a kill. */
    stop: (signal = 'SIGTERM') => stopChild(proc, signal),
  };
  return node;
}

let pkgDef;
function pushService() {
  if (!pkgDef) {
    const def = protoLoader.loadSync(PROTO, { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true });
    pkgDef = grpc.loadPackageDefinition(def).herald.v1.PushService;
  }
  return pkgDef;
}

/** A promise-based PushService client: `await api.sendToUser({...})`. */
export function grpcClient(addr) {
  const Service = pushService();
  const raw = new Service(addr, grpc.credentials.createInsecure());
  const api = { raw, close: () => raw.close() };
  for (const m of ['SendToUser', 'Broadcast', 'IsOnline', 'UnreadCount', 'MarkRead', 'DisconnectUser', 'Stats', 'ListMessages', 'MarkUnread', 'DeleteMessages']) {
    const name = m[0].toLowerCase() + m.slice(1);
    api[name] = (req = {}) =>
      new Promise((resolve, reject) => {
        raw[m](req, { deadline: Date.now() + 10_000 }, (err, res) => (err ? reject(err) : resolve(res)));
      });
  }
  /** Sends one stored message to `user`; returns its id. */
  api.send = async (user, data, { topic = 'test', transient = false } = {}) => {
    const res = await api.sendToUser({ userIds: [user], topic, payloadJson: JSON.stringify(data), transient });
    return res.deliveries[0].messageId;
  };
  return api;
}

/** Resolves with the detail of the next `type` event of `client` that satisfies `pred`. */
export function nextEvent(client, type, pred = () => true, timeout = 10_000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      off();
      reject(new Error(`timed out after ${timeout} ms waiting for a "${type}" event`));
    }, timeout);
    const off = client.on(type, (d) => {
      if (!pred(d)) return;
      clearTimeout(t);
      off();
      resolve(d);
    });
  });
}

/** Records every event of a client, for assertions. */
export function record(client, types = ['open', 'message', 'unread', 'close', 'error', 'state']) {
  const log = { all: [] };
  for (const t of types) {
    log[t] = [];
    client.on(t, (d) => {
      log[t].push(d);
      log.all.push([t, d]);
    });
  }
  return log;
}
