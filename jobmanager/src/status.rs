//! Status views: a job as `keel list` ([`JobHandle::summary`]) and `keel status` ([`details`])
//! show it, built from the leader's job handle (record, task table, latest task reports,
//! checkpoint statistics) and the cluster's configuration. Read-only: nothing here writes.

use std::time::{Duration, Instant};

use keel_config::{Config, RestartConfig};
use keel_proto::pb::{self, TaskState};
use keel_spec::JobSpec;

use crate::record::{JobRecord, RestoredFrom, TaskRecord};
use crate::restart;
use crate::state::JobHandle;
use crate::upgrade_phase::Upgrade;

impl JobHandle {
    /// The job as `keel list` shows it.
    pub(crate) fn summary(&self) -> pb::JobSummary {
        let r = self.record();
        let tasks = self.tasks();
        pb::JobSummary {
            job_id: r.job_id.clone(),
            name: r.name.clone(),
            state: r.state.to_string(),
            active_version: r.active_version,
            parallelism: r.active().map(|v| v.parallelism).unwrap_or(0),
            created_at_ms: r.created_at_ms,
            tasks_running: tasks.iter().filter(|t| t.state == TaskState::Running).count() as u32,
            tasks_total: tasks.len() as u32,
        }
    }
}

/// A job as `keel status` shows it: its versions, tasks with their latest rates, throughput,
/// restart strategy and history, checkpoints and where it was restored from.
pub(crate) fn details(config: &Config, job: &JobHandle) -> pb::JobDetails {
    let r = job.record();
    let checkpoints = job.checkpoints().stats(Instant::now());
    let interval = checkpoint_interval(config, &r);
    let records = job.tasks();
    let tasks: Vec<pb::TaskDetails> = {
        let reports = job.reports();
        records.iter().map(|t| task_details(t, reports.get(&t.task_id))).collect()
    };
    let running: Vec<&pb::TaskDetails> =
        records.iter().zip(&tasks).filter(|(r, _)| r.state == TaskState::Running).map(|(_, d)| d).collect();
    let (throughput, warnings) = job_throughput(&running);
    pb::JobDetails {
        summary: Some(job.summary()),
        versions: r
            .versions
            .iter()
            .map(|v| pb::VersionDetails {
                version: v.version,
                state: v.state.to_string(),
                created_at_ms: v.created_at_ms,
                parallelism: v.parallelism,
                spec_yaml: v.spec_yaml.clone(),
                restored_from: v.restored_from.as_ref().map(RestoredFrom::to_pb),
                ended_with: v.ended_with.as_ref().map(RestoredFrom::to_pb),
            })
            .collect(),
        tasks,
        throughput: Some(throughput),
        warnings,
        restart_strategy: describe_restart(&config.restart, &r),
        restart_history: r.restart.history.iter().map(restart::RestartEntry::to_pb).collect(),
        failure: r.restart.failure.as_ref().map(restart::FailureEntry::to_pb),
        upgrade: r.upgrade.as_ref().map(Upgrade::to_pb),
        status_message: r.status_message.clone(),
        restarts: r.restarts,
        checkpoints: checkpoints
            .into_iter()
            .map(|c| pb::CheckpointStats {
                checkpoint_id: c.checkpoint_id,
                state: c.state.as_str().to_string(),
                trigger_time_ms: c.trigger_time_ms,
                duration_ms: c.duration_ms,
                size_bytes: c.size_bytes,
                failure: c.failure,
                version: c.version,
                attempt: c.attempt,
                acknowledged: c.acknowledged,
                total_tasks: c.total_tasks,
                metadata_path: c.metadata_path,
            })
            .collect(),
        restored_from: r.active().and_then(|v| v.restored_from.as_ref()).map(RestoredFrom::to_pb),
        checkpoint_interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
    }
}

/// The effective `execution.checkpointing.interval` of the job's active version (the
/// cluster's, overridden by the spec's `config:`); zero when checkpointing is off.
fn checkpoint_interval(config: &Config, r: &JobRecord) -> Duration {
    r.active()
        .and_then(|v| JobSpec::parse(&v.spec_yaml).ok())
        .and_then(|spec| config.checkpointing.with_overrides(&spec.config).ok())
        .and_then(|c| c.interval)
        .unwrap_or_default()
}

/// The restart strategy of a job's active version, described for `keel status`; empty when
/// the spec cannot be read.
fn describe_restart(cluster: &RestartConfig, record: &JobRecord) -> String {
    record
        .active()
        .and_then(|v| JobSpec::parse(&v.spec_yaml).ok())
        .and_then(|spec| restart::for_spec(cluster, &spec).ok())
        .map(|c| c.describe())
        .unwrap_or_default()
}

