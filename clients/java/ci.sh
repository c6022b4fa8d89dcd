#!/usr/bin/env bash
# CI for the Java client, on what a new machine has: an empty local Maven
# repository (a new directory, online, for every Maven call here). It runs
# README.md's "Adding the dependency" section as written: the install
# (generate the stubs, compile with the example, unit tests, the end-to-end
# test against a live Herald node, install the jar), then the consumer
# project (its pom.xml and Send.java) against the same node. It checks that
# the end-to-end test ran, runs the examples (SendExample, BatchExample)
# against the node, and checks that
# the jar leaves the example out.
#
# Environment (all required):
#   HERALD_GRPC_ADDR   host:port of the node's gRPC listener
#   HERALD_WS_URL      its WebSocket endpoint, e.g. ws://127.0.0.1:8080/ws
#   HERALD_JWT_SECRET  its HS256 JWT secret
# Optional: HERALD_API_KEY, the key the node wants if it has --api-keys (the
# key part of name:scope:key, scope send+read or admin).
#
# Needs Java 17+ and Maven 3.8+ and Maven Central; protoc and
# protoc-gen-grpc-java come from Maven Central through the protobuf plugin.
# tls-check.sh does the same for a node with mutual TLS and scoped keys, and
# checks what the example says for each wrong setting.
set -euo pipefail
cd "$(dirname "$0")"
. ./readme.sh

for v in HERALD_GRPC_ADDR HERALD_WS_URL HERALD_JWT_SECRET; do
  if [ -z "${!v:-}" ]; then
    echo "clients/java/ci.sh: $v is not set (the e2e test and the README's program need a live Herald node)" >&2
    exit 1
  fi
done

out="$(mktemp -d)"
repo="$(mktemp -d)"
trap 'rm -rf "$out" "$repo"' EXIT
# Every mvn below, the README's included, uses the empty repository: Maven
# takes maven.repo.local from the JVM's system properties.
export MAVEN_OPTS="${MAVEN_OPTS:+$MAVEN_OPTS }-Dmaven.repo.local=$repo"
MVN=(mvn -B -ntp -Dstyle.color=never)
t0=$SECONDS

echo "--- README.md's install, as written, with an empty local Maven repository"
rm -rf target/surefire-reports
readme_install "$out"
report=target/surefire-reports/TEST-dev.herald.client.E2ETest.xml
[ -f "$report" ] || { echo "clients/java/ci.sh: the install ran no E2ETest ($report missing)" >&2; exit 1; }
attr() { sed -n "s/.*<testsuite [^>]*\b$1=\"\([0-9]*\)\".*/\1/p" "$report" | head -1; }
if [ "$(attr tests)" -eq 0 ] || [ "$(attr skipped)" -ne 0 ] || [ "$(attr failures)" -ne 0 ] || [ "$(attr errors)" -ne 0 ]; then
  echo "clients/java/ci.sh: E2ETest did not pass in full: tests=$(attr tests) skipped=$(attr skipped) failures=$(attr failures) errors=$(attr errors)" >&2
  exit 1
fi
echo "E2ETest: $(attr tests) tests against $HERALD_GRPC_ADDR, none skipped ($((SECONDS - t0)) s so far)"
[ -f "$repo/dev/herald/herald-client/0.1.0-SNAPSHOT/herald-client-0.1.0-SNAPSHOT.jar" ] \
  || { echo "clients/java/ci.sh: the install did not put herald-client into the empty repository $repo" >&2; exit 1; }

echo "--- README.md's consumer project (pom.xml, Send.java), as written, against $HERALD_GRPC_ADDR"
readme_consumer "$out" | tee "$out/consumer.log"
# (Maven's console library writes colour resets even with -B: drop them.)
sed 's/\x1b\[[0-9;]*m//g' "$out/consumer.log" | grep -Eq '^sent to [^ ]+: message [0-9]+-[0-9]+ \(online=(true|false)\)$' \
  || { echo "clients/java/ci.sh: README.md's Send.java did not print the node's message id" >&2; exit 1; }
echo "($((SECONDS - t0)) s so far)"

echo "--- SendExample against $HERALD_GRPC_ADDR"
"${MVN[@]}" -q exec:java -Dexec.args="$HERALD_GRPC_ADDR java-ci-example-$$-${RANDOM}"

echo "--- BatchExample (SendBatch, then its replayed rerun) against $HERALD_GRPC_ADDR"
"${MVN[@]}" -q exec:java -Dexec.mainClass=dev.herald.example.BatchExample \
  -Dexec.args="$HERALD_GRPC_ADDR 200 java-ci-batch-$$-${RANDOM}" | tee "$out/batch.log"
sed 's/\x1b\[[0-9;]*m//g' "$out/batch.log" | grep -q '^batch again: 200 items replayed, none sent twice$' \
  || { echo "clients/java/ci.sh: BatchExample did not confirm its replayed rerun" >&2; exit 1; }

echo "--- the library jar leaves the example out"
jar="target/herald-client-0.1.0-SNAPSHOT.jar"
entries="$(jar tf "$jar")"
if grep -q '^dev/herald/example' <<<"$entries"; then
  grep '^dev/herald/example' <<<"$entries"
  echo "clients/java/ci.sh: $jar contains the example (see maven-jar-plugin's excludes in pom.xml)" >&2
  exit 1
fi
grep -q '^dev/herald/v1/PushServiceGrpc.class$' <<<"$entries" \
  || { echo "clients/java/ci.sh: $jar lacks dev/herald/v1/PushServiceGrpc.class" >&2; exit 1; }
echo "$jar: $(grep -c '\.class$' <<<"$entries") classes, none under dev/herald/example"
echo "clients/java/ci.sh: done in $((SECONDS - t0)) s ($(du -sm "$repo" | cut -f1) MB downloaded into the empty repository)"
