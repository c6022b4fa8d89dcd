// What the README tests share: README.md's marked blocks, and shell commands
// run the way a reader runs them (bash, a clean environment, a process group
// stopped as a whole).

import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { JS_DIR } from '../test/helpers.mjs';

export const README = readFileSync(path.join(JS_DIR, 'README.md'), 'utf8');

/**
 * The fenced code block between `<!-- name:begin -->` and `<!-- name:end -->`
 * in README.md, with info string `lang`. Throws when it is missing: a test
 * of README lines must not pass because the lines are gone.
 */
export function block(name, lang) {
  const m = README.match(new RegExp(`<!-- ${name}:begin -->\\n+\`\`\`${lang}\\n([\\s\\S]*?)\`\`\`\\n+<!-- ${name}:end -->`));
  if (!m) throw new Error(`clients/js/README.md has no \`\`\`${lang} block between <!-- ${name}:begin --> and <!-- ${name}:end -->`);
  return m[1];
}

/**
 * The environment of a reader's shell: this one without Herald's settings,
 * npm's per-script variables or the test runner's, plus `extra`.
 */
export function readerEnv(extra = {}) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (/^(HERALD_|npm_|NODE_TEST_CONTEXT$|NODE_OPTIONS$|INIT_CWD$)/i.test(k)) continue;
    env[k] = v;
  }
  return { ...env, ...extra };
}

const groups = new Set();
process.on('exit', () => {
  for (const pid of groups) {
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }
});

/**
 * Starts `script` in `bash -euo pipefail` in its own process group; returns
 * the child with `out` (stdout and stderr so far), `exited` (a promise of
 * the exit code) and `stop()` (SIGTERM to the whole group, then SIGKILL).
 */
export function shell(script, { cwd, env }) {
  const child = spawn('bash', ['-euo', 'pipefail', '-c', script], { cwd, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  groups.add(child.pid);
  child.out = '';
  child.stdout.on('data', (d) => (child.out += d));
  child.stderr.on('data', (d) => (child.out += d));
  child.exited = new Promise((resolve) => child.on('close', (code, signal) => resolve(code ?? signal)));
  child.exited.then(() => groups.delete(child.pid));
  child.stop = async () => {
    const signal = (s) => {
      try {
        process.kill(-child.pid, s);
      } catch {
        // the group is gone
      }
    };
    signal('SIGTERM');
    const t = setTimeout(() => signal('SIGKILL'), 5000);
    await child.exited;
    clearTimeout(t);
    signal('SIGKILL'); // anything the shell left behind
  };
  return child;
}

/** Runs `script` to the end; throws with its output unless it exits 0 within `timeout` ms. */
export async function run(script, { cwd, env, timeout = 180_000 }) {
  const child = shell(script, { cwd, env });
  const t = setTimeout(() => child.stop(), timeout);
  const code = await child.exited;
  clearTimeout(t);
  if (code !== 0) throw new Error(`this failed (exit ${code}) in ${cwd}:\n${script}\n--- output ---\n${child.out}`);
  return child.out;
}
