#!/usr/bin/env bash
# 100,000 WebSocket connections on one machine, with a per-process
# open-files limit (20,000 on the development machine) below that: one
# redis-server, several `herald serve` nodes on it, and several
# `herald-bench hold` client processes, each under the limit; one
# `herald-bench probe` measures (see bench/src/probe.rs):
#
#   * RSS per connection of the nodes and of Redis (VmRSS before the
#     clients connect and 5 s after they all have; /proc/<pid>/status);
#   * the connect rate (every client over the whole connect phase);
#   * one Broadcast reaching every client: from the send to the first and
#     to the last delivery, several times;
#   * IsOnline p99 while every client is connected (open loop);
#   * the reconnect storm: node 1 is SIGKILLed with its clients connected
#     and restarted on the same ports; time until every client is
#     connected again (with a fresh user id, as the bench's clients do),
#     then until a broadcast has reached all of them.
#
#   bash bench/c100k.sh                     100,000 clients (a few minutes)
#   C100K_CONNS=2000 bash bench/c100k.sh    a quick check of the script
#
# Settings (environment): C100K_CONNS (100000), C100K_NODES and
# C100K_HOLDERS (one per 17,000 clients, at least 2 nodes), C100K_BROADCASTS
# (5), C100K_ISONLINE_RATE (2000 calls/s, one user each), C100K_ISONLINE_SECS
# (10), C100K_SRC_IPS (16: the clients' source addresses 127.0.0.1-16;
# one address to six node ports slows connects past ~13k per port, in
# the kernel's search for a free source port), C100K_OUT (bench-out/c100k),
# C100K_BUILD (1: cargo build --release --workspace first),
# C100K_SERVER_BIN (another herald binary as the nodes, for an A/B).
#
# Every process it starts is stopped by PID on exit; every wait is bounded;
# ports are picked free at run time, below the ephemeral range (32768+) so
# that no client socket can take a port a node is restarted on. Needs
# redis-server and python3 on PATH. Prints a Markdown summary (also in
# $C100K_OUT/summary.md) and exits 1 if anything was lost or failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONNS=${C100K_CONNS:-100000}
PER=17000
NODES=${C100K_NODES:-$(((CONNS + PER - 1) / PER))}
[ "$NODES" -ge 2 ] || NODES=2
HOLDERS=${C100K_HOLDERS:-$(((CONNS + PER - 1) / PER))}
[ "$HOLDERS" -ge 1 ] || HOLDERS=1
BROADCASTS=${C100K_BROADCASTS:-5}
ISONLINE_RATE=${C100K_ISONLINE_RATE:-2000}
ISONLINE_SECS=${C100K_ISONLINE_SECS:-10}
OUT=${C100K_OUT:-bench-out/c100k}
SRC_IPS=${C100K_SRC_IPS:-16}
BIN=target/release
SERVER=${C100K_SERVER_BIN:-$BIN/herald}
SECRET=c100k-secret-$RANDOM$RANDOM
STORM_NODE=1

say() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

command -v redis-server >/dev/null || die "redis-server is not on PATH (apt-get install redis-server)"
command -v python3 >/dev/null || die "python3 is not on PATH"
if [ "${C100K_BUILD:-1}" = 1 ]; then
    say "building (cargo build --release --workspace)"
    nice -n 5 cargo build --release --workspace --quiet
fi
[ -x "$BIN/herald" ] && [ -x "$BIN/herald-bench" ] || die "no $BIN/herald or $BIN/herald-bench"

# Every socket is a file descriptor: raise the soft limit to the hard one
# (what the nodes and the bench would do themselves) and check both fit.
ulimit -n "$(ulimit -Hn)"
FDS=$(ulimit -n)
per_node=$(((CONNS + NODES - 1) / NODES))
per_holder=$(((CONNS + HOLDERS - 1) / HOLDERS))
[ $((per_node + 300)) -le "$FDS" ] ||
    die "$per_node connections per node need more than the open-files limit $FDS: raise C100K_NODES"
