// Herald demo: the live notification widget of a (fake) admin console.
//
// Served by every Herald node at "/" with this file at /demo/app.js and the
// client at /herald.js. The token comes from ?token= (the link a node prints
// at startup) or is pasted; the page connects to ws(s)://<this host>/ws.

import { compareIds, connect } from '/herald.js';

const TOKEN_KEY = 'herald.demo.token';
const KEEP = 1000; // messages kept in memory (an inbox holds at most --inbox-max-messages)

const $ = (id) => document.getElementById(id);
const el = {
  state: $('state'),
  stateLabel: document.querySelector('#state .state-label'),
  user: $('user'),
  avatar: $('avatar'),
  account: $('account'),
  bell: $('bell'),
  bellDot: $('bell-dot'),
  badge: $('badge'),
  panel: $('panel'),
  panelClose: $('panel-close'),
  list: $('list'),
  unreadLabel: $('unread-label'),
  markAll: $('mark-all'),
  tabs: document.querySelectorAll('.tab'),
  notice: $('notice'),
  footState: $('foot-state'),
  toast: $('toast'),
  dialog: $('token-dialog'),
  form: $('token-form'),
  tokenInput: $('token-input'),
  tokenWhy: $('token-why'),
  tokenError: $('token-error'),
};

/** Newest first. Each: {id, topic, data, ts, transient, read}. */
let messages = [];
/** Where the next history page starts; null when everything is loaded. */
let next = null;
let loading = false;
let unread = 0;
let filter = 'all';
let client = null;
let toastTimer = null;

// ---------------------------------------------------------------- token

function decodeJwt(token) {
  try {
    const part = token.split('.')[1];
    const json = atob(part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '='));
    return JSON.parse(decodeURIComponent(escape(json)));
  } catch {
    return null;
  }
}

function tokenProblem(token) {
  const claims = decodeJwt(token);
  if (!claims || typeof claims.sub !== 'string') return 'That does not look like a Herald token (a JWT with a "sub" claim).';
  if (typeof claims.exp === 'number' && claims.exp * 1000 < Date.now()) return `This token expired ${relTime(claims.exp * 1000)}. Paste a fresh one.`;
  return null;
}

function takeTokenFromUrl() {
  const url = new URL(location.href);
  const t = url.searchParams.get('token');
  if (!t) return null;
  // Keep it out of the address bar (and out of screenshots and history).
  url.searchParams.delete('token');
  history.replaceState(null, '', url.pathname + url.search + url.hash);
  return t.trim();
}

function askForToken(why) {
  el.tokenWhy.textContent = why || 'Paste a Herald token for the user whose notifications you want to see.';
  el.tokenError.hidden = true;
  el.dialog.hidden = false;
  setState('offline', 'Not connected');
  setTimeout(() => el.tokenInput.focus(), 0);
}

el.form.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const token = el.tokenInput.value.trim();
  const problem = tokenProblem(token);
  if (problem) {
    el.tokenError.textContent = problem;
    el.tokenError.hidden = false;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  el.dialog.hidden = true;
  start(token);
});

el.account.addEventListener('click', async () => {
  if (client) await client.close();
  client = null;
  sessionStorage.removeItem(TOKEN_KEY);
  el.tokenInput.value = '';
  askForToken('Paste a token to switch users.');
});

// ---------------------------------------------------------------- client

