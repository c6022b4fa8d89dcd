#!/usr/bin/env bash
# Herald benchmarks: Herald (1 node; 2 nodes + Redis) side by side with
# Socket.IO 4 (2 processes + the same Redis, sent to through
# @socket.io/redis-emitter called in-process by a Node sender that runs its
# own open-loop schedule, as a backend does (bench/socketio/sender.js);
# socketio-http: through an HTTP POST per message into one of the processes), Centrifugo v6 (2 nodes on the same Redis,
# published to through its GRPC API; `centrifugo` keeps channel history, the
# stored comparison; `centrifugo-live` does not) and herald-floor (a bare fan-out),
# driven by herald-bench (the bench/ crate) in the same run, on this machine's loopback.
#
#   bash bench/run.sh          full run; rewrites the tables in BENCHMARKS.md
#   bash bench/run.sh smoke    tiny run for CI (< 2 min): exits non-zero on
#                              errors, lost or duplicated messages, never on
#                              timings; writes nothing outside $BENCH_OUT
#
# It installs what it needs (npm ci in bench/socketio; redis-server through
# apt-get if missing), builds the binaries, starts Redis on a free loopback
# port, and runs every experiment on each system in turn (alternating, so
# that a noisy neighbour hurts every system alike). Every server it starts
# listens on 127.0.0.1 only and is stopped when the script ends.
#
# Sizes (environment variables, full-run defaults in brackets):
#   SYSTEMS            systems to run [herald1 herald2 socketio socketio-http centrifugo
#                      centrifugo-live herald2-cluster floor; smoke: herald1 herald2 socketio centrifugo floor,
#                      centrifugo only when its binary is there or Go can build it]
#   CENTRIFUGO_BIN     a centrifugo v6 binary [built once with `go install
#                      github.com/centrifugal/centrifugo/v6@$CENTRIFUGO_VERSION` into
#                      bench-out/bin, which later runs (and CI's cache) reuse]
#                      herald2-cluster: 2 Herald nodes on a local Redis Cluster
#                      (redis+cluster://, sharded pub/sub)
#   CLUSTER_PRIMARIES  primaries of herald2-cluster's Redis Cluster [3]
#   CLUSTER_REPLICAS   replicas per primary [0: the sharding path alone; with
#                      1 every write is also replicated, on the same cores]
#   ROUNDS             repetitions of the whole set; the tables show medians [1]
#   UNICAST_CONNS      clients for the unicast experiments [2000, the size of issue 23's
#                      measurement; the run before used 10000]
#   FIXED_RATES        fixed rates measured first, deliveries/s [5000 10000]
#   RAMP_START         first rate of the step-up search [2000]
#   STEP_SECS          seconds per rate step [4]
#   SLO_P99            latency objective of the search [50ms]
#   BATCH              users per call of the batched experiment [100]
#   BROADCAST_CONNS    clients for the broadcast experiment [10000]
#   BROADCASTS         broadcasts of the sustained phase [40]
#   IDLE_SIZES         idle connection counts [10000 50000]
#   IDLE_HOLD          how long idle connections are held [10s]
#   BIG_IDLE           idle connections on one Herald node, no errors [100000]
#   BENCH_OUT          where JSON results and logs go [bench-out]
#   BENCH_PROFILE      cargo profile of the binaries: production (release with
#                      fat LTO, Cargo.toml), release or debug [full: production;
#                      smoke: release]
#   HERALD_BIN         a prebuilt herald binary (herald-bench and herald-floor
#                      beside it, as `cargo build --release --workspace` leaves
#                      them): no build
#   HERALD_BENCH_BIN   a prebuilt herald-bench (herald-floor beside it), when it is
#                      not beside HERALD_BIN
#   HERALD2_WORKERS    tokio worker threads of each of the two co-located Herald
#                      nodes (TOKIO_WORKER_THREADS) [nproc / 2, at least 1]
#   SEQ_CALLERS        callers of the sequential experiment's steps [1,16]
#   SENDER_ALONE_RATES rates of the Socket.IO sender alone (no Socket.IO server: its own
#                      ceiling; `max`: back to back) [full: 10000,30000,60000,max; smoke: 1000,max]
#   SIO_AUTO_PIPELINING 0: the Socket.IO sender's ioredis writes each PUBLISH on its own
#                      [1: ioredis auto-pipelining, the emitter's best showing]
#   SEND_BATCH         messages per SendBatch call of the batched Herald unicast row [100]
#   EXPERIMENTS        which to run [sequential sender-alone unicast-transient unicast-stored
#                      unicast-sendbatch unicast-batch broadcast control idle]
#   HERALD_SERVER_BIN  run this herald binary as the server (A/B test of a patched build);
#                      the bench client stays the one built here
#   WRITE_REPORT       1: rewrite BENCHMARKS.md after a full run [1 when full]
set -euo pipefail

