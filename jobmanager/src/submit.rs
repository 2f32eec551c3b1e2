//! Submit validation: a new job (`keel run`) or a new version's spec (`keel upgrade`) is checked
//! before anything changes. A live job of the same name, exactly-once sinks without
//! checkpointing or sharing a transactional-id prefix with another live job, a
//! `transaction.timeout.ms` too short for the checkpoint interval and the failover budget, and a
//! checkpoint or savepoint that cannot be restored are refused at submission. A job that passes
//! is written to the HA store before it is acknowledged, and its driver started.

use std::time::Duration;

use keel_proto::pb;
use keel_proto::{JobState, KeelError, Result};
use keel_spec::JobSpec;

use crate::checkpoint::CheckpointPointer;
use crate::coordinator;
use crate::leader::JobManager;
use crate::record::{now_ms, JobRecord, RestoredFrom, VersionRecord};
use crate::state::LeaderState;

impl JobManager {
    /// The checkpoint a job submitted with `--restore` starts from: the latest completed
    /// checkpoint of the most recent earlier job named `name`. Its metadata is read now, so a
    /// missing or unreadable file is refused at submission (another parallelism is fine: the
    /// sources' splits are redistributed).
    async fn restore_source(
        &self,
        st: &LeaderState,
        name: &str,
        parallelism: u32,
    ) -> Result<CheckpointPointer> {
        let earlier = st
            .jobs()
            .into_iter()
            .map(|j| j.record())
            .filter(|r| r.name == name)
            .max_by_key(|r| r.created_at_ms)
            .ok_or_else(|| {
                KeelError::precondition(format!(
                    "cannot restore: there is no earlier job named {name:?} to restore from"
                ))
            })?;
        let pointer: CheckpointPointer = self.ctx.pointers.get(&earlier.job_id).await?.ok_or_else(|| {
            KeelError::precondition(format!(
                "cannot restore: the latest job named {name:?} (id {}, {}) has no completed checkpoint",
                earlier.job_id, earlier.state
            ))
        })?;
        coordinator::load_states(&pointer, parallelism)
            .await
            .map_err(|reason| KeelError::precondition(format!("cannot restore: {reason}")))?;
        Ok(pointer)
    }

    /// The savepoint (or checkpoint) `path` names (its `_metadata` file, or the directory holding
    /// it), for a job of `spec`: read now, so a missing file, a checkpoint that cannot be
    /// restored at the spec's parallelism, or state of sources the spec no longer has (unless
    /// `allow_non_restored_state`) is refused at submission.
    async fn savepoint_source(
        &self,
        path: &str,
        spec: &JobSpec,
        allow_non_restored_state: bool,
    ) -> Result<CheckpointPointer> {
        let mut file = std::path::PathBuf::from(path.trim());
        if file.is_dir() {
            file = file.join(coordinator::METADATA_FILE);
        }
        let metadata = coordinator::read_metadata(&file).await.map_err(|reason| {
            KeelError::precondition(format!("cannot start from the savepoint: {reason}"))
        })?;
        let missing: Vec<String> = metadata
            .source_names()
            .into_iter()
            .filter(|name| !spec.sources.iter().any(|s| &s.name == name))
            .collect();
        if !missing.is_empty() && !allow_non_restored_state {
            return Err(KeelError::invalid_spec(
                "sources",
                format!(
                    "the savepoint holds state of source(s) {} that the spec does not have; pass \
                     --allow-non-restored-state to drop it",
                    missing.join(", ")
                ),
            ));
        }
        let pointer = CheckpointPointer::of_metadata(&metadata, &file);
        coordinator::load_states(&pointer, spec.parallelism).await.map_err(|reason| {
            KeelError::precondition(format!("cannot start from the savepoint: {reason}"))
        })?;
        Ok(pointer)
    }

