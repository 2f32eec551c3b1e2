//! Versioned upgrades: a new version of a running job replaces the old one by a handover.
//!
//! The job driver ([`crate::driver`]) runs the steps; this module holds the request, the
//! checks that refuse an upgrade before anything changes, and the progress reporting.
//!
//! Handover (the default mode):
//! 1. the new version is registered (persisted) as a pending version;
//! 2. its slots are allocated while the old version keeps running (when the cluster has not
//!    enough free slots for both, the upgrade falls back to stop-then-start and says so);
//! 3. the old version is drained: a stop-with-savepoint whose barrier is the last thing its
//!    sources emit; the savepoint completes (metadata, fenced HA pointer), its transactions
//!    commit on the completion notice, and the old tasks finish;
//! 4. the switch is recorded in the HA store (the new version active, the old one finished)
//!    with one fenced write, and the new version is deployed from the drain savepoint (its
//!    sources' splits redistributed when the parallelism changes: `keel_state::rescale`);
//! 5. once the new version runs, the old version's slots are released.
//!
//! A leader that dies before the switch leaves the old version active: the next leader
//! restarts it from the job's HA pointer (the drain savepoint if it completed), and the pending
//! version stays unused. A leader that dies after the switch leaves the new version active: the
//! next leader starts it from the same pointer. Either way only the active version is ever
//! deployed, so two versions never write at once.

use std::time::Instant;

use keel_proto::pb;
use keel_proto::{KeelError, Result};
use keel_spec::JobSpec;
use tokio::sync::mpsc;

use crate::record::now_ms;

/// How the new version replaces the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeMode {
    /// Slots for both versions at once; the new one starts right after the drain.
    Handover,
    /// The old version's slots are released before the new version asks for its own.
    StopStart,
}

impl UpgradeMode {
    /// The mode, and whether it was `cancel-on-update` (seed 003's `job.cancel-on-update`: a
    /// handover whose old version is canceled at once instead of drained).
    pub fn parse(text: &str) -> Result<(UpgradeMode, bool)> {
        match text.trim() {
            "" | "handover" => Ok((UpgradeMode::Handover, false)),
            "stop-start" | "stop-then-start" => Ok((UpgradeMode::StopStart, false)),
            "cancel-on-update" => Ok((UpgradeMode::Handover, true)),
            other => Err(KeelError::InvalidArgument {
                reason: format!(
                    "unknown upgrade mode {other:?}; one of handover, stop-start, cancel-on-update"
                ),
            }),
        }
    }
}

/// What happens to the old version (seed 001's `upgradeStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeStrategy {
    /// Drain it with a savepoint first; if the savepoint fails, the upgrade stops and the old
    /// version continues.
    Stateful,
    /// Cancel it at once.
    Stateless,
}

/// The state the new version starts from (seed 001's `restoreStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreStrategy {
    /// The latest state: the drain savepoint, or (stateless) the latest completed checkpoint.
    LatestState,
    /// The newest savepoint of the job (`keel savepoint`, `keel stop`, or a drain).
    LatestSavepoint,
    /// No state: sources start by their `scan.startup.mode`.
    None,
}

impl UpgradeStrategy {
    pub fn parse(text: &str) -> Result<UpgradeStrategy> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "stateful" => Ok(UpgradeStrategy::Stateful),
            "stateless" => Ok(UpgradeStrategy::Stateless),
            other => Err(KeelError::InvalidArgument {
                reason: format!("unknown upgrade strategy {other:?}; one of stateful, stateless"),
            }),
        }
    }
}

impl RestoreStrategy {
    pub fn parse(text: &str) -> Result<RestoreStrategy> {
        match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "" | "latest-state" => Ok(RestoreStrategy::LatestState),
            "latest-savepoint" => Ok(RestoreStrategy::LatestSavepoint),
            "none" => Ok(RestoreStrategy::None),
            other => Err(KeelError::InvalidArgument {
                reason: format!(
                    "unknown restore strategy {other:?}; one of latest-state, latest-savepoint, none"
                ),
            }),
        }
    }
}

/// A request to replace the active version, and where its progress goes.
#[derive(Debug)]
pub struct UpgradeRequest {
    pub spec_yaml: String,
    pub spec: JobSpec,
    pub mode: UpgradeMode,
    pub upgrade_strategy: UpgradeStrategy,
    pub restore_strategy: RestoreStrategy,
    /// Start the new version from this savepoint instead (a promoted side-by-side version
    /// continues from its own drain savepoint).
    pub restore_pointer: Option<crate::checkpoint::CheckpointPointer>,
    /// Promote this already registered (side-by-side) version instead of registering a new one.
    pub promote: Option<u32>,
    pub allow_non_restored_state: bool,
    pub progress: Progress,
}

/// The progress stream of one upgrade (to `keel upgrade`). Sending never fails: a client
/// that went away just stops listening.
#[derive(Debug, Clone)]
pub struct Progress {
    tx: mpsc::UnboundedSender<std::result::Result<pb::UpgradeProgress, tonic::Status>>,
    pub started: Instant,
    pub from_version: u32,
    pub to_version: u32,
}