MODE=${1:-full}
case "$MODE" in full | smoke) ;; *)
    echo "usage: bash bench/run.sh [full|smoke]" >&2
    exit 2
    ;;
esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CENTRIFUGO_VERSION=v6.9.1
: "${CENTRIFUGO_BIN:=$ROOT/bench-out/bin/centrifugo}"
if [ "$MODE" = smoke ]; then
    if [ -x "$CENTRIFUGO_BIN" ] || command -v go >/dev/null; then
        : "${SYSTEMS:=herald1 herald2 socketio centrifugo floor}"
    else
        echo "smoke: no Go toolchain and no $CENTRIFUGO_BIN: Centrifugo left out" >&2
        : "${SYSTEMS:=herald1 herald2 socketio floor}"
    fi
    : "${UNICAST_CONNS:=200}" "${FIXED_RATES:=500}" "${STEP_SECS:=2}" "${BATCH:=20}"
    : "${BROADCAST_CONNS:=200}" "${BROADCASTS:=10}" "${IDLE_SIZES:=200}" "${IDLE_HOLD:=1s}"
    : "${BIG_IDLE:=0}" "${ROUNDS:=1}" "${BENCH_PROFILE:=release}" "${SENDER_ALONE_RATES:=1000,max}"
    : "${BENCH_OUT:=$ROOT/bench-out/smoke}"
else
    : "${SYSTEMS:=herald1 herald2 herald2-cluster socketio socketio-http centrifugo centrifugo-live floor}"
    : "${UNICAST_CONNS:=2000}" "${FIXED_RATES:=5000 10000}" "${STEP_SECS:=4}" "${BATCH:=100}"
    : "${BROADCAST_CONNS:=10000}" "${BROADCASTS:=40}" "${IDLE_SIZES:=10000 50000}" "${IDLE_HOLD:=10s}"
    : "${BIG_IDLE:=100000}" "${ROUNDS:=1}" "${BENCH_PROFILE:=production}" "${SENDER_ALONE_RATES:=10000,30000,60000,max}"
    : "${BENCH_OUT:=$ROOT/bench-out/full}"
fi
: "${RAMP_START:=2000}" "${SLO_P99:=50ms}"
# Two nodes on one machine share its cores, as two Socket.IO processes do.
: "${HERALD2_WORKERS:=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}"
: "${SEQ_CALLERS:=1,16}"
: "${EXPERIMENTS:=sequential sender-alone unicast-transient unicast-stored unicast-sendbatch unicast-batch broadcast control idle}"
: "${SEND_BATCH:=100}" "${SIO_AUTO_PIPELINING:=1}"
export SIO_AUTO_PIPELINING
if [ "$MODE" = full ]; then : "${WRITE_REPORT:=1}"; else : "${WRITE_REPORT:=0}"; fi
SECRET="bench-secret-$RANDOM$RANDOM"
LOGS="$BENCH_OUT/logs"
rm -rf "$BENCH_OUT"
mkdir -p "$LOGS"

say() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# --- processes we start, stopped on exit -----------------------------------
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop_pids() {
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for p in "$@"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    local keep=() q
    for q in "${PIDS[@]}"; do
        local gone=0
        for p in "$@"; do [ "$p" = "$q" ] && gone=1; done
        [ $gone = 1 ] || keep+=("$q")
    done
    PIDS=("${keep[@]+"${keep[@]}"}")
}

# wait_port PORT PID LOG: until 127.0.0.1:PORT accepts (20 s), or PID died.
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    tail -5 "$3" >&2
    return 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# A port for a Redis Cluster node: at most 55535 (the cluster bus listens
# 10000 higher), with the bus port free too.
free_cluster_port() {
    python3 -c '
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
while True:
    p = random.randrange(20000, 55535)
    if free(p) and free(p + 10000):
        print(p); break'
}

# wait_ready LOG PID PATTERN: until PATTERN is in LOG (20 s), or the process died.
wait_ready() {
    for _ in $(seq 200); do
        grep -q "$3" "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || {
            tail -5 "$1" >&2
            return 1
        }
        sleep 0.1
    done
    tail -5 "$1" >&2
    return 1
}

# --- open files: every client and server socket is a file descriptor --------
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
[ "$FD_LIMIT" = unlimited ] && FD_LIMIT=1048576
MAX_CONNS=$((FD_LIMIT - 512))
say "open-file limit $FD_LIMIT: at most $MAX_CONNS connections per process"

