//! Listeners and the node's lifecycle: bind, serve, drain.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind
//! port 0 and stop the node themselves. Shutdown order: stop accepting,
//! close every WebSocket with 1001, let in-flight RPCs finish, then return
//! once every connection task is done (or a deadline passes).

use crate::apikey::ApiKeys;
use crate::auth::TokenVerifier;
use crate::config::Config;
use crate::expiry::Expiries;
use crate::grpc::limits::{incoming as grpc_incoming, InflightLimit};
use crate::http::{accept_loop, respond, stopped};
use crate::node::Node;
use crate::proto::push_service_server::PushServiceServer;
use crate::protocol::Disconnect;
use crate::ws::Gateway;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

/// How long shutdown waits for connections to take their close frames.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// How long shutdown waits for the outbox consumer to end its current
/// send (its statements' own timeout is longer; it is aborted then).
const OUTBOX_STOP_DEADLINE: Duration = Duration::from_secs(2);

/// Connections the kernel completes and queues for a listener before the
/// node accepts them; Linux caps it at `net.core.somaxconn` (4096 by
/// default since 5.4). `TcpListener::bind`'s 128 (the standard library's)
/// overflowed when the 16,667 clients of a restarted node reconnected at
/// once (bench/c100k.sh): every SYN beyond the queue is dropped and its
/// client waits for TCP's retransmit, 1 s and then 3 s, 7 s, ... later.
const BACKLOG: u32 = 8192;

/// A listener on `a` with [`BACKLOG`] (and SO_REUSEADDR on Unix, as
/// `TcpListener::bind` sets: a restarted node rebinds its port at once).
fn listen(a: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match a {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(a)?;
    socket.listen(BACKLOG)
}

/// The three listeners of a node.
pub struct Listeners {
    pub ws: TcpListener,
    pub grpc: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(cfg: &Config) -> std::io::Result<Listeners> {
        let bind = |a: SocketAddr, what: &'static str| async move {
            listen(a).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {a} ({what}): {e}"))
            })
        };
        Ok(Listeners {
            ws: bind(cfg.ws_listen, "--ws-listen").await?,
            grpc: bind(cfg.grpc_listen, "--grpc-listen").await?,
            admin: bind(cfg.admin_listen, "--admin-listen").await?,
        })
    }

    /// The actual addresses (the ports, when bound to port 0).
    pub fn addrs(&self) -> (SocketAddr, SocketAddr, SocketAddr) {
        (
            self.ws.local_addr().expect("bound"),
            self.grpc.local_addr().expect("bound"),
            self.admin.local_addr().expect("bound"),
        )
    }
}

/// Raises the soft limit on open files to the hard limit: every connection
/// is a file descriptor, and distributions default the soft limit to 1024.
/// Returns the limit now in force (None if it cannot be read).
fn raise_fd_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}

/// The process-wide Prometheus recorder (the `metrics` facade is global).
fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ])
                .expect("static buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed (tests embedding
            // several nodes): the handle then renders an empty registry.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Builds the node for `cfg`: Redis-backed when a Redis URL is configured,
/// embedded otherwise.
async fn build_node(cfg: Config) -> Result<Arc<Node>, crate::error::Error> {
    match cfg.redis_url.clone() {
        None => Ok(Node::in_memory(cfg)),
        Some(url) => Node::on_redis(cfg, &url).await,
    }
}

/// Runs a node until `shutdown` resolves, then drains it.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let metrics = metrics_handle();
    let max_connections = connection_cap(&cfg);
    // Key files are read before anything serves: a bad one stops the start.
    let verifier = TokenVerifier::from_config(&cfg.jwt, cfg.limits.max_user_id_bytes)?;
    let api_keys = ApiKeys::new(&cfg.api_keys)?;
    warn_about_exposure(&cfg, &listeners, &api_keys);
    let tls = Tls::load(&cfg)?;
    let node = build_node(cfg.clone()).await?;
    let (ws_addr, grpc_addr, admin_addr) = listeners.addrs();
    tracing::info!(node = %cfg.node_id, %ws_addr, %grpc_addr, %admin_addr,
        backend = if cfg.redis_url.is_some() { "redis" } else { "memory" },
        redis = cfg.redis_url.as_deref().map(crate::telemetry::redact_url),
        "herald node serving");

    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks = TaskTracker::new();
    let outbox_status = Arc::new(crate::outbox::Status::default());
    let outbox = cfg.outbox.clone().map(|o| {
        tracing::info!(postgres = %crate::telemetry::redact_url(&o.url), table = %o.table,
            "outbox consumer on");
        crate::outbox::Consumer::start(o, node.clone(), outbox_status.clone(), stop_rx.clone())
    });
    let grpc = serve_grpc(
        &cfg,
        &node,
        &outbox_status,
        &api_keys,
        listeners.grpc,
        tls.grpc.clone(),
        stop_rx.clone(),
    )
    .await?;
    let expiries = Arc::new(Expiries::default());
    let tickers = tickers(&cfg, &node, &expiries, &verifier, &tls);
    let gateway = Arc::new(Gateway {
        node: node.clone(),
        verifier,
        expiries,
        origins: cfg.origins.clone(),
        tasks: tasks.clone(),
    });
    let public = tokio::spawn(accept_loop(
        listeners.ws,
        stop_rx.clone(),
        tasks.clone(),
        Some(Arc::new(Semaphore::new(max_connections))),
        tls.ws.clone(),
        move |req| gateway.clone().handle(req),
    ));
    let admin = serve_admin(
        &node,
        metrics,
        listeners.admin,
        tls.admin.clone(),
        stop_rx,
        &tasks,
    );
    println!("{}", tls.ready_line(ws_addr, grpc_addr, admin_addr));
    shutdown.await;
    Running {
        node,
        stop: stop_tx,
        tasks,
        public,
        admin,
        grpc,
        tickers,
        outbox,
    }
    .drain()
    .await;
    Ok(())
}

