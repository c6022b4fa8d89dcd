//! The outbox's SQL, in one place: the DDL `herald outbox init` prints, the
//! claim and the acknowledgement. The table name is spliced in, so it is
//! always one that `config::outbox::table_name` accepted (a plain
//! lower-case identifier).

/// The outbox table, its dead-letter table, and the statement trigger that
/// wakes consumers (`NOTIFY <table>`, once per inserting statement; within
/// a transaction PostgreSQL folds repeats into one, delivered at commit, so
/// a rolled-back insert wakes nobody). Idempotent: `IF NOT EXISTS` and
/// `CREATE OR REPLACE` throughout (PostgreSQL 14 or newer).
pub fn ddl(table: &str) -> String {
    format!(
        "-- Herald outbox: insert a row in the same transaction as your business data.
CREATE TABLE IF NOT EXISTS {table} (
    id         bigserial   PRIMARY KEY,           -- delivery order (per user) and idempotency key
    op         text        NOT NULL DEFAULT 'send', -- 'send' (to user_ids) or 'broadcast'
    user_ids   text[]      NOT NULL DEFAULT '{{}}', -- recipients of a send, 1 to 1000
    topic      text        NOT NULL DEFAULT '',
    payload    text        NOT NULL,              -- any JSON value, delivered byte for byte
    transient  boolean     NOT NULL DEFAULT false, -- live-only, not stored (at most once)
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Rows that can never be delivered, with the reason.
CREATE TABLE IF NOT EXISTS {table}_dead (
    id         bigint      PRIMARY KEY,
    op         text,
    user_ids   text[],
    topic      text,
    payload    text,
    transient  boolean,
    created_at timestamptz,
    failed_at  timestamptz NOT NULL DEFAULT now(),
    error      text        NOT NULL
);
CREATE OR REPLACE FUNCTION {table}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{table}', '');
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER {table}_notify AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {table}_notify();
"
    )
}

/// The oldest rows in id order, at most `$1`. A payload longer than `$2`
/// bytes or a recipient list longer than `$3` is not read (NULL, with its
/// size), so a hostile row cannot make the node allocate more than a batch
/// of valid rows would. `age_ms` is the row's age by the database's clock.
pub fn claim(table: &str) -> String {
    format!(
        "SELECT id, op::text,
                CASE WHEN cardinality(user_ids) <= $3 THEN user_ids::text[] END,
                coalesce(cardinality(user_ids), 0)::bigint,
                left(topic::text, 1024),
                CASE WHEN octet_length(payload::text) <= $2 THEN payload::text END,
                coalesce(octet_length(payload::text), 0)::bigint,
                coalesce(transient, false),
                (extract(epoch FROM clock_timestamp() - created_at) * 1000)::float8
         FROM {table} ORDER BY id LIMIT $1"
    )
}

/// Acknowledges a batch in one round trip: deletes every id in `$1` (the
/// delivered and the dead), and copies the dead ones (`$2`, with their
/// errors in `$3`) into the dead-letter table. Returns the rows deleted
/// and the rows dead-lettered.
pub fn ack(table: &str) -> String {
    format!(
        "WITH gone AS (
            DELETE FROM {table} WHERE id = ANY($1::bigint[])
            RETURNING id, op, user_ids, topic, payload, transient, created_at
         ), dead AS (
            INSERT INTO {table}_dead (id, op, user_ids, topic, payload, transient, created_at, error)
            SELECT g.id, g.op, g.user_ids, g.topic, g.payload, g.transient, g.created_at, e.error
            FROM gone g JOIN unnest($2::bigint[], $3::text[]) AS e(id, error) ON e.id = g.id
            ON CONFLICT (id) DO UPDATE SET error = excluded.error, failed_at = now()
            RETURNING 1
         )
         SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM dead)"
    )
}

/// The advisory lock that makes one node the consumer of `table` (a
/// session lock: PostgreSQL releases it when the connection ends, also
/// when the node is killed).
pub const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(hashtext($1))";

/// The name the advisory lock is hashed from.
pub fn lock_name(table: &str) -> String {
    format!("herald.outbox.{table}")
}

/// The table's OID: part of every row's idempotency key, so a table that
/// is dropped and created again (ids from 1 again) does not collide with
/// keys Herald still remembers.
pub const TABLE_OID: &str = "SELECT to_regclass($1)::oid";

#[cfg(test)]
mod tests {
    /// README's Outbox section shows the DDL `herald outbox init` prints.
    #[test]
    fn the_readme_shows_the_ddl() {
        let readme = include_str!("../../README.md");
        assert!(readme.contains(&super::ddl("herald_outbox")));
    }
}
