// Unit tests of herald.js against real Herald nodes (embedded backend, or
// Redis with HERALD_TEST_BACKEND=redis): no mocks. Messages are pushed
// through the node's gRPC API.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import grpc from '@grpc/grpc-js';
import { WebSocket } from 'ws';
import { compareIds, connect, isStoredId } from '../herald.js';
import { grpcClient, mintToken, nextEvent, record, sleep, startNode, startRedis, stopAll, waitFor } from './helpers.mjs';

// HERALD_TEST_BACKEND=redis runs the same tests on Redis-backed nodes.
const REDIS = process.env.HERALD_TEST_BACKEND === 'redis';
let redisUrl;
let node;
let api;
const clients = [];

/** A node on this run's backend. */
async function newNode(opts) {
  return startNode({ ...opts, redisUrl });
}

/** A client of `node` for `user` with test-friendly timings. */
function open(user, opts = {}, target = node) {
  const c = connect({
    url: target.wsUrl,
    token: mintToken(user),
    WebSocket,
    backoffInitial: 200,
    backoffMax: 1000,
    ...opts,
  });
  clients.push(c);
  return c;
}

async function online(user, a = api) {
  const res = await a.isOnline({ userIds: [user] });
  return res.users[0].connections;
}

before(async () => {
  if (REDIS) redisUrl = (await startRedis()).url;
  node = await newNode({ nodeId: 'unit' });
  api = grpcClient(node.grpcAddr);
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  api?.close();
  await stopAll();
});

describe('ids', () => {
  test('compareIds orders by (ms, seq) numerically, not as strings', () => {
    assert.ok(compareIds('1732390000000-10', '1732390000000-9') > 0);
    assert.ok(compareIds('999-5', '1000-0') < 0);
    assert.equal(compareIds('1732390000000-3', '1732390000000-3'), 0);
    assert.ok(compareIds('18446744073709551615-0', '18446744073709551614-99') > 0);
    assert.throws(() => compareIds('t1732390000000-1', '1-0'), TypeError);
    assert.equal(isStoredId('1732390000000-0'), true);
    assert.equal(isStoredId('t1732390000000-0'), false);
  });
});

describe('delivery', () => {
  test('a SendToUser reaches the client byte for byte, with id, topic and ts', async () => {
    const c = open('alice');
    const log = record(c);
    const welcome = await nextEvent(c, 'open');
    assert.equal(welcome.user, 'alice');
    assert.equal(welcome.unread, 0);
    assert.equal(welcome.reconnect, false);
    assert.equal(welcome.resumed, null);
    assert.equal(c.state, 'open');

    const payload = { title: 'Invoice #42 paid', body: 'Thanks! €12.50', tags: ['a', 1, null], nested: { x: true } };
    const got = nextEvent(c, 'message');
    const res = await api.sendToUser({ userIds: ['alice'], topic: 'billing.invoice', payloadJson: JSON.stringify(payload) });
    assert.equal(res.deliveries[0].online, true);
    const m = await got;
    assert.equal(m.id, res.deliveries[0].messageId);
    assert.ok(isStoredId(m.id));
    assert.equal(m.topic, 'billing.invoice');
    assert.deepEqual(m.data, payload);
    assert.equal(typeof m.ts, 'number');
    assert.ok(Math.abs(m.ts - Date.now()) < 60_000);
    assert.equal(m.transient, false);
    assert.equal(m.replayed, false);
    assert.equal(c.lastId, m.id);

    // Any JSON value, not only objects.
    for (const value of ['plain string', 42, null, [1, 2, 3], false]) {
      const next = nextEvent(c, 'message');
      await api.send('alice', value, { topic: 'misc' });
      assert.deepEqual((await next).data, value);
    }
    // welcome (0), then +1 per new live message.
    assert.deepEqual(log.unread.map((u) => [u.count, u.source]), [
      [0, 'welcome'], [1, 'local'], [2, 'local'], [3, 'local'], [4, 'local'], [5, 'local'], [6, 'local'],
    ]);
    assert.equal(c.unread, 6);
    assert.deepEqual(log.error, []);
  });

  test('stored unread messages are replayed on connect, oldest first, and counted once', async () => {
    const ids = [];
    for (let i = 0; i < 3; i++) ids.push(await api.send('bob', { n: i }));
    const c = open('bob');
    const log = record(c);
    const welcome = await nextEvent(c, 'open');
    assert.equal(welcome.unread, 3);
    await waitFor(() => log.message.length === 3, { what: '3 replayed messages' });
    assert.deepEqual(log.message.map((m) => m.id), ids);
    assert.ok(log.message.every((m) => m.replayed));
    const live = nextEvent(c, 'message');
    const id4 = await api.send('bob', { n: 3 });
    const m = await live;
    assert.equal(m.id, id4);
    assert.equal(m.replayed, false);
    assert.deepEqual(log.unread.map((u) => u.count), [3, 4]);
  });

  test('live-only messages (transient, broadcast) are delivered but never counted or used to resume', async () => {
    const c = open('tina');
    const log = record(c);
    await nextEvent(c, 'open');
    const stored = await api.send('tina', { kind: 'stored' });
    await waitFor(() => log.message.length === 1);
    const t = nextEvent(c, 'message');
    const tid = await api.send('tina', { typing: true }, { topic: 'chat.typing', transient: true });
    const tm = await t;
    assert.ok(tid.startsWith('t'));
    assert.equal(tm.id, tid);
    assert.equal(tm.transient, true);
    assert.deepEqual(tm.data, { typing: true });
    const b = nextEvent(c, 'message', (m) => m.topic === 'system');
    const bres = await api.broadcast({ topic: 'system', payloadJson: '{"maintenance":"tonight"}' });
    const bm = await b;
    assert.equal(bm.id, bres.messageId);
    assert.equal(bm.transient, true);
    assert.equal(c.lastId, stored, 'the resume position ignores live-only ids');
    assert.equal(c.unread, 1, 'live-only messages are not unread');
    assert.throws(() => c.markRead(tid), TypeError);
  });
});