[ $((per_holder + 300)) -le "$FDS" ] ||
    die "$per_holder clients per bench process need more than the open-files limit $FDS: raise C100K_HOLDERS"

rm -rf "$OUT"
mkdir -p "$OUT"

# --- processes we start, stopped by PID on exit ------------------------------
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port in 20000-32000: below the ephemeral range, so no
# client's source port can hold a port a node must bind again.
free_port() {
    python3 -c '
import random, socket
while True:
    p = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); print(p); break
    except OSError:
        pass
    finally:
        s.close()'
}

# wait_ready LOG PID PATTERN: until PATTERN is in LOG (30 s), or PID died.
wait_ready() {
    for _ in $(seq 300); do
        grep -q "$3" "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    tail -5 "$1" >&2
    die "$(basename "$1" .log) did not start"
}

# running PID: the process exists and is not a zombie (a child killed and
# not yet waited for).
# forget PID: a process already waited for leaves PIDS, so cleanup cannot
# signal whatever process reuses its PID.
forget() {
    local keep=() q
    for q in "${PIDS[@]+"${PIDS[@]}"}"; do [ "$q" = "$1" ] || keep+=("$q"); done
    PIDS=("${keep[@]+"${keep[@]}"}")
}
running() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
now_ms() { date +%s%3N; }
# The kernel's count of connections dropped because a listener's accept
# queue was full (machine-wide: other programs' listeners count too).
listen_overflows() {
    awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) k[i] = $i; h = 1 } else { for (i = 1; i <= NF; i++) if (k[i] == "ListenOverflows") print $i } }' /proc/net/netstat
}

# --- Redis and the nodes -------------------------------------------------------
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --protected-mode yes >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_ready "$OUT/redis.log" "$REDIS_PID" "Ready to accept connections"

declare -a WS GRPC ADMIN NODE_PID
start_node() { # start_node I: node I on its ports (the same ones again on a restart)
    local i=$1
    "$SERVER" serve --node-id "n$i" --jwt-secret "$SECRET" \
        --redis-url "redis://127.0.0.1:$REDIS_PORT/0" \
        --ws-listen "127.0.0.1:${WS[$i]}" --grpc-listen "127.0.0.1:${GRPC[$i]}" \
        --admin-listen "127.0.0.1:${ADMIN[$i]}" >>"$OUT/node$i.log" 2>&1 &
    NODE_PID[$i]=$!
    PIDS+=("${NODE_PID[$i]}")
}
WS_URLS=() API_URLS=()
for i in $(seq 1 "$NODES"); do
    WS[$i]=$(free_port)
    GRPC[$i]=$(free_port)
    ADMIN[$i]=$(free_port)
    WS_URLS+=("ws://127.0.0.1:${WS[$i]}/ws")
    API_URLS+=("http://127.0.0.1:${GRPC[$i]}")
    start_node "$i"
done
for i in $(seq 1 "$NODES"); do wait_ready "$OUT/node$i.log" "${NODE_PID[$i]}" "herald ready"; done
WS_LIST=$(IFS=,; echo "${WS_URLS[*]}")
API_LIST=$(IFS=,; echo "${API_URLS[*]}")
say "redis on $REDIS_PORT, $NODES nodes up; $CONNS clients in $HOLDERS bench processes; open-files limit $FDS"

# --- memory before, the clients -----------------------------------------------
sleep 1
{
    echo "redis $(rss_kib "$REDIS_PID")"
    for i in $(seq 1 "$NODES"); do echo "n$i $(rss_kib "${NODE_PID[$i]}")"; done
} >"$OUT/rss-before.txt"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

HOLDER_ARGS=()
left=$CONNS
for h in $(seq 1 "$HOLDERS"); do
    n=$(((left + HOLDERS - h) / (HOLDERS - h + 1)))
    left=$((left - n))
    "$BIN/herald-bench" hold -c "$n" --ws "$WS_LIST" --jwt-secret "$SECRET" --run-id "h$h" \
        --status "$OUT/h$h.status" --hold 20m --time-limit 25m --connect-timeout 300s \
        --connect-concurrency 100 --src-ips "$SRC_IPS" --quiet --out "$OUT/h$h.json" >"$OUT/h$h.log" 2>&1 &
    PIDS+=("$!")
    HOLDER_ARGS+=(--holder "$OUT/h$h.status")
