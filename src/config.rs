//! Command line, environment and config file, resolved into one [`Config`].
//!
//! Precedence: flag, then `HERALD_<NAME>` environment variable (clap reads
//! both), then the TOML file given by `--config`, then the default.

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Mint a WebSocket token (HS256 JWT) for a user with the configured secret.
    Token(TokenArgs),
    /// Send a message to users through a node's gRPC API (a small client).
    Send(SendArgs),
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Recipients (repeat or comma-separate).
    #[arg(
        long = "user",
        short = 'u',
        required_unless_present = "broadcast",
        value_delimiter = ','
    )]
    pub users: Vec<String>,
    /// The payload: any JSON value.
    pub payload_json: String,
    /// The message topic.
    #[arg(long, default_value = "")]
    pub topic: String,
    /// Live-only: do not store.
    #[arg(long)]
    pub transient: bool,
    /// Send to every connection instead (no --user needed).
    #[arg(long, conflicts_with = "transient")]
    pub broadcast: bool,
    /// The node's gRPC address.
    #[arg(long, env = "HERALD_GRPC", default_value = "http://127.0.0.1:50051")]
    pub grpc: String,
    /// API key, if the node requires one.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 500ms, 30s, 7d)"))
}

/// Flags of `herald serve`, and the keys of its TOML config file (the same
/// names in snake_case). Every one is optional here so that the file can
/// fill what the command line leaves out.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML config file; its keys are these flags' names in snake_case.
    #[arg(long, env = "HERALD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Public WebSocket listener (browsers connect to /ws here). [default: 127.0.0.1:8080]
    #[arg(long, env = "HERALD_WS_LISTEN")]
    pub ws_listen: Option<SocketAddr>,
    /// Internal gRPC listener for the control API. [default: 127.0.0.1:50051]
    #[arg(long, env = "HERALD_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Admin HTTP listener: /metrics (Prometheus) and /healthz. [default: 127.0.0.1:9091]
    #[arg(long, env = "HERALD_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// HS256 secret that signs WebSocket tokens. None: one is generated for this run and a demo token printed.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// If set, gRPC callers must send `authorization: Bearer <key>`.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// This node's id in the cluster. [default: host name and port]
    #[arg(long, env = "HERALD_NODE_ID")]
    pub node_id: Option<String>,
    /// Redis URL (redis://host:port/db). Without it the node runs alone on the embedded in-memory backend.
    #[arg(long, env = "HERALD_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Largest payload_json accepted, in bytes. [default: 65536]
    #[arg(long, env = "HERALD_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Largest frame a client may send, in bytes; bigger ones close with 1009. [default: 65536]
    #[arg(long, env = "HERALD_MAX_CLIENT_FRAME_BYTES")]
    pub max_client_frame_bytes: Option<usize>,
    /// Frames queued per connection before the client counts as slow and is closed with 1013. [default: 256]
    #[arg(long, env = "HERALD_SEND_QUEUE")]
    pub send_queue: Option<usize>,
    /// Live connections one user may hold across the cluster; one more closes with 4029. [default: 32]
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<u32>,
    /// Live connections this node accepts before it stops accepting. [default: 500000]
    #[arg(long, env = "HERALD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Stored messages kept per user; older ones are dropped. [default: 1000]
    #[arg(long, env = "HERALD_INBOX_MAX_MESSAGES")]
    pub inbox_max_messages: Option<usize>,
    /// Age after which stored messages are dropped. [default: 7d]
    #[arg(long, env = "HERALD_INBOX_MAX_AGE", value_parser = duration)]
    #[serde(default, deserialize_with = "file_duration")]
    pub inbox_max_age: Option<Duration>,
    /// Unread messages replayed on a connect without `since` (the newest ones). [default: 100]
    #[arg(long, env = "HERALD_REPLAY_LIMIT")]
    pub replay_limit: Option<usize>,
    /// WebSocket ping interval; a connection silent for two intervals is closed. [default: 25s]
    #[arg(long, env = "HERALD_HEARTBEAT", value_parser = duration)]
    #[serde(default, deserialize_with = "file_duration")]
    pub heartbeat: Option<Duration>,
    /// Node lease in Redis; a node that stops renewing it counts as dead after this long. [default: 15s]
    #[arg(long, env = "HERALD_NODE_LEASE", value_parser = duration)]
    #[serde(default, deserialize_with = "file_duration")]
    pub node_lease: Option<Duration>,
    /// Runtime worker threads. [default: one per core; give each of N nodes sharing a machine cores/N]
    #[arg(long, env = "HERALD_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

/// A duration in the config file, written like on the command line ("30s").
fn file_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    duration(&text).map(Some).map_err(serde::de::Error::custom)
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The user id (the token's `sub`).
    pub user: String,
    /// The secret; must match the nodes' --jwt-secret.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// How long the token is valid.
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub ttl: Duration,
}

/// Limits on what callers and clients may send and hold.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_users_per_call: usize,
    pub max_user_id_bytes: usize,
    pub max_topic_bytes: usize,
    pub max_client_frame_bytes: usize,
    pub send_queue: usize,
    pub max_connections_per_user: u32,
    pub max_connections: usize,
}

/// Retention and replay of stored messages.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    pub max_messages: usize,
    pub max_age: Duration,
    pub replay_limit: usize,
}

