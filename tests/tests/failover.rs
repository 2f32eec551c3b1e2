//! Leader failover of the JobManager and the ResourceManager, with real processes, on each HA
//! backend: local (lock files), etcd (3 members) and raft (3 `keel ha-member` processes), with a
//! lease TTL of 3 s where there is a lease.

use std::time::{Duration, Instant};

use keel_tests::{
    datagen_to_file_spec, lines_in, metrics_address, metrics_tasks, on_backends, wait_until, Backend, Sandbox,
};

const LONG: Duration = Duration::from_secs(60);

fn max_attempt(status: &serde_json::Value) -> u64 {
    status["tasks"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["attempt"].as_u64()).max().unwrap_or(0))
        .unwrap_or(0)
}

fn task_ids(status: &serde_json::Value) -> Vec<String> {
    status["tasks"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["task_id"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

fn completed_checkpoints(status: &serde_json::Value) -> Vec<u64> {
    status["checkpoints"]
        .as_array()
        .map(|cs| cs.iter().filter(|c| c["state"] == "completed").filter_map(|c| c["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// Waits until `done` holds for the job's status; a timeout names the job's state, status
/// message and attempt.
fn wait_for_job(
    sb: &Sandbox,
    job: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    wait_until(what, LONG, || {
        let s = sb.status(job)?;
        if done(&s) {
            return Ok(Some(s));
        }
        Err(anyhow::anyhow!(
            "job {} ({}), attempt {}",
            s["job"]["state"],
            s["status_message"],
            max_attempt(&s)
        ))
    })
}

/// Kills the JobManager leader with SIGKILL while a checkpointing job runs. Proves: a standby
/// takes over with a higher epoch, recovers the job from the HA store and *adopts* its running
/// tasks instead of restarting them: the same task ids (same attempt), no restart, the output
/// keeps growing, and checkpoints complete again under the new leader (the adopted tasks
/// answer its triggers and their acknowledgements are accepted). If adoption did not happen the
/// tasks would carry a new attempt number. Returns the time from the kill to the adoption.
fn jobmanager_failover(mut sb: Sandbox, backend: Backend) -> anyhow::Result<Duration> {
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm-a", &[])?;
    sb.start("jobmanager", "jm-b", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let out = sb.dir.join("out");
    let spec = format!(
        "{}config:\n  execution.checkpointing.interval: 300 ms\n",
        datagen_to_file_spec("failover", 2, 200, None, &out)
    );
    let spec = sb.write_spec("job", &spec)?;
    let run = sb.keel(&["run", spec.to_str().unwrap_or_default()])?;
    assert!(run.status.success(), "keel run failed: {}", String::from_utf8_lossy(&run.stderr));

    let before = wait_until("a first checkpoint", LONG, || {
        let s = sb.status("failover")?;
        Ok((!completed_checkpoints(&s).is_empty()).then_some(s))
    })?;
    let job_id = before["job"]["job_id"].as_str().unwrap_or_default().to_string();
    let attempt_before = max_attempt(&before);
    let tasks_before = task_ids(&before);
    let cluster = sb.cluster()?;
    let old_epoch = cluster["jobmanager"]["epoch"].as_u64().unwrap_or(0);
    let leader = cluster["jobmanager"]["leader"].as_str().unwrap_or_default().to_string();
    let leader_proc = sb.by_address(&leader).map(|p| p.proc.name.clone());
    let leader_name =
        leader_proc.ok_or_else(|| anyhow::anyhow!("leader {leader} is not a sandbox process"))?;
    let survivor = if leader_name == "jm-a" { "jm-b" } else { "jm-a" };

    let killed_at = Instant::now();
    sb.proc(&leader_name).proc.kill9();

    let status = wait_for_job(&sb, &job_id, "the new jobmanager leader to adopt the running tasks", |s| {
        s["job"]["state"] == "running" && s["status_message"].as_str().unwrap_or_default().contains("adopted")
    })?;
    let takeover = killed_at.elapsed();

    let cluster = sb.cluster()?;
    let new_epoch = cluster["jobmanager"]["epoch"].as_u64().unwrap_or(0);
    assert!(new_epoch > old_epoch, "epoch must increase: {old_epoch} -> {new_epoch}");
    assert_eq!(cluster["jobmanager"]["leader"], sb.proc(survivor).address.as_str());
    assert_eq!(status["job"]["job_id"], job_id.as_str(), "the same job was recovered");
    assert_eq!(max_attempt(&status), attempt_before, "adopted, not restarted: {status}");
    assert_eq!(task_ids(&status), tasks_before, "the same tasks run on: {status}");
    assert_eq!(status["restarts"], 0, "no restart: {status}");
    let newest_before = completed_checkpoints(&status).into_iter().max().unwrap_or(0);
    wait_until("a checkpoint completed by the new leader", LONG, || {
        let s = sb.status(&job_id)?;
        Ok(completed_checkpoints(&s).into_iter().any(|id| id > newest_before).then_some(()))
    })?;
    let lines = lines_in(&out);
    wait_until("output to grow after the takeover", LONG, || Ok((lines_in(&out) > lines).then_some(())))?;
    let after = sb.status(&job_id)?;
    assert_eq!(max_attempt(&after), attempt_before, "still the adopted attempt: {after}");
    assert!(
        after["tasks"].as_array().is_some_and(|ts| ts.iter().all(|t| t["state"] == "running")),
        "{after}"
    );
    println!(
        "jobmanager takeover on {}: {} ms (kill -9 to the running tasks adopted by the new leader)",
        backend.name(),
        takeover.as_millis()
    );
    Ok(takeover)
}

/// A sandbox on `backend` with a lease TTL of 3 s (etcd, raft).
fn sandbox(backend: Backend, test: &str) -> anyhow::Result<Sandbox> {
    match backend.lease_ttl_key() {
        Some(key) => Sandbox::on(backend, test, &[(key, "3 s")]),
        None => Sandbox::on(backend, test, &[]),
    }
}

/// The standby JobManager takes over once the leader is gone (its lease expired on etcd and
/// raft; the kernel released its lock file on local) and adopts the running job.
fn jobmanager_leader_killed(backend: Backend) -> anyhow::Result<()> {
    jobmanager_failover(sandbox(backend, "jm-failover")?, backend)?;
    Ok(())
}
on_backends!(jobmanager_leader_killed_standby_recovers_job, jobmanager_leader_killed, [Local, Etcd, Raft]);

/// Kills the JobManager leader and, at the same moment, one of the two TaskManagers running
/// the job's tasks (kill -9 both). Proves that a new leader does not adopt part of an attempt:
/// the task on the surviving TaskManager is reported to it, but the attempt is incomplete, so
/// the job restarts from its latest checkpoint with a new attempt on free slots, and the
/// surviving TaskManager no longer runs the old attempt's task (canceled: it would otherwise
/// write beside its successor). Also prints how long the new leader took to decide: it restarts
/// as soon as every TaskManager that holds a slot of the job has reported, not after waiting
/// out three heartbeats.
fn jobmanager_and_taskmanager_killed(backend: Backend) -> anyhow::Result<()> {
    let mut sb = sandbox(backend, "jm-tm-killed")?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm-a", &[])?;
    sb.start("jobmanager", "jm-b", &[])?;
    for tm in ["tm-1", "tm-2", "tm-3"] {
        sb.start("taskmanager", tm, &["taskmanager.numberOfTaskSlots=1".into()])?;
    }
    let out = sb.dir.join("out");
    let spec = format!(
        "{}config:\n  execution.checkpointing.interval: 300 ms\n",
        datagen_to_file_spec("pair", 2, 100, None, &out)
    );
    sb.run_spec("job", &spec, &[])?;
    let before = wait_until("a first checkpoint", LONG, || {
        let s = sb.status("pair")?;
        Ok((!completed_checkpoints(&s).is_empty()).then_some(s))
    })?;
    let attempt = max_attempt(&before);
    let placed: Vec<(String, String)> = before["tasks"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    let tm = t["taskmanager_id"].as_str().unwrap_or_default().to_string();
                    (t["task_id"].as_str().unwrap_or_default().to_string(), tm)
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(placed.len(), 2, "{before}");
    assert_ne!(placed[0].1, placed[1].1, "one slot per taskmanager: {before}");
    let (victim, (survivor_task, survivor)) = (placed[0].1.clone(), placed[1].clone());
    let survivor_metrics = metrics_address(&mut sb, &survivor)?;
    assert!(metrics_tasks(&survivor_metrics)?.contains(&survivor_task), "the survivor runs its task");
    let cluster = sb.cluster()?;
    let leader = cluster["jobmanager"]["leader"].as_str().unwrap_or_default().to_string();
    let leader_name = sb.by_address(&leader).map(|p| p.proc.name.clone()).unwrap_or_default();
    let standby = if leader_name == "jm-a" { "jm-b" } else { "jm-a" };

    // The new leader trusts the ResourceManager's list of slot holders once it has led for
    // heartbeat.timeout (5 s): before that, its table may still miss a TaskManager.
    wait_until("the resourcemanager to have led for heartbeat.timeout", LONG, || {
        let led = sb.cluster()?["resourcemanager"]["leader_for_ms"].as_u64().unwrap_or(0);
        Ok((led >= 5_000).then_some(()))
    })?;
    let killed_at = Instant::now();
    sb.proc(&leader_name).proc.kill9();
    sb.proc(&victim).proc.kill9();

    let status = wait_for_job(&sb, "pair", "the job to run again with a new attempt", |s| {
        s["job"]["state"] == "running"
            && max_attempt(s) > attempt
            && s["tasks"].as_array().is_some_and(|ts| ts.iter().all(|t| t["state"] == "running"))
    })?;
    let running_again = killed_at.elapsed();
    assert!(!status["status_message"].as_str().unwrap_or_default().contains("adopted"), "{status}");
    assert!(
        status["tasks"]
            .as_array()
            .is_some_and(|ts| ts.iter().all(|t| t["taskmanager_id"] != victim.as_str())),
        "nothing runs on the killed taskmanager: {status}"
    );
    // The old attempt's task on the survivor was canceled, not left running beside the new one.
    wait_until("the old attempt's task to leave the surviving taskmanager", LONG, || {
        Ok((!metrics_tasks(&survivor_metrics)?.contains(&survivor_task)).then_some(()))
    })?;
    let lines = lines_in(&out);
    wait_until("output to grow after the restart", LONG, || Ok((lines_in(&out) > lines).then_some(())))?;
    let log = sb.proc(standby).proc.log_text();
    assert!(
        log.contains("every taskmanager holding the job's slots has reported"),
        "the new leader decided once the surviving slot holder had reported, not by waiting out its heartbeats"
    );
    println!(
        "jobmanager and taskmanager killed together: job running again with attempt {} after {} ms",
        max_attempt(&status),
        running_again.as_millis()
    );
    Ok(())
}

/// Kills the ResourceManager leader with SIGKILL while a job runs. Proves: the TaskManagers
/// re-register with the standby, whose slot table is rebuilt from their reports (the job's
/// slots show as used), and the running job is not restarted (same attempt, no restart, output
/// keeps growing).
fn resourcemanager_leader_killed(backend: Backend) -> anyhow::Result<()> {
    let mut sb = sandbox(backend, "rm-failover")?;
    sb.start("resourcemanager", "rm-a", &[])?;
    sb.start("resourcemanager", "rm-b", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=1".into()])?;
    sb.start("taskmanager", "tm-2", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let out = sb.dir.join("out");
    let spec = sb.write_spec("job", &datagen_to_file_spec("steady", 2, 200, None, &out))?;
    let run = sb.keel(&["run", spec.to_str().unwrap_or_default()])?;
    assert!(run.status.success(), "keel run failed: {}", String::from_utf8_lossy(&run.stderr));
    let before = sb.status("steady")?;
    let attempt = max_attempt(&before);

    let cluster = sb.cluster()?;
    let old_epoch = cluster["resourcemanager"]["epoch"].as_u64().unwrap_or(0);
    let leader = cluster["resourcemanager"]["leader"].as_str().unwrap_or_default().to_string();
    let name = sb.by_address(&leader).map(|p| p.proc.name.clone()).unwrap_or_default();
    let killed_at = Instant::now();
    sb.proc(&name).proc.kill9();

    wait_until("a new resourcemanager leader with both taskmanagers and the job's slots", LONG, || {
        let c = sb.cluster()?;
        let epoch = c["resourcemanager"]["epoch"].as_u64().unwrap_or(0);
        let tms = c["taskmanagers"].as_array().map(|a| a.len()).unwrap_or(0);
        let used = c["slots"]["used"].as_u64().unwrap_or(0);
        Ok((epoch > old_epoch && tms == 2 && used == 2).then_some(()))
    })?;
    let takeover = killed_at.elapsed();
    println!(
        "resourcemanager takeover on {} (lease TTL 3 s where leased): {} ms (kill -9 to slot table rebuilt)",
        backend.name(),
        takeover.as_millis()
    );

    let lines = lines_in(&out);
    wait_until("output to keep growing", LONG, || Ok((lines_in(&out) > lines + 100).then_some(())))?;
    let after = sb.status("steady")?;
    assert_eq!(after["job"]["state"], "running");
    assert_eq!(max_attempt(&after), attempt, "the job must not have been redeployed");
    assert_eq!(after["restarts"], 0);
    Ok(())
}
on_backends!(
    jobmanager_and_taskmanager_killed_together_job_restarts_without_partial_adoption,
    jobmanager_and_taskmanager_killed,
    [Local, Etcd, Raft]
);
on_backends!(
    resourcemanager_leader_killed_taskmanagers_reregister_job_untouched,
    resourcemanager_leader_killed,
    [Local, Etcd, Raft]
);
