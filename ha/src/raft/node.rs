//! One member of the Raft group: raft-rs's `RawNode` over the member's [`DiskStorage`] and its
//! [`Machine`], driven by the Ready loop on an OS thread of its own (it blocks on fsync).
//!
//! The loop takes [`Input`]s (Raft messages from peers, client proposals and reads, transport
//! reports) from a channel, ticks the Raft clock every [`Timing::tick`], and after each round
//! handles the node's `Ready` in the order raft-rs prescribes:
//!
//! 1. send the leader's messages at once (they do not wait for this member's own fsync);
//! 2. install a received snapshot (storage, then machine);
//! 3. apply committed entries to the machine, answering the clients whose proposals they are;
//! 4. append new entries and the hard state to disk in one write, **fsynced** (unless only the
//!    commit index moved: raft-rs's `must_sync`);
//! 5. only then send the messages that acknowledge them (votes, append responses);
//! 6. advance, and repeat 3-5 for the light ready;
//! 7. answer reads whose read-index this member has now applied;
//! 8. take a snapshot and compact the log every [`Timing::snapshot_every`] applied entries.
//!
//! Clients talk only to the Raft leader: a proposal or read sent to another member is answered
//! `NOT_LEADER` with the leader's address (when known), and the client goes there. A proposal
//! whose outcome this member cannot learn any more (it stopped leading before the entry was
//! applied) is answered `Unavailable`: the command may or may not have been applied, as with a
//! timeout on etcd.
//!
//! While leading, the member also runs the session timers ([`LeaseTimers`]) on its clock and
//! proposes the expiries they find due.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::{KeelError, Result};
use raft::prelude::{Entry, EntryType, Message, Snapshot};
use raft::{RawNode, ReadOnlyOption, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};

use super::machine::{Command, LeaseTimers, Machine, Query, Reply};
use super::storage::DiskStorage;
use crate::clock::Clock;
use crate::LeaderInfo;

/// The Raft clock and the snapshot cadence.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// One Raft tick.
    pub tick: Duration,
    /// A follower that hears nothing from the leader for a random 1x-2x this many ticks starts an
    /// election (pre-vote first, so a member that was merely cut off does not depose a healthy
    /// leader when it returns).
    pub election_ticks: usize,
    /// The leader's heartbeat, in ticks.
    pub heartbeat_ticks: usize,
    /// Applied entries between two snapshots (each compacts the log).
    pub snapshot_every: u64,
}

impl Default for Timing {
    /// 50 ms ticks, elections after 0.5-1 s of silence, heartbeats every 100 ms, a snapshot
    /// every 1,000 entries. A leaderless group answers nothing, and a Keel leader's lease (3 s by
    /// default) must outlast one election plus a retry: see docs/fencing.md.
    fn default() -> Self {
        Timing {
            tick: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 1000,
        }
    }
}

/// How this member is set up.
#[derive(Debug, Clone)]
pub struct MemberSettings {
    pub id: u64,
    /// Every member of the group (this one included): id -> address.
    pub members: BTreeMap<u64, String>,
    /// The member's own directory (its log, hard state and snapshot).
    pub dir: PathBuf,
    pub timing: Timing,
}

/// The leaders of every `<cluster>/<role>` as this member has applied them.
pub type LeaderTable = Arc<BTreeMap<String, LeaderInfo>>;

/// This member's view of the group, for `MemberStatus` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: u64,
    pub raft_leader: u64,
    pub term: u64,
    pub state: &'static str,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub disk_bytes: u64,
}

/// What the Ready loop is told.
pub enum Input {
    /// Messages from a peer.
    Raft(Vec<Message>),
    Propose {
        command: Command,
        reply: oneshot::Sender<Result<Reply>>,
    },
    Read {
        query: Query,
        reply: oneshot::Sender<Result<Reply>>,
    },
    Status {
        reply: oneshot::Sender<MemberStatus>,
    },
    /// The transport could not deliver to this peer.
    Unreachable(u64),
    /// The transport delivered (or failed to deliver) a snapshot to this peer.
    SnapshotSent {
        to: u64,
        delivered: bool,
    },
    /// Stop the Ready loop (what is on disk stays; the member can be opened again).
    Stop,
}

