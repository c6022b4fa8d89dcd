//! The PostgreSQL outbox consumer (`--outbox-postgres`): services insert
//! notifications into an outbox table in the same transaction as their
//! business data; this task delivers them, exactly once and in per-user
//! order, and deletes them.
//!
//! Design (README "Architecture" says why): every node with the flag runs
//! this task, one of them is the consumer at a time — the holder of a
//! session advisory lock, which PostgreSQL releases when its connection
//! ends, however the node died. The consumer reads a batch in id order,
//! delivers it (`deliver`), then deletes it (dead rows moved to
//! `<table>_dead`) in one statement. Each row's send carries the key
//! `outbox:<table oid>:<id>`: a row sent but not deleted (node killed,
//! database gone) is sent again by the next consumer, and Herald answers
//! with the first send instead of storing it twice.
//!
//! The task owns its connection; dropping the client (on an error or at
//! stop) closes it, which releases the lock. It wakes on the table's
//! `NOTIFY` (a trigger in the DDL), or every `--outbox-poll` without one.

mod deliver;
pub mod sql;

use crate::config::OutboxConfig;
use crate::node::Node;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio_postgres::{AsyncMessage, NoTls};

/// The longest any one statement may take before the connection counts as
/// lost (a network blip that leaves the socket open looks like this).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the consumer is doing, for `Stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// No `--outbox-postgres`.
    Off = 0,
    Connecting = 1,
    /// Connected; another node holds the consumer lock.
    Standby = 2,
    /// This node is the consumer.
    Active = 3,
    /// The database cannot be reached; retrying with backoff.
    Unreachable = 4,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Off => "off",
            State::Connecting => "connecting",
            State::Standby => "standby",
            State::Active => "active",
            State::Unreachable => "unreachable",
        }
    }
}

/// The consumer's figures, shared with the gRPC `Stats` call.
#[derive(Debug, Default)]
pub struct Status {
    state: AtomicU8,
    delivered: AtomicU64,
    dead: AtomicU64,
    failures: AtomicU64,
    lag_ms: AtomicU64,
}

/// A copy of [`Status`] at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub state: State,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub send_failures: u64,
    /// Age of the oldest row of the last batch (0 when the table was empty).
    pub lag_ms: u64,
}

impl Status {
    pub fn snapshot(&self) -> Snapshot {
        let state = match self.state.load(Ordering::Relaxed) {
            1 => State::Connecting,
            2 => State::Standby,
            3 => State::Active,
            4 => State::Unreachable,
            _ => State::Off,
        };
        Snapshot {
            state,
            delivered: self.delivered.load(Ordering::Relaxed),
            dead_lettered: self.dead.load(Ordering::Relaxed),
            send_failures: self.failures.load(Ordering::Relaxed),
            lag_ms: self.lag_ms.load(Ordering::Relaxed),
        }
    }

    fn set(&self, s: State) {
        self.state.store(s as u8, Ordering::Relaxed);
        metrics::gauge!("herald_outbox_active").set(if s == State::Active { 1.0 } else { 0.0 });
    }

    fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    fn lag(&self, ms: f64) {
        self.lag_ms.store(ms.max(0.0) as u64, Ordering::Relaxed);
        metrics::gauge!("herald_outbox_lag_seconds").set(ms.max(0.0) / 1000.0);
    }
}

/// Why a session with the database ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("no answer within {STATEMENT_TIMEOUT:?}")]
    Timeout,
    #[error("the connection closed")]
    Closed,
    #[error("table {0} does not exist: create it with `herald outbox init --apply`")]
    NoTable(String),
}

/// The running consumer task and what it shares.
pub struct Consumer {
    cfg: OutboxConfig,
    node: Arc<Node>,
    status: Arc<Status>,
    stop: watch::Receiver<bool>,
}

impl Consumer {
    /// Starts the consumer; it runs until `stop` turns true (it then
    /// abandons an unfinished batch: its rows stay, and the next consumer
    /// sends them under the same keys).
    pub fn start(
        cfg: OutboxConfig,
        node: Arc<Node>,
        status: Arc<Status>,
        stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        status.set(State::Connecting);
        tokio::spawn(
            Consumer {
                cfg,
                node,
                status,
                stop,
            }
            .run(),
        )
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `d`; false when told to stop meanwhile.
    async fn pause(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        if *stop.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stop.changed() => false,
        }
    }

    /// Sessions, one after another, with backoff between failed ones; a
    /// line when the database goes away and one when it is back.
    async fn run(self) {
        let redacted = crate::telemetry::redact_url(&self.cfg.url);
        let mut down_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        while !self.stopping() {
            let mut connected = false;
            let result = self.session(&mut connected, &mut down_since).await;
            self.status.set(State::Unreachable);
            let Err(e) = result else { break };
            if connected {
                backoff = Duration::from_millis(100);
            }
            if down_since.is_none() {
                down_since = Some(Instant::now());
                tracing::warn!(event = "outbox.db_down", postgres = %redacted, error = %e,
                    "outbox: the database is unreachable; retrying with backoff (rows wait in the table)");
            } else {
                tracing::debug!(error = %e, "outbox: still unreachable");
            }
            if !self.pause(backoff).await {
                break;
            }
            backoff = (backoff * 2).min(self.cfg.max_backoff);
        }
        self.status.set(State::Off);
    }

