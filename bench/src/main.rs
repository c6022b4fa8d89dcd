//! `herald-bench`: a load generator for Herald clusters, and for the two
//! comparison servers of `bench/` (Socket.IO and herald-floor) through a tiny
//! common bench protocol.
//!
//! Centrifugo v6 is a target too (its GRPC API and JSON client protocol).
//!
//! It opens N WebSocket clients spread over the nodes, drives the API at a
//! fixed offered rate (open loop: each message carries its *intended* send
//! time, so a stalled server or a queue in front of it shows up as latency
//! instead of hiding as a slower send) or as fast as it can (closed loop),
//! and reports deliveries/s, end-to-end latency percentiles (HdrHistogram),
//! loss and duplicates per (connection, sequence number), the connect rate,
//! and the CPU and memory of the server processes named with `--pid`.
//!
//! Scenarios:
//! * `unicast`: sends to random connected users (`--users-per-call` per
//!   call, `--remote-share` of them on another node than the one called);
//!   with `--outbox-postgres`, by committing rows into Herald's outbox
//!   table instead of calling the API.
//! * `broadcast`: one message to every connection; the time until the last
//!   one has it, then sustained fan-out with `--in-flight` broadcasts pending.
//! * `idle`: connections only; resident memory per connection.
//! * `control`: IsOnline / UnreadCount queries per second (Herald only).
//! * `sequential`: SendToUser one call at a time, then a few callers at a
//!   time (closed loop): per-call latency.
//! * `hold` and `probe`: a fleet spread over several client processes (each
//!   under its open-files limit): `hold` processes connect and hold their
//!   clients, one `probe` times broadcasts to all of them, IsOnline, and a
//!   node's reconnect storm (bench/c100k.sh).
//!
//! Every loop is bounded by count and time (`--duration`, `--time-limit`).

mod api;
mod args;
mod broadcast;
mod centrifugo;
mod control;
mod ctx;
mod fleet;
mod hold;
mod http;
mod idle;
mod outbox;
mod probe;
mod remote;
mod report;
mod sequential;
mod stats;
mod unicast;