/// Where the Ready loop puts messages for peers (the transport takes them from there).
pub trait Outbox: Send + 'static {
    fn send(&mut self, messages: Vec<Message>);
}

/// The Ready loop's state. See the module documentation.
pub struct Node {
    raw: RawNode<DiskStorage>,
    machine: Machine,
    timers: LeaseTimers,
    clock: Arc<dyn Clock>,
    timing: Timing,
    members: BTreeMap<u64, String>,
    /// Distinguishes this run's proposals from a previous run's still in the log.
    incarnation: u64,
    next_request: u64,
    proposals: HashMap<u64, oneshot::Sender<Result<Reply>>>,
    reads: HashMap<u64, (Query, oneshot::Sender<Result<Reply>>)>,
    /// Reads whose read-index is known, waiting until this member has applied that far.
    ready_reads: Vec<(u64, Query, oneshot::Sender<Result<Reply>>)>,
    applied: u64,
    snapshot_index: u64,
    was_leader: bool,
    leaders: watch::Sender<LeaderTable>,
    /// Test seam: while set, the Ready loop stands still (see [`Node::freeze_switch`]).
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

/// A request id and the run it belongs to, as a proposal's context.
fn context(incarnation: u64, id: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(16);
    c.extend_from_slice(&incarnation.to_le_bytes());
    c.extend_from_slice(&id.to_le_bytes());
    c
}

fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    let incarnation = u64::from_le_bytes(c.get(..8)?.try_into().ok()?);
    let id = u64::from_le_bytes(c.get(8..16)?.try_into().ok()?);
    Some((incarnation, id))
}

fn storage_error(dir: &std::path::Path, what: &str, e: impl std::fmt::Display) -> KeelError {
    KeelError::ha(format!("raft storage {}: {what}: {e}", dir.display()))
}

fn state_name(state: StateRole) -> &'static str {
    match state {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}

