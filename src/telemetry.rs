//! The node's log: its subscriber (`--log-format`, `--log-level`,
//! `RUST_LOG`), the event-log lines operators read (one function per kind,
//! each naming itself in an `event` field), the rate limit on repeated
//! refusals, and the redaction of what must never be written.
//!
//! # Levels
//!
//! `--log-level` is the level of every target; HTTP/2, hyper, tower,
//! tonic, rustls and tungstenite stay at `warn` (or quieter, with a quieter
//! `--log-level`), so `debug` shows Herald's lines and not every HTTP/2
//! frame. `RUST_LOG`, when set, adds directives on top: a target it names
//! follows it (`RUST_LOG=h2=debug` shows the frames), and a bare level in
//! it takes the place of `--log-level`.
//!
//! # Event lines
//!
//! `conn.open`, `conn.close`, `handshake.refused`, `rpc.refused` (INFO),
//! `conn.limit`, `log.suppressed` (WARN) and `rpc` (DEBUG). They are root
//! events (no span around them) carrying every field they need, so a text
//! line and a JSON object say the same. Untrusted text (user ids, close
//! reasons, an `Origin`) is passed as a `&str`: the text format quotes and
//! escapes it, the JSON format escapes it, so nobody can forge a line.
//!
//! Tokens, API keys, secrets and passwords never reach a line: refusals
//! name a reason and the key's configured name, never what was presented;
//! [`redact_url`] hides a Redis URL's credentials.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{Directive, EnvFilter};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `--log-level`, quietest first.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn as_str(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Targets kept at `warn` whatever `--log-level` says (their `debug` is
/// per-frame or per-packet tracing), unless `RUST_LOG` names them.
const QUIET: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tower",
    "tonic",
    "rustls",
    "tokio_rustls",
    "tungstenite",
    "tokio_tungstenite",
    "mio",
    "want",
];

/// The filter for `level` and `RUST_LOG` (see the module doc), and the
/// `RUST_LOG` directives that did not parse (left out).
fn filter(level: LogLevel, rust_log: Option<&str>) -> (EnvFilter, Vec<String>) {
    let quiet = level.min(LogLevel::Warn).as_str();
    let mut directives = vec![level.as_str().to_string()];
    directives.extend(QUIET.iter().map(|t| format!("{t}={quiet}")));
    let mut bad = Vec::new();
    for d in rust_log
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        match d.parse::<Directive>() {
            Ok(_) => directives.push(d.to_string()),
            Err(_) => bad.push(d.to_string()),
        }
    }
    // Later directives for the same target replace earlier ones.
    let mut f = EnvFilter::default();
    for d in directives {
        f = f.add_directive(d.parse().expect("checked above"));
    }
    (f, bad)
}

/// Installs the process's subscriber: lines to standard error in `format`,
/// filtered by `level` and `RUST_LOG`. A second call does nothing.
pub fn init(format: LogFormat, level: LogLevel) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, bad) = filter(level, rust_log.as_deref());
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colour codes only on a terminal, never in a log file.
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .try_init(),
        LogFormat::Json => registry.with(JsonLayer).try_init(),
    };
    if installed.is_ok() && !bad.is_empty() {
        tracing::warn!(ignored = %bad.join(","), "RUST_LOG: directives that do not parse are ignored");
    }
}

/// Writes each event as one JSON object on standard error: `ts`, `level`,
/// the fields of the spans around it (outermost first), its own fields
/// (`event` first where there is one, `message`), `target`. A field set
/// twice keeps the innermost value.
struct JsonLayer;

/// A span's fields, kept for the events inside it.
struct SpanFields(Fields);