    pub(crate) async fn submit(&self, req: pb::SubmitJobRequest) -> Result<pb::SubmitJobResponse> {
        let (spec_yaml, restore) = (req.spec_yaml, req.restore);
        let st = self.leader_state()?;
        let spec = JobSpec::parse(&spec_yaml)?;
        if let Some(existing) =
            st.jobs().into_iter().map(|j| j.record()).find(|r| r.name == spec.name && !r.state.is_terminal())
        {
            return Err(KeelError::AlreadyExists {
                what: format!(
                    "a live job named {:?} (id {}, {}); cancel it first or pick another name",
                    spec.name, existing.job_id, existing.state
                ),
            });
        }
        self.check_exactly_once(&st, &spec, None)?;
        self.check_transaction_timeouts(&spec).await?;
        if restore && !req.from_savepoint.is_empty() {
            return Err(KeelError::InvalidArgument {
                reason: "--restore and --from-savepoint exclude each other".into(),
            });
        }
        let restore_from = if restore {
            Some(self.restore_source(&st, &spec.name, spec.parallelism).await?)
        } else if !req.from_savepoint.trim().is_empty() {
            Some(self.savepoint_source(&req.from_savepoint, &spec, req.allow_non_restored_state).await?)
        } else {
            None
        };
        let now = now_ms();
        let job_id = uuid::Uuid::new_v4().simple().to_string();
        let restored_from = restore_from.as_ref().map(|p| RestoredFrom {
            job_id: p.job_id.clone(),
            checkpoint_id: p.checkpoint_id,
            metadata_path: p.metadata_path.clone(),
            restored_at_ms: now,
        });
        let record = JobRecord {
            job_id: job_id.clone(),
            name: spec.name.clone(),
            state: JobState::Created,
            active_version: 1,
            versions: vec![VersionRecord {
                version: 1,
                spec_yaml,
                state: JobState::Created,
                created_at_ms: now,
                parallelism: spec.parallelism,
                restored_from: restored_from.clone(),
                ended_with: None,
                start_fresh: false,
            }],
            created_at_ms: now,
            attempts: 0,
            restarts: 0,
            status_message: String::new(),
            cancel_requested: false,
            restart: Default::default(),
            side: None,
            upgrade: None,
        };
        if let Some(pointer) = &restore_from {
            // The new job's pointer names the earlier job's checkpoint, so every attempt of the
            // new job (and a new leader) starts from it until the job completes its own.
            self.ctx.pointers.set(&st.leadership, &job_id, pointer).await?;
        }
        // Durable before acknowledged: a leader that dies right after answering still leaves the
        // job for the next one.
        self.ctx.jobs.put(&st.leadership, &record.job_id, &record).await?;
        tracing::info!(job_id = %record.job_id, name = %record.name, version = 1,
            parallelism = spec.parallelism, epoch = st.leadership.epoch,
            restored_from_job = restore_from.as_ref().map(|p| p.job_id.as_str()).unwrap_or(""),
            checkpoint_id = restore_from.as_ref().map(|p| p.checkpoint_id).unwrap_or(0),
            "job submitted");
        let handle = self.spawn_driver(&st, record, false);
        Ok(pb::SubmitJobResponse {
            job_id: handle.job_id.clone(),
            name: spec.name,
            version: 1,
            restored_from: restored_from.map(|r| r.to_pb()),
        })
    }

