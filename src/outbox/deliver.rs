//! One claimed batch: rows become sends with their idempotency keys, go
//! out in per-user order (rows of different users in parallel), and each
//! row ends delivered or dead (with the reason). Transient failures are
//! retried here, with backoff, until they succeed or the node stops.

use super::Status;
use crate::error::Error;
use crate::node::{Node, SendToUser};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A claimed row, as read by `sql::claim`.
pub struct Row {
    pub id: i64,
    pub op: String,
    /// None when the row names more recipients than a send may have.
    pub users: Option<Vec<Option<String>>>,
    pub user_count: i64,
    pub topic: String,
    /// None when the payload is over `--max-payload-bytes`.
    pub payload: Option<String>,
    pub payload_bytes: i64,
    pub transient: bool,
    pub age_ms: f64,
}

impl Row {
    pub fn from_pg(r: &tokio_postgres::Row) -> Result<Row, tokio_postgres::Error> {
        Ok(Row {
            id: r.try_get(0)?,
            op: r.try_get(1)?,
            users: r.try_get(2)?,
            user_count: r.try_get(3)?,
            topic: r.try_get(4)?,
            payload: r.try_get(5)?,
            payload_bytes: r.try_get(6)?,
            transient: r.try_get(7)?,
            age_ms: r.try_get::<_, Option<f64>>(8)?.unwrap_or(0.0),
        })
    }
}

/// What a row asks for, once it is known to be well formed.
enum Job {
    Send {
        users: Vec<String>,
        topic: String,
        payload: String,
        transient: bool,
    },
    Broadcast {
        topic: String,
        payload: String,
    },
}

/// A row's outcome: delivered (`None`) or dead, with the reason.
pub type Outcome = (i64, Option<String>);

/// What a batch needs from its consumer.
pub struct Ctx<'a> {
    pub node: &'a Arc<Node>,
    pub status: &'a Status,
    /// `outbox:<table oid>:`; the row id completes the key.
    pub key_prefix: &'a str,
    pub concurrency: usize,
    pub max_backoff: Duration,
    pub stop: watch::Receiver<bool>,
}

/// Checks what Herald would not check itself, or what the claim did not
/// read: the operation, NULL recipients, sizes. The node validates the rest
/// (JSON, user ids, topic), and its `InvalidArgument` kills the row too.
fn job(row: Row, max_users: usize, max_payload: usize) -> Result<Job, String> {
    let Some(payload) = row.payload else {
        return Err(format!(
            "payload is {} bytes, over --max-payload-bytes ({max_payload})",
            row.payload_bytes
        ));
    };
    match row.op.as_str() {
        "send" => {
            let Some(users) = row.users else {
                return Err(format!(
                    "{} recipients: a send names at most {max_users}",
                    row.user_count
                ));
            };
            let users = users
                .into_iter()
                .enumerate()
                .map(|(i, u)| u.ok_or_else(|| format!("user_ids[{}] is NULL", i + 1)))
                .collect::<Result<Vec<String>, String>>()?;
            Ok(Job::Send {
                users,
                topic: row.topic,
                payload,
                transient: row.transient,
            })
        }
        "broadcast" if row.user_count > 0 => {
            Err("a broadcast goes to everyone: leave user_ids empty".into())
        }
        "broadcast" => Ok(Job::Broadcast {
            topic: row.topic,
            payload,
        }),
        other => Err(format!(
            "unknown op {:?}: write send or broadcast",
            other.chars().take(64).collect::<String>()
        )),
    }
}

/// Delivers a batch (rows in id order). Returns every row's outcome, or
/// None when the node is stopping (the rows stay in the table; the next
/// consumer sends them again under the same keys).
///
/// Order: a row for one user goes out only after the user's earlier rows
/// of the batch have (a lane per user). A row for several users, or a
/// broadcast, is a barrier: it waits for every earlier row and holds back
/// every later one, so it keeps its place in each of its users' order.
pub async fn batch(ctx: &Ctx<'_>, rows: Vec<Row>) -> Option<Vec<Outcome>> {
    let limits = &ctx.node.cfg.limits;
    let mut outcomes = Vec::with_capacity(rows.len());
    // Consecutive single-user rows, by user, in id order.
    let mut lanes: Vec<Vec<(i64, Job)>> = Vec::new();
    let mut lane_of: HashMap<String, usize> = HashMap::new();
    for row in rows {
        let id = row.id;
        let job = match job(row, limits.max_users_per_call, limits.max_payload_bytes) {
            Ok(j) => j,
            Err(e) => {
                outcomes.push((id, Some(e)));
                continue;
            }
        };
        match &job {
            Job::Send { users, .. } if users.len() == 1 => {
                let lane = *lane_of.entry(users[0].clone()).or_insert_with(|| {
                    lanes.push(Vec::new());
                    lanes.len() - 1
                });
                lanes[lane].push((id, job));
            }
            _ => {
                outcomes.extend(run_lanes(ctx, std::mem::take(&mut lanes)).await?);
                lane_of.clear();
                outcomes.push((id, deliver(ctx, id, &job).await?));
            }
        }
    }
    outcomes.extend(run_lanes(ctx, lanes).await?);
    Some(outcomes)
}

/// Runs lanes side by side, at most `concurrency` at once, each lane's
/// rows one after another.
async fn run_lanes(ctx: &Ctx<'_>, lanes: Vec<Vec<(i64, Job)>>) -> Option<Vec<Outcome>> {
    let done: Vec<Option<Vec<Outcome>>> = futures_util::stream::iter(lanes)
        .map(|lane| async move {
            let mut out = Vec::with_capacity(lane.len());
            for (id, job) in &lane {
                out.push((*id, deliver(ctx, *id, job).await?));
            }
            Some(out)
        })
        .buffer_unordered(ctx.concurrency)
        .collect()
        .await;
    let mut all = Vec::new();
    for lane in done {
        all.extend(lane?);
    }
    Some(all)
}

/// Sends one row until Herald's write succeeds (`Some(None)`) or refuses
/// the row for good (`Some(Some(reason))`); transient failures are retried
/// with backoff, the same key each time. None: the node is stopping.
async fn deliver(ctx: &Ctx<'_>, id: i64, job: &Job) -> Option<Option<String>> {
    let key = format!("{}{id}", ctx.key_prefix);
    let mut wait = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        let result = match job {
            Job::Send {
                users,
                topic,
                payload,
                transient,
            } => ctx
                .node
                .send_to_user(SendToUser {
                    users,
                    topic,
                    payload_json: payload,
                    transient: *transient,
                    idempotency_key: &key,
                })
                .await
                .map(|_| ()),
            Job::Broadcast { topic, payload } => {
                ctx.node.broadcast(topic, payload, &key).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                if attempt > 0 {
                    tracing::info!(
                        event = "outbox.retry_ok",
                        row = id,
                        attempts = attempt + 1,
                        "outbox row delivered after transient failures"
                    );
                }
                return Some(None);
            }
            Err(Error::InvalidArgument(why)) => return Some(Some(why)),
            Err(e) => {
                attempt += 1;
                ctx.status.failed();
                metrics::counter!("herald_outbox_send_failures_total").increment(1);
                if attempt == 1 {
                    tracing::warn!(event = "outbox.retry", row = id, error = %e,
                        "outbox row failed for a transient reason; retrying with backoff (its user's later rows wait)");
                }
                let mut stop = ctx.stop.clone();
                if *stop.borrow() {
                    return None;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return None,
                }
                wait = (wait * 2).min(ctx.max_backoff);
            }
        }
    }
}
