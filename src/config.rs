//! Command line, environment and config file, resolved into one [`Config`].
//!
//! Precedence: flag, then `HERALD_<NAME>` environment variable (clap reads
//! both), then the TOML file given by `--config`, then the default. Each
//! default is written once, in its clap attribute.

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::apikey::KeySpec;
use crate::auth::JwtConfig;
use crate::origin::Origins;
use crate::telemetry::{LogFormat, LogLevel};

mod client;
mod outbox;
mod parse;
pub use client::{ClientTls, JwksArgs, ListenArgs, PrivateKeyArgs, SendArgs, TokenArgs};
pub use outbox::{OutboxArgs, OutboxConfig, OutboxInitArgs, MAX_OUTBOX_BATCH};
use parse::*;

#[derive(Parser, Debug)]
#[command(
    name = "herald",
    version,
    about = "Herald push server: gRPC control API in, WebSocket frames out"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node.
    Serve(ServeArgs),
    /// Mint a WebSocket token for a user: HS256 with --jwt-secret, or signed with --jwt-private-key.
    Token(TokenArgs),
    /// Print the JWKS (public keys) of a --jwt-private-key, for a node's --jwt-jwks (development).
    Jwks(JwksArgs),
    /// Send a message to users through a node's gRPC API (a small client).
    Send(SendArgs),
    /// Connect to a node's WebSocket like a browser and print the frames it sends.
    Listen(ListenArgs),
    /// The PostgreSQL outbox a node consumes (--outbox-postgres).
    #[command(subcommand)]
    Outbox(OutboxCommand),
}

#[derive(Subcommand, Debug)]
pub enum OutboxCommand {
    /// Print the DDL of the outbox table, its dead-letter table and its notify trigger (or apply it with --apply).
    Init(OutboxInitArgs),
}

