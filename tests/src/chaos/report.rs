//! What a run reports: every fault with its recovery, the exact accounting, the fencing
//! observations, and the violations (an empty list: the run passed).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::check::{p50_max, Accounting, RewindVerdict};
use super::observe::{Completed, LeaderChange, Overlap};
use super::schedule::{Fault, FaultKind};
use super::{Mode, Options};

/// One injected (or skipped) fault.
#[derive(Debug, Clone)]
pub struct FaultOutcome {
    pub fault: Fault,
    pub target: String,
    /// Injection, ms since the run started.
    pub at_ms: u64,
    /// Injection, UTC wall clock (to find it in the processes' logs).
    pub at_wall_ms: u64,
    /// How long the fault lasted (until the restart, resume or heal returned).
    pub held_ms: u64,
    pub skipped: Option<String>,
    pub error: Option<String>,
    /// From the fault to output flowing again for every input partition.
    pub recovery: Option<Duration>,
    /// The pipeline's latency just before the fault (ms): the median, over the records that
    /// reached the output in the 3 s before it, of arrival minus when each was due. Part of
    /// every recovery time, and growing when the pipeline falls behind.
    pub lag_before_ms: Option<u64>,
    /// From the fault to a new leader of the role (leader faults), from the etcd watch.
    pub takeover: Option<Duration>,
    /// From the fault to the first checkpoint completed after the fault ended.
    pub checkpointed: Option<Duration>,
    /// The input partition whose output flowed last, and when.
    pub slowest_partition: Option<(usize, Duration)>,
    pub job_restarts: Option<u64>,
    /// The pauses the job's restart strategy chose for the restarts this fault caused (from
    /// `keel status`'s restart history), summed: part of the recovery, and growing when faults
    /// come faster than the backoff resets.
    pub restart_pause_ms: Option<u64>,
    /// The output had caught up (newest record due a few baseline latencies ago) before it.
    pub caught_up: bool,
    /// Records replayed (duplicated) after this fault.
    pub replayed: u64,
    pub notes: Vec<String>,
}

impl FaultOutcome {
    /// The recovery net of the pipeline's latency just before the fault (the baseline's when
    /// nothing arrived then): what the fault itself cost.
    pub fn net_recovery_ms(&self, baseline_ms: u64) -> Option<u64> {
        let r = self.recovery?.as_millis() as u64;
        Some(r.saturating_sub(self.lag_before_ms.unwrap_or(baseline_ms)))
    }

    pub fn new(fault: Fault, at_ms: u64) -> FaultOutcome {
        FaultOutcome {
            fault,
            target: String::new(),
            at_ms,
            at_wall_ms: super::observe::wall_ms(),
            held_ms: 0,
            skipped: None,
            error: None,
            recovery: None,
            lag_before_ms: None,
            takeover: None,
            checkpointed: None,
            slowest_partition: None,
            job_restarts: None,
            restart_pause_ms: None,
            replayed: 0,
            caught_up: true,
            notes: Vec::new(),
        }
    }

    /// One line for the progress output.
    pub fn line(&self) -> String {
        let head = format!(
            "[{:>6.1}s] {} UTC fault {} -> {}",
            self.at_ms as f64 / 1000.0,
            utc(self.at_wall_ms),
            self.fault,
            self.target
        );
        if let Some(s) = &self.skipped {
            return format!("{head}: skipped ({s})");
        }
        let mut line = format!("{head}: held {:.1}s", self.held_ms as f64 / 1000.0);
        match self.recovery {
            Some(r) => line += &format!(", output flowing again after {:.2}s", r.as_secs_f64()),
            None => line += ", output NOT flowing again",
        }
        if let Some((p, d)) = self.slowest_partition {
            line += &format!(" (input partition {p} last)");
            let _ = d;
        }
        if let Some(c) = self.checkpointed {
            line += &format!(", checkpointing again after {:.2}s", c.as_secs_f64());
        }
        if let Some(n) = self.job_restarts {
            line += &format!(", job restarts +{n}");
        }
        if let Some(p) = self.restart_pause_ms.filter(|p| *p > 0) {
            line += &format!(" (restart pause {:.2}s)", p as f64 / 1000.0);
        }
        if let Some(e) = &self.error {
            line += &format!("; {e}");
        }
        for n in &self.notes {
            line += &format!("; {n}");
        }
        line
    }
}

