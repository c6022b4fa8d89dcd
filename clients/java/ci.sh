#!/usr/bin/env bash
# CI for the Java client: builds the generated stubs and the example, runs the
# unit tests and the end-to-end test against a live Herald node (required
# here: it fails rather than skips when the node's address is missing), then
# runs the example against the same node.
#
# Environment (all required):
#   HERALD_GRPC_ADDR   host:port of the node's gRPC control listener
#   HERALD_WS_URL      its WebSocket endpoint, e.g. ws://127.0.0.1:8080/ws
#   HERALD_JWT_SECRET  its HS256 JWT secret
# Optional: HERALD_API_KEY, the node's --api-key if it has one.
#
# Needs Java 17+ and Maven 3.8+; protoc and protoc-gen-grpc-java come from
# Maven Central through the protobuf plugin.
set -euo pipefail
cd "$(dirname "$0")"

for v in HERALD_GRPC_ADDR HERALD_WS_URL HERALD_JWT_SECRET; do
  if [ -z "${!v:-}" ]; then
    echo "clients/java/ci.sh: $v is not set (the e2e test needs a live Herald node)" >&2
  fi
done

MVN=(mvn -B -ntp -Dstyle.color=never)

# verify = generate stubs, compile (example included), test, package.
# Not -q: surefire's "Tests run: ..." summary is printed at INFO level.
"${MVN[@]}" -Dherald.required=true verify

# The example, as documented in README.md, against the same node.
echo "--- SendExample against ${HERALD_GRPC_ADDR:-?}"
"${MVN[@]}" -q exec:java -Dexec.args="${HERALD_GRPC_ADDR:-} java-ci-example-$$-${RANDOM}"