describe('idempotency keys (gRPC retry contract)', () => {
  test('a SendToUser repeated with the same key is replayed with the same id, and the client gets the message once', async () => {
    const c = open('ida');
    const log = record(c);
    await nextEvent(c, 'open');
    // A raw socket as well: herald.js drops a stored id it has already seen,
    // so "once" is also checked on the wire.
    const raw = new WebSocket(`${node.wsUrl}?token=${mintToken('ida')}`);
    const frames = [];
    raw.on('message', (d) => frames.push(JSON.parse(d.toString())));
    try {
      await waitFor(() => frames.some((f) => f.type === 'welcome'), { what: 'the raw socket\'s welcome' });
      await waitFor(async () => (await online('ida')) === 2, { what: 'both sockets online' });

      const key = `invoice-INV-42-paid-${Date.now()}`;
      const req = { userIds: ['ida'], topic: 'billing.invoice', payloadJson: '{"invoice":"INV-42","amount":1999}', idempotencyKey: key };
      const first = (await api.sendToUser(req)).deliveries[0];
      assert.equal(first.replayed, false, 'the first send with a fresh key is not a replay');
      assert.equal(first.online, true);
      // The retry after a lost answer: same request, same key.
      const again = (await api.sendToUser(req)).deliveries;
      assert.equal(again.length, 1);
      assert.equal(again[0].userId, 'ida');
      assert.equal(again[0].replayed, true, 'the repeat with the same key is replayed');
      assert.equal(again[0].messageId, first.messageId, 'the repeat returns the first call\'s message id');
      assert.equal(again[0].online, first.online);

      // A marker sent after the repeat: up to it, each socket saw the keyed
      // message once, and the inbox holds it once.
      const marker = await api.send('ida', { marker: 1 }, { topic: 'marker' });
      await waitFor(() => log.message.some((m) => m.id === marker), { what: 'the marker at the client' });
      await waitFor(() => frames.some((f) => f.id === marker), { what: 'the marker on the raw socket' });
      assert.deepEqual(log.message.map((m) => m.id), [first.messageId, marker]);
      assert.deepEqual(log.message[0].data, { invoice: 'INV-42', amount: 1999 });
      assert.deepEqual(frames.filter((f) => f.type === 'message').map((f) => f.id), [first.messageId, marker]);
      assert.equal((await api.unreadCount({ userId: 'ida' })).count, 2);
      assert.equal(c.unread, 2);

      // The same key with another request is a caller bug.
      await assert.rejects(api.sendToUser({ ...req, payloadJson: '{"invoice":"INV-43"}' }), (e) => e.code === grpc.status.INVALID_ARGUMENT);
      await sleep(200);
      assert.deepEqual(log.message.map((m) => m.id), [first.messageId, marker], 'nothing else arrived');
      assert.equal(frames.filter((f) => f.type === 'message').length, 2, 'nothing else on the wire');
      assert.deepEqual(log.error, []);
    } finally {
      raw.close();
    }
  });
});