function start(token) {
  messages = [];
  unread = 0;
  render();
  const claims = decodeJwt(token) || {};
  setUser(claims.sub || '?');

  client = connect({
    url: new URL('/ws', location.href).href,
    // Asked before every (re)connect: the place to fetch a fresh token.
    getToken: () => {
      const current = sessionStorage.getItem(TOKEN_KEY) || token;
      const problem = tokenProblem(current);
      if (problem) {
        queueMicrotask(() => expire(problem));
        throw new Error(problem);
      }
      return current;
    },
    // The list comes from history pages (with read flags); the replay on
    // connect brings the newest unread, merged by id.
  });
  window.heraldClient = client; // for the console and tests

  client.on('state', ({ state }) => {
    const map = { connecting: 'connecting', open: 'live', reconnecting: 'reconnecting', closed: 'offline' };
    setState(map[state] || 'offline');
  });

  client.on('open', ({ user, resumed, reconnect }) => {
    setUser(user);
    // The message center: the newest page with read flags, on every
    // connect (live messages and changes keep it current afterwards).
    loadPage(null);
    if (reconnect && resumed === false) {
      showNotice('Reconnected after a long break: some older notifications may have expired.');
    } else {
      el.notice.hidden = true;
    }
  });

  client.on('message', (m) => {
    if (!add({ ...m, read: m.transient })) return;
    render();
    if (!m.replayed) {
      ring();
      if (el.panel.hidden) showToast(m);
    }
  });

  client.on('changed', (c) => {
    applyChange(c);
    render();
  });

  client.on('unread', ({ count }) => {
    const grew = count > unread;
    unread = count;
    render();
    if (grew) bump();
  });

  client.on('close', ({ code, reason, willReconnect }) => {
    if (!willReconnect && code === 4001) {
      setState('offline', `Signed out by the server${reason ? `: ${reason}` : ''}`);
      askForToken(`The server ended this session${reason ? ` (${reason})` : ''}. Paste a token to reconnect.`);
    }
  });

  client.on('error', ({ message }) => console.warn(message));
}

async function expire(problem) {
  if (client) await client.close();
  client = null;
  sessionStorage.removeItem(TOKEN_KEY);
  askForToken(problem);
}

// ---------------------------------------------------------------- UI

const STATE_TEXT = { connecting: 'Connecting…', live: 'Live', reconnecting: 'Reconnecting…', offline: 'Offline' };

function setState(state, foot) {
  el.state.dataset.state = state;
  el.bellDot.dataset.state = state;
  el.stateLabel.textContent = STATE_TEXT[state];
  el.footState.textContent = foot || {
    connecting: 'Connecting to Herald…',
    live: `Live · ${location.host}`,
    reconnecting: 'Connection lost · reconnecting, will catch up',
    offline: 'Offline',
  }[state];
}

function setUser(user) {
  el.user.textContent = user;
  el.avatar.textContent = (user || '?').slice(0, 1);
}

/** Adds a message in id order (newest first); false when already there. */
function add(m) {
  if (messages.some((x) => x.id === m.id)) return false;
  if (m.transient) {
    messages.unshift(m);
  } else {
    const i = messages.findIndex((x) => !x.transient && compareIds(x.id, m.id) < 0);
    if (i < 0) messages.push(m);
    else messages.splice(i, 0, m);
  }
  if (messages.length > KEEP) messages.length = KEEP;
  return true;
}

/** Loads a page of history; `cursor` null (re)loads the newest page. */
async function loadPage(cursor) {
  if (!client || loading) return;
  loading = true;
  try {
    const page = await client.history({ cursor, limit: 20 });
    if (cursor == null) {
      // The server's view wins: drop what it no longer has (deleted on
      // another device while this one was away) in the page's range.
      const oldest = page.messages.at(-1)?.id;
      const fresh = new Set(page.messages.map((m) => m.id));
      messages = messages.filter((m) => m.transient || fresh.has(m.id) || (oldest && compareIds(m.id, oldest) > 0));
    }
    next = page.next;
    for (const m of page.messages) {
      const known = messages.find((x) => x.id === m.id);
      if (known) known.read = m.read;
      else add({ ...m, transient: false });
    }
  } catch (e) {
    console.warn(e.message);
  } finally {
    loading = false;
    render();
  }
}

/** A change made on any device: read, unread or delete. */
function applyChange({ op, ids, upTo, all }) {
  const named = new Set(ids);
  if (op === 'delete') {
    messages = all ? messages.filter((m) => m.transient) : messages.filter((m) => !named.has(m.id));
    return;
  }
  for (const m of messages) {
    if (m.transient) continue;
    if (named.has(m.id) || (upTo && compareIds(m.id, upTo) <= 0)) m.read = op === 'read';
  }
}