impl Node {
    /// Opens the member's storage (recovering what it holds) and its Raft node.
    pub fn open(
        settings: &MemberSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<(Node, watch::Receiver<LeaderTable>)> {
        let voters: Vec<u64> = settings.members.keys().copied().collect();
        let storage = DiskStorage::open(&settings.dir, &voters)
            .map_err(|e| storage_error(&settings.dir, "cannot open", e))?;
        let (machine, snapshot_index) = match storage.latest_snapshot() {
            Some(s) => {
                let m = Machine::from_bytes(&s.data)
                    .map_err(|e| storage_error(&settings.dir, "the snapshot's state is not readable", e))?;
                (m, s.get_metadata().index)
            }
            None => (Machine::default(), 0),
        };
        let config = raft::Config {
            id: settings.id,
            election_tick: settings.timing.election_ticks,
            heartbeat_tick: settings.timing.heartbeat_ticks,
            applied: snapshot_index,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            ..raft::Config::default()
        };
        config.validate().map_err(|e| KeelError::ha(format!("raft configuration: {e}")))?;
        let logger = slog::Logger::root(TracingDrain { member: settings.id }, slog::o!());
        let raw = RawNode::new(&config, storage, &logger)
            .map_err(|e| KeelError::ha(format!("cannot start raft member {}: {e}", settings.id)))?;
        let incarnation = clock.now_ms() ^ (u64::from(std::process::id()) << 40);
        let (leaders, leaders_rx) = watch::channel(Arc::new(machine.leaders()));
        Ok((
            Node {
                raw,
                machine,
                timers: LeaseTimers::default(),
                clock,
                timing: settings.timing,
                members: settings.members.clone(),
                incarnation,
                next_request: 0,
                proposals: HashMap::new(),
                reads: HashMap::new(),
                ready_reads: Vec::new(),
                applied: snapshot_index,
                snapshot_index,
                was_leader: false,
                leaders,
                frozen: Arc::default(),
            },
            leaders_rx,
        ))
    }

    /// A test seam: while the switch is on, the Ready loop does nothing (no ticks, no inputs
    /// taken), as a member process stopped with SIGSTOP, except that its gRPC service still
    /// takes requests and queues them. Once it is off again, the member sees the queue and
    /// the time that passed at once, as a resumed process does.
    pub fn freeze_switch(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.frozen.clone()
    }

    /// Runs the Ready loop until the input channel closes. A storage failure ends it with the
    /// error: a member that cannot persist must not acknowledge anything.
    pub fn run(mut self, inputs: Receiver<Input>, mut outbox: impl Outbox) -> Result<()> {
        let mut next_tick = Instant::now() + self.timing.tick;
        loop {
            while self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let wait = next_tick.saturating_duration_since(Instant::now());
            match inputs.recv_timeout(wait) {
                Ok(input) => {
                    if !self.handle(input) {
                        return Ok(());
                    }
                    // Take whatever else is queued before writing, so that one fsync covers it.
                    while let Ok(input) = inputs.try_recv() {
                        if !self.handle(input) {
                            return Ok(());
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick += self.timing.tick;
                if next_tick < Instant::now() {
                    // Behind (the thread was not scheduled): do not tick in a burst.
                    next_tick = Instant::now() + self.timing.tick;
                }
                self.expire_due_sessions();
            }
            self.on_ready(&mut outbox)?;
        }
    }

    /// Handles one input; false on [`Input::Stop`].
    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Stop => return false,
            Input::Raft(messages) => {
                for m in messages {
                    if let Err(e) = self.raw.step(m) {
                        tracing::debug!(member = self.raw.raft.id, error = %e, "raft message refused");
                    }
                }
            }
            Input::Propose { command, reply } => self.propose(command, reply),
            Input::Read { query, reply } => self.read(query, reply),
            Input::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Input::Unreachable(peer) => self.raw.report_unreachable(peer),
            Input::SnapshotSent { to, delivered } => {
                let status = if delivered { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.raw.report_snapshot(to, status);
            }
        }
        true
    }

    fn not_leader(&self) -> KeelError {
        let leader = self.raw.raft.leader_id;
        KeelError::not_leader("ha-member", self.members.get(&leader).cloned())
    }

    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    fn propose(&mut self, command: Command, reply: oneshot::Sender<Result<Reply>>) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let data = match serde_json::to_vec(&command) {
            Ok(d) => d,
            Err(e) => {
                let _ = reply.send(Err(KeelError::internal(format!("cannot encode command: {e}"))));
                return;
            }
        };
        let id = self.request_id();
        match self.raw.propose(context(self.incarnation, id), data) {
            Ok(()) => {
                self.proposals.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(KeelError::unavailable(
                    self.address(),
                    format!("raft member did not take the proposal: {e}"),
                )));
            }
        }
    }

    fn read(&mut self, query: Query, reply: oneshot::Sender<Result<Reply>>) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if !self.raw.raft.commit_to_current_term() {
            // raft-rs drops a read-index request silently until the leader has committed an
            // entry of its own term (moments after it is elected): refuse it instead.
            let _ = reply.send(Err(KeelError::unavailable(
                self.address(),
                "this raft member was just elected and serves reads once its first entry commits",
            )));
            return;
        }
        let id = self.request_id();
        self.reads.insert(id, (query, reply));
        self.raw.read_index(context(self.incarnation, id));
    }

    fn address(&self) -> String {
        self.members.get(&self.raw.raft.id).cloned().unwrap_or_else(|| format!("member {}", self.raw.raft.id))
    }

    fn status(&self) -> MemberStatus {
        let raft = &self.raw.raft;
        MemberStatus {
            id: raft.id,
            raft_leader: raft.leader_id,
            term: raft.term,
            state: state_name(raft.state),
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            snapshot_index: self.snapshot_index,
            disk_bytes: self.raw.store().disk_usage().unwrap_or(0),
        }
    }