/// Connections a node holds at most: `--max-connections`, or fewer when the
/// open-files limit (less a reserve for Redis, gRPC and logs) is lower, so
/// a full node stops accepting instead of failing accepts with EMFILE.
fn connection_cap(cfg: &Config) -> usize {
    let fds = raise_fd_limit().unwrap_or(1024) as usize;
    let max_connections = cfg
        .limits
        .max_connections
        .min(fds.saturating_sub(256).max(16));
    if max_connections < cfg.limits.max_connections {
        tracing::warn!(
            open_files_limit = fds,
            max_connections,
            configured = cfg.limits.max_connections,
            "the open-files limit is too low for --max-connections: connections capped; \
             raise `ulimit -n` (or lower --max-connections)"
        );
    } else {
        tracing::debug!(
            open_files_limit = fds,
            max_connections,
            "the open-files limit allows --max-connections"
        );
    }
    max_connections
}

/// The TLS of each listener: one reloading certificate, an acceptor per
/// listener (ALPN `h2` and the client CA for gRPC), none when plain.
struct Tls {
    cert: Option<Arc<crate::tls::ReloadingCert>>,
    ws: Option<tokio_rustls::TlsAcceptor>,
    grpc: Option<tokio_rustls::TlsAcceptor>,
    admin: Option<tokio_rustls::TlsAcceptor>,
    grpc_client_certs: bool,
}

impl Tls {
    fn load(cfg: &Config) -> Result<Tls, Box<dyn std::error::Error + Send + Sync>> {
        let cert = cfg
            .tls
            .clone()
            .map(crate::tls::ReloadingCert::open)
            .transpose()?;
        let acceptor = |alpn: &[&[u8]], ca: Option<&std::path::Path>| {
            cert.clone()
                .map(|c| crate::tls::acceptor(c, alpn, ca))
                .transpose()
        };
        Ok(Tls {
            ws: acceptor(&[b"http/1.1"], None)?,
            grpc: acceptor(&[b"h2"], cfg.grpc_tls_client_ca.as_deref())?,
            admin: match cfg.admin_plain {
                true => None,
                false => acceptor(&[b"http/1.1"], None)?,
            },
            grpc_client_certs: cfg.grpc_tls_client_ca.is_some(),
            cert,
        })
    }

    /// The line scripts wait for, printed on stdout once the node really
    /// serves (the backend is up): each listener's address, and what a
    /// gRPC client must bring.
    fn ready_line(&self, ws: SocketAddr, grpc: SocketAddr, admin: SocketAddr) -> String {
        let ws_scheme = if self.ws.is_some() { "wss" } else { "ws" };
        let admin_scheme = if self.admin.is_some() {
            "https"
        } else {
            "http"
        };
        let grpc_note = match (self.grpc.is_some(), self.grpc_client_certs) {
            (true, true) => " (TLS, client certificate required)",
            (true, false) => " (TLS)",
            _ => "",
        };
        format!(
            "herald ready: ws={ws_scheme}://{ws}/ws grpc={grpc}{grpc_note} admin={admin_scheme}://{admin}"
        )
    }
}