describe('unread', () => {
  test('markRead(id) marks it and older read on every connection of the user', async () => {
    const a = open('carol');
    const b = open('carol');
    await Promise.all([nextEvent(a, 'open'), nextEvent(b, 'open')]);
    const ids = [];
    for (let i = 0; i < 3; i++) ids.push(await api.send('carol', { n: i }));
    await waitFor(() => a.lastId === ids[2] && b.lastId === ids[2], { what: 'both clients to see 3 messages' });
    assert.equal(a.unread, 3);
    assert.equal(b.unread, 3);

    const ua = nextEvent(a, 'unread', (u) => u.source === 'server');
    const ub = nextEvent(b, 'unread', (u) => u.source === 'server');
    a.markRead(ids[1]);
    assert.equal((await ua).count, 1);
    assert.equal((await ub).count, 1);
    assert.equal((await api.unreadCount({ userId: 'carol' })).count, 1);

    // The MarkRead RPC (another device, or the backend) reaches both too.
    const ua2 = nextEvent(a, 'unread', (u) => u.source === 'server' && u.count === 0);
    const ub2 = nextEvent(b, 'unread', (u) => u.source === 'server' && u.count === 0);
    await api.markRead({ userId: 'carol', upToMessageId: '' });
    await Promise.all([ua2, ub2]);

    // markRead() with no id: the newest message seen.
    const id4 = await api.send('carol', { n: 4 });
    await waitFor(() => a.lastId === id4 && a.unread === 1);
    const ua3 = nextEvent(a, 'unread', (u) => u.source === 'server');
    a.markRead();
    assert.equal((await ua3).count, 0);
  });

  test('markRead while not connected yet is sent once the connection is up', async () => {
    const ids = [await api.send('dave', { n: 1 }), await api.send('dave', { n: 2 })];
    const c = open('dave');
    c.markRead(ids[1]); // before the socket even exists
    const log = record(c);
    const welcome = await nextEvent(c, 'open');
    assert.equal(welcome.unread, 2);
    await waitFor(() => log.unread.some((u) => u.source === 'server' && u.count === 0), { what: 'unread 0 from the server' });
    assert.equal((await api.unreadCount({ userId: 'dave' })).count, 0);
  });

  test('since "0-0" replays read and unread stored messages', async () => {
    const ids = [await api.send('hist', { n: 1 }), await api.send('hist', { n: 2 }), await api.send('hist', { n: 3 })];
    await api.markRead({ userId: 'hist', upToMessageId: ids[1] });
    const c = open('hist', { since: '0-0' });
    const log = record(c);
    const welcome = await nextEvent(c, 'open');
    assert.equal(welcome.unread, 1);
    await waitFor(() => log.message.length === 3);
    assert.deepEqual(log.message.map((m) => m.id), ids);
    assert.equal(c.unread, 1, 'replayed messages do not add to the count');
  });
});