# --- install and build --------------------------------------------------------
need_redis=0
for s in $SYSTEMS; do case $s in herald2 | herald2-cluster | socketio* | centrifugo*) need_redis=1 ;; esac; done
if [ $need_redis = 1 ] && ! command -v redis-server >/dev/null; then
    say "installing redis-server (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } >"$LOGS/apt.log" 2>&1 ||
        die "could not install redis-server (see $LOGS/apt.log)"
fi
if [[ " $SYSTEMS " == *" socketio"* ]]; then
    command -v node >/dev/null || die "Node.js is needed for the Socket.IO server"
    say "npm ci in bench/socketio"
    (cd bench/socketio && npm ci --no-audit --no-fund --loglevel=error) >"$LOGS/npm.log" 2>&1 ||
        die "npm ci failed (see $LOGS/npm.log)"
fi
if [[ " $SYSTEMS " == *" centrifugo"* ]] && [ ! -x "$CENTRIFUGO_BIN" ]; then
    command -v go >/dev/null || die "Go is needed to build Centrifugo (or set CENTRIFUGO_BIN)"
    say "go install github.com/centrifugal/centrifugo/v6@$CENTRIFUGO_VERSION (once; kept in $(dirname "$CENTRIFUGO_BIN"))"
    mkdir -p "$(dirname "$CENTRIFUGO_BIN")"
    (GOBIN=$(dirname "$CENTRIFUGO_BIN") go install "github.com/centrifugal/centrifugo/v6@$CENTRIFUGO_VERSION") >"$LOGS/centrifugo-build.log" 2>&1 ||
        die "building Centrifugo failed (see $LOGS/centrifugo-build.log)"
fi
# Prebuilt binaries where given (CI builds the workspace before): herald-bench
# and herald-floor beside herald, or beside HERALD_BENCH_BIN; the rest is built.
HERALD="" BENCH="" FLOOR=""
if [ -n "${HERALD_BIN:-}" ] && [ -x "$HERALD_BIN" ]; then
    HERALD="$HERALD_BIN"
    BENCH="$(dirname "$HERALD_BIN")/herald-bench"
fi
[ -n "${HERALD_BENCH_BIN:-}" ] && BENCH="$HERALD_BENCH_BIN"
[ -n "$BENCH" ] && FLOOR="$(dirname "$BENCH")/herald-floor"
build=()
[ -n "$HERALD" ] || build+=(-p herald)
[ -n "$BENCH" ] && [ -x "$BENCH" ] && [ -x "$FLOOR" ] || build+=(-p herald-bench)
if [ ${#build[@]} -gt 0 ]; then
    say "cargo build ${build[*]} ($BENCH_PROFILE)"
    profile=()
    case "$BENCH_PROFILE" in
    release) profile=(--release) ;;
    debug) ;;
    *) profile=(--profile "$BENCH_PROFILE") ;;
    esac
    cargo build "${profile[@]+"${profile[@]}"}" "${build[@]}" >"$LOGS/build.log" 2>&1 || die "build failed (see $LOGS/build.log)"
    TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
    [ -n "$HERALD" ] || HERALD="$TARGET_DIR/$BENCH_PROFILE/herald"
    if [[ " ${build[*]} " == *" herald-bench "* ]]; then
        BENCH="$TARGET_DIR/$BENCH_PROFILE/herald-bench"
        FLOOR="$TARGET_DIR/$BENCH_PROFILE/herald-floor"
    fi
fi
say "binaries: $HERALD, $BENCH, $FLOOR"
[ -x "$HERALD" ] && [ -x "$BENCH" ] && [ -x "$FLOOR" ] ||
    die "herald, herald-bench and herald-floor binaries not found ($HERALD, $BENCH, $FLOOR)"
SERVER="${HERALD_SERVER_BIN:-$HERALD}"
[ -x "$SERVER" ] || die "HERALD_SERVER_BIN=$SERVER is not an executable"