    /// While leading: brings the session timers up to date and proposes the expiries due.
    fn expire_due_sessions(&mut self) {
        if self.raw.raft.state != StateRole::Leader {
            return;
        }
        let now = self.clock.lease_now();
        self.timers.observe(&self.machine, now);
        let retry = self.timing.tick * u32::try_from(self.timing.election_ticks).unwrap_or(10);
        for command in self.timers.due(&self.machine, now, retry) {
            tracing::info!(member = self.raw.raft.id, ?command, "session lease expired; proposing its end");
            match serde_json::to_vec(&command) {
                Ok(data) => {
                    if let Err(e) = self.raw.propose(Vec::new(), data) {
                        tracing::debug!(member = self.raw.raft.id, error = %e, "expiry not proposed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot encode an expiry"),
            }
        }
    }

    fn on_ready(&mut self, outbox: &mut impl Outbox) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let dir_error = |what: &str, e: std::io::Error| KeelError::ha(format!("raft storage: {what}: {e}"));
        let mut rd = self.raw.ready();
        if !rd.messages().is_empty() {
            outbox.send(rd.take_messages());
        }
        if !rd.snapshot().is_empty() {
            let snapshot = rd.snapshot().clone();
            self.install_snapshot(snapshot)?;
        }
        let committed = rd.take_committed_entries();
        self.apply_entries(committed);
        // New entries and the hard state in one write, fsynced once (not when only the commit
        // index moved: raft-rs's must_sync).
        self.raw
            .mut_store()
            .persist(rd.entries(), rd.hs(), rd.must_sync())
            .map_err(|e| dir_error("persist", e))?;
        if let Some(ss) = rd.ss() {
            self.on_role(ss.raft_state, ss.leader_id);
        }
        for rs in rd.take_read_states() {
            let Some((incarnation, id)) = parse_context(&rs.request_ctx) else { continue };
            if incarnation != self.incarnation {
                continue;
            }
            if let Some((query, reply)) = self.reads.remove(&id) {
                self.ready_reads.push((rs.index, query, reply));
            }
        }
        if !rd.persisted_messages().is_empty() {
            outbox.send(rd.take_persisted_messages());
        }
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit).map_err(|e| dir_error("commit index", e))?;
        }
        if !light.messages().is_empty() {
            outbox.send(light.take_messages());
        }
        let committed = light.take_committed_entries();
        self.apply_entries(committed);
        self.raw.advance_apply_to(self.applied);
        self.answer_ready_reads();
        self.maybe_snapshot()?;
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        let index = snapshot.get_metadata().index;
        let machine = Machine::from_bytes(&snapshot.data).map_err(|e| {
            KeelError::ha(format!("snapshot at index {index} from the leader is not readable: {e}"))
        })?;
        self.raw
            .mut_store()
            .apply_snapshot(snapshot)
            .map_err(|e| KeelError::ha(format!("raft storage: install snapshot at {index}: {e}")))?;
        tracing::info!(member = self.raw.raft.id, index, "installed a snapshot from the leader");
        self.machine = machine;
        self.applied = index;
        self.snapshot_index = index;
        self.publish_leaders();
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        for entry in entries {
            let index = entry.index;
            if index <= self.applied {
                continue;
            }
            self.applied = index;
            if entry.data.is_empty() || entry.get_entry_type() != EntryType::EntryNormal {
                // The empty entry of a new term, or a configuration change (not used: the
                // membership is fixed by configuration).
                continue;
            }
            let reply = match serde_json::from_slice::<Command>(&entry.data) {
                Ok(command) => Ok(self.machine.apply(index, &command)),
                Err(e) => {
                    tracing::error!(member = self.raw.raft.id, index, error = %e, "unreadable command in the log; skipped");
                    Err(KeelError::ha(format!("log entry {index} holds an unreadable command: {e}")))
                }
            };
            if let Some((incarnation, id)) = parse_context(&entry.context) {
                if incarnation == self.incarnation {
                    if let Some(tx) = self.proposals.remove(&id) {
                        let _ = tx.send(reply);
                    }
                }
            }
        }
        self.publish_leaders();
    }

    fn publish_leaders(&mut self) {
        let now = self.machine.leaders();
        self.leaders.send_if_modified(|current| {
            if **current != now {
                *current = Arc::new(now);
                true
            } else {
                false
            }
        });
    }

    fn on_role(&mut self, state: StateRole, leader: u64) {
        let leading = state == StateRole::Leader;
        tracing::info!(
            member = self.raw.raft.id,
            state = state_name(state),
            leader,
            term = self.raw.raft.term,
            "raft role changed"
        );
        if leading != self.was_leader {
            // A new leader starts every session timer afresh; one that stopped leading drops them.
            self.timers.restart();
        }
        if self.was_leader && !leading {
            let address = self.address();
            for (_, tx) in self.proposals.drain() {
                let _ = tx.send(Err(KeelError::unavailable(
                    &address,
                    "this member stopped leading the Raft group before the command was applied; it may or may not have been",
                )));
            }
            let hint = self.members.get(&leader).cloned();
            let refused = || KeelError::not_leader("ha-member", hint.clone());
            for (_, (_, tx)) in self.reads.drain() {
                let _ = tx.send(Err(refused()));
            }
            for (_, _, tx) in self.ready_reads.drain(..) {
                let _ = tx.send(Err(refused()));
            }
        }
        self.was_leader = leading;
    }

    fn answer_ready_reads(&mut self) {
        if self.ready_reads.is_empty() {
            return;
        }
        let applied = self.applied;
        let (due, waiting): (Vec<_>, Vec<_>) =
            self.ready_reads.drain(..).partition(|(index, _, _)| *index <= applied);
        self.ready_reads = waiting;
        for (_, query, tx) in due {
            let _ = tx.send(Ok(self.machine.query(&query)));
        }
    }

    fn maybe_snapshot(&mut self) -> Result<()> {
        if self.applied < self.snapshot_index + self.timing.snapshot_every {
            return Ok(());
        }
        let data = self
            .machine
            .to_bytes()
            .map_err(|e| KeelError::internal(format!("cannot encode the state: {e}")))?;
        let index = self.applied;
        self.raw
            .mut_store()
            .compact(index, data)
            .map_err(|e| KeelError::ha(format!("raft storage: snapshot at {index}: {e}")))?;
        self.snapshot_index = index;
        tracing::debug!(member = self.raw.raft.id, index, "snapshot taken, log compacted");
        Ok(())
    }
}

