//! The outside world failing, HA store half: losing one member of three, and losing the store's
//! quorum, while a `datagen -> file` job checkpointing every 300 ms runs on real processes; on
//! both replicated HA stores, etcd (3 members) and Keel's own raft store (3 `keel ha-member`
//! processes), one test body each.
//! Times are measured and printed, never asserted; properties are checked on observable state
//! (epochs, the job's attempts, what each process answers, the TaskManagers' `/metrics`, the
//! checkpoint metadata files).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use keel_proto::pb;
use keel_proto::pb::job_manager_client::JobManagerClient;
use keel_proto::pb::resource_manager_client::ResourceManagerClient;
use keel_proto::KeelError;
use keel_tests::{
    datagen_to_file_spec, lines_in, metadata_files, metrics_address, metrics_tasks, on_backends, wait_until,
    Backend, Sandbox,
};
use serde_json::Value;
use tokio::runtime::Handle;

const LONG: Duration = Duration::from_secs(120);
const TTL: Duration = Duration::from_secs(6);
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn settings(backend: Backend) -> anyhow::Result<[(&'static str, &'static str); 1]> {
    let key =
        backend.lease_ttl_key().ok_or_else(|| anyhow!("the {} backend has no members", backend.name()))?;
    Ok([(key, "6 s")])
}

/// A `datagen -> file` job of parallelism 2 checkpointing every 300 ms that keeps every
/// checkpoint's metadata.
fn spec(name: &str, out: &Path) -> String {
    format!(
        "{}config:\n  execution.checkpointing.interval: 300 ms\n  state.checkpoints.num-retained: 100000\n",
        datagen_to_file_spec(name, 2, 200, None, out)
    )
}

fn max_attempt(status: &Value) -> u64 {
    status["tasks"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["attempt"].as_u64()).max().unwrap_or(0))
        .unwrap_or(0)
}

fn all_running(status: &Value) -> bool {
    status["job"]["state"] == "running"
        && status["tasks"]
            .as_array()
            .is_some_and(|ts| !ts.is_empty() && ts.iter().all(|t| t["state"] == "running"))
}

/// Completion times (ms) of the checkpoints completed after `since_ms`, in order.
fn completed_since(sb: &Sandbox, job_id: &str, since_ms: u64) -> anyhow::Result<Vec<u64>> {
    let mut times: Vec<u64> = metadata_files(sb, job_id)?
        .into_iter()
        .map(|m| m.completed_at_ms)
        .filter(|t| *t > since_ms)
        .collect();
    times.sort_unstable();
    Ok(times)
}

/// The largest gap between consecutive checkpoint completions within `[from_ms, to_ms]`
/// (including the gap from the last completion before `from_ms`).
fn largest_gap(sb: &Sandbox, job_id: &str, from_ms: u64, to_ms: u64) -> anyhow::Result<u64> {
    let mut times: Vec<u64> =
        metadata_files(sb, job_id)?.into_iter().map(|m| m.completed_at_ms).filter(|t| *t <= to_ms).collect();
    times.sort_unstable();
    let start = times.iter().rposition(|t| *t <= from_ms).unwrap_or(0);
    Ok(times[start..].windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0))
}

async fn bounded<T>(
    address: &str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, KeelError> {
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(status)) => Err(KeelError::from_status(&status, address)),
        Err(_) => Err(KeelError::unavailable(address, "no answer in time")),
    }
}

/// Whether the JobManager at `address` says it leads (`LeaderInfo`, answered without etcd).
fn jm_leads(rt: &Handle, address: &str) -> anyhow::Result<bool> {
    rt.block_on(async {
        let mut c = JobManagerClient::new(keel_client::channel(address)?);
        bounded(address, async { c.leader_info(pb::LeaderInfoRequest {}).await.map(|r| r.into_inner()) })
            .await
    })
    .map(|i| i.is_leader)
    .map_err(|e| anyhow!("LeaderInfo from {address}: {e}"))
}

