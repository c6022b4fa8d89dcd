#!/usr/bin/env bash
# The PostgreSQL outbox under load: rows committed into herald_outbox at
# fixed rates (one transaction per row, from several connections), delivered
# by `herald serve --outbox-postgres` to WebSocket clients; herald-bench
# reports delivered rows/s, latency from each row's intended INSERT time (its
# commit included; the time is in the payload) to the client's socket, p50
# and p99, and every row lost or delivered twice. Prints a Markdown table
# (the one in BENCHMARKS.md's outbox section).
#
#   bash bench/outbox.sh
#
# It starts Redis and PostgreSQL (Debian's package; as the postgres user
# when run as root) in temporary directories on free loopback ports, then
# for each of SYSTEMS its servers on that Redis, and runs herald-bench's
# unicast scenario with --outbox-postgres against them. Every process it
# starts is stopped by PID when it ends.
#
# Environment [defaults]:
#   SYSTEMS       what to run [herald1 herald2 centrifugo1 centrifugo2]:
#                 heraldN: N Herald nodes, all with --outbox-postgres (one
#                 consumes, the others stand by); centrifugoN: N Centrifugo
#                 v6 nodes with its PostgreSQL consumer (history on, as the
#                 rows are stored messages), skipped without CENTRIFUGO_BIN
#   CENTRIFUGO_BIN a centrifugo v6 binary [bench-out/bin/centrifugo, which
#                 bench/run.sh builds: GOBIN=bench-out/bin go install
#                 github.com/centrifugal/centrifugo/v6@v6.9.1]
#   CENTRIFUGO_PARTITIONS its consumer's num_partitions [4]
#   RATES         rows/s of the fixed-rate steps [1000 5000]
#   STEP_SECS     seconds per step [10]
#   CONNS         WebSocket clients, one user each [1000]
#   WRITERS       PostgreSQL connections committing rows [8]
#   OUTBOX_BATCH  Herald's --outbox-batch, Centrifugo's partition_select_limit [500]
#   SYNC_COMMIT   PostgreSQL's synchronous_commit [off; see below]
#   BENCH_OUT     where JSON results and logs go [bench-out/outbox]
#   HERALD_BIN    a prebuilt herald (herald-bench beside it): no build
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CENTRIFUGO_VERSION=v6.9.1
: "${CENTRIFUGO_BIN:=$ROOT/bench-out/bin/centrifugo}"
SYSTEMS=${SYSTEMS:-herald1 herald2 centrifugo1 centrifugo2}
CENTRIFUGO_PARTITIONS=${CENTRIFUGO_PARTITIONS:-4}
RATES=${RATES:-1000 5000}
STEP_SECS=${STEP_SECS:-10}
CONNS=${CONNS:-1000}
WRITERS=${WRITERS:-8}
OUTBOX_BATCH=${OUTBOX_BATCH:-500}
SYNC_COMMIT=${SYNC_COMMIT:-off}
BENCH_OUT=${BENCH_OUT:-$ROOT/bench-out/outbox}
mkdir -p "$BENCH_OUT"
BENCH_OUT=$(cd "$BENCH_OUT" && pwd)
say() { echo "outbox.sh: $*" >&2; }
die() { say "$*"; exit 1; }

if [ -z "${HERALD_BIN:-}" ]; then
    say "cargo build --release --workspace"
    cargo build --release --locked --workspace >&2
    HERALD_BIN=$ROOT/target/release/herald
fi
BENCH_BIN=$(dirname "$HERALD_BIN")/herald-bench
[ -x "$HERALD_BIN" ] && [ -x "$BENCH_BIN" ] || die "no $HERALD_BIN or $BENCH_BIN"
command -v redis-server >/dev/null || die "redis-server is needed (apt-get install redis-server)"
PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")
[ -x "$PG_BIN/postgres" ] || die "PostgreSQL is needed (apt-get install postgresql)"

REDIS_PID="" PG_PID="" NODE_PIDS=() PG_DIR=""
# stop SIGNAL PID...: sends SIGNAL, gives each process 10 s, then SIGKILL,
# so a process that ignores the signal cannot hold the script.
stop() {
    local sig=$1 p
    shift
    for p in "$@"; do kill "-$sig" "$p" 2>/dev/null || true; done
    for p in "$@"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}
