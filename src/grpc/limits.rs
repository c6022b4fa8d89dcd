//! Bounds on what gRPC callers can make a node hold, whoever they are (the
//! health and reflection services are open without a key, by design):
//!
//! * connections: a permit per accepted socket, waited for *before*
//!   accepting, so a full node lets new connections wait in the kernel's
//!   backlog instead of taking memory for them;
//! * streams per connection: the HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`
//!   the node announces (set on the tonic server builder);
//! * a handshake deadline: a connection must finish TLS and send the HTTP/2
//!   preface (and its first frame header) within `--grpc-handshake-timeout`
//!   of being accepted, or it is closed; a silent socket holds its slot no
//!   longer than that;
//! * anonymous connections: while fewer than a tenth of the connection
//!   slots are free, a connection that has carried no `PushService` call
//!   accepted past the API-key check and has no call open is closed once it
//!   has been so for `--grpc-anonymous-idle` (checked again every such
//!   period), so sockets nobody authenticated cannot sit on the slots
//!   backends need; with slots to spare, an idle pool connection of a
//!   backend that has not called yet is left alone;
//! * dead peers: HTTP/2 keepalive pings (`--grpc-keepalive`, set on the
//!   tonic server builder) close a connection whose peer vanished;
//! * RPCs in flight node-wide, in two budgets: a permit per call, held until
//!   the response body ends, so long-lived streams such as `Health/Watch`
//!   count for as long as they stay open. `PushService` calls draw on
//!   `--grpc-max-inflight`; the keyless discovery services (health,
//!   reflection) on their own `--grpc-max-discovery-inflight`, so no number
//!   of open `Watch` streams can refuse a keyed call. A call that finds no
//!   permit is answered `RESOURCE_EXHAUSTED` at once and costs nothing
//!   more.

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// An accepted gRPC socket (after its TLS handshake, with TLS) and the
/// connection slot it holds; the slot frees when the connection is dropped
/// (which is what an error from `poll_read` leads to: hyper closes the
/// connection).
pub(crate) struct Permitted {
    io: Io,
    _permit: OwnedSemaphorePermit,
    usage: Arc<ConnUse>,
    /// Bytes of the HTTP/2 preface and first frame header still unread.
    preface_left: usize,
    /// The next check: the handshake deadline while `preface_left > 0`, then
    /// when an anonymous connection is closed. `None` once a keyed call used
    /// the connection.
    watch: Option<Pin<Box<Sleep>>>,
    anonymous_idle: Duration,
    /// The listener's connection slots (for "short of slots").
    slots: Arc<Semaphore>,
    max: usize,
}

/// The client preface (24 bytes) and the header of the SETTINGS frame that
/// must follow it (9 bytes).
const PREFACE_BYTES: usize = 24 + 9;

/// What the node learns of one gRPC connection from the calls on it
/// (shared by the socket and, through [`ConnInfo`], every request).
#[derive(Default)]
pub(crate) struct ConnUse {
    keyed: AtomicBool,
    open: AtomicUsize,
}

/// The connect info tonic puts in every request's extensions.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    /// The peer, as tonic would give it (for logs).
    pub(crate) tcp: TcpConnectInfo,
    usage: Arc<ConnUse>,
}