/// Flags of `herald serve`. Each setting, its environment variable and its
/// default are written once, here; `--help` shows them. The `--config` TOML
/// file uses the same names in snake_case and fills in what neither a flag
/// nor an environment variable set (see [`Cli::load_from`]).
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML config file; its keys are these flags' names in snake_case.
    #[arg(long, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Public WebSocket listener (browsers connect to /ws here).
    #[arg(long, env = "HERALD_WS_LISTEN", default_value = "127.0.0.1:8080")]
    pub ws_listen: SocketAddr,
    /// Internal gRPC listener for the control API.
    #[arg(long, env = "HERALD_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: SocketAddr,
    /// Admin HTTP listener: /metrics (Prometheus) and /healthz.
    #[arg(long, env = "HERALD_ADMIN_LISTEN", default_value = "127.0.0.1:9091")]
    pub admin_listen: SocketAddr,
    /// HMAC secret of WebSocket tokens (HS256/HS384/HS512, at least 8 bytes). None and no other key: one is generated for this run and a demo token printed.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true, value_parser = secret)]
    pub jwt_secret: Option<String>,
    /// PEM public key of WebSocket tokens: RSA (RS*/PS*), EC (ES256/ES384) or Ed25519 (EdDSA). Repeatable.
    #[arg(long = "jwt-public-key", env = "HERALD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Vec<PathBuf>,
    /// JWKS file (an identity provider's `{"keys": [...]}`); keys chosen by the token's `kid`; re-read when it changes.
    #[arg(long, env = "HERALD_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// Accepted token audience (`aud`); repeatable. Unset: `aud` is not checked.
    #[arg(long = "jwt-audience", env = "HERALD_JWT_AUDIENCE")]
    pub jwt_audience: Vec<String>,
    /// Accepted token issuer (`iss`); repeatable. Unset: `iss` is not checked.
    #[arg(long = "jwt-issuer", env = "HERALD_JWT_ISSUER")]
    pub jwt_issuer: Vec<String>,
    /// Longest token lifetime accepted (`exp` minus `iat`, or minus now without `iat`).
    #[arg(long, env = "HERALD_JWT_MAX_LIFETIME", value_parser = duration)]
    pub jwt_max_lifetime: Option<Duration>,
    /// The node's gRPC API keys: `name:scope:key` with scope send, read or admin (or send+read); repeatable or comma-separated. A single bare key without ':' is named "default" with every scope. A value with ':' that is not name:scope:key stops the start. Set: PushService callers must send `authorization: Bearer <key>` (the key part only; clients read it from HERALD_API_KEY).
    #[arg(long = "api-keys", env = "HERALD_API_KEYS", hide_env_values = true, value_parser = ApiKeyParser, value_delimiter = ',')]
    pub api_keys: Vec<KeySpec>,
    /// Health and reflection also need an API key (any scope); by default they are open for probes and grpcurl.
    #[arg(long, env = "HERALD_GRPC_AUTH_DISCOVERY")]
    pub grpc_auth_discovery: bool,
    /// PEM certificate chain: with --tls-key, every listener speaks TLS (wss://, gRPC over TLS, https admin). Re-read on change and on SIGHUP.
    #[arg(long, env = "HERALD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "HERALD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: gRPC callers must present a client certificate signed by it (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "HERALD_GRPC_TLS_CLIENT_CA", requires = "tls_cert")]
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// Keep the admin listener plain HTTP when TLS is on (a Prometheus on the same host).
    #[arg(long, env = "HERALD_ADMIN_PLAIN")]
    pub admin_plain: bool,
    /// Origin allowed to open WebSockets (`https://app.example.com`, `https://*.example.com`); repeatable. Unset: any origin.
    #[arg(
        long = "allowed-origin",
        env = "HERALD_ALLOWED_ORIGIN",
        value_delimiter = ','
    )]
    pub allowed_origin: Vec<String>,
    /// This node's id in the cluster. [default: <host name>-<ws port>]
    #[arg(long, env = "HERALD_NODE_ID")]
    pub node_id: Option<String>,
    /// Redis URL: redis://host:port/db, or redis+cluster://host:port[,host:port...] (seed nodes of a Redis Cluster). Without it the node runs alone on the embedded in-memory backend.
    #[arg(long, env = "HERALD_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Largest payload_json accepted, in bytes.
    #[arg(long, env = "HERALD_MAX_PAYLOAD_BYTES", default_value_t = 64 * 1024)]
    pub max_payload_bytes: usize,
    /// Largest frame a client may send, in bytes; bigger ones close with 1009.
    #[arg(long, env = "HERALD_MAX_CLIENT_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_client_frame_bytes: usize,
    /// Bytes of frames queued per connection before the client counts as slow and is closed with 1013.
    #[arg(long, env = "HERALD_SEND_QUEUE_BYTES", default_value_t = 1024 * 1024, value_parser = positive)]
    pub send_queue_bytes: usize,
    /// Frames queued per connection at most (a backstop to --send-queue-bytes); one more closes with 1013.
    #[arg(long, env = "HERALD_SEND_QUEUE", default_value_t = 16 * 1024, value_parser = positive)]
    pub send_queue: usize,
    /// Live connections one user may hold across the cluster; one more closes with 4029.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_USER", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_user: u32,
    /// Live connections this node accepts before it stops accepting.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 500_000, value_parser = positive)]
    pub max_connections: usize,
    /// Stored messages kept per user; older ones are dropped.
    #[arg(long, env = "HERALD_INBOX_MAX_MESSAGES", default_value_t = 1000, value_parser = positive)]
    pub inbox_max_messages: usize,
    /// Age after which stored messages are dropped.
    #[arg(long, env = "HERALD_INBOX_MAX_AGE", default_value = "7d", value_parser = duration)]
    pub inbox_max_age: Duration,
    /// Embedded backend: bytes of stored messages this node keeps across all inboxes (a payload sent to many users counts once); over it the oldest are dropped first.
    #[arg(long, env = "HERALD_INBOX_MEMORY_LIMIT", default_value_t = 256 * 1024 * 1024, value_parser = positive)]
    pub inbox_memory_limit: usize,
    /// Unread messages replayed on a connect without `since` (the newest ones).
    #[arg(long, env = "HERALD_REPLAY_LIMIT", default_value_t = 100)]
    pub replay_limit: usize,
    /// WebSocket ping interval; a connection silent for two intervals is closed (at least 50ms).
    #[arg(long, env = "HERALD_HEARTBEAT", default_value = "25s", value_parser = duration)]
    pub heartbeat: Duration,
    /// Node lease in Redis; a node that stops renewing it counts as dead after this long (at least 500ms).
    #[arg(long, env = "HERALD_NODE_LEASE", default_value = "15s", value_parser = duration)]
    pub node_lease: Duration,
    /// Redis: how long a user's connection-reservation hash outlives its last refresh; each node refreshes its users' in a slow sweep, so a crashed node's entries of users who never return expire. At least 4 node leases; give every node the same.
    #[arg(long, env = "HERALD_PRESENCE_TTL", default_value = "1h", value_parser = duration)]
    pub presence_ttl: Duration,
    /// gRPC connections this node holds at once; more wait to be accepted.
    #[arg(long, env = "HERALD_GRPC_MAX_CONNECTIONS", default_value_t = 1024, value_parser = positive)]
    pub grpc_max_connections: usize,
    /// Concurrent gRPC streams (calls) per connection, announced in HTTP/2 SETTINGS.
    #[arg(long, env = "HERALD_GRPC_MAX_STREAMS", default_value_t = 1024, value_parser = positive)]
    pub grpc_max_streams: usize,
    /// PushService calls in flight on this node; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "HERALD_GRPC_MAX_INFLIGHT", default_value_t = 10_000, value_parser = positive)]
    pub grpc_max_inflight: usize,
    /// Health and reflection calls and open streams (e.g. Health/Watch) in flight on this node, a budget apart from --grpc-max-inflight; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "HERALD_GRPC_MAX_DISCOVERY_INFLIGHT", default_value_t = 256, value_parser = positive)]
    pub grpc_max_discovery_inflight: usize,
    /// A gRPC connection must finish TLS and send the HTTP/2 preface within this, or it is closed.
    #[arg(long, env = "HERALD_GRPC_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub grpc_handshake_timeout: Duration,
    /// While fewer than a tenth of the gRPC connection slots are free, a connection with no PushService call past the key check and no open call is closed once it has been so this long.
    #[arg(long, env = "HERALD_GRPC_ANONYMOUS_IDLE", default_value = "30s", value_parser = duration)]
    pub grpc_anonymous_idle: Duration,
    /// HTTP/2 keepalive: a PING after this much silence on a gRPC connection; a peer that does not answer within --grpc-handshake-timeout is dropped.
    #[arg(long, env = "HERALD_GRPC_KEEPALIVE", default_value = "30s", value_parser = duration)]
    pub grpc_keepalive: Duration,
    /// Client frames a connection may send per second, sustained; over the budget it gets an error frame and close 1008.
    #[arg(long, env = "HERALD_CLIENT_FRAME_RATE", default_value_t = 20, value_parser = positive)]
    pub client_frame_rate: usize,
    /// Client frames a connection may send in a burst above --client-frame-rate.
    #[arg(long, env = "HERALD_CLIENT_FRAME_BURST", default_value_t = 100, value_parser = positive)]
    pub client_frame_burst: usize,
    /// A write to a client that cannot finish this fast drops the connection (a peer that stopped reading).
    #[arg(long, env = "HERALD_WRITE_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub write_timeout: Duration,
    /// How long an idempotency key is remembered: a repeat within it stores and pushes nothing.
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW", default_value = "10m", value_parser = duration)]
    pub idempotency_window: Duration,
    /// Embedded backend: idempotency keys remembered at once; a keyed send that would need more is refused with RESOURCE_EXHAUSTED until older keys expire.
    #[arg(long, env = "HERALD_IDEMPOTENCY_MAX_RECORDS", default_value_t = 1_000_000, value_parser = positive)]
    pub idempotency_max_records: usize,
    /// Runtime worker threads. [default: one per core; give each of N nodes sharing a machine cores/N]
    #[arg(long, env = "HERALD_WORKER_THREADS", value_parser = positive)]
    pub worker_threads: Option<usize>,
    /// Log lines on standard error: text, or json (one object per line; event-log lines name their kind in `event`).
    #[arg(long, env = "HERALD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Level of the log: off, error, warn, info, debug, trace. HTTP/2, hyper, tower, tonic and rustls stay at warn; RUST_LOG, if set, adds directives on top (a target it names follows it; a bare level replaces this one).
    #[arg(long, env = "HERALD_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    #[command(flatten)]
    pub outbox: OutboxArgs,
}