done

probe() { # probe OUT.json ARGS...: one herald-bench probe over every holder
    local out=$1
    shift
    "$BIN/herald-bench" probe --api "$API_LIST" --jwt-secret "$SECRET" "${HOLDER_ARGS[@]}" \
        --expect "$CONNS" --time-limit 10m --out "$out" "$@"
}

say "connecting $CONNS clients"
OVF0=$(listen_overflows)
probe "$OUT/connect.json" --connect-timeout 300s --single 0 || true
sleep 5
{
    echo "redis $(rss_kib "$REDIS_PID")"
    for i in $(seq 1 "$NODES"); do echo "n$i $(rss_kib "${NODE_PID[$i]}")"; done
} >"$OUT/rss-after.txt"
LOAD_HELD=$(cut -d' ' -f1-3 /proc/loadavg)
OVF1=$(listen_overflows)

say "broadcasts and IsOnline"
probe "$OUT/load.json" --connect-timeout 60s --single "$BROADCASTS" \
    --rate "$ISONLINE_RATE" --duration "${ISONLINE_SECS}s" || true
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

OVF2=$(listen_overflows)
say "reconnect storm: SIGKILL node $STORM_NODE, restart it on the same ports"
probe "$OUT/storm.json" --connect-timeout 60s --storm-kill "${NODE_PID[$STORM_NODE]}" &
PROBE_PID=$!
PIDS+=("$PROBE_PID")
killed=${NODE_PID[$STORM_NODE]}
for _ in $(seq 1200); do # until the probe has killed the node (or gave up): 120 s at most
    running "$killed" && running "$PROBE_PID" || break
    sleep 0.1
done
running "$killed" && die "the probe did not kill node $STORM_NODE (see $OUT/storm.json)"
{ wait "$killed"; } 2>/dev/null || true
forget "$killed"
t0=$(now_ms)
mark=$(grep -c "herald ready" "$OUT/node$STORM_NODE.log" || true)
start_node "$STORM_NODE"
ready=0
for _ in $(seq 300); do
    [ "$(grep -c "herald ready" "$OUT/node$STORM_NODE.log" || true)" -gt "$mark" ] && { ready=1; break; }
    sleep 0.05
done
[ $ready = 1 ] || die "node $STORM_NODE was not ready 15 s after its restart (see $OUT/node$STORM_NODE.log)"
echo "$(($(now_ms) - t0))" >"$OUT/restart-ms.txt"
wait "$PROBE_PID" || true
forget "$PROBE_PID"
OVF3=$(listen_overflows)

# --- the summary -----------------------------------------------------------------
{
    echo "conns $CONNS"
    echo "nodes $NODES"
    echo "holders $HOLDERS"
    echo "storm_node $STORM_NODE"
    echo "overflows_connect $((OVF1 - OVF0))"
    echo "overflows_storm $((OVF3 - OVF2))"
    echo "load_before $LOAD_BEFORE"
    echo "load_held $LOAD_HELD"
    echo "load_after $LOAD_AFTER"
    echo "nproc $(nproc)"
    echo "mem $(free -h | awk '/^Mem:/ {print $2}')"
    echo "fds $FDS"
    echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "redis_version $(redis-server --version | awk '{print $3}')"
} >"$OUT/facts.txt"
python3 - "$OUT" >"$OUT/summary.md" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
def kv(name):
    d = {}
    with open(os.path.join(out, name)) as f:
        for line in f:
            k, _, v = line.strip().partition(" ")
            d[k] = v
    return d