type GrpcServer = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// The gRPC listener: health, reflection (v1 and v1alpha) and the
/// PushService, behind the API keys, the in-flight limits and the
/// connection limits; until `stop`.
async fn serve_grpc(
    cfg: &Config,
    node: &Arc<Node>,
    outbox: &Arc<crate::outbox::Status>,
    api_keys: &ApiKeys,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) -> Result<GrpcServer, Box<dyn std::error::Error + Send + Sync>> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<PushServiceServer<crate::grpc::PushApi>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let push = tonic::service::interceptor::InterceptedService::new(
        PushServiceServer::new(crate::grpc::PushApi::new(node.clone(), outbox.clone()))
            .max_decoding_message_size(cfg.limits.max_payload_bytes + 1024 * 1024),
        api_keys.clone(),
    );
    // Health and reflection: open unless --grpc-auth-discovery.
    let discovery_keys = if cfg.grpc_auth_discovery {
        api_keys.clone()
    } else {
        ApiKeys::new(&[]).expect("no keys is valid")
    };
    fn guarded<S>(
        svc: S,
        keys: &ApiKeys,
    ) -> tonic::service::interceptor::InterceptedService<S, ApiKeys> {
        tonic::service::interceptor::InterceptedService::new(svc, keys.clone())
    }
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(cfg.limits.grpc_max_streams.min(u32::MAX as usize) as u32)
        .http2_keepalive_interval(Some(cfg.limits.grpc_keepalive))
        .http2_keepalive_timeout(Some(cfg.limits.grpc_handshake_timeout))
        .layer(InflightLimit::new(
            &cfg.node_id,
            cfg.limits.grpc_max_inflight,
            cfg.limits.grpc_max_discovery_inflight,
        ))
        .add_service(guarded(health_svc, &discovery_keys))
        .add_service(guarded(reflection().build_v1()?, &discovery_keys))
        .add_service(guarded(reflection().build_v1alpha()?, &discovery_keys))
        .add_service(push)
        .serve_with_incoming_shutdown(
            grpc_incoming(
                listener,
                cfg.limits.grpc_max_connections,
                tls,
                crate::grpc::limits::Deadlines {
                    handshake: cfg.limits.grpc_handshake_timeout,
                    anonymous_idle: cfg.limits.grpc_anonymous_idle,
                },
            ),
            async move {
                stopped(&mut stop).await;
            },
        );
    Ok(tokio::spawn(server))
}

/// The admin listener: `/metrics` and `/healthz`, until `stop`.
fn serve_admin(
    node: &Arc<Node>,
    metrics: PrometheusHandle,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
    tasks: &TaskTracker,
) -> tokio::task::JoinHandle<()> {
    let node = node.clone();
    tokio::spawn(accept_loop(
        listener,
        stop,
        tasks.clone(),
        None,
        tls,
        move |req| {
            let node = node.clone();
            let metrics = metrics.clone();
            async move { Ok(admin(&node, &metrics, req)) }
        },
    ))
}

/// How many groups the heartbeat spreads the node's connections over: one
/// per 20 ms of the interval, at most one per hub shard (64 for the
/// default 25 s: a group every 390 ms).
fn heartbeat_parts(every: Duration) -> usize {
    ((every.as_millis() / 20) as usize).clamp(1, crate::hub::SHARDS)
}

/// The node's timers, one each for all connections: the heartbeat, the
/// token-expiry sweep (closes with 4401 at `exp`, checked four times a
/// second; `exp` is in whole seconds), the reload of the certificate and
/// the JWKS, and the report of suppressed log lines. Aborted on drain.
fn tickers(
    cfg: &Config,
    node: &Arc<Node>,
    expiries: &Arc<Expiries>,
    verifier: &TokenVerifier,
    tls: &Tls,
) -> Vec<tokio::task::JoinHandle<()>> {
    let heartbeat = {
        let hub = node.hub.clone();
        let parts = heartbeat_parts(cfg.heartbeat);
        let step = cfg.heartbeat / parts as u32;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + step, step);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for part in (0..parts).cycle() {
                tick.tick().await;
                hub.heartbeat_part(part, parts);
            }
        })
    };
    let expiry = {
        let expiries = expiries.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                expiries.expire(crate::protocol::now_ms() / 1000);
            }
        })
    };
    // SIGHUP is hooked here, before the ready line, so a signal sent right
    // after it reloads instead of killing the process.
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let hup = None;
    let reloader = tokio::spawn(reload_files(verifier.clone(), tls.cert.clone(), hup));
    let suppressed = tokio::spawn(crate::telemetry::report_suppressed());
    vec![heartbeat, expiry, reloader, suppressed]
}

