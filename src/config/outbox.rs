//! The flags of the PostgreSQL outbox consumer (`herald serve
//! --outbox-postgres`) and of `herald outbox init`, which share the
//! connection and table names.

use super::parse::{duration, positive};
use clap::Args;
use std::time::Duration;

/// The largest `--outbox-batch`: a batch is held in memory whole, each
/// row's payload at most `--max-payload-bytes` (bigger ones are not read).
pub const MAX_OUTBOX_BATCH: usize = 10_000;

/// Flags of the outbox consumer, flattened into `herald serve`.
#[derive(Args, Debug, Clone)]
pub struct OutboxArgs {
    /// PostgreSQL URL of the outbox (postgres://user:password@host:port/db?options); set: this node consumes the outbox table (see README "Outbox"). Unset: no consumer.
    #[arg(long, env = "HERALD_OUTBOX_POSTGRES", hide_env_values = true, value_parser = postgres_url)]
    pub outbox_postgres: Option<String>,
    /// The outbox table (its dead-letter table is <table>_dead; `herald outbox init` prints both).
    #[arg(long, env = "HERALD_OUTBOX_TABLE", default_value = "herald_outbox", value_parser = table_name)]
    pub outbox_table: String,
    /// Rows the consumer claims, delivers and acknowledges at once.
    #[arg(long, env = "HERALD_OUTBOX_BATCH", default_value_t = 500, value_parser = batch)]
    pub outbox_batch: usize,
    /// How often the consumer looks for rows without a notification, and how often a standby node tries to take over.
    #[arg(long, env = "HERALD_OUTBOX_POLL", default_value = "1s", value_parser = duration)]
    pub outbox_poll: Duration,
    /// Sends of one batch in flight at once (rows of different users; one user's rows go one after another).
    #[arg(long, env = "HERALD_OUTBOX_CONCURRENCY", default_value_t = 64, value_parser = positive)]
    pub outbox_concurrency: usize,
    /// Longest wait between retries of a row that failed for a transient reason (Redis down), and between reconnects to PostgreSQL.
    #[arg(long, env = "HERALD_OUTBOX_MAX_BACKOFF", default_value = "5s", value_parser = duration)]
    pub outbox_max_backoff: Duration,
}

/// The resolved consumer settings (present when `--outbox-postgres` is).
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    /// Contains the password: never log it whole (`telemetry::redact_url`).
    pub url: String,
    pub table: String,
    pub batch: usize,
    pub poll: Duration,
    pub concurrency: usize,
    pub max_backoff: Duration,
}

impl OutboxArgs {
    pub fn resolve(&self) -> Option<OutboxConfig> {
        let url = self.outbox_postgres.clone().filter(|u| !u.is_empty())?;
        Some(OutboxConfig {
            url,
            table: self.outbox_table.clone(),
            batch: self.outbox_batch,
            poll: self.outbox_poll.max(Duration::from_millis(10)),
            concurrency: self.outbox_concurrency,
            max_backoff: self.outbox_max_backoff.max(Duration::from_millis(100)),
        })
    }
}

/// `herald outbox init`: print the DDL, or apply it.
#[derive(Args, Debug, Clone)]
pub struct OutboxInitArgs {
    /// The outbox table to create (the dead-letter table is <table>_dead).
    #[arg(long, env = "HERALD_OUTBOX_TABLE", default_value = "herald_outbox", value_parser = table_name)]
    pub outbox_table: String,
    /// Apply the DDL to the database of --outbox-postgres instead of printing it (idempotent: existing tables are kept).
    #[arg(long, requires = "outbox_postgres")]
    pub apply: bool,
    /// PostgreSQL URL (postgres://user:password@host:port/db) for --apply.
    #[arg(long, env = "HERALD_OUTBOX_POSTGRES", hide_env_values = true, value_parser = postgres_url)]
    pub outbox_postgres: Option<String>,
}

/// Only the URL form: it is the form whose password the log can redact.
/// The error never echoes the value (it may hold a password).
fn postgres_url(s: &str) -> Result<String, String> {
    if s.is_empty() || s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(s.to_string())
    } else {
        Err("write a URL: postgres://user:password@host:port/database".into())
    }
}

/// A plain lower-case SQL identifier, short enough that `<table>_dead`,
/// the trigger's names and the idempotency keys stay within their limits;
/// it is spliced into SQL, so nothing else passes.
pub fn table_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 40
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(s.to_string())
    } else {
        Err("1 to 40 characters of a-z, 0-9 and _, not starting with a digit".into())
    }
}

fn batch(s: &str) -> Result<usize, String> {
    let n = positive(s)?;
    if n > MAX_OUTBOX_BATCH {
        return Err(format!("at most {MAX_OUTBOX_BATCH}"));
    }
    Ok(n)
}
