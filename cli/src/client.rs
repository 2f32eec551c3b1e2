//! The client verbs. Each finds the JobManager (and, for `cluster`, the ResourceManager) leader
//! through the HA services named in the configuration, follows not-leader redirects, and falls
//! back to the configured `jobmanager.rpc.address` when the HA services name no leader. Errors
//! name what was tried.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use keel_client::LeaderClient;
use keel_config::{Config, HaBackend};
use keel_ha::{HaServices, Role};
use keel_proto::pb::job_manager_client::JobManagerClient;
use keel_proto::pb::resource_manager_client::ResourceManagerClient;
use keel_proto::pb::{self};
use keel_proto::KeelError;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::format::{bytes, millis, table, timestamp};
use crate::Output;

/// How long a verb keeps retrying while no leader answers.
const RETRY_FOR: Duration = Duration::from_secs(10);
/// How long `keel run` waits for a job to run (slot waits end earlier, at slot.request.timeout).
const RUN_WAIT: Duration = Duration::from_secs(3600);

/// How `keel upgrade` / `keel rescale` replace the running version.
#[derive(Debug, Clone, Default)]
pub struct UpgradeOptions {
    /// `handover` (default), `stop-start`, `cancel-on-update`.
    pub mode: String,
    /// `stateful` (default) or `stateless`.
    pub upgrade_strategy: String,
    /// `latest-state` (default), `latest-savepoint`, `none`.
    pub restore_strategy: String,
    pub allow_non_restored_state: bool,
}

pub struct Client {
    config: Config,
    output: Output,
    jm: LeaderClient,
    rm: LeaderClient,
    ha_description: String,
}

fn describe_ha(config: &Config) -> String {
    match &config.ha.backend {
        HaBackend::Local { storage_dir } => {
            format!("local HA store {} (cluster {})", storage_dir.display(), config.ha.cluster_id)
        }
        HaBackend::Etcd { endpoints, .. } => {
            format!("etcd {} (cluster {})", endpoints.join(","), config.ha.cluster_id)
        }
        HaBackend::Raft { members, .. } => {
            let members: Vec<String> = members.iter().map(|(id, a)| format!("{id}={a}")).collect();
            format!("raft members {} (cluster {})", members.join(","), config.ha.cluster_id)
        }
    }
}