use api::Api;
use args::{BenchArgs, Scenario};
use clap::Parser;
use ctx::{connect_all, progress_loop, Ctx, Progress};
use fleet::{Fleet, FleetConfig, Target};
use outbox::OutboxWriter;
use serde_json::json;
use stats::{now_ns, Watched};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => {
            eprintln!("herald-bench: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: BenchArgs) -> ExitCode {
    match run_inner(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("herald-bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// The probe scenario: no clients of its own, the holders' status files
/// and Herald's gRPC API.
async fn run_probe(args: BenchArgs) -> Result<ExitCode, String> {
    if args.target != Target::Herald || args.api.is_empty() || args.holders.is_empty() {
        return Err(
            "probe: --target herald, --api of every node, --holder FILE of every hold process"
                .into(),
        );
    }
    let api = Arc::new(Api::grpc(&args.api, args.grpc_channels, args.api_key.clone()).await?);
    let (report, problems) = probe::probe(&args, api).await;
    let text = serde_json::to_string_pretty(&report).expect("serializable");
    if let Some(path) = &args.out {
        std::fs::write(path, text.clone() + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if args.json {
        println!("{text}");
    }
    if args.check && !problems.is_empty() {
        eprintln!("herald-bench: check failed: {}", problems.join("; "));
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_inner(mut args: BenchArgs) -> Result<ExitCode, String> {
    let limit = args.time_limit;
    tokio::spawn(async move {
        tokio::time::sleep(limit).await;
        eprintln!("herald-bench: --time-limit of {limit:?} reached; stopping");
        std::process::exit(4);
    });
    now_ns();
    let fd_limit = stats::raise_fd_limit();
    if args.connections as u64 + 256 > fd_limit {
        eprintln!(
            "herald-bench: warning: {} connections need more open files than this process may have ({fd_limit}); raise the hard limit (ulimit -Hn) to go further",
            args.connections
        );
    }
    let watched: Vec<Watched> = args
        .pid
        .iter()
        .map(|p| Watched::parse(p))
        .collect::<Result<_, _>>()?;
    check_args(&mut args)?;
    if args.scenario == Scenario::Probe {
        return run_probe(args).await;
    }
    let api = sender(&args).await?;
    let fleet = Fleet::new(FleetConfig {
        target: args.target,
        secret: args.jwt_secret.clone(),
        ws_urls: args.ws.clone(),
        connections: args.connections,
        src_ips: args.src_ips,
        reconnect: args.reconnect && args.scenario != Scenario::Idle,
        run_id: args.run_id.clone(),
    })?;
    let progress = Arc::new(Progress {
        phase: Mutex::new("connect".into()),
        calls: AtomicU64::new(0),
        started: Instant::now(),
    });
    let ctx = Arc::new(Ctx {
        args,
        fleet: fleet.clone(),
        api,
        watched,
        seq: AtomicU64::new(1),
        progress,
    });
    let printer = if ctx.args.quiet {
        None
    } else {
        Some(tokio::spawn(progress_loop(ctx.clone())))
    };

    let rss_before = idle::rss_all(&ctx).await;
    let connect = connect_all(&ctx).await;
    let mut report = json!({
        "label": ctx.args.label,
        "scenario": ctx.args.scenario,
        "target": ctx.args.target,
        "nodes": ctx.args.ws.len(),
        "connections": ctx.args.connections,
        "users_per_call": ctx.args.users_per_call,
        "send_batch": ctx.args.send_batch,
        "sender": if ctx.args.outbox_postgres.is_some() { "outbox" } else { "api" },
        "transient": ctx.args.transient,
        "payload_bytes": ctx.args.payload_bytes,
        "connect": connect,
    });
    let mut problems: Vec<String> = Vec::new();
    let connected = fleet.connected.load(Relaxed);
    if connected == 0 {
        problems.push("no client could connect".into());
    } else {
        match ctx.args.scenario {
            Scenario::Unicast => unicast::unicast(&ctx, &mut report, &mut problems).await,
            Scenario::Broadcast => broadcast::broadcast(&ctx, &mut report, &mut problems).await,
            Scenario::Idle => idle::idle(&ctx, rss_before, &mut report).await,
            Scenario::Control => control::control(&ctx, &mut report, &mut problems).await,
            Scenario::Sequential => sequential::sequential(&ctx, &mut report, &mut problems).await,
            Scenario::Hold => hold::hold(&ctx, &mut report).await,
            Scenario::Probe => unreachable!("run_probe"),
        }
    }
    fleet.stop();
    if let Some(p) = printer {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    let cf = fleet.connect_failures.load(Relaxed);
    let dis = fleet.disconnects.load(Relaxed);
    if cf > 0 {
        problems.push(format!("{cf} connection attempts failed"));
    }
    if dis > 0 {
        problems.push(format!("{dis} connections dropped"));
    }
    report["client_errors"] = json!(fleet.errors());
    report["problems"] = json!(problems);
    report["ok"] = json!(problems.is_empty());
    if let Some(path) = &ctx.args.out {
        let text = serde_json::to_string_pretty(&report).expect("serializable");
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if ctx.args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
    } else {
        report::print_human(&report);
    }
    if ctx.args.check && !problems.is_empty() {
        eprintln!("herald-bench: check failed: {}", problems.join("; "));
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

/// What sends the messages: the outbox table (`--outbox-postgres`), the
/// target's API, or nothing (idle).
async fn sender(args: &BenchArgs) -> Result<Option<Arc<Api>>, String> {
    let outbox = args.outbox_postgres.clone();
    if outbox.is_some()
        && (!matches!(args.target, Target::Herald | Target::Centrifugo)
            || args.scenario != Scenario::Unicast
            || args.send_batch > 0
            || args.remote_share.is_some())
    {
        return Err(
            "--outbox-postgres feeds Herald's (or Centrifugo's) outbox consumer: --target herald or centrifugo, the unicast scenario, no --send-batch or --remote-share"
                .into(),
        );
    }
    let needs_api = !matches!(args.scenario, Scenario::Idle | Scenario::Hold) && outbox.is_none();
    if needs_api && args.api.is_empty() {
        return Err("--api is needed: the HTTP base URL of each node (http://H:P)".into());
    }
    Ok(if let Some(url) = &outbox {
        let format = match args.target {
            Target::Centrifugo => outbox::Format::Centrifugo {
                partitions: args.outbox_partitions,
            },
            _ => outbox::Format::Herald,
        };
        Some(Arc::new(Api::Outbox(
            OutboxWriter::connect(url, args.outbox_writers, &args.outbox_table, format).await?,
        )))
    } else if needs_api {
        Some(Arc::new(match args.target {
            Target::Herald => {
                Api::grpc(&args.api, args.grpc_channels, args.api_key.clone()).await?
            }
            Target::Centrifugo => Api::centrifugo(&args.api, args.grpc_channels).await?,
            _ => Api::http(&args.api, args.http_conns)?,
        }))
    } else {
        None
    })
}

/// Rejects flag combinations that cannot run, with what to change; fills
/// in Herald's default API address.
fn check_args(args: &mut BenchArgs) -> Result<(), String> {
    if args.api.is_empty() && args.target == Target::Herald {
        args.api = vec!["http://127.0.0.1:50051".into()];
    }
    if args.scenario == Scenario::Hold && args.status.is_none() {
        return Err("the hold scenario writes its state to --status FILE".into());
    }
    if matches!(args.target, Target::Herald | Target::Centrifugo) && args.jwt_secret.is_none() {
        return Err("--jwt-secret (or HERALD_JWT_SECRET) is needed to mint client tokens".into());
    }
    if args.scenario == Scenario::Control && args.target != Target::Herald {
        return Err("the control scenario queries Herald's gRPC API; use --target herald".into());
    }
    if args.users_per_call == 0 {
        return Err("--users-per-call must be at least 1".into());
    }
    if args.remote_share.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return Err("--remote-share must be between 0 and 1".into());
    }
    if args.remote_sender
        && (args.target != Target::Socketio || args.max_rate || args.remote_share.is_some())
    {
        return Err(
            "--remote-sender drives bench/socketio/emitter.js: --target socketio, fixed rates only (no --max-rate, no --remote-share)"
                .into(),
        );
    }
    if args.send_batch > 0 && (args.target != Target::Herald || args.max_rate) {
        return Err(
            "--send-batch drives Herald's SendBatch at fixed rates: --target herald, no --max-rate"
                .into(),
        );
    }
    Ok(())
}
