//! The public listener: the WebSocket handshake on `/ws` (token check before
//! any upgrade) and the per-connection task.
//!
//! One task per connection does everything for it: it writes queued frames
//! (all that are queued, then one flush), reads client frames, and answers
//! the node's heartbeat ticks. There is no second task, no channel and no
//! timer per connection; the hub's queue, the socket's buffers and a small
//! task state are the connection's whole memory (see BENCHMARKS.md).

use crate::auth::{bearer, TokenVerifier, Verified};
use crate::center::{self, Done, Entry};
use crate::error::Error;
use crate::expiry::Expiries;
use crate::http::{respond, ConnPermit, Peer};
use crate::hub::{Conn, Outbound};
use crate::node::Node;
use crate::origin::Origins;
use crate::protocol::{self, ClientFrame, Disconnect, MessageId};
use crate::telemetry::{self, Closed, ClosedBy, Refused};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::create_response;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod client_js;
mod conn;
mod frames;
mod handshake;
mod routes;
use conn::run;
use frames::*;
use handshake::SUBPROTOCOL;
use handshake::{credentials, Credentials};
use routes::text;

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// What the public listener needs to serve a request.
pub struct Gateway {
    pub node: Arc<Node>,
    pub verifier: TokenVerifier,
    /// Connections by token expiry; the node's ticker closes them at `exp`.
    pub expiries: Arc<Expiries>,
    /// Allowed `Origin`s of handshakes (empty: all).
    pub origins: Origins,
    /// Connection tasks, so shutdown can wait for their close frames.
    pub tasks: TaskTracker,
}

