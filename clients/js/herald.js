// Herald browser client: one WebSocket to a Herald node, kept alive.
//
// A dependency-free ES module for browsers and Node 20+ (pass a WebSocket
// implementation where there is no global one). What it does for the app:
//
// * reconnects with exponential backoff and jitter, asking `getToken()` for a
//   fresh token before every attempt;
// * resumes with `since=<last stored message id>`, so no stored message is
//   lost or delivered twice across reconnects (ids are compared numerically
//   and anything at or below the last one seen is dropped);
// * pings the server at the application level and drops a link that stops
//   answering, so a dead connection is noticed within seconds;
// * keeps the unread count: the server's count on every connect, the
//   server's "unread" frames, and +1 for every new stored live message;
// * stops for good on close code 4001 (disconnected by the server) or
//   `close()`, and backs off for long on 4029 (too many connections);
// * on 4401 (the token expired) reconnects at once with a fresh token from
//   `getToken()` and `since`, so nothing is lost;
// * sends the token in `Sec-WebSocket-Protocol` (`herald.v1,
//   herald.token.<JWT>`), not in the URL, so it stays out of access logs
//   (`tokenIn: 'query'` puts it in `?token=` for old proxies).
//
// Wire protocol: see the README beside this file.

/** @typedef {import('./herald.d.ts').ConnectOptions} ConnectOptions */

const DEFAULTS = {
  pingInterval: 20_000,
  pongTimeout: 10_000,
  connectTimeout: 10_000,
  backoffInitial: 1000,
  backoffMax: 30_000,
  backoffFactor: 2,
  jitter: 0.5,
  tooManyConnectionsDelay: 60_000,
  replayLimit: 100,
};

/** Close codes of the Herald protocol. */
export const CloseCodes = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  TOO_BIG: 1009,
  TRY_AGAIN_LATER: 1013,
  DISCONNECTED: 4001,
  TOO_MANY_CONNECTIONS: 4029,
  TOKEN_EXPIRED: 4401,
});

/** The protocol the client offers and the server echoes. */
export const SUBPROTOCOL = 'herald.v1';
/** Prefix of the protocol entry that carries the token. */
export const TOKEN_PROTOCOL_PREFIX = 'herald.token.';

const ID_RE = /^(\d{1,20})-(\d{1,20})$/;

/** Validates a list of stored-message ids for a message-center frame (at most 100). */
function checkIds(what, ids) {
  if (!Array.isArray(ids) || ids.length === 0 || ids.length > 100 || !ids.every(isStoredId)) {
    throw new TypeError(`herald: ${what}(): pass 1 to 100 stored message ids`);
  }
  return ids;
}

/** Whether `id` is a stored-message id ("<ms>-<seq>"), usable as a resume position. */
export function isStoredId(id) {
  return typeof id === 'string' && ID_RE.test(id);
}