/// Forwards raft-rs's log records (slog) to `tracing`, with their key-value pairs.
struct TracingDrain {
    member: u64,
}

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> std::result::Result<(), slog::Never> {
        use slog::KV;
        let mut kv = KvText(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let (message, member, kv) = (record.msg(), self.member, kv.0);
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", member, "{message}{kv}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", member, "{message}{kv}"),
            slog::Level::Info => tracing::debug!(target: "raft", member, "{message}{kv}"),
            slog::Level::Debug | slog::Level::Trace => {
                tracing::trace!(target: "raft", member, "{message}{kv}")
            }
        }
        Ok(())
    }
}

/// A handle for sending inputs to a member's Ready loop from async code.
#[derive(Clone)]
pub struct NodeHandle {
    pub(crate) tx: Sender<Input>,
    pub(crate) address: String,
}

impl NodeHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Input) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| KeelError::unavailable(&self.address, "the raft member has stopped"))?;
        rx.await.map_err(|_| KeelError::unavailable(&self.address, "the raft member has stopped"))
    }

    pub async fn propose(&self, command: Command) -> Result<Reply> {
        self.ask(|reply| Input::Propose { command, reply }).await?
    }

    pub async fn read(&self, query: Query) -> Result<Reply> {
        self.ask(|reply| Input::Read { query, reply }).await?
    }

    pub async fn status(&self) -> Result<MemberStatus> {
        self.ask(|reply| Input::Status { reply }).await
    }

    pub fn deliver(&self, messages: Vec<Message>) -> Result<()> {
        self.tx
            .send(Input::Raft(messages))
            .map_err(|_| KeelError::unavailable(&self.address, "the raft member has stopped"))
    }

    pub(crate) fn report(&self, input: Input) {
        let _ = self.tx.send(input);
    }
}
