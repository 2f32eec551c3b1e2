//! The JobManager: jobs, versions, scheduling of tasks onto slots.
//!
//! Every JobManager process serves gRPC; only the elected leader has a leader scope. Standbys
//! answer with a typed `NotLeader` error carrying the leader's address. A new leader recovers
//! every job from the HA store and brings each non-terminal one back to running; losing
//! leadership drops the whole leader scope (every driver stops) instead of demoting in place.
//!
//! Layout, one job per file:
//! - `process`: one JobManager process ([`run`]): binds the port, serves the gRPC service, and
//!   campaigns for leadership.
//! - `service`: the gRPC service. An RPC validates and hands an event to the job's driver;
//!   task reports, heartbeats and checkpoint acknowledgements from the TaskManagers land here.
//! - `submit`: submit validation (names, exactly-once prefixes and checkpointing,
//!   `transaction.timeout.ms`, restore and savepoint sources) and the durable write of a new job.
//! - `leader`: [`JobManager`] and the lead loop: recover the jobs, start their drivers, follow
//!   TaskManager losses until leadership ends.
//! - `status`: the status views (`keel list`, `keel status`); read-only.
//! - `state`: the state the leader scope shares: the process context, the leader's state (jobs,
//!   TaskManagers, the adoption window and its orphans), and each job's handle.
//! - [`events`]: what a job's driver receives ([`events::JobEvent`]).
//! - [`driver`]: one task per job that schedules, deploys, watches, restarts and cancels it;
//!   each attempt is deployed from the job's latest completed checkpoint, if it has one.
//! - [`upgrade`]: an upgrade's request, checks and progress stream; the driver runs its steps.
//! - [`upgrade_phase`]: the upgrade's phases, a pure state machine persisted in the job record.
//! - [`coordinator`]: the checkpoint coordinator's I/O, one loop per running attempt: trigger,
//!   complete (metadata file, fenced HA pointer, notify), retention, and restore.
//! - [`checkpoint`]: the checkpoint coordinator's decisions (pure: when to trigger, which
//!   acknowledgements count, timeouts, retention) and the metadata and pointer formats.
//! - [`record`]: the durable job record kept in the HA store and the live task table.
//! - [`restart`]: restart strategies (pure): whether and when a failed job restarts, and the
//!   restart history kept in the job record.
//!
//! Imports between the files form a DAG (`a -> b`: `a` uses `b`; no file reaches back):
//!
//! ```text
//! process     -> leader, service, state
//! service     -> leader, submit (its JobManager methods), status, events, state, upgrade,
//!                coordinator, checkpoint
//! submit      -> leader, state, coordinator, checkpoint, record
//! leader      -> driver, state, record
//! driver      -> coordinator, upgrade, upgrade_phase, events, state, checkpoint, record, restart
//! status      -> state, record, restart, upgrade_phase
//! coordinator -> state, checkpoint, record
//! state       -> events, checkpoint, record
//! events      -> upgrade
//! upgrade     -> checkpoint, record
//! record      -> restart, upgrade_phase
//! upgrade_phase -> checkpoint
//! checkpoint, restart: none
//! ```
//!
//! Fencing: every request to the ResourceManager and the TaskManagers carries this leader's
//! epoch; every HA write is conditional on still holding leadership; task reports stamped with
//! an older leader's epoch are treated as unknown, so the TaskManager cancels those tasks.

pub mod checkpoint;
pub mod coordinator;
pub mod driver;
pub mod events;
mod leader;
mod process;
pub mod record;
pub mod restart;
mod service;
mod state;
mod status;
mod submit;
pub mod upgrade;
pub mod upgrade_phase;

pub use leader::JobManager;
pub use process::run;
