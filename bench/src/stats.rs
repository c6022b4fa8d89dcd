//! Measurement helpers: the bench clock, sharded latency histograms, process
//! CPU and memory readings from /proc, and the random number generator of a task.

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::Serialize;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Nanoseconds since the bench started (monotonic). Every timestamp the
/// bench puts in a payload and every receive time come from this one clock,
/// in this one process, so latencies need no clock synchronisation.
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// CLOCK_MONOTONIC in ns: one clock for every process of the machine
/// (what `Instant` and Node's `process.hrtime` read), so times taken by
/// several bench processes can be compared.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A time of the bench clock ([`now_ns`]) on the machine's monotonic clock
/// ([`monotonic_ns`]). Both count from the same boot, so the offset read
/// once holds for the whole run.
pub fn to_monotonic(bench_ns: u64) -> u64 {
    static OFFSET: OnceLock<u64> = OnceLock::new();
    let offset = *OFFSET.get_or_init(|| monotonic_ns().saturating_sub(now_ns()));
    bench_ns + offset
}

/// Highest latency a histogram records (longer ones are clamped).
const MAX_US: u64 = 3_600_000_000;

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static bounds are valid")
}

/// Latency histograms in microseconds, sharded so that thousands of receiving
/// tasks rarely contend on one lock.
pub struct Hists {
    shards: Box<[Mutex<Histogram<u64>>]>,
}

impl Hists {
    pub fn new(shards: usize) -> Self {
        Hists {
            shards: (0..shards.max(1)).map(|_| Mutex::new(new_hist())).collect(),
        }
    }

    /// Records one latency in nanoseconds into shard `key % shards`.
    pub fn record(&self, key: usize, latency_ns: u64) {
        let us = (latency_ns / 1000).clamp(1, MAX_US);
        let mut h = self.shards[key % self.shards.len()].lock().unwrap();
        let _ = h.record(us);
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_hist();
        for s in self.shards.iter() {
            let _ = all.add(&*s.lock().unwrap());
        }
        all
    }

    pub fn reset(&self) {
        for s in self.shards.iter() {
            s.lock().unwrap().reset();
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }

    pub fn line(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {}",
            fmt_ms(self.p50_ms),
            fmt_ms(self.p90_ms),
            fmt_ms(self.p99_ms),
            fmt_ms(self.p999_ms),
            fmt_ms(self.max_ms)
        )
    }
}

pub fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.2}ms")
    }
}

/// A small, fast, non-cryptographic generator for one task, seeded from the
/// thread-local generator.
pub fn small_rng() -> SmallRng {
    SmallRng::from_rng(&mut rand::rng())
}

/// A process the bench watches: CPU time and resident memory.
#[derive(Clone, Debug)]
pub struct Watched {
    pub label: String,
    pub pid: u32,
}

impl Watched {
    /// `label=pid` or a bare pid (labelled `pid<N>`).
    pub fn parse(s: &str) -> Result<Watched, String> {
        let (label, pid) = match s.split_once('=') {
            Some((l, p)) => (l.to_string(), p),
            None => (format!("pid{s}"), s),
        };
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| format!("--pid {s:?}: expected PID or LABEL=PID"))?;
        Ok(Watched { label, pid })
    }
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime + stime of a process, in microseconds.
pub fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ... utime is field 14 of the full line, i.e.
    // index 11 here, stime index 12.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 1_000_000 / clock_ticks_per_s())
}

/// CPU time of this process (the bench itself), in microseconds.
pub fn self_cpu_us() -> u64 {
    cpu_us(std::process::id()).unwrap_or(0)
}

/// Resident set size of a process, in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU readings of the watched processes at one instant.
pub struct CpuMark {
    at: Instant,
    per_pid: Vec<Option<u64>>,
    bench: u64,
}

/// CPU used between two marks.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuUse {
    /// CPU microseconds per watched process (label -> µs).
    pub per_process_us: Vec<(String, u64)>,
    /// Sum over the watched processes.
    pub total_us: u64,
    /// The bench process's own CPU microseconds.
    pub bench_us: u64,
    /// Wall time between the marks, in microseconds.
    pub wall_us: u64,
}

impl CpuMark {
    pub fn take(watched: &[Watched]) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            per_pid: watched.iter().map(|w| cpu_us(w.pid)).collect(),
            bench: self_cpu_us(),
        }
    }

    pub fn since(&self, watched: &[Watched]) -> CpuUse {
        let now = CpuMark::take(watched);
        let per: Vec<(String, u64)> = watched
            .iter()
            .zip(self.per_pid.iter().zip(now.per_pid.iter()))
            .map(|(w, (a, b))| {
                (
                    w.label.clone(),
                    b.unwrap_or(0).saturating_sub(a.unwrap_or(0)),
                )
            })
            .collect();
        CpuUse {
            total_us: per.iter().map(|(_, v)| v).sum(),
            per_process_us: per,
            bench_us: now.bench.saturating_sub(self.bench),
            wall_us: now.at.duration_since(self.at).as_micros() as u64,
        }
    }
}

/// Raises this process's open-file limit to its hard limit; returns the new
/// soft limit.
pub fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::Resource::NOFILE.get().map(|(soft, _)| soft))
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_read_back() {
        let h = Hists::new(4);
        for i in 1..=1000u64 {
            h.record(i as usize, i * 1_000_000); // 1..1000 ms
        }
        let l = Latency::of(&h.merged());
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 500.0).abs() < 2.0, "{l:?}");
        assert!((l.p99_ms - 990.0).abs() < 5.0, "{l:?}");
        assert!(Watched::parse("redis=42").is_ok() && Watched::parse("x=y").is_err());
        assert!(cpu_us(std::process::id()).is_some() && rss_bytes(std::process::id()).unwrap() > 0);
    }
}

/// What one fixed-rate step's senders did, counted as they go (shared by
/// the tasks of a step, whoever sends: herald-bench's calls or a remote
/// sender's report).
pub(crate) struct StepCounters {
    /// Calls made.
    pub(crate) calls: std::sync::atomic::AtomicU64,
    /// Calls that failed.
    pub(crate) errors: std::sync::atomic::AtomicU64,
    /// Deliveries the receiving clients should see.
    pub(crate) expected: std::sync::atomic::AtomicU64,
}
