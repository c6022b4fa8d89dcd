//! Capacity figures of Herald on Redis (README "Capacity"): what one shard
//! of a Redis Cluster spends per stored message, inbox, connected user and
//! node, and per operation. Ignored in the normal suite (it measures, it
//! does not check); `bash bench/capacity.sh` runs it:
//!
//! ```sh
//! cargo test --release --test capacity -- --ignored --nocapture
//! ```
//!
//! It starts one `redis-server` as a one-shard Redis Cluster (every slot on
//! it, so each figure is what a shard spends on its share of users), a
//! Herald node in cluster mode on it, and drives each operation in turn,
//! reading `INFO memory` (`used_memory`), `INFO commandstats` (commands
//! Redis ran, those inside scripts included) and `INFO cpu` (the Redis
//! process's CPU time) before and after.
mod common;

use common::*;
use herald::proto::*;
use std::collections::HashMap;
use std::time::Duration;

/// A one-shard Redis Cluster on a free port (killed on drop).
struct Shard {
    port: u16,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Shard {
    fn start() -> Shard {
        let port = free_cluster_port();
        let dir =
            std::env::temp_dir().join(format!("herald-capacity-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let s = Shard { port, child, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while RedisCluster::cli_at(port, &["PING"]).trim() != "PONG" {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisCluster::cli_at(port, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        while !RedisCluster::cli_at(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(
                std::time::Instant::now() < deadline,
                "one-shard cluster not ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{}", self.port)
    }

    fn info(&self, section: &str) -> HashMap<String, String> {
        RedisCluster::cli_at(self.port, &["INFO", section])
            .lines()
            .filter_map(|l| l.trim().split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// What the counters read now.
    fn sample(&self) -> Sample {
        let mem = self.info("memory")["used_memory"].parse().unwrap();
        let cpu = self.info("cpu");
        let secs = |k: &str| cpu[k].parse::<f64>().unwrap();
        let mut commands = 0u64;
        let mut by_cmd = HashMap::new();
        for (k, v) in self.info("commandstats") {
            if let Some(name) = k.strip_prefix("cmdstat_") {
                let calls: u64 = v
                    .split(',')
                    .find_map(|f| f.strip_prefix("calls="))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                commands += calls;
                by_cmd.insert(name.to_string(), calls);
            }
        }
        Sample {
            mem,
            cpu_us: (secs("used_cpu_user") + secs("used_cpu_sys")) * 1e6,
            commands,
            by_cmd,
        }
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Sample {
    mem: i64,
    cpu_us: f64,
    commands: u64,
    by_cmd: HashMap<String, u64>,
}

/// One row of the report: deltas per operation. Returns Redis commands
/// and bytes of Redis memory per operation, for the ceilings the test holds
/// them to.
fn row(what: &str, ops: usize, a: &Sample, b: &Sample, memory: bool) -> (f64, f64) {
    let n = ops as f64;
    let mut cmds: Vec<(String, u64)> = b
        .by_cmd
        .iter()
        .map(|(k, v)| (k.clone(), v - a.by_cmd.get(k).copied().unwrap_or(0)))
        .filter(|(k, v)| *v > 0 && k != "info" && k != "cluster|info")
        .collect();
    cmds.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let top: Vec<String> = cmds
        .iter()
        .take(6)
        .map(|(k, v)| format!("{k} {:.2}", *v as f64 / n))
        .collect();
    let mem = if memory {
        format!("{:.0} B", (b.mem - a.mem) as f64 / n)
    } else {
        "-".into()
    };
    let commands = (b.commands - a.commands) as f64 / n;
    println!(
        "| {what} | {ops} | {mem} | {commands:.1} | {:.1} | {} |",
        (b.cpu_us - a.cpu_us) / n,
        top.join(", ")
    );
    (commands, (b.mem - a.mem) as f64 / n)
}

/// Holds a measured figure to the design's ceiling (README's Capacity
/// table quotes the measured figures; these are what they must stay under).
fn at_most(what: &str, figure: f64, ceiling: f64) {
    assert!(
        figure <= ceiling,
        "{what}: {figure:.2} per operation, over the ceiling of {ceiling}"
    );
}

#[tokio::test]
#[ignore = "measures and holds the figures to ceilings; run by bench/capacity.sh"]
async fn capacity() {
    let shard = Shard::start();
    let node = NodeProcess::start("cap1", &shard.url(), &[]);
    let mut c = node.client().await;
    let payload = format!(r#"{{"title":"Invoice paid","body":"{}"}}"#, "x".repeat(60));
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!();
    println!("| operation | count | Redis memory each | Redis commands each | Redis CPU µs each | commands each (top) |");
    println!("|---|---|---|---|---|---|");

    // A first stored message to each of U users: the inbox (stream + meta)
    // with one message.
    let users: Vec<String> = (0..2000).map(|i| format!("cap-{i:05}")).collect();
    let stored = |c: &mut herald::proto::push_service_client::PushServiceClient<
        tonic::transport::Channel,
    >,
                  batch: Vec<String>,
                  payload: String| {
        let mut c = c.clone();
        async move {
            c.send_to_user(SendToUserRequest {
                user_ids: batch,
                topic: "billing".into(),
                payload_json: payload,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    };
    let a = shard.sample();
    for u in &users {
        stored(&mut c, vec![u.clone()], payload.clone()).await;
    }
    let b = shard.sample();
    row(
        "stored send, first message of an inbox (one user per call)",
        users.len(),
        &a,
        &b,
        true,
    );

    // 100 more messages to each of 200 of them: the marginal stored
    // message. (Redis 7 preallocates a stream node of
    // `stream-node-max-bytes`, 4 KiB, so a new inbox pays for it at once and
    // the next messages fill it: only many messages per inbox show what a
    // message costs on average.)
    let a = shard.sample();
    for _ in 0..100 {
        for u in &users[..200] {
            stored(&mut c, vec![u.clone()], payload.clone()).await;
        }
    }
    let b = shard.sample();
    let (cmds, mem) = row(
        "stored send, one more message (one user per call)",
        200 * 100,
        &a,
        &b,
        true,
    );
    at_most("commands of a stored send", cmds, 5.5);
    at_most("memory of a stored message (bytes)", mem, 400.0);

    // A 100-user call: per recipient.
    let a = shard.sample();
    for chunk in users[200..].chunks(100) {
        stored(&mut c, chunk.to_vec(), payload.clone()).await;
    }
    let b = shard.sample();
    let (cmds, mem) = row(
        "stored send, per recipient of a 100-user call",
        users.len() - 200,
        &a,
        &b,
        false,
    );
    at_most("commands per recipient of a 100-user send", cmds, 5.5);
    let _ = mem;

    // Connected users: each holds one connection.
    let online: Vec<String> = (0..1000).map(|i| format!("on-{i:05}")).collect();
    let a = shard.sample();
    let mut held = Vec::with_capacity(online.len());
    for u in &online {
        held.push(node.connect(u).await.0);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = shard.sample();
    row(
        "connect (user's first connection; memory: per connected user)",
        online.len(),
        &a,
        &b,
        true,
    );

    // Transient sends to connected users.
    let a = shard.sample();
    for u in &online {
        c.send_to_user(SendToUserRequest {
            user_ids: vec![u.clone()],
            topic: "t".into(),
            payload_json: payload.clone(),
            transient: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let b = shard.sample();
    let (cmds, mem) = row(
        "transient send to a connected user",
        online.len(),
        &a,
        &b,
        false,
    );
    at_most("commands of a transient send", cmds, 1.5);
    let _ = mem;

    // Stored sends to connected users (the publish reaches a subscriber).
    let a = shard.sample();
    for u in &online {
        stored(&mut c, vec![u.clone()], payload.clone()).await;
    }
    let b = shard.sample();
    row(
        "stored send to a connected user",
        online.len(),
        &a,
        &b,
        false,
    );

    // IsOnline, 100 users per call.
    let a = shard.sample();
    for chunk in online.chunks(100) {
        c.is_online(IsOnlineRequest {
            user_ids: chunk.to_vec(),
        })
        .await
        .unwrap();
    }
    let b = shard.sample();
    row(
        "IsOnline, per user asked (100 per call)",
        online.len(),
        &a,
        &b,
        false,
    );

    // Broadcasts.
    let a = shard.sample();
    for _ in 0..200 {
        c.broadcast(BroadcastRequest {
            topic: "all".into(),
            payload_json: payload.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let b = shard.sample();
    let (cmds, mem) = row(
        "broadcast (one publish, whatever the audience)",
        200,
        &a,
        &b,
        false,
    );
    at_most("commands of a broadcast", cmds, 1.5);
    let _ = mem;

    // Disconnects.
    let a = shard.sample();
    let n = held.len();
    drop(held);
    eventually("every connection gone", || {
        let mut c = c.clone();
        let users = online[..100].to_vec();
        async move {
            c.is_online(IsOnlineRequest { user_ids: users })
                .await
                .unwrap()
                .into_inner()
                .users
                .iter()
                .all(|u| u.connections == 0)
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = shard.sample();
    row("disconnect (user's last connection)", n, &a, &b, true);

    // Connect + disconnect cycles of one user.
    let a = shard.sample();
    for _ in 0..300 {
        let (ws, _) = node.connect("cycler").await;
        drop(ws);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = shard.sample();
    let (cmds, _) = row("connect + disconnect cycle", 300, &a, &b, false);
    at_most("commands of a connect + disconnect cycle", cmds, 32.0);

    // A node: lease, boot, stats, presence hash (idle, one renewal).
    let a = shard.sample();
    let extra = NodeProcess::start("cap2", &shard.url(), &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = shard.sample();
    row(
        "a Herald node joining (its own keys; memory: per node)",
        1,
        &a,
        &b,
        true,
    );
    drop(extra);
}