# --- Redis --------------------------------------------------------------------
REDIS_PID=""
REDIS_PORT=""
if [ $need_redis = 1 ]; then
    REDIS_PORT=$(free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --protected-mode yes --maxclients 10000 >"$LOGS/redis.log" 2>&1 &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    wait_ready "$LOGS/redis.log" "$REDIS_PID" "Ready to accept connections" || die "Redis did not start"
    say "redis on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)"
fi
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"

# A local Redis Cluster for herald2-cluster: CLUSTER_PRIMARIES primaries with
# CLUSTER_REPLICAS replicas each, made by redis-cli --cluster create.
: "${CLUSTER_PRIMARIES:=3}" "${CLUSTER_REPLICAS:=0}"
CLUSTER_PORTS=()
CLUSTER_PIDS=()
CLUSTER_URL=""
if [[ " $SYSTEMS " == *" herald2-cluster "* ]]; then
    command -v redis-cli >/dev/null || die "redis-cli is needed for the Redis Cluster (Debian: redis-tools)"
    for _ in $(seq $((CLUSTER_PRIMARIES * (CLUSTER_REPLICAS + 1)))); do
        port=$(free_cluster_port)
        mkdir -p "$BENCH_OUT/cluster/$port"
        redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --protected-mode yes \
            --maxclients 10000 --cluster-enabled yes --cluster-config-file nodes.conf \
            --dir "$BENCH_OUT/cluster/$port" >"$LOGS/redis-cluster-$port.log" 2>&1 &
        CLUSTER_PIDS+=("$!")
        PIDS+=("$!")
        CLUSTER_PORTS+=("$port")
        wait_ready "$LOGS/redis-cluster-$port.log" "$!" "Ready to accept connections" || die "Redis Cluster node did not start"
    done
    hosts=()
    for port in "${CLUSTER_PORTS[@]}"; do hosts+=("127.0.0.1:$port"); done
    redis-cli --cluster create "${hosts[@]}" --cluster-replicas "$CLUSTER_REPLICAS" --cluster-yes >"$LOGS/cluster-create.log" 2>&1 ||
        die "redis-cli --cluster create failed (see $LOGS/cluster-create.log)"
    for _ in $(seq 200); do
        ok=1
        for port in "${CLUSTER_PORTS[@]}"; do
            redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' || ok=0
        done
        [ $ok = 1 ] && break
        sleep 0.1
    done
    [ $ok = 1 ] || die "the Redis Cluster did not become ready"
    CLUSTER_URL="redis+cluster://$(IFS=,; echo "${hosts[*]}")"
    say "redis cluster: $CLUSTER_URL (pids ${CLUSTER_PIDS[*]})"
fi

redis_flush() {
    if [ -n "$REDIS_PID" ] && command -v redis-cli >/dev/null; then redis-cli -p "$REDIS_PORT" flushall >/dev/null; fi
    local port
    for port in "${CLUSTER_PORTS[@]+"${CLUSTER_PORTS[@]}"}"; do
        redis-cli -p "$port" flushall >/dev/null 2>&1 || true # replicas refuse (READONLY)
    done
}

# --- systems ------------------------------------------------------------------
# start_system NAME sets: SYS_ARGS (target, URLs, secret), SYS_PIDS (bench
# --pid flags: servers, plus redis when used), SYS_SERVER_PIDS.
SYS_ARGS=()
SYS_PIDS=()
SYS_SERVER_PIDS=()
SYS_EXTRA_PIDS=() # processes of the system that are not servers (the emitter)
start_herald_node() { # ID USE_REDIS (0, 1, or a Redis URL): sets HN_PID HN_WS HN_GRPC
    local id=$1 redis=$2 admin log
    HN_WS=$(free_port)
    HN_GRPC=$(free_port)
    admin=$(free_port)
    log="$LOGS/$id-$RUN_TAG.log"
    local extra=() env=()
    [ "$redis" = 1 ] && extra=(--redis-url "$REDIS_URL") && env=("TOKIO_WORKER_THREADS=$HERALD2_WORKERS")
    [[ "$redis" == redis* ]] && extra=(--redis-url "$redis") && env=("TOKIO_WORKER_THREADS=$HERALD2_WORKERS")
    env "${env[@]+"${env[@]}"}" "$SERVER" serve --ws-listen "127.0.0.1:$HN_WS" --grpc-listen "127.0.0.1:$HN_GRPC" --admin-listen "127.0.0.1:$admin" \
        --jwt-secret "$SECRET" --node-id "$id" "${extra[@]+"${extra[@]}"}" >"$log" 2>&1 &
    HN_PID=$!
    PIDS+=("$HN_PID")
    SYS_SERVER_PIDS+=("$HN_PID")
    wait_ready "$log" "$HN_PID" "herald ready"
}
start_system() {
    local name=$1 a b p1 p2 pid1 log
    SYS_ARGS=()
    SYS_PIDS=()
    SYS_SERVER_PIDS=()
    redis_flush
    case $name in
    herald1)
        start_herald_node h1 0 || return 1
        SYS_ARGS=(--target herald --jwt-secret "$SECRET" --ws "ws://127.0.0.1:$HN_WS/ws" --api "http://127.0.0.1:$HN_GRPC")
        SYS_PIDS=(--pid "herald=$HN_PID")
        ;;
    herald2)
        start_herald_node h1 1 || return 1
        pid1=$HN_PID a=$HN_WS b=$HN_GRPC
        start_herald_node h2 1 || return 1
        SYS_ARGS=(--target herald --jwt-secret "$SECRET" --ws "ws://127.0.0.1:$a/ws,ws://127.0.0.1:$HN_WS/ws"
            --api "http://127.0.0.1:$b,http://127.0.0.1:$HN_GRPC")
        SYS_PIDS=(--pid "herald-h1=$pid1" --pid "herald-h2=$HN_PID" --pid "redis=$REDIS_PID")
        ;;
    herald2-cluster)
        start_herald_node h1 "$CLUSTER_URL" || return 1
        pid1=$HN_PID a=$HN_WS b=$HN_GRPC
        start_herald_node h2 "$CLUSTER_URL" || return 1
        SYS_ARGS=(--target herald --jwt-secret "$SECRET" --ws "ws://127.0.0.1:$a/ws,ws://127.0.0.1:$HN_WS/ws"
            --api "http://127.0.0.1:$b,http://127.0.0.1:$HN_GRPC")
        SYS_PIDS=(--pid "herald-h1=$pid1" --pid "herald-h2=$HN_PID")
        local i=0 cp
        for cp in "${CLUSTER_PIDS[@]}"; do
            i=$((i + 1))
            SYS_PIDS+=(--pid "redis-$i=$cp")
        done
        ;;
    socketio | socketio-http)
        p1=$(free_port)
        p2=$(free_port)
        for port in "$p1" "$p2"; do
            log="$LOGS/socketio-$port-$RUN_TAG.log"
            (cd bench/socketio && PORT=$port HOST=127.0.0.1 REDIS_URL=$REDIS_URL exec node server.js) >"$log" 2>&1 &
            local pid=$!
            PIDS+=("$pid")
            SYS_SERVER_PIDS+=("$pid")
            wait_ready "$log" "$pid" "socketio ready" || return 1
        done
        SYS_ARGS=(--target socketio --ws "ws://127.0.0.1:$p1/socket.io/,ws://127.0.0.1:$p2/socket.io/"
            --api "http://127.0.0.1:$p1,http://127.0.0.1:$p2")
        if [ "$name" = socketio ]; then
            # The backend's side: @socket.io/redis-emitter publishing to Redis,
            # called in-process by sender.js for unicast (herald-bench
            # --remote-sender: one POST per step) and once per broadcast.
            # Its CPU is the sender's, like herald-bench's own gRPC client.
            local pe
            pe=$(free_port)
            log="$LOGS/socketio-emitter-$RUN_TAG.log"
            (cd bench/socketio && PORT=$pe HOST=127.0.0.1 REDIS_URL=$REDIS_URL exec node emitter.js) >"$log" 2>&1 &
            local epid=$!
            PIDS+=("$epid")
            wait_ready "$log" "$epid" "emitter ready" || return 1
            SYS_EXTRA_PIDS=("$epid")
            SYS_ARGS=(--target socketio --ws "ws://127.0.0.1:$p1/socket.io/,ws://127.0.0.1:$p2/socket.io/"
                --api "http://127.0.0.1:$pe")
        fi
        SYS_PIDS=(--pid "socketio-1=${SYS_SERVER_PIDS[0]}" --pid "socketio-2=${SYS_SERVER_PIDS[1]}" --pid "redis=$REDIS_PID")
        ;;
    centrifugo | centrifugo-live)
        # Two nodes on the same Redis engine; history on for `centrifugo`
        # (what a reconnecting client can recover: the stored comparison).
        local history=0 ttl=0s urls=() apis=() k conf
        [ "$name" = centrifugo ] && history=1000 ttl=600s
        for k in 1 2; do
            p1=$(free_port)
            p2=$(free_port)
            conf="$LOGS/centrifugo-$k-$RUN_TAG.json"
            cat >"$conf" <<CONF
{
  "log": {"level": "error"},
  "http_server": {"address": "127.0.0.1", "port": $p1},
  "client": {"token": {"hmac_secret_key": "$SECRET"}, "allowed_origins": ["*"]},
  "engine": {"type": "redis", "redis": {"address": ["$REDIS_URL"]}},
  "grpc_api": {"enabled": true, "address": "127.0.0.1", "port": $p2},
  "channel": {"without_namespace": {"history_size": $history, "history_ttl": "$ttl"}}
}
CONF
            log="$LOGS/centrifugo-$k-$RUN_TAG.log"
            "$CENTRIFUGO_BIN" --config "$conf" >"$log" 2>&1 &
            pid1=$!
            PIDS+=("$pid1")
            SYS_SERVER_PIDS+=("$pid1")
            { wait_port "$p1" "$pid1" "$log" && wait_port "$p2" "$pid1" "$log"; } || return 1
            urls+=("ws://127.0.0.1:$p1/connection/websocket")
            apis+=("http://127.0.0.1:$p2")
        done
        SYS_ARGS=(--target centrifugo --jwt-secret "$SECRET" --ws "${urls[0]},${urls[1]}" --api "${apis[0]},${apis[1]}")
        SYS_PIDS=(--pid "centrifugo-1=${SYS_SERVER_PIDS[0]}" --pid "centrifugo-2=${SYS_SERVER_PIDS[1]}" --pid "redis=$REDIS_PID")
        ;;
    floor)
        p1=$(free_port)
        log="$LOGS/floor-$RUN_TAG.log"
        "$FLOOR" --listen "127.0.0.1:$p1" >"$log" 2>&1 &
        pid1=$!
        PIDS+=("$pid1")
        SYS_SERVER_PIDS=("$pid1")
        wait_ready "$log" "$pid1" "herald-floor ready" || return 1
        SYS_ARGS=(--target floor --ws "ws://127.0.0.1:$p1/ws" --api "http://127.0.0.1:$p1")
        SYS_PIDS=(--pid "floor=$pid1")
        ;;
    *) die "unknown system $name" ;;
    esac
}
stop_system() {
    stop_pids "${SYS_SERVER_PIDS[@]+"${SYS_SERVER_PIDS[@]}"}" "${SYS_EXTRA_PIDS[@]+"${SYS_EXTRA_PIDS[@]}"}"
    SYS_EXTRA_PIDS=()
    sleep 0.5
}

