//! Flags of the client subcommands: `herald send`, `herald listen`,
//! `herald token` and `herald jwks`. A setting a client shares with the
//! node or with the Go, Java and JavaScript clients has the same name
//! everywhere (README's "Environment variables" table lists them): the
//! node's gRPC address is `HERALD_GRPC_ADDR`, a caller's key
//! `HERALD_API_KEY` (the key part of the node's `name:scope:key`), the CA
//! that signed the node's certificate `HERALD_TLS_CA`.

use super::*;

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
    /// The node's gRPC address: host:port (as the ready line prints it) or a URL.
    #[arg(long = "grpc-addr", env = "HERALD_GRPC_ADDR", default_value = "127.0.0.1:50051", value_parser = grpc_endpoint)]
    pub grpc_addr: String,
    /// Makes a retry safe: the same key again within the window stores and pushes nothing (see the proto).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// API key, if the node requires one: the key part of the node's name:scope:key (scope send).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub tls: ClientTls,
}

/// How a client reaches a TLS node: the CA to trust and, for a node with
/// `--grpc-tls-client-ca`, the client certificate to present.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM CA file: connect over TLS, trusting the node's certificate if it chains to this CA (for a node with --tls-cert).
    #[arg(long, env = "HERALD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a node that requires one (--grpc-tls-client-ca). Needs --tls-ca.
    #[arg(
        long,
        env = "HERALD_TLS_CLIENT_CERT",
        requires = "tls_client_key",
        requires = "tls_ca"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, env = "HERALD_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// The name to check the node's certificate against, when the address's host is not one it carries (an IP, a tunnel). Default: the host of --grpc-addr.
    #[arg(long, env = "HERALD_TLS_SERVER_NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

#[derive(Args, Debug)]
pub struct ListenArgs {
    /// The node's WebSocket URL (ws:// or wss://, path /ws).
    #[arg(long, env = "HERALD_WS_URL", default_value = "ws://127.0.0.1:8080/ws")]
    pub ws_url: String,
    /// The user's token (from `herald token` or your login service); sent in Sec-WebSocket-Protocol, as the JavaScript client does.
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Send this Origin header, as a browser on that site would (checked against the node's --allowed-origin).
    #[arg(long)]
    pub origin: Option<String>,
    /// Exit after this many message frames (0: run until the connection closes).
    #[arg(long, default_value_t = 0)]
    pub messages: u64,
    /// Give up (exit 1) after this long.
    #[arg(long, value_parser = duration)]
    pub timeout: Option<Duration>,
    /// PEM CA file trusted for a wss:// node (the CA that signed its certificate).
    #[arg(long, env = "HERALD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The user id (the token's `sub`): 1 to 256 bytes, no control characters.
    #[arg(value_parser = user_id)]
    pub user: String,
    /// The HMAC secret (HS256); must match the nodes' --jwt-secret (at least 8 bytes).
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true, value_parser = secret,
          required_unless_present = "jwt_private_key", conflicts_with = "jwt_private_key")]
    pub jwt_secret: Option<String>,
    #[command(flatten)]
    pub key: PrivateKeyArgs,
    /// The token's audience (`aud`), as the nodes' --jwt-audience expects.
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The token's issuer (`iss`), as the nodes' --jwt-issuer expects.
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// How long the token is valid.
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub ttl: Duration,
}

/// A signing key of development tokens and the JWKS that publishes it.
#[derive(Args, Debug, Clone)]
pub struct PrivateKeyArgs {
    /// PEM private key (PKCS#8: EC P-256/P-384, Ed25519, or RSA) that signs tokens; its public half goes in the node's --jwt-jwks (see `herald jwks`).
    #[arg(long, env = "HERALD_JWT_PRIVATE_KEY")]
    pub jwt_private_key: Option<PathBuf>,
    /// The key id (`kid`) in the token's header and the JWKS. Default: the key's RFC 7638 thumbprint.
    #[arg(long, env = "HERALD_JWT_KID")]
    pub jwt_kid: Option<String>,
}

#[derive(Args, Debug)]
pub struct JwksArgs {
    #[command(flatten)]
    pub key: PrivateKeyArgs,
}