impl Default for ServeArgs {
    /// Every setting at its default, whatever the environment says (for
    /// embedding and tests).
    fn default() -> Self {
        let cmd = ServeArgs::augment_args(clap::Command::new("serve").no_binary_name(true))
            .mut_args(|a| a.env(None));
        let matches = cmd.get_matches_from(std::iter::empty::<&str>());
        ServeArgs::from_arg_matches(&matches).expect("the defaults parse")
    }
}

impl Cli {
    /// Parses the process's arguments; exits with clap's message on error.
    pub fn load() -> Cli {
        Cli::load_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `argv`. For `serve` with `--config`, every key of the file that
    /// neither a flag nor an environment variable set is added as if given
    /// as a flag, so precedence is flag, environment, file, default, and
    /// file values go through the same parsers and checks as flags.
    pub fn load_from<I, T>(argv: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let matches = Cli::clap().try_get_matches_from(&argv)?;
        let cli = Cli::from_arg_matches(&matches)?;
        let (Command::Serve(args), Some(serve)) =
            (&cli.command, matches.subcommand_matches("serve"))
        else {
            return Ok(cli);
        };
        let Some(path) = &args.config else {
            return Ok(cli);
        };
        let extra = file_flags(path, serve)
            .map_err(|e| Cli::clap().error(clap::error::ErrorKind::InvalidValue, e))?;
        let matches = Cli::clap().try_get_matches_from(argv.into_iter().chain(extra))?;
        Cli::from_arg_matches(&matches)
    }

    /// The command line, with `--help` naming each variable as `[env: X]`:
    /// clap's default, `[env: X=<value>]`, shows `X=` for a variable that is
    /// unset or empty, which reads as a setting in force, and would show
    /// the value of any variable not marked secret.
    fn clap() -> clap::Command {
        Cli::command().mut_subcommands(|sub| sub.mut_args(|a| a.hide_env_values(true)))
    }
}

/// The flags a config file stands for: `key = value` becomes `--key=value`
/// (arrays repeat the flag; `true` is the bare flag) for every key whose
/// setting came from neither the command line nor the environment.
fn file_flags(path: &Path, given: &ArgMatches) -> Result<Vec<OsString>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
    let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
    let mut flags = Vec::new();
    for (key, value) in table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == key.as_str() && key != "config")
            .ok_or_else(|| format!("config file {}: unknown key {key:?}", path.display()))?;
        let long = arg.get_long().expect("every serve setting is a long flag");
        if matches!(
            given.value_source(&key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let values = match value {
            toml::Value::Array(a) => a,
            v => vec![v],
        };
        for v in values {
            match v {
                toml::Value::String(s) => flags.push(format!("--{long}={s}").into()),
                toml::Value::Integer(i) => flags.push(format!("--{long}={i}").into()),
                toml::Value::Boolean(true) => flags.push(format!("--{long}").into()),
                toml::Value::Boolean(false) => {}
                other => {
                    return Err(format!(
                        "config file {}: {key} = {other}: write a string or a number",
                        path.display()
                    ))
                }
            }
        }
    }
    Ok(flags)
}