# --- experiments -----------------------------------------------------------------
FAILED=0
CHECK=()
[ "$MODE" = smoke ] && CHECK=(--check)
COMMANDS="$BENCH_OUT/commands.txt"
: >"$COMMANDS"

# run_bench NAME SYSTEM ARGS...: starts SYSTEM fresh, runs herald-bench, stops it.
run_bench() {
    local name=$1 system=$2
    shift 2
    RUN_TAG="$name-r$ROUND"
    local json="$BENCH_OUT/r$ROUND/$name.json" log="$LOGS/bench-$name-r$ROUND.log"
    mkdir -p "$BENCH_OUT/r$ROUND"
    if ! start_system "$system"; then
        say "FAIL $name: $system did not start (see $LOGS)"
        stop_system
        printf '{"label":"%s","system":"%s","ok":false,"problems":["server did not start"]}\n' "$name" "$system" >"$json"
        FAILED=$((FAILED + 1))
        return 0
    fi
    local args=("$@" "${SYS_ARGS[@]}" "${SYS_PIDS[@]}" --label "$name" --out "$json" "${CHECK[@]+"${CHECK[@]}"}")
    # The command as anyone can rerun it (the secret and ports are per run).
    echo "herald-bench ${args[*]}" | sed -E -e "s/$SECRET/\$SECRET/g" -e "s#$ROOT/##g" -e 's/127\.0\.0\.1:[0-9]+/127.0.0.1:PORT/g' \
        -e 's/=[0-9]+( |$)/=PID\1/g' >>"$COMMANDS"
    local rc=0
    "$BENCH" "${args[@]}" >"$log.out" 2>"$log" || rc=$?
    stop_system
    if [ $rc != 0 ]; then
        FAILED=$((FAILED + 1))
        say "FAIL $name (exit $rc):"
        sed 's/^/    /' "$log.out" >&2
        [ -s "$json" ] || printf '{"label":"%s","system":"%s","ok":false,"problems":["bench exited %s"]}\n' "$name" "$system" "$rc" >"$json"
    else
        say "ok   $name: $(grep -E 'max sustained|sustained broadcast|one broadcast|idle:|fixed|control|sequential x' "$log.out" | head -3 | sed 's/^ *//' | tr '\n' ';')"
    fi
    # Remember which system it was for the report.
    python3 - "$json" "$system" <<'EOF'
import json, sys
p, system = sys.argv[1], sys.argv[2]
d = json.load(open(p))
d["system"] = system
json.dump(d, open(p, "w"), indent=1)
EOF
}