#[derive(Default)]
struct Fields(Vec<(&'static str, serde_json::Value)>);

impl Fields {
    fn set(&mut self, name: &'static str, v: serde_json::Value) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = v,
            None => self.0.push((name, v)),
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, f: &Field, v: &str) {
        self.set(f.name(), v.into());
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.set(f.name(), v.into());
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.set(f.name(), v.into());
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.set(f.name(), v.into());
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.set(f.name(), v.into());
    }
    fn record_error(&mut self, f: &Field, v: &(dyn std::error::Error + 'static)) {
        self.set(f.name(), v.to_string().into());
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.set(f.name(), format!("{v:?}").into());
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(SpanFields(f)) = span.extensions_mut().get_mut::<SpanFields>() {
                values.record(f);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        use tracing_subscriber::fmt::time::FormatTime;
        let mut ts = String::new();
        let _ = tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut ts));
        let mut fields = Fields::default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(f)) = span.extensions().get::<SpanFields>() {
                    for (k, v) in &f.0 {
                        fields.set(k, v.clone());
                    }
                }
            }
        }
        event.record(&mut fields);
        // Lines from crates that use `log` carry their target as a field.
        let mut target = event.metadata().target().to_string();
        let mut out = Vec::with_capacity(256);
        // serde_json's map sorts its keys: write the object by hand, in
        // order, each key and value serialized by serde_json.
        out.push(b'{');
        let put = |k: &str, v: &serde_json::Value, out: &mut Vec<u8>| {
            if out.len() > 1 {
                out.push(b',');
            }
            let _ = serde_json::to_writer(&mut *out, k);
            out.push(b':');
            let _ = serde_json::to_writer(&mut *out, v);
        };
        put("ts", &ts.into(), &mut out);
        put("level", &event.metadata().level().as_str().into(), &mut out);
        if let Some((_, v)) = fields.0.iter().find(|(k, _)| *k == "event") {
            put("event", v, &mut out);
        }
        for (k, v) in &fields.0 {
            match *k {
                "event" | "ts" | "level" | "target" => {}
                "log.target" => {
                    if let Some(t) = v.as_str() {
                        target = t.to_string();
                    }
                }
                "log.module_path" | "log.file" | "log.line" => {}
                _ => put(k, v, &mut out),
            }
        }
        put("target", &target.into(), &mut out);
        out.extend_from_slice(b"}\n");
        let _ = std::io::stderr().lock().write_all(&out);
    }
}

/// A TCP peer, for a line's `remote` field.
type Remote = Option<SocketAddr>;

fn remote_str(r: Remote) -> Option<tracing::field::DisplayValue<SocketAddr>> {
    r.map(tracing::field::display)
}

/// `conn.open`: a WebSocket connection was attached. `devices`: the user's
/// connections on this node, this one included.
pub(crate) fn conn_open(node: &str, conn: &str, user: &str, remote: Remote, devices: u32) {
    tracing::info!(
        target: "herald::ws",
        parent: None,
        event = "conn.open",
        node,
        conn,
        user,
        remote = remote_str(remote),
        devices,
        "connection opened"
    );
}

/// Who ended a connection: the node (it sent the close frame), the client
/// (it sent one), or neither (the socket ended without one: code 1006).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClosedBy {
    Server,
    Client,
    Lost,
}

impl ClosedBy {
    fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Server => "server",
            ClosedBy::Client => "client",
            ClosedBy::Lost => "lost",
        }
    }
}

/// What `conn.close` says of one connection.
pub(crate) struct Closed<'a> {
    pub node: &'a str,
    pub conn: &'a str,
    pub user: &'a str,
    pub remote: Remote,
    /// The user's connections left on this node.
    pub devices: u32,
    pub code: u16,
    pub reason: &'a str,
    pub by: ClosedBy,
    pub duration: Duration,
}

/// `conn.close`: a WebSocket connection ended.
pub(crate) fn conn_close(c: &Closed<'_>) {
    tracing::info!(
        target: "herald::ws",
        parent: None,
        event = "conn.close",
        node = c.node,
        conn = c.conn,
        user = c.user,
        remote = remote_str(c.remote),
        devices = c.devices,
        code = c.code,
        reason = c.reason,
        by = c.by.as_str(),
        duration_ms = c.duration.as_millis() as u64,
        "connection closed"
    );
}

/// What `handshake.refused` says of one refused WebSocket handshake.
pub(crate) struct Refused<'a> {
    pub node: &'a str,
    /// Why, as a stable word (`origin`, `token_expired`, `per_user_cap`, ...).
    pub reason: &'static str,
    pub remote: Remote,
    /// The HTTP status of a refusal before the upgrade.
    pub status: Option<u16>,
    /// The close code of a refusal right after the upgrade.
    pub code: Option<u16>,
    /// The user, once a token named one.
    pub user: Option<&'a str>,
    /// The refused `Origin`.
    pub origin: Option<&'a str>,
    /// What the client was told (never a token).
    pub detail: &'a str,
}