describe('reconnect', () => {
  test('resumes with since after a dropped socket: nothing lost, nothing twice, in order', async () => {
    // getToken holds the reconnect back until the test has pushed while the
    // client was away.
    let release = () => {};
    let gate = Promise.resolve();
    const c = open('eve', {
      token: undefined,
      getToken: async () => {
        await gate;
        return mintToken('eve');
      },
    });
    const log = record(c);
    await nextEvent(c, 'open');
    const sent = [];
    for (let i = 0; i < 3; i++) sent.push(await api.send('eve', { n: i }));
    await waitFor(() => log.message.length === 3);

    // Cut the link under the client (no close frame), then push while it
    // is away.
    gate = new Promise((r) => (release = r));
    const closed = nextEvent(c, 'close');
    const reopening = nextEvent(c, 'open', () => true, 20_000);
    c.socket.terminate();
    const cl = await closed;
    assert.equal(cl.willReconnect, true);
    assert.equal(cl.code, 1006);
    assert.equal(c.state, 'reconnecting');
    await waitFor(async () => (await online('eve')) === 0, { what: 'the server to see eve go' });
    for (let i = 3; i < 6; i++) sent.push(await api.send('eve', { n: i }));
    release();

    const reopened = await reopening;
    assert.equal(reopened.reconnect, true);
    assert.equal(reopened.since, sent[2]);
    assert.equal(reopened.resumed, true);
    assert.equal(reopened.unread, 6);
    // Let the replay phase end (the client's ping right after the welcome
    // comes back after the whole replay) before sending live messages.
    await waitFor(() => log.message.length === 6, { what: 'the replay' });
    await sleep(100);
    for (let i = 6; i < 8; i++) sent.push(await api.send('eve', { n: i }));
    await waitFor(() => log.message.length >= 8, { what: '8 messages' });
    await sleep(200);
    assert.deepEqual(log.message.map((m) => m.id), sent);
    assert.deepEqual(log.message.map((m) => m.data.n), [0, 1, 2, 3, 4, 5, 6, 7]);
    assert.deepEqual(log.message.map((m) => m.replayed), [false, false, false, true, true, true, false, false]);
    assert.equal(c.unread, 8);
    assert.deepEqual(log.state.map((s) => s.state), ['connecting', 'open', 'reconnecting', 'open']);
  });

  test('reconnect() drops the link and resumes at once', async () => {
    const c = open('ivan');
    const log = record(c);
    await nextEvent(c, 'open');
    const a = await api.send('ivan', 'one');
    await waitFor(() => c.lastId === a);
    const reopened = nextEvent(c, 'open');
    c.reconnect();
    const w = await reopened;
    assert.equal(w.since, a);
    assert.equal(w.resumed, true);
    const b = await api.send('ivan', 'two');
    await waitFor(() => c.lastId === b);
    assert.deepEqual(log.message.map((m) => m.data), ['one', 'two']);
  });

  test('comes back after the node restarts (1001 on shutdown), and says the resume position was lost', async () => {
    const solo = await newNode({ nodeId: 'restart' });
    const soloApi = grpcClient(solo.grpcAddr);
    try {
      const c = open('frank', {}, solo);
      const log = record(c);
      await nextEvent(c, 'open');
      const first = await soloApi.send('frank', { n: 1 });
      await waitFor(() => c.lastId === first);

      const closed = nextEvent(c, 'close');
      await solo.stop('SIGTERM');
      const cl = await closed;
      assert.equal(cl.code, 1001);
      assert.equal(cl.willReconnect, true);
      const reopened = nextEvent(c, 'open', () => true, 30_000);
      await sleep(500); // a few failed attempts against a dead port
      const again = await newNode({ nodeId: 'restart', ports: solo.ports });
      try {
        const w = await reopened;
        assert.equal(w.since, first);
        // The embedded backend forgot everything and the client is told;
        // Redis kept the inbox.
        assert.equal(w.resumed, REDIS);
        const api2 = grpcClient(again.grpcAddr);
        const second = await api2.send('frank', { n: 2 });
        await waitFor(() => c.lastId === second);
        api2.close();
        assert.deepEqual(log.message.map((m) => m.data.n), [1, 2]);
        assert.ok(log.close.length >= 1);
      } finally {
        await again.stop();
      }
    } finally {
      soloApi.close();
    }
  });

  test('getToken is asked again on every attempt, so a refreshed token gets in', async () => {
    const calls = [];
    const c = open('gina', {
      token: undefined,
      backoffInitial: 100,
      getToken: async () => {
        calls.push(Date.now());
        // The first token is expired (past the server's leeway): HTTP 401.
        return mintToken('gina', { ttlSeconds: calls.length === 1 ? -120 : 3600 });
      },
    });
    const log = record(c);
    const w = await nextEvent(c, 'open');
    assert.equal(w.user, 'gina');
    assert.equal(calls.length, 2);
    assert.ok(log.close.length >= 1, 'the rejected attempt closed');
    assert.equal(log.close[0].willReconnect, true);

    // The token travels in Sec-WebSocket-Protocol, not in the URL.
    assert.equal(new URL(c.socket.url).searchParams.get('token'), null);
    assert.equal(c.socket.protocol, 'herald.v1');
    await sleep(1100); // a new second, so the fresh token differs
    const reopened = nextEvent(c, 'open');
    c.socket.terminate();
    await reopened;
    assert.equal(calls.length, 3);
  });

  test('a token that expires on a live socket (4401): getToken at once, resume with since, nothing lost or doubled', async () => {
    const tokens = [];
    const c = open('tess', {
      token: undefined,
      backoffInitial: 5000, // a 4401 must not wait for backoff
      getToken: async () => {
        // The first token lives ~2 s; the fresh ones an hour.
        const t = mintToken('tess', { ttlSeconds: tokens.length === 0 ? 2 : 3600 });
        tokens.push(t);
        return t;
      },
    });
    const log = record(c);
    await nextEvent(c, 'open');
    const expired = nextEvent(c, 'close', (d) => d.code === 4401, 10_000);
    // Push steadily across the expiry and the reconnect.
    const sent = [];
    const deadline = Date.now() + 4000;
    while (Date.now() < deadline) {
      sent.push(await api.send('tess', { n: sent.length }));
      await sleep(40);
    }
    const cl = await expired;
    assert.equal(cl.willReconnect, true);
    assert.equal(cl.delay, 0);
    assert.match(cl.reason, /fresh token/);
    await waitFor(() => log.message.length >= sent.length, { what: `all ${sent.length} messages` });
    await sleep(200);
    assert.deepEqual(log.message.map((m) => m.id), sent, 'every message once, in order');
    assert.equal(tokens.length, 2, 'one fresh token');
    assert.equal(log.open.length, 2);
    assert.equal(log.open[1].reconnect, true);
    assert.equal(log.open[1].resumed, true);
    assert.equal(c.state, 'open');
    assert.deepEqual(log.error, []);
  });

  test("tokenIn: 'query' sends the token as ?token=", async () => {
    const c = open('quinn', { tokenIn: 'query' });
    const w = await nextEvent(c, 'open');
    assert.equal(w.user, 'quinn');
    assert.ok(new URL(c.socket.url).searchParams.get('token'));
  });

  test('a getToken that throws is retried with backoff', async () => {
    let n = 0;
    const c = open('hank', {
      token: undefined,
      backoffInitial: 50,
      getToken: () => {
        n += 1;
        if (n < 3) throw new Error('auth service down');
        return mintToken('hank');
      },
    });
    const log = record(c);
    await nextEvent(c, 'open');
    assert.equal(n, 3);
    assert.equal(log.error.filter((e) => /auth service down/.test(e.message)).length, 2);
  });

  test('a dead link is noticed by the app-level ping and replaced', async () => {
    const proxy = await blackholeProxy(node.ports.ws);
    try {
      const c = open('kate', { url: `ws://127.0.0.1:${proxy.port}/ws`, pingInterval: 300, pongTimeout: 400, backoffInitial: 100 });
      const log = record(c);
      await nextEvent(c, 'open');
      const a = await api.send('kate', { n: 1 });
      await waitFor(() => c.lastId === a);
      const closed = nextEvent(c, 'close');
      const reopened = nextEvent(c, 'open');
      proxy.freeze(); // existing connections go silent both ways
      const cl = await closed;
      assert.match(cl.reason, /no pong/);
      assert.equal(cl.byClient, true);
      assert.equal(cl.willReconnect, true);
      const b = await api.send('kate', { n: 2 });
      const w = await reopened;
      assert.equal(w.since, a);
      assert.equal(w.resumed, true);
      await waitFor(() => c.lastId === b);
      assert.deepEqual(log.message.map((m) => m.data.n), [1, 2]);
    } finally {
      proxy.close();
    }
  });
});

