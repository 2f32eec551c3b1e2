//! Checkpoints with real processes: periodic completion and retention, restore into a new job
//! (`keel run --restore`), and restore by a new JobManager leader. Every job is
//! `datagen -> file` (the file sink appends to `<out>/part-<subtask>` and fsyncs at each
//! barrier), so the output shows exactly where each attempt started.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use keel_tests::{datagen_to_file_spec, wait_until, Ha, Sandbox};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);
const PARALLELISM: u32 = 2;

/// A `datagen -> file` job of parallelism 2 checkpointing every 500 ms, keeping `retained`.
fn spec(name: &str, out: &Path, retained: u32) -> String {
    format!(
        "{}config:\n  execution.checkpointing.interval: 500 ms\n  state.checkpoints.num-retained: {retained}\n",
        datagen_to_file_spec(name, PARALLELISM, 200, None, out)
    )
}

fn run(sb: &Sandbox, spec: &Path, extra: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["run", spec.to_str().unwrap_or_default()];
    args.extend_from_slice(extra);
    let out = sb.keel(&args)?;
    if !out.status.success() {
        bail!("keel {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn cancel(sb: &Sandbox, job: &str) -> anyhow::Result<()> {
    let out = sb.keel(&["cancel", job])?;
    if !out.status.success() {
        bail!("keel cancel {job} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn job_id(status: &Value) -> String {
    status["job"]["job_id"].as_str().unwrap_or_default().to_string()
}

/// Ids of the completed checkpoints in a status, in the order shown (oldest first).
fn completed_ids(status: &Value) -> Vec<u64> {
    status["checkpoints"]
        .as_array()
        .map(|cs| cs.iter().filter(|c| c["state"] == "completed").filter_map(|c| c["id"].as_u64()).collect())
        .unwrap_or_default()
}

fn max_attempt(status: &Value) -> u64 {
    status["tasks"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["attempt"].as_u64()).max().unwrap_or(0))
        .unwrap_or(0)
}

/// Waits until the job shows at least `n` completed checkpoints; returns its status.
fn wait_completed(sb: &Sandbox, job: &str, n: usize) -> anyhow::Result<Value> {
    wait_until(&format!("{n} completed checkpoints of {job}"), LONG, || {
        let s = sb.status(job)?;
        let done = completed_ids(&s);
        if done.len() >= n {
            Ok(Some(s))
        } else {
            Err(anyhow!("completed so far: {done:?}; checkpoints: {}", s["checkpoints"]))
        }
    })
}

/// The job's HA checkpoint pointer, read from the local HA store's file.
fn pointer(sb: &Sandbox, job_id: &str) -> anyhow::Result<Value> {
    let path = sb.dir.join("ha").join("test").join("meta").join("checkpoints").join(job_id);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn metadata(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The next datagen sequence number of each subtask recorded in a checkpoint's metadata (each
/// subtask of a job that never rescaled owns one split: its own progression).
fn positions(metadata: &Value) -> anyhow::Result<Vec<i64>> {
    let mut out = vec![None; PARALLELISM as usize];
    for s in metadata["subtasks"].as_array().ok_or_else(|| anyhow!("no subtasks in {metadata}"))? {
        let subtask = s["subtask"].as_u64().ok_or_else(|| anyhow!("no subtask index in {s}"))? as usize;
        let splits = s["state"]["sources"]["numbers"]["splits"]
            .as_array()
            .ok_or_else(|| anyhow!("no datagen splits in {s}"))?;
        let [split] = splits.as_slice() else {
            anyhow::bail!("subtask {subtask} owns {} splits, not 1: {s}", splits.len())
        };
        anyhow::ensure!(split["step"] == PARALLELISM, "subtask {subtask}: a split of another step: {s}");
        let next = split["next"].as_i64().ok_or_else(|| anyhow!("no datagen position in {s}"))?;
        *out.get_mut(subtask).ok_or_else(|| anyhow!("subtask {subtask} out of range"))? = Some(next);
    }
    out.into_iter().enumerate().map(|(i, p)| p.ok_or_else(|| anyhow!("subtask {i} missing"))).collect()
}

fn part(out: &Path, subtask: u32) -> PathBuf {
    out.join(format!("part-{subtask}"))
}

fn parse_numbers(text: &str, what: &str) -> anyhow::Result<Vec<i64>> {
    text.lines()
        .map(|l| l.trim().parse::<i64>().with_context(|| format!("{what}: line {l:?} is not a number")))
        .collect()
}

/// The numbers in `part-<subtask>`, in file order.
fn numbers(out: &Path, subtask: u32) -> anyhow::Result<Vec<i64>> {
    let path = part(out, subtask);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_numbers(&text, &path.display().to_string())
}

/// The largest number each subtask has written so far (-1 for none).
fn max_written(out: &Path) -> Vec<i64> {
    (0..PARALLELISM).map(|i| numbers(out, i).ok().and_then(|n| n.into_iter().max()).unwrap_or(-1)).collect()
}

/// The output of a job restored at `restored` (the next sequence number of each subtask) is
/// exactly-continuous at least-once: for every subtask `i` the numbers it wrote are every number
/// `i, i+p, i+2p, ...` up to its largest without a gap, and every number written more than once
/// is at or after the restored position (only the records after the checkpoint are replayed).
fn assert_continuous_from(out: &Path, restored: &[i64]) -> anyhow::Result<()> {
    let p = i64::from(PARALLELISM);
    for subtask in 0..PARALLELISM {
        let all = numbers(out, subtask)?;
        let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
        for n in &all {
            *counts.entry(*n).or_default() += 1;
        }
        let position = restored[subtask as usize];
        let max = counts.keys().next_back().copied().unwrap_or(-1);
        assert!(
            max >= position,
            "subtask {subtask}: output ends at {max}, before the restored position {position}"
        );
        let mut expected = i64::from(subtask);
        for n in counts.keys() {
            assert_eq!(
                *n, expected,
                "subtask {subtask}: gap or foreign number in the output (expected {expected}, found {n})"
            );
            expected += p;
        }
        let early: Vec<i64> =
            counts.iter().filter(|(n, c)| **c > 1 && **n < position).map(|(n, _)| *n).collect();
        assert!(
            early.is_empty(),
            "subtask {subtask}: numbers before the restored position {position} were written twice: {:?}",
            &early[..early.len().min(20)]
        );
        let dups = counts.values().filter(|c| **c > 1).count();
        println!(
            "subtask {subtask}: {} lines, numbers {}..={max} without a gap, {dups} replayed after position {position}",
            all.len(),
            subtask
        );
    }
    Ok(())
}

/// Checkpoints complete periodically: the status shows completed checkpoints with increasing
/// ids and the configured interval; after the job stops, exactly `num-retained` checkpoint
/// directories are left (the job's own `config:` value, which overrides the cluster's), they are
/// the newest completed ones, each holds a `_metadata` file with the state of every subtask,
/// and the HA pointer names the latest.
#[test]
fn checkpoints_complete_periodically_and_old_ones_are_deleted() -> anyhow::Result<()> {
    let mut sb = Sandbox::new("chk-periodic", Ha::Local, &[("state.checkpoints.num-retained", "5")])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let out = sb.dir.join("out");
    let spec_path = sb.write_spec("job", &spec("periodic", &out, 3))?;
    run(&sb, &spec_path, &[])?;

    let status = wait_completed(&sb, "periodic", 6)?;
    let id = job_id(&status);
    assert_eq!(status["checkpoint_interval_ms"], 500);
    let ids = completed_ids(&status);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "completed ids must increase: {ids:?}");
    let triggers: Vec<u64> = status["checkpoints"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["trigger_time_ms"].as_u64()).collect())
        .unwrap_or_default();
    assert!(triggers.windows(2).all(|w| w[0] <= w[1]), "trigger times must not go back: {triggers:?}");
    for c in status["checkpoints"].as_array().into_iter().flatten().filter(|c| c["state"] == "completed") {
        assert!(c["size_bytes"].as_u64().unwrap_or(0) > 0, "a completed checkpoint has state: {c}");
        assert_eq!(c["acknowledged"], 2, "every task acknowledged: {c}");
    }

    // Stop the job so nothing changes while the files are inspected.
    cancel(&sb, "periodic")?;
    let status = sb.status(&id)?;
    let ids = completed_ids(&status);
    let latest = *ids.last().ok_or_else(|| anyhow!("no completed checkpoint"))?;

    let job_dir = sb.dir.join("checkpoints").join(&id);
    let mut on_disk: Vec<u64> = std::fs::read_dir(&job_dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name().to_str().and_then(|n| n.strip_prefix("chk-")).and_then(|n| n.parse().ok())
        })
        .collect();
    on_disk.sort_unstable();
    let newest: Vec<u64> = ids.iter().rev().take(3).rev().copied().collect();
    assert_eq!(on_disk, newest, "exactly the 3 newest completed checkpoints are kept (status: {ids:?})");
    for chk in &on_disk {
        let meta = metadata(&job_dir.join(format!("chk-{chk}")).join("_metadata"))?;
        assert_eq!(meta["checkpoint_id"], *chk);
        assert_eq!(meta["job_id"], id.as_str());
        assert_eq!(meta["parallelism"], PARALLELISM);
        let pos = positions(&meta)?;
        assert!(pos.iter().enumerate().all(|(i, p)| *p >= i as i64), "positions {pos:?}");
    }

    let ptr = pointer(&sb, &id)?;
    assert_eq!(ptr["checkpoint_id"], latest, "the HA pointer names the latest completed checkpoint");
    assert_eq!(ptr["job_id"], id.as_str());
    let meta_path = job_dir.join(format!("chk-{latest}")).join("_metadata");
    assert_eq!(ptr["metadata_path"], meta_path.display().to_string().as_str());
    Ok(())
}

/// `keel run --restore` after a cancel: the new job starts from the old job's latest completed
/// checkpoint. Each subtask's first number in the new job is exactly the checkpointed sequence
/// number, the combined output has no gap, and numbers repeat only at or after the restored
/// position (the file sink is at-least-once). Without an earlier job, `--restore` is refused
/// with a clear error.
#[test]
fn cancel_then_run_restore_continues_from_the_checkpoint() -> anyhow::Result<()> {
    let mut sb = Sandbox::new("chk-restore", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let out = sb.dir.join("out");
    let spec_path = sb.write_spec("job", &spec("restorable", &out, 1))?;

    let refused = sb.keel(&["run", spec_path.to_str().unwrap_or_default(), "--restore"])?;
    assert!(!refused.status.success(), "--restore without an earlier job must fail");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no earlier job named"), "{stderr}");

    run(&sb, &spec_path, &[])?;
    let first = wait_completed(&sb, "restorable", 2)?;
    let old_id = job_id(&first);
    cancel(&sb, &old_id)?;

    let ptr = pointer(&sb, &old_id)?;
    let checkpoint = ptr["checkpoint_id"].as_u64().ok_or_else(|| anyhow!("pointer {ptr}"))?;
    let meta_path = PathBuf::from(ptr["metadata_path"].as_str().unwrap_or_default());
    let restored = positions(&metadata(&meta_path)?)?;
    let old_len: Vec<u64> =
        (0..PARALLELISM).map(|i| std::fs::metadata(part(&out, i)).map(|m| m.len()).unwrap_or(0)).collect();
    let old_max = max_written(&out);
    println!("old job {old_id}: checkpoint {checkpoint} at {restored:?}, output up to {old_max:?}");

    run(&sb, &spec_path, &["--restore"])?;
    let status = sb.status("restorable")?;
    let new_id = job_id(&status);
    assert_ne!(new_id, old_id);
    assert_eq!(status["restored_from"]["job_id"], old_id.as_str());
    assert_eq!(status["restored_from"]["checkpoint_id"], checkpoint);

    // Let the new job write well past where the old one stopped, and checkpoint on its own.
    wait_until("the restored job to write past the old output", LONG, || {
        let now = max_written(&out);
        Ok(now.iter().zip(&old_max).all(|(n, o)| *n > o + 100).then_some(()))
    })?;
    wait_completed(&sb, &new_id, 1)?;
    cancel(&sb, &new_id)?;

    for subtask in 0..PARALLELISM {
        let bytes = std::fs::read(part(&out, subtask))?;
        let start = old_len[subtask as usize] as usize;
        let tail = bytes.get(start..).ok_or_else(|| anyhow!("part-{subtask} shrank"))?;
        let new = parse_numbers(&String::from_utf8_lossy(tail), &format!("part-{subtask} (new job)"))?;
        assert_eq!(
            new.first().copied(),
            Some(restored[subtask as usize]),
            "subtask {subtask}: the restored job must start at the checkpointed sequence number"
        );
    }
    assert_continuous_from(&out, &restored)
}

/// Kills the JobManager leader (SIGKILL) while a checkpointing job runs. Returns the sandbox, the
/// job id and its attempt, the dead leader's name and the latest checkpoint it completed with the
/// source positions in it.
fn kill_jobmanager_leader_of_a_checkpointing_job(
    test: &str,
) -> anyhow::Result<(Sandbox, String, u64, String, u64, Vec<i64>)> {
    let mut sb = Sandbox::new(test, Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm-a", &[])?;
    sb.start("jobmanager", "jm-b", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let out = sb.dir.join("out");
    let spec_path = sb.write_spec("job", &spec("failover", &out, 2))?;
    run(&sb, &spec_path, &[])?;
    let before = wait_completed(&sb, "failover", 3)?;
    let id = job_id(&before);
    let attempt_before = max_attempt(&before);

    let cluster = sb.cluster()?;
    let leader = cluster["jobmanager"]["leader"].as_str().unwrap_or_default().to_string();
    let leader_name = sb
        .by_address(&leader)
        .map(|p| p.proc.name.clone())
        .ok_or_else(|| anyhow!("leader {leader} is not a sandbox process"))?;
    sb.proc(&leader_name).proc.kill9();
    // The old leader is dead: the pointer now names the last checkpoint it completed.
    let ptr = pointer(&sb, &id)?;
    let checkpoint = ptr["checkpoint_id"].as_u64().ok_or_else(|| anyhow!("pointer {ptr}"))?;
    let restored = positions(&metadata(Path::new(ptr["metadata_path"].as_str().unwrap_or_default()))?)?;
    assert!(
        restored.iter().enumerate().all(|(i, p)| *p > i as i64),
        "the checkpoint is past the start: {restored:?}"
    );
    println!("killed {leader_name}; latest checkpoint {checkpoint} at {restored:?}");
    Ok((sb, id, attempt_before, leader_name, checkpoint, restored))
}

/// Waits for a checkpoint above `checkpoint` and for the output of every subtask to grow.
fn wait_new_leader_checkpoints_and_output(sb: &Sandbox, id: &str, checkpoint: u64) -> anyhow::Result<()> {
    let out = sb.dir.join("out");
    let max_before = max_written(&out);
    let after = wait_until("a checkpoint completed by the new leader", LONG, || {
        let s = sb.status(id)?;
        Ok(completed_ids(&s).iter().any(|c| *c > checkpoint).then_some(s))
    })?;
    println!("new leader's checkpoints: {:?}", completed_ids(&after));
    wait_until("output to grow under the new leader", LONG, || {
        let now = max_written(&out);
        Ok(now.iter().zip(&max_before).all(|(n, o)| *n > o + 100).then_some(()))
    })?;
    Ok(())
}

/// The JobManager leader is killed (SIGKILL) while a checkpointing job runs with a standby
/// JobManager. The new leader adopts the running tasks (same attempt), keeps checkpointing
/// with higher ids, and since nothing restarted nothing is replayed: every subtask's output is
/// each of its numbers exactly once, without a gap. (A restart from the checkpoint would write
/// the numbers after its positions twice; a restart from 0 everything.)
#[test]
fn jobmanager_failover_adopts_the_tasks_and_writes_nothing_twice() -> anyhow::Result<()> {
    let (sb, id, attempt_before, _, checkpoint, _) =
        kill_jobmanager_leader_of_a_checkpointing_job("chk-failover-adopt")?;
    let status = wait_until("the new leader to adopt the running tasks", LONG, || {
        let s = sb.status(&id)?;
        let adopted = s["status_message"].as_str().unwrap_or_default().contains("adopted");
        if adopted && s["job"]["state"] == "running" {
            return Ok(Some(s));
        }
        Err(anyhow!("job {} attempt {} ({})", s["job"]["state"], max_attempt(&s), s["status_message"]))
    })?;
    assert_eq!(max_attempt(&status), attempt_before, "adopted, not restarted: {status}");
    wait_new_leader_checkpoints_and_output(&sb, &id, checkpoint)?;
    cancel(&sb, &id)?;
    let out = sb.dir.join("out");
    for subtask in 0..PARALLELISM {
        let all = numbers(&out, subtask)?;
        let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
        for n in &all {
            *counts.entry(*n).or_default() += 1;
        }
        let twice: Vec<i64> = counts.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
        assert!(twice.is_empty(), "subtask {subtask}: written twice: {:?}", &twice[..twice.len().min(20)]);
        let mut expected = i64::from(subtask);
        for n in counts.keys() {
            assert_eq!(*n, expected, "subtask {subtask}: gap in the output (expected {expected}, found {n})");
            expected += i64::from(PARALLELISM);
        }
        println!("subtask {subtask}: {} lines, each number once, no gap", all.len());
    }
    Ok(())
}

/// The JobManager leader and the only TaskManager are killed (SIGKILL) together while a
/// checkpointing job runs, and a new TaskManager joins: nothing is left to adopt, so the new
/// leader restarts the job from the latest checkpoint the old leader completed (status names
/// it), keeps checkpointing with higher ids, and the output continues from the checkpoint: no
/// gap, and only numbers at or after the checkpointed positions are written twice (a restart
/// from 0 would duplicate everything before them).
#[test]
fn jobmanager_failover_without_tasks_to_adopt_restores_from_the_latest_checkpoint() -> anyhow::Result<()> {
    let (mut sb, id, attempt_before, _, checkpoint, restored) =
        kill_jobmanager_leader_of_a_checkpointing_job("chk-failover-restore")?;
    sb.proc("tm-1").proc.kill9();
    sb.start("taskmanager", "tm-2", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let status = wait_until("the job to run again from the checkpoint under the new leader", LONG, || {
        let s = sb.status(&id)?;
        let ok = s["job"]["state"] == "running" && max_attempt(&s) > attempt_before;
        if ok {
            Ok(Some(s))
        } else {
            Err(anyhow!("job {} attempt {} ({})", s["job"]["state"], max_attempt(&s), s["status_message"]))
        }
    })?;
    assert_eq!(status["restored_from"]["checkpoint_id"], checkpoint, "restored from the latest checkpoint");
    assert_eq!(status["restored_from"]["job_id"], id.as_str());
    wait_new_leader_checkpoints_and_output(&sb, &id, checkpoint)?;
    cancel(&sb, &id)?;
    assert_continuous_from(&sb.dir.join("out"), &restored)
}