/// The shortest `--presence-ttl`, in node leases: a round of the
/// registrar's refresh of its users' reservation hashes spans a quarter of
/// the TTL (see `backend::redis::registrar`), which then holds at least
/// three lease renewals.
pub const PRESENCE_TTL_LEASES: u32 = 4;

/// Bounds of one connection's send queue (see `hub`) (`--send-queue-bytes`,
/// `--send-queue`).
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    /// Bytes of frame text queued at most.
    pub bytes: usize,
    /// Frames queued at most.
    pub frames: usize,
}

/// Limits on what callers and clients may send and hold.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_users_per_call: usize,
    pub max_user_id_bytes: usize,
    pub max_topic_bytes: usize,
    pub max_client_frame_bytes: usize,
    pub send_queue: QueueLimits,
    pub max_connections_per_user: u32,
    pub max_connections: usize,
    pub grpc_max_connections: usize,
    pub grpc_max_streams: usize,
    pub grpc_max_inflight: usize,
    pub grpc_max_discovery_inflight: usize,
    pub grpc_handshake_timeout: Duration,
    pub grpc_anonymous_idle: Duration,
    pub grpc_keepalive: Duration,
    pub client_frame_rate: usize,
    pub client_frame_burst: usize,
    pub write_timeout: Duration,
}

