#!/usr/bin/env bash
# The Java client against a node with TLS, mutual TLS and scoped keys:
# README.md's Send.java and SendExample send over mutual TLS, and for each
# wrong setting SendExample fails with advice that names the fix (see
# src/main/java/dev/herald/example/Advice.java).
#
# Environment (all required):
#   HERALD_GRPC_ADDR        host:port of the node's gRPC listener; the host must be a
#                           name in the node's certificate (localhost, say)
#   HERALD_TLS_CA           PEM file of the CA that signed the node's certificate
#   HERALD_TLS_CLIENT_CERT  PEM client certificate signed by the node's --grpc-tls-client-ca
#   HERALD_TLS_CLIENT_KEY   its PEM (PKCS#8) private key
#   HERALD_API_KEY          a key of scope send+read (or admin): the key part of name:scope:key
#   HERALD_READ_KEY         a key of scope read
# Uses the default local Maven repository (~/.m2). Needs openssl.
set -euo pipefail
cd "$(dirname "$0")"
. ./readme.sh

for v in HERALD_GRPC_ADDR HERALD_TLS_CA HERALD_TLS_CLIENT_CERT HERALD_TLS_CLIENT_KEY HERALD_API_KEY HERALD_READ_KEY; do
  [[ -n "${!v:-}" ]] || { echo "clients/java/tls-check.sh: $v is not set" >&2; exit 1; }
done
addr="$HERALD_GRPC_ADDR" ca="$HERALD_TLS_CA" cert="$HERALD_TLS_CLIENT_CERT" key="$HERALD_TLS_CLIENT_KEY"
send_key="$HERALD_API_KEY" read_key="$HERALD_READ_KEY"
unset_all=(-u HERALD_GRPC_ADDR -u HERALD_TLS_CA -u HERALD_TLS_CLIENT_CERT -u HERALD_TLS_CLIENT_KEY -u HERALD_API_KEY -u HERALD_TLS_SERVER_NAME)
MVN=(mvn -B -ntp -Dstyle.color=never)

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj "/CN=a CA the node does not know" -keyout "$out/other-ca.key" -out "$out/other-ca.pem" 2>/dev/null
closed_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"

echo "--- README.md's install (no node: E2ETest skips) and Send.java over mutual TLS (the HERALD_* variables)"
env "${unset_all[@]}" bash -c '. ./readme.sh && readme_install "$1"' _ "$out"
readme_consumer "$out" | tee "$out/consumer.log"
sed 's/\x1b\[[0-9;]*m//g' "$out/consumer.log" | grep -Eq '^sent to [^ ]+: message [0-9]+-[0-9]+ ' \
  || { echo "clients/java/tls-check.sh: README.md's Send.java did not send over mutual TLS" >&2; exit 1; }

"${MVN[@]}" -q dependency:build-classpath -Dmdep.includeScope=runtime -Dmdep.outputFile="$out/classpath" >/dev/null
cp="target/classes:$(cat "$out/classpath")"
example() { java -cp "$cp" dev.herald.example.SendExample "$@"; }

echo "--- SendExample over mutual TLS"
example "$addr" "ci-java-mtls-$$"

# expect_advice NAME 'fragment|fragment...' [VAR=value...] -- [address]: SendExample,
# with only the given HERALD_* variables set, must fail and say every fragment.
fail=0
expect_advice() {
  local name=$1 wants=$2; shift 2
  local vars=()
  while [[ $1 != -- ]]; do vars+=("$1"); shift; done
  shift
  local rc=0
  env "${unset_all[@]}" "${vars[@]}" timeout 120 java -cp "$cp" dev.herald.example.SendExample "${1:-$addr}" "ci-java-advice-$$" \
    >"$out/case.log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]]; then
    echo "FAIL $name: the example succeeded"; fail=1; return
  fi
  local w missing=""
  IFS='|' read -ra ws <<<"$wants"
  for w in "${ws[@]}"; do grep -qF -- "$w" "$out/case.log" || missing+=" [$w]"; done
  if [[ -n $missing ]]; then
    echo "FAIL $name: the output lacks$missing:"; grep -v '^\s*at ' "$out/case.log" | sed 's/^/    /'; fail=1; return
  fi
  echo "ok   $name: $(grep -m1 ' failed: ' "$out/case.log")"
}
mtls=(HERALD_TLS_CA="$ca" HERALD_TLS_CLIENT_CERT="$cert" HERALD_TLS_CLIENT_KEY="$key")

echo "--- what SendExample says for each wrong setting"
expect_advice "plaintext to the TLS node" 'speaks TLS but this client uses plaintext|HERALD_TLS_CA' HERALD_API_KEY="$send_key" --
expect_advice "a CA that did not sign the node's certificate" 'not trusted|is not the CA that signed it|HERALD_TLS_CA' \
  "${mtls[@]}" HERALD_TLS_CA="$out/other-ca.pem" HERALD_API_KEY="$send_key" --
expect_advice "no client certificate" 'requires a client certificate|HERALD_TLS_CLIENT_CERT|HERALD_TLS_CLIENT_KEY' \
  HERALD_TLS_CA="$ca" HERALD_API_KEY="$send_key" --
expect_advice "a client certificate of another CA" 'refused the client certificate|--grpc-tls-client-ca' \
  "${mtls[@]}" HERALD_TLS_CLIENT_CERT="$out/other-ca.pem" HERALD_TLS_CLIENT_KEY="$out/other-ca.key" HERALD_API_KEY="$send_key" --
expect_advice "no API key" 'requires an API key|HERALD_API_KEY|key part' "${mtls[@]}" --
expect_advice "a wrong API key" 'does not know this API key|HERALD_API_KEY' "${mtls[@]}" HERALD_API_KEY="wrong-$send_key" --
expect_advice "the whole name:scope:key" 'key part only' "${mtls[@]}" HERALD_API_KEY="backend:send+read:$send_key" --
expect_advice "a read-only key sends" 'PERMISSION_DENIED|needs scope "send"|send, send+read or admin' \
  "${mtls[@]}" HERALD_API_KEY="$read_key" --
expect_advice "nothing listening" "nothing accepts connections at 127.0.0.1:$closed_port|is the node running" \
  -- "127.0.0.1:$closed_port"
expect_advice "a host name that does not resolve" 'does not resolve|HERALD_GRPC_ADDR' -- "no-such-host.invalid:50051"
if [[ $fail -ne 0 ]]; then
  echo "clients/java/tls-check.sh: SendExample's advice is wrong or missing (see FAIL above)" >&2
  exit 1
fi
echo "clients/java/tls-check.sh: all cases passed"
