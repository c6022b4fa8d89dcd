// The README's Node routes, run as written: each install block in a new
// directory with a fresh npm cache (so the packages really come from where
// the README says), then the README's ES module and CommonJS programs,
// started with the README's command against a live node. Each must print a
// message pushed to it through the gRPC API.
//
// The directory of each run holds `herald` -> this repository, as the
// README assumes (the app is created next to the clone); `herald` on PATH
// is HERALD_BIN, and HERALD_WS_URL / HERALD_JWT_SECRET name the node.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { lstatSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { HERALD_BIN, JS_DIR, SECRET, grpcClient, startNode, stopAll, waitFor } from '../test/helpers.mjs';
import { README, block, readerEnv, run, shell } from './readme.mjs';

const REPO = path.resolve(JS_DIR, '../..');
const PACKAGE = '@herald-push/client';

let node;
let api;
let bin;
const temps = [];

function temp(prefix) {
  const d = mkdtempSync(path.join(tmpdir(), prefix));
  temps.push(d);
  return d;
}

before(async () => {
  node = await startNode();
  api = grpcClient(node.grpcAddr);
  bin = temp('herald-readme-bin-');
  symlinkSync(HERALD_BIN, path.join(bin, 'herald'));
});

after(async () => {
  api?.close();
  await stopAll();
  for (const d of temps) rmSync(d, { recursive: true, force: true });
});

/**
 * Runs README block `name` where a reader would: in a new directory next to
 * `herald/` (this repository), with a fresh npm cache. Returns the app
 * directory the block ends in and the environment for the app.
 */
async function install(name) {
  const root = temp('herald-readme-');
  symlinkSync(REPO, path.join(root, 'herald'));
  const env = readerEnv({
    PATH: `${bin}${path.delimiter}${process.env.PATH}`,
    npm_config_cache: temp('herald-npm-cache-'), // fresh: nothing installed before helps
    npm_config_audit: 'false',
    npm_config_fund: 'false',
    npm_config_update_notifier: 'false',
  });
  const pwd = path.join(temp('herald-readme-pwd-'), 'pwd');
  await run(`${block(name, 'sh')}\nprintf %s "$PWD" > '${pwd}'`, { cwd: root, env });
  const app = readFileSync(pwd, 'utf8');
  assert.notEqual(app, root, `README block ${name} makes an app directory and enters it`);
  return { app, env };
}

async function connections(user) {
  const res = await api.isOnline({ userIds: [user] });
  return res.users[0]?.connections ?? 0;
}

/**
 * Writes `source` to `file` in `app`, starts it with the README's run
 * command (naming `file`), pushes a message to the command's user and waits
 * until the program prints it.
 */
async function listen({ app, env }, file, source) {
  writeFileSync(path.join(app, file), source);
  const runLine = block('node-run', 'sh');
  assert.match(runLine, /listen\.mjs/, 'the README runs listen.mjs');
  const user = runLine.match(/herald token (\S+?)\)/)?.[1];
  assert.ok(user, `the README's run command mints a token with \`herald token <user>\`: ${runLine}`);
  await waitFor(async () => (await connections(user)) === 0, { what: `${user} offline before ${file} starts` });
  const proc = shell(runLine.replaceAll('listen.mjs', file), {
    cwd: app,
    env: { ...env, HERALD_WS_URL: node.wsUrl, HERALD_JWT_SECRET: SECRET },
  });
  try {
    await waitFor(async () => proc.exitCode !== null || (await connections(user)) > 0, { timeout: 15_000, what: `${file} to connect as ${user}` });
    assert.equal(proc.exitCode, null, `${file} exited:\n${proc.out}`);
    const text = `hello from the README test ${randomUUID()}`;
    const id = await api.send(user, { text }, { topic: 'readme' });
    await waitFor(() => proc.out.includes(text) || proc.exitCode !== null, { timeout: 15_000, what: `${file} to print the message` }).catch(() => {});
    assert.ok(proc.out.includes(text), `${file} did not print the message pushed to ${user}:\n${proc.out}`);
    assert.match(proc.out, new RegExp(`${id} readme \\{"text":"${text}"\\}`), `${file} prints id, topic and data`);
  } finally {
    await proc.stop();
  }
}

const esm = () => block('node-esm', 'js');
const cjs = () => block('node-cjs', 'js');

describe("README's Node install routes, as written", { timeout: 600_000 }, () => {
  test('npm install from the clone: an ES module and a CommonJS app', async () => {
    const app = await install('node-install');
    const dir = path.join(app.app, 'node_modules', PACKAGE);
    assert.ok(lstatSync(dir).isSymbolicLink(), 'npm links the package to the clone');
    assert.equal(realpathSync(dir), realpathSync(JS_DIR));
    await listen(app, 'listen.mjs', esm());
    await listen(app, 'listen.cjs', cjs());

    // The README's import() line for CommonJS on Node before 20.19 / 22.12.
    const line = README.match(/`(const \{ connect \} = await import\('@herald-push\/client'\);)`/)?.[1];
    assert.ok(line, "README has the CommonJS `const { connect } = await import('@herald-push/client');` line");
    writeFileSync(path.join(app.app, 'dynamic.cjs'), `(async () => {\n  ${line}\n  console.log(typeof connect);\n})();\n`);
    assert.equal((await run('node dynamic.cjs', { cwd: app.app, env: app.env })).trim(), 'function');
  });

  test('npm pack, then npm install of the tarball: an ES module and a CommonJS app', async () => {
    const app = await install('node-pack');
    const dir = path.join(app.app, 'node_modules', PACKAGE);
    assert.ok(!lstatSync(dir).isSymbolicLink(), 'a copy, not a link');
    assert.equal(readFileSync(path.join(dir, 'herald.js'), 'utf8'), readFileSync(path.join(JS_DIR, 'herald.js'), 'utf8'));
    await listen(app, 'listen.mjs', esm());
    await listen(app, 'listen.cjs', cjs());
  });

  test('a copied herald.mjs: an ES module and a CommonJS app', async () => {
    const app = await install('node-copy');
    assert.match(README, /import from `'\.\/herald\.mjs'` where the programs above say\s+`'@herald-push\/client'`/);
    const local = (src) => {
      assert.ok(src.includes(`'${PACKAGE}'`));
      return src.replaceAll(`'${PACKAGE}'`, "'./herald.mjs'");
    };
    await listen(app, 'listen.mjs', local(esm()));
    await listen(app, 'listen.cjs', local(cjs()));
  });

  test('a copied herald.js in an `npm init -y` app is CommonJS to Node (why the README says herald.mjs)', async () => {
    const app = temp('herald-readme-plain-');
    await run('npm init -y >/dev/null', { cwd: app, env: readerEnv({ npm_config_cache: temp('herald-npm-cache-') }) });
    // npm 10.9+ writes "type": "commonjs"; older ones no type, where only Node
    // 20.19+ / 22.7+ guess (with a warning) that the file is an ES module.
    writeFileSync(path.join(app, 'herald.js'), readFileSync(path.join(JS_DIR, 'herald.js')));
    writeFileSync(path.join(app, 'main.mjs'), "import { connect } from './herald.js';\nconsole.log(typeof connect);\n");
    if (JSON.parse(readFileSync(path.join(app, 'package.json'), 'utf8')).type === 'commonjs') {
      await assert.rejects(run('node main.mjs', { cwd: app, env: readerEnv() }), /is a CommonJS module/);
    }
  });
});
