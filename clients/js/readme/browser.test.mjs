// The README's browser route, in Debian's Chromium: a page on one origin
// (an app server on its own port) runs the README's <script type="module">,
// which imports the client from a node on another origin. Only the node's
// address is put in for `push.example.com`. Without --allowed-origin, and
// with the page's origin in it, the page gets a message pushed to it; with
// only other origins allowed, Chromium refuses the script (no
// Access-Control-Allow-Origin for this page).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { freePort, grpcClient, mintToken, startNode, waitFor } from '../test/helpers.mjs';
import { block } from './readme.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const USER = 'readme-page';

let app;
let appOrigin;
let nodeUrl; // the node the page is served for
let context;
let profileDir;

before(async () => {
  const port = await freePort();
  appOrigin = `http://127.0.0.1:${port}`;
  app = http.createServer((req, res) => {
    if (req.url === '/api/herald-token') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end(mintToken(USER));
    } else if (req.url === '/') {
      const snippet = block('browser-module', 'html');
      assert.ok(snippet.includes("'https://push.example.com/herald.js'") && snippet.includes("'wss://push.example.com/ws'"));
      const page = snippet.replaceAll('https://push.example.com', nodeUrl).replaceAll('wss://push.example.com', nodeUrl.replace(/^http/, 'ws'));
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(`<!doctype html>\n<title>app</title>\n${page}`);
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => app.listen(port, '127.0.0.1', resolve));
  profileDir = mkdtempSync(path.join(tmpdir(), 'herald-readme-chromium-'));
  context = await chromium.launchPersistentContext(profileDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await context?.close().catch(() => {});
  await new Promise((resolve) => (app ? app.close(resolve) : resolve()));
  if (profileDir) rmSync(profileDir, { recursive: true, force: true });
});

/** Opens the app page for a node started with `args`; returns the node, its API, the page and its console lines. */
async function openPage(args) {
  const node = await startNode({ args });
  nodeUrl = node.httpUrl;
  const api = grpcClient(node.grpcAddr);
  const page = await context.newPage();
  const lines = [];
  page.on('console', (m) => lines.push(m.text()));
  page.on('pageerror', (e) => lines.push(`pageerror: ${e.message}`));
  await page.goto(`${appOrigin}/`);
  const done = async () => {
    await page.close();
    api.close();
    await node.stop();
  };
  return { node, api, page, lines, done };
}

async function receives(args) {
  const { api, lines, done } = await openPage(args);
  try {
    await waitFor(async () => (await api.isOnline({ userIds: [USER] })).users[0].connections > 0, { what: `the page to connect (console: ${lines.join(' | ')})` });
    const text = `to the page ${randomUUID()}`;
    await api.send(USER, { text }, { topic: 'readme' });
    await waitFor(() => lines.some((l) => l.includes(text)), { what: `the page to log the message (console: ${lines.join(' | ')})` });
    assert.ok(lines.includes(`herald readme {"text":"${text}"}`), lines.join('\n'));
  } finally {
    await done();
  }
}

describe("README's <script type=\"module\"> from a node on another origin, in Chromium", { timeout: 120_000 }, () => {
  test('a node without --allowed-origin: any page may import it', () => receives([]));

  test("a node whose --allowed-origin lists the page's origin", () => receives(['--allowed-origin', 'https://app.example.com', '--allowed-origin', appOrigin]));

  test('a node that allows only other origins: Chromium refuses the script', async () => {
    const { api, lines, done } = await openPage(['--allowed-origin', 'https://app.example.com']);
    try {
      await waitFor(() => lines.some((l) => l.includes('blocked by CORS policy')), { what: `a CORS error (console: ${lines.join(' | ')})` });
      assert.equal((await api.isOnline({ userIds: [USER] })).users[0].connections, 0);
    } finally {
      await done();
    }
  });
});