/// Whether the ResourceManager at `address` serves as leader (`ClusterOverview`; a standby
/// refuses with `NotLeader`).
fn rm_leads(rt: &Handle, address: &str) -> anyhow::Result<bool> {
    let r = rt.block_on(async {
        let mut c = ResourceManagerClient::new(keel_client::channel(address)?);
        bounded(address, async {
            c.cluster_overview(pb::ClusterOverviewRequest {}).await.map(|r| r.into_inner())
        })
        .await
    });
    match r {
        Ok(_) => Ok(true),
        Err(KeelError::NotLeader { .. }) => Ok(false),
        Err(e) => Err(anyhow!("ClusterOverview from {address}: {e}")),
    }
}

/// The allocations the TaskManagers report to the ResourceManager at `address`: (slot,
/// job, JobManager epoch that requested it, task in it).
fn allocations(rt: &Handle, address: &str) -> anyhow::Result<Vec<(String, String, u64, String)>> {
    let o = rt
        .block_on(async {
            let mut c = ResourceManagerClient::new(keel_client::channel(address)?);
            bounded(address, async {
                c.cluster_overview(pb::ClusterOverviewRequest {}).await.map(|r| r.into_inner())
            })
            .await
        })
        .map_err(|e| anyhow!("ClusterOverview from {address}: {e}"))?;
    Ok(o.taskmanagers
        .iter()
        .flat_map(|tm| {
            tm.slots.iter().filter_map(move |s| {
                s.allocation.as_ref().map(|a| {
                    (
                        format!("{}/{}", tm.taskmanager_id, s.index),
                        a.job_id.clone(),
                        a.jobmanager_epoch,
                        s.task_id.clone(),
                    )
                })
            })
        })
        .collect())
}

/// The store members' ports (etcd: client ports), in member order.
fn member_ports(sb: &Sandbox) -> anyhow::Result<Vec<u16>> {
    let addresses: Vec<String> = match (&sb.etcd, &sb.raft) {
        (Some(etcd), _) => etcd.endpoints().split(',').map(String::from).collect(),
        (None, Some(raft)) => (0..raft.members.len()).map(|i| raft.address(i)).collect(),
        (None, None) => bail!("the sandbox has no HA store members"),
    };
    addresses
        .iter()
        .map(|e| e.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).ok_or_else(|| anyhow!("address {e}")))
        .collect()
}

/// The index of the member that leads the store (etcd's raft leader from `etcdctl endpoint
/// status`; the raft group's leader from its members' status), if one does.
fn store_leader(sb: &mut Sandbox) -> Option<usize> {
    if let Some(raft) = sb.raft.as_mut() {
        return raft.leader();
    }
    let etcd = sb.etcd.as_ref()?;
    let endpoints = etcd.endpoints();
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(&endpoints)
        .args(["endpoint", "status", "-w", "json"])
        .output()
        .ok()?;
    let all: Value = serde_json::from_slice(&out.stdout).ok()?;
    let leader = all.as_array()?.iter().find_map(|e| {
        let status = &e["Status"];
        (status["header"]["member_id"] == status["leader"])
            .then(|| e["Endpoint"].as_str().map(str::to_string))?
    })?;
    endpoints.split(',').position(|e| leader.ends_with(e))
}

fn kill_member(sb: &mut Sandbox, i: usize) -> anyhow::Result<()> {
    match (sb.etcd.as_mut(), sb.raft.as_mut()) {
        (Some(etcd), _) => etcd.kill(i),
        (None, Some(raft)) => raft.kill(i),
        (None, None) => bail!("the sandbox has no HA store members"),
    }
    Ok(())
}

/// Starts member `i` again and waits until the store serves with it (etcd: healthy; raft: the
/// member follows a leader).
fn restart_member(sb: &mut Sandbox, i: usize) -> anyhow::Result<()> {
    match (sb.etcd.as_mut(), sb.raft.as_mut()) {
        (Some(etcd), _) => {
            etcd.restart(i)?;
            etcd.wait_healthy(Duration::from_secs(60))
        }
        (None, Some(raft)) => {
            raft.restart(i)?;
            wait_until(&format!("raft member {} to follow a leader", i + 1), Duration::from_secs(60), || {
                Ok(raft.status(i).ok().filter(|s| s.raft_leader != 0).map(|_| ()))
            })
        }
        (None, None) => bail!("the sandbox has no HA store members"),
    }
}