/// Retention and replay of stored messages.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    pub max_messages: usize,
    pub max_age: Duration,
    pub replay_limit: usize,
    /// Embedded backend only: bytes of stored messages and the inboxes
    /// holding them on this node.
    pub memory_limit: usize,
    /// Embedded backend only: idempotency records held at once.
    pub idempotency_max_records: usize,
}

/// A fully resolved node configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: String,
    pub ws_listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Where token keys come from and what claims must say.
    pub jwt: JwtConfig,
    /// True when the HMAC secret was generated for this run (no key of any
    /// kind configured).
    pub jwt_secret_generated: bool,
    /// gRPC API keys; empty: the control API is open.
    pub api_keys: Vec<KeySpec>,
    /// Health and reflection need a key too.
    pub grpc_auth_discovery: bool,
    /// Allowed WebSocket origins; empty: any.
    pub origins: Origins,
    /// TLS certificate files; None: plain listeners.
    pub tls: Option<crate::tls::TlsFiles>,
    /// mTLS for gRPC: the CA client certificates must chain to.
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// The admin listener stays plain with TLS on.
    pub admin_plain: bool,
    pub redis_url: Option<String>,
    pub limits: Limits,
    pub inbox: InboxConfig,
    pub heartbeat: Duration,
    pub node_lease: Duration,
    /// Lifetime of a user's reservation hash in Redis after its last
    /// write or refresh: `--presence-ttl`, at least [`PRESENCE_TTL_LEASES`]
    /// node leases.
    pub presence_ttl: Duration,
    /// How long idempotency keys are remembered.
    pub idempotency_window: Duration,
    /// None: one per core.
    pub worker_threads: Option<usize>,
    /// The PostgreSQL outbox consumer; None: off.
    pub outbox: Option<OutboxConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config::resolve(ServeArgs {
            jwt_secret: Some("change-me".into()),
            ..Default::default()
        })
        .expect("defaults are valid")
    }
}

/// This machine's host name, for the default node id.
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

