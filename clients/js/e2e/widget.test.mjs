// End-to-end: the demo widget in Debian's Chromium (driven by playwright-core,
// no downloaded browser) against two real Herald nodes sharing one Redis.
//
//   tab 1 -> node n1 (restarted mid-test), tab 2 -> node n2
//   gRPC SendToUser / MarkRead through either node
//
// Requires: the herald binary (HERALD_BIN, default ../../target/release/herald)
// built from this tree, /usr/bin/chromium and /usr/bin/redis-server.
// Saves a screenshot to demo/screenshot.png.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { JS_DIR, grpcClient, mintToken, sleep, startNode, startRedis, stopAll, waitFor } from '../test/helpers.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SCREENSHOT = path.join(JS_DIR, 'demo', 'screenshot.png');
const USER = 'alice';

let redis;
let n1;
let n2;
let api1;
let api2;
let context;
let profileDir;
let tab1;
let tab2;
const pageErrors = [];

/** Everything sent to USER so far, in send order: [{id, title}]. */
const sent = [];

async function send(api, title, body, topic) {
  const id = await api.send(USER, { title, body }, { topic });
  sent.push({ id, title });
  return id;
}

async function openTab(node) {
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(`${node.nodeId}: ${e.message}`));
  await page.goto(`${node.httpUrl}/?token=${encodeURIComponent(mintToken(USER))}`);
  return page;
}

const badge = (page) => page.locator('#badge').getAttribute('data-count');
const stateOf = (page) => page.locator('#state').getAttribute('data-state');
const listIds = (page) => page.locator('#list [data-id]').evaluateAll((els) => els.map((e) => e.dataset.id));

async function expectBadge(page, count, what) {
  await waitFor(async () => (await badge(page)) === String(count), { timeout: 15_000, what: `${what}: badge ${count} (is ${await badge(page)})` });
  assert.equal(await page.locator('#badge').isVisible(), count > 0);
}

before(async () => {
  redis = await startRedis();
  n1 = await startNode({ nodeId: 'n1', redisUrl: redis.url });
  n2 = await startNode({ nodeId: 'n2', redisUrl: redis.url });
  api1 = grpcClient(n1.grpcAddr);
  api2 = grpcClient(n2.grpcAddr);

  // The node embeds clients/js at build time: make sure it is this tree's.
  for (const [route, file] of [['/herald.js', 'herald.js'], ['/demo/app.js', 'demo/app.js'], ['/demo/style.css', 'demo/style.css'], ['/', 'demo/index.html']]) {
    const served = await (await fetch(`${n1.httpUrl}${route}`)).text();
    assert.equal(served, readFileSync(path.join(JS_DIR, file), 'utf8'), `${route} served by the node differs from clients/js/${file}: rebuild herald (cargo build --release)`);
  }

  profileDir = mkdtempSync(path.join(tmpdir(), 'herald-e2e-chromium-'));
  context = await chromium.launchPersistentContext(profileDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1280, height: 800 },
    deviceScaleFactor: 1,
  });
});

after(async () => {
  await context?.close().catch(() => {});
  api1?.close();
  api2?.close();
  await stopAll();
  if (profileDir) rmSync(profileDir, { recursive: true, force: true });
});