/// A fully resolved node configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: String,
    pub ws_listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub jwt_secret: String,
    /// True when the secret was generated for this run (no secret configured).
    pub jwt_secret_generated: bool,
    pub api_key: Option<String>,
    pub redis_url: Option<String>,
    pub limits: Limits,
    pub inbox: InboxConfig,
    pub heartbeat: Duration,
    pub node_lease: Duration,
    /// None: one per core.
    pub worker_threads: Option<usize>,
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

impl Config {
    pub fn resolve(args: ServeArgs) -> Result<Config, String> {
        let file: ServeArgs = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?
            }
            None => ServeArgs::default(),
        };
        let ws_listen = args
            .ws_listen
            .or(file.ws_listen)
            .unwrap_or(([127, 0, 0, 1], 8080).into());
        let (jwt_secret, generated) = match args.jwt_secret.or(file.jwt_secret) {
            Some(s) if s.len() < 8 => return Err("the JWT secret must be at least 8 bytes".into()),
            Some(s) => (s, false),
            None => {
                let bytes: [u8; 24] = rand::random();
                (bytes.iter().map(|b| format!("{b:02x}")).collect(), true)
            }
        };
        let node_id = args.node_id.or(file.node_id).unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "herald".into());
            format!("{host}-{}", ws_listen.port())
        });
        if node_id.is_empty()
            || node_id.len() > 128
            || node_id.contains(|c: char| c.is_whitespace())
        {
            return Err(format!(
                "node id {node_id:?} must be 1 to 128 bytes without spaces"
            ));
        }
        let cfg = Config {
            node_id,
            ws_listen,
            grpc_listen: args
                .grpc_listen
                .or(file.grpc_listen)
                .unwrap_or(([127, 0, 0, 1], 50051).into()),
            admin_listen: args
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or(([127, 0, 0, 1], 9091).into()),
            jwt_secret,
            jwt_secret_generated: generated,
            api_key: args.api_key.or(file.api_key).filter(|k| !k.is_empty()),
            redis_url: args.redis_url.or(file.redis_url).filter(|u| !u.is_empty()),
            limits: Limits {
                max_payload_bytes: args
                    .max_payload_bytes
                    .or(file.max_payload_bytes)
                    .unwrap_or(64 * 1024),
                max_users_per_call: 1000,
                max_user_id_bytes: 256,
                max_topic_bytes: 256,
                max_client_frame_bytes: args
                    .max_client_frame_bytes
                    .or(file.max_client_frame_bytes)
                    .unwrap_or(64 * 1024),
                send_queue: args.send_queue.or(file.send_queue).unwrap_or(256).max(1),
                max_connections_per_user: args
                    .max_connections_per_user
                    .or(file.max_connections_per_user)
                    .unwrap_or(32)
                    .max(1),
                max_connections: args
                    .max_connections
                    .or(file.max_connections)
                    .unwrap_or(500_000)
                    .max(1),
            },
            inbox: InboxConfig {
                max_messages: args
                    .inbox_max_messages
                    .or(file.inbox_max_messages)
                    .unwrap_or(1000)
                    .max(1),
                max_age: args
                    .inbox_max_age
                    .or(file.inbox_max_age)
                    .unwrap_or(Duration::from_secs(7 * 24 * 3600)),
                replay_limit: args.replay_limit.or(file.replay_limit).unwrap_or(100),
            },
            heartbeat: args
                .heartbeat
                .or(file.heartbeat)
                .unwrap_or(Duration::from_secs(25))
                .max(Duration::from_millis(50)),
            node_lease: args
                .node_lease
                .or(file.node_lease)
                .unwrap_or(Duration::from_secs(15))
                .max(Duration::from_millis(500)),
            worker_threads: args
                .worker_threads
                .or(file.worker_threads)
                .filter(|n| *n > 0),
        };
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let path =
            std::env::temp_dir().join(format!("herald-config-{}.toml", rand::random::<u32>()));
        std::fs::write(
            &path,
            "grpc_listen = \"127.0.0.1:6000\"\nnode_id = \"from-file\"\njwt_secret = \"file-secret-123\"\nheartbeat = \"2s\"\ninbox_max_age = \"1h\"\n",
        )
        .unwrap();
        let cfg = Config::resolve(ServeArgs {
            config: Some(path.clone()),
            node_id: Some("from-flag".into()),
            ..Default::default()
        })
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(cfg.node_id, "from-flag");
        assert_eq!(cfg.grpc_listen.port(), 6000);
        assert_eq!(cfg.ws_listen.port(), 8080);
        assert_eq!(cfg.jwt_secret, "file-secret-123");
        assert!(!cfg.jwt_secret_generated);
        assert_eq!(cfg.heartbeat, Duration::from_secs(2));
        assert_eq!(cfg.inbox.max_age, Duration::from_secs(3600));
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let path =
            std::env::temp_dir().join(format!("herald-config-{}.toml", rand::random::<u32>()));
        std::fs::write(&path, "no_such_key = 1\n").unwrap();
        let err = Config::resolve(ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("no_such_key"), "{err}");
        let err = Config::resolve(ServeArgs {
            jwt_secret: Some("short".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.contains("at least 8 bytes"));
        let generated = Config::resolve(ServeArgs::default()).unwrap();
        assert!(generated.jwt_secret_generated && generated.jwt_secret.len() >= 32);
    }
}