/// A task's details: its record, plus the throughput of its latest report while it runs.
pub(crate) fn task_details(t: &TaskRecord, report: Option<&pb::TaskStateUpdate>) -> pb::TaskDetails {
    let mut d = t.to_pb();
    if let (TaskState::Running, Some(u)) = (t.state, report) {
        d.records_in_per_second = u.records_in_per_second;
        d.records_out_per_second = u.records_out_per_second;
        d.bytes_in_per_second = u.bytes_in_per_second;
        d.bytes_out_per_second = u.bytes_out_per_second;
        d.pending_records = u.pending_records;
        d.current_emit_event_time_lag_ms = u.current_emit_event_time_lag_ms;
        d.source_partitions = u.source_partitions.clone();
    }
    d
}

/// A job's throughput from its running tasks' details (rates and pending records summed, the
/// largest lag), and its warnings (the Kafka sources' uneven spreads, each once).
pub(crate) fn job_throughput(running: &[&pb::TaskDetails]) -> (pb::JobThroughput, Vec<String>) {
    let mut t = pb::JobThroughput::default();
    let mut warnings: Vec<String> = Vec::new();
    for d in running {
        t.tasks_reporting += 1;
        t.records_in_per_second += d.records_in_per_second;
        t.records_out_per_second += d.records_out_per_second;
        t.bytes_in_per_second += d.bytes_in_per_second;
        t.bytes_out_per_second += d.bytes_out_per_second;
        if let Some(p) = d.pending_records {
            t.pending_records = Some(t.pending_records.unwrap_or(0).saturating_add(p));
        }
        if let Some(lag) = d.current_emit_event_time_lag_ms {
            t.max_emit_event_time_lag_ms = Some(t.max_emit_event_time_lag_ms.map_or(lag, |l| l.max(lag)));
        }
        for p in &d.source_partitions {
            if !p.spread_warning.is_empty() && !warnings.contains(&p.spread_warning) {
                warnings.push(p.spread_warning.clone());
            }
        }
    }
    (t, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(task_id: &str, state: TaskState) -> TaskRecord {
        TaskRecord {
            task_id: task_id.into(),
            version: 1,
            subtask: 0,
            attempt: 0,
            state,
            taskmanager_id: "tm".into(),
            taskmanager_address: "127.0.0.1:1".into(),
            slot_index: 0,
            allocation_id: "a".into(),
            failure: String::new(),
            records_in: 10,
            records_out: 9,
        }
    }

    fn report(rate: f64, pending: Option<i64>, lag: Option<i64>, warning: &str) -> pb::TaskStateUpdate {
        pb::TaskStateUpdate {
            records_in_per_second: rate,
            records_out_per_second: rate / 2.0,
            bytes_in_per_second: rate * 10.0,
            pending_records: pending,
            current_emit_event_time_lag_ms: lag,
            source_partitions: vec![pb::SourcePartitions {
                source: "in".into(),
                topic: "t".into(),
                partitions: 3,
                assigned: 2,
                spread_warning: warning.into(),
            }],
            ..Default::default()
        }
    }

    /// A running task shows its latest report; a task that is not running shows no rates.
    #[test]
    fn task_details_carry_the_latest_report_only_while_running() {
        let r = report(100.0, Some(7), Some(250), "");
        let d = task_details(&record("t0", TaskState::Running), Some(&r));
        assert_eq!((d.records_in_per_second, d.records_out_per_second), (100.0, 50.0));
        assert_eq!((d.pending_records, d.current_emit_event_time_lag_ms), (Some(7), Some(250)));
        assert_eq!(d.source_partitions.len(), 1);
        assert_eq!((d.records_in, d.records_out), (10, 9));
        let d = task_details(&record("t0", TaskState::Failed), Some(&r));
        assert_eq!((d.records_in_per_second, d.pending_records), (0.0, None));
        assert!(d.source_partitions.is_empty());
        let d = task_details(&record("t0", TaskState::Running), None);
        assert_eq!(d.records_in_per_second, 0.0);
    }

    /// Rates and pending records add up, the lag is the largest, unknown stays unknown, and a
    /// warning reported by several subtasks is listed once.
    #[test]
    fn job_throughput_sums_rates_and_takes_the_largest_lag() {
        let warning = "source in, topic t: 3 partitions over parallelism 2 is uneven";
        let a = task_details(
            &record("t0", TaskState::Running),
            Some(&report(100.0, Some(7), Some(250), warning)),
        );
        let b =
            task_details(&record("t1", TaskState::Running), Some(&report(50.0, None, Some(900), warning)));
        let (t, warnings) = job_throughput(&[&a, &b]);
        assert_eq!(t.tasks_reporting, 2);
        assert_eq!((t.records_in_per_second, t.records_out_per_second), (150.0, 75.0));
        assert_eq!(t.bytes_in_per_second, 1500.0);
        assert_eq!((t.pending_records, t.max_emit_event_time_lag_ms), (Some(7), Some(900)));
        assert_eq!(warnings, vec![warning.to_string()]);

        let c = task_details(&record("t2", TaskState::Running), Some(&report(1.0, None, None, "")));
        let (t, warnings) = job_throughput(&[&c]);
        assert_eq!((t.pending_records, t.max_emit_event_time_lag_ms), (None, None));
        assert!(warnings.is_empty());
        assert_eq!(job_throughput(&[]).0, pb::JobThroughput::default());
    }
}
