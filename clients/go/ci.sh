#!/usr/bin/env bash
# CI for the Go client: vet, build the example, build a consumer module that
# depends on the stubs as README.md says, and test (the end-to-end test
# against a live node when HERALD_GRPC_ADDR is set).
#
# Environment (see e2e_test.go):
#   HERALD_GRPC_ADDR, HERALD_WS_URL, HERALD_JWT_SECRET    a running node
#   HERALD_GRPC_ADDR_2, HERALD_WS_URL_2                   optional second node (cluster test)
#   HERALD_API_KEY                                        optional, if the nodes use --api-key
# With CI=true a missing HERALD_GRPC_ADDR is an error: CI must prove the
# stubs against a live node, not skip the proof.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

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

echo "== go build example"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
go build -o "$out/send" ./examples/send

echo "== a consumer module depends on the stubs as README.md says"
# README's commands between the go-consumer markers run as written, in a
# throwaway module "your-service" next to "herald", a link to this checkout.
# Offline (GOPROXY=off): everything comes from the module cache that the build
# above filled; go.sum starts with this module's verified sums, so no
# checksum database is needed either.
consumer_cmds="$(sed -n '/<!-- go-consumer:begin -->/,/<!-- go-consumer:end -->/p' README.md | sed '/^```/d; /^<!--/d')"
if ! grep -q -- '-replace github.com/herald-push/herald/clients/go=' <<<"$consumer_cmds"; then
  echo "clients/go/ci.sh: no replace command between the go-consumer markers in README.md" >&2
  exit 1
fi
ln -s "$(cd ../.. && pwd)" "$out/herald"
mkdir "$out/your-service"
cp go.sum "$out/your-service/go.sum"
cat >"$out/your-service/main.go" <<'GO'
package main

import (
	"fmt"

	heraldv1 "github.com/herald-push/herald/clients/go/heraldv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	conn, err := grpc.NewClient("127.0.0.1:50051", grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	_ = heraldv1.NewPushServiceClient(conn)
	fmt.Println("consumer built against", heraldv1.PushService_ServiceDesc.ServiceName)
}
GO
(
  cd "$out"
  export GOPROXY=off GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod" GOWORK=off
  (cd your-service && go mod init example.com/your-service 2>/dev/null)
  echo "$consumer_cmds" | sed 's/^/  $ /'
  bash -euo pipefail -c "$consumer_cmds"
  cd your-service
  go build -o "$out/consumer" .
  "$out/consumer"
) || { echo "clients/go/ci.sh: the consumer module of README.md's Install section does not build" >&2; exit 1; }

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
  "$out/send" -addr "$HERALD_GRPC_ADDR" -user "ci-example-$$"
fi
