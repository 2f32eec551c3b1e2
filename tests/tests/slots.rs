//! Slot allocation through the real ResourceManager, JobManager and TaskManagers.

use std::time::Duration;

use keel_tests::{datagen_to_file_spec, wait_until, Ha, Sandbox};

const LONG: Duration = Duration::from_secs(60);

/// A ResourceManager log line with `message` about the job `job_id`.
fn is_slot_log(line: &str, message: &str, job_id: &str) -> bool {
    line.contains(message) && line.contains(&format!("job_id={job_id} "))
}

fn one_slot() -> Vec<String> {
    vec!["taskmanager.numberOfTaskSlots=1".into()]
}

/// A job needing more slots than are free waits in `scheduled` (the slot request is queued),
/// then starts as soon as a TaskManager joins, with its subtasks spread over both TaskManagers.
/// Proves the request is all or nothing over the whole wait, not only at one look: while the
/// job waits its one free slot stays free, and the ResourceManager's log (every allocation is
/// logged) holds exactly one allocation for the job, of both slots, made after the second
/// TaskManager registered; no task can run without an allocation (TaskManagers refuse it).
#[test]
fn job_waits_for_slots_and_starts_when_a_taskmanager_joins() -> anyhow::Result<()> {
    let mut sb = Sandbox::new("slots-wait", Ha::Local, &[("slot.request.timeout", "2 min")])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &one_slot())?;
    let spec = sb.write_spec("job", &datagen_to_file_spec("wide", 2, 50, None, &sb.dir.join("out")))?;
    let run = sb.keel(&["run", "--detached", spec.to_str().unwrap_or_default()])?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let waiting = sb.wait_job_state("wide", "scheduled", LONG)?;
    assert!(
        waiting["status_message"].as_str().unwrap_or_default().contains("waiting for 2 slots"),
        "status says what the job waits for: {waiting}"
    );
    let job_id = waiting["job"]["job_id"].as_str().unwrap_or_default().to_string();
    // The request reached the ResourceManager, and the free slot was not taken for it.
    wait_until("the slot request at the resourcemanager", LONG, || {
        Ok(sb
            .proc("rm")
            .proc
            .log_text()
            .lines()
            .any(|l| is_slot_log(l, "slot request", &job_id))
            .then_some(()))
    })?;
    assert_eq!(waiting["tasks"].as_array().map(|t| t.len()), Some(0));
    assert_eq!(sb.cluster()?["slots"]["free"], 1, "the free slot is not allocated to half the job");

    sb.start("taskmanager", "tm-2", &one_slot())?;
    let running = sb.wait_job_state("wide", "running", LONG)?;
    let rm_log = sb.proc("rm").proc.log_text();
    let allocations: Vec<(usize, &str)> =
        rm_log.lines().enumerate().filter(|(_, l)| is_slot_log(l, "slots allocated", &job_id)).collect();
    assert_eq!(allocations.len(), 1, "one allocation for the job, of every slot: {allocations:?}");
    assert!(allocations[0].1.contains(" count=2"), "{allocations:?}");
    let tm2_registered = rm_log
        .lines()
        .position(|l| l.contains("taskmanager registered") && l.contains("taskmanager_id=tm-2 "))
        .ok_or_else(|| anyhow::anyhow!("tm-2 never registered:\n{rm_log}"))?;
    assert!(tm2_registered < allocations[0].0, "allocated only once tm-2 had registered");
    let mut tms: Vec<String> = running["tasks"]
        .as_array()
        .map(|ts| ts.iter().map(|t| t["taskmanager_id"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default();
    tms.sort();
    assert_eq!(tms, vec!["tm-1".to_string(), "tm-2".to_string()], "subtasks spread over taskmanagers");
    Ok(())
}

/// A slot request that cannot be served within `slot.request.timeout` is a failure of the job
/// with an error that says how many slots were needed and how many were free; with
/// `restart-strategy.type: none` it fails the job at once and `keel run` reports it. (With a
/// strategy that restarts, the job asks again after its restart delay.)
#[test]
fn slot_request_times_out_with_needed_and_free_counts() -> anyhow::Result<()> {
    let mut sb = Sandbox::new(
        "slots-timeout",
        Ha::Local,
        &[("slot.request.timeout", "2 s"), ("restart-strategy.type", "none")],
    )?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &one_slot())?;
    let spec = sb.write_spec("job", &datagen_to_file_spec("too-wide", 3, 50, None, &sb.dir.join("out")))?;
    let run = sb.keel(&["run", spec.to_str().unwrap_or_default()])?;
    assert!(!run.status.success(), "keel run must fail");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("not enough slots"), "{stderr}");
    assert!(stderr.contains("3 needed") && stderr.contains("1 free"), "{stderr}");
    let status = sb.status("too-wide")?;
    assert_eq!(status["job"]["state"], "failed");
    // The failed request left no slot allocated.
    let cluster = sb.cluster()?;
    assert_eq!(cluster["slots"]["free"], 1);
    Ok(())
}

/// Cancelling a running job stops its tasks and gives every slot back.
#[test]
fn cancel_frees_the_slots() -> anyhow::Result<()> {
    let mut sb = Sandbox::new("slots-cancel", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let spec = sb.write_spec("job", &datagen_to_file_spec("to-cancel", 2, 50, None, &sb.dir.join("out")))?;
    let run = sb.keel(&["run", spec.to_str().unwrap_or_default()])?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(sb.cluster()?["slots"]["used"], 2);

    let cancel = sb.keel(&["cancel", "to-cancel"])?;
    assert!(cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
    let status = sb.status("to-cancel")?;
    assert_eq!(status["job"]["state"], "canceled");
    assert!(
        status["tasks"].as_array().is_some_and(|ts| ts.iter().all(|t| t["state"] == "canceled")),
        "{status}"
    );
    wait_until("both slots to be free", LONG, || {
        let c = sb.cluster()?;
        Ok((c["slots"]["free"] == 2 && c["slots"]["used"] == 0).then_some(()))
    })?;
    Ok(())
}

/// A finite job (datagen with number-of-rows) finishes, writes exactly its rows, and frees its
/// slots.
#[test]
fn bounded_job_finishes_with_every_row_once() -> anyhow::Result<()> {
    let mut sb = Sandbox::new("slots-finish", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let out = sb.dir.join("out");
    let spec = sb.write_spec("job", &datagen_to_file_spec("bounded", 2, 5000, Some(1000), &out))?;
    let run = sb.keel(&["run", spec.to_str().unwrap_or_default()])?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    sb.wait_job_state("bounded", "finished", LONG)?;
    let mut numbers: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(&out)? {
        for line in std::fs::read_to_string(entry?.path())?.lines() {
            numbers.push(line.trim().parse()?);
        }
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (0..1000).collect::<Vec<u64>>(), "every row exactly once");
    wait_until("slots to be free", LONG, || Ok((sb.cluster()?["slots"]["free"] == 2).then_some(())))?;
    Ok(())
}