function cmpDigits(a, b) {
  a = a.replace(/^0+(?=\d)/, '');
  b = b.replace(/^0+(?=\d)/, '');
  if (a.length !== b.length) return a.length < b.length ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * Orders two stored-message ids by (ms, seq), numerically: negative when
 * `a` is older, positive when newer, 0 when equal. Throws on other input.
 */
export function compareIds(a, b) {
  const ma = ID_RE.exec(a);
  const mb = ID_RE.exec(b);
  if (!ma || !mb) throw new TypeError(`not a stored message id: ${JSON.stringify(ma ? b : a)}`);
  return cmpDigits(ma[1], mb[1]) || cmpDigits(ma[2], mb[2]);
}

/** Opens a client and starts connecting. See herald.d.ts for the options. */
export function connect(options) {
  return new HeraldClient(options);
}

/**
 * A self-healing connection to Herald. Events (on/off, or addEventListener
 * with the payload in `event.detail`): open, message, unread, state, close,
 * error.
 */
export class HeraldClient extends EventTarget {
  /** @param {ConnectOptions} options */
  constructor(options = {}) {
    super();
    const o = { ...DEFAULTS, ...options };
    if (!o.token && !o.getToken) throw new TypeError('herald: pass `token` or `getToken`');
    if (o.since != null && !isStoredId(o.since)) throw new TypeError(`herald: since ${JSON.stringify(o.since)} is not a stored message id`);
    this._WebSocket = o.WebSocket || globalThis.WebSocket;
    if (typeof this._WebSocket !== 'function') {
      throw new TypeError('herald: no WebSocket implementation; pass one as the `WebSocket` option (in Node 20: `import { WebSocket } from "ws"`)');
    }
    this._url = resolveUrl(o.url);
    this._opts = o;
    this._getToken = o.getToken || (() => o.token);
    this._listeners = new Map(); // type -> Map(fn -> wrapper)

    /** @type {string|null} the newest stored message id seen (the resume position) */
    this.lastId = o.since ?? null;
    /** @type {number|null} the unread count, once the server has told it */
    this.unread = null;
    /** @type {'connecting'|'open'|'reconnecting'|'closed'} */
    this.state = 'connecting';
    /** @type {string|null} */
    this.user = null;
    /** @type {string|null} this connection's id on the server */
    this.connId = null;

    this._ws = null;
    this._attempt = 0; // failed attempts since the last welcome
    this._connects = 0; // welcomes received
    this._timers = new Set();
    this._pingTimer = null;
    this._pongTimer = null;
    this._reconnectTimer = null;
    this._pendingRead = null;
    this._history = new Map(); // req tag -> { resolve, reject, timer }
    this._nextReq = 0;
    this._recentTransient = new Set();
    this._closed = false;
    this._closedPromise = null;

    this._onOnline = () => {
      if (this._reconnectTimer) this.reconnect();
    };
    if (typeof globalThis.addEventListener === 'function' && typeof globalThis.window !== 'undefined') {
      globalThis.addEventListener('online', this._onOnline);
    }
    // Start on the next tick so that listeners added right after connect()
    // see every event, the first "state" included.
    this._later(0, () => {
      this._emit('state', { state: this.state });
      this._open();
    });
  }

  /** The underlying WebSocket of the current attempt (diagnostics and tests). */
  get socket() {
    return this._ws;
  }

  /**
   * Adds a listener that receives the event's payload; returns a function
   * that removes it.
   */
  on(type, fn) {
    let byFn = this._listeners.get(type);
    if (!byFn) this._listeners.set(type, (byFn = new Map()));
    if (!byFn.has(fn)) {
      const wrapper = (ev) => fn(ev.detail, ev);
      byFn.set(fn, wrapper);
      this.addEventListener(type, wrapper);
    }
    return () => this.off(type, fn);
  }

  /** Removes a listener added with on(). */
  off(type, fn) {
    const byFn = this._listeners.get(type);
    const wrapper = byFn && byFn.get(fn);
    if (wrapper) {
      byFn.delete(fn);
      this.removeEventListener(type, wrapper);
    }
  }

  /**
   * Marks the message `id` and every older one read, on every device of the
   * user; the server answers with an "unread" event. Without an id: the
   * newest message seen. While offline the newest requested position is
   * kept and sent on the next connect.
   */
  markRead(id = this.lastId) {
    if (id == null || id === '0-0') return;
    if (!isStoredId(id)) throw new TypeError(`herald: markRead(${JSON.stringify(id)}): only stored message ids can be read (live-only ids start with "t")`);
    if (this._pendingRead == null || compareIds(id, this._pendingRead) > 0) this._pendingRead = id;
    this._flushRead();
  }

  // ---- The message center ----

  /**
   * Fetches a page of stored messages with their read state, newest first
   * (or oldest first). Resolves to { messages: [{id, topic, data, ts,
   * read}], next, unread }; pass `next` as `cursor` for the following page
   * (null at the end). Rejects when not connected, on close, or after
   * `timeout` ms.
   */
  history({ cursor = null, limit = 20, oldestFirst = false, unreadOnly = false, topic = '', timeout = 10_000 } = {}) {
    if (cursor != null && !isStoredId(cursor)) return Promise.reject(new TypeError(`herald: history(): cursor ${JSON.stringify(cursor)} is not a stored message id`));
    if (!Number.isInteger(limit) || limit < 1 || limit > 50) return Promise.reject(new RangeError('herald: history(): limit must be 1 to 50'));
    const req = `h${++this._nextReq}`;
    const frame = { type: 'history', req, limit };
    if (cursor) frame.cursor = cursor;
    if (oldestFirst) frame.oldest_first = true;
    if (unreadOnly) frame.unread_only = true;
    if (topic) frame.topic = topic;
    if (!this._conn || !this._conn.welcomed || !this._send(frame)) return Promise.reject(new Error('herald: history(): not connected'));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._history.delete(req);
        reject(new Error(`herald: history(): no answer within ${timeout} ms`));
      }, timeout);
      this._history.set(req, { resolve, reject, timer });
    });
  }

  /** Marks just these messages read, on every device. False when not connected. */
  markReadIds(ids) {
    return this._center('read', { ids: checkIds('markReadIds', ids) });
  }

  /** Marks these messages unread again, on every device. False when not connected. */
  markUnread(ids) {
    return this._center('unread', { ids: checkIds('markUnread', ids) });
  }

  /** Marks every stored message read, on every device. False when not connected. */
  markAllRead() {
    return this._center('read', { all: true });
  }

  /** Deletes these messages for every device of the user. False when not connected. */
  deleteMessages(ids) {
    return this._center('delete', { ids: checkIds('deleteMessages', ids) });
  }

  /** Deletes every stored message of the user. False when not connected. */
  deleteAll() {
    return this._center('delete', { all: true });
  }

  _center(type, fields) {
    if (!this._conn || !this._conn.welcomed) return false;
    return this._send({ type, ...fields });
  }

  _historyDone(f) {
    const p = this._history.get(f.req);
    if (!p) return;
    this._history.delete(f.req);
    clearTimeout(p.timer);
    const messages = (Array.isArray(f.messages) ? f.messages : []).map((m) => ({
      id: m.id,
      topic: m.topic ?? '',
      data: m.data,
      ts: m.ts,
      read: m.read === true,
    }));
    if (typeof f.unread === 'number') this._setUnread(f.unread, 'server');
    p.resolve({ messages, next: f.next ?? null, unread: f.unread ?? null });
  }

  _failHistory(why) {
    for (const [req, p] of this._history) {
      clearTimeout(p.timer);
      p.reject(new Error(`herald: history(): ${why}`));
      this._history.delete(req);
    }
  }

  /**
   * Drops the current connection (if any) and connects again now, resuming
   * where it left off. Resets the backoff. For "the network is back" hints.
   */
  reconnect() {
    if (this._closed) return;
    this._clearReconnect();
    this._attempt = 0;
    if (this._ws) this._drop(CloseCodes.ABNORMAL, 'reconnect requested', false);
    this._open();
  }

  /**
   * Closes the connection for good: no more reconnects, no more events
   * after the final "close". Resolves when the socket is closed.
   */
  close(code = 1000, reason = 'client closed') {
    if (this._closedPromise) return this._closedPromise;
    this._finish();
    const ws = this._ws;
    this._ws = null;
    this._closedPromise = new Promise((resolve) => {
      if (!ws || ws.readyState === 3 /* CLOSED */) return resolve();
      const done = () => {
        clearTimeout(t);
        resolve();
      };
      const t = setTimeout(done, 2000);
      detach(ws);
      ws.onclose = done;
      ws.onerror = () => {};
      try {
        ws.close(code, reason);
      } catch {
        done();
      }
    });
    this._setState('closed');
    this._emit('close', { code, reason, wasClean: true, willReconnect: false, delay: null, byClient: true });
    return this._closedPromise;
  }

  // ---------------------------------------------------------------------

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit('state', { state });
  }

  _later(ms, fn) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _cancel(t) {
    if (t) {
      clearTimeout(t);
      this._timers.delete(t);
    }
  }

  _clearTimers() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._pingTimer = this._pongTimer = this._reconnectTimer = null;
  }

  /** No more reconnects, timers or browser hooks. */
  _finish() {
    this._closed = true;
    this._clearTimers();
    if (typeof globalThis.removeEventListener === 'function') globalThis.removeEventListener('online', this._onOnline);
  }

  _clearReconnect() {
    this._cancel(this._reconnectTimer);
    this._reconnectTimer = null;
  }

  async _open() {
    if (this._closed || this._ws) return;
    this._setState(this._connects === 0 && this._attempt === 0 ? 'connecting' : 'reconnecting');
    let token;
    try {
      token = await this._getToken();
      if (typeof token !== 'string' || token === '') throw new Error('getToken() returned no token');
    } catch (err) {
      if (this._closed) return;
      this._emit('error', { error: err, message: `herald: could not get a token: ${err && err.message}` });
      return this._scheduleReconnect(null);
    }
    if (this._closed || this._ws) return;

    const url = new URL(this._url);
    const inQuery = this._opts.tokenIn === 'query';
    if (inQuery) url.searchParams.set('token', token);
    else url.searchParams.delete('token');
    if (this.lastId) url.searchParams.set('since', this.lastId);
    else url.searchParams.delete('since');

    let ws;
    try {
      ws = inQuery
        ? new this._WebSocket(url.toString())
        : new this._WebSocket(url.toString(), [SUBPROTOCOL, TOKEN_PROTOCOL_PREFIX + token]);
    } catch (err) {
      this._emit('error', { error: err, message: `herald: cannot open ${this._url}: ${err && err.message}` });
      return this._scheduleReconnect(null);
    }
    this._ws = ws;
    const conn = {
      ws,
      welcomed: false,
      since: this.lastId,
      replayLeft: 0, // messages after the welcome that are certainly replay
      syncPing: false, // a ping sent right after the welcome is outstanding
    };
    this._conn = conn;
    const connectTimer = this._later(this._opts.connectTimeout, () => {
      if (this._ws === ws && !conn.welcomed) this._drop(CloseCodes.ABNORMAL, `no welcome within ${this._opts.connectTimeout} ms`, true);
    });

    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      this._frame(conn, ev.data, connectTimer);
    };
    ws.onerror = (ev) => {
      if (this._ws !== ws) return;
      const message = (ev && (ev.message || (ev.error && ev.error.message))) || 'WebSocket error';
      this._emit('error', { error: (ev && ev.error) || null, message: `herald: ${message}` });
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._cancel(connectTimer);
      this._socketClosed(ev.code, ev.reason || '', !!ev.wasClean);
    };
  }

  _frame(conn, data, connectTimer) {
    if (typeof data !== 'string') {
      try {
        data = new TextDecoder().decode(data);
      } catch {
        return;
      }
    }
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    if (!f || typeof f !== 'object') return;
    this._armPongTimeout(false); // any frame proves the link is alive
    switch (f.type) {
      case 'welcome':
        this._cancel(connectTimer);
        this._welcome(conn, f);
        break;
      case 'message':
        this._message(conn, f);
        break;
      case 'unread':
        if (typeof f.count === 'number') this._setUnread(f.count, 'server');
        break;
      case 'changed':
        // What changed in the message center, on any device of the user.
        this._emit('changed', {
          op: f.op,
          ids: Array.isArray(f.ids) ? f.ids : [],
          upTo: f.up_to ?? null,
          all: f.all === true,
          count: typeof f.count === 'number' ? f.count : null,
        });
        if (typeof f.count === 'number' && f.count !== this.unread) this._setUnread(f.count, 'server');
        break;
      case 'history':
        this._historyDone(f);
        break;
      case 'pong':
        if (conn.syncPing) {
          // Every replayed message was written before this pong.
          conn.syncPing = false;
          conn.replayLeft = 0;
        }
        break;
      case 'error':
        this._emit('error', { code: f.code, message: f.message, error: null });
        break;
      default:
        break; // newer protocol frames: ignore
    }
  }

  _welcome(conn, f) {
    conn.welcomed = true;
    this._attempt = 0;
    this._connects += 1;
    this.user = f.user ?? null;
    this.connId = f.conn ?? null;
    // Which of the messages after the welcome are replay (already counted
    // in `unread`) rather than live? A server that says how many it replays
    // ("replay": N) settles it. Otherwise: without `since` the server
    // replays the newest min(unread, limit) unread messages; with it, every
    // stored message after it. Either way the whole replay comes before the
    // answer to a ping sent now, so the replay phase ends at that pong at
    // the latest (a live message that races ahead of it counts as replay:
    // the badge is then one short until the next "unread" frame).
    if (Number.isInteger(f.replay) && f.replay >= 0) conn.replayLeft = f.replay;
    else conn.replayLeft = conn.since ? Infinity : Math.min(f.unread ?? 0, this._opts.replayLimit);
    conn.syncPing = true;
    this._ping();
    this._setState('open');
    this._emit('open', {
      user: this.user,
      conn: this.connId,
      unread: f.unread ?? 0,
      resumed: f.resumed ?? null,
      since: conn.since,
      reconnect: this._connects > 1,
    });
    this._setUnread(f.unread ?? 0, 'welcome');
    this._flushRead();
  }

  _message(conn, f) {
    const transient = f.transient === true || (typeof f.id === 'string' && f.id.startsWith('t'));
    const msg = { id: f.id, topic: f.topic ?? '', data: f.data, ts: f.ts, transient, replayed: false };
    if (transient) {
      if (this._recentTransient.has(f.id)) return;
      this._recentTransient.add(f.id);
      if (this._recentTransient.size > 256) this._recentTransient.delete(this._recentTransient.values().next().value);
      this._emit('message', msg);
      return;
    }
    if (!isStoredId(f.id)) return;
    const replayed = conn.replayLeft > 0;
    if (replayed) conn.replayLeft -= 1;
    // Stored ids only grow: anything at or below the last one is a repeat.
    if (this.lastId && compareIds(f.id, this.lastId) <= 0) return;
    this.lastId = f.id;
    msg.replayed = replayed;
    if (!replayed && this.unread != null) this._setUnread(this.unread + 1, 'local');
    this._emit('message', msg);
  }

  _setUnread(count, source) {
    this.unread = count;
    this._emit('unread', { count, source });
  }

  _send(obj) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1 /* OPEN */) return false;
    try {
      ws.send(JSON.stringify(obj));
      return true;
    } catch {
      return false;
    }
  }

  _flushRead() {
    if (this._pendingRead == null || !this._conn || !this._conn.welcomed || this._conn.ws !== this._ws) return;
    if (this._send({ type: 'read', up_to: this._pendingRead })) this._pendingRead = null;
  }

  /** Sends an app-level ping, expects an answer, and plans the next one. */
  _ping() {
    this._cancel(this._pingTimer);
    this._pingTimer = null;
    if (!this._ws || !this._conn || !this._conn.welcomed) return;
    this._send({ type: 'ping' });
    this._armPongTimeout(true);
    this._pingTimer = this._later(this._opts.pingInterval, () => {
      this._pingTimer = null;
      this._ping();
    });
  }

  _armPongTimeout(arm) {
    if (!arm) {
      this._cancel(this._pongTimer);
      this._pongTimer = null;
      return;
    }
    if (this._pongTimer) return; // already waiting for an earlier ping
    const ws = this._ws;
    this._pongTimer = this._later(this._opts.pongTimeout, () => {
      this._pongTimer = null;
      if (this._ws === ws) this._drop(CloseCodes.ABNORMAL, `no pong within ${this._opts.pongTimeout} ms`, true);
    });
  }

  /** Abandons the current socket without waiting for its close handshake. */
  _drop(code, reason, reconnect) {
    const ws = this._ws;
    if (!ws) return;
    detach(ws);
    ws.onerror = () => {};
    try {
      if (typeof ws.terminate === 'function') ws.terminate();
      else ws.close(4000, reason.slice(0, 120));
    } catch {
      // already closing
    }
    this._socketClosed(code, reason, false, { reconnect, byClient: true });
  }

  _socketClosed(code, reason, wasClean, { reconnect = true, byClient = false } = {}) {
    this._failHistory('the connection closed');
    this._ws = null;
    this._conn = null;
    this._cancel(this._pingTimer);
    this._cancel(this._pongTimer);
    this._pingTimer = this._pongTimer = null;
    if (this._closed) return;
    if (code === CloseCodes.DISCONNECTED) {
      this._finish();
      this._closedPromise = Promise.resolve();
      this._setState('closed');
      this._emit('close', { code, reason, wasClean, willReconnect: false, delay: null, byClient: false });
      return;
    }
    if (!reconnect) {
      this._emit('close', { code, reason, wasClean, willReconnect: true, delay: 0, byClient: true });
      return;
    }
    if (code === CloseCodes.TOKEN_EXPIRED) {
      // Not a failure: fetch a fresh token and resume with `since` now.
      this._attempt = 0;
      this._setState('reconnecting');
      this._emit('close', { code, reason, wasClean, willReconnect: true, delay: 0, byClient: false });
      this._clearReconnect();
      this._open();
      return;
    }
    this._scheduleReconnect({ code, reason, wasClean, byClient });
  }

  _backoff(code) {
    const o = this._opts;
    const base = Math.min(o.backoffMax, o.backoffInitial * Math.pow(o.backoffFactor, this._attempt));
    this._attempt += 1;
    let delay = base * (1 - o.jitter * Math.random());
    if (code === CloseCodes.TOO_MANY_CONNECTIONS) delay = Math.max(delay, o.tooManyConnectionsDelay * (1 - (o.jitter / 2) * Math.random()));
    return Math.round(delay);
  }

  _scheduleReconnect(closeInfo) {
    if (this._closed) return;
    const delay = this._backoff(closeInfo && closeInfo.code);
    this._setState('reconnecting');
    if (closeInfo) this._emit('close', { ...closeInfo, willReconnect: true, delay });
    this._clearReconnect();
    this._reconnectTimer = this._later(delay, () => {
      this._reconnectTimer = null;
      this._open();
    });
  }
}

function detach(ws) {
  ws.onopen = ws.onmessage = ws.onclose = null;
}

function resolveUrl(url) {
  const loc = globalThis.location;
  if (url == null) {
    if (!loc || !loc.host) throw new TypeError('herald: pass `url` (e.g. "wss://push.example.com/ws")');
    url = '/ws';
  }
  const u = new URL(String(url), loc && loc.href ? loc.href : undefined);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.protocol !== 'ws:' && u.protocol !== 'wss:') throw new TypeError(`herald: url must be ws:, wss:, http: or https:, not ${u.protocol}`);
  return u.toString();
}
