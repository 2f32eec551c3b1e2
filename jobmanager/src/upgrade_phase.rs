//! The phases of an upgrade, as a typed state machine persisted in the job record.
//!
//! An upgrade (`keel upgrade`, `keel rescale`, `keel rollback`, `keel promote`) goes through
//! these phases; each is recorded in the job record in the HA store ([`crate::record`]) with a
//! fenced write before the driver acts on it, so a new JobManager leader resumes from the last
//! phase the old one recorded:
//!
//! ```text
//!  Registered ──slots──▶ SlotsAllocated ──drain──▶ Draining ──drained──▶ Switched (health gate)
//!      │                       │                      │                   │        │
//!      └──────drain────────────┼──────────────────────┘                healthy  unhealthy
//!                              │                                          │        │
//!         (abort, or a leader change before the switch)                  ▼        ▼
//!                              └──────────────▶ Failed ◀── old runs ── RollingBack
//!                                                                        Done
//! ```
//!
//! [`transition`] is pure: it takes the upgrade and an [`Event`] and returns the next upgrade
//! and the [`Action`]s to carry out. Record edits ([`Action::is_record_edit`]) are applied to
//! the job record before the fenced write that records the new phase, in the same write; the
//! other actions run after it. The driver ([`crate::driver`]) only carries actions out and
//! turns what happens into events.
//!
//! A leader change is the event [`Event::Recovered`]: before the switch the pending version is
//! dropped and the old version, still active, runs on; in the health gate the new leader runs
//! the new version and keeps the recorded deadline (wall-clock milliseconds, so it holds
//! across machines), and rolls back if the version is not healthy by then; while rolling back
//! it runs the old version, which is active again.

use serde::{Deserialize, Serialize};

use keel_proto::pb;

use crate::checkpoint::CheckpointPointer;

/// A slot held for one version of the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRef {
    pub taskmanager_id: String,
    pub taskmanager_address: String,
    pub index: u32,
    pub allocation_id: String,
}

impl SlotRef {
    pub fn of(s: &pb::AllocatedSlot) -> SlotRef {
        let slot = s.slot.clone().unwrap_or_default();
        SlotRef {
            taskmanager_id: slot.taskmanager_id,
            taskmanager_address: s.taskmanager_address.clone(),
            index: slot.index,
            allocation_id: s.allocation_id.clone(),
        }
    }

    pub fn to_pb(&self) -> pb::AllocatedSlot {
        pb::AllocatedSlot {
            slot: Some(pb::SlotId { taskmanager_id: self.taskmanager_id.clone(), index: self.index }),
            allocation_id: self.allocation_id.clone(),
            taskmanager_address: self.taskmanager_address.clone(),
        }
    }
}

fn allocations(slots: &[SlotRef]) -> Vec<String> {
    slots.iter().map(|s| s.allocation_id.clone()).collect()
}

/// The savepoint the new version starts from (the drain's, or the one a restore strategy
/// chose), and the old version restarts from on a rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavepointRef {
    pub checkpoint_id: u64,
    pub path: String,
}

