//! The outbox as the sending side (`--outbox-postgres`): each message is
//! one committed transaction, an `INSERT` into Herald's outbox table (see
//! README's Outbox section), spread round-robin over `--outbox-writers`
//! PostgreSQL connections; the nodes' outbox consumer delivers it. A send
//! counts as made when PostgreSQL answered the `INSERT` (the transaction
//! committed), so the fleet then expects the delivery, exactly once.
//!
//! Each `INSERT` runs outside `BEGIN`, which makes it a transaction of its
//! own that commits before PostgreSQL answers. Several in flight on one
//! connection are pipelined by tokio-postgres: still one transaction each.
//!
//! For Centrifugo (`--target centrifugo`) the row is its PostgreSQL
//! consumer's: `method` `publish` to the user's channel (`broadcast` for
//! several users), the API command as `payload` (bytes, as Centrifugo's own
//! tests declare the column, so the data reaches the socket as written),
//! and a `partition` from the user's name, so one user's rows stay in one
//! partition, which Centrifugo consumes in id order.

use crate::centrifugo::user_channel;
use tokio_postgres::{Client, NoTls, Statement};

/// Whose outbox table the rows go into.
#[derive(Clone, Copy)]
pub enum Format {
    /// Herald's (README's Outbox section).
    Herald,
    /// Centrifugo v6's PostgreSQL consumer, with this many partitions.
    Centrifugo { partitions: u32 },
}

pub struct OutboxWriter {
    /// One per connection, with its prepared `INSERT`. The connection
    /// tasks end when their client is dropped (with the writer).
    writers: Vec<(Client, Statement)>,
    format: Format,
}

impl OutboxWriter {
    /// Opens `conns` connections to `url` and prepares the `INSERT` into
    /// `table` on each.
    pub async fn connect(
        url: &str,
        conns: usize,
        table: &str,
        format: Format,
    ) -> Result<Self, String> {
        // The name goes into SQL text: a plain lower-case identifier only.
        if table.is_empty()
            || !table
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!(
                "--outbox-table {table:?}: lower-case letters, digits and _ only"
            ));
        }
        let sql = match format {
            Format::Herald => {
                format!("INSERT INTO {table} (user_ids, payload, transient) VALUES ($1, $2, $3)")
            }
            Format::Centrifugo { .. } => format!(
                "INSERT INTO {table} (method, payload, partition) VALUES ($1, convert_to($2, 'UTF8'), $3)"
            ),
        };
        let mut writers = Vec::new();
        for _ in 0..conns.max(1) {
            let (client, conn) = tokio_postgres::connect(url, NoTls)
                .await
                .map_err(|e| format!("--outbox-postgres: cannot connect: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    eprintln!("herald-bench: outbox writer connection ended: {e}");
                }
            });
            let stmt = client
                .prepare(&sql)
                .await
                .map_err(|e| format!("--outbox-postgres: {sql}: {e}"))?;
            writers.push((client, stmt));
        }
        Ok(OutboxWriter { writers, format })
    }

    pub fn connections(&self) -> usize {
        self.writers.len()
    }

    /// One committed row for `users`; `writer` picks the connection (the
    /// sender passes its call counter, so calls go round-robin).
    pub async fn send(
        &self,
        writer: usize,
        users: Vec<String>,
        payload: String,
        transient: bool,
    ) -> Result<(), String> {
        let (client, stmt) = &self.writers[writer % self.writers.len()];
        let done = match self.format {
            Format::Herald => client.execute(stmt, &[&users, &payload, &transient]).await,
            Format::Centrifugo { partitions } => {
                let (method, command) = centrifugo_command(&users, &payload);
                let partition = (fnv1a(&users[0]) % partitions.max(1)) as i32;
                client.execute(stmt, &[&method, &command, &partition]).await
            }
        };
        done.map(|_| ()).map_err(|e| format!("outbox INSERT: {e}"))
    }
}

/// Centrifugo's API command for a send to `users` (bench user ids need no
/// JSON escaping): `publish` to one user's channel, `broadcast` to several.
fn centrifugo_command(users: &[String], data: &str) -> (&'static str, String) {
    if let [user] = users {
        let channel = user_channel(user);
        (
            "publish",
            format!("{{\"channel\":\"{channel}\",\"data\":{data}}}"),
        )
    } else {
        let channels: Vec<String> = users
            .iter()
            .map(|u| format!("\"{}\"", user_channel(u)))
            .collect();
        (
            "broadcast",
            format!("{{\"channels\":[{}],\"data\":{data}}}", channels.join(",")),
        )
    }
}

/// A stable hash of a user id (FNV-1a), for the partition of its rows.
fn fnv1a(s: &str) -> u32 {
    s.bytes()
        .fold(0x811c_9dc5, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centrifugo_commands_are_json() {
        let (m, c) = centrifugo_command(&["u1".into()], r#"{"seq":1}"#);
        assert_eq!(m, "publish");
        let v: serde_json::Value = serde_json::from_str(&c).unwrap();
        assert_eq!(v["channel"], "#u1");
        assert_eq!(v["data"]["seq"], 1);
        let (m, c) = centrifugo_command(&["a".into(), "b".into()], "2");
        assert_eq!(m, "broadcast");
        let v: serde_json::Value = serde_json::from_str(&c).unwrap();
        assert_eq!(v["channels"], serde_json::json!(["#a", "#b"]));
    }
}
