//! herald-floor: the floor of what this machine can do, for `herald-bench`.
//!
//! A bare tokio-tungstenite fan-out with nothing else: no authentication, no
//! storage, no presence, no cluster. A map user -> the senders of that user's
//! connections; each payload is copied once into a shared buffer that every
//! recipient's queue references. It speaks the bench protocol:
//!
//! * `GET /ws?user=<id>`: WebSocket. First frame `{"type":"welcome"}`, then
//!   each payload as a text frame of its own.
//! * `POST /send` `{"users":["u1",...],"payload":<JSON>}`: the payload to every
//!   connection of each user.
//! * `POST /broadcast` `{"payload":<JSON>}`: the payload to every connection.
//!
//! Run: `herald-floor --listen 127.0.0.1:8090`. Bench:
//! `herald-bench unicast --target floor --ws ws://127.0.0.1:8090/ws --api http://127.0.0.1:8090`.

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

#[derive(Parser)]
#[command(
    name = "herald-floor",
    about = "Bare WebSocket fan-out: the floor for herald-bench"
)]
struct Args {
    /// Listen address for WebSocket (/ws) and the bench protocol (/send, /broadcast).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
}

type Tx = mpsc::UnboundedSender<Utf8Bytes>;
type Shard = Mutex<HashMap<Box<str>, Vec<(u64, Tx)>>>;

const SHARDS: usize = 64;

struct State {
    hasher: RandomState,
    shards: Vec<Shard>,
    next_id: AtomicU64,
}

impl State {
    fn shard(&self, user: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(user) as usize % SHARDS]
    }

    fn register(&self, user: &str, tx: Tx) -> u64 {
        let id = self.next_id.fetch_add(1, Relaxed);
        self.shard(user)
            .lock()
            .unwrap()
            .entry(user.into())
            .or_default()
            .push((id, tx));
        id
    }

    fn unregister(&self, user: &str, id: u64) {
        let mut s = self.shard(user).lock().unwrap();
        if let Some(list) = s.get_mut(user) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                s.remove(user);
            }
        }
    }

    fn send(&self, users: &[&str], frame: &Utf8Bytes) -> usize {
        let mut n = 0;
        for u in users {
            if let Some(list) = self.shard(u).lock().unwrap().get(*u) {
                for (_, tx) in list {
                    n += tx.send(frame.clone()).is_ok() as usize;
                }
            }
        }
        n
    }

    fn broadcast(&self, frame: &Utf8Bytes) -> usize {
        let mut n = 0;
        for s in &self.shards {
            for list in s.lock().unwrap().values() {
                for (_, tx) in list {
                    n += tx.send(frame.clone()).is_ok() as usize;
                }
            }
        }
        n
    }
}

#[derive(Deserialize)]
struct SendBody<'a> {
    #[serde(borrow, default)]
    users: Vec<&'a str>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => Ok(reply(StatusCode::OK, "ok\n")),
        (Method::POST, "/send") | (Method::POST, "/broadcast") => {
            let body = req.into_body().collect().await?.to_bytes();
            let parsed: SendBody = match serde_json::from_slice(&body) {
                Ok(b) => b,
                Err(e) => {
                    return Ok(reply(
                        StatusCode::BAD_REQUEST,
                        format!("{{\"error\":{:?}}}", e.to_string()),
                    ))
                }
            };
            // Serialized once; every queue shares this buffer.
            let frame = Utf8Bytes::from(parsed.payload.get().to_string());
            let n = if path == "/send" {
                state.send(&parsed.users, &frame)
            } else {
                state.broadcast(&frame)
            };
            Ok(reply(StatusCode::OK, format!("{{\"queued\":{n}}}")))
        }
        _ => Ok(reply(StatusCode::NOT_FOUND, "{\"error\":\"not found\"}")),
    }
}

/// Whether a new connection's first request is `GET /ws...`: those go to
/// tungstenite's handshake, everything else to the HTTP server.
async fn is_websocket(stream: &TcpStream) -> bool {
    const WS: &[u8] = b"GET /ws";
    let mut buf = [0u8; 8];
    for _ in 0..100 {
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let k = n.min(WS.len());
        if buf[..k] != WS[..k] {
            return false;
        }
        if n > WS.len() {
            return matches!(buf[WS.len()], b'?' | b' ');
        }
        // Only part of the request line is in: wait for the rest.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    false
}

/// The user of `GET /ws?user=<id>`.
fn user_of(req: &WsRequest) -> Option<String> {
    let q = req.uri().query()?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.into_owned())
        .filter(|u| !u.is_empty())
}

/// A WebSocket connection: the handshake (the user comes from the URL), then
/// [`connection`].
// The error type of the handshake callback is tungstenite's.
#[allow(clippy::result_large_err)]
async fn websocket(state: Arc<State>, stream: TcpStream) {
    let mut user = None;
    let check = |req: &WsRequest, resp: WsResponse| match user_of(req) {
        Some(u) => {
            user = Some(u);
            Ok(resp)
        }
        None => {
            let mut e = ErrorResponse::new(Some("{\"error\":\"pass ?user=<id>\"}".into()));
            *e.status_mut() = StatusCode::BAD_REQUEST;
            Err(e)
        }
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(16 * 1024);
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await
    else {
        return;
    };
    if let Some(user) = user {
        connection(state, user, ws).await;
    }
}

/// One connection: write what is queued (all of it, then one flush), read
/// and drop what the client sends.
async fn connection(state: Arc<State>, user: String, mut ws: WebSocketStream<TcpStream>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = state.register(&user, tx);
    if ws
        .send(Message::text("{\"type\":\"welcome\"}"))
        .await
        .is_ok()
    {
        loop {
            tokio::select! {
                f = rx.recv() => {
                    let Some(f) = f else { break };
                    if ws.feed(Message::Text(f)).await.is_err() { break; }
                    let mut failed = false;
                    while let Ok(f) = rx.try_recv() {
                        if ws.feed(Message::Text(f)).await.is_err() { failed = true; break; }
                    }
                    if failed || ws.flush().await.is_err() { break; }
                }
                m = ws.next() => match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(Message::Ping(_))) => { if ws.flush().await.is_err() { break; } }
                    Some(Ok(_)) => {}
                }
            }
        }
    }
    state.unregister(&user, id);
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // Every client is a file descriptor: up to the hard limit.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("herald-floor: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().expect("bound");
    let state = Arc::new(State {
        hasher: RandomState::new(),
        shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        next_id: AtomicU64::new(1),
    });
    println!("herald-floor ready: ws=ws://{addr}/ws http=http://{addr}");
    let serve = async {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("herald-floor: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            tokio::spawn(async move {
                if is_websocket(&stream).await {
                    return websocket(state, stream).await;
                }
                let svc = service_fn(move |req| handle(state.clone(), req));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => { s.recv().await; }
                Err(_) => std::future::pending::<()>().await,
            }
        } => {}
    }
}