impl Config {
    /// Checks parsed settings and fills in what is derived (node id,
    /// generated secret).
    pub fn resolve(args: ServeArgs) -> Result<Config, String> {
        let has_other_key = !args.jwt_public_key.is_empty() || args.jwt_jwks.is_some();
        let (jwt_secret, generated) = match args.jwt_secret {
            Some(s) => (Some(secret(&s)?), false),
            None if has_other_key => (None, false),
            None => {
                let bytes: [u8; 24] = rand::random();
                (
                    Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
                    true,
                )
            }
        };
        let node_id = args.node_id.unwrap_or_else(|| {
            let host = host_name().unwrap_or_else(|| "herald".into());
            format!("{host}-{}", args.ws_listen.port())
        });
        if node_id.is_empty()
            || node_id.len() > 128
            || node_id.contains(|c: char| c.is_whitespace())
        {
            return Err(format!(
                "node id {node_id:?} must be 1 to 128 bytes without spaces"
            ));
        }
        let node_lease = args.node_lease.max(Duration::from_millis(500));
        Ok(Config {
            node_id,
            ws_listen: args.ws_listen,
            grpc_listen: args.grpc_listen,
            admin_listen: args.admin_listen,
            jwt: JwtConfig {
                secret: jwt_secret,
                public_keys: args.jwt_public_key,
                jwks: args.jwt_jwks,
                audience: args.jwt_audience,
                issuer: args.jwt_issuer,
                max_lifetime: args.jwt_max_lifetime,
            },
            jwt_secret_generated: generated,
            api_keys: {
                crate::apikey::ApiKeys::new(&args.api_keys)?;
                args.api_keys
            },
            grpc_auth_discovery: args.grpc_auth_discovery,
            origins: Origins::parse(&args.allowed_origin)?,
            tls: match (args.tls_cert, args.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::TlsFiles { cert, key }),
                (None, None) => None,
                _ => return Err("--tls-cert and --tls-key go together".into()),
            },
            grpc_tls_client_ca: args.grpc_tls_client_ca,
            admin_plain: args.admin_plain,
            redis_url: args.redis_url.filter(|u| !u.is_empty()),
            limits: Limits {
                max_payload_bytes: args.max_payload_bytes,
                max_users_per_call: 1000,
                max_user_id_bytes: crate::protocol::MAX_USER_ID_BYTES,
                max_topic_bytes: 256,
                max_client_frame_bytes: args.max_client_frame_bytes,
                send_queue: QueueLimits {
                    bytes: args.send_queue_bytes.max(1),
                    frames: args.send_queue.max(1),
                },
                max_connections_per_user: args.max_connections_per_user.max(1),
                max_connections: args.max_connections.max(1),
                grpc_max_connections: args.grpc_max_connections,
                grpc_max_streams: args.grpc_max_streams,
                grpc_max_inflight: args.grpc_max_inflight,
                grpc_max_discovery_inflight: args.grpc_max_discovery_inflight,
                grpc_handshake_timeout: args.grpc_handshake_timeout.max(Duration::from_millis(100)),
                grpc_anonymous_idle: args.grpc_anonymous_idle.max(Duration::from_millis(100)),
                grpc_keepalive: args.grpc_keepalive.max(Duration::from_millis(100)),
                client_frame_rate: args.client_frame_rate,
                client_frame_burst: args.client_frame_burst,
                write_timeout: args.write_timeout.max(Duration::from_millis(10)),
            },
            inbox: InboxConfig {
                max_messages: args.inbox_max_messages.max(1),
                max_age: args.inbox_max_age,
                replay_limit: args.replay_limit,
                memory_limit: args.inbox_memory_limit,
                idempotency_max_records: args.idempotency_max_records,
            },
            heartbeat: args.heartbeat.max(Duration::from_millis(50)),
            node_lease,
            presence_ttl: args.presence_ttl.max(node_lease * PRESENCE_TTL_LEASES),
            idempotency_window: args.idempotency_window.max(Duration::from_secs(1)),
            worker_threads: args.worker_threads.filter(|n| *n > 0),
            outbox: args.outbox.resolve(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(argv: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::load_from(["herald", "serve"].iter().chain(argv))?;
        match cli.command {
            Command::Serve(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    fn temp_file(text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("herald-config-{}.toml", rand::random::<u32>()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let path = temp_file(
            "grpc_listen = \"127.0.0.1:6000\"\nnode_id = \"from-file\"\njwt_secret = \"file-secret-123\"\nheartbeat = \"2s\"\ninbox_max_age = \"1h\"\nsend_queue = 9\n",
        );
        let args = serve(&["--config", path.to_str().unwrap(), "--node-id", "from-flag"]);
        std::fs::remove_file(&path).unwrap();
        let cfg = Config::resolve(args.unwrap()).unwrap();
        assert_eq!(cfg.node_id, "from-flag");
        assert_eq!(cfg.grpc_listen.port(), 6000);
        assert_eq!(cfg.ws_listen.port(), 8080);
        assert_eq!(cfg.jwt.secret.as_deref(), Some("file-secret-123"));
        assert!(!cfg.jwt_secret_generated);
        assert_eq!(cfg.heartbeat, Duration::from_secs(2));
        assert_eq!(cfg.inbox.max_age, Duration::from_secs(3600));
        assert_eq!(cfg.limits.send_queue.frames, 9);
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let path = temp_file("no_such_key = 1\n");
        let err = serve(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
        std::fs::write(&path, "send_queue = 0\n").unwrap();
        let err = serve(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("send-queue"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = serve(&["--jwt-secret", "short"]).unwrap_err();
        assert!(err.to_string().contains("at least 8 bytes"), "{err}");
        let err = Cli::load_from(["herald", "token", "u", "--jwt-secret", "short"]).unwrap_err();
        assert!(err.to_string().contains("at least 8 bytes"), "{err}");
        let err = Config::resolve(ServeArgs {
            jwt_secret: Some("short".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.contains("at least 8 bytes"));
        let generated = Config::resolve(ServeArgs::default()).unwrap();
        assert!(
            generated.jwt_secret_generated && generated.jwt.secret.as_ref().unwrap().len() >= 32
        );
    }

    /// A bad `--api-key` is refused naming the setting, never echoing the
    /// value (clap's own parse errors quote it).
    #[test]
    fn a_bad_api_key_is_refused_without_echoing_it() {
        for v in ["ops:reads:SECRET0123456789abcdef", "ops:read:SECRETshort"] {
            let e = serve(&["--api-keys", v]).unwrap_err().to_string();
            assert!(
                e.contains("--api-keys") && e.contains("HERALD_API_KEYS"),
                "{e}"
            );
            assert!(!e.contains("SECRET"), "{e}");
        }
        let a = serve(&["--api-keys", "ops:read:0123456789abcdef"]).unwrap();
        assert_eq!(a.api_keys[0].name, "ops");
    }

    /// README's Production config, with the shell's values filled in, is
    /// a valid config file (CI also runs the whole section as written).
    #[test]
    fn the_readme_production_config_resolves() {
        let readme = include_str!("../README.md");
        let start = readme.find("<!-- production:config -->").unwrap();
        let block = &readme[start..];
        let body_start = block.find("<<EOF\n").unwrap() + 6;
        let body_end = body_start + block[body_start..].find("\nEOF\n").unwrap();
        let text = block[body_start..body_end]
            .replace("$PWD", "/etc/herald")
            .replace("$SEND_KEY", "4f9c2a7e1b0d48c6a3e5f7b9d1c3e5a7")
            .replace("$READ_KEY", "8e1d3c5b7a9f4e2d6c8b0a1f3e5d7c9b");
        assert!(
            !text.contains('$'),
            "a shell value the test does not fill in: {text}"
        );
        let path = temp_file(&text);
        let args = serve(&["--config", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        let cfg = Config::resolve(args.unwrap()).unwrap();
        assert_eq!(cfg.api_keys.len(), 2);
        assert_eq!(cfg.api_keys[1].name, "ops");
        assert_eq!(cfg.jwt.audience, vec!["herald".to_string()]);
        assert!(cfg.jwt.secret.is_none() && !cfg.jwt_secret_generated);
        assert!(cfg.tls.is_some() && cfg.grpc_tls_client_ca.is_some() && cfg.admin_plain);
        assert!(!cfg.origins.is_empty());
        assert_eq!(cfg.jwt.max_lifetime, Some(Duration::from_secs(24 * 3600)));
    }

    #[test]
    fn the_presence_ttl_is_at_least_four_leases() {
        let cfg = Config::resolve(ServeArgs::default()).unwrap();
        assert_eq!(cfg.presence_ttl, Duration::from_secs(3600));
        let path = temp_file("presence_ttl = \"2s\"\nnode_lease = \"1s\"\n");
        let args = serve(&["--config", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        let cfg = Config::resolve(args.unwrap()).unwrap();
        assert_eq!(cfg.presence_ttl, Duration::from_secs(4), "4 leases");
        let args = serve(&["--presence-ttl", "90s", "--node-lease", "1s"]).unwrap();
        assert_eq!(
            Config::resolve(args).unwrap().presence_ttl,
            Duration::from_secs(90)
        );
    }

    #[test]
    fn the_default_node_id_names_the_host_and_port() {
        let cfg = Config::resolve(ServeArgs::default()).unwrap();
        let host = host_name().unwrap_or_else(|| "herald".into());
        assert_eq!(cfg.node_id, format!("{host}-8080"));
    }
}
