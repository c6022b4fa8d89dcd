//! `herald outbox init`: the outbox's DDL, printed (to review, or to add to
//! a service's migrations) or applied to a database.

use crate::config::OutboxInitArgs;
use std::process::ExitCode;

pub async fn outbox_init(args: OutboxInitArgs) -> ExitCode {
    let ddl = crate::outbox::sql::ddl(&args.outbox_table);
    let url = match (args.apply, args.outbox_postgres) {
        (true, Some(url)) if !url.is_empty() => url,
        (true, _) => {
            eprintln!(
                "herald outbox init: --apply needs --outbox-postgres (HERALD_OUTBOX_POSTGRES)"
            );
            return ExitCode::from(2);
        }
        (false, _) => {
            print!("{ddl}");
            return ExitCode::SUCCESS;
        }
    };
    let redacted = crate::telemetry::redact_url(&url);
    let applied = async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        let r = client.batch_execute(&ddl).await;
        drop(client);
        let _ = driver.await;
        r
    };
    match tokio::time::timeout(std::time::Duration::from_secs(30), applied).await {
        Ok(Ok(())) => {
            println!(
                "outbox tables {0} and {0}_dead and their notify trigger are in place on {redacted}",
                args.outbox_table
            );
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("herald outbox init: {redacted}: {e}");
            ExitCode::from(1)
        }
        Err(_) => {
            eprintln!("herald outbox init: {redacted}: no answer within 30s");
            ExitCode::from(1)
        }
    }
}
