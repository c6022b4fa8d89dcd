#!/usr/bin/env bash
# CI for the Go client: vet, README.md's Install section followed as written
# on what a new machine has (an empty module cache, the default module
# proxy), its program's send to a live node, the tests (the end-to-end test
# against a live node when HERALD_GRPC_ADDR is set) and the examples (send,
# and batch: SendBatch and its replayed rerun).
#
# Environment (see e2e_test.go):
#   HERALD_GRPC_ADDR, HERALD_WS_URL, HERALD_JWT_SECRET    a running node
#   HERALD_GRPC_ADDR_2, HERALD_WS_URL_2                   optional second node (cluster test)
#   HERALD_API_KEY                                        optional: the key the nodes want, if they
#                                                         have --api-keys (the key part of name:scope:key)
# With CI=true a missing HERALD_GRPC_ADDR is an error: CI must prove the
# stubs against a live node, not skip the proof.
#
# tls-check.sh does the same for a node with TLS, client certificates and
# scoped keys, and checks what the example says for each wrong setting.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
. ./readme.sh

if [[ -z "${HERALD_GRPC_ADDR:-}" ]]; then
  if [[ "${CI:-}" == "true" ]]; then
    echo "clients/go/ci.sh: HERALD_GRPC_ADDR is not set; CI must run the end-to-end test against a live node" >&2
    exit 1
  fi
  echo "clients/go/ci.sh: HERALD_GRPC_ADDR not set; the end-to-end test will be skipped" >&2
else
  for v in HERALD_WS_URL HERALD_JWT_SECRET; do
    if [[ -z "${!v:-}" ]]; then
      echo "clients/go/ci.sh: HERALD_GRPC_ADDR is set but $v is not" >&2
      exit 1
    fi
  done
fi

echo "== go vet ./..."
go vet ./...

out="$(mktemp -d)"
modcache="$(mktemp -d)"
cleanup() {
  # Module cache files are read-only: go clean removes them.
  GOMODCACHE="$modcache" go clean -modcache 2>/dev/null || chmod -R u+w "$modcache"
  rm -rf "$out" "$modcache"
}
trap cleanup EXIT

echo "== go build examples"
go build -o "$out/send" ./examples/send
go build -o "$out/batch" ./examples/batch

# README.md's go-install, go-main and go-run blocks, run as written in a
# throwaway directory, with an empty module cache and this machine's own
# GOPROXY, GOFLAGS and checksum database: what a new user's machine does.
echo "== README.md's Install section, as written, with an empty module cache (GOPROXY=$(go env GOPROXY))"
start=$SECONDS
mode=""
[[ -z "${HERALD_GRPC_ADDR:-}" ]] && mode=build-only
set +e
GOMODCACHE="$modcache" run_readme "$out" $mode 2>&1 | tee "$out/readme.log"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -ne 0 ]]; then
  echo "clients/go/ci.sh: README.md's Install section does not work as written (see above)" >&2
  exit 1
fi
if [[ -n "${HERALD_GRPC_ADDR:-}" ]]; then
  # It delivered: the node answered with a message id for the user.
  grep -Eq '^sent to [^ ]+: message [0-9]+-[0-9]+ \(online=(true|false)\)$' "$out/readme.log" \
    || { echo "clients/go/ci.sh: README.md's program did not print the node's message id" >&2; exit 1; }
fi
echo "   ($((SECONDS - start)) s, $(find "$modcache/cache/download" -name '*.zip' | wc -l) modules downloaded)"

echo "== go test -count=1 -v ./..."
log="$out/test.log"
set +e
go test -count=1 -v ./... 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -ne 0 ]]; then
  exit "$rc"
fi

# The e2e must really have run when a node was given.
if [[ -n "${HERALD_GRPC_ADDR:-}" ]]; then
  if ! grep -q -- '^--- PASS: TestE2E ' "$log"; then
    echo "clients/go/ci.sh: TestE2E did not pass (skipped?)" >&2
    exit 1
  fi
  if [[ -n "${HERALD_GRPC_ADDR_2:-}" ]] && ! grep -q -- '^--- PASS: TestE2ECrossNode ' "$log"; then
    echo "clients/go/ci.sh: TestE2ECrossNode did not pass (skipped?)" >&2
    exit 1
  fi
  echo "== example against $HERALD_GRPC_ADDR"
  "$out/send" -grpc-addr "$HERALD_GRPC_ADDR" -user "ci-example-$$"
  echo "== batch example against $HERALD_GRPC_ADDR"
  "$out/batch" -grpc-addr "$HERALD_GRPC_ADDR" -users 200 -prefix "ci-batch-$$-$RANDOM" | tee "$out/batch.log"
  grep -q '^batch again: 200 items replayed, none sent twice$' "$out/batch.log" \
    || { echo "clients/go/ci.sh: the batch example did not confirm its replayed rerun" >&2; exit 1; }
fi