/// Where an upgrade is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// The new version is recorded as pending; the old one runs.
    Registered,
    /// Slots for the new version are allocated while the old one runs.
    SlotsAllocated { slots: Vec<SlotRef> },
    /// The old version is being drained (a stop-with-savepoint) or, stateless, canceled.
    /// `slots`: the new version's (empty: stop-then-start, it asks for its own after the drain).
    Draining { slots: Vec<SlotRef> },
    /// The switch is recorded: the new version is the active one and inside its health gate,
    /// which it passes by running and (with periodic checkpoints) completing a checkpoint after
    /// the savepoint before `gate_deadline_ms` (ms since the epoch).
    Switched {
        savepoint: SavepointRef,
        gate_deadline_ms: u64,
        /// The old version's slots, kept for a rollback until the gate is passed (empty once
        /// released).
        old_slots: Vec<SlotRef>,
        /// Whether the new version checkpoints periodically (otherwise running is healthy).
        checkpoints: bool,
        /// When the old version wrote its last record (ms since the epoch), if known.
        last_output_ms: Option<u64>,
        /// The savepoint a restore strategy (or a promote) chose instead of the drain's: the
        /// job's HA pointer is set to it only after the switch is recorded, so a leader change
        /// before the switch restarts the old version from its own drain savepoint.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restore_pointer: Option<CheckpointPointer>,
    },
    /// The new version failed its gate: the old version is active again and restarts from the
    /// savepoint.
    RollingBack { savepoint: SavepointRef, why: String },
    /// The new version passed its gate.
    Done { savepoint: SavepointRef, at_ms: u64 },
    /// The upgrade did not happen (`rolled_back`: it did, and was undone).
    Failed { why: String, rolled_back: bool, at_ms: u64 },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Registered => "registered",
            Phase::SlotsAllocated { .. } => "slots-allocated",
            Phase::Draining { .. } => "draining",
            Phase::Switched { .. } => "switched",
            Phase::RollingBack { .. } => "rolling-back",
            Phase::Done { .. } => "done",
            Phase::Failed { .. } => "failed",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, Phase::Done { .. } | Phase::Failed { .. })
    }

    /// Before the switch: the old version is still the active one.
    pub fn before_switch(&self) -> bool {
        matches!(self, Phase::Registered | Phase::SlotsAllocated { .. } | Phase::Draining { .. })
    }

    /// The new version's slots allocated ahead of the switch.
    fn pending_slots(&self) -> &[SlotRef] {
        match self {
            Phase::SlotsAllocated { slots } | Phase::Draining { slots } => slots,
            _ => &[],
        }
    }
}

/// The latest upgrade of a job, as the job record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgrade {
    pub from_version: u32,
    pub to_version: u32,
    pub started_at_ms: u64,
    #[serde(flatten)]
    pub phase: Phase,
}

impl Upgrade {
    /// What `keel status` shows of it.
    pub fn to_pb(&self) -> pb::UpgradeStatus {
        let (gate_deadline_ms, reason, rolled_back) = match &self.phase {
            Phase::Switched { gate_deadline_ms, .. } => (*gate_deadline_ms, String::new(), false),
            Phase::RollingBack { why, .. } => (0, why.clone(), false),
            Phase::Failed { why, rolled_back, .. } => (0, why.clone(), *rolled_back),
            _ => (0, String::new(), false),
        };
        pb::UpgradeStatus {
            from_version: self.from_version,
            to_version: self.to_version,
            phase: self.phase.name().to_string(),
            gate_deadline_ms,
            reason,
            rolled_back,
            started_at_ms: self.started_at_ms,
        }
    }

    /// An upgrade whose new version `to_version` was just registered.
    pub fn registered(from_version: u32, to_version: u32, now_ms: u64) -> Upgrade {
        Upgrade { from_version, to_version, started_at_ms: now_ms, phase: Phase::Registered }
    }
}

/// What happened to an upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Slots for the new version were allocated while the old one runs.
    SlotsAllocated(Vec<SlotRef>),
    /// The drain of the old version starts (with the slots allocated so far, if any).
    DrainStarted,
    /// The old version is drained (its tasks ended) and the new one starts from `savepoint`.
    /// `old_slots`: the old version's slots; `gate_ms`: `upgrade.health-timeout`.
    Drained {
        savepoint: SavepointRef,
        restore_pointer: Option<CheckpointPointer>,
        old_slots: Vec<SlotRef>,
        last_output_ms: Option<u64>,
        checkpoints: bool,
        gate_ms: u64,
        now_ms: u64,
    },
    /// The upgrade stops before the switch (refused, the drain failed, canceled).
    Aborted { why: String, now_ms: u64 },
    /// The new version passed its health gate.
    Healthy { now_ms: u64 },
    /// The new version failed or missed its gate deadline.
    Unhealthy { why: String },
    /// After a rollback, the old version runs again.
    OldVersionRuns { now_ms: u64 },
    /// The job ended (canceled, finished, failed for good) during the gate or the rollback.
    JobEnded { why: String, now_ms: u64 },
    /// A new leader took the job over. `slots_kept`: it adopted the running tasks, so the
    /// slots the job held stay allocated (otherwise it released them all).
    Recovered { slots_kept: bool, now_ms: u64 },
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::SlotsAllocated(_) => "slots-allocated",
            Event::DrainStarted => "drain-started",
            Event::Drained { .. } => "drained",
            Event::Aborted { .. } => "aborted",
            Event::Healthy { .. } => "healthy",
            Event::Unhealthy { .. } => "unhealthy",
            Event::OldVersionRuns { .. } => "old-version-runs",
            Event::JobEnded { .. } => "job-ended",
            Event::Recovered { .. } => "recovered",
        }
    }
}