pub struct Report {
    pub seed: u64,
    pub mode: Mode,
    pub replay: String,
    pub dir: PathBuf,
    pub network: String,
    /// The HA store: its backend and members, and how it is observed.
    pub ha: String,
    pub broker: String,
    pub hides_aborted: Option<bool>,
    pub faults: Vec<FaultOutcome>,
    pub accounting: Accounting,
    /// The workload produced `0..end`.
    pub end: u64,
    pub resent: u64,
    pub checkpoints: usize,
    pub unread_metadata: u64,
    pub leaders: Vec<LeaderChange>,
    pub completed: Vec<Completed>,
    pub overlaps: Vec<Overlap>,
    pub job_restarts: Option<u64>,
    pub job_state: String,
    pub violations: Vec<String>,
    pub notes: Vec<String>,
    pub elapsed: Duration,
    pub logs: BTreeMap<String, PathBuf>,
    /// Probe times without a fault (ms): the pipeline's own latency.
    pub baseline: Vec<u64>,
    /// End-to-end latency of each record's first copy (ms): p50, p99, max.
    pub latency: Option<(u64, u64, u64)>,
    /// /proc/loadavg at the start and the end (other work on the machine slows recovery).
    pub load: (String, String),
    /// The leader lease TTL of the run (the JobManager goal counts from it).
    pub lease_ttl: Duration,
}