impl Progress {
    pub fn new(
        tx: mpsc::UnboundedSender<std::result::Result<pb::UpgradeProgress, tonic::Status>>,
        from_version: u32,
    ) -> Progress {
        Progress { tx, started: Instant::now(), from_version, to_version: 0 }
    }

    fn message(&self, step: &str) -> pb::UpgradeProgress {
        pb::UpgradeProgress {
            step: step.to_string(),
            time_ms: now_ms(),
            from_version: self.from_version,
            to_version: self.to_version,
            pause_ms: -1,
            ..Default::default()
        }
    }

    pub fn step(&self, step: impl AsRef<str>) {
        tracing::info!(
            from_version = self.from_version,
            to_version = self.to_version,
            step = step.as_ref(),
            "upgrade"
        );
        let _ = self.tx.send(Ok(self.message(step.as_ref())));
    }

    /// The last message: the upgrade failed (or was refused) with `error`.
    pub fn fail(&self, error: impl AsRef<str>) {
        tracing::warn!(
            from_version = self.from_version,
            to_version = self.to_version,
            error = error.as_ref(),
            "upgrade failed"
        );
        let mut m = self.message("upgrade failed");
        m.done = true;
        m.error = error.as_ref().to_string();
        m.total_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let _ = self.tx.send(Ok(m));
    }

    /// The last message of a successful upgrade.
    pub fn done(&self, pause_ms: Option<i64>, savepoint_id: u64, savepoint_path: &str) {
        let mut m = self.message("upgrade complete");
        m.done = true;
        m.pause_ms = pause_ms.unwrap_or(-1);
        m.total_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        m.savepoint_id = savepoint_id;
        m.savepoint_path = savepoint_path.to_string();
        tracing::info!(
            from_version = self.from_version,
            to_version = self.to_version,
            pause_ms = m.pause_ms,
            total_ms = m.total_ms,
            savepoint_id,
            "upgrade complete"
        );
        let _ = self.tx.send(Ok(m));
    }
}