/// The deadlines of the gRPC listener (see the module doc).
#[derive(Clone, Copy)]
pub(crate) struct Deadlines {
    pub(crate) handshake: Duration,
    pub(crate) anonymous_idle: Duration,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Accepts gRPC connections, at most `max` at once, with TCP_NODELAY on each
/// (small HTTP/2 frames must not wait for delayed ACKs). Accept errors
/// (EMFILE, say) are logged and retried with backoff, never returned, so the
/// server never stops on them. With `tls`, each handshake runs in its own
/// task (bounded by [`crate::tls::HANDSHAKE_TIMEOUT`], holding its slot), so
/// a stalled client never holds up the next accept. The accept task ends,
/// closing the listener, when the server drops the stream.
pub(crate) fn incoming(
    listener: TcpListener,
    max: usize,
    tls: Option<TlsAcceptor>,
    deadlines: Deadlines,
) -> impl futures_util::Stream<Item = io::Result<Permitted>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Permitted>(16);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(max));
        loop {
            let permit = match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    metrics::counter!("herald_grpc_connection_limit_waits_total").increment(1);
                    crate::telemetry::conn_limit("grpc", "--grpc-max-connections");
                    tokio::select! {
                        p = permits.clone().acquire_owned() => p.expect("never closed"),
                        _ = tx.closed() => return,
                    }
                }
            };
            let mut backoff = Duration::from_millis(5);
            let io = loop {
                let accepted = tokio::select! {
                    r = listener.accept() => r,
                    _ = tx.closed() => return,
                };
                match accepted {
                    Ok((io, _)) => break io,
                    Err(e) => {
                        tracing::warn!(error = %e, "gRPC accept failed; backing off {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            };
            let _ = io.set_nodelay(true);
            let deadline = Instant::now() + deadlines.handshake;
            let slots = permits.clone();
            let permitted = move |io: Io, permit: OwnedSemaphorePermit| Permitted {
                io,
                _permit: permit,
                usage: Arc::default(),
                preface_left: PREFACE_BYTES,
                watch: Some(Box::pin(tokio::time::sleep_until(deadline))),
                anonymous_idle: deadlines.anonymous_idle,
                slots,
                max,
            };
            match &tls {
                None => {
                    let conn = permitted(Io::Plain(io), permit);
                    if tx.send(conn).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        let tls_deadline =
                            deadline.min(Instant::now() + crate::tls::HANDSHAKE_TIMEOUT);
                        match tokio::time::timeout_at(tls_deadline, acceptor.accept(io)).await {
                            Ok(Ok(s)) => {
                                let conn = permitted(Io::Tls(Box::new(s)), permit);
                                let _ = tx.send(conn).await;
                            }
                            Ok(Err(e)) => {
                                metrics::counter!("herald_tls_handshake_failures_total")
                                    .increment(1);
                                tracing::debug!(error = %e, "gRPC TLS handshake failed");
                            }
                            Err(_) => {
                                metrics::counter!("herald_tls_handshake_failures_total")
                                    .increment(1);
                                tracing::debug!("gRPC TLS handshake timed out");
                            }
                        }
                    });
                }
            }
        }
    });
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) },
    )
}

impl Connected for Permitted {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        let tcp = match &self.io {
            Io::Plain(s) => s.connect_info(),
            Io::Tls(s) => s.get_ref().0.connect_info(),
        };
        ConnInfo {
            tcp,
            usage: self.usage.clone(),
        }
    }
}