    /// Exactly-once sinks commit at checkpoints, so the job must checkpoint; and no other live
    /// job may use one of their transactional-id prefixes (the two would fence each other's
    /// producers and commit each other's markers): not in its active version, nor in a version
    /// being deployed by an upgrade. `upgrading` is the job whose new version `spec` is (its own
    /// versions do not count: a handover stops the old one first, and a side-by-side version is
    /// checked against it by `upgrade::check_side_by_side`).
    pub(crate) fn check_exactly_once(
        &self,
        st: &LeaderState,
        spec: &JobSpec,
        upgrading: Option<&str>,
    ) -> Result<()> {
        let prefixes = spec.transactional_id_prefixes();
        let Some((field, _)) = prefixes.first() else {
            return Ok(());
        };
        let checkpointing = self
            .ctx
            .config
            .checkpointing
            .with_overrides(&spec.config)
            .map_err(|(key, reason)| KeelError::invalid_spec(format!("config.{key}"), reason))?;
        if checkpointing.interval.is_none() {
            return Err(KeelError::invalid_spec(
                field.replace("transactional-id-prefix", "delivery-guarantee"),
                "exactly-once commits its transactions when checkpoints complete, and checkpointing is \
                 off: set execution.checkpointing.interval (in the spec's config: or the cluster's)",
            ));
        }
        for job in st.jobs() {
            let r = job.record();
            if r.state.is_terminal() || Some(r.job_id.as_str()) == upgrading {
                continue;
            }
            let live = r.versions.iter().filter(|v| v.version == r.active_version || !v.state.is_terminal());
            for v in live {
                let Ok(other) = JobSpec::parse(&v.spec_yaml) else {
                    continue;
                };
                for (_, theirs) in other.transactional_id_prefixes() {
                    if let Some((field, prefix)) = prefixes.iter().find(|(_, p)| *p == theirs) {
                        return Err(KeelError::invalid_spec(
                            field,
                            format!(
                                "{prefix:?} is used by the running job {:?} (id {}, version {}); two jobs \
                                 writing with one prefix would fence each other's transactions: pick another \
                                 prefix, or cancel that job first",
                                r.name, r.job_id, v.version
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The `transaction.timeout.ms` of every exactly-once sink, against its brokers'
    /// `transaction.max.timeout.ms` (asked off the runtime) and against the checkpoint interval
    /// plus the failover budget (`heartbeat.timeout` and the restart strategy's longest delay).
    pub(crate) async fn check_transaction_timeouts(&self, spec: &JobSpec) -> Result<()> {
        if spec.transactional_id_prefixes().is_empty() {
            return Ok(());
        }
        let checkpointing = self
            .ctx
            .config
            .checkpointing
            .with_overrides(&spec.config)
            .map_err(|(key, reason)| KeelError::invalid_spec(format!("config.{key}"), reason))?;
        let Some(interval) = checkpointing.interval else {
            // Refused by check_exactly_once.
            return Ok(());
        };
        let restart = self
            .ctx
            .config
            .restart
            .with_overrides(&spec.config)
            .map_err(|(key, reason)| KeelError::invalid_spec(format!("config.{key}"), reason))?;
        let budget = self.ctx.config.heartbeat_timeout + longest_restart_delay(&restart);
        let spec = spec.clone();
        let unasked = tokio::task::spawn_blocking(move || {
            spec.check_transaction_timeouts(interval, budget, BROKER_CONFIG_TIMEOUT)
        })
        .await
        .map_err(|e| KeelError::internal(format!("checking transaction.timeout.ms panicked: {e}")))??;
        for (sink, error) in unasked {
            tracing::warn!(%sink, %error, "cannot read the brokers' transaction.max.timeout.ms; \
                transaction.timeout.ms checked against the checkpoint interval only");
        }
        Ok(())
    }
}

/// How long the submission check of `transaction.timeout.ms` waits for a sink's brokers.
const BROKER_CONFIG_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest pause the restart strategy puts before a restart.
fn longest_restart_delay(restart: &keel_config::RestartConfig) -> Duration {
    use keel_config::RestartStrategyType as T;
    match restart.strategy {
        T::None => Duration::ZERO,
        T::FixedDelay => restart.fixed_delay.delay,
        T::FailureRate => restart.failure_rate.delay,
        T::ExponentialDelay => {
            let e = &restart.exponential_delay;
            e.max_backoff.mul_f64(1.0 + e.jitter_factor.clamp(0.0, 1.0))
        }
    }
}