has() { [[ " $SYSTEMS " == *" $1 "* ]]; }
# The Socket.IO system's unicast runs inside its sender (see start_system).
sender_args() { [ "$1" = socketio ] && echo --remote-sender; true; }

# The Socket.IO sender alone: sender.js emitting into Redis, no Socket.IO
# server, no client (bench/socketio/alone.js); its JSON joins the results.
run_sender_alone() {
    local name=sender-alone-socketio json="$BENCH_OUT/r$ROUND/sender-alone-socketio.json" log="$LOGS/sender-alone-r$ROUND.log"
    mkdir -p "$BENCH_OUT/r$ROUND"
    redis_flush
    echo "REDIS_URL=redis://127.0.0.1:PORT/0 node bench/socketio/alone.js --rates $SENDER_ALONE_RATES --duration $STEP_SECS --users $UNICAST_CONNS --redis-pid PID" >>"$COMMANDS"
    # Bounded like every herald-bench run (its --time-limit).
    if (cd bench/socketio && REDIS_URL=$REDIS_URL exec timeout 15m node alone.js --rates "$SENDER_ALONE_RATES" --duration "$STEP_SECS" \
        --users "$UNICAST_CONNS" --redis-pid "$REDIS_PID" --label "$name" --out "$json") >"$log" 2>&1; then
        say "ok   $name: $(tr '\n' ';' <"$log")"
    else
        FAILED=$((FAILED + 1))
        say "FAIL $name:"
        sed 's/^/    /' "$log" >&2
        printf '{"label":"%s","system":"socketio","ok":false,"problems":["alone.js failed"]}\n' "$name" >"$json"
    fi
    redis_flush
}
want() { [[ " $EXPERIMENTS " == *" $1 "* ]]; }
ramp_args() {
    local rates
    rates=$(echo "$FIXED_RATES" | tr ' ' ',')
    if [ "$MODE" = smoke ]; then echo "--rate $rates"; else echo "--rate $rates --ramp --ramp-start $RAMP_START --slo-p99 $SLO_P99"; fi
}

