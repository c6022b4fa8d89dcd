#!/usr/bin/env bash
# Capacity figures for README's "Capacity" section: Redis memory, commands
# and CPU per stored message, inbox, connected user, node, and per
# operation, measured on a one-shard Redis Cluster with one Herald node in
# cluster mode (tests/capacity.rs). Prints a Markdown table.
#
#   bash bench/capacity.sh            release build
#   PROFILE=debug bash bench/capacity.sh
#
# Needs redis-server and redis-cli on PATH. The figures are Redis's side
# (memory, commands, the Redis process's CPU): they do not depend on how
# Herald was built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
profile=(--release)
[ "${PROFILE:-release}" = debug ] && profile=()
cargo test "${profile[@]+"${profile[@]}"}" --test capacity -- --ignored --nocapture --test-threads 1 2>/dev/null |
    grep '^|'
redis-server --version | awk '{print "\n" $1 " " $2 " " $3}'