function render() {
  const badge = unread > 99 ? '99+' : String(unread);
  el.badge.textContent = badge;
  el.badge.dataset.count = String(unread);
  el.badge.hidden = unread === 0;
  el.bell.setAttribute('aria-label', unread ? `Notifications, ${unread} unread` : 'Notifications');
  el.unreadLabel.textContent = unread ? `${unread} unread` : 'All caught up';
  el.markAll.disabled = unread === 0;
  document.title = `${unread ? `(${badge}) ` : ''}Northwind Console · Herald live notifications`;

  const shown = messages.filter((m) => filter === 'all' || !m.read);
  const items = shown.map((m) => item(m, !m.read));
  if (next) {
    const li = document.createElement('li');
    li.className = 'notif-more';
    const more = document.createElement('button');
    more.type = 'button';
    more.className = 'link-btn';
    more.id = 'load-more';
    more.dataset.testid = 'load-more';
    more.textContent = loading ? 'Loading…' : 'Load older notifications';
    more.addEventListener('click', () => loadPage(next));
    li.append(more);
    items.push(li);
  }
  el.list.replaceChildren(...items);
}

function item(m, isUnread) {
  const li = document.createElement('li');
  li.className = `notif-item${isUnread ? ' unread' : ''}`;
  li.dataset.id = m.id;
  li.dataset.testid = 'message';
  li.dataset.unread = String(isUnread);

  const btn = document.createElement('button');
  btn.type = 'button';
  btn.className = 'notif-btn';
  btn.title = m.transient ? 'Live-only message' : isUnread ? 'Mark as read' : 'Read';
  btn.addEventListener('click', () => {
    if (isUnread) setRead(m, true);
  });

  const icon = document.createElement('span');
  icon.className = 'notif-icon';
  icon.style.background = topicColor(m.topic);
  icon.textContent = (m.topic || '•').replace(/[^a-z0-9]/gi, '').slice(0, 2).toUpperCase() || '•';

  const body = document.createElement('span');
  body.className = 'notif-body';

  const meta = document.createElement('span');
  meta.className = 'notif-meta';
  const topic = document.createElement('span');
  topic.className = 'topic';
  topic.textContent = m.topic || 'general';
  const sep = document.createElement('span');
  sep.className = 'sep';
  sep.textContent = '·';
  const time = document.createElement('time');
  time.dataset.ts = String(m.ts);
  time.dateTime = new Date(m.ts).toISOString();
  time.title = new Date(m.ts).toLocaleString();
  time.textContent = relTime(m.ts);
  meta.append(topic, sep, time);
  if (m.transient) {
    const tag = document.createElement('span');
    tag.className = 'live-tag';
    tag.textContent = 'live';
    meta.append(tag);
  }
  body.append(meta, ...content(m.data));

  btn.append(icon, body);
  li.append(btn);
  if (!m.transient) {
    const tools = document.createElement('span');
    tools.className = 'notif-tools';
    const toggle = document.createElement('button');
    toggle.type = 'button';
    toggle.className = 'tool-btn';
    toggle.dataset.testid = 'toggle-read';
    toggle.textContent = isUnread ? 'Mark read' : 'Mark unread';
    toggle.addEventListener('click', () => setRead(m, isUnread));
    const del = document.createElement('button');
    del.type = 'button';
    del.className = 'tool-btn';
    del.dataset.testid = 'delete';
    del.textContent = 'Delete';
    del.addEventListener('click', () => remove(m));
    tools.append(toggle, del);
    li.append(tools);
  }
  return li;
}

/** Title and body when the payload has them, the JSON otherwise. */
function content(data) {
  const out = [];
  if (data && typeof data === 'object' && !Array.isArray(data)) {
    const title = data.title ?? data.subject ?? data.summary;
    const text = data.body ?? data.message ?? data.text ?? data.description;
    if (title != null || text != null) {
      if (title != null) out.push(span('notif-title-text', String(title)));
      if (text != null) out.push(span('notif-text', typeof text === 'string' ? text : JSON.stringify(text)));
      return out;
    }
  }
  if (typeof data === 'string') return [span('notif-title-text', data)];
  const json = JSON.stringify(data);
  out.push(span('notif-json', json.length > 240 ? `${json.slice(0, 240)}…` : json));
  return out;
}

