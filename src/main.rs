use herald::config::{Cli, Command, Config, OutboxCommand};
use std::process::ExitCode;

/// jemalloc, not glibc's malloc: a node allocates and frees small buffers
/// for every message (frames, protobuf decodes, Redis replies), where glibc
/// spent about a tenth of a node's CPU in `malloc`/`free` (perf, unicast at
/// 10k/s). Measured with bench/run.sh (BENCHMARKS.md, before and after):
/// node CPU per unicast 10% (stored) to 28% (live-only) lower, broadcast
/// deliveries/s about 14% higher, no more RSS per idle connection
/// (mimalloc broadcast less and held 2 KiB more per idle connection).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // A HERALD_* variable set to nothing counts as not set: clap would treat
    // it so for values, but `--help` would still print `[env: X=]` beside
    // the default, as if it were in force. Single-threaded here, before the
    // runtime starts.
    for (name, value) in std::env::vars_os() {
        if value.is_empty() && name.to_str().is_some_and(|n| n.starts_with("HERALD_")) {
            std::env::remove_var(&name);
        }
    }
    let cli = Cli::load();
    // `serve` sizes its runtime from its configuration; the rest take the
    // default (one worker per core).
    let workers = match &cli.command {
        Command::Serve(args) => Config::resolve(args.clone())
            .ok()
            .and_then(|c| c.worker_threads),
        _ => None,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = workers {
        runtime.worker_threads(n);
    }
    match runtime.build() {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => {
            eprintln!("herald: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Token(t) => print_or_fail("token", herald::cli::token(&t)),
        Command::Jwks(j) => print_or_fail("jwks", herald::cli::jwks(&j.key)),
        Command::Send(args) => herald::cli::send(args).await,
        Command::Listen(args) => herald::cli::listen(args).await,
        Command::Outbox(OutboxCommand::Init(args)) => herald::cli::outbox_init(args).await,
        Command::Serve(args) => {
            herald::telemetry::init(args.log_format, args.log_level);
            let cfg = match Config::resolve(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("herald: {e}");
                    return ExitCode::from(2);
                }
            };
            let listeners = match herald::server::Listeners::bind(&cfg).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("herald: {e}");
                    return ExitCode::from(1);
                }
            };
            let (ws, _, _) = listeners.addrs();
            if let (true, Some(secret)) = (cfg.jwt_secret_generated, &cfg.jwt.secret) {
                let token =
                    herald::auth::mint(secret, "demo", std::time::Duration::from_secs(24 * 3600));
                println!("No --jwt-secret configured: generated one for this run only.");
                println!("  HERALD_JWT_SECRET={secret}");
                println!("Demo token for user \"demo\" (24h):");
                println!("  {token}");
                println!("  ws://{ws}/ws?token={token}");
                println!("Demo page: http://{ws}/?token={token}");
            }
            match herald::server::run(cfg, listeners, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn print_or_fail(what: &str, result: Result<String, String>) -> ExitCode {
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("herald {what}: {e}");
            ExitCode::from(2)
        }
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
