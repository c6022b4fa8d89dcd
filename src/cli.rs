//! `herald send`: push a message from a shell, through a node's gRPC API.

use crate::config::SendArgs;
use crate::proto::push_service_client::PushServiceClient;
use crate::proto::{BroadcastRequest, SendToUserRequest};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::process::ExitCode;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};

pub async fn send(args: SendArgs) -> ExitCode {
    let mut client = match channel(&args).await {
        Ok(c) => PushServiceClient::new(c),
        Err(e) => {
            eprintln!("herald send: cannot reach {}: {e}", args.grpc);
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
            eprintln!("herald send: {:?}: {}", s.code(), s.message());
            ExitCode::from(1)
        }
    }
}

/// A channel to the node: plaintext, or with `--tls-ca` TLS (ALPN `h2`)
/// that verifies the node's certificate against that CA and the host of
/// `--grpc`.
async fn channel(args: &SendArgs) -> Result<Channel, String> {
    let Some(ca) = &args.tls_ca else {
        return Endpoint::from_shared(args.grpc.clone())
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string());
    };
    let uri: Uri = args.grpc.parse().map_err(|e| format!("{e}"))?;
    let host = uri.host().ok_or("--grpc names no host")?.to_string();
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(50051);
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
    roots.add_parsable_certificates(cas);
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    Endpoint::from_shared(format!(
        "http://{}",
        uri.authority().ok_or("--grpc names no host")?
    ))
    .map_err(|e| e.to_string())?
    .connect_with_connector(tower::service_fn(move |_: Uri| {
        let (connector, name, host) = (connector.clone(), name.clone(), host.clone());
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            connector.connect(name, tcp).await.map(TokioIo::new)
        }
    }))
    .await
    .map_err(|e| format!("{e:?}"))
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
