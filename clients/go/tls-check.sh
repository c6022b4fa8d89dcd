#!/usr/bin/env bash
# The Go client against a node with TLS, mutual TLS and scoped keys: README.md's
# program and the example send over mutual TLS, and for each wrong setting the
# example fails with advice that names the fix (see examples/send/advice.go).
#
# Environment (all required):
#   HERALD_GRPC_ADDR        host:port of the node's gRPC listener; the host must be a
#                           name in the node's certificate (localhost, say)
#   HERALD_TLS_CA           PEM file of the CA that signed the node's certificate
#   HERALD_TLS_CLIENT_CERT  PEM client certificate signed by the node's --grpc-tls-client-ca
#   HERALD_TLS_CLIENT_KEY   its PEM private key
#   HERALD_API_KEY          a key of scope send+read (or admin): the key part of name:scope:key
#   HERALD_READ_KEY         a key of scope read
# Needs openssl (for a CA the node does not know).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
. ./readme.sh

for v in HERALD_GRPC_ADDR HERALD_TLS_CA HERALD_TLS_CLIENT_CERT HERALD_TLS_CLIENT_KEY HERALD_API_KEY HERALD_READ_KEY; do
  [[ -n "${!v:-}" ]] || { echo "clients/go/tls-check.sh: $v is not set" >&2; exit 1; }
done
addr="$HERALD_GRPC_ADDR" ca="$HERALD_TLS_CA" cert="$HERALD_TLS_CLIENT_CERT" key="$HERALD_TLS_CLIENT_KEY"
send_key="$HERALD_API_KEY" read_key="$HERALD_READ_KEY"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
go build -o "$out/send" ./examples/send
# A CA the node does not know, and a port nothing listens on.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj "/CN=a CA the node does not know" -keyout "$out/other-ca.key" -out "$out/other-ca.pem" 2>/dev/null
closed_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"

echo "== README.md's program over mutual TLS (the HERALD_* variables)"
mkdir "$out/readme"
run_readme "$out/readme" 2>&1 | tee "$out/readme.log"
grep -Eq '^sent to [^ ]+: message [0-9]+-[0-9]+ ' "$out/readme.log" \
  || { echo "clients/go/tls-check.sh: README.md's program did not send over mutual TLS" >&2; exit 1; }

echo "== the example over mutual TLS, configured by flags only"
env -u HERALD_GRPC_ADDR -u HERALD_TLS_CA -u HERALD_TLS_CLIENT_CERT -u HERALD_TLS_CLIENT_KEY -u HERALD_API_KEY \
  "$out/send" -grpc-addr "$addr" -tls-ca "$ca" -tls-client-cert "$cert" -tls-client-key "$key" -api-key "$send_key" \
  -user "ci-go-mtls-$$"

# expect_advice NAME 'fragment|fragment...' VAR=value... -- flags...: the example,
# with only the given HERALD_* variables set, must fail and say every fragment.
fail=0
expect_advice() {
  local name=$1 wants=$2; shift 2
  local vars=()
  while [[ $1 != -- ]]; do vars+=("$1"); shift; done
  shift
  local rc=0
  env -u HERALD_GRPC_ADDR -u HERALD_TLS_CA -u HERALD_TLS_CLIENT_CERT -u HERALD_TLS_CLIENT_KEY -u HERALD_API_KEY \
    "${vars[@]}" timeout 60 "$out/send" -attempts 1 -user "ci-go-advice-$$" "$@" >"$out/case.log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]]; then
    echo "FAIL $name: the example succeeded"; fail=1; return
  fi
  local w missing=""
  IFS='|' read -ra ws <<<"$wants"
  for w in "${ws[@]}"; do grep -qF -- "$w" "$out/case.log" || missing+=" [$w]"; done
  if [[ -n $missing ]]; then
    echo "FAIL $name: the output lacks$missing:"; sed 's/^/    /' "$out/case.log"; fail=1; return
  fi
  echo "ok   $name: $(grep -m1 ' failed: ' "$out/case.log")"
}
mtls=(HERALD_GRPC_ADDR="$addr" HERALD_TLS_CA="$ca" HERALD_TLS_CLIENT_CERT="$cert" HERALD_TLS_CLIENT_KEY="$key")

echo "== what the example says for each wrong setting"
expect_advice "plaintext to the TLS node" 'speaks TLS but this client uses plaintext|-tls-ca|HERALD_TLS_CA' \
  HERALD_GRPC_ADDR="$addr" HERALD_API_KEY="$send_key" --
expect_advice "a CA that did not sign the node's certificate" 'not trusted|is not the CA that signed it|HERALD_TLS_CA' \
  "${mtls[@]}" HERALD_TLS_CA="$out/other-ca.pem" HERALD_API_KEY="$send_key" --
expect_advice "no client certificate" 'requires a client certificate|-tls-client-cert|HERALD_TLS_CLIENT_CERT|HERALD_TLS_CLIENT_KEY' \
  HERALD_GRPC_ADDR="$addr" HERALD_TLS_CA="$ca" HERALD_API_KEY="$send_key" --
expect_advice "a client certificate of another CA" 'refused the client certificate|--grpc-tls-client-ca' \
  "${mtls[@]}" HERALD_TLS_CLIENT_CERT="$out/other-ca.pem" HERALD_TLS_CLIENT_KEY="$out/other-ca.key" HERALD_API_KEY="$send_key" --
expect_advice "no API key" 'requires an API key|HERALD_API_KEY|key part' "${mtls[@]}" --
expect_advice "a wrong API key" 'does not know this API key|HERALD_API_KEY' "${mtls[@]}" HERALD_API_KEY="wrong-$send_key" --
expect_advice "the whole name:scope:key" 'only its key part' "${mtls[@]}" HERALD_API_KEY="backend:send+read:$send_key" --
expect_advice "a read-only key sends" 'PermissionDenied|needs scope "send"|send, send+read or admin' \
  "${mtls[@]}" HERALD_API_KEY="$read_key" --
expect_advice "nothing listening" "nothing accepts connections at 127.0.0.1:$closed_port|is the node running" \
  -- -grpc-addr "127.0.0.1:$closed_port"
expect_advice "a host name that does not resolve" '"no-such-host.invalid" does not resolve|HERALD_GRPC_ADDR' \
  -- -grpc-addr "no-such-host.invalid:50051"
if [[ $fail -ne 0 ]]; then
  echo "clients/go/tls-check.sh: the example's advice is wrong or missing (see FAIL above)" >&2
  exit 1
fi
echo "clients/go/tls-check.sh: all cases passed"