function span(cls, text) {
  const s = document.createElement('span');
  s.className = cls;
  s.textContent = text;
  return s;
}

function topicColor(topic) {
  const palette = ['#4f46e5', '#0ea5e9', '#10b981', '#f59e0b', '#ef4444', '#8b5cf6', '#ec4899', '#14b8a6'];
  let h = 0;
  for (const ch of topic || '') h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return palette[h % palette.length];
}

function relTime(ts) {
  const s = Math.round((Date.now() - ts) / 1000);
  if (s < 0) return 'in a moment';
  if (s < 45) return 'just now';
  const m = Math.round(s / 60);
  if (m < 60) return `${m} min ago`;
  const h = Math.round(m / 60);
  if (h < 24) return `${h} h ago`;
  const d = Math.round(h / 24);
  if (d < 7) return d === 1 ? 'yesterday' : `${d} days ago`;
  return new Date(ts).toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
}

setInterval(() => {
  for (const t of el.list.querySelectorAll('time[data-ts]')) t.textContent = relTime(Number(t.dataset.ts));
}, 15_000);

/** Marks one message read or unread, on every device (this one at once). */
function setRead(m, read) {
  if (!client || m.transient) return;
  if (!(read ? client.markReadIds([m.id]) : client.markUnread([m.id]))) return;
  m.read = read;
  render();
}

/** Deletes one message, on every device. */
function remove(m) {
  if (!client || m.transient) return;
  if (!client.deleteMessages([m.id])) return;
  messages = messages.filter((x) => x !== m);
  render();
}

el.markAll.addEventListener('click', () => {
  if (!client) return;
  for (const m of messages) m.read = true;
  render();
  if (!client.markAllRead()) client.markRead(); // offline: sent on the next connect
});

function setPanel(open) {
  el.panel.hidden = !open;
  el.bell.setAttribute('aria-expanded', String(open));
  if (open) {
    el.toast.hidden = true;
    render();
  }
}

el.bell.addEventListener('click', () => setPanel(el.panel.hidden));
el.panelClose.addEventListener('click', () => setPanel(false));
document.addEventListener('keydown', (ev) => {
  if (ev.key === 'Escape' && !el.panel.hidden) setPanel(false);
});
for (const tab of el.tabs) {
  tab.addEventListener('click', () => {
    filter = tab.dataset.filter;
    for (const t of el.tabs) {
      t.classList.toggle('active', t === tab);
      t.setAttribute('aria-selected', String(t === tab));
    }
    render();
  });
}

function ring() {
  el.bell.classList.remove('ring');
  void el.bell.offsetWidth; // restart the animation
  el.bell.classList.add('ring');
}

function bump() {
  el.badge.classList.remove('bump');
  void el.badge.offsetWidth;
  el.badge.classList.add('bump');
}

function showToast(m) {
  const [first] = content(m.data);
  el.toast.replaceChildren(span('toast-topic', m.topic || 'Notification'), document.createTextNode(first ? first.textContent : ''));
  el.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.toast.hidden = true), 5000);
}

el.toast.addEventListener('click', () => setPanel(true));

function showNotice(text) {
  el.notice.textContent = text;
  el.notice.hidden = false;
}

// ---------------------------------------------------------------- boot

if (new URL(location.href).searchParams.get('open') === '1') setPanel(true);
const fromUrl = takeTokenFromUrl();
if (fromUrl) sessionStorage.setItem(TOKEN_KEY, fromUrl);
const token = sessionStorage.getItem(TOKEN_KEY);
const problem = token && tokenProblem(token);
if (token && !problem) {
  start(token);
} else {
  if (problem) sessionStorage.removeItem(TOKEN_KEY);
  askForToken(problem);
}
