//! The command line of `herald-bench`.

use crate::fleet::Target;
use clap::Parser;
use serde::Serialize;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Messages to random connected users at a fixed rate, a ramp, or max rate.
    Unicast,
    /// Messages to every connection: time to reach all, then sustained fan-out.
    Broadcast,
    /// Connections only: connect rate, resident memory per connection.
    Idle,
    /// IsOnline / UnreadCount queries per second (Herald only).
    Control,
    /// SendToUser one call at a time (closed loop), then --callers at a
    /// time: the time per call a plain backend sees.
    Sequential,
    /// Connections held for --hold, their state written to --status every
    /// 100 ms for a `probe` in another process: one of several client
    /// processes of a fleet too big for one process's open-files limit.
    Hold,
    /// Drives and measures the fleets of several `hold` processes (their
    /// --holder status files): waits for all --expect clients, times
    /// broadcasts to all of them, runs IsOnline at --rate; with
    /// --storm-kill, kills that node and times the reconnect storm.
    Probe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlOp {
    IsOnline,
    Unread,
    Mixed,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 500ms, 30s)"))
}

#[derive(Parser, Debug)]
#[command(
    name = "herald-bench",
    version,
    about = "Load-test a Herald cluster (or a comparison server: herald-floor, Socket.IO, Centrifugo)"
)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// What kind of server the URLs point at.
    #[arg(long, value_enum, default_value = "herald")]
    pub target: Target,
    /// WebSocket URL of each node (repeat or comma-separate). Clients are
    /// spread over them round-robin. [herald: ws://127.0.0.1:8080/ws;
    /// floor: ws://H:P/ws; socketio: ws://H:P/socket.io/;
    /// centrifugo: ws://H:P/connection/websocket]
    #[arg(
        long = "ws",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    pub ws: Vec<String>,
    /// API URL of each node, paired by position with --ws: gRPC for herald
    /// (http://127.0.0.1:50051), the bench protocol's HTTP base for floor and
    /// socketio, the GRPC API (grpc_api) for centrifugo. Calls go round-robin
    /// over them.
    #[arg(long = "api", value_delimiter = ',')]
    pub api: Vec<String>,
    /// HS256 secret of the cluster, to mint client tokens (herald, centrifugo).
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// API key for the gRPC API, if the nodes require one.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// WebSocket clients to open (one user each).
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub connections: usize,
    /// Handshakes in progress at once while connecting.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Loopback source addresses (127.0.0.1, .2, ...) to spread clients over;
    /// 0 picks enough for the count (one per 20k connections per node).
    /// Past about 13k connections from one address to one port, Linux's
    /// search for a free source port costs more CPU than the connection
    /// (it tries even ports first): bench/c100k.sh uses 16.
    #[arg(long, default_value_t = 0)]
    pub src_ips: usize,
    /// Offered rate in deliveries/s (a call to k users counts k); several
    /// values run as fixed-rate steps in order. Unicast and control.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// After the --rate steps, step the rate up (x2 from --ramp-start) until
    /// p99 exceeds --slo-p99 or anything is lost, then bisect --ramp-refine
    /// times; reports the highest rate that held.
    #[arg(long)]
    pub ramp: bool,
    #[arg(long, default_value_t = 2000.0)]
    pub ramp_start: f64,
    #[arg(long, default_value_t = 4_000_000.0)]
    pub ramp_max: f64,
    #[arg(long, default_value_t = 2)]
    pub ramp_refine: u32,
    /// A ramp step that fails on latency alone (nothing lost) is run again
    /// this many times before it counts as failed: one stall of a shared
    /// machine should not end the search.
    #[arg(long, default_value_t = 1)]
    pub ramp_retries: u32,
    /// The latency objective a step must meet to count as sustained.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    pub slo_p99: Duration,
    /// Closed loop instead: --concurrency callers send as fast as answers come.
    #[arg(long)]
    pub max_rate: bool,
    /// Callers of the closed loop (--max-rate, and control without --rate).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Sequential: closed-loop callers of each step (one call in flight
    /// per caller).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub callers: Vec<usize>,
    /// Length of each sending step.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub duration: Duration,
    /// Recipients per SendToUser call (distinct users).
    #[arg(long, default_value_t = 1)]
    pub users_per_call: usize,
    /// Live-only sends (SendToUser transient=true); the comparison servers
    /// are always live-only.
    #[arg(long)]
    pub transient: bool,
    /// Share of recipients connected to another node than the API node
    /// called (0..1). Default: recipients uniformly at random.
    #[arg(long)]
    pub remote_share: Option<f64>,
    /// Payload size in bytes ({"seq":N,"t":T,"p":"xx..."}).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Calls in flight at most; beyond, the sender queues (and the queueing
    /// counts as latency: the intended send time is kept).
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// The (one) --api URL is bench/socketio/emitter.js, and each
    /// fixed-rate unicast step runs inside it: its own open-loop schedule,
    /// one in-process `emitter.emit` per message (POST /unicast-step per
    /// step, not per message). herald-bench sends it the connected clients
    /// and books what it reports; receiving and checking are unchanged.
    /// Socket.IO only; not with --max-rate or --remote-share.
    #[arg(long)]
    pub remote_sender: bool,
    /// Herald: send unicast through SendBatch, up to this many messages
    /// (each its own item, --users-per-call users each) per call, instead
    /// of one SendToUser per message. A batch leaves when full or when its
    /// first message has waited --send-batch-linger (the wait counts as
    /// latency: each message keeps its intended send time). 0: SendToUser.
    #[arg(long, default_value_t = 0)]
    pub send_batch: usize,
    #[arg(long, default_value = "1ms", value_parser = duration)]
    pub send_batch_linger: Duration,
    /// Herald: send unicast by committing rows into the outbox table of
    /// this PostgreSQL database (postgres://user:password@host:port/db), one
    /// transaction per message, instead of calling the gRPC API; the nodes'
    /// outbox consumer delivers them (Centrifugo: its PostgreSQL consumer's
    /// table). Latency then runs from each row's
    /// intended INSERT time (its commit included) to the socket. Unicast
    /// only; --api is not needed.
    #[arg(long)]
    pub outbox_postgres: Option<String>,
    /// PostgreSQL connections committing outbox rows (calls go round-robin;
    /// up to --max-in-flight transactions in flight in all).
    #[arg(long, default_value_t = 8)]
    pub outbox_writers: usize,
    /// The outbox table (as the nodes' --outbox-table; with --target
    /// centrifugo, its consumer's outbox_table_name).
    #[arg(long, default_value = "herald_outbox")]
    pub outbox_table: String,
    /// With --target centrifugo: its consumer's num_partitions (a user's
    /// rows all go to one partition, picked from a hash of its id).
    #[arg(long, default_value_t = 1)]
    pub outbox_partitions: u32,
    /// gRPC connections per API node.
    #[arg(long, default_value_t = 4)]
    pub grpc_channels: usize,
    /// HTTP keep-alive connections per API node (bench protocol).
    #[arg(long, default_value_t = 64)]
    pub http_conns: usize,
    /// Broadcast: broadcasts sent one at a time (each waits for the last
    /// delivery) to time one broadcast reaching everyone.
    #[arg(long, default_value_t = 10)]
    pub single: usize,
    /// Broadcast: broadcasts sent for the sustained fan-out phase.
    #[arg(long, default_value_t = 50)]
    pub broadcasts: usize,
    /// Broadcast: broadcasts pending (not yet everywhere) at most during the
    /// sustained phase.
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// Idle: how long to hold the connections after they are all up.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub hold: Duration,
    /// Control: which query.
    #[arg(long, value_enum, default_value = "mixed")]
    pub op: ControlOp,
    /// A server process to watch, as LABEL=PID or PID (repeat): CPU time
    /// (utime+stime) per step, resident memory for idle.
    #[arg(long = "pid")]
    pub pid: Vec<String>,
    /// A node's admin /metrics URL: process_resident_memory_bytes is read
    /// from it for idle when no --pid is given.
    #[arg(long = "metrics")]
    pub metrics: Vec<String>,
    /// How long to wait for outstanding deliveries after a step.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// How long to wait for all clients to connect.
    #[arg(long, default_value = "120s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// Hard limit on the whole run; the bench exits (code 4) past it.
    #[arg(long, default_value = "15m", value_parser = duration)]
    pub time_limit: Duration,
    /// Reconnect dropped clients (with a fresh user id) between and during steps.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub reconnect: bool,
    /// Hold: the prefix of the user ids (`<run-id>-<slot>-<generation>`),
    /// so that a probe can name them. Default: random.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Hold: the file the state is written to (replaced every 100 ms).
    #[arg(long)]
    pub status: Option<std::path::PathBuf>,
    /// Probe: the status file of each hold process (repeat).
    #[arg(long = "holder")]
    pub holders: Vec<std::path::PathBuf>,
    /// Probe: the clients the hold processes open in all.
    #[arg(long, default_value_t = 0)]
    pub expect: usize,
    /// Probe: instead of the load phase, SIGKILL this node process (which
    /// the caller restarts on the same ports) and time until every client
    /// is connected again and a broadcast reaches all of them.
    #[arg(long)]
    pub storm_kill: Option<u32>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Write the JSON summary to this file as well.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// A name for this run, copied into the summary.
    #[arg(long)]
    pub label: Option<String>,
    /// Exit 3 on any error, failed connect, disconnect, lost or duplicated
    /// message in a fixed-rate step or broadcast (never on timings). For CI.
    #[arg(long)]
    pub check: bool,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}
