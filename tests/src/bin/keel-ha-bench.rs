//! `keel-ha-bench`: the HA backends side by side, in one run (issue 17's figures).
//!
//! ```sh
//! cargo build -p keel && cargo run -p keel-tests --bin keel-ha-bench -- [--writes 1000] [--kills 5] [--failovers 3]
//! ```
//!
//! On one machine, against a fresh etcd of 3 members and a fresh Raft store of 3 `keel ha-member`
//! processes (both on loopback, both fsyncing to the same disk), it measures and prints:
//! - **fenced write latency**: a leader's `put` of a 200-byte value (the size of a checkpoint
//!   pointer), one after the other, `--writes` of them: p50, p99 and max;
//! - **the store's own election**: kill -9 of the member leading the store (etcd's raft leader,
//!   the Raft group's leader) until another member says it leads, `--kills` times;
//! - **JobManager failover**: kill -9 of the JobManager leader of a cluster (a ResourceManager, two
//!   JobManagers, a TaskManager, a datagen job checkpointing every 300 ms) until the job runs again
//!   under the new leader (its tasks adopted), `--failovers` times; the lease TTL is 3 s on both.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use keel_ha::{HaServices, Role};
use keel_tests::{datagen_to_file_spec, wait_until, Backend, EtcdCluster, RaftCluster, Sandbox};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: keel-ha-bench [--writes N] [--kills N] [--failovers N]";
const LONG: Duration = Duration::from_secs(60);

struct Args {
    writes: usize,
    kills: usize,
    failovers: usize,
}

fn parse() -> Result<Args, String> {
    let mut args = Args { writes: 1000, kills: 5, failovers: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Result<usize, String> {
            let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            v.parse().map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--writes" => args.writes = value()?,
            "--kills" => args.kills = value()?,
            "--failovers" => args.failovers = value()?,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(args)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "p50 {}, p99 {}, max {} ({} samples)",
        ms(percentile(&v, 50.0)),
        ms(percentile(&v, 99.0)),
        ms(v.last().copied().unwrap_or_default()),
        v.len()
    )
}

fn temp_dir(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("keel-ha-bench-{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Fenced writes of one leader, one after the other.
async fn fenced_writes(ha: Arc<dyn HaServices>, n: usize) -> anyhow::Result<Vec<Duration>> {
    let never = CancellationToken::new();
    let leadership = ha.campaign(Role::JobManager, "bench:1", &never).await?;
    let value = vec![b'x'; 200];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        ha.put(&leadership, &format!("checkpoints/bench-{}", i % 10), value.clone()).await?;
        out.push(start.elapsed());
    }
    ha.resign(&leadership).await?;
    Ok(out)
}

/// The etcd member that leads etcd's raft group now (index), from `etcdctl endpoint status`.
fn etcd_leader(etcd: &EtcdCluster) -> anyhow::Result<Option<usize>> {
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(|e| format!("http://{e}")).collect();
    let live: Vec<String> = endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| etcd.members[*i].is_some())
        .map(|(_, e)| e.clone())
        .collect();
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &live.join(","), "--command-timeout=1s", "endpoint", "status", "-w", "json"])
        .output()?;
    let parsed: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(_) => return Ok(None),
    };
    for entry in parsed.as_array().into_iter().flatten() {
        let status = &entry["Status"];
        if status["leader"].as_u64().is_some() && status["leader"] == status["header"]["member_id"] {
            let endpoint = entry["Endpoint"].as_str().unwrap_or_default();
            return Ok(endpoints.iter().position(|e| e == endpoint));
        }
    }
    Ok(None)
}

fn etcd_elections(dir: &std::path::Path, kills: usize) -> anyhow::Result<Vec<Duration>> {
    let mut etcd = EtcdCluster::start(dir, 3)?;
    let mut out = Vec::new();
    for _ in 0..kills {
        let leader = wait_until("an etcd leader", LONG, || etcd_leader(&etcd))?;
        let start = Instant::now();
        etcd.kill(leader);
        wait_until("a new etcd leader", LONG, || Ok(etcd_leader(&etcd)?.filter(|&l| l != leader)))?;
        out.push(start.elapsed());
        etcd.restart(leader)?;
        etcd.wait_healthy(LONG)?;
    }
    Ok(out)
}

fn raft_elections(dir: &std::path::Path, kills: usize) -> anyhow::Result<Vec<Duration>> {
    let mut raft = RaftCluster::start(dir, 3)?;
    let mut out = Vec::new();
    for _ in 0..kills {
        let leader = raft.wait_for_leader(LONG)?;
        let start = Instant::now();
        raft.kill(leader);
        let next = raft.wait_for_leader(LONG)?;
        if next == leader {
            bail!("the killed member still leads");
        }
        out.push(start.elapsed());
        raft.restart(leader)?;
        // Back in the group: it follows the new leader.
        wait_until("the restarted member to follow", LONG, || {
            Ok(raft.status(leader).ok().filter(|s| s.raft_leader != 0).map(|_| ()))
        })?;
    }
    Ok(out)
}