describe('notification widget in Chromium', () => {
  test('the page served by the node connects and shows the user as live', async () => {
    tab1 = await openTab(n1);
    await waitFor(async () => (await stateOf(tab1)) === 'live', { what: 'tab 1 live' });
    assert.equal(await tab1.locator('#user').textContent(), USER);
    assert.equal(await tab1.locator('#state .state-label').textContent(), 'Live');
    assert.equal(new URL(tab1.url()).searchParams.get('token'), null, 'the token is taken out of the address bar');
    assert.equal(await badge(tab1), '0');
    assert.equal(await tab1.locator('#badge').isVisible(), false);
    assert.equal(await tab1.locator('#token-dialog').isVisible(), false);
    const online = await api2.isOnline({ userIds: [USER] });
    assert.equal(online.users[0].connections, 1, 'n2 sees the browser connected to n1');
  });

  test('a SendToUser updates the badge and the list live', async () => {
    const a = await send(api2, 'Invoice INV-2042 paid', 'Globex Corporation paid $4,200.00 by bank transfer.', 'billing.invoice');
    await expectBadge(tab1, 1, 'first message');
    const b = await send(api1, 'Payment failed', 'The card ending 4242 for Umbrella Labs was declined.', 'billing.payment');
    await expectBadge(tab1, 2, 'second message');

    await tab1.click('#bell');
    await tab1.locator('#panel').waitFor({ state: 'visible' });
    assert.deepEqual(await listIds(tab1), [b, a], 'newest first');
    const item = tab1.locator(`#list [data-id="${b}"]`);
    assert.equal(await item.getAttribute('data-unread'), 'true');
    assert.match(await item.textContent(), /Payment failed/);
    assert.match(await item.textContent(), /Umbrella Labs was declined/);
    assert.match(await item.textContent(), /billing\.payment/);
    assert.match(await item.textContent(), /just now/);
    assert.equal(await tab1.locator('#unread-label').textContent(), '2 unread');
  });

  test('marking read in one tab updates the badge in a second tab (on another node)', async () => {
    tab2 = await openTab(n2);
    await waitFor(async () => (await stateOf(tab2)) === 'live', { what: 'tab 2 live' });
    await expectBadge(tab2, 2, 'tab 2 after connect');
    assert.deepEqual(await listIds(tab2), [sent[1].id, sent[0].id]);

    // Tab 1: click the older message: it (and anything older) is read.
    await tab1.click(`#list [data-id="${sent[0].id}"] button`);
    await expectBadge(tab2, 1, 'tab 2 after a read in tab 1');
    await expectBadge(tab1, 1, 'tab 1 after its own read');
    await tab2.click('#bell');
    assert.equal(await tab2.locator(`#list [data-id="${sent[0].id}"]`).getAttribute('data-unread'), 'false');
    assert.equal(await tab2.locator(`#list [data-id="${sent[1].id}"]`).getAttribute('data-unread'), 'true');
    assert.equal((await api1.unreadCount({ userId: USER })).count, 1);

    // Tab 1: "mark all read".
    await tab1.click('#mark-all');
    await expectBadge(tab2, 0, 'tab 2 after mark all read in tab 1');
    await expectBadge(tab1, 0, 'tab 1 after mark all read');
    assert.equal(await tab2.locator('#list [data-unread="true"]').count(), 0);

    // And the other way round, through the MarkRead RPC.
    await send(api1, 'Weekly report ready', 'Revenue is up 6.2% week over week.', 'reports.weekly');
    await expectBadge(tab1, 1, 'tab 1 new message');
    await expectBadge(tab2, 1, 'tab 2 new message');
    await api2.markRead({ userId: USER, upToMessageId: '' });
    await expectBadge(tab1, 0, 'tab 1 after MarkRead RPC');
    await expectBadge(tab2, 0, 'tab 2 after MarkRead RPC');
  });

  test('node n1 restarts: what was sent meanwhile through n2 appears once, in order, without a reload', async () => {
    await tab1.evaluate(() => {
      window.__sameDocument = true;
    });
    const idsBefore = await listIds(tab1);

    await n1.stop('SIGTERM');
    await waitFor(async () => ['reconnecting', 'connecting'].includes(await stateOf(tab1)), { what: 'tab 1 to notice the node is gone' });
    assert.equal(await tab1.locator('#state .state-label').textContent(), 'Reconnecting…');

    const during = [
      await send(api2, 'New team member', 'Dana Scully joined the Billing team.', 'team.member'),
      await send(api2, 'Deploy #1289 finished', 'api-gateway v2.14.0 is live in eu-west-1.', 'deploys'),
      await send(api2, 'Refund issued', 'Initech was refunded $150.00 for INV-2040.', 'billing.refund'),
    ];
    await expectBadge(tab2, 3, 'tab 2 (still connected to n2)');
    await sleep(500);

    n1 = await startNode({ nodeId: 'n1', redisUrl: redis.url, ports: n1.ports });
    api1.close();
    api1 = grpcClient(n1.grpcAddr);
    await waitFor(async () => (await stateOf(tab1)) === 'live', { timeout: 40_000, what: 'tab 1 to reconnect to the restarted n1' });
    await expectBadge(tab1, 3, 'tab 1 after the restart');

    const ids = await listIds(tab1);
    assert.deepEqual(ids, [...during].reverse().concat(idsBefore), 'each message once, newest first, nothing lost');
    assert.equal(new Set(ids).size, ids.length, 'no duplicates');
    for (const id of during) assert.equal(await tab1.locator(`#list [data-id="${id}"]`).getAttribute('data-unread'), 'true');
    assert.equal(await tab1.evaluate(() => window.__sameDocument), true, 'the page was not reloaded');
    assert.equal(await tab1.locator('#notice').isVisible(), false, 'resumed: true (no "may have missed" notice)');

    // Live again through the restarted node.
    const live = await send(api1, 'Invoice INV-2043 created', 'Hooli · $2,340.00 · due Dec 1.', 'billing.invoice');
    await expectBadge(tab1, 4, 'tab 1 live after the restart');
    await expectBadge(tab2, 4, 'tab 2 live after the restart');
    assert.deepEqual((await listIds(tab1)).slice(0, 1), [live]);
    assert.deepEqual(await listIds(tab2), await listIds(tab1), 'both tabs show the same list');
  });

  test('screenshot of the widget', async () => {
    // One read message in the middle makes read vs unread visible.
    await tab1.click(`#list [data-id="${sent[3].id}"] button`);
    await expectBadge(tab1, 3, 'after reading one');
    await sleep(400); // let the badge animation settle
    await tab1.mouse.move(640, 400);
    await tab1.screenshot({ path: SCREENSHOT });
    assert.ok(readFileSync(SCREENSHOT).length > 10_000);
    assert.deepEqual(pageErrors, [], 'no uncaught errors in the page');
  });

  test('message center: scroll back, read one, unread it, delete one, mark all read, second tab in sync', async () => {
    for (let i = 0; i < 25; i++) await send(api2, `Build #${i} finished`, `Pipeline ${i} is green.`, 'ci.build');
    const total = sent.length; // 32: nothing trimmed (inbox keeps 1000)
    await expectBadge(tab1, 28, 'tab 1 after 25 more');
    await expectBadge(tab2, 28, 'tab 2 after 25 more');
    // A fresh page load lists the newest page; older ones on demand.
    await tab1.reload();
    await waitFor(async () => (await stateOf(tab1)) === 'live', { what: 'tab 1 live after reload' });
    await tab1.click('#bell');
    await waitFor(async () => (await listIds(tab1)).length === 20, { what: 'first page of 20' });
    assert.deepEqual(await listIds(tab1), sent.slice(-20).map((m) => m.id).reverse());
    await tab1.click('[data-testid="load-more"]');
    await waitFor(async () => (await listIds(tab1)).length === total, { what: 'every page loaded' });
    assert.deepEqual(await listIds(tab1), sent.map((m) => m.id).reverse(), 'scrolled back to the oldest, in order');
    assert.equal(await tab1.locator('[data-testid="load-more"]').count(), 0, 'nothing more to load');

    // Read one in the middle, then unread it: both tabs follow.
    const mid = sent[total - 15].id;
    const item = (tab, id) => tab.locator(`#list [data-id="${id}"]`);
    assert.equal(await item(tab1, mid).getAttribute('data-unread'), 'true');
    await item(tab1, mid).locator('[data-testid="toggle-read"]').click();
    await expectBadge(tab2, 27, 'tab 2 after reading one in tab 1');
    await expectBadge(tab1, 27, 'tab 1 after reading one');
    await waitFor(async () => (await item(tab2, mid).getAttribute('data-unread')) === 'false', { what: 'tab 2 shows it read' });
    await item(tab1, mid).locator('[data-testid="toggle-read"]').click();
    await expectBadge(tab2, 28, 'tab 2 after unreading it in tab 1');
    await waitFor(async () => (await item(tab2, mid).getAttribute('data-unread')) === 'true', { what: 'tab 2 shows it unread' });

    // Delete one in tab 2: it disappears everywhere.
    const gone = sent[total - 3].id;
    await item(tab2, gone).locator('[data-testid="delete"]').click();
    await waitFor(async () => !(await listIds(tab1)).includes(gone), { what: 'tab 1 drops the deleted message' });
    await expectBadge(tab1, 27, 'tab 1 after a delete in tab 2');
    assert.ok(!(await listIds(tab2)).includes(gone));
    const listed = await api1.listMessages({ userId: USER, limit: 100 });
    assert.ok(!listed.messages.some((m) => m.messageId === gone), 'gone from the server too');

    // Mark all read in tab 1.
    await tab1.click('#mark-all');
    await expectBadge(tab1, 0, 'tab 1 after mark all read');
    await expectBadge(tab2, 0, 'tab 2 after mark all read');
    await waitFor(async () => (await tab2.locator('#list [data-unread="true"]').count()) === 0, { what: 'tab 2 shows everything read' });
    assert.deepEqual(pageErrors, [], 'no uncaught errors in the page');
  });
});