/// `handshake.refused` (rate-limited per reason, see [`admit`]); at WARN
/// when the node itself is at fault (`backend_unavailable`).
pub(crate) fn handshake_refused(r: &Refused<'_>) {
    const EVENT: &str = "handshake.refused";
    if !admit(EVENT, r.reason) {
        return;
    }
    macro_rules! line {
        ($lvl:ident) => {
            tracing::$lvl!(
                target: "herald::ws",
                parent: None,
                event = EVENT,
                node = r.node,
                reason = r.reason,
                remote = remote_str(r.remote),
                status = r.status,
                code = r.code,
                user = r.user,
                origin = r.origin,
                detail = r.detail,
                "WebSocket handshake refused"
            )
        };
    }
    if r.reason == "backend_unavailable" {
        line!(warn)
    } else {
        line!(info)
    }
}

/// `rpc.refused`: a gRPC call the node did not run (rate-limited per
/// reason). `key` is the configured name of the caller's key, `none` (no
/// key sent) or `unknown` (not identified); never the key.
pub(crate) fn rpc_refused(
    node: &str,
    method: &str,
    key: &str,
    code: &str,
    reason: &'static str,
    remote: Remote,
) {
    const EVENT: &str = "rpc.refused";
    if !admit(EVENT, reason) {
        return;
    }
    tracing::info!(
        target: "herald::grpc",
        parent: None,
        event = EVENT,
        node,
        method,
        key,
        code,
        reason,
        remote = remote_str(remote),
        "gRPC call refused"
    );
}

/// `conn.limit`: a listener holds as many connections as it may; new ones
/// wait in the kernel's backlog (rate-limited per listener).
pub(crate) fn conn_limit(listener: &'static str, setting: &'static str) {
    const EVENT: &str = "conn.limit";
    if !admit(EVENT, listener) {
        return;
    }
    tracing::warn!(
        parent: None,
        event = EVENT,
        listener,
        setting,
        "connection limit reached: new connections wait until one closes"
    );
}

/// Lines of one kind and reason written per [`WINDOW`]; more are counted
/// and reported in one `log.suppressed` line.
pub const BURST: u32 = 5;
/// The window of [`BURST`].
pub const WINDOW: Duration = Duration::from_secs(10);

struct Slot {
    event: &'static str,
    reason: &'static str,
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// One slot per (event, reason): both are static words, so the list stays
/// short whatever clients send.
static SLOTS: Mutex<Vec<Slot>> = Mutex::new(Vec::new());

fn suppressed_line(event: &'static str, reason: &'static str, n: u64, over: Duration) {
    tracing::warn!(
        parent: None,
        event = "log.suppressed",
        of = event,
        reason,
        suppressed = n,
        seconds = over.as_secs(),
        "identical lines suppressed"
    );
}

/// Whether a line of `event` for `reason` may be written now: the first
/// [`BURST`] of each [`WINDOW`] are; the rest are counted, and reported by
/// the next admitted line's window turn or by [`flush_suppressed`].
pub(crate) fn admit(event: &'static str, reason: &'static str) -> bool {
    let now = Instant::now();
    let mut report = None;
    let admitted = {
        let mut slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        let i = match slots
            .iter()
            .position(|s| s.event == event && s.reason == reason)
        {
            Some(i) => i,
            None => {
                slots.push(Slot {
                    event,
                    reason,
                    start: now,
                    logged: 0,
                    suppressed: 0,
                });
                slots.len() - 1
            }
        };
        let s = &mut slots[i];
        if now.duration_since(s.start) >= WINDOW {
            if s.suppressed > 0 {
                report = Some((s.suppressed, now.duration_since(s.start)));
            }
            s.start = now;
            s.logged = 0;
            s.suppressed = 0;
        }
        if s.logged < BURST {
            s.logged += 1;
            true
        } else {
            s.suppressed += 1;
            false
        }
    };
    if let Some((n, over)) = report {
        suppressed_line(event, reason, n, over);
    }
    admitted
}

/// Reports what was suppressed in windows that are over (with `all`:
/// in every window, as at shutdown).
pub(crate) fn flush_suppressed(all: bool) {
    let now = Instant::now();
    let due: Vec<_> = {
        let mut slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter_mut()
            .filter(|s| s.suppressed > 0 && (all || now.duration_since(s.start) >= WINDOW))
            .map(|s| {
                let r = (s.event, s.reason, s.suppressed, now.duration_since(s.start));
                s.start = now;
                s.logged = 0;
                s.suppressed = 0;
                r
            })
            .collect()
    };
    for (event, reason, n, over) in due {
        suppressed_line(event, reason, n, over);
    }
}

/// Reports suppressed lines within a second of their window's end, for as
/// long as the node runs.
pub(crate) async fn report_suppressed() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush_suppressed(false);
    }
}