/// How many established TCP connections process `pid` has to each store member (by member
/// index), from /proc: the client keeps one per member it has talked to, and its streams
/// (keep-alives, watches) ride on them.
fn member_connections(pid: u32, ports: &[u16]) -> BTreeMap<usize, usize> {
    let mut inodes = BTreeSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "01" || !inodes.contains(cols[9]) {
                continue;
            }
            let port = cols[2].rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if let Some(i) = port.and_then(|p| ports.iter().position(|q| *q == p)) {
                *out.entry(i).or_default() += 1;
            }
        }
    }
    out
}

struct Cluster {
    sb: Sandbox,
    rt: tokio::runtime::Runtime,
    job_id: String,
    out: std::path::PathBuf,
    metrics: Vec<String>,
}

/// 3 store members; one ResourceManager, two JobManagers, one TaskManager with 2 slots; the
/// checkpointing job running with 3 completed checkpoints.
fn start(backend: Backend, test: &str) -> anyhow::Result<Cluster> {
    let mut sb = Sandbox::on(backend, test, &settings(backend)?)?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm-a", &[])?;
    sb.start("jobmanager", "jm-b", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let metrics = vec![metrics_address(&mut sb, "tm-1")?];
    let out = sb.dir.join("out");
    sb.run_spec("job", &spec("steady", &out), &[])?;
    let status = wait_until("3 completed checkpoints", LONG, || {
        let s = sb.status("steady")?;
        let done =
            s["checkpoints"].as_array().map(|cs| cs.iter().filter(|c| c["state"] == "completed").count());
        Ok((done.unwrap_or(0) >= 3).then_some(s))
    })?;
    let job_id = status["job"]["job_id"].as_str().unwrap_or_default().to_string();
    Ok(Cluster { sb, rt: tokio::runtime::Runtime::new()?, job_id, out, metrics })
}

/// Killing one store member of three, each in turn (so the member that the leaders' lease
/// keep-alives and watches are attached to is among them), changes nothing: both leaders keep
/// their epochs (no re-election, not even of the same process), the job keeps its attempt and
/// its restart count, and checkpoints go on completing (at least 5 after each kill, over more
/// than a lease TTL). Prints, per member, how many connections each leader had to it, the time
/// from the kill to the next completed checkpoint, and the largest gap between completions.
fn one_member_down(backend: Backend) -> anyhow::Result<()> {
    let mut c = start(backend, "store-member")?;
    let sb = &mut c.sb;
    let ports = member_ports(sb)?;
    let before = sb.status(&c.job_id)?;
    let attempt = max_attempt(&before);
    let restarts = before["restarts"].clone();
    let cluster = sb.cluster()?;
    let jm_epoch = cluster["jobmanager"]["epoch"].as_u64().unwrap_or(0);
    let rm_epoch = cluster["resourcemanager"]["epoch"].as_u64().unwrap_or(0);
    let jm_leader = cluster["jobmanager"]["leader"].as_str().unwrap_or_default().to_string();
    let jm_pid =
        sb.by_address(&jm_leader).map(|p| p.proc.pid()).ok_or_else(|| anyhow!("no leader {jm_leader}"))?;
    let rm_pid = sb.proc("rm").proc.pid();

    for member in 0..ports.len() {
        let store_leader = store_leader(sb);
        let jm_conns = member_connections(jm_pid, &ports);
        let rm_conns = member_connections(rm_pid, &ports);
        let killed_ms = now_ms();
        let killed = Instant::now();
        kill_member(sb, member)?;

        let lines = lines_in(&c.out);
        wait_until(
            &format!("checkpoints to go on without {} member {member}", backend.name()),
            LONG,
            || {
                let done = completed_since(sb, &c.job_id, killed_ms)?.len();
                Ok((done >= 5 && killed.elapsed() > TTL + Duration::from_secs(1) && lines_in(&c.out) > lines)
                    .then_some(()))
            },
        )?;
        let first = completed_since(sb, &c.job_id, killed_ms)?.first().map(|t| t - killed_ms).unwrap_or(0);
        let gap = largest_gap(sb, &c.job_id, killed_ms, now_ms())?;
        let cluster = sb.cluster()?;
        let status = sb.status(&c.job_id)?;
        println!(
            "{} member {member} killed ({}; jobmanager leader had {} connection(s) to it, resourcemanager {}): \
             next checkpoint completed {first} ms after the kill, largest gap between completions {gap} ms, \
             epochs jobmanager {} resourcemanager {}",
            backend.name(),
            if store_leader == Some(member) { "the store's leader" } else { "a follower" },
            jm_conns.get(&member).copied().unwrap_or(0),
            rm_conns.get(&member).copied().unwrap_or(0),
            cluster["jobmanager"]["epoch"],
            cluster["resourcemanager"]["epoch"],
        );
        assert_eq!(cluster["jobmanager"]["epoch"], jm_epoch, "the jobmanager leadership must survive");
        assert_eq!(cluster["jobmanager"]["leader"], jm_leader.as_str());
        assert_eq!(
            cluster["resourcemanager"]["epoch"], rm_epoch,
            "the resourcemanager leadership must survive"
        );
        assert!(all_running(&status), "the job keeps running: {}", status["job"]);
        assert_eq!(max_attempt(&status), attempt, "the job must not be redeployed");
        assert_eq!(status["restarts"], restarts, "the job must not restart");

        restart_member(sb, member)?;
    }
    Ok(())
}

/// Losing the store's quorum (2 of 3 members killed) makes both leaders step down within about a
/// lease TTL: each process answers as a standby, and from the step-down on no checkpoint
/// completes (no metadata file is written) and no task is deployed (the TaskManager runs no
/// task it did not run before the fault). When quorum is back, leaders are elected again
/// (higher epochs). Prints the time from the fault to each step-down and from quorum back to
/// the new leaders.
fn quorum_loss_step_down(backend: Backend) -> anyhow::Result<()> {
    quorum_loss(backend, "store-quorum", false)
}

/// As above, and then the job runs again under the new JobManager leader, completes a
/// checkpoint and its output grows. Prints the times from quorum back to the job running and
/// to its first checkpoint.
///
/// This stalled about two runs in three before the ResourceManager freed the slot allocations
/// of deposed JobManager epochs: when both leaders are re-elected at once, the new JobManager
/// releases its job's slots before the TaskManager re-registers, which then reports them still
/// allocated under the old epoch; the job waited for slots until `slot.request.timeout`.
fn quorum_loss_job_recovers(backend: Backend) -> anyhow::Result<()> {
    quorum_loss(backend, "store-quorum-job", true)
}

fn quorum_loss(backend: Backend, test: &str, job_must_recover: bool) -> anyhow::Result<()> {
    let mut c = start(backend, test)?;
    let rt = c.rt.handle().clone();
    let sb = &mut c.sb;
    let cluster = sb.cluster()?;
    let jm_epoch = cluster["jobmanager"]["epoch"].as_u64().unwrap_or(0);
    let rm_epoch = cluster["resourcemanager"]["epoch"].as_u64().unwrap_or(0);
    let jms: Vec<String> =
        sb.procs.iter().filter(|p| p.role == "jobmanager").map(|p| p.address.clone()).collect();
    let rm = sb.proc("rm").address.clone();
    let tasks_before: BTreeSet<String> = c
        .metrics
        .iter()
        .map(|m| metrics_tasks(m))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let attempt_before = max_attempt(&sb.status(&c.job_id)?);

    let fault_ms = now_ms();
    let fault = Instant::now();
    kill_member(sb, 1)?;
    kill_member(sb, 2)?;

    // Step-down: every JobManager and the ResourceManager answer as standbys. Meanwhile, the
    // TaskManager's tasks are sampled.
    let mut seen_tasks = BTreeSet::new();
    let (mut jm_down, mut rm_down) = (None, None);
    wait_until("both leaders to step down", LONG, || {
        for m in &c.metrics {
            seen_tasks.extend(metrics_tasks(m)?);
        }
        if jm_down.is_none() && !jms.iter().any(|a| jm_leads(&rt, a).unwrap_or(true)) {
            jm_down = Some(fault.elapsed());
        }
        if rm_down.is_none() && !rm_leads(&rt, &rm).unwrap_or(true) {
            rm_down = Some(fault.elapsed());
        }
        Ok(jm_down.zip(rm_down))
    })?;
    let (jm_down, rm_down) = (jm_down.unwrap_or_default(), rm_down.unwrap_or_default());
    let down_ms = fault_ms + jm_down.as_millis() as u64;
    // Stay without quorum for a while: nobody may act.
    wait_until("a while without quorum", LONG, || {
        for m in &c.metrics {
            seen_tasks.extend(metrics_tasks(m)?);
        }
        let standbys =
            !jms.iter().any(|a| jm_leads(&rt, a).unwrap_or(true)) && !rm_leads(&rt, &rm).unwrap_or(true);
        if !standbys {
            bail!("a leader acts without the store's quorum");
        }
        Ok((fault.elapsed() > jm_down.max(rm_down) + TTL).then_some(()))
    })?;
    let outage_ms = now_ms();
    let during = metadata_files(sb, &c.job_id)?;
    let after_fault: Vec<_> = during.iter().filter(|m| m.completed_at_ms > fault_ms).collect();
    let after_down: Vec<_> = during.iter().filter(|m| m.completed_at_ms > down_ms).collect();
    println!(
        "quorum lost: jobmanager stood down after {} ms, resourcemanager after {} ms (lease TTL {TTL:?}); \
         checkpoint metadata written after the fault: {after_fault:?}",
        jm_down.as_millis(),
        rm_down.as_millis()
    );
    assert!(after_down.is_empty(), "checkpoints completed after the jobmanager stood down: {after_down:?}");
    let deployed: Vec<&String> = seen_tasks.difference(&tasks_before).collect();
    assert!(deployed.is_empty(), "tasks deployed without the store's quorum: {deployed:?}");

    // Quorum is back once a second member serves again (with a raft leader): that moment is
    // what recovery is measured from. The third member rejoins afterwards.
    let restarting = Instant::now();
    restart_member(sb, 1)?;
    let quorum = restarting.elapsed();
    let back = Instant::now();
    let back_ms = now_ms();
    match (sb.etcd.as_mut(), sb.raft.as_mut()) {
        (Some(etcd), _) => etcd.restart(2)?,
        (None, Some(raft)) => raft.restart(2)?,
        (None, None) => bail!("the sandbox has no HA store members"),
    }
    let (leaders, cluster) = wait_until("leaders elected again", LONG, || {
        let c = sb.cluster()?;
        let jm = c["jobmanager"]["epoch"].as_u64().unwrap_or(0);
        let rm = c["resourcemanager"]["epoch"].as_u64().unwrap_or(0);
        Ok((jm > jm_epoch && rm > rm_epoch).then(|| (back.elapsed(), c)))
    })?;
    println!(
        "quorum back {} ms after restarting a member; from then: leaders elected (jobmanager epoch {} -> {}, \
         resourcemanager {} -> {}) after {} ms; quorum lost for {} ms before the restart",
        quorum.as_millis(),
        jm_epoch,
        cluster["jobmanager"]["epoch"],
        rm_epoch,
        cluster["resourcemanager"]["epoch"],
        leaders.as_millis(),
        outage_ms - fault_ms
    );
    if !job_must_recover {
        return Ok(());
    }
    let running = wait_until("the job running again", LONG, || {
        let s = sb.status(&c.job_id)?;
        if all_running(&s) && max_attempt(&s) > attempt_before {
            return Ok(Some(back.elapsed()));
        }
        let slots = sb.cluster()?["slots"].clone();
        Err(anyhow!(
            "job {} ({}); slots {slots}, allocated as the taskmanagers report: {:?}",
            s["job"]["state"],
            s["status_message"],
            allocations(&rt, &rm)
        ))
    })?;
    let lines = lines_in(&c.out);
    let checkpointed = wait_until("a checkpoint completed after the recovery", LONG, || {
        Ok((!completed_since(sb, &c.job_id, back_ms)?.is_empty() && lines_in(&c.out) > lines)
            .then(|| back.elapsed()))
    })?;
    println!(
        "from quorum back: job running after {} ms, first checkpoint after {} ms",
        running.as_millis(),
        checkpointed.as_millis()
    );
    Ok(())
}

on_backends!(one_store_member_down_changes_nothing, one_member_down, [Etcd, Raft]);
on_backends!(quorum_loss_leaders_step_down_and_are_elected_again, quorum_loss_step_down, [Etcd, Raft]);
on_backends!(quorum_loss_then_the_job_recovers_when_quorum_returns, quorum_loss_job_recovers, [Etcd, Raft]);
