#!/usr/bin/env bash
# CI for the browser client: install the pinned dev dependencies, then run the
# unit tests, README.md's install routes as written (readme/: npm install of
# this directory and of an `npm pack` tarball, and a copied herald.mjs, each
# in a new directory with a fresh npm cache, for an ES module and a CommonJS
# app; the <script type="module"> from a node on another origin, in
# Chromium) and the browser end-to-end test against real Herald processes.
# The README route needs the npm registry (it installs `ws` as a reader does).
#
# Requires HERALD_BIN: the herald binary built from this tree (the node embeds
# clients/js, so the e2e test checks that it serves these very files).
# The Redis unit run and the e2e test need /usr/bin/redis-server, the e2e
# test also /usr/bin/chromium (Debian packages redis-server, chromium).
set -euo pipefail

: "${HERALD_BIN:?set HERALD_BIN to the herald binary (e.g. target/release/herald)}"
# Absolute, as seen from the caller's directory.
HERALD_BIN="$(cd "$(dirname "$HERALD_BIN")" && pwd)/$(basename "$HERALD_BIN")"
export HERALD_BIN
cd "$(dirname "${BASH_SOURCE[0]}")"
[[ -x "$HERALD_BIN" ]] || { echo "clients/js/ci.sh: $HERALD_BIN is not an executable" >&2; exit 1; }

# Playwright must never fetch a browser: the test drives Debian's Chromium.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

echo "--- clients/js: npm ci"
npm ci --no-audit --no-fund

echo "--- clients/js: unit tests (node --test), embedded backend"
npm test

echo "--- clients/js: unit tests (node --test), Redis backend"
npm run test:redis

echo "--- clients/js: README install routes, as written (Node ESM and CommonJS, browser)"
npm run test:readme

echo "--- clients/js: browser end-to-end test (Chromium)"
npm run test:e2e