/// Kill -9 of the JobManager leader until the job runs again under the new one.
fn jobmanager_failovers(backend: Backend, n: usize) -> anyhow::Result<Vec<Duration>> {
    let key = backend.lease_ttl_key().ok_or_else(|| anyhow!("no lease on {}", backend.name()))?;
    let mut sb = Sandbox::on(backend, "ha-bench", &[(key, "3 s")])?;
    sb.start("resourcemanager", "rm", &[])?;
    for i in 0..=n {
        sb.start("jobmanager", &format!("jm-{i}"), &[])?;
    }
    sb.start("taskmanager", "tm", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let spec = format!(
        "{}config:\n  execution.checkpointing.interval: 300 ms\n",
        datagen_to_file_spec("bench", 1, 100, None, &sb.dir.join("out"))
    );
    sb.run_spec("job", &spec, &[])?;
    let mut out = Vec::new();
    for _ in 0..n {
        let cluster = wait_until("the job to run", LONG, || {
            let s = sb.status("bench")?;
            Ok((s["job"]["state"] == "running").then_some(()))
        })
        .and_then(|_| sb.cluster())?;
        let epoch = cluster["jobmanager"]["epoch"].as_u64().unwrap_or(0);
        let leader = cluster["jobmanager"]["leader"].as_str().unwrap_or_default().to_string();
        let proc = sb.by_address(&leader).ok_or_else(|| anyhow!("leader {leader} is not ours"))?;
        let start = Instant::now();
        proc.proc.kill9();
        wait_until("the job to run under a new leader", LONG, || {
            let Ok(c) = sb.cluster() else { return Ok(None) };
            if c["jobmanager"]["epoch"].as_u64().unwrap_or(0) <= epoch {
                return Ok(None);
            }
            let Ok(s) = sb.status("bench") else { return Ok(None) };
            Ok((s["job"]["state"] == "running").then_some(()))
        })?;
        out.push(start.elapsed());
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    let mut report = Vec::new();

    // Fenced writes.
    let etcd_dir = temp_dir("etcd")?;
    let etcd = EtcdCluster::start(&etcd_dir, 3)?;
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(String::from).collect();
    let etcd_writes = rt.block_on(async {
        let ha =
            keel_ha::etcd::EtcdHaServices::connect(&endpoints, "bench", Duration::from_secs(3), LONG).await?;
        fenced_writes(Arc::new(ha), args.writes).await
    })?;
    drop(etcd);
    let raft_dir = temp_dir("raft")?;
    let raft = RaftCluster::start(&raft_dir, 3)?;
    let members: Vec<String> = (0..3).map(|i| raft.address(i)).collect();
    let raft_writes = rt.block_on(async {
        let ha =
            keel_ha::raft::RaftHaServices::connect(&members, "bench", Duration::from_secs(3), LONG).await?;
        fenced_writes(Arc::new(ha), args.writes).await
    })?;
    drop(raft);
    report.push(format!("fenced write, etcd: {}", summary(etcd_writes)));
    report.push(format!("fenced write, raft: {}", summary(raft_writes)));
    println!("{}", report.join("\n"));

    // The store's own election.
    let e = etcd_elections(&temp_dir("etcd-kill")?, args.kills).context("etcd elections")?;
    report.push(format!("store leader kill -9 -> new store leader, etcd: {}", summary(e)));
    let r = raft_elections(&temp_dir("raft-kill")?, args.kills).context("raft elections")?;
    report.push(format!("store leader kill -9 -> new store leader, raft: {}", summary(r)));
    println!("{}", report[report.len() - 2..].join("\n"));

    // JobManager failover.
    for backend in [Backend::Etcd, Backend::Raft] {
        let f = jobmanager_failovers(backend, args.failovers)
            .with_context(|| format!("failover on {}", backend.name()))?;
        report.push(format!(
            "JobManager leader kill -9 -> job running under the new leader, {}: {}",
            backend.name(),
            summary(f)
        ));
        println!("{}", report[report.len() - 1]);
    }
    println!("\n== keel-ha-bench ==\n{}", report.join("\n"));
    for dir in ["etcd", "raft", "etcd-kill", "raft-kill"] {
        let _ = std::fs::remove_dir_all(temp_dir(dir)?);
    }
    Ok(())
}