cleanup() {
    stop TERM "${NODE_PIDS[@]}"
    [ -n "$REDIS_PID" ] && stop TERM "$REDIS_PID"
    # SIGINT: PostgreSQL's fast shutdown.
    [ -n "$PG_PID" ] && stop INT "$PG_PID"
    [ -n "$PG_DIR" ] && rm -rf "$PG_DIR"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    --loglevel warning >"$BENCH_OUT/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

# PostgreSQL refuses to run as root: as the postgres user, through setpriv
# (which execs, so $! is the postmaster). SYNC_COMMIT=off (the default) lets
# a commit return before its WAL reaches the disk (a crash of PostgreSQL may
# lose the last such commits; Herald's side is the same either way): with it
# on, the writers measure the disk's flush rate, not Herald.
PG_DIR=$(mktemp -d)
as_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$PG_DIR"
    as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi
"${as_pg[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U herald --no-sync >"$BENCH_OUT/initdb.log" 2>&1 ||
    die "initdb failed (see $BENCH_OUT/initdb.log)"
PG_PORT=$(free_port)
"${as_pg[@]}" "$PG_BIN/postgres" -D "$PG_DIR/data" -k "$PG_DIR" -c listen_addresses=127.0.0.1 -p "$PG_PORT" \
    -c max_connections=100 -c synchronous_commit="$SYNC_COMMIT" >"$BENCH_OUT/postgres.log" 2>&1 &
PG_PID=$!
for _ in $(seq 1 200); do pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 0.05; done
pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || die "PostgreSQL did not start (see $BENCH_OUT/postgres.log)"
PG_URL="postgres://herald@127.0.0.1:$PG_PORT/postgres"
"$HERALD_BIN" outbox init --apply --outbox-postgres "$PG_URL" >/dev/null

SECRET="bench-$RANDOM$RANDOM"
rates=$(echo "$RATES" | tr ' ' ',')
wait_port() { # <port> <log>
    for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
    die "nothing listens on $1 (see $2)"
}

# Centrifugo's outbox table as its own tests declare it (payload bytes), the
# (partition, id) index its SELECT wants, and its per-row NOTIFY trigger.
centrifugo_ddl() {
    psql -q -h 127.0.0.1 -p "$PG_PORT" -U herald -d postgres -v ON_ERROR_STOP=1 <<'SQL'
SET client_min_messages = warning;
DROP TABLE IF EXISTS centrifugo_outbox;
CREATE TABLE centrifugo_outbox (
    id bigserial PRIMARY KEY,
    method text NOT NULL,
    payload bytea NOT NULL,
    partition integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX centrifugo_outbox_partition_id ON centrifugo_outbox (partition, id);
CREATE OR REPLACE FUNCTION centrifugo_partition_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('centrifugo_partition_change', NEW.partition::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE OR REPLACE TRIGGER centrifugo_partition_change AFTER INSERT ON centrifugo_outbox
    FOR EACH ROW EXECUTE FUNCTION centrifugo_partition_change();
SQL
}

# start_system NAME: its servers; sets WS, PIDS_ARGS, TARGET_ARGS, TABLE,
# ADMINS (Herald's admin ports).
start_system() {
    local name=$1 n k w g a log conf
    n=${name##*[a-z]}
    WS=() ADMINS=() PIDS_ARGS=(--pid "redis=$REDIS_PID") NODE_PIDS=()
    case $name in
    herald*)
        TABLE=herald_outbox TARGET_ARGS=(--target herald)
        for k in $(seq 1 "$n"); do
            w=$(free_port) g=$(free_port) a=$(free_port)
            log="$BENCH_OUT/$name-$k.log"
            RUST_LOG=warn "$HERALD_BIN" serve --node-id "n$k" --jwt-secret "$SECRET" \
                --ws-listen "127.0.0.1:$w" --grpc-listen "127.0.0.1:$g" --admin-listen "127.0.0.1:$a" \
                --redis-url "redis://127.0.0.1:$REDIS_PORT/0" --outbox-postgres "$PG_URL" \
                --outbox-batch "$OUTBOX_BATCH" >"$log" 2>&1 &
            NODE_PIDS+=($!)
            PIDS_ARGS+=(--pid "herald-$k=$!")
            for _ in $(seq 1 200); do grep -q '^herald ready:' "$log" 2>/dev/null && break; sleep 0.05; done
            grep -q '^herald ready:' "$log" || die "node $k did not start (see $log)"
            WS+=("ws://127.0.0.1:$w/ws")
            ADMINS+=("$a")
        done
        ;;
    centrifugo*)
        TABLE=centrifugo_outbox
        TARGET_ARGS=(--target centrifugo --outbox-table centrifugo_outbox --outbox-partitions "$CENTRIFUGO_PARTITIONS")
        centrifugo_ddl
        for k in $(seq 1 "$n"); do
            w=$(free_port)
            conf="$BENCH_OUT/$name-$k.json"
            log="$BENCH_OUT/$name-$k.log"
            # History on: the outbox rows are stored messages, as Herald's.
            cat >"$conf" <<CONF
{
  "log": {"level": "error"},
  "http_server": {"address": "127.0.0.1", "port": $w},
  "client": {"token": {"hmac_secret_key": "$SECRET"}, "allowed_origins": ["*"]},
  "engine": {"type": "redis", "redis": {"address": ["redis://127.0.0.1:$REDIS_PORT/0"]}},
  "channel": {"without_namespace": {"history_size": 1000, "history_ttl": "600s"}},
  "consumers": [{
    "name": "outbox", "enabled": true, "type": "postgresql",
    "postgresql": {
      "dsn": "$PG_URL", "outbox_table_name": "centrifugo_outbox",
      "num_partitions": $CENTRIFUGO_PARTITIONS, "partition_select_limit": $OUTBOX_BATCH,
      "partition_notification_channel": "centrifugo_partition_change"
    }
  }]
}
CONF
            "$CENTRIFUGO_BIN" --config "$conf" >"$log" 2>&1 &
            NODE_PIDS+=($!)
            PIDS_ARGS+=(--pid "centrifugo-$k=$!")
            wait_port "$w" "$log"
            WS+=("ws://127.0.0.1:$w/connection/websocket")
        done
        ;;
    *) die "unknown system $name (herald1, herald2, centrifugo1, centrifugo2)" ;;
    esac
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
results=()
for name in $SYSTEMS; do
    if [[ $name == centrifugo* && ! -x $CENTRIFUGO_BIN ]]; then
        say "$name: no $CENTRIFUGO_BIN (build it with GOBIN=$(dirname "$CENTRIFUGO_BIN") go install github.com/centrifugal/centrifugo/v6@$CENTRIFUGO_VERSION); left out"
        continue
    fi
    say "$name: $CONNS clients, rows at $RATES/s for ${STEP_SECS}s each"
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    # CPU: the servers' and Redis's (PostgreSQL works in per-connection
    # child processes, which a PID does not cover).
    start_system "$name"
    out="$BENCH_OUT/$name.json"
    "$BENCH_BIN" unicast "${TARGET_ARGS[@]}" --jwt-secret "$SECRET" --ws "$(IFS=,; echo "${WS[*]}")" \
        -c "$CONNS" --rate "$rates" --duration "${STEP_SECS}s" --drain-timeout 15s --time-limit 10m \
        --outbox-postgres "$PG_URL" --outbox-writers "$WRITERS" "${PIDS_ARGS[@]}" \
        --label "$name" --out "$out" --quiet --check >"$BENCH_OUT/$name.txt" ||
        { cat "$BENCH_OUT/$name.txt" >&2; die "$name: herald-bench failed or lost/duplicated rows ($out)"; }
    results+=("$out")
    # Herald's consumer's own figures (batch latency, rows, lag), for the log.
    for k in "${!ADMINS[@]}"; do
        curl -s -m 5 "http://127.0.0.1:${ADMINS[$k]}/metrics" | grep '^herald_outbox' >"$BENCH_OUT/$name-$((k + 1)).metrics" || true
    done
    left=$(psql -h 127.0.0.1 -p "$PG_PORT" -U herald -d postgres -Atc "SELECT count(*) FROM $TABLE")
    [ "$left" = 0 ] || die "$name: $left rows left in $TABLE after the run"
    stop TERM "${NODE_PIDS[@]}"
    NODE_PIDS=()
done

python3 - "$WRITERS" "$OUTBOX_BATCH" "$SYNC_COMMIT" "$CENTRIFUGO_PARTITIONS" "${results[@]}" <<'EOF'
import json, sys
writers, batch, sync, cp, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
print("| system | clients | offered rows/s | rows committed | delivered rows/s | p50 | p99 | max | lost | duplicates | server+Redis CPU µs/row |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for f in files:
    r = json.load(open(f))
    for s in r["steps"]:
        lat = s["latency"]
        cpu = s.get("cpu_us_per_delivery")
        print(f"| {r['label']} | {r['connections']} | {s['offered_per_s']:.0f} | {s['calls'] - s['call_errors']} "
              f"| {s['delivered_per_s']:.0f} | {lat['p50_ms']:.1f} ms | {lat['p99_ms']:.1f} ms | {lat['max_ms']:.1f} ms "
              f"| {s['lost']} | {s['duplicates']} | {'' if cpu is None else f'{cpu:.0f}'} |")
print(f"\n{writers} PostgreSQL connections committing one row per transaction (synchronous_commit={sync}); "
      f"--outbox-batch and partition_select_limit {batch}; CPU: the servers' and Redis's; Centrifugo: {cp} partitions.")
EOF
# The machine, for the table's caption.
echo
echo "$(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), $(free -h | awk '/^Mem:/{print $2}') memory," \
    "$(uname -sr); PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}')," \
    "Redis $(redis-server --version | awk '{print $3}' | sed 's/v=//'); load average $LOAD_BEFORE before," \
    "$(cut -d' ' -f1-3 /proc/loadavg) after; git $(git rev-parse --short HEAD 2>/dev/null)"