/// The checks made before anything changes. `old` is the active version's spec. Refuses: a
/// spec of another job (name), a parallelism above maxParallelism, dropping the state of a
/// source the new version no longer has (unless `allow_non_restored_state`), and a source that
/// changes its connector. Any other parallelism is fine: every source's state is a set of
/// splits the JobManager redistributes (`keel_state::rescale`).
pub fn check(old: &JobSpec, new: &JobSpec, allow_non_restored_state: bool) -> Result<()> {
    if new.name != old.name {
        return Err(KeelError::invalid_spec(
            "name",
            format!("the new version is named {:?}; it must keep the job's name {:?}", new.name, old.name),
        ));
    }
    if new.parallelism > new.max_parallelism {
        return Err(KeelError::invalid_spec(
            "parallelism",
            format!("{} is above maxParallelism {}", new.parallelism, new.max_parallelism),
        ));
    }
    let dropped: Vec<&str> = old
        .sources
        .iter()
        .filter(|o| !new.sources.iter().any(|n| n.name == o.name))
        .map(|o| o.name.as_str())
        .collect();
    if !dropped.is_empty() && !allow_non_restored_state {
        return Err(KeelError::invalid_spec(
            "sources",
            format!(
                "the new version has no source named {}: its state would not be restored; pass \
                 --allow-non-restored-state to drop it",
                dropped.join(", ")
            ),
        ));
    }
    for n in &new.sources {
        if let Some(o) = old.sources.iter().find(|o| o.name == n.name) {
            if o.connector != n.connector {
                return Err(KeelError::invalid_spec(
                    "sources",
                    format!(
                        "source '{}' was {} and is now {}: its state cannot carry over; rename it",
                        n.name, o.connector, n.connector
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The extra checks of `--mode side-by-side`: both versions run at once, so the new one must
/// write to other Kafka topics, read with its own consumer groups, and use its own
/// transactional-id prefixes.
pub fn check_side_by_side(old: &JobSpec, new: &JobSpec) -> Result<()> {
    let option = |spec: &keel_spec::ConnectorSpec, key: &str| spec.options.get(key).cloned();
    for (i, sink) in new.sinks.iter().enumerate() {
        if sink.connector != "kafka" {
            continue;
        }
        let topic = option(sink, "topic");
        if old.sinks.iter().any(|o| o.connector == "kafka" && option(o, "topic") == topic) {
            return Err(KeelError::invalid_spec(
                format!("sinks[{i}].topic"),
                format!(
                    "side by side, both versions run: the new one must write to its own topic, and {} is the \
                     running version's",
                    topic.unwrap_or_default()
                ),
            ));
        }
        let prefix = option(sink, "sink.transactional-id-prefix");
        if prefix.is_some() && old.sinks.iter().any(|o| option(o, "sink.transactional-id-prefix") == prefix) {
            return Err(KeelError::invalid_spec(
                format!("sinks[{i}].sink.transactional-id-prefix"),
                "side by side, the new version needs its own transactional-id prefix",
            ));
        }
    }
    for (i, source) in new.sources.iter().enumerate() {
        if source.connector != "kafka" {
            continue;
        }
        let group = option(source, "properties.group.id");
        if group.is_none() || old.sources.iter().any(|o| option(o, "properties.group.id") == group) {
            return Err(KeelError::invalid_spec(
                format!("sources[{i}].properties.group.id"),
                "side by side, the new version must read with its own consumer group",
            ));
        }
    }
    Ok(())
}

/// `spec_yaml` with its `name` replaced.
pub fn renamed_spec(spec_yaml: &str, name: &str) -> Result<String> {
    let mut value: serde_yaml::Value = serde_yaml::from_str(spec_yaml)
        .map_err(|e| KeelError::internal(format!("the spec is not valid YAML: {e}")))?;
    let map =
        value.as_mapping_mut().ok_or_else(|| KeelError::internal("the spec is not a mapping".to_string()))?;
    map.insert(serde_yaml::Value::from("name"), serde_yaml::Value::from(name));
    serde_yaml::to_string(&value).map_err(|e| KeelError::internal(format!("cannot write the spec: {e}")))
}

/// The spec of a rescale: the active spec with `parallelism` replaced.
pub fn rescaled_spec(spec_yaml: &str, parallelism: u32) -> Result<String> {
    let mut value: serde_yaml::Value = serde_yaml::from_str(spec_yaml)
        .map_err(|e| KeelError::internal(format!("the active spec is not valid YAML: {e}")))?;
    let map = value
        .as_mapping_mut()
        .ok_or_else(|| KeelError::internal("the active spec is not a mapping".to_string()))?;
    map.insert(serde_yaml::Value::from("parallelism"), serde_yaml::Value::from(parallelism));
    serde_yaml::to_string(&value).map_err(|e| KeelError::internal(format!("cannot write the spec: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, parallelism: u32, sources: &[(&str, &str)]) -> JobSpec {
        let mut yaml = format!("name: {name}\nparallelism: {parallelism}\nmaxParallelism: 4\nsources:\n");
        for (n, c) in sources {
            match *c {
                "kafka" => yaml.push_str(&format!(
                    "  - {{name: {n}, connector: kafka, topic: t, properties.bootstrap.servers: 'b:1', scan.startup.mode: earliest-offset}}\n"
                )),
                _ => yaml.push_str(&format!("  - {{name: {n}, connector: datagen}}\n")),
            }
        }
        yaml.push_str(&format!("sinks:\n  - {{name: out, connector: blackhole, from: {}}}\n", sources[0].0));
        JobSpec::parse(&yaml).expect("valid spec")
    }

    /// What an upgrade refuses before anything changes, each with the field and the reason.
    #[test]
    fn upgrade_checks_refuse_with_the_reason() {
        let old = spec("j", 2, &[("in", "kafka")]);
        assert!(check(&old, &spec("j", 3, &[("in", "kafka")]), false).is_ok());
        let err = check(&old, &spec("other", 2, &[("in", "kafka")]), false).expect_err("name").to_string();
        assert!(err.contains("name"), "{err}");
        // A datagen source rescales too (its sequence is a set of splits).
        let gen = spec("j", 1, &[("gen", "datagen")]);
        assert!(check(&gen, &spec("j", 3, &[("gen", "datagen")]), false).is_ok());
        assert!(check(&gen, &spec("j", 1, &[("gen", "datagen")]), false).is_ok());
        let renamed = spec("j", 2, &[("in2", "kafka")]);
        let err = check(&old, &renamed, false).expect_err("dropped").to_string();
        assert!(err.contains("in") && err.contains("--allow-non-restored-state"), "{err}");
        assert!(check(&old, &renamed, true).is_ok());
        let err = check(&old, &spec("j", 2, &[("in", "datagen")]), false).expect_err("connector").to_string();
        assert!(err.contains("was kafka and is now datagen"), "{err}");
    }

    #[test]
    fn rescaled_spec_changes_only_the_parallelism() {
        let yaml = "name: j\nparallelism: 2\nsources:\n  - {name: in, connector: datagen}\nsinks:\n  - {name: out, connector: blackhole}\n";
        let out = rescaled_spec(yaml, 3).expect("rescaled");
        let spec = JobSpec::parse(&out).expect("valid");
        assert_eq!(spec.parallelism, 3);
        assert_eq!(spec.sources.len(), 1);
        assert!(UpgradeMode::parse("sideways").is_err());
        assert_eq!(UpgradeMode::parse("cancel-on-update").expect("mode"), (UpgradeMode::Handover, true));
        assert_eq!(
            RestoreStrategy::parse("LATEST_SAVEPOINT").expect("seed 001 spelling"),
            RestoreStrategy::LatestSavepoint
        );
        assert!(UpgradeStrategy::parse("sometimes").is_err());
    }
}