    /// One connection: take the lock (or wait as standby), then consume
    /// until an error or the stop. Ok only at stop.
    async fn session(
        &self,
        connected: &mut bool,
        down_since: &mut Option<Instant>,
    ) -> Result<(), SessionError> {
        let (client, wake, mut conn) = connect(&self.cfg.url).await?;
        // The connection task ends with the client; abort it on any exit.
        let _guard = AbortOnDrop(conn.abort_handle());
        *connected = true;
        let oid: Option<u32> = timed(client.query_one(sql::TABLE_OID, &[&self.cfg.table]))
            .await?
            .get(0);
        let oid = oid.ok_or_else(|| SessionError::NoTable(self.cfg.table.clone()))?;
        timed(client.batch_execute(&format!("LISTEN {}", self.cfg.table))).await?;
        match down_since.take() {
            Some(t) => {
                tracing::info!(event = "outbox.db_up", down_ms = t.elapsed().as_millis() as u64,
                table = %self.cfg.table, "outbox: the database is back")
            }
            None => tracing::info!(event = "outbox.connected", table = %self.cfg.table,
                "outbox: connected"),
        }
        let lock = sql::lock_name(&self.cfg.table);
        loop {
            let got: bool = timed(client.query_one(sql::TRY_LOCK, &[&lock]))
                .await?
                .get(0);
            if got {
                break;
            }
            self.status.set(State::Standby);
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.poll) => {}
                _ = &mut conn => return Err(SessionError::Closed),
            }
            if self.stopping() {
                return Ok(());
            }
        }
        self.status.set(State::Active);
        tracing::info!(event = "outbox.active", node = %self.node.cfg.node_id, table = %self.cfg.table,
            "outbox: this node is the consumer");
        let claim = timed(client.prepare(&sql::claim(&self.cfg.table))).await?;
        let ack = timed(client.prepare(&sql::ack(&self.cfg.table))).await?;
        let key_prefix = format!("outbox:{oid}:");
        let ctx = deliver::Ctx {
            node: &self.node,
            status: &self.status,
            key_prefix: &key_prefix,
            concurrency: self.cfg.concurrency,
            max_backoff: self.cfg.max_backoff,
            stop: self.stop.clone(),
        };
        let limits = &self.node.cfg.limits;
        let (max_payload, max_users) = (
            limits.max_payload_bytes.min(i32::MAX as usize) as i32,
            limits.max_users_per_call.min(i32::MAX as usize) as i32,
        );
        loop {
            if self.stopping() {
                return Ok(());
            }
            let started = Instant::now();
            let rows = timed(client.query(
                &claim,
                &[&(self.cfg.batch as i64), &max_payload, &max_users],
            ))
            .await?;
            let rows = rows
                .iter()
                .map(deliver::Row::from_pg)
                .collect::<Result<Vec<_>, _>>()?;
            let Some(oldest) = rows.first() else {
                self.status.lag(0.0);
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(self.cfg.poll) => {}
                    _ = stop.changed() => return Ok(()),
                    _ = &mut conn => return Err(SessionError::Closed),
                }
                continue;
            };
            self.status.lag(oldest.age_ms);
            let Some(outcomes) = deliver::batch(&ctx, rows).await else {
                return Ok(());
            };
            let ids: Vec<i64> = outcomes.iter().map(|(id, _)| *id).collect();
            let (dead_ids, errors): (Vec<i64>, Vec<String>) = outcomes
                .into_iter()
                .filter_map(|(id, e)| e.map(|e| (id, e)))
                .unzip();
            let row = timed(client.query_one(&ack, &[&ids, &dead_ids, &errors])).await?;
            let (gone, dead): (i64, i64) = (row.get(0), row.get(1));
            for (id, error) in dead_ids.iter().zip(&errors) {
                tracing::warn!(event = "outbox.dead_letter", row = id, error = %error,
                    table = %self.cfg.table, "outbox row can never be delivered: moved to the dead-letter table");
            }
            let delivered = (gone - dead).max(0) as u64;
            self.status
                .delivered
                .fetch_add(delivered, Ordering::Relaxed);
            self.status.dead.fetch_add(dead as u64, Ordering::Relaxed);
            metrics::counter!("herald_outbox_rows_total", "result" => "delivered")
                .increment(delivered);
            metrics::counter!("herald_outbox_rows_total", "result" => "dead_lettered")
                .increment(dead as u64);
            metrics::histogram!("herald_outbox_batch_seconds")
                .record(started.elapsed().as_secs_f64());
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A statement with [`STATEMENT_TIMEOUT`].
async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, SessionError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SessionError::Timeout),
    }
}

/// Connects (TCP keepalives on, a connect timeout unless the URL sets
/// one) and spawns the task that drives the connection and turns each
/// `NOTIFY` into a wake-up (a `Notify` permit: repeats fold into one).
async fn connect(
    url: &str,
) -> Result<
    (
        tokio_postgres::Client,
        Arc<Notify>,
        tokio::task::JoinHandle<()>,
    ),
    SessionError,
> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    config.application_name("herald-outbox");
    let (client, mut connection) = timed(config.connect(NoTls)).await?;
    let wake = Arc::new(Notify::new());
    let notify = wake.clone();
    let task = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => notify.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "outbox connection ended");
                    return;
                }
            }
        }
    });
    Ok((client, wake, task))
}