facts, before, after = kv("facts.txt"), kv("rss-before.txt"), kv("rss-after.txt")
conn, lo, st = load("connect.json"), load("load.json"), load("storm.json")
n = int(facts["conns"])
nodes = [k for k in before if k != "redis"]
node_kib = sum(int(after[k]) - int(before[k]) for k in nodes)
redis_kib = int(after["redis"]) - int(before["redis"])
problems = conn.get("problems", []) + lo.get("problems", []) + st.get("problems", [])
print(f"| measured ({n:,} clients, {facts['nodes']} nodes + 1 Redis, {facts['holders']} bench processes) | |")
print("|---|---|")
c = conn.get("connect", {})
print(f"| connected | {c.get('connected', 0):,} in {c.get('secs', 0):.1f} s: {c.get('per_s', 0):,.0f} connects/s ({c.get('failed_attempts', 0)} failed attempts; {int(facts['overflows_connect']):,} SYNs or handshakes dropped by full accept queues, machine-wide) |")
print(f"| RSS per connection, nodes (sum of {len(nodes)}) | {node_kib * 1024 / n / 1024:.2f} KiB ({node_kib / 1024:,.0f} MiB in all; per node {', '.join(f'{(int(after[k]) - int(before[k])) / 1024:.0f}' for k in nodes)} MiB) |")
print(f"| RSS per connection, Redis | {redis_kib * 1024 / n / 1024:.2f} KiB ({redis_kib / 1024:,.0f} MiB in all) |")
bs = [b for b in lo.get("broadcasts", []) if "expected" in b]
if bs:
    fl = sorted(b["first_to_last_ms"] for b in bs)
    sl = sorted(b["send_to_last_ms"] for b in bs)
    sf = sorted(b["send_to_first_ms"] for b in bs)
    got = min(b["delivered"] for b in bs)
    exp = max(b["expected"] for b in bs)
    print(f"| one Broadcast to all ({len(bs)} sent one at a time; median, min-max) | first to last delivery {fl[len(fl)//2]:.0f} ms ({fl[0]:.0f}-{fl[-1]:.0f}); send to last {sl[len(sl)//2]:.0f} ms ({sl[0]:.0f}-{sl[-1]:.0f}); send to first {sf[len(sf)//2]:.1f} ms; each reached {got:,} of {exp:,} |")
for s in lo.get("is_online", []):
    l = s["latency"]
    print(f"| IsOnline, {s['users_per_call']} user per call, {s['offered_per_s']:,.0f} calls/s for {s['calls'] / max(s['calls_per_s'], 1e-9):.0f} s | p50 {l['p50_ms']:.2f} ms, p99 {l['p99_ms']:.2f} ms, max {l['max_ms']:.1f} ms; {s['users_online']:,} of {s['users_asked']:,} online; {s['errors']} errors |")
s = st.get("storm", {})
if s:
    b = s.get("broadcast", {})
    print(f"| reconnect storm: node {facts.get('storm_node', 1)} SIGKILLed, restarted on its ports ({open(os.path.join(out, 'restart-ms.txt')).read().strip()} ms to ready) | {s.get('dropped', 0):,} clients dropped; all {s.get('connected_before', 0):,} connected again {s.get('all_connected_after_s', 0):.1f} s after the kill ({s.get('failed_attempts', 0):,} refused attempts meanwhile; {int(facts['overflows_storm']):,} dropped by full accept queues); a broadcast then reached {b.get('delivered', 0):,} of {b.get('expected', 0):,}, the last {s.get('all_receiving_after_s', 0):.1f} s after the kill |")
print(f"| machine | {facts['nproc']} cores, {facts['mem']} RAM, open-files limit {facts['fds']} per process; load average (1/5/15 min) {facts['load_before']} before, {facts['load_held']} with all connected, {facts['load_after']} after the broadcasts and IsOnline; Redis {facts['redis_version']}; git {facts['git']} |")
if problems:
    print("\nProblems: " + "; ".join(problems))
EOF
cat "$OUT/summary.md"
if grep -q '^Problems:' "$OUT/summary.md"; then
    exit 1
fi