python3 - "$BENCH_OUT/meta.json" "$MODE" <<EOF
import json, subprocess, sys, datetime, os
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception: return ""
meta = {
  "mode": sys.argv[2],
  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
  "nproc": sh("nproc"),
  "cpu": sh("lscpu | sed -n 's/^Model name: *//p' | head -1"),
  "memory": sh("free -h | awk '/^Mem:/{print \$2}'"),
  "kernel": sh("uname -sr"),
  "fd_limit": "$FD_LIMIT",
  "rustc": sh("rustc --version"),
  "node": sh("node --version"),
  "redis": sh("redis-server --version | awk '{print \$3}'"),
  "socketio": sh("node -p 'require(\"./bench/socketio/node_modules/socket.io/package.json\").version' 2>/dev/null"),
  "redis_adapter": sh("node -p 'require(\"./bench/socketio/node_modules/@socket.io/redis-adapter/package.json\").version' 2>/dev/null"),
  "redis_emitter": sh("node -p 'require(\"./bench/socketio/node_modules/@socket.io/redis-emitter/package.json\").version' 2>/dev/null"),
  # go install stamps no version into the binary: the one installed is named.
  "centrifugo": "Centrifugo $CENTRIFUGO_VERSION" if "${CENTRIFUGO_BIN}" == "$ROOT/bench-out/bin/centrifugo" else sh("'$CENTRIFUGO_BIN' version 2>/dev/null | head -1"),
  "git": sh("git rev-parse --short HEAD"),
}
meta["settings"] = dict(SYSTEMS="$SYSTEMS", ROUNDS="$ROUNDS", UNICAST_CONNS="$UNICAST_CONNS", FIXED_RATES="$FIXED_RATES",
  RAMP_START="$RAMP_START", STEP_SECS="$STEP_SECS", SLO_P99="$SLO_P99", BATCH="$BATCH", BROADCAST_CONNS="$BROADCAST_CONNS",
  BROADCASTS="$BROADCASTS", IDLE_SIZES="$IDLE_SIZES", IDLE_HOLD="$IDLE_HOLD", BIG_IDLE="$BIG_IDLE", BENCH_PROFILE="$BENCH_PROFILE", EXPERIMENTS="$EXPERIMENTS", SEQ_CALLERS="$SEQ_CALLERS", HERALD2_WORKERS="$HERALD2_WORKERS",
  SENDER_ALONE_RATES="$SENDER_ALONE_RATES", SIO_AUTO_PIPELINING="$SIO_AUTO_PIPELINING", SEND_BATCH="$SEND_BATCH",
  HERALD_SERVER_BIN="${HERALD_SERVER_BIN:+patched}")
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF

T0=$(date +%s)
for ROUND in $(seq "$ROUNDS"); do
    say "round $ROUND of $ROUNDS: systems $SYSTEMS"
    # SendToUser one call at a time, then SEQ_CALLERS at a time (Herald only:
    # the time per call a plain backend sees), stored and live-only.
    # Centrifugo's publish through its GRPC API likewise (with history: stored).
    want sequential && for s in $SYSTEMS; do
        case $s in
        herald*)
            run_bench "sequential-stored-$s" "$s" sequential -c 100 --duration "${STEP_SECS}s" --callers "$SEQ_CALLERS" --grpc-channels 1
            run_bench "sequential-transient-$s" "$s" sequential -c 100 --duration "${STEP_SECS}s" --callers "$SEQ_CALLERS" --grpc-channels 1 --transient
            ;;
        centrifugo) run_bench "sequential-stored-$s" "$s" sequential -c 100 --duration "${STEP_SECS}s" --callers "$SEQ_CALLERS" --grpc-channels 1 ;;
        centrifugo-live) run_bench "sequential-transient-$s" "$s" sequential -c 100 --duration "${STEP_SECS}s" --callers "$SEQ_CALLERS" --grpc-channels 1 ;;
        esac
    done
    # The Socket.IO sender alone: what it can emit with no server to feed.
    want sender-alone && has socketio && run_sender_alone
    # Unicast, live-only: fixed moderate rate, then step up to the max sustained.
    want unicast-transient && for s in $SYSTEMS; do
        [ "$s" = centrifugo ] && continue # with history: the stored comparison
        # shellcheck disable=SC2046
        run_bench "unicast-transient-$s" "$s" unicast -c "$UNICAST_CONNS" --duration "${STEP_SECS}s" $(ramp_args) \
            $([ "${s#herald}" != "$s" ] && echo --transient) $(sender_args "$s")
    done
    # Unicast, stored (Herald only: the others have no store).
    want unicast-stored && for s in $SYSTEMS; do
        case $s in herald* | centrifugo) ;; *) continue ;; esac
        # shellcheck disable=SC2046
        run_bench "unicast-stored-$s" "$s" unicast -c "$UNICAST_CONNS" --duration "${STEP_SECS}s" $(ramp_args)
    done
    # Unicast through SendBatch (Herald 2 nodes): SEND_BATCH independent
    # messages per call, one user each, stored and live-only.
    want unicast-sendbatch && for s in $SYSTEMS; do
        [ "$s" = herald2 ] || continue
        # shellcheck disable=SC2046
        run_bench "unicast-sendbatch-stored-$s" "$s" unicast -c "$UNICAST_CONNS" --duration "${STEP_SECS}s" --send-batch "$SEND_BATCH" $(ramp_args)
        # shellcheck disable=SC2046
        run_bench "unicast-sendbatch-transient-$s" "$s" unicast -c "$UNICAST_CONNS" --duration "${STEP_SECS}s" --send-batch "$SEND_BATCH" $(ramp_args) --transient
    done
    # Unicast, BATCH users per call, live-only.
    want unicast-batch && for s in $SYSTEMS; do
        [ "$s" = centrifugo ] && continue
        # shellcheck disable=SC2046
        run_bench "unicast-batch-$s" "$s" unicast -c "$UNICAST_CONNS" --duration "${STEP_SECS}s" --users-per-call "$BATCH" \
            $(ramp_args) $([ "${s#herald}" != "$s" ] && echo --transient) $(sender_args "$s")
    done
    # Broadcast to every connection.
    want broadcast && for s in $SYSTEMS; do
        case $s in socketio-http | centrifugo) continue ;; esac # the same servers as socketio / centrifugo-live
        run_bench "broadcast-$s" "$s" broadcast -c "$BROADCAST_CONNS" --single 10 --broadcasts "$BROADCASTS" --in-flight 4
    done
    # Control queries (Herald only).
    want control && for s in $SYSTEMS; do
        case $s in herald*) ;; *) continue ;; esac
        run_bench "control-$s" "$s" control -c "$UNICAST_CONNS" --duration "${STEP_SECS}s" --users-per-call 10
    done
    # Idle connections: resident memory per connection.
    want idle && for n in $IDLE_SIZES; do
        if [ "$n" -gt "$MAX_CONNS" ]; then
            say "skip idle-$n: the open-file limit ($FD_LIMIT) allows $MAX_CONNS connections per process"
            continue
        fi
        for s in $SYSTEMS; do
            case $s in socketio-http | centrifugo) continue ;; esac
            run_bench "idle-$n-$s" "$s" idle -c "$n" --hold "$IDLE_HOLD" --connect-concurrency 500
        done
    done
    if want idle && [ "$BIG_IDLE" -gt 0 ] && has herald1; then
        if [ "$BIG_IDLE" -gt "$MAX_CONNS" ]; then
            say "skip idle-big: the open-file limit ($FD_LIMIT) allows $MAX_CONNS connections per process"
        else
            run_bench "idle-big-herald1" herald1 idle -c "$BIG_IDLE" --hold 30s --connect-concurrency 500 --check
        fi
    fi
done
say "done in $(($(date +%s) - T0)) s; results in $BENCH_OUT"

if [ "$WRITE_REPORT" = 1 ]; then
    python3 bench/report.py "$BENCH_OUT" BENCHMARKS.md && say "wrote BENCHMARKS.md"
else
    python3 bench/report.py "$BENCH_OUT" - >"$BENCH_OUT/summary.md" || true
fi
if [ $FAILED -gt 0 ]; then
    say "$FAILED bench run(s) failed"
    exit 1
fi