impl Permitted {
    /// While a read waits: whether the connection must close now (see the
    /// module doc). Registers the waker of the next check.
    fn overdue(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        loop {
            let sleep = self.watch.as_mut()?;
            if sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
            if self.preface_left > 0 {
                metrics::counter!("herald_grpc_closed_total", "reason" => "handshake_timeout")
                    .increment(1);
                return Some("no HTTP/2 preface within --grpc-handshake-timeout");
            }
            if self.usage.keyed.load(Ordering::Relaxed) {
                self.watch = None;
                return None;
            }
            let short_of_slots = self.slots.available_permits() * 10 < self.max;
            if short_of_slots && self.usage.open.load(Ordering::Relaxed) == 0 {
                metrics::counter!("herald_grpc_closed_total", "reason" => "anonymous_idle")
                    .increment(1);
                return Some("no keyed call within --grpc-anonymous-idle");
            }
            // Slots to spare, or keyless streams open (bounded by their own
            // budget): look again later.
            sleep.as_mut().reset(Instant::now() + self.anonymous_idle);
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.io {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Io::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Permitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = delegate!(self, s => s.poll_read(cx, buf));
        let me = self.get_mut();
        match read {
            Poll::Ready(Ok(())) if me.preface_left > 0 => {
                let n = buf.filled().len() - before;
                me.preface_left = me.preface_left.saturating_sub(n);
                if me.preface_left == 0 {
                    if let Some(w) = me.watch.as_mut() {
                        w.as_mut().reset(Instant::now() + me.anonymous_idle);
                    }
                }
                read
            }
            Poll::Pending => match me.overdue(cx) {
                Some(why) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why))),
                None => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Permitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// Tower layer capping the RPCs in flight on this node, in two budgets (see
/// the module doc), and telling each connection how it is used. It also
/// logs the calls refused before any service runs (`rpc.refused`: over a
/// budget, or no known API key), as only it sees the method and the peer.
#[derive(Clone)]
pub(crate) struct InflightLimit {
    keyed: Budget,
    discovery: Budget,
    node: Arc<str>,
}

#[derive(Clone)]
struct Budget {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Budget {
    fn new(max: usize) -> Self {
        Budget {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

/// The path prefix of the keyed service's calls.
const PUSH_SERVICE: &str = "/herald.v1.PushService/";

impl InflightLimit {
    pub(crate) fn new(node: &str, max: usize, discovery_max: usize) -> Self {
        InflightLimit {
            keyed: Budget::new(max),
            discovery: Budget::new(discovery_max),
            node: node.into(),
        }
    }
}

impl<S> tower::Layer<S> for InflightLimit {
    type Service = Inflight<S>;
    fn layer(&self, inner: S) -> Inflight<S> {
        Inflight {
            inner,
            limit: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Inflight<S> {
    inner: S,
    limit: InflightLimit,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, B> tower::Service<hyper::Request<ReqBody>> for Inflight<S>
where
    S: tower::Service<hyper::Request<ReqBody>, Response = hyper::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = hyper::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<ReqBody>) -> Self::Future {
        let keyed = req.uri().path().starts_with(PUSH_SERVICE);
        let (budget, reason, setting) = if keyed {
            (&self.limit.keyed, "inflight", "--grpc-max-inflight")
        } else {
            (
                &self.limit.discovery,
                "discovery_inflight",
                "--grpc-max-discovery-inflight",
            )
        };
        let remote = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.tcp.remote_addr());
        let method =
            |req: &hyper::Request<ReqBody>| req.uri().path().trim_start_matches('/').to_string();
        let Ok(permit) = budget.permits.clone().try_acquire_owned() else {
            metrics::counter!("herald_grpc_rejected_total", "reason" => reason).increment(1);
            crate::telemetry::rpc_refused(
                &self.limit.node,
                &method(&req),
                "unknown",
                "ResourceExhausted",
                reason,
                remote,
            );
            let status = tonic::Status::resource_exhausted(format!(
                "this node already serves {} {} calls and streams ({setting}); retry later",
                budget.max,
                if keyed {
                    "PushService"
                } else {
                    "health and reflection"
                },
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let usage = req.extensions().get::<ConnInfo>().map(|c| c.usage.clone());
        let open = usage.clone().map(Open::new);
        // What an `rpc.refused` line needs (the path is shared, not copied).
        let uri = req.uri().clone();
        let sent_key = req.headers().contains_key("authorization");
        let node = self.limit.node.clone();
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = call.await?;
            // A PushService call the key check let through marks its
            // connection as a backend's (an auth failure is answered at
            // once, with the status in the headers).
            let status = resp.headers().get("grpc-status").map(|v| v.as_bytes());
            if let (true, Some(u)) = (keyed, &usage) {
                if !matches!(status, Some(b"16") | Some(b"7")) {
                    u.keyed.store(true, Ordering::Relaxed);
                }
            }
            // The key check refused it (a scope refusal is logged by the
            // service, which knows the key's name).
            if status == Some(b"16") {
                let (key, why) = if sent_key {
                    ("unknown", "unknown_key")
                } else {
                    ("none", "missing_key")
                };
                crate::telemetry::rpc_refused(
                    &node,
                    uri.path().trim_start_matches('/'),
                    key,
                    "Unauthenticated",
                    why,
                    remote,
                );
            }
            Ok(resp.map(|body| {
                tonic::body::Body::new(Held {
                    body,
                    _permit: permit,
                    _open: open,
                })
            }))
        })
    }
}

/// A response body holding its RPC's in-flight permit (and its place in
/// its connection's open calls) until it ends or is dropped.
struct Held<B> {
    body: B,
    _permit: OwnedSemaphorePermit,
    _open: Option<Open>,
}

/// One open call on a connection; counted down on drop.
struct Open(Arc<ConnUse>);

impl Open {
    fn new(u: Arc<ConnUse>) -> Self {
        u.open.fetch_add(1, Ordering::Relaxed);
        Open(u)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<B: Body + Unpin> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    /// Small HTTP/2 frames (a unary call's response headers, data and
    /// trailers) must leave at once, not wait for the peer's delayed ACK.
    #[tokio::test]
    async fn accepted_grpc_sockets_have_tcp_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = super::incoming(
            listener,
            4,
            None,
            super::Deadlines {
                handshake: std::time::Duration::from_secs(10),
                anonymous_idle: std::time::Duration::from_secs(30),
            },
        );
        tokio::pin!(incoming);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let conn = incoming.next().await.unwrap().unwrap();
        let super::Io::Plain(io) = &conn.io else {
            panic!("a plain listener")
        };
        assert!(io.nodelay().unwrap());
    }
}