/// What the driver does for a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    // Record edits: applied in the same fenced write as the new phase.
    /// The pending version will not run: marked failed.
    FailVersion(u32),
    /// The switch: `to` becomes the active version, `from` is finished.
    Switch { from: u32, to: u32 },
    /// The rollback: `old` is the active version again (to run anew), `failed` is failed.
    Reactivate { old: u32, failed: u32 },
    // Effects: after the write.
    /// Give these allocations back to the ResourceManager.
    Release(Vec<String>),
    /// Cancel the running attempt's tasks (the new version's) and give back their slots.
    CancelAttempt,
    /// The next attempt of the active version deploys into these slots.
    UseSlots(Vec<SlotRef>),
    /// Point the job's HA pointer at this savepoint, unless the new version already completed
    /// a checkpoint of its own.
    SetPointer(CheckpointPointer),
    /// Watch the new version's health until the deadline (ms since the epoch).
    WatchGate { deadline_ms: u64 },
    /// A progress step for `keel upgrade`.
    Report(String),
    /// The upgrade is complete: measure the pause and answer `keel upgrade`.
    Complete,
    /// The upgrade failed (or was rolled back): answer `keel upgrade` with this.
    Fail(String),
}

impl Action {
    /// Record edits go into the write that records the phase; the rest runs after it.
    pub fn is_record_edit(&self) -> bool {
        matches!(self, Action::FailVersion(_) | Action::Switch { .. } | Action::Reactivate { .. })
    }
}

/// An event that does not apply to the phase the upgrade is in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upgrade to version {to_version}: event {event} does not apply in phase {phase}")]
pub struct InvalidEvent {
    pub to_version: u32,
    pub phase: &'static str,
    pub event: &'static str,
}

