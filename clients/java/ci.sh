#!/usr/bin/env bash
# CI for the Java client: builds the generated stubs and the example, runs the
# unit tests and the end-to-end test against a live Herald node (required
# here: it fails rather than skips when the node's address is missing),
# installs the jar into the local Maven repository, runs the example against
# the same node, checks that the jar leaves the example out, and builds and
# runs a consumer project from README.md's pom.xml.
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

# install = generate stubs, compile (example included), test, package, and
# install the jar into the local repository (~/.m2), as README.md tells users.
# Not -q: surefire's "Tests run: ..." summary is printed at INFO level.
"${MVN[@]}" -Dherald.required=true install

# The example, as documented in README.md, against the same node.
echo "--- SendExample against ${HERALD_GRPC_ADDR:-?}"
"${MVN[@]}" -q exec:java -Dexec.args="${HERALD_GRPC_ADDR:-} java-ci-example-$$-${RANDOM}"

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

# README.md's consumer pom.xml, verbatim, with a one-class program that calls
# Stats on the node; offline (-o): everything it needs is in ~/.m2 by now.
echo "--- a consumer project built from README.md's pom.xml"
consumer="$(mktemp -d)"
trap 'rm -rf "$consumer"' EXIT
sed -n '/<!-- consumer-pom:begin -->/,/<!-- consumer-pom:end -->/p' README.md \
  | sed '/^<!-- consumer-pom:/d; /^```/d' >"$consumer/pom.xml"
grep -q '<artifactId>herald-client</artifactId>' "$consumer/pom.xml" \
  || { echo "clients/java/ci.sh: no consumer pom.xml between the consumer-pom markers in README.md" >&2; exit 1; }
mkdir -p "$consumer/src/main/java/com/example"
cat >"$consumer/src/main/java/com/example/Consumer.java" <<'JAVA'
package com.example;

import dev.herald.v1.PushServiceGrpc;
import dev.herald.v1.StatsRequest;
import dev.herald.v1.StatsResponse;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.stub.MetadataUtils;
import java.util.concurrent.TimeUnit;

public final class Consumer {
    public static void main(String[] args) throws InterruptedException {
        ManagedChannel channel = ManagedChannelBuilder.forTarget(args[0]).usePlaintext().build();
        try {
            var herald = PushServiceGrpc.newBlockingStub(channel);
            String key = System.getenv("HERALD_API_KEY");
            if (key != null && !key.isBlank()) {
                Metadata md = new Metadata();
                md.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + key);
                herald = herald.withInterceptors(MetadataUtils.newAttachHeadersInterceptor(md));
            }
            StatsResponse stats = herald.withDeadlineAfter(5, TimeUnit.SECONDS).stats(StatsRequest.getDefaultInstance());
            System.out.println("consumer: Stats answered by node " + stats.getNode().getNodeId()
                    + ", " + stats.getNodesCount() + " node(s) in the cluster");
        } finally {
            channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
        }
    }
}
JAVA
(cd "$consumer" && "${MVN[@]}" -o -q compile) \
  || { echo "clients/java/ci.sh: the consumer pom.xml of README.md does not compile against the installed client" >&2; exit 1; }
if [ -n "${HERALD_GRPC_ADDR:-}" ]; then
  (cd "$consumer" && "${MVN[@]}" -o -q org.codehaus.mojo:exec-maven-plugin:3.6.4:java \
      -Dexec.mainClass=com.example.Consumer -Dexec.args="$HERALD_GRPC_ADDR") \
    || { echo "clients/java/ci.sh: the consumer program failed against $HERALD_GRPC_ADDR" >&2; exit 1; }
fi
