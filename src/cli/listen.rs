//! `herald listen`: connects to a node's WebSocket the way the JavaScript
//! client in a browser does (token in `Sec-WebSocket-Protocol`, an
//! `Origin` when asked) and prints every frame the node sends, one JSON
//! object per line. For checking a node from a shell: that a token from the
//! identity provider is accepted, that an Origin is allowed, that a sent
//! message arrives.

use super::reach;
use crate::config::{ClientTls, ListenArgs};
use futures_util::StreamExt;
use rustls_pki_types::ServerName;
use std::process::ExitCode;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub async fn listen(args: ListenArgs) -> ExitCode {
    let run = async {
        match args.timeout {
            Some(t) => tokio::time::timeout(t, frames(&args))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "no more frames within {}",
                        humantime::format_duration(t)
                    ))
                }),
            None => frames(&args).await,
        }
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald listen: {e}");
            ExitCode::from(1)
        }
    }
}

async fn frames(args: &ListenArgs) -> Result<(), String> {
    let mut req = args
        .ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("--ws-url {}: {e}", args.ws_url))?;
    let protocols = format!("herald.v1, herald.token.{}", args.token);
    let h = req.headers_mut();
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&protocols).map_err(|_| "the token is not a JWT")?,
    );
    if let Some(origin) = &args.origin {
        h.insert(
            "origin",
            HeaderValue::from_str(origin).map_err(|_| "--origin is not a header value")?,
        );
    }
    let uri = req.uri().clone();
    let host = uri
        .host()
        .ok_or("--ws-url names no host")?
        .trim_matches(['[', ']'])
        .to_string();
    let tls = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr = format!("{host}:{port}");
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if tls {
        let client_tls = ClientTls {
            tls_ca: args.tls_ca.clone(),
            ..Default::default()
        };
        let cfg = reach::client_config(&client_tls, &[b"http/1.1"])?
            .ok_or("a wss:// URL needs --tls-ca (HERALD_TLS_CA): the CA that signed the node's certificate")?;
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
        let stream = TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {addr}: {}", tls_words(&e)))?;
        let (ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .map_err(refusal)?;
        print_frames(ws, args.messages).await
    } else {
        let (ws, _) = tokio_tungstenite::client_async(req, tcp)
            .await
            .map_err(refusal)?;
        print_frames(ws, args.messages).await
    }
}

/// Prints each text frame; returns after `wanted` message frames (0: when
/// the node closes).
async fn print_frames<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    wanted: u64,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut read = ws;
    let mut messages = 0u64;
    while let Some(frame) = read.next().await {
        match frame.map_err(|e| format!("connection lost: {e}"))? {
            Message::Text(text) => {
                println!("{}", text.as_str());
                let is_message = serde_json::from_str::<serde_json::Value>(text.as_str())
                    .ok()
                    .is_some_and(|v| v["type"] == "message");
                if is_message {
                    messages += 1;
                    if messages == wanted {
                        return Ok(());
                    }
                }
            }
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                eprintln!("herald listen: closed by the node: {code} {reason}");
                return if wanted == 0 {
                    Ok(())
                } else {
                    Err(format!("closed after {messages} of {wanted} messages"))
                };
            }
            _ => {}
        }
    }
    Err("the connection ended".into())
}

/// A refused handshake in words: the node's status and its reason.
fn refusal(e: WsError) -> String {
    match e {
        WsError::Http(resp) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
                .unwrap_or_default();
            format!("the node refused the connection: {} {body}", resp.status())
        }
        other => format!("WebSocket handshake: {other}"),
    }
}

fn tls_words(e: &std::io::Error) -> String {
    let text = format!("{e} {e:?}");
    if text.contains("UnknownIssuer") {
        "the node's certificate is not signed by the CA in --tls-ca (HERALD_TLS_CA)".into()
    } else if text.contains("NotValidForName") {
        "the node's certificate does not carry the name in --ws-url".into()
    } else {
        e.to_string()
    }
}