impl Client {
    pub async fn connect(
        config: Config,
        output: Output,
        jobmanager: Option<String>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Client> {
        let ha_description = describe_ha(&config);
        let ha: Arc<dyn HaServices> = keel_ha::connect(&config.ha)
            .await
            .with_context(|| format!("cannot reach the cluster's HA services ({ha_description})"))?;
        let jm = match jobmanager {
            Some(addr) => LeaderClient::from_addresses(Role::JobManager, vec![addr]),
            None => LeaderClient::from_ha(Role::JobManager, &ha, shutdown.clone())
                .with_fallback(vec![config.jobmanager_rpc.to_string()]),
        }
        .with_retry_for(RETRY_FOR);
        let rm = LeaderClient::from_ha(Role::ResourceManager, &ha, shutdown)
            .with_fallback(vec![config.resourcemanager_rpc.to_string()])
            .with_retry_for(RETRY_FOR);
        Ok(Client { config, output, jm, rm, ha_description })
    }

    fn unreachable(&self, role: &str, err: KeelError) -> anyhow::Error {
        match err {
            KeelError::Unavailable { .. } | KeelError::NotLeader { .. } => {
                anyhow!("cannot reach the {role} leader (looked up in {}): {err}", self.ha_description)
            }
            other => anyhow::Error::new(other),
        }
    }

    async fn describe(&self, job: &str) -> anyhow::Result<pb::JobDetails> {
        let req = pb::DescribeJobRequest { job: job.to_string() };
        self.jm
            .call(|ch| {
                let req = req.clone();
                async move { JobManagerClient::new(ch).describe_job(req).await.map(|r| r.into_inner()) }
            })
            .await
            .map_err(|e| self.unreachable("jobmanager", e))
    }

    async fn overview(&self) -> anyhow::Result<pb::ClusterOverviewResponse> {
        self.rm
            .call(|ch| async move {
                ResourceManagerClient::new(ch)
                    .cluster_overview(pb::ClusterOverviewRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await
            .map_err(|e| self.unreachable("resourcemanager", e))
    }

    /// `keel run FILE`: submits, then (unless detached) waits until the job runs or fails. With
    /// `restore`, the job starts from the latest completed checkpoint of the most recent earlier
    /// job with the same name.
    pub async fn run(
        &self,
        file: &Path,
        detached: bool,
        restore: bool,
        from_savepoint: Option<&str>,
        allow_non_restored_state: bool,
    ) -> anyhow::Result<()> {
        // Validated here first: the same check the JobManager makes, without a round trip.
        let spec_yaml = crate::spec_file::read(file)?.yaml;
        let req = pb::SubmitJobRequest {
            spec_yaml,
            restore,
            from_savepoint: from_savepoint.unwrap_or_default().to_string(),
            allow_non_restored_state,
        };
        let submitted = self
            .jm
            .call(|ch| {
                let req = req.clone();
                async move { JobManagerClient::new(ch).submit_job(req).await.map(|r| r.into_inner()) }
            })
            .await
            .map_err(|e| self.unreachable("jobmanager", e))?;
        if self.output == Output::Text {
            println!(
                "submitted job {} as {} (version {})",
                submitted.name, submitted.job_id, submitted.version
            );
            if let Some(r) = &submitted.restored_from {
                println!("  restoring from {}", describe_restore(r));
            }
        }
        if detached {
            if self.output == Output::Json {
                println!(
                    "{}",
                    json!({"job_id": submitted.job_id, "name": submitted.name, "version": submitted.version,
                           "restored_from": submitted.restored_from.as_ref().map(checkpoint_ref_json)})
                );
            }
            return Ok(());
        }
        let started = Instant::now();
        let mut last_line = String::new();
        let mut slot_hint_shown = false;
        loop {
            let details = self.describe(&submitted.job_id).await?;
            let summary = details.summary.clone().unwrap_or_default();
            let line = if details.status_message.is_empty() {
                format!("state: {}", summary.state)
            } else {
                format!("state: {} ({})", summary.state, details.status_message)
            };
            if line != last_line && self.output == Output::Text {
                println!("  {line}");
                last_line = line;
            }
            match summary.state.as_str() {
                "running" | "finished" => {
                    if self.output == Output::Json {
                        println!("{}", details_json(&details));
                    } else {
                        let tms: std::collections::BTreeSet<&str> =
                            details.tasks.iter().map(|t| t.taskmanager_id.as_str()).collect();
                        println!(
                            "job {} is {}: {} task(s) on {} taskmanager(s), after {}",
                            summary.name,
                            summary.state,
                            details.tasks.len(),
                            tms.len(),
                            millis(started.elapsed().as_millis() as u64)
                        );
                    }
                    return Ok(());
                }
                "failed" | "canceled" => {
                    bail!("job {} {}: {}", summary.name, summary.state, details.status_message)
                }
                "scheduled" if !slot_hint_shown && started.elapsed() > Duration::from_secs(2) => {
                    slot_hint_shown = true;
                    if let Ok(o) = self.overview().await {
                        if self.output == Output::Text {
                            println!(
                                "  waiting for slots: {} needed, {} free of {} on {} taskmanager(s); \
                                 the request fails after slot.request.timeout ({:?})",
                                summary.parallelism,
                                o.slots_free,
                                o.slots_total,
                                o.taskmanagers.len(),
                                self.config.slot_request_timeout
                            );
                        }
                    }
                }
                _ => {}
            }
            if started.elapsed() > RUN_WAIT {
                bail!("job {} still {} after {:?}", summary.name, summary.state, RUN_WAIT);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn list(&self) -> anyhow::Result<()> {
        let jobs = self
            .jm
            .call(|ch| async move {
                JobManagerClient::new(ch).list_jobs(pb::ListJobsRequest {}).await.map(|r| r.into_inner().jobs)
            })
            .await
            .map_err(|e| self.unreachable("jobmanager", e))?;
        match self.output {
            Output::Json => println!("{}", serde_json::Value::Array(jobs.iter().map(summary_json).collect())),
            Output::Text => {
                if jobs.is_empty() {
                    println!("no jobs");
                    return Ok(());
                }
                let rows: Vec<Vec<String>> = jobs
                    .iter()
                    .map(|j| {
                        vec![
                            j.job_id.clone(),
                            j.name.clone(),
                            j.state.clone(),
                            j.active_version.to_string(),
                            j.parallelism.to_string(),
                            format!("{}/{}", j.tasks_running, j.tasks_total),
                            timestamp(j.created_at_ms),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["ID", "NAME", "STATE", "VERSION", "PARALLELISM", "RUNNING", "CREATED"], &rows)
                );
            }
        }
        Ok(())
    }

    pub async fn status(&self, job: &str) -> anyhow::Result<()> {
        let d = self.describe(job).await?;
        if self.output == Output::Json {
            println!("{}", details_json(&d));
            return Ok(());
        }
        let s = d.summary.clone().unwrap_or_default();
        println!("job {} ({})", s.name, s.job_id);
        println!(
            "  state: {}   active version: {}   parallelism: {}   restarts: {}",
            s.state, s.active_version, s.parallelism, d.restarts
        );
        if !d.status_message.is_empty() {
            println!("  status: {}", d.status_message);
        }
        if !d.restart_strategy.is_empty() {
            println!("  restart strategy: {}", d.restart_strategy);
        }
        if let Some(f) = &d.failure {
            println!("  failed at {} (attempt {}): {}", timestamp(f.time_ms), f.attempt, f.cause);
            println!("  not restarted: {}", f.reason);
        }
        if let Some(u) = &d.upgrade {
            println!("  {}", upgrade_line(u));
        }
        if let Some(line) = throughput_line(d.throughput.as_ref()) {
            println!("  {line}");
        }
        for w in &d.warnings {
            println!("  warning: {w}");
        }
        println!("\nversions");
        let rows: Vec<Vec<String>> = d
            .versions
            .iter()
            .map(|v| {
                vec![
                    v.version.to_string(),
                    v.state.clone(),
                    v.parallelism.to_string(),
                    timestamp(v.created_at_ms),
                ]
            })
            .collect();
        print!("{}", indent(&table(&["VERSION", "STATE", "PARALLELISM", "CREATED"], &rows)));
        if let Some(r) = &d.restored_from {
            println!("  restored from {}", describe_restore(r));
        }
        print_checkpoints(&d);
        print_restarts(&d);
        println!("\ntasks");
        if d.tasks.is_empty() {
            println!("  none deployed");
        } else {
            let rows: Vec<Vec<String>> = d
                .tasks
                .iter()
                .map(|t| {
                    vec![
                        t.subtask.to_string(),
                        t.attempt.to_string(),
                        t.state.clone(),
                        t.taskmanager_id.clone(),
                        t.taskmanager_address.clone(),
                        t.slot_index.to_string(),
                        t.records_in.to_string(),
                        t.records_out.to_string(),
                        rate(t.records_in_per_second),
                        rate(t.records_out_per_second),
                        t.current_emit_event_time_lag_ms.map_or_else(|| "-".into(), lag),
                        t.failure.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                indent(&table(
                    &[
                        "SUBTASK",
                        "ATTEMPT",
                        "STATE",
                        "TASKMANAGER",
                        "ADDRESS",
                        "SLOT",
                        "IN",
                        "OUT",
                        "IN/s",
                        "OUT/s",
                        "LAG",
                        "FAILURE"
                    ],
                    &rows
                ))
            );
        }
        Ok(())
    }

    /// `keel upgrade JOB FILE` and `keel rescale JOB --parallelism N` (`file` = None): prints
    /// each step as the JobManager reports it, then the measured pause and total time.
    pub async fn upgrade(
        &self,
        job: &str,
        file: Option<&Path>,
        parallelism: u32,
        options: &UpgradeOptions,
    ) -> anyhow::Result<()> {
        let spec_yaml = match file {
            Some(f) => crate::spec_file::read(f)?.yaml,
            None => String::new(),
        };
        let req = pb::UpgradeJobRequest {
            job: job.to_string(),
            spec_yaml,
            parallelism,
            mode: options.mode.clone(),
            allow_non_restored_state: options.allow_non_restored_state,
            upgrade_strategy: options.upgrade_strategy.clone(),
            restore_strategy: options.restore_strategy.clone(),
        };
        let stream = self
            .jm
            .call(|ch| {
                let req = req.clone();
                async move { JobManagerClient::new(ch).upgrade_job(req).await.map(|r| r.into_inner()) }
            })
            .await
            .map_err(|e| self.unreachable("jobmanager", e))?;
        self.follow_progress(stream, job).await
    }

    /// `keel promote JOB`: the side-by-side version becomes the active version by a handover.
    pub async fn promote(&self, job: &str) -> anyhow::Result<()> {
        let req = pb::TriggerSavepointRequest { job: job.to_string() };
        let stream = self
            .jm
            .call(|ch| {
                let req = req.clone();
                async move { JobManagerClient::new(ch).promote_job(req).await.map(|r| r.into_inner()) }
            })
            .await
            .map_err(|e| self.unreachable("jobmanager", e))?;
        self.follow_progress(stream, job).await
    }

    /// Prints an upgrade's steps as they come, and its result.
    async fn follow_progress(
        &self,
        mut stream: tonic::Streaming<pb::UpgradeProgress>,
        job: &str,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut steps = Vec::new();
        loop {
            let message = stream
                .message()
                .await
                .map_err(|status| anyhow::Error::new(KeelError::from_status(&status, "jobmanager")))?;
            let Some(m) = message else {
                bail!("the JobManager ended the upgrade's progress stream without a result (leader change?); see `keel status {job}`");
            };
            if self.output == Output::Text && !m.done {
                println!("[{:>7}] {}", millis(started.elapsed().as_millis() as u64), m.step);
            }
            steps.push(json!({"step": m.step, "time_ms": m.time_ms}));
            if m.done {
                if self.output == Output::Json {
                    println!(
                        "{}",
                        json!({"job": job, "from_version": m.from_version, "to_version": m.to_version,
                               "error": m.error, "pause_ms": m.pause_ms, "total_ms": m.total_ms,
                               "savepoint_id": m.savepoint_id, "savepoint_path": m.savepoint_path,
                               "steps": steps})
                    );
                }
                if !m.error.is_empty() {
                    bail!("upgrade of {job} failed: {}", m.error);
                }
                if self.output == Output::Text {
                    let pause =
                        if m.pause_ms >= 0 { millis(m.pause_ms as u64) } else { "unknown".to_string() };
                    println!(
                        "version {} replaced version {} in {} (output paused {pause}; savepoint {} at {})",
                        m.to_version,
                        m.from_version,
                        millis(m.total_ms),
                        m.savepoint_id,
                        m.savepoint_path
                    );
                }
                return Ok(());
            }
        }
    }

    /// `keel savepoint JOB`: a savepoint of the running version, kept until deleted. With
    /// `stop` (`keel stop JOB`): the job stops at the savepoint and finishes.
    pub async fn savepoint(&self, job: &str, stop: bool) -> anyhow::Result<()> {
        let req = pb::TriggerSavepointRequest { job: job.to_string() };
        let resp = self
            .jm
            .call(|ch| {
                let req = req.clone();
                async move {
                    let mut client = JobManagerClient::new(ch);
                    let resp =
                        if stop { client.stop_job(req).await } else { client.trigger_savepoint(req).await };
                    resp.map(|r| r.into_inner())
                }
            })
            .await
            .map_err(|e| self.unreachable("jobmanager", e))?;
        if stop && self.output == Output::Text {
            println!("job {} stopped", resp.job_id);
        }
        match self.output {
            Output::Json => println!(
                "{}",
                json!({"job_id": resp.job_id, "savepoint_id": resp.savepoint_id, "path": resp.path})
            ),
            Output::Text => println!("savepoint {} of job {}: {}", resp.savepoint_id, resp.job_id, resp.path),
        }
        Ok(())
    }

    /// `keel rollback JOB [--to N]`: a handover back to version N's spec (default: the version
    /// before the active one), from the running version's state. It becomes a new version.
    pub async fn rollback(&self, job: &str, to: Option<u32>) -> anyhow::Result<()> {
        let d = self.describe(job).await?;
        let active = d.summary.as_ref().map(|s| s.active_version).unwrap_or(0);
        let target = match to {
            Some(n) => d.versions.iter().find(|v| v.version == n),
            None => d
                .versions
                .iter()
                .filter(|v| v.version < active && v.state != "failed")
                .max_by_key(|v| v.version),
        };
        let Some(target) = target else {
            bail!(
                "job {job}: no version {} to roll back to (active version {active}; see `keel history {job}`)",
                to.map(|n| n.to_string()).unwrap_or_else(|| "before the active one".into())
            );
        };
        if target.version == active {
            bail!("job {job}: version {active} is the active version already");
        }
        let dir = std::env::temp_dir().join(format!("keel-rollback-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join(format!("v{}.yaml", target.version));
        std::fs::write(&file, &target.spec_yaml).with_context(|| format!("writing {}", file.display()))?;
        if self.output == Output::Text {
            println!("rolling back job {job} to the spec of version {}", target.version);
        }
        let result = self.upgrade(job, Some(&file), 0, &UpgradeOptions::default()).await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    /// `keel history JOB`: every version of the job.
    pub async fn history(&self, job: &str) -> anyhow::Result<()> {
        let d = self.describe(job).await?;
        let s = d.summary.clone().unwrap_or_default();
        let cp = |c: &Option<pb::CheckpointRef>| {
            c.as_ref().map(|c| c.checkpoint_id.to_string()).unwrap_or_default()
        };
        match self.output {
            Output::Json => {
                let versions: Vec<serde_json::Value> = d
                    .versions
                    .iter()
                    .map(|v| {
                        json!({"version": v.version, "state": v.state, "active": v.version == s.active_version,
                               "parallelism": v.parallelism, "created_at_ms": v.created_at_ms,
                               "started_from": v.restored_from.as_ref().map(|c| json!({"checkpoint_id": c.checkpoint_id, "path": c.metadata_path})),
                               "ended_with": v.ended_with.as_ref().map(|c| json!({"checkpoint_id": c.checkpoint_id, "path": c.metadata_path}))})
                    })
                    .collect();
                println!("{}", json!({"job_id": s.job_id, "name": s.name, "versions": versions}));
            }
            Output::Text => {
                println!("job {} ({})", s.name, s.job_id);
                let rows: Vec<Vec<String>> = d
                    .versions
                    .iter()
                    .map(|v| {
                        vec![
                            format!("{}{}", v.version, if v.version == s.active_version { " *" } else { "" }),
                            v.state.clone(),
                            v.parallelism.to_string(),
                            timestamp(v.created_at_ms),
                            cp(&v.restored_from),
                            cp(&v.ended_with),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &["VERSION", "STATE", "PARALLELISM", "CREATED", "STARTED FROM", "ENDED WITH"],
                        &rows
                    )
                );
            }
        }
        Ok(())
    }

    pub async fn cancel(&self, job: &str, detached: bool) -> anyhow::Result<()> {
        let req = pb::CancelJobRequest { job: job.to_string() };
        let resp = self
            .jm
            .call(|ch| {
                let req = req.clone();
                async move { JobManagerClient::new(ch).cancel_job(req).await.map(|r| r.into_inner()) }
            })
            .await
            .map_err(|e| self.unreachable("jobmanager", e))?;
        let mut state = resp.state.clone();
        if !detached {
            let deadline = Instant::now() + Duration::from_secs(60);
            while state != "canceled" && state != "failed" && state != "finished" {
                if Instant::now() > deadline {
                    bail!("job {} still {state} 60 s after the cancel request", resp.job_id);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                state = self.describe(&resp.job_id).await?.summary.unwrap_or_default().state;
            }
        }
        match self.output {
            Output::Json => println!("{}", json!({"job_id": resp.job_id, "state": state})),
            Output::Text => println!("job {} {state}", resp.job_id),
        }
        Ok(())
    }

    pub async fn cluster(&self) -> anyhow::Result<()> {
        let jm = self
            .jm
            .call(|ch| async move {
                JobManagerClient::new(ch).leader_info(pb::LeaderInfoRequest {}).await.map(|r| r.into_inner())
            })
            .await
            .map_err(|e| self.unreachable("jobmanager", e))?;
        let rm = self.overview().await?;
        let members = match &self.config.ha.backend {
            HaBackend::Raft { members, .. } => {
                Some(keel_ha::raft::client::member_statuses(members, Duration::from_secs(2)).await)
            }
            _ => None,
        };
        if self.output == Output::Json {
            let tms: Vec<serde_json::Value> = rm
                .taskmanagers
                .iter()
                .map(|t| {
                    json!({"id": t.taskmanager_id, "address": t.address, "slots": t.num_slots,
                           "free_slots": t.free_slots, "last_heartbeat_ms_ago": t.last_heartbeat_ms_ago,
                           "memory_rss_bytes": t.memory_rss_bytes})
                })
                .collect();
            println!(
                "{}",
                json!({
                    "ha": self.ha_description,
                    "jobmanager": {"leader": jm.leader_address, "epoch": jm.epoch},
                    "resourcemanager": {"leader": rm.resourcemanager_address, "epoch": rm.resourcemanager_epoch,
                                        "leader_for_ms": rm.leader_for_ms},
                    "taskmanagers": tms,
                    "slots": {"total": rm.slots_total, "free": rm.slots_free, "used": rm.slots_total - rm.slots_free},
                    "ha_members": members.as_ref().map(|ms| ms.iter().map(|(id, address, status)| match status {
                        Ok(s) => json!({"id": id, "address": address, "state": s.state, "raft_leader": s.raft_leader,
                                        "term": s.term, "commit_index": s.commit_index, "applied_index": s.applied_index,
                                        "snapshot_index": s.snapshot_index, "disk_bytes": s.disk_bytes}),
                        Err(e) => json!({"id": id, "address": address, "error": e.to_string()}),
                    }).collect::<Vec<_>>()),
                })
            );
            return Ok(());
        }
        println!("HA services: {}", self.ha_description);
        if let Some(members) = &members {
            let rows: Vec<Vec<String>> = members
                .iter()
                .map(|(id, address, status)| match status {
                    Ok(s) => vec![
                        id.to_string(),
                        address.clone(),
                        s.state.clone(),
                        s.term.to_string(),
                        s.applied_index.to_string(),
                        s.snapshot_index.to_string(),
                        size(s.disk_bytes),
                    ],
                    Err(e) => vec![id.to_string(), address.clone(), format!("unreachable: {e}")],
                })
                .collect();
            print!(
                "{}",
                table(&["MEMBER", "ADDRESS", "STATE", "TERM", "APPLIED", "SNAPSHOT", "DISK"], &rows)
            );
            println!();
        }
        print!(
            "{}",
            table(
                &["ROLE", "LEADER", "EPOCH"],
                &[
                    vec![
                        "resourcemanager".into(),
                        rm.resourcemanager_address.clone(),
                        rm.resourcemanager_epoch.to_string()
                    ],
                    vec!["jobmanager".into(), jm.leader_address.clone(), jm.epoch.to_string()],
                ]
            )
        );
        println!(
            "\n{} taskmanager(s), slots: {} used, {} free, {} total",
            rm.taskmanagers.len(),
            rm.slots_total - rm.slots_free,
            rm.slots_free,
            rm.slots_total
        );
        if !rm.taskmanagers.is_empty() {
            let rows: Vec<Vec<String>> = rm
                .taskmanagers
                .iter()
                .map(|t| {
                    vec![
                        t.taskmanager_id.clone(),
                        t.address.clone(),
                        format!("{}/{}", t.num_slots - t.free_slots, t.num_slots),
                        format!("{} ago", millis(t.last_heartbeat_ms_ago)),
                        bytes(t.memory_rss_bytes),
                    ]
                })
                .collect();
            print!("{}", table(&["TASKMANAGER", "ADDRESS", "USED", "HEARTBEAT", "MEMORY"], &rows));
        }
        Ok(())
    }
}

/// `checkpoint 12 of job <id> (<metadata path>)`.
fn describe_restore(r: &pb::CheckpointRef) -> String {
    format!("checkpoint {} of job {} ({})", r.checkpoint_id, r.job_id, r.metadata_path)
}

/// A state size for people: bytes, KiB or MiB.
fn size(n: u64) -> String {
    match n {
        0 => "-".into(),
        n if n < 1024 => format!("{n} B"),
        n if n < 1024 * 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
    }
}

fn print_checkpoints(d: &pb::JobDetails) {
    if d.checkpoint_interval_ms == 0 && d.checkpoints.is_empty() {
        println!("\ncheckpoints: disabled (execution.checkpointing.interval is not set)");
        return;
    }
    if d.checkpoint_interval_ms > 0 {
        println!("\ncheckpoints (every {})", millis(d.checkpoint_interval_ms));
    } else {
        println!("\ncheckpoints");
    }
    if d.checkpoints.is_empty() {
        println!("  none yet");
        return;
    }
    let rows: Vec<Vec<String>> = d
        .checkpoints
        .iter()
        .rev()
        .map(|c| {
            vec![
                c.checkpoint_id.to_string(),
                c.state.clone(),
                timestamp(c.trigger_time_ms),
                millis(c.duration_ms),
                size(c.size_bytes),
                if c.total_tasks > 0 { format!("{}/{}", c.acknowledged, c.total_tasks) } else { "-".into() },
                c.failure.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        indent(&table(&["ID", "STATE", "TRIGGERED", "DURATION", "SIZE", "ACKED", "FAILURE"], &rows))
    );
}

/// The restart history: the newest restarts the JobManager keeps, oldest first.
fn print_restarts(d: &pb::JobDetails) {
    if d.restarts == 0 {
        return;
    }
    let shown = d.restart_history.len() as u32;
    if shown < d.restarts {
        println!("\nrestarts ({} in all, the last {shown} shown)", d.restarts);
    } else {
        println!("\nrestarts ({})", d.restarts);
    }
    let rows: Vec<Vec<String>> = d
        .restart_history
        .iter()
        .map(|r| {
            vec![
                r.restart.to_string(),
                timestamp(r.time_ms),
                r.attempt.to_string(),
                millis(r.delay_ms),
                r.cause.clone(),
            ]
        })
        .collect();
    print!("{}", indent(&table(&["#", "TIME", "FAILED ATTEMPT", "DELAY", "CAUSE"], &rows)));
}

/// A per-second rate for people: `0`, `3.25`, `812.5`, `12034`.
fn rate(r: f64) -> String {
    if !r.is_finite() || r <= 0.0 {
        "0".into()
    } else if r < 10.0 {
        format!("{r:.2}")
    } else if r < 1000.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.0}")
    }
}

/// An event-time lag in milliseconds for people.
fn lag(ms: i64) -> String {
    millis(u64::try_from(ms).unwrap_or(0))
}

/// `throughput: 812.5 records/s in, 810.0 records/s out, 42 records pending, max lag 350 ms`
/// (pending and lag only when the Kafka sources know them), or nothing when no task runs.
fn throughput_line(t: Option<&pb::JobThroughput>) -> Option<String> {
    let t = t.filter(|t| t.tasks_reporting > 0)?;
    let mut line = format!(
        "throughput: {} records/s in, {} records/s out",
        rate(t.records_in_per_second),
        rate(t.records_out_per_second)
    );
    if let Some(p) = t.pending_records {
        line.push_str(&format!(", {p} records pending"));
    }
    if let Some(l) = t.max_emit_event_time_lag_ms {
        line.push_str(&format!(", max lag {}", lag(l)));
    }
    Some(line)
}

fn throughput_json(t: &pb::JobThroughput) -> serde_json::Value {
    json!({"records_in_per_second": t.records_in_per_second, "records_out_per_second": t.records_out_per_second,
           "bytes_in_per_second": t.bytes_in_per_second, "bytes_out_per_second": t.bytes_out_per_second,
           "pending_records": t.pending_records, "max_emit_event_time_lag_ms": t.max_emit_event_time_lag_ms,
           "tasks_reporting": t.tasks_reporting})
}

fn task_json(t: &pb::TaskDetails) -> serde_json::Value {
    json!({"task_id": t.task_id, "version": t.version, "subtask": t.subtask,
        "attempt": t.attempt, "state": t.state, "taskmanager_id": t.taskmanager_id,
        "taskmanager_address": t.taskmanager_address, "slot": t.slot_index, "failure": t.failure,
        "records_in": t.records_in, "records_out": t.records_out,
        "records_in_per_second": t.records_in_per_second, "records_out_per_second": t.records_out_per_second,
        "bytes_in_per_second": t.bytes_in_per_second, "bytes_out_per_second": t.bytes_out_per_second,
        "pending_records": t.pending_records, "current_emit_event_time_lag_ms": t.current_emit_event_time_lag_ms,
        "source_partitions": t.source_partitions.iter().map(|p| json!({"source": p.source, "topic": p.topic,
            "partitions": p.partitions, "assigned": p.assigned, "spread_warning": p.spread_warning}))
            .collect::<Vec<_>>()})
}

fn checkpoint_ref_json(r: &pb::CheckpointRef) -> serde_json::Value {
    json!({"job_id": r.job_id, "checkpoint_id": r.checkpoint_id, "metadata_path": r.metadata_path,
           "restored_at_ms": r.restored_at_ms})
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `upgrade: version 1 -> 2 switched (health gate until 12:00:01.250)`.
fn upgrade_line(u: &pb::UpgradeStatus) -> String {
    let mut line = format!("upgrade: version {} -> {} {}", u.from_version, u.to_version, u.phase);
    if u.gate_deadline_ms > 0 {
        line.push_str(&format!(" (health gate until {})", timestamp(u.gate_deadline_ms)));
    }
    if u.rolled_back {
        line.push_str(" (rolled back)");
    }
    if !u.reason.is_empty() {
        line.push_str(&format!(": {}", u.reason));
    }
    line
}

fn summary_json(j: &pb::JobSummary) -> serde_json::Value {
    json!({"job_id": j.job_id, "name": j.name, "state": j.state, "active_version": j.active_version,
           "parallelism": j.parallelism, "tasks_running": j.tasks_running, "tasks_total": j.tasks_total,
           "created_at_ms": j.created_at_ms})
}

fn details_json(d: &pb::JobDetails) -> serde_json::Value {
    let s = d.summary.clone().unwrap_or_default();
    json!({
        "job": summary_json(&s),
        "status_message": d.status_message,
        "restarts": d.restarts,
        "restart_strategy": d.restart_strategy,
        "restart_history": d.restart_history.iter().map(|r| json!({"restart": r.restart, "time_ms": r.time_ms,
            "attempt": r.attempt, "delay_ms": r.delay_ms, "cause": r.cause})).collect::<Vec<_>>(),
        "failure": d.failure.as_ref().map(|f| json!({"time_ms": f.time_ms, "attempt": f.attempt,
            "cause": f.cause, "reason": f.reason})),
        "upgrade": d.upgrade.as_ref().map(|u| json!({"from_version": u.from_version, "to_version": u.to_version,
            "phase": u.phase, "gate_deadline_ms": u.gate_deadline_ms, "reason": u.reason,
            "rolled_back": u.rolled_back, "started_at_ms": u.started_at_ms})),
        "versions": d.versions.iter().map(|v| json!({"version": v.version, "state": v.state,
            "parallelism": v.parallelism, "created_at_ms": v.created_at_ms,
            "restored_from": v.restored_from.as_ref().map(checkpoint_ref_json)})).collect::<Vec<_>>(),
        "checkpoint_interval_ms": d.checkpoint_interval_ms,
        "checkpoints": d.checkpoints.iter().map(|c| json!({"id": c.checkpoint_id, "state": c.state,
            "trigger_time_ms": c.trigger_time_ms, "duration_ms": c.duration_ms, "size_bytes": c.size_bytes,
            "failure": c.failure, "version": c.version, "attempt": c.attempt, "acknowledged": c.acknowledged,
            "total_tasks": c.total_tasks, "metadata_path": c.metadata_path})).collect::<Vec<_>>(),
        "restored_from": d.restored_from.as_ref().map(checkpoint_ref_json),
        "throughput": throughput_json(&d.throughput.unwrap_or_default()),
        "warnings": d.warnings,
        "tasks": d.tasks.iter().map(task_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_the_throughput_line_read_well() {
        assert_eq!(rate(0.0), "0");
        assert_eq!(rate(f64::NAN), "0");
        assert_eq!(rate(3.254), "3.25");
        assert_eq!(rate(812.54), "812.5");
        assert_eq!(rate(12034.4), "12034");
        assert_eq!(throughput_line(None), None);
        assert_eq!(throughput_line(Some(&pb::JobThroughput::default())), None);
        let t = pb::JobThroughput {
            records_in_per_second: 812.5,
            records_out_per_second: 810.0,
            pending_records: Some(42),
            max_emit_event_time_lag_ms: Some(350),
            tasks_reporting: 2,
            ..Default::default()
        };
        assert_eq!(
            throughput_line(Some(&t)).as_deref(),
            Some("throughput: 812.5 records/s in, 810.0 records/s out, 42 records pending, max lag 350 ms")
        );
        let unknown = pb::JobThroughput { tasks_reporting: 1, ..Default::default() };
        assert_eq!(
            throughput_line(Some(&unknown)).as_deref(),
            Some("throughput: 0 records/s in, 0 records/s out")
        );
    }

    #[test]
    fn status_json_has_throughput_warnings_and_task_rates() {
        let d = pb::JobDetails {
            throughput: Some(pb::JobThroughput {
                records_in_per_second: 5.0,
                tasks_reporting: 1,
                ..Default::default()
            }),
            warnings: vec!["uneven".into()],
            tasks: vec![pb::TaskDetails {
                records_in_per_second: 5.0,
                pending_records: Some(3),
                source_partitions: vec![pb::SourcePartitions {
                    source: "in".into(),
                    topic: "t".into(),
                    partitions: 3,
                    assigned: 2,
                    spread_warning: "uneven".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let j = details_json(&d);
        assert_eq!(j["throughput"]["records_in_per_second"], 5.0);
        assert_eq!(j["throughput"]["pending_records"], serde_json::Value::Null);
        assert_eq!(j["warnings"][0], "uneven");
        assert_eq!(j["tasks"][0]["records_in_per_second"], 5.0);
        assert_eq!(j["tasks"][0]["pending_records"], 3);
        assert_eq!(j["tasks"][0]["source_partitions"][0]["partitions"], 3);
        assert_eq!(j["failure"], serde_json::Value::Null);
        assert_eq!(j["restart_history"], json!([]));
    }

    #[test]
    fn status_json_has_the_restart_history_and_the_failure() {
        let d = pb::JobDetails {
            restarts: 2,
            restart_strategy: "fixed-delay (2 restart attempts, 1 s delay)".into(),
            restart_history: vec![pb::RestartEvent {
                time_ms: 5,
                attempt: 1,
                restart: 1,
                cause: "task t failed: boom".into(),
                delay_ms: 1000,
            }],
            failure: Some(pb::JobFailure {
                time_ms: 9,
                attempt: 3,
                cause: "task t failed: boom".into(),
                reason: "fixed-delay restart strategy exhausted".into(),
            }),
            ..Default::default()
        };
        let j = details_json(&d);
        assert_eq!(j["restarts"], 2);
        assert_eq!(j["restart_strategy"], "fixed-delay (2 restart attempts, 1 s delay)");
        assert_eq!(j["restart_history"][0]["delay_ms"], 1000);
        assert_eq!(j["restart_history"][0]["cause"], "task t failed: boom");
        assert_eq!(j["failure"]["attempt"], 3);
        assert_eq!(j["failure"]["reason"], "fixed-delay restart strategy exhausted");
    }
}
