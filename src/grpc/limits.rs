//! Bounds on what gRPC callers can make a node hold, whoever they are (the
//! health and reflection services are open without a key, by design):
//!
//! * connections: a permit per accepted socket, waited for *before*
//!   accepting, so a full node lets new connections wait in the kernel's
//!   backlog instead of taking memory for them;
//! * streams per connection: the HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`
//!   the node announces (set on the tonic server builder);
//! * RPCs in flight node-wide: a permit per call, held until the response
//!   body ends, so long-lived streams such as `Health/Watch` count for as long
//!   as they stay open. A call that finds no permit is answered
//!   `RESOURCE_EXHAUSTED` at once and costs nothing more.

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// An accepted gRPC socket (after its TLS handshake, with TLS) and the
/// connection slot it holds; the slot frees when the connection is dropped.
pub(crate) struct Permitted {
    io: Io,
    _permit: OwnedSemaphorePermit,
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
) -> impl futures_util::Stream<Item = io::Result<Permitted>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Permitted>(16);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(max));
        loop {
            let permit = match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    metrics::counter!("herald_grpc_connection_limit_waits_total").increment(1);
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
            match &tls {
                None => {
                    let conn = Permitted {
                        io: Io::Plain(io),
                        _permit: permit,
                    };
                    if tx.send(conn).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(
                            crate::tls::HANDSHAKE_TIMEOUT,
                            acceptor.accept(io),
                        )
                        .await
                        {
                            Ok(Ok(s)) => {
                                let conn = Permitted {
                                    io: Io::Tls(Box::new(s)),
                                    _permit: permit,
                                };
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
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        match &self.io {
            Io::Plain(s) => s.connect_info(),
            Io::Tls(s) => s.get_ref().0.connect_info(),
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
        delegate!(self, s => s.poll_read(cx, buf))
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

/// Tower layer capping the RPCs in flight on this node (see the module doc).
#[derive(Clone)]
pub(crate) struct InflightLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl InflightLimit {
    pub(crate) fn new(max: usize) -> Self {
        InflightLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
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

impl<S, Req, B> tower::Service<Req> for Inflight<S>
where
    S: tower::Service<Req, Response = hyper::Response<B>>,
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

    fn call(&mut self, req: Req) -> Self::Future {
        let Ok(permit) = self.limit.permits.clone().try_acquire_owned() else {
            metrics::counter!("herald_grpc_rejected_total", "reason" => "inflight").increment(1);
            let status = tonic::Status::resource_exhausted(format!(
                "this node already serves {} RPCs and streams (--grpc-max-inflight); retry later",
                self.limit.max
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = call.await?;
            Ok(resp.map(|body| {
                tonic::body::Body::new(Held {
                    body,
                    _permit: permit,
                })
            }))
        })
    }
}

/// A response body holding its RPC's in-flight permit until it ends or is
/// dropped.
struct Held<B> {
    body: B,
    _permit: OwnedSemaphorePermit,
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
        let incoming = super::incoming(listener, 4, None);
        tokio::pin!(incoming);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let conn = incoming.next().await.unwrap().unwrap();
        let super::Io::Plain(io) = &conn.io else {
            panic!("a plain listener")
        };
        assert!(io.nodelay().unwrap());
    }
}
