//! The client subcommands: `herald send` pushes a message through a node's
//! gRPC API, `herald listen` connects to its WebSocket like a browser,
//! `herald token` and `herald jwks` make development credentials, `herald
//! outbox init` prints or applies the outbox's DDL. How they
//! reach a node, and what they say when they cannot, is in `reach`.

mod listen;
mod outbox;
mod reach;
mod token;

pub use listen::listen;
pub use outbox::outbox_init;
pub use token::{jwks, token};

use crate::config::SendArgs;
use crate::proto::push_service_client::PushServiceClient;
use crate::proto::{BroadcastRequest, SendToUserRequest};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::process::ExitCode;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};

pub async fn send(args: SendArgs) -> ExitCode {
    let addr = authority(&args.grpc_addr);
    let mut client = match channel(&args).await {
        Ok(c) => PushServiceClient::new(c),
        Err(Reach::Setup(e)) => {
            eprintln!("herald send: {e}");
            return ExitCode::from(2);
        }
        Err(Reach::Connect(e)) => {
            eprintln!(
                "herald send: {}",
                reach::explain(&addr, &args.tls, &*e).await
            );
            return ExitCode::from(1);
        }
    };
    let key = args.api_key.clone();
    let result = if args.broadcast {
        client
            .broadcast(with_key(
                &key,
                BroadcastRequest {
                    topic: args.topic.clone(),
                    payload_json: args.payload_json.clone(),
                    idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
                },
            ))
            .await
            .map(|r| {
                let r = r.into_inner();
                let replayed = if r.replayed { "\treplayed" } else { "" };
                println!("broadcast {}{replayed}", r.message_id)
            })
    } else {
        client
            .send_to_user(with_key(
                &key,
                SendToUserRequest {
                    user_ids: args.users.clone(),
                    topic: args.topic.clone(),
                    payload_json: args.payload_json.clone(),
                    transient: args.transient,
                    idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
                },
            ))
            .await
            .map(|r| {
                for d in r.into_inner().deliveries {
                    println!(
                        "{}\t{}\t{}",
                        d.user_id,
                        d.message_id,
                        if d.online { "online" } else { "offline" }
                    );
                    if d.replayed {
                        println!("  (replayed: an earlier call with this key sent it)");
                    }
                }
            })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(s) => {
            let transport = matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::Internal
            ) && std::error::Error::source(&s).is_some();
            if transport {
                eprintln!(
                    "herald send: {}",
                    reach::explain(&addr, &args.tls, &s).await
                );
            } else {
                eprintln!("herald send: {:?}: {}", s.code(), s.message());
                if let Some(advice) = reach::status_advice(&s, key.is_some()) {
                    eprintln!("  {advice}");
                }
            }
            ExitCode::from(1)
        }
    }
}

/// Why no channel: the client's own settings (exit 2), or the node.
enum Reach {
    Setup(String),
    Connect(Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// `host:port` of an endpoint URL.
fn authority(url: &str) -> String {
    url.parse::<Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| url.to_string())
}

/// A channel to the node: plaintext, or with `--tls-ca` TLS (ALPN `h2`)
/// that verifies the node's certificate against that CA and the host of
/// `--grpc-addr`, presenting `--tls-client-cert` when given.
async fn channel(args: &SendArgs) -> Result<Channel, Reach> {
    let cfg = reach::client_config(&args.tls, &[b"h2"]).map_err(Reach::Setup)?;
    // With TLS the connector below does it; tonic speaks HTTP/2 over it.
    let url = match cfg {
        Some(_) => format!("http://{}", authority(&args.grpc_addr)),
        None => args.grpc_addr.clone(),
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|e| Reach::Setup(format!("--grpc-addr {}: {e}", args.grpc_addr)))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15));
    let Some(cfg) = cfg else {
        return endpoint
            .connect()
            .await
            .map_err(|e| Reach::Connect(e.into()));
    };
    let uri: Uri = args
        .grpc_addr
        .parse()
        .map_err(|e| Reach::Setup(format!("--grpc-addr: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| Reach::Setup("--grpc-addr names no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(50051);
    let connector = TlsConnector::from(cfg);
    let checked = args
        .tls
        .tls_server_name
        .clone()
        .unwrap_or_else(|| host.clone());
    let name = ServerName::try_from(checked.clone())
        .map_err(|e| Reach::Setup(format!("TLS server name {checked:?}: {e}")))?;
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, name, host) = (connector.clone(), name.clone(), host.clone());
            async move {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                connector.connect(name, tcp).await.map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| Reach::Connect(e.into()))
}

/// A request carrying `authorization: Bearer <key>` when a key is given.
pub fn with_key<T>(key: &Option<String>, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(k) = key {
        if let Ok(v) = MetadataValue::try_from(format!("Bearer {k}")) {
            req.metadata_mut().insert("authorization", v);
        }
    }
    req
}