/// The next upgrade and the actions to carry out, or an error when `event` does not apply.
/// Events after the end (`Done`, `Failed`) change nothing.
pub fn transition(u: &Upgrade, event: Event) -> Result<(Upgrade, Vec<Action>), InvalidEvent> {
    let (from, to) = (u.from_version, u.to_version);
    let next = |phase: Phase| Upgrade { phase, ..u.clone() };
    let invalid = |event: &Event| InvalidEvent { to_version: to, phase: u.phase.name(), event: event.name() };
    if u.phase.is_terminal() {
        return Ok((u.clone(), Vec::new()));
    }
    let out = match (&u.phase, event) {
        (Phase::Registered, Event::SlotsAllocated(slots)) => {
            let report = format!(
                "allocated {} slots for version {to} while version {from} keeps running",
                slots.len()
            );
            (next(Phase::SlotsAllocated { slots }), vec![Action::Report(report)])
        }
        (Phase::Registered | Phase::SlotsAllocated { .. }, Event::DrainStarted) => {
            (next(Phase::Draining { slots: u.phase.pending_slots().to_vec() }), Vec::new())
        }
        (
            Phase::Draining { slots },
            Event::Drained {
                savepoint,
                restore_pointer,
                old_slots,
                last_output_ms,
                checkpoints,
                gate_ms,
                now_ms,
            },
        ) => {
            let mut actions = vec![Action::Switch { from, to }];
            if let Some(pointer) = &restore_pointer {
                actions.push(Action::SetPointer(pointer.clone()));
            }
            let old_slots = if slots.is_empty() {
                // Stop-then-start: the old version's slots go now; the new one asks for its own.
                actions.push(Action::Release(allocations(&old_slots)));
                actions.push(Action::Report(format!("released version {from}'s slots")));
                Vec::new()
            } else {
                actions.push(Action::UseSlots(slots.clone()));
                old_slots
            };
            let deadline_ms = now_ms.saturating_add(gate_ms);
            actions.insert(1, Action::Report(format!("switched: version {to} is the active version")));
            actions.push(Action::WatchGate { deadline_ms });
            let phase = Phase::Switched {
                savepoint,
                gate_deadline_ms: deadline_ms,
                old_slots,
                checkpoints,
                last_output_ms,
                restore_pointer,
            };
            (next(phase), actions)
        }
        (phase, Event::Aborted { why, now_ms }) if phase.before_switch() => {
            let mut actions = vec![Action::FailVersion(to)];
            if !phase.pending_slots().is_empty() {
                actions.push(Action::Release(allocations(phase.pending_slots())));
            }
            actions.push(Action::Fail(why.clone()));
            (next(Phase::Failed { why, rolled_back: false, at_ms: now_ms }), actions)
        }
        (Phase::Switched { savepoint, old_slots, .. }, Event::Healthy { now_ms }) => {
            let mut actions = Vec::new();
            if !old_slots.is_empty() {
                actions.push(Action::Release(allocations(old_slots)));
            }
            actions.push(Action::Complete);
            (next(Phase::Done { savepoint: savepoint.clone(), at_ms: now_ms }), actions)
        }
        (Phase::Switched { savepoint, old_slots, .. }, Event::Unhealthy { why }) => {
            let mut actions = vec![Action::Reactivate { old: from, failed: to }, Action::CancelAttempt];
            if !old_slots.is_empty() {
                actions.push(Action::UseSlots(old_slots.clone()));
            }
            actions.push(Action::Report(format!(
                "rolling back: version {from} restarts from savepoint {}",
                savepoint.checkpoint_id
            )));
            (next(Phase::RollingBack { savepoint: savepoint.clone(), why }), actions)
        }
        (Phase::RollingBack { savepoint, why }, Event::OldVersionRuns { now_ms }) => {
            let message = format!(
                "upgrade to version {to} rolled back to version {from}: {why} (version {from} runs again from \
                 savepoint {})",
                savepoint.checkpoint_id
            );
            (
                next(Phase::Failed { why: why.clone(), rolled_back: true, at_ms: now_ms }),
                vec![Action::Fail(message)],
            )
        }
        (Phase::Switched { old_slots, .. }, Event::JobEnded { why, now_ms }) => {
            let mut actions = Vec::new();
            if !old_slots.is_empty() {
                actions.push(Action::Release(allocations(old_slots)));
            }
            let message = format!("version {to} ended before it was healthy: {why}");
            actions.push(Action::Fail(message.clone()));
            (next(Phase::Failed { why: message, rolled_back: false, at_ms: now_ms }), actions)
        }
        (Phase::RollingBack { why: first, .. }, Event::JobEnded { why, now_ms }) => {
            let message = format!("rolled back ({first}), then the job ended: {why}");
            (
                next(Phase::Failed { why: message.clone(), rolled_back: true, at_ms: now_ms }),
                vec![Action::Fail(message)],
            )
        }
        (phase, Event::Recovered { now_ms, .. }) if phase.before_switch() => {
            let why = format!(
                "a JobManager leader change interrupted the upgrade before its switch ({}); version {from} stays active",
                phase.name()
            );
            (
                next(Phase::Failed { why: why.clone(), rolled_back: false, at_ms: now_ms }),
                vec![Action::FailVersion(to), Action::Fail(why)],
            )
        }
        (
            Phase::Switched {
                savepoint,
                gate_deadline_ms,
                old_slots,
                checkpoints,
                last_output_ms,
                restore_pointer,
            },
            Event::Recovered { slots_kept, .. },
        ) => {
            // The new leader runs the new version and keeps the gate's deadline. The old
            // version's slots survive only when it adopted the job's tasks.
            let old_slots = if slots_kept { old_slots.clone() } else { Vec::new() };
            let phase = Phase::Switched {
                savepoint: savepoint.clone(),
                gate_deadline_ms: *gate_deadline_ms,
                old_slots,
                checkpoints: *checkpoints,
                last_output_ms: *last_output_ms,
                restore_pointer: restore_pointer.clone(),
            };
            // The old leader may have died between the switch and setting the pointer.
            let mut actions: Vec<Action> = restore_pointer.iter().cloned().map(Action::SetPointer).collect();
            actions.push(Action::WatchGate { deadline_ms: *gate_deadline_ms });
            (next(phase), actions)
        }
        (Phase::RollingBack { .. }, Event::Recovered { .. }) => (u.clone(), Vec::new()),
        (_, event) => return Err(invalid(&event)),
    };
    Ok(out)
}