/// A serving node's running parts, for the drain at shutdown.
struct Running {
    node: Arc<Node>,
    stop: watch::Sender<bool>,
    /// Every connection task of the public and admin listeners.
    tasks: TaskTracker,
    public: tokio::task::JoinHandle<()>,
    admin: tokio::task::JoinHandle<()>,
    grpc: GrpcServer,
    tickers: Vec<tokio::task::JoinHandle<()>>,
    /// The outbox consumer; it sees `stop` and ends between sends.
    outbox: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, closes every connection with 1001, lets in-flight
    /// RPCs finish (gRPC's own graceful shutdown), waits for connection
    /// tasks up to [`DRAIN_DEADLINE`], then shuts the backend down.
    async fn drain(self) {
        tracing::info!("shutting down: closing connections with 1001, finishing in-flight RPCs");
        let _ = self.stop.send(true);
        let _ = self.public.await;
        let _ = self.admin.await;
        self.node.hub.close_all(Disconnect::Shutdown);
        for t in &self.tickers {
            t.abort();
        }
        self.tasks.close();
        if tokio::time::timeout(DRAIN_DEADLINE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close within {DRAIN_DEADLINE:?}");
        }
        match self.grpc.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "gRPC server task failed"),
        }
        // Before the backend goes: a send it abandons is sent again, under
        // the same key, by the next consumer.
        if let Some(mut outbox) = self.outbox {
            if tokio::time::timeout(OUTBOX_STOP_DEADLINE, &mut outbox)
                .await
                .is_err()
            {
                outbox.abort();
            }
        }
        self.node.shutdown().await;
        crate::telemetry::flush_suppressed(true);
        tracing::info!("stopped");
    }
}

/// Re-reads the JWKS file and the TLS certificate when they change (polled
/// every second) and on SIGHUP (the certificate unconditionally). A file
/// that does not load keeps what was in force and logs why.
async fn reload_files(
    verifier: TokenVerifier,
    cert: Option<Arc<crate::tls::ReloadingCert>>,
    #[cfg(unix)] mut hup: Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))] _hup: Option<()>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let forced = match &mut hup {
            Some(h) => tokio::select! {
                _ = tick.tick() => false,
                _ = h.recv() => true,
            },
            None => {
                tick.tick().await;
                false
            }
        };
        #[cfg(not(unix))]
        let forced = {
            tick.tick().await;
            false
        };
        if forced {
            tracing::info!("SIGHUP: reloading the TLS certificate and the JWKS file");
        }
        match verifier.reload_jwks(forced) {
            Ok(true) => {
                metrics::counter!("herald_jwks_reloads_total", "result" => "loaded").increment(1);
                tracing::info!("JWKS file changed: keys reloaded")
            }
            Ok(false) => {}
            Err(e) => {
                metrics::counter!("herald_jwks_reloads_total", "result" => "rejected").increment(1);
                tracing::warn!("JWKS file changed but cannot be used; the last good keys kept: {e}")
            }
        }
        if let Some(c) = &cert {
            match c.reload(forced) {
                Ok(true) => tracing::info!("TLS certificate reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!("TLS certificate changed but cannot be used (old one kept): {e}")
                }
            }
        }
    }
}

/// Says at start what is exposed without protection.
fn warn_about_exposure(cfg: &Config, listeners: &Listeners, keys: &ApiKeys) {
    let (ws, grpc, admin) = listeners.addrs();
    if cfg.tls.is_none() {
        tracing::warn!(%ws, %grpc, %admin, "listeners are plain (no TLS): fine on loopback or behind a TLS proxy; give --tls-cert and --tls-key for wss:// and gRPC over TLS");
    } else if cfg.admin_plain {
        tracing::warn!(%admin, "the admin listener is plain (--admin-plain)");
    }
    if cfg.origins.is_empty() && !ws.ip().is_loopback() {
        tracing::warn!(%ws, "no --allowed-origin: pages on any site may open WebSockets to this public listener");
    }
    if keys.is_empty() && !grpc.ip().is_loopback() {
        tracing::warn!(%grpc, "no --api-keys: anyone who reaches the gRPC listener can push to every user");
    }
    if keys.is_empty() && std::env::var_os("HERALD_API_KEY").is_some() {
        tracing::warn!("HERALD_API_KEY is set but this node has no keys: HERALD_API_KEY is what a client sends; a node's keys are --api-keys (HERALD_API_KEYS, name:scope:key)");
    }
    if !cfg.api_keys.is_empty() {
        let names: Vec<String> = cfg
            .api_keys
            .iter()
            .map(|k| format!("{}:{}", k.name, k.scopes.name()))
            .collect();
        tracing::info!(keys = %names.join(","), "gRPC API keys");
    }
}

fn admin(
    node: &Node,
    metrics: &PrometheusHandle,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            // Figures the hub already counts are copied in at scrape time,
            // so connects and deliveries pay no registry lookup.
            let hub = &node.hub;
            metrics::gauge!("herald_connections").set(hub.connections() as f64);
            metrics::gauge!("herald_users").set(hub.users() as f64);
            metrics::counter!("herald_messages_delivered_total")
                .absolute(hub.delivered.load(std::sync::atomic::Ordering::Relaxed));
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics.render().into(),
            )
        }
        "/healthz" => respond(
            StatusCode::OK,
            "text/plain",
            format!("ok {}\n", node.cfg.node_id).into(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