impl Gateway {
    /// Serves one HTTP request on the public listener.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, hyper::Error> {
        Ok(match (req.method(), req.uri().path()) {
            (&hyper::Method::GET, "/ws") => self.upgrade(req),
            _ => routes::serve(&req, &self.origins),
        })
    }

    /// Logs a refused handshake and builds its response.
    fn refuse(
        &self,
        remote: Option<SocketAddr>,
        reason: &'static str,
        status: StatusCode,
        body: String,
    ) -> Response<Full<Bytes>> {
        telemetry::handshake_refused(&Refused {
            node: &self.node.cfg.node_id,
            reason,
            remote,
            status: Some(status.as_u16()),
            code: None,
            user: None,
            origin: None,
            detail: body.trim_end(),
        });
        text(status, body)
    }

    fn upgrade(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        // Only the head matters from here on (the body of a GET is empty).
        let mut req = Request::from_parts(req.into_parts().0, ());
        let remote = req.extensions().get::<Peer>().map(|p| p.0);
        let admitted = match self.admit(&req, remote) {
            Ok(a) => a,
            Err(refusal) => return refusal,
        };
        // tungstenite validates the handshake (GET, HTTP/1.1 or newer,
        // Connection/Upgrade, version 13, the key) and derives the accept key.
        let mut accepted = match create_response(&req) {
            Ok(r) => r,
            Err(WsError::Protocol(
                e @ (ProtocolError::MissingConnectionUpgradeHeader
                | ProtocolError::MissingUpgradeWebSocketHeader),
            )) => {
                return self.refuse(
                    remote,
                    "not_websocket",
                    StatusCode::UPGRADE_REQUIRED,
                    format!("this endpoint speaks WebSocket only: {e}\n"),
                )
            }
            Err(e) => {
                return self.refuse(
                    remote,
                    "bad_request",
                    StatusCode::BAD_REQUEST,
                    format!("{e}\n"),
                )
            }
        };
        if admitted.subprotocol {
            // RFC 6455 4.2.2: the server echoes one protocol the client
            // offered; never the token.
            accepted.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        self.spawn_connection(&mut req, admitted, remote);
        accepted.map(|()| Full::new(Bytes::new()))
    }

    /// The handshake's own checks, in order: the Origin, the request's
    /// credentials, the token, `since`. A refusal is the response to send.
    fn admit(
        &self,
        req: &Request<()>,
        remote: Option<SocketAddr>,
    ) -> Result<Admitted, Response<Full<Bytes>>> {
        let origin = req.headers().get(header::ORIGIN);
        let origin = origin.map(|o| o.to_str().unwrap_or("\u{fffd}"));
        if !self.origins.allows(origin) {
            metrics::counter!("herald_ws_rejected_total", "reason" => "origin").increment(1);
            let detail =
                "this Origin is not allowed to open WebSockets here (see --allowed-origin)";
            telemetry::handshake_refused(&Refused {
                node: &self.node.cfg.node_id,
                reason: "origin",
                remote,
                status: Some(StatusCode::FORBIDDEN.as_u16()),
                code: None,
                user: None,
                origin: origin.map(|o| protocol::truncate_utf8(o, 200)),
                detail,
            });
            return Err(text(StatusCode::FORBIDDEN, format!("{detail}\n")));
        }
        let Credentials {
            token,
            since,
            subprotocol,
        } = match credentials(req) {
            Ok(c) => c,
            Err(why) => {
                metrics::counter!("herald_ws_rejected_total", "reason" => "bad_request")
                    .increment(1);
                return Err(self.refuse(
                    remote,
                    "bad_request",
                    StatusCode::BAD_REQUEST,
                    format!("{why}\n"),
                ));
            }
        };
        let Some(token) = token else {
            metrics::counter!("herald_ws_rejected_total", "reason" => "unauthorized").increment(1);
            return Err(self.refuse(
                remote,
                "token_missing",
                StatusCode::UNAUTHORIZED,
                "missing token: pass Sec-WebSocket-Protocol: herald.v1, herald.token.<JWT>, \
                 Authorization: Bearer <JWT> or ?token=<JWT>\n"
                    .into(),
            ));
        };
        let verified = match self.verifier.check(&token) {
            Ok(v) => v,
            Err(why) => {
                metrics::counter!("herald_ws_rejected_total", "reason" => "unauthorized")
                    .increment(1);
                return Err(self.refuse(
                    remote,
                    why.reason,
                    StatusCode::UNAUTHORIZED,
                    format!("{}\n", why.message),
                ));
            }
        };
        let since: Option<MessageId> = match since.as_deref().map(str::parse) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(e)) => {
                return Err(self.refuse(
                    remote,
                    "bad_request",
                    StatusCode::BAD_REQUEST,
                    format!("since: {e}\n"),
                ))
            }
        };
        Ok(Admitted {
            verified,
            since,
            subprotocol,
        })
    }

    /// Takes the connection over once hyper has switched protocols: the
    /// WebSocket with this node's limits, then the connection task, holding
    /// the listener's connection permit for the connection's whole life.
    fn spawn_connection(
        self: &Arc<Self>,
        req: &mut Request<()>,
        admitted: Admitted,
        remote: Option<SocketAddr>,
    ) {
        let Admitted {
            verified, since, ..
        } = admitted;
        let on_upgrade = hyper::upgrade::on(&mut *req);
        let permit = req.extensions_mut().remove::<ConnPermit>();
        let gw = self.clone();
        self.tasks.spawn(async move {
            let _permit = permit;
            match on_upgrade.await {
                Ok(upgraded) => {
                    let limits = &gw.node.cfg.limits;
                    let config = WebSocketConfig::default()
                        .read_buffer_size(512)
                        .write_buffer_size(16 * 1024)
                        .max_write_buffer_size(8 * 1024 * 1024)
                        .max_message_size(Some(limits.max_client_frame_bytes))
                        .max_frame_size(Some(limits.max_client_frame_bytes));
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    run(gw.node.clone(), &gw.expiries, verified, since, remote, ws).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
}

/// A handshake that passed the gateway's checks.
struct Admitted {
    verified: Verified,
    since: Option<MessageId>,
    /// `herald.v1` was offered: the response echoes it.
    subprotocol: bool,
}