describe('closing', () => {
  test('close() ends the connection for good', async () => {
    const c = open('lena');
    const log = record(c);
    await nextEvent(c, 'open');
    assert.equal(await online('lena'), 1);
    await c.close();
    assert.equal(c.state, 'closed');
    assert.deepEqual(log.close.map((x) => [x.willReconnect, x.byClient]), [[false, true]]);
    await waitFor(async () => (await online('lena')) === 0, { what: 'lena to be offline' });
    await api.send('lena', 'after close');
    await sleep(1000);
    assert.equal(await online('lena'), 0, 'no reconnect after close()');
    assert.equal(log.message.length, 0);
    assert.equal(log.open.length, 1);
    await c.close(); // idempotent
  });

  test('close code 4001 (DisconnectUser) is final', async () => {
    const c = open('mike');
    const log = record(c);
    await nextEvent(c, 'open');
    const closed = nextEvent(c, 'close');
    const res = await api.disconnectUser({ userId: 'mike', reason: 'logged out elsewhere' });
    assert.equal(res.closed, 1);
    const cl = await closed;
    assert.equal(cl.code, 4001);
    assert.equal(cl.reason, 'logged out elsewhere');
    assert.equal(cl.willReconnect, false);
    assert.equal(c.state, 'closed');
    await sleep(1000);
    assert.equal(await online('mike'), 0);
    assert.equal(log.open.length, 1);
  });

  test('close code 4029 (too many connections) waits long, then gets in', async () => {
    const capped = await newNode({ nodeId: 'capped', args: ['--max-connections-per-user', '1'] });
    const cappedApi = grpcClient(capped.grpcAddr);
    try {
      const first = open('nina', {}, capped);
      await nextEvent(first, 'open');
      const second = open('nina', { tooManyConnectionsDelay: 1500 }, capped);
      const cl = await nextEvent(second, 'close');
      assert.equal(cl.code, 4029);
      assert.equal(cl.willReconnect, true);
      assert.ok(cl.delay >= 1125, `long delay after 4029, got ${cl.delay}`);
      assert.equal(second.state, 'reconnecting');
      const reopened = nextEvent(second, 'open', () => true, 10_000);
      await first.close();
      const w = await reopened;
      assert.equal(w.user, 'nina');
      assert.equal((await cappedApi.isOnline({ userIds: ['nina'] })).users[0].connections, 1);
    } finally {
      cappedApi.close();
      await capped.stop();
    }
  });

  test('server error frames surface as "error" events', async () => {
    const c = open('olga');
    await nextEvent(c, 'open');
    const err = nextEvent(c, 'error');
    c.socket.send('{"type":"shout"}');
    const e = await err;
    assert.equal(e.code, 'bad_frame');
    assert.match(e.message, /malformed frame/);
    assert.equal(c.state, 'open');
  });
});

