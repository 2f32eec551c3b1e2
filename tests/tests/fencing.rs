//! Fencing by leader epochs, checked against real processes over gRPC, on each HA backend (local,
//! etcd with 3 members, raft with 3 `keel ha-member` processes).

use std::time::{Duration, Instant};

use keel_proto::pb::resource_manager_client::ResourceManagerClient;
use keel_proto::pb::task_manager_client::TaskManagerClient;
use keel_proto::pb::{self, LeaderStamp};
use keel_proto::KeelError;
use keel_tests::{
    datagen_to_file_spec, lines_in, metrics_address, metrics_tasks, on_backends, wait_until, Backend, Sandbox,
};

const LONG: Duration = Duration::from_secs(60);

/// After a JobManager failover, requests stamped with the deposed leader's epoch are refused
/// with a typed `StaleEpoch` error that carries both epochs: by the TaskManager (deploy and
/// cancel) and by the ResourceManager (slot release). The refused cancel has no effect: the
/// task of the new leader keeps running (it writes on after the refusal was answered) and the
/// refused release frees no slot. A request that reaches the standby is refused with a typed
/// `NotLeader` error carrying the leader's address.
fn deposed_jobmanager_epoch(backend: Backend) -> anyhow::Result<()> {
    let mut sb = Sandbox::on(backend, "fencing", &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm-a", &[])?;
    sb.start("jobmanager", "jm-b", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let spec = sb.write_spec("job", &datagen_to_file_spec("fenced", 1, 50, None, &sb.dir.join("out")))?;
    let run = sb.keel(&["run", spec.to_str().unwrap_or_default()])?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let cluster = sb.cluster()?;
    let old_epoch = cluster["jobmanager"]["epoch"].as_u64().unwrap_or(0);
    let leader = cluster["jobmanager"]["leader"].as_str().unwrap_or_default().to_string();
    let leader_name = sb.by_address(&leader).map(|p| p.proc.name.clone()).unwrap_or_default();
    let standby_addr = sb
        .procs
        .iter()
        .find(|p| p.role == "jobmanager" && p.address != leader)
        .map(|p| p.address.clone())
        .unwrap_or_default();

    let rt = tokio::runtime::Runtime::new()?;
    // A standby answers with NotLeader and the leader's address.
    let err = rt.block_on(async {
        let mut c =
            keel_proto::pb::job_manager_client::JobManagerClient::new(keel_client::channel(&standby_addr)?);
        match c.list_jobs(pb::ListJobsRequest {}).await {
            Ok(_) => anyhow::bail!("a standby served ListJobs"),
            Err(s) => Ok(KeelError::from_status(&s, &standby_addr)),
        }
    })?;
    assert_eq!(err, KeelError::NotLeader { role: "jobmanager".into(), leader: Some(leader.clone()) });

    sb.proc(&leader_name).proc.kill9();
    let status = wait_until("a new leader running the job", LONG, || {
        let c = sb.cluster()?;
        let epoch = c["jobmanager"]["epoch"].as_u64().unwrap_or(0);
        let s = sb.status("fenced")?;
        let attempt_by_new = s["tasks"].as_array().is_some_and(|ts| !ts.is_empty());
        Ok((epoch > old_epoch && s["job"]["state"] == "running" && attempt_by_new).then_some((epoch, s)))
    })?;
    let (new_epoch, status) = status;
    let task = &status["tasks"][0];
    let task_id = task["task_id"].as_str().unwrap_or_default().to_string();
    let tm_addr = task["taskmanager_address"].as_str().unwrap_or_default().to_string();
    let job_id = status["job"]["job_id"].as_str().unwrap_or_default().to_string();
    let stale = Some(LeaderStamp { epoch: old_epoch, address: leader.clone() });
    let expected = KeelError::StaleEpoch { role: "jobmanager".into(), received: old_epoch, seen: new_epoch };

    let rm_addr = sb.cluster()?["resourcemanager"]["leader"].as_str().unwrap_or_default().to_string();
    rt.block_on(async {
        let mut tm = TaskManagerClient::new(keel_client::channel(&tm_addr)?);
        let cancel = tm
            .cancel_task(pb::CancelTaskRequest { jobmanager: stale.clone(), task_id: task_id.clone() })
            .await;
        let err = KeelError::from_status(&cancel.expect_err("stale cancel must be refused"), &tm_addr);
        assert_eq!(err, expected, "taskmanager refuses a cancel from the deposed leader");

        let deploy = tm
            .deploy_task(pb::DeployTaskRequest {
                jobmanager: stale.clone(),
                task_id: "intruder".into(),
                job_id: job_id.clone(),
                ..Default::default()
            })
            .await;
        let err = KeelError::from_status(&deploy.expect_err("stale deploy must be refused"), &tm_addr);
        assert_eq!(err, expected, "taskmanager refuses a deploy from the deposed leader");

        let mut rm = ResourceManagerClient::new(keel_client::channel(&rm_addr)?);
        let release = rm
            .release_slots(pb::ReleaseSlotsRequest {
                jobmanager: stale.clone(),
                job_id: job_id.clone(),
                ..Default::default()
            })
            .await;
        let err = KeelError::from_status(&release.expect_err("stale release must be refused"), &rm_addr);
        assert_eq!(err, expected, "resourcemanager refuses a release from the deposed leader");
        anyhow::Ok(())
    })?;

    // The refused cancel and release changed nothing: the task goes on writing (100 more
    // records, 2 s at 50/s, after the refusals were answered; a canceled task stops), and the
    // same attempt still holds its slot.
    let out = sb.dir.join("out");
    let refused_at = lines_in(&out);
    wait_until("the task to go on writing after the refused cancel", LONG, || {
        Ok((lines_in(&out) >= refused_at + 100).then_some(()))
    })?;
    let after = sb.status("fenced")?;
    assert_eq!(after["job"]["state"], "running");
    assert_eq!(after["tasks"][0]["task_id"], task_id.as_str());
    assert_eq!(after["tasks"][0]["state"], "running");
    assert_eq!(sb.cluster()?["slots"]["used"], 1);
    Ok(())
}

/// A TaskManager cut off from the JobManager (here: the only JobManager is SIGSTOPped for
/// longer than `heartbeat.timeout`) stops its tasks on its own: by then the leader would have
/// declared it lost and deployed the tasks elsewhere, and two attempts must not write at once.
/// Proves: while the JobManager is still stopped, the TaskManager logs that it cancels every
/// task and its tasks end (their series leave its `/metrics`, which happens when a task has
/// ended, so the output stops), within 10 s; once the JobManager runs again the job is
/// restarted in a new attempt and writes again.
fn taskmanager_cut_off(backend: Backend) -> anyhow::Result<()> {
    let mut sb = Sandbox::on(backend, "cut-off", &[("heartbeat.timeout", "3 s")])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let out = sb.dir.join("out");
    let spec = sb.write_spec("job", &datagen_to_file_spec("cutoff", 2, 200, None, &out))?;
    let run = sb.keel(&["run", spec.to_str().unwrap_or_default()])?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    wait_until("output", LONG, || Ok((lines_in(&out) > 100).then_some(())))?;
    let attempt_before = sb.status("cutoff")?["tasks"][0]["attempt"].as_u64().unwrap_or(0);

    let metrics = metrics_address(&mut sb, "tm-1")?;
    let task_ids = metrics_tasks(&metrics)?;
    assert_eq!(task_ids.len(), 2, "both subtasks run on tm-1: {task_ids:?}");

    sb.proc("jm").proc.signal("STOP")?;
    let stop_at = Instant::now();
    // heartbeat.timeout (3 s) without an answer: the TaskManager says it cancels every task, and
    // the tasks end (a task's series leave the TaskManager's /metrics when it has ended; an
    // ended task writes no more).
    let stopped =
        wait_until("the cut-off taskmanager to end its tasks while the jobmanager is stopped", LONG, || {
            let said = sb
                .proc("tm-1")
                .proc
                .log_text()
                .contains("no jobmanager leader heard from for heartbeat.timeout");
            let running = metrics_tasks(&metrics)?;
            Ok((said && running.is_disjoint(&task_ids)).then(|| (lines_in(&out), stop_at.elapsed())))
        });
    sb.proc("jm").proc.signal("CONT")?;
    let (stopped, after) = stopped?;
    println!(
        "the cut-off TaskManager had ended its tasks at {stopped} lines, {} ms after the SIGSTOP",
        after.as_millis()
    );
    // The cut-off must come about when the leader declares the TaskManager lost (3 s), not when
    // a heartbeat call to the stopped JobManager finally fails (the HTTP/2 keep-alive, 15 s):
    // the bound is generous, and a heartbeat loop stuck in that call misses it.
    assert!(after < Duration::from_secs(10), "the tasks were stopped only {after:?} after the cut-off began");

    let status = wait_until("the job to run again in a new attempt", LONG, || {
        let s = sb.status("cutoff")?;
        let attempt = s["tasks"][0]["attempt"].as_u64().unwrap_or(0);
        Ok((s["job"]["state"] == "running" && attempt > attempt_before).then_some(s))
    })?;
    wait_until("output again", LONG, || Ok((lines_in(&out) > stopped + 100).then_some(())))?;
    println!("job restarted: {}", status["status_message"]);
    Ok(())
}
on_backends!(deposed_jobmanager_epoch_is_rejected_everywhere, deposed_jobmanager_epoch, [Local, Etcd, Raft]);
on_backends!(
    a_taskmanager_cut_off_from_the_jobmanager_stops_its_tasks,
    taskmanager_cut_off,
    [Local, Etcd, Raft]
);
