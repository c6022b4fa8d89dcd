//! HTTP/1.1 plumbing shared by the public and admin listeners: the accept
//! loop (with its connection permits and header limits) and responses.

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

/// A connection slot of the public listener; the slot frees when the last
/// clone drops.
#[derive(Clone)]
pub struct ConnPermit(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

/// The TCP peer of a request (for log lines).
#[derive(Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// Resolves once shutdown has been signalled.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// An HTTP response with a body of `content_type`.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// Accepts HTTP/1.1 connections until told to stop. With `permits`, a
/// permit is taken before each accept and held for the connection's life
/// (through a WebSocket upgrade too), so a full node stops accepting instead
/// of failing later. Accept errors (EMFILE, say) back off exponentially.
/// With `tls`, each connection's handshake runs in its own task (bounded by
/// [`crate::tls::HANDSHAKE_TIMEOUT`]) before HTTP is spoken.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    tasks: TaskTracker,
    permits: Option<Arc<Semaphore>>,
    tls: Option<TlsAcceptor>,
    handler: F,
) where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, hyper::Error>> + Send + 'static,
{
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = match &permits {
            Some(p) => match p.clone().try_acquire_owned() {
                Ok(p) => Some(Arc::new(p)),
                Err(_) => {
                    crate::telemetry::conn_limit("ws", "--max-connections");
                    tokio::select! {
                        p = p.clone().acquire_owned() => Some(Arc::new(p.expect("never closed"))),
                        _ = stopped(&mut stop) => return,
                    }
                }
            },
            None => None,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => { backoff = Duration::from_millis(5); s }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            let service = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                // The WebSocket task takes this along, keeping the permit for
                // the socket's whole life.
                if let Some(p) = &permit {
                    req.extensions_mut().insert(ConnPermit(p.clone()));
                }
                req.extensions_mut().insert(Peer(peer));
                handler(req)
            });
            match tls {
                None => serve_http(stream, service, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(
                        crate::tls::HANDSHAKE_TIMEOUT,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(tls)) => serve_http(tls, service, stop).await,
                        Ok(Err(e)) => {
                            metrics::counter!("herald_tls_handshake_failures_total").increment(1);
                            tracing::debug!(error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!("herald_tls_handshake_failures_total").increment(1);
                            tracing::debug!("TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
}

/// Speaks HTTP/1.1 (with upgrades) on one accepted connection, plain or
/// TLS, until it ends or shutdown asks it to finish.
async fn serve_http<I, S>(io: I, service: S, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Full<Bytes>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}