describe('options', () => {
  test('connect() validates its options', () => {
    assert.throws(() => connect({ url: node.wsUrl, WebSocket }), /token/);
    assert.throws(() => connect({ url: node.wsUrl, token: 'x', since: 't1-1', WebSocket }), /since/);
    assert.throws(() => connect({ url: 'ftp://example.invalid/ws', token: 'x', WebSocket }), /url/);
    if (!globalThis.WebSocket) assert.throws(() => connect({ url: node.wsUrl, token: 'x' }), /WebSocket/);
  });

  test('the server refuses a bad token with HTTP 401 (the client only sees a failed attempt)', async () => {
    const status = await new Promise((resolve, reject) => {
      const ws = new WebSocket(`${node.wsUrl}?token=${mintToken('quinn', { secret: 'another-secret' })}`);
      ws.on('unexpected-response', (_req, res) => {
        resolve(res.statusCode);
        ws.terminate();
      });
      ws.on('open', () => reject(new Error('connected with a bad token')));
      ws.on('error', () => {});
    });
    assert.equal(status, 401);
    const c = open('quinn', { token: mintToken('quinn', { secret: 'another-secret' }), backoffInitial: 50, backoffMax: 100 });
    const log = record(c);
    await waitFor(() => log.close.length >= 3, { what: 'three failed attempts' });
    assert.ok(log.close.every((x) => x.willReconnect && x.code === 1006));
    assert.equal(log.open.length, 0);
    assert.equal(c.state, 'reconnecting');
    await c.close();
  });

  test('http(s) URLs are accepted and turned into ws(s)', async () => {
    const c = open('pete', { url: `${node.httpUrl}/ws` });
    const w = await nextEvent(c, 'open');
    assert.equal(w.user, 'pete');
    assert.ok(c.socket.url.startsWith('ws://'));
  });
});