/// The health gate's verdict for the new version: whether it runs, whether it completed a
/// checkpoint after the savepoint, and the time. `None`: keep watching.
pub fn gate(u: &Upgrade, running: bool, checkpointed: bool, now_ms: u64, timeout: &str) -> Option<Event> {
    let Phase::Switched { gate_deadline_ms, checkpoints, .. } = &u.phase else { return None };
    let checkpointed = checkpointed || !checkpoints;
    if running && checkpointed {
        return Some(Event::Healthy { now_ms });
    }
    if now_ms >= *gate_deadline_ms {
        let what = if running { "complete a checkpoint" } else { "run" };
        return Some(Event::Unhealthy {
            why: format!("version {} did not {what} within upgrade.health-timeout ({timeout})", u.to_version),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(tm: &str, i: u32) -> SlotRef {
        SlotRef {
            taskmanager_id: tm.into(),
            taskmanager_address: format!("{tm}:1"),
            index: i,
            allocation_id: format!("{tm}-{i}"),
        }
    }

    fn sp() -> SavepointRef {
        SavepointRef { checkpoint_id: 7, path: "/sp/chk-7".into() }
    }

    fn step(u: &Upgrade, e: Event) -> (Upgrade, Vec<Action>) {
        match transition(u, e) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn drained(now_ms: u64) -> Event {
        Event::Drained {
            savepoint: sp(),
            restore_pointer: None,
            old_slots: vec![slot("a", 0)],
            last_output_ms: Some(5),
            checkpoints: true,
            gate_ms: 1000,
            now_ms,
        }
    }

    /// A handover with slots for both versions, up to the gate.
    fn in_gate() -> Upgrade {
        let u = Upgrade::registered(1, 2, 0);
        let (u, _) = step(&u, Event::SlotsAllocated(vec![slot("b", 0)]));
        let (u, _) = step(&u, Event::DrainStarted);
        step(&u, drained(100)).0
    }

    /// Registered -> SlotsAllocated -> Draining -> Switched: the switch is a record edit in the
    /// same write, the new version deploys into the slots allocated for it, and the gate's
    /// deadline is the drain time plus the health timeout.
    #[test]
    fn handover_goes_through_every_phase_to_the_gate() {
        let u = Upgrade::registered(1, 2, 0);
        let (u, a) = step(&u, Event::SlotsAllocated(vec![slot("b", 0)]));
        assert_eq!(u.phase, Phase::SlotsAllocated { slots: vec![slot("b", 0)] });
        assert!(matches!(a.as_slice(), [Action::Report(_)]));
        let (u, a) = step(&u, Event::DrainStarted);
        assert_eq!(u.phase, Phase::Draining { slots: vec![slot("b", 0)] });
        assert!(a.is_empty());
        let (u, a) = step(&u, drained(100));
        assert_eq!(
            u.phase,
            Phase::Switched {
                savepoint: sp(),
                gate_deadline_ms: 1100,
                old_slots: vec![slot("a", 0)],
                checkpoints: true,
                last_output_ms: Some(5),
                restore_pointer: None,
            }
        );
        assert_eq!(a[0], Action::Switch { from: 1, to: 2 });
        assert!(a[0].is_record_edit());
        assert!(a.contains(&Action::UseSlots(vec![slot("b", 0)])));
        assert!(a.contains(&Action::WatchGate { deadline_ms: 1100 }));
        assert!(!a.iter().any(|a| matches!(a, Action::Release(_))), "old slots kept for a rollback: {a:?}");
    }

    /// Stop-then-start (no slots ahead): the old version's slots are released at the switch and
    /// none are kept for a rollback.
    #[test]
    fn stop_then_start_releases_the_old_slots_at_the_switch() {
        let u = Upgrade::registered(1, 2, 0);
        let (u, _) = step(&u, Event::DrainStarted);
        assert_eq!(u.phase, Phase::Draining { slots: vec![] });
        let (u, a) = step(&u, drained(10));
        assert!(a.contains(&Action::Release(vec!["a-0".into()])), "{a:?}");
        assert!(!a.iter().any(|a| matches!(a, Action::UseSlots(_))), "{a:?}");
        assert!(matches!(&u.phase, Phase::Switched { old_slots, .. } if old_slots.is_empty()));
    }

    /// An abort before the switch (refused, drain failed, canceled) fails the pending version
    /// and gives back the slots allocated for it; the old version is untouched.
    #[test]
    fn an_abort_before_the_switch_fails_the_pending_version_and_frees_its_slots() {
        let u = Upgrade::registered(1, 2, 0);
        let (f, a) = step(&u, Event::Aborted { why: "no".into(), now_ms: 3 });
        assert_eq!(f.phase, Phase::Failed { why: "no".into(), rolled_back: false, at_ms: 3 });
        assert_eq!(a, vec![Action::FailVersion(2), Action::Fail("no".into())]);
        let (u, _) = step(&u, Event::SlotsAllocated(vec![slot("b", 0)]));
        for u in [u.clone(), step(&u, Event::DrainStarted).0] {
            let (f, a) = step(&u, Event::Aborted { why: "drain failed".into(), now_ms: 4 });
            assert!(matches!(f.phase, Phase::Failed { rolled_back: false, .. }));
            assert!(a.contains(&Action::Release(vec!["b-0".into()])), "{a:?}");
            assert!(a.contains(&Action::FailVersion(2)), "{a:?}");
            assert!(!a.iter().any(|a| matches!(a, Action::Switch { .. } | Action::Reactivate { .. })));
        }
    }

    /// Healthy in the gate: done, and only then the old version's slots go.
    #[test]
    fn a_healthy_version_completes_the_upgrade_and_frees_the_old_slots() {
        let (u, a) = step(&in_gate(), Event::Healthy { now_ms: 500 });
        assert_eq!(u.phase, Phase::Done { savepoint: sp(), at_ms: 500 });
        assert_eq!(a, vec![Action::Release(vec!["a-0".into()]), Action::Complete]);
    }

    /// Unhealthy in the gate: the old version is active again in the same write, the new
    /// version's tasks are canceled, and the old version restarts in its kept slots; once it
    /// runs, the upgrade is failed as rolled back.
    #[test]
    fn an_unhealthy_version_rolls_back_to_the_old_one() {
        let (u, a) = step(&in_gate(), Event::Unhealthy { why: "task failed".into() });
        assert_eq!(u.phase, Phase::RollingBack { savepoint: sp(), why: "task failed".into() });
        assert_eq!(a[0], Action::Reactivate { old: 1, failed: 2 });
        assert!(a.contains(&Action::CancelAttempt));
        assert!(a.contains(&Action::UseSlots(vec![slot("a", 0)])));
        let (u, a) = step(&u, Event::OldVersionRuns { now_ms: 900 });
        assert!(matches!(&u.phase, Phase::Failed { rolled_back: true, at_ms: 900, .. }));
        assert!(matches!(a.as_slice(), [Action::Fail(m)] if m.contains("rolled back to version 1")));
    }

    /// The gate's verdict: healthy once running and checkpointed (or running, without periodic
    /// checkpoints); unhealthy at the deadline, saying what was missing; nothing before.
    #[test]
    fn the_gate_decides_on_running_checkpointed_and_the_deadline() {
        let u = in_gate();
        assert_eq!(gate(&u, true, true, 200, "1s"), Some(Event::Healthy { now_ms: 200 }));
        assert_eq!(gate(&u, true, false, 1099, "1s"), None);
        assert_eq!(gate(&u, false, false, 500, "1s"), None);
        let Some(Event::Unhealthy { why }) = gate(&u, true, false, 1100, "1s") else { panic!("unhealthy") };
        assert!(why.contains("did not complete a checkpoint"), "{why}");
        let Some(Event::Unhealthy { why }) = gate(&u, false, false, 2000, "1s") else { panic!("unhealthy") };
        assert!(why.contains("did not run"), "{why}");
        let mut no_checkpoints = u.clone();
        if let Phase::Switched { checkpoints, .. } = &mut no_checkpoints.phase {
            *checkpoints = false;
        }
        assert_eq!(gate(&no_checkpoints, true, false, 200, "1s"), Some(Event::Healthy { now_ms: 200 }));
        assert_eq!(
            gate(&Upgrade::registered(1, 2, 0), true, true, 5, "1s"),
            None,
            "no gate before the switch"
        );
    }

    /// The job ends in the gate (canceled): the upgrade fails without a rollback and the old
    /// slots go; during a rollback it fails as rolled back.
    #[test]
    fn the_job_ending_in_the_gate_or_the_rollback_ends_the_upgrade() {
        let (u, a) = step(&in_gate(), Event::JobEnded { why: "canceled".into(), now_ms: 7 });
        assert!(matches!(&u.phase, Phase::Failed { rolled_back: false, .. }));
        assert!(a.contains(&Action::Release(vec!["a-0".into()])), "{a:?}");
        let (rb, _) = step(&in_gate(), Event::Unhealthy { why: "x".into() });
        let (u, _) = step(&rb, Event::JobEnded { why: "canceled".into(), now_ms: 8 });
        assert!(matches!(&u.phase, Phase::Failed { rolled_back: true, .. }));
    }

    /// Leader failover at every phase before the switch: the pending version is failed and the
    /// old version (still active) runs on; nothing is switched or reactivated.
    #[test]
    fn a_leader_change_before_the_switch_drops_the_pending_version() {
        let registered = Upgrade::registered(1, 2, 0);
        let allocated = step(&registered, Event::SlotsAllocated(vec![slot("b", 0)])).0;
        let draining = step(&allocated, Event::DrainStarted).0;
        for u in [registered, allocated, draining] {
            let name = u.phase.name();
            let (f, a) = step(&u, Event::Recovered { slots_kept: false, now_ms: 50 });
            assert!(
                matches!(&f.phase, Phase::Failed { rolled_back: false, why, .. } if why.contains(name)),
                "{f:?}"
            );
            assert_eq!(a[0], Action::FailVersion(2), "{name}");
            assert!(!a.iter().any(|a| matches!(a, Action::Switch { .. } | Action::Reactivate { .. })));
        }
    }

    /// Leader failover in the health gate: the gate resumes with the recorded deadline (not a
    /// new one), so a failing new version is still rolled back; the old slots survive only when
    /// the new leader adopted the tasks (otherwise it released them all, and a rollback asks
    /// for new slots).
    #[test]
    fn a_leader_change_in_the_gate_keeps_the_deadline_and_the_rollback() {
        let u = in_gate();
        let (resumed, a) = step(&u, Event::Recovered { slots_kept: false, now_ms: 600 });
        assert_eq!(a, vec![Action::WatchGate { deadline_ms: 1100 }]);
        assert!(
            matches!(&resumed.phase, Phase::Switched { gate_deadline_ms: 1100, old_slots, .. } if old_slots.is_empty())
        );
        assert!(matches!(gate(&resumed, false, false, 1100, "1s"), Some(Event::Unhealthy { .. })));
        let (rb, a) = step(&resumed, Event::Unhealthy { why: "failed".into() });
        assert!(matches!(rb.phase, Phase::RollingBack { .. }));
        assert!(a.contains(&Action::Reactivate { old: 1, failed: 2 }));
        assert!(!a.iter().any(|a| matches!(a, Action::UseSlots(_))), "released slots are not reused: {a:?}");
        let (kept, _) = step(&u, Event::Recovered { slots_kept: true, now_ms: 600 });
        assert!(matches!(&kept.phase, Phase::Switched { old_slots, .. } if old_slots.len() == 1));
    }

    /// A savepoint chosen by a restore strategy (or a promote): the HA pointer is set to it
    /// only after the switch write, and again by a new leader that finds the switch recorded
    /// (the old one may have died before setting it); before the switch nothing sets it, so
    /// the old version restarts from its own drain savepoint.
    #[test]
    fn a_chosen_savepoint_is_pointed_at_only_after_the_switch() {
        let pointer = CheckpointPointer {
            job_id: "j".into(),
            checkpoint_id: 3,
            metadata_path: "/sp/sp-3/_metadata".into(),
            version: 1,
            attempt: 1,
            trigger_time_ms: 0,
            duration_ms: 0,
            size_bytes: 0,
            completed_at_ms: 0,
            epoch: 0,
        };
        let u = Upgrade::registered(1, 2, 0);
        let (draining, a) = step(&u, Event::DrainStarted);
        assert!(a.is_empty());
        let (_, a) = step(&draining, Event::Recovered { slots_kept: false, now_ms: 1 });
        assert!(!a.iter().any(|a| matches!(a, Action::SetPointer(_))), "{a:?}");
        let mut event = drained(10);
        if let Event::Drained { restore_pointer, .. } = &mut event {
            *restore_pointer = Some(pointer.clone());
        }
        let (switched, a) = step(&draining, event);
        let switch = a.iter().position(|a| matches!(a, Action::Switch { .. }));
        let set = a.iter().position(|a| *a == Action::SetPointer(pointer.clone()));
        assert!(matches!((switch, set), (Some(s), Some(p)) if s < p), "{a:?}");
        let (_, a) = step(&switched, Event::Recovered { slots_kept: false, now_ms: 20 });
        assert!(a.contains(&Action::SetPointer(pointer)), "{a:?}");
    }

    /// Leader failover while rolling back: the old version is already the active one, so the
    /// new leader runs it and the upgrade ends as rolled back once it runs.
    #[test]
    fn a_leader_change_while_rolling_back_finishes_the_rollback() {
        let (rb, _) = step(&in_gate(), Event::Unhealthy { why: "failed".into() });
        let (u, a) = step(&rb, Event::Recovered { slots_kept: false, now_ms: 1 });
        assert_eq!(u, rb);
        assert!(a.is_empty());
        let (u, _) = step(&u, Event::OldVersionRuns { now_ms: 2 });
        assert!(matches!(&u.phase, Phase::Failed { rolled_back: true, .. }));
    }

    /// Ended upgrades ignore later events; events that do not fit a phase are refused with a
    /// typed error naming both.
    #[test]
    fn ended_upgrades_ignore_events_and_misfits_are_refused() {
        let (done, _) = step(&in_gate(), Event::Healthy { now_ms: 1 });
        assert_eq!(step(&done, Event::Unhealthy { why: "late".into() }), (done.clone(), vec![]));
        assert_eq!(step(&done, Event::Recovered { slots_kept: false, now_ms: 2 }), (done, vec![]));
        let err = transition(&Upgrade::registered(1, 2, 0), Event::Healthy { now_ms: 1 })
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("healthy") && err.contains("registered"), "{err}");
        assert!(transition(&in_gate(), Event::DrainStarted).is_err());
        assert!(transition(&in_gate(), Event::Aborted { why: "x".into(), now_ms: 1 }).is_err());
    }

    /// The phase is stored in the job record as JSON: it round-trips, and a record without an
    /// upgrade (written before this field existed) still parses.
    #[test]
    fn the_upgrade_round_trips_through_json() -> Result<(), serde_json::Error> {
        let u = in_gate();
        let json = serde_json::to_string(&u)?;
        assert!(json.contains("\"phase\":\"switched\""), "{json}");
        assert_eq!(serde_json::from_str::<Upgrade>(&json)?, u);
        Ok(())
    }
}