/// A URL fit for a log line: user name and password replaced by `***`, the
/// query (which may carry a password) too.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, _)) => (b, "?***"),
        None => (url, ""),
    };
    let (scheme, rest) = match base.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), base),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}***@{}{query}", &rest[at + 1..]),
        None => format!("{scheme}{rest}{query}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_lose_their_credentials() {
        for (url, want) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            (
                "redis://:hunter2@10.0.0.1:6379/0",
                "redis://***@10.0.0.1:6379/0",
            ),
            ("redis://user:p@ss/w@rd@host:1/2", "redis://***@host:1/2"),
            (
                "redis+cluster://u:hunter2@a:1,b:2",
                "redis+cluster://***@a:1,b:2",
            ),
            (
                "redis+unix:///run/redis.sock?db=1&pass=hunter2",
                "redis+unix:///run/redis.sock?***",
            ),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn the_filter_keeps_frame_tracing_quiet_unless_named() {
        use tracing::metadata::LevelFilter;
        let (f, bad) = filter(LogLevel::Debug, None);
        assert!(bad.is_empty());
        assert_eq!(f.max_level_hint(), Some(LevelFilter::DEBUG));
        let text = f.to_string();
        assert!(
            text.contains("h2=warn") && text.contains("tonic=warn"),
            "{text}"
        );
        let (f, _) = filter(LogLevel::Error, None);
        assert!(f.to_string().contains("h2=error"), "{f}");
        let (f, bad) = filter(LogLevel::Info, Some("h2=debug,herald::ws=trace,[[x"));
        let text = f.to_string();
        assert!(
            text.contains("h2=debug") && !text.contains("h2=warn"),
            "{text}"
        );
        assert!(text.contains("herald::ws=trace"), "{text}");
        assert_eq!(bad, vec!["[[x".to_string()]);
        let (f, _) = filter(LogLevel::Info, Some("debug"));
        assert_eq!(f.max_level_hint(), Some(LevelFilter::DEBUG));
    }

    /// `--log-format` and `--log-level` come from a flag, the environment
    /// or the config file, like every setting.
    #[test]
    fn the_log_settings_are_flags_variables_and_file_keys() {
        use crate::config::{Cli, Command};
        let serve = |argv: &[&str]| match Cli::load_from(["herald", "serve"].iter().chain(argv))
            .unwrap()
            .command
        {
            Command::Serve(a) => (a.log_format, a.log_level),
            _ => unreachable!(),
        };
        assert_eq!(
            serve(&["--log-format", "json", "--log-level", "debug"]),
            (LogFormat::Json, LogLevel::Debug)
        );
        let path = std::env::temp_dir().join(format!(
            "herald-log-config-{:08x}.toml",
            rand::random::<u32>()
        ));
        std::fs::write(&path, "log_format = \"json\"\nlog_level = \"warn\"\n").unwrap();
        let from_file = serve(&["--config", path.to_str().unwrap()]);
        let overridden = serve(&["--config", path.to_str().unwrap(), "--log-level", "trace"]);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(from_file, (LogFormat::Json, LogLevel::Warn));
        assert_eq!(overridden, (LogFormat::Json, LogLevel::Trace));
        use clap::Args;
        let env = crate::config::ServeArgs::augment_args(clap::Command::new("serve"));
        for (id, var) in [
            ("log_format", "HERALD_LOG_FORMAT"),
            ("log_level", "HERALD_LOG_LEVEL"),
        ] {
            let arg = env.get_arguments().find(|a| a.get_id() == id).unwrap();
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(var));
        }
    }

    #[test]
    fn repeated_refusals_are_rate_limited() {
        let admitted = (0..3 * BURST)
            .filter(|_| admit("test.event", "flood"))
            .count();
        assert_eq!(admitted, BURST as usize);
        assert!(
            admit("test.event", "other"),
            "another reason has its own budget"
        );
        let left = SLOTS
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.event == "test.event" && s.reason == "flood")
            .map(|s| s.suppressed);
        assert_eq!(left, Some(2 * BURST as u64));
        flush_suppressed(true);
        assert!(
            admit("test.event", "flood"),
            "a new window after the report"
        );
    }
}