impl Report {
    pub fn new(opts: &Options, dir: &Path) -> Report {
        Report {
            seed: opts.seed,
            mode: opts.mode,
            replay: opts.replay_command(),
            dir: dir.to_path_buf(),
            network: String::new(),
            ha: String::new(),
            broker: String::new(),
            hides_aborted: None,
            faults: Vec::new(),
            accounting: Accounting::default(),
            end: 0,
            resent: 0,
            checkpoints: 0,
            unread_metadata: 0,
            leaders: Vec::new(),
            completed: Vec::new(),
            overlaps: Vec::new(),
            job_restarts: None,
            job_state: String::new(),
            violations: Vec::new(),
            notes: Vec::new(),
            elapsed: Duration::ZERO,
            logs: BTreeMap::new(),
            load: (loadavg(), String::new()),
            latency: None,
            baseline: Vec::new(),
            lease_ttl: opts.lease_ttl,
        }
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn injected(&self) -> usize {
        self.faults.iter().filter(|f| f.skipped.is_none()).count()
    }

    /// The pipeline's own latency (ms): the baseline probes' median.
    pub fn baseline_p50(&self) -> u64 {
        p50_max(&self.baseline).map_or(0, |(p50, _)| p50)
    }

    /// Recovery times (ms) by fault kind.
    pub fn recovery_by_kind(&self) -> BTreeMap<FaultKind, Vec<u64>> {
        let mut m: BTreeMap<FaultKind, Vec<u64>> = BTreeMap::new();
        for f in &self.faults {
            if let Some(r) = f.recovery {
                m.entry(f.fault.kind).or_default().push(r.as_millis() as u64);
            }
        }
        m
    }

    /// Recovery times (ms) by fault kind, net of the pipeline's latency just before each fault.
    pub fn net_recovery_by_kind(&self) -> BTreeMap<FaultKind, Vec<u64>> {
        let base = self.baseline_p50();
        let mut m: BTreeMap<FaultKind, Vec<u64>> = BTreeMap::new();
        for f in &self.faults {
            if let Some(r) = f.net_recovery_ms(base) {
                m.entry(f.fault.kind).or_default().push(r);
            }
        }
        m
    }

    /// Turns the observations into violations and notes.
    pub fn judge(&mut self) {
        let a = &self.accounting;
        if !a.lost.is_empty() {
            self.violations.push(format!(
                "{} records lost (in the input, never in the output); first: {:?}",
                a.lost.len(),
                &a.lost[..a.lost.len().min(10)]
            ));
        }
        if !a.unknown.is_empty() {
            self.violations.push(format!(
                "{} numbers in the output that are not in the input: {:?}",
                a.unknown.len(),
                &a.unknown[..a.unknown.len().min(10)]
            ));
        }
        if a.garbage > 0 {
            self.violations.push(format!("{} output records that are not workload records", a.garbage));
        }
        if !a.in_gaps.is_empty() {
            self.notes.push(format!(
                "{} numbers the producer had handed over are not in the input topic (the broker lost them; not Keel's doing): {:?}",
                a.in_gaps.len(),
                &a.in_gaps[..a.in_gaps.len().min(10)]
            ));
        }
        if !a.split_keys.is_empty() {
            self.notes.push(format!("keys written to more than one output partition (their order is not checked across partitions): {:?}", a.split_keys));
        }
        let bad: Vec<String> = a
            .bad_rewinds()
            .take(8)
            .map(|r| {
                let why = match &r.verdict {
                    RewindVerdict::NotACheckpoint => "not at any completed checkpoint's position: two attempts wrote at once".to_string(),
                    RewindVerdict::BeforeLatest { restored, latest } => {
                        format!("from checkpoint {restored}, older than checkpoint {latest} completed before the fault")
                    }
                    _ => String::new(),
                };
                format!(
                    "key k{:02} went back from {} to {} at {:.1}s (after fault {:?}): {why}",
                    r.key,
                    r.from,
                    r.to,
                    r.at_ms as f64 / 1000.0,
                    r.fault
                )
            })
            .collect();
        let bad_total = a.bad_rewinds().count();
        if bad_total > 0 {
            self.violations.push(format!(
                "{bad_total} replays that are not replays from the last checkpoint:\n      {}",
                bad.join("\n      ")
            ));
        }
        let duplicates = a.duplicates_by_job;
        let replayed = a.replayed_by_fault();
        for f in &mut self.faults {
            f.replayed = replayed.get(&Some(f.fault.index)).copied().unwrap_or(0);
        }
        if let Some(n) = replayed.get(&None) {
            self.violations
                .push(format!("{n} duplicates before the first fault (no failure to replay after)"));
        }
        if self.mode == Mode::ExactlyOnce {
            // Apache Kafka hides aborted transactions' records from read_committed readers (probed
            // at the start): every duplicate such a reader sees is one too many.
            match self.hides_aborted {
                Some(true) if duplicates > 0 => self.violations.push(format!(
                    "exactly-once: {duplicates} duplicates seen by a read_committed reader"
                )),
                Some(true) => {}
                Some(false) => self.violations.push(
                    "exactly-once: the broker showed an aborted transaction's record to a read_committed reader \
                     (probed at the start): not Apache Kafka's semantics, so nothing here is proven"
                        .into(),
                ),
                None => self.notes.push("exactly-once: the broker's read_committed behaviour was not probed".into()),
            }
        }
        for o in &self.overlaps {
            let text = format!(
                "subtask {} attempt {:?} on {} was alive beside attempt {:?} on {} from {:.1}s to {:.1}s and wrote {} records meanwhile",
                o.subtask,
                o.old,
                o.old_tm,
                o.new,
                o.new_tm,
                o.first_ms as f64 / 1000.0,
                o.last_ms as f64 / 1000.0,
                o.old_wrote
            );
            if o.old_wrote > 0 {
                self.violations.push(format!("an old attempt kept writing: {text}"));
            } else {
                self.notes.push(format!("two attempts alive at once (the old one wrote nothing): {text}"));
            }
        }
        // Takeover times for leader faults.
        for f in &mut self.faults {
            let role = match f.fault.kind {
                FaultKind::KillJmLeader | FaultKind::PauseJmLeader | FaultKind::PartitionJmLeader => {
                    "jobmanager"
                }
                FaultKind::KillRmLeader | FaultKind::PauseRmLeader | FaultKind::PartitionRmLeader => {
                    "resourcemanager"
                }
                _ => continue,
            };
            let before =
                self.leaders.iter().rfind(|l| l.role == role && l.seen_ms < f.at_ms).and_then(|l| l.epoch);
            // A takeover caused by this fault: during it or soon after it ended.
            let window_end = f.at_ms + f.held_ms + 15_000;
            let Some(successor) = self.leaders.iter().find(|l| {
                l.role == role
                    && l.seen_ms >= f.at_ms
                    && l.seen_ms <= window_end
                    && l.epoch.is_some()
                    && l.epoch != before
            }) else {
                continue;
            };
            f.takeover = Some(Duration::from_millis(successor.seen_ms - f.at_ms));
            if role != "jobmanager" {
                continue;
            }
            // A new JobManager leader must get the job checkpointing again on its own, whether
            // or not the old leader is still paused or cut off.
            let replaced_ms = self
                .leaders
                .iter()
                .find(|l| l.role == role && l.seen_ms > successor.seen_ms && l.epoch != successor.epoch)
                .map(|l| l.seen_ms);
            let first = self.completed.iter().find(|c| Some(c.epoch) == successor.epoch).map(|c| c.seen_ms);
            let limit = successor.seen_ms + SUCCESSOR_CHECKPOINT_MS;
            let late = first.is_none_or(|t| t > limit);
            if late && replaced_ms.is_none_or(|r| r > limit) {
                self.violations.push(format!(
                    "fault {}: the new jobmanager leader (epoch {}, {}) took over {:.1}s after the fault but completed \
                     its first checkpoint {} (the fault lasted {:.1}s); a successor must run the job within {}s of \
                     taking over, while the old leader is still away",
                    f.fault,
                    successor.epoch.unwrap_or(0),
                    successor.address,
                    (successor.seen_ms - f.at_ms) as f64 / 1000.0,
                    first.map_or("never".to_string(), |t| format!("{:.1}s after taking over", (t - successor.seen_ms) as f64 / 1000.0)),
                    f.held_ms as f64 / 1000.0,
                    SUCCESSOR_CHECKPOINT_MS / 1000
                ));
            }
        }
        // Losing one member of three of the HA store (etcd or Raft) changes nothing (issue 5,
        // point 7; issue 17): no leader changes.
        for f in &self.faults {
            if !f.fault.kind.is_ha_member_fault() || f.skipped.is_some() {
                continue;
            }
            // Up to 10 s after the heal, but not into the next fault (which may well change a
            // leader: it may be a leader's kill or partition).
            let next_fault = self.faults.iter().map(|o| o.at_ms).filter(|t| *t > f.at_ms).min();
            let end = (f.at_ms + f.held_ms + 10_000).min(next_fault.unwrap_or(u64::MAX).saturating_sub(1));
            // Seeded with each role's leader before the fault, which is no change.
            let mut changes: Vec<(String, Option<u64>, String)> = ["jobmanager", "resourcemanager"]
                .iter()
                .map(|role| {
                    let before = self.leaders.iter().rfind(|l| l.role == *role && l.seen_ms < f.at_ms);
                    (role.to_string(), before.and_then(|l| l.epoch), String::new())
                })
                .collect();
            for l in self.leaders.iter().filter(|l| l.seen_ms >= f.at_ms && l.seen_ms <= end) {
                // A leader key is written more than once per leadership: one entry each.
                if changes.iter().rev().find(|c| c.0 == l.role).is_some_and(|c| c.1 == l.epoch) {
                    continue;
                }
                let what = l
                    .epoch
                    .map_or("lost its leader".to_string(), |e| format!("led by epoch {e} ({})", l.address));
                changes.push((
                    l.role.clone(),
                    l.epoch,
                    format!("{} {what} at +{:.1}s", l.role, (l.seen_ms - f.at_ms) as f64 / 1000.0),
                ));
            }
            let changes: Vec<String> = changes.into_iter().map(|c| c.2).filter(|t| !t.is_empty()).collect();
            if !changes.is_empty() {
                self.violations.push(format!(
                    "fault {} ({}): losing one member of three of the HA store must change nothing, but: {}",
                    f.fault,
                    f.target,
                    changes.join(", ")
                ));
            }
        }
        // A ResourceManager leader change leaves running jobs alone (issue 5, point 5).
        for f in &self.faults {
            let rm = matches!(
                f.fault.kind,
                FaultKind::KillRmLeader | FaultKind::PauseRmLeader | FaultKind::PartitionRmLeader
            );
            if let (true, Some(n @ 1..)) = (rm, f.job_restarts) {
                self.violations.push(format!(
                    "fault {}: the job restarted {n} time(s) after a resourcemanager leader fault; running jobs must not be touched",
                    f.fault
                ));
            }
        }
        if self.job_state != "running" {
            self.violations.push(format!("the job is {:?} at the end, not running", self.job_state));
        }
        if self.unread_metadata > 0 {
            self.notes.push(format!(
                "{} checkpoint metadata files were gone before the watcher read them (their positions are unknown)",
                self.unread_metadata
            ));
        }
    }
}

/// `HH:MM:SS.mmm` (UTC) of a time in ms since the Unix epoch.
pub fn utc(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// The 1-minute load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// How long a new JobManager leader may take to complete its first checkpoint after it took
/// over: recovering the job, deploying it and the first interval take about 1 s here.
const SUCCESSOR_CHECKPOINT_MS: u64 = 5_000;

/// The goals with the run's lease TTL: (fault kind, what, limit in ms).
fn goals(lease_ttl: Duration) -> [(FaultKind, String, u64); 2] {
    let ttl_ms = u64::try_from(lease_ttl.as_millis()).unwrap_or(u64::MAX);
    [
        (FaultKind::KillTm, "TaskManager loss: output flowing again, p99 < 3 s".to_string(), 3_000),
        (
            FaultKind::KillJmLeader,
            format!("JobManager leader loss: output flowing again < lease TTL ({}) + 2 s", secs(ttl_ms)),
            ttl_ms.saturating_add(2_000),
        ),
    ]
}

fn secs(ms: u64) -> String {
    format!("{:.2}s", ms as f64 / 1000.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.accounting;
        writeln!(f, "==== keel chaos report ====")?;
        writeln!(
            f,
            "seed {}, mode {}, {} faults injected ({} skipped) in {:.0}s",
            self.seed,
            self.mode.name(),
            self.injected(),
            self.faults.len() - self.injected(),
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "replay: {}", self.replay)?;
        writeln!(f, "load average (1 min) at the start {}, at the end {}", self.load.0, self.load.1)?;
        writeln!(f, "network: {}", self.network)?;
        writeln!(f, "ha store: {}", self.ha)?;
        writeln!(f, "broker: {}", self.broker)?;
        writeln!(f, "faults:")?;
        writeln!(
            f,
            "  {:>3} {:<22} {:<8} {:<7} {:<9} {:<7} {:<9} {:<9} {:<8} {:<6} {:<8} target",
            "#",
            "kind",
            "at",
            "held",
            "recovery",
            "lag",
            "takeover",
            "chkpt",
            "restarts",
            "pause",
            "replayed"
        )?;
        for o in &self.faults {
            if let Some(s) = &o.skipped {
                writeln!(f, "  {:>3} {:<22} skipped: {s}", o.fault.index, o.fault.kind.name())?;
                continue;
            }
            writeln!(
                f,
                "  {:>3} {:<22} {:<8} {:<7} {:<9} {:<7} {:<9} {:<9} {:<8} {:<6} {:<8} {}{}",
                o.fault.index,
                o.fault.kind.name(),
                format!("{:.1}s", o.at_ms as f64 / 1000.0),
                format!("{:.1}s", o.held_ms as f64 / 1000.0),
                o.recovery.map(|d| secs(d.as_millis() as u64)).unwrap_or_else(|| "NONE".into()),
                o.lag_before_ms.map(secs).unwrap_or_else(|| "-".into()),
                o.takeover.map(|d| secs(d.as_millis() as u64)).unwrap_or_else(|| "-".into()),
                o.checkpointed.map(|d| secs(d.as_millis() as u64)).unwrap_or_else(|| "NONE".into()),
                o.job_restarts.map(|n| format!("+{n}")).unwrap_or_else(|| "?".into()),
                match o.restart_pause_ms {
                    Some(0) | None => "-".to_string(),
                    Some(p) => secs(p),
                },
                o.replayed,
                o.target,
                o.error.as_ref().map(|e| format!(" ERROR {e}")).unwrap_or_default()
            )?;
        }
        writeln!(
            f,
            "recovery (fault -> a record produced after the fault in the output, for every input partition;"
        )?;
        writeln!(
            f,
            "          net: minus the latency the output had just before the fault, the lag column):"
        )?;
        writeln!(
            f,
            "  {:<22} {:>3} {:>8} {:>8}   net: {:>8} {:>8}",
            "kind", "n", "p50", "max", "p50", "max"
        )?;
        if let Some((p50, max)) = p50_max(&self.baseline) {
            writeln!(
                f,
                "  {:<22} {:>3} {:>8} {:>8}",
                "(no fault: baseline)",
                self.baseline.len(),
                secs(p50),
                secs(max)
            )?;
        }
        let net = self.net_recovery_by_kind();
        for (kind, xs) in self.recovery_by_kind() {
            let (Some((p50, max)), Some((np50, nmax))) =
                (p50_max(&xs), net.get(&kind).and_then(|n| p50_max(n)))
            else {
                continue;
            };
            writeln!(
                f,
                "  {:<22} {:>3} {:>8} {:>8}        {:>8} {:>8}",
                kind.name(),
                xs.len(),
                secs(p50),
                secs(max),
                secs(np50),
                secs(nmax)
            )?;
        }
        for (kind, what, limit) in goals(self.lease_ttl) {
            if let Some(xs) = net.get(&kind) {
                let over = xs.iter().filter(|x| **x >= limit).count();
                writeln!(f, "  goal {what} (net): {} of {} faults over", over, xs.len())?;
            }
        }
        writeln!(
            f,
            "records: in {} numbers ({} records, {} produced again after a failed delivery); out {} records ({} distinct)",
            a.in_numbers, a.in_records, self.resent, a.out_records, a.out_distinct
        )?;
        writeln!(
            f,
            "         lost {}, duplicated {} ({} beyond the input's own copies), unknown {}, malformed {}",
            a.lost.len(),
            a.duplicates,
            a.duplicates_by_job,
            a.unknown.len(),
            a.garbage
        )?;
        let from_cp =
            a.rewinds.iter().filter(|r| matches!(r.verdict, RewindVerdict::FromCheckpoint(_))).count();
        let resent = a.rewinds.iter().filter(|r| matches!(r.verdict, RewindVerdict::Resent { .. })).count();
        writeln!(
            f,
            "order per key: {} rewinds (replays): {} from a checkpoint's position, {} batches sent again by the sink after a broker fault (after the last checkpoint), {} not (interleaved attempts or replayed too far), {} unverifiable",
            a.rewinds.len(),
            from_cp,
            resent,
            a.bad_rewinds().count(),
            a.unverifiable()
        )?;
        if let Some((p50, p99, max)) = self.latency {
            writeln!(
                f,
                "end-to-end latency (first copy of each record, produce to output): p50 {}, p99 {}, max {}",
                secs(p50),
                secs(p99),
                secs(max)
            )?;
        }
        writeln!(f, "checkpoints completed (pointer moves seen on the HA store): {}", self.checkpoints)?;
        let epochs = |role: &str| {
            self.leaders
                .iter()
                .filter(|l| l.role == role)
                .map(|l| l.epoch.map(|e| format!("{e}@{}", l.address)).unwrap_or_else(|| "none".into()))
                .fold(Vec::<String>::new(), |mut v, x| {
                    // A leader key is written more than once per leadership; show it once.
                    if v.last() != Some(&x) {
                        v.push(x);
                    }
                    v
                })
                .join(" -> ")
        };
        writeln!(f, "jobmanager leaders: {}", epochs("jobmanager"))?;
        writeln!(f, "resourcemanager leaders: {}", epochs("resourcemanager"))?;
        if let Some(h) = self.hides_aborted {
            writeln!(f, "broker hides aborted transactions' records from read_committed readers: {h}")?;
        }
        writeln!(
            f,
            "job at the end: {} ({} restarts)",
            self.job_state,
            self.job_restarts.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
        )?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        if self.violations.is_empty() {
            writeln!(f, "VIOLATIONS: none")?;
        } else {
            writeln!(f, "VIOLATIONS ({}):", self.violations.len())?;
            for v in &self.violations {
                writeln!(f, "  - {v}")?;
            }
            writeln!(f, "logs: {}", self.dir.display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::schedule::Fault;

    fn outcome(index: usize, kind: FaultKind, at_ms: u64, held_ms: u64) -> FaultOutcome {
        let mut o = FaultOutcome::new(Fault { index, kind, gap_ms: 0, hold_ms: held_ms, pick: 0 }, at_ms);
        o.held_ms = held_ms;
        o.recovery = Some(Duration::from_millis(1000));
        o.job_restarts = Some(0);
        o
    }

    fn leader(role: &str, epoch: Option<u64>, seen_ms: u64) -> LeaderChange {
        LeaderChange { role: role.into(), epoch, address: "a:1".into(), revision: seen_ms, seen_ms }
    }

    fn checkpoint(id: u64, epoch: u64, seen_ms: u64) -> Completed {
        Completed {
            checkpoint_id: id,
            epoch,
            attempt: 1,
            revision: id,
            seen_ms,
            trigger_wall_ms: 0,
            positions: Default::default(),
        }
    }

    fn report() -> Report {
        let mut r = Report::new(&Options::default(), Path::new("/tmp"));
        r.job_state = "running".into();
        r
    }

    #[test]
    fn a_successor_that_does_not_checkpoint_while_the_old_leader_is_away_is_a_violation() {
        let mut r = report();
        r.faults.push(outcome(1, FaultKind::PartitionJmLeader, 10_000, 12_000));
        r.leaders = vec![
            leader("jobmanager", Some(4), 0),
            leader("jobmanager", None, 13_000),
            leader("jobmanager", Some(50), 13_500),
        ];
        // The successor's first checkpoint only after the heal (22 s), 8.5 s after taking over.
        r.completed = vec![checkpoint(1, 4, 5_000), checkpoint(2, 50, 22_000)];
        r.judge();
        assert_eq!(r.faults[0].takeover, Some(Duration::from_millis(3_500)));
        assert!(r.violations.iter().any(|v| v.contains("new jobmanager leader")), "{:?}", r.violations);

        let mut r = report();
        r.faults.push(outcome(1, FaultKind::PartitionJmLeader, 10_000, 12_000));
        r.leaders = vec![leader("jobmanager", Some(4), 0), leader("jobmanager", Some(50), 13_500)];
        r.completed = vec![checkpoint(1, 4, 5_000), checkpoint(2, 50, 14_500)];
        r.judge();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
    }

    #[test]
    /// Losing one member of the HA store (a partition of an etcd member, a paused member) must
    /// change no leader, and a ResourceManager leader fault must not restart the job: each seen
    /// in the observations is a violation; the same leadership written again is no change.
    fn leader_changes_after_losing_one_etcd_member_and_restarts_after_a_resourcemanager_fault_are_violations()
    {
        let mut r = report();
        r.faults.push(outcome(1, FaultKind::PartitionEtcdMember, 10_000, 5_000));
        r.leaders = vec![
            leader("jobmanager", Some(4), 0),
            leader("jobmanager", Some(4), 11_000), // the same leadership written again: no change
            leader("resourcemanager", Some(2), 0),
        ];
        r.judge();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        r.leaders.push(leader("resourcemanager", None, 14_000));
        r.leaders.push(leader("resourcemanager", Some(60), 15_000));
        r.violations.clear();
        r.judge();
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("resourcemanager lost its leader at +4.0s"), "{}", r.violations[0]);

        // The same rule for a paused member of the HA store (etcd or Raft).
        let mut r = report();
        r.faults.push(outcome(1, FaultKind::PauseHaMember, 10_000, 5_000));
        r.leaders = vec![leader("jobmanager", Some(4), 0), leader("jobmanager", Some(90), 12_000)];
        r.judge();
        assert!(
            r.violations.iter().any(|v| v.contains("HA store must change nothing")),
            "{:?}",
            r.violations
        );

        let mut r = report();
        let mut o = outcome(1, FaultKind::KillRmLeader, 10_000, 1_000);
        o.job_restarts = Some(1);
        r.faults.push(o);
        r.judge();
        assert!(r.violations.iter().any(|v| v.contains("must not be touched")), "{:?}", r.violations);
    }
}