/**
 * A TCP proxy to 127.0.0.1:`port` whose existing connections can be frozen:
 * bytes are then dropped both ways, as on a dead network path.
 */
async function blackholeProxy(port) {
  const live = new Set();
  const server = net.createServer((down) => {
    const up = net.connect(port, '127.0.0.1');
    const pair = { down, up, frozen: false };
    live.add(pair);
    down.on('data', (d) => pair.frozen || up.write(d));
    up.on('data', (d) => pair.frozen || down.write(d));
    const end = () => {
      live.delete(pair);
      down.destroy();
      up.destroy();
    };
    down.on('close', end);
    up.on('close', end);
    down.on('error', end);
    up.on('error', end);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: server.address().port,
    freeze() {
      for (const p of live) p.frozen = true;
    },
    close() {
      for (const p of live) {
        p.down.destroy();
        p.up.destroy();
      }
      server.close();
    },
  };
}

describe('message center', () => {
  test('history pages, per-message read and unread, delete and mark all read, in sync across two clients', async () => {
    const user = 'center';
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push(await api.send(user, { n: i }, { topic: i % 2 ? 'billing' : 'security' }));
    const a = open(user);
    const b = open(user);
    await Promise.all([nextEvent(a, 'open'), nextEvent(b, 'open')]);

    // Newest first, two at a time.
    const p1 = await a.history({ limit: 2 });
    assert.deepEqual(p1.messages.map((m) => [m.id, m.read]), [[ids[4], false], [ids[3], false]]);
    assert.deepEqual(p1.messages[0].data, { n: 4 });
    assert.equal(p1.messages[0].topic, 'security');
    assert.equal(p1.next, ids[3]);
    assert.equal(p1.unread, 5);
    const p2 = await a.history({ limit: 2, cursor: p1.next });
    assert.deepEqual(p2.messages.map((m) => m.id), [ids[2], ids[1]]);
    const billing = await a.history({ topic: 'bill' });
    assert.deepEqual(billing.messages.map((m) => m.id), [ids[3], ids[1]]);

    // Read one in the middle on a: b hears of it, with the count.
    // Each device also hears its own changes: wait for the one expected.
    const op = (name) => (c) => c.op === name;
    let seen = nextEvent(b, 'changed', op('read'));
    assert.equal(a.markReadIds([ids[2]]), true);
    let ch = await seen;
    assert.deepEqual([ch.op, ch.ids, ch.count], ['read', [ids[2]], 4]);
    await waitFor(() => b.unread === 4, { what: "b's badge at 4" });
    // Unread it again.
    seen = nextEvent(b, 'changed', op('unread'));
    a.markUnread([ids[2]]);
    ch = await seen;
    assert.deepEqual([ch.op, ch.count], ['unread', 5]);
    // Delete one on b: a hears of it.
    seen = nextEvent(a, 'changed', op('delete'));
    b.deleteMessages([ids[0]]);
    ch = await seen;
    assert.deepEqual([ch.op, ch.ids, ch.count], ['delete', [ids[0]], 4]);
    assert.equal((await api.listMessages({ userId: user, limit: 100 })).messages.length, 4);
    // Mark all read.
    seen = nextEvent(b, 'changed', (c) => c.op === 'read' && c.upTo != null);
    a.markAllRead();
    ch = await seen;
    assert.deepEqual([ch.op, ch.upTo, ch.count], ['read', ids[4], 0]);
    await waitFor(() => a.unread === 0 && b.unread === 0, { what: 'both badges at 0' });
    const all = await b.history({ limit: 50 });
    assert.ok(all.messages.every((m) => m.read));
    assert.deepEqual(all.messages.map((m) => m.id), [ids[4], ids[3], ids[2], ids[1]]);

    // Bad input is refused before anything is sent.
    assert.throws(() => a.markReadIds(['t1-0']), TypeError);
    assert.throws(() => a.deleteMessages([]), TypeError);
    await assert.rejects(a.history({ limit: 51 }), RangeError);
  });
});
