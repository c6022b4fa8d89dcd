//! The human-readable summary printed at the end of a run.

use crate::fleet::Tally;
use crate::stats::{fmt_ms, Latency};
use crate::unicast::Step;
use serde_json::Value;

/// The human-readable summary.
pub fn print_human(r: &Value) {
    let c = &r["connect"];
    println!(
        "herald-bench {} against {} ({} node(s)){}",
        r["scenario"].as_str().unwrap_or("?"),
        r["target"].as_str().unwrap_or("?"),
        r["nodes"],
        r["label"]
            .as_str()
            .map_or(String::new(), |l| format!(" [{l}]"))
    );
    println!(
        "  connections: {}/{} in {:.2}s ({:.0}/s), {} failed",
        c["connected"],
        c["requested"],
        c["secs"].as_f64().unwrap_or(0.0),
        c["per_s"].as_f64().unwrap_or(0.0),
        c["failed"]
    );
    if let Some(steps) = r["steps"].as_array() {
        for s in steps {
            if s.get("queries").is_some() {
                println!(
                    "  control {}: {:.0} queries/s, latency p50 {} p99 {} max {}, errors {}",
                    s["offered_per_s"]
                        .as_f64()
                        .map_or("max".into(), |x| format!("{x:.0}/s")),
                    s["queries_per_s"].as_f64().unwrap_or(0.0),
                    fmt_ms(s["latency"]["p50_ms"].as_f64().unwrap_or(0.0)),
                    fmt_ms(s["latency"]["p99_ms"].as_f64().unwrap_or(0.0)),
                    fmt_ms(s["latency"]["max_ms"].as_f64().unwrap_or(0.0)),
                    s["errors"]
                );
            } else if let Ok(step) = serde_json::from_value::<StepView>(s.clone()) {
                println!("{}", step.line());
            }
        }
    }
    if let Some(steps) = r.get("sequential").and_then(|s| s.as_array()) {
        for s in steps {
            let ms = |k: &str, q: &str| fmt_ms(s[k][q].as_f64().unwrap_or(0.0));
            println!(
                "  sequential x{}: {:.0} calls/s, per call p50 {} p99 {}, delivery p50 {} p99 {}, lost {} dup {} err {}{}",
                s["callers"],
                s["calls_per_s"].as_f64().unwrap_or(0.0),
                ms("call_latency", "p50_ms"),
                ms("call_latency", "p99_ms"),
                ms("delivery_latency", "p50_ms"),
                ms("delivery_latency", "p99_ms"),
                s["lost"],
                s["duplicates"],
                s["call_errors"],
                s["cpu_us_per_call"]
                    .as_f64()
                    .map_or(String::new(), |c| format!(", {c:.1} server-CPU-µs/call")),
            );
        }
    }
    if let Some(m) = r.get("max_sustained").filter(|m| !m.is_null()) {
        println!(
            "  max sustained (p99 <= {}, nothing lost): {:.0} deliveries/s offered, {:.0} delivered/s, p50 {} p99 {}",
            fmt_ms(r["slo_p99_ms"].as_f64().unwrap_or(0.0)),
            m["offered_per_s"].as_f64().unwrap_or(0.0),
            m["delivered_per_s"].as_f64().unwrap_or(0.0),
            fmt_ms(m["p50_ms"].as_f64().unwrap_or(0.0)),
            fmt_ms(m["p99_ms"].as_f64().unwrap_or(0.0)),
        );
    } else if r.get("max_sustained").is_some() {
        println!("  max sustained: no step met the objective");
    }
    if let Some(s) = r.get("single") {
        println!(
            "  one broadcast to all: median {} max {} ({} broadcasts, {} incomplete)",
            fmt_ms(s["time_to_all_median_ms"].as_f64().unwrap_or(0.0)),
            fmt_ms(s["time_to_all_max_ms"].as_f64().unwrap_or(0.0)),
            s["broadcasts"],
            s["incomplete"]
        );
    }
    if let Some(s) = r.get("sustained") {
        println!(
            "  sustained broadcast: {:.0} deliveries/s ({:.1} broadcasts/s, {} pending at most), latency p50 {} p99 {} max {}, lost {} dup {}{}",
            s["deliveries_per_s"].as_f64().unwrap_or(0.0),
            s["broadcasts_per_s"].as_f64().unwrap_or(0.0),
            s["in_flight"],
            fmt_ms(s["latency"]["p50_ms"].as_f64().unwrap_or(0.0)),
            fmt_ms(s["latency"]["p99_ms"].as_f64().unwrap_or(0.0)),
            fmt_ms(s["latency"]["max_ms"].as_f64().unwrap_or(0.0)),
            s["tally"]["lost"],
            s["tally"]["duplicates"],
            s["cpu_us_per_delivery"].as_f64().map_or(String::new(), |c| format!(", {c:.2} server-CPU-µs/delivery")),
        );
    }
    if let Some(i) = r.get("idle") {
        println!(
            "  idle: {} connected, {} after {}s hold; RSS per connection: {}",
            i["connected"],
            i["still_connected_after_hold"],
            i["hold_s"],
            i["bytes_per_connection"]
                .as_f64()
                .map_or("n/a".into(), |b| format!(
                    "{b:.0} bytes ({:.2} KiB)",
                    b / 1024.0
                ))
        );
        if let Some(ps) = i["processes"].as_array() {
            for p in ps {
                if let Some(b) = p["bytes_per_connection"].as_f64() {
                    println!(
                        "    {}: {:.0} bytes/connection",
                        p["process"].as_str().unwrap_or("?"),
                        b
                    );
                }
            }
        }
    }
    if let Some(p) = r["problems"].as_array().filter(|p| !p.is_empty()) {
        println!("  problems:");
        for x in p {
            println!("    - {}", x.as_str().unwrap_or(""));
        }
        if let Some(e) = r["client_errors"].as_array().filter(|e| !e.is_empty()) {
            println!("  first client errors:");
            for x in e.iter().take(5) {
                println!("    - {}", x.as_str().unwrap_or(""));
            }
        }
    } else {
        println!("  ok: no errors, nothing lost or duplicated");
    }
}

/// The fields of a step the summary prints.
#[derive(serde::Deserialize)]
struct StepView {
    phase: String,
    offered_per_s: Option<f64>,
    delivered_per_s: f64,
    latency: Latency,
    lost: u64,
    duplicates: u64,
    call_errors: u64,
    cpu_us_per_delivery: Option<f64>,
    ok: bool,
    why_not: Vec<String>,
}

impl StepView {
    fn line(self) -> String {
        let s = Step {
            phase: self.phase,
            offered_per_s: self.offered_per_s,
            delivered_per_s: self.delivered_per_s,
            latency: self.latency,
            tally: Tally {
                lost: self.lost,
                duplicates: self.duplicates,
                ..Default::default()
            },
            call_errors: self.call_errors,
            cpu_us_per_delivery: self.cpu_us_per_delivery,
            ok: self.ok,
            why_not: self.why_not,
            ..Default::default()
        };
        s.line()
    }
}
