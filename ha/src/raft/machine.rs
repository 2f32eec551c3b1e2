//! The replicated state machine of the Raft HA backend, and the lease timers of its Raft leader.
//!
//! Pure: no I/O and no clock of its own. Every member applies the same committed [`Command`]s in
//! log order to its [`Machine`] and reaches the same state; the member that received a command
//! from a client answers with the [`Reply`] its own machine computed. Time enters only through
//! [`LeaseTimers`], which the member leading the Raft group feeds with its clock to decide which
//! sessions to expire; the expiry itself is a command in the log like any other, conditional on
//! the session not having been renewed since (so every member applies the same outcome).
//!
//! What the machine holds (one store can serve several Keel clusters: keys carry the cluster id):
//! - **sessions**: a client's lease, created by [`Command::Grant`] with a TTL and renewed by
//!   [`Command::KeepAlive`]; each records `renewed`, the log index of its last grant or renewal.
//! - **leaders**: per `<cluster>/<role>`, the session holding it, the address it published and its
//!   epoch, which is the log index of the [`Command::Acquire`] that won it. Log indexes only grow,
//!   so every new leadership has a greater epoch than every earlier one, for any role (as etcd's
//!   revision). A leader record lives as long as its session: expiring or revoking the session
//!   vacates the role.
//! - **meta**: `<cluster>/<key>` -> bytes; written only by fenced commands ([`Fence`]): a put,
//!   delete or increment applies only if the fence's role is still led with the fence's epoch,
//!   else it answers [`Reply::Fenced`] and changes nothing.
//!
//! The lease rule (why a client may act until `sent + TTL - margin`, as with etcd): the Raft
//! leader starts a session's timer when it applies the session's latest grant or renewal, and
//! restarts every timer when it becomes leader. Both happen after the entry was committed, so
//! after the client sent it; a session is expired only when its timer shows the full TTL. A
//! leader cut off from the majority cannot commit its expiry; a member that wins the next Raft
//! election starts all timers again. So no member expires a session before `sent + TTL` of the
//! client's last acknowledged renewal (up to the difference in clock rates the margin covers).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{LeaderInfo, LeaseInstant};

/// A condition on a write: the leader of `leader` (`<cluster>/<role>`) still has `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub leader: String,
    pub epoch: u64,
}

/// A change to the replicated store, as it travels in a log entry (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// A new session with this TTL; answers [`Reply::Session`] with its id (the entry's index).
    Grant {
        ttl_ms: u64,
    },
    /// Renews a session: [`Reply::Done`], or [`Reply::NoSession`] when it is gone.
    KeepAlive {
        session: u64,
    },
    /// Ends a session and vacates every role it leads.
    Revoke {
        session: u64,
    },
    /// Proposed by the Raft leader's [`LeaseTimers`]: ends the session if it was not renewed
    /// since the renewal at index `renewed`.
    Expire {
        session: u64,
        renewed: u64,
    },
    /// Leads `leader` (`<cluster>/<role>`) with `session` if nobody does:
    /// [`Reply::Won`] with the epoch, or [`Reply::Taken`] with the current leader. Sent again
    /// by the session that holds it, it answers the same [`Reply::Won`].
    Acquire {
        leader: String,
        session: u64,
        address: String,
    },
    /// Vacates `leader` if it is still held with `epoch`.
    Resign {
        leader: String,
        epoch: u64,
    },
    Put {
        fence: Fence,
        key: String,
        value: Vec<u8>,
    },
    Delete {
        fence: Fence,
        key: String,
    },
    /// Adds one to the decimal counter at `key` (missing: 0) and answers the new value.
    Increment {
        fence: Fence,
        key: String,
    },
}

/// A read of the store, answered at a linearizable point (read-index at the Raft leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    Get {
        key: String,
    },
    /// Every key under `prefix`, sorted.
    List {
        prefix: String,
    },
    Leader {
        leader: String,
    },
}

/// The machine's answer to a [`Command`] or a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Done,
    Session {
        id: u64,
    },
    NoSession {
        session: u64,
    },
    Won {
        epoch: u64,
    },
    Taken {
        leader: Option<LeaderInfo>,
    },
    /// A fenced write refused: `leader` is now held with `current` (none: vacant).
    Fenced {
        current: Option<u64>,
    },
    Counter {
        value: u64,
    },
    /// The counter at `key` holds something other than a decimal number.
    NotACounter {
        key: String,
    },
    Value {
        value: Option<Vec<u8>>,
    },
    List {
        entries: Vec<(String, Vec<u8>)>,
    },
    Leader {
        leader: Option<LeaderInfo>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    ttl_ms: u64,
    /// The index of the session's last grant or renewal.
    renewed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Held {
    session: u64,
    address: String,
    epoch: u64,
}

/// The replicated store. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    sessions: BTreeMap<u64, Session>,
    leaders: BTreeMap<String, Held>,
    meta: BTreeMap<String, Vec<u8>>,
}

impl Machine {
    /// Applies the command of the log entry at `index`. Deterministic: the same commands in the
    /// same order give every member the same state and the same replies.
    pub fn apply(&mut self, index: u64, command: &Command) -> Reply {
        match command {
            Command::Grant { ttl_ms } => {
                self.sessions.insert(index, Session { ttl_ms: *ttl_ms, renewed: index });
                Reply::Session { id: index }
            }
            Command::KeepAlive { session } => match self.sessions.get_mut(session) {
                Some(s) => {
                    s.renewed = index;
                    Reply::Done
                }
                None => Reply::NoSession { session: *session },
            },
            Command::Revoke { session } => {
                self.end_session(*session);
                Reply::Done
            }
            Command::Expire { session, renewed } => {
                if self.sessions.get(session).is_some_and(|s| s.renewed == *renewed) {
                    self.end_session(*session);
                }
                Reply::Done
            }
            Command::Acquire { leader, session, address } => {
                if let Some(held) = self.leaders.get(leader) {
                    // Idempotent for its own session, so that a client may send it again.
                    if held.session == *session {
                        return Reply::Won { epoch: held.epoch };
                    }
                    return Reply::Taken { leader: Some(info(held)) };
                }
                if !self.sessions.contains_key(session) {
                    return Reply::NoSession { session: *session };
                }
                self.leaders.insert(
                    leader.clone(),
                    Held { session: *session, address: address.clone(), epoch: index },
                );
                Reply::Won { epoch: index }
            }
            Command::Resign { leader, epoch } => {
                if self.leaders.get(leader).is_some_and(|h| h.epoch == *epoch) {
                    self.leaders.remove(leader);
                }
                Reply::Done
            }
            Command::Put { fence, key, value } => self.fenced(fence, |meta| {
                meta.insert(key.clone(), value.clone());
                Reply::Done
            }),
            Command::Delete { fence, key } => self.fenced(fence, |meta| {
                meta.remove(key);
                Reply::Done
            }),
            Command::Increment { fence, key } => self.fenced(fence, |meta| {
                let current = match meta.get(key) {
                    None => 0,
                    Some(bytes) => {
                        match std::str::from_utf8(bytes).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                            Some(n) => n,
                            None => return Reply::NotACounter { key: key.clone() },
                        }
                    }
                };
                let value = current.saturating_add(1);
                meta.insert(key.clone(), value.to_string().into_bytes());
                Reply::Counter { value }
            }),
        }
    }

    /// Answers a read from the current state.
    pub fn query(&self, query: &Query) -> Reply {
        match query {
            Query::Get { key } => Reply::Value { value: self.meta.get(key).cloned() },
            Query::List { prefix } => Reply::List {
                entries: self
                    .meta
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            },
            Query::Leader { leader } => Reply::Leader { leader: self.leader(leader) },
        }
    }

    /// The current leader of `leader` (`<cluster>/<role>`).
    pub fn leader(&self, leader: &str) -> Option<LeaderInfo> {
        self.leaders.get(leader).map(info)
    }

    /// Every leader, by `<cluster>/<role>`.
    pub fn leaders(&self) -> BTreeMap<String, LeaderInfo> {
        self.leaders.iter().map(|(k, h)| (k.clone(), info(h))).collect()
    }

    /// Every session with its TTL and last renewal, for [`LeaseTimers::observe`].
    pub fn sessions(&self) -> impl Iterator<Item = (u64, Duration, u64)> + '_ {
        self.sessions.iter().map(|(id, s)| (*id, Duration::from_millis(s.ttl_ms), s.renewed))
    }

    /// The state as bytes, for a snapshot.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// The state a snapshot holds.
    pub fn from_bytes(bytes: &[u8]) -> Result<Machine, serde_json::Error> {
        if bytes.is_empty() {
            return Ok(Machine::default());
        }
        serde_json::from_slice(bytes)
    }

    fn fenced(
        &mut self,
        fence: &Fence,
        write: impl FnOnce(&mut BTreeMap<String, Vec<u8>>) -> Reply,
    ) -> Reply {
        let current = self.leaders.get(&fence.leader).map(|h| h.epoch);
        if current != Some(fence.epoch) {
            return Reply::Fenced { current };
        }
        write(&mut self.meta)
    }

    fn end_session(&mut self, session: u64) {
        self.sessions.remove(&session);
        self.leaders.retain(|_, h| h.session != session);
    }
}

fn info(held: &Held) -> LeaderInfo {
    LeaderInfo { address: held.address.clone(), epoch: held.epoch }
}

/// The Raft leader's timers of the sessions, on its own clock (see the module documentation).
/// Volatile: a member that becomes leader starts them afresh with [`LeaseTimers::restart`].
#[derive(Debug, Default)]
pub struct LeaseTimers {
    /// Session -> (the renewal index the timer started at, when it started, when an expiry was
    /// last proposed for it).
    timers: HashMap<u64, Timer>,
}

#[derive(Debug, Clone, Copy)]
struct Timer {
    renewed: u64,
    since: LeaseInstant,
    proposed: Option<LeaseInstant>,
}

impl LeaseTimers {
    /// Forgets every timer: this member just became leader (or stopped being it). The next
    /// [`LeaseTimers::observe`] starts every session's timer at that moment.
    pub fn restart(&mut self) {
        self.timers.clear();
    }

    /// Brings the timers in line with the applied state at `now`: a new session, or a renewal
    /// since the last look, starts its timer at `now`; ended sessions are dropped.
    pub fn observe(&mut self, machine: &Machine, now: LeaseInstant) {
        let mut seen = HashMap::with_capacity(self.timers.len());
        for (id, _, renewed) in machine.sessions() {
            let timer = match self.timers.get(&id) {
                Some(t) if t.renewed == renewed => *t,
                _ => Timer { renewed, since: now, proposed: None },
            };
            seen.insert(id, timer);
        }
        self.timers = seen;
    }

    /// The expiries to propose at `now`: every session whose timer shows its full TTL. A
    /// proposal not applied yet is proposed again only after another `retry` (a proposal can be
    /// lost when leadership moves).
    pub fn due(&mut self, machine: &Machine, now: LeaseInstant, retry: Duration) -> Vec<Command> {
        let mut out = Vec::new();
        for (id, ttl, renewed) in machine.sessions() {
            let Some(timer) = self.timers.get_mut(&id) else { continue };
            if timer.renewed != renewed || now.saturating_duration_since(timer.since) < ttl {
                continue;
            }
            if timer.proposed.is_some_and(|p| now.saturating_duration_since(p) < retry) {
                continue;
            }
            timer.proposed = Some(now);
            out.push(Command::Expire { session: id, renewed });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> LeaseInstant {
        LeaseInstant::from_duration(Duration::from_millis(ms))
    }

    fn fence(leader: &str, epoch: u64) -> Fence {
        Fence { leader: leader.into(), epoch }
    }

    /// Runs `commands` from index 1 on, returning the replies.
    fn run(m: &mut Machine, first: u64, commands: &[Command]) -> Vec<Reply> {
        commands.iter().zip(first..).map(|(c, i)| m.apply(i, c)).collect()
    }

    /// One leader per role; its epoch is the index of the winning entry and grows with every
    /// new leadership; a second candidate is told who leads; after the holder's session ends
    /// the role is vacant and the next winner has a greater epoch.
    #[test]
    fn acquire_gives_one_leader_per_role_with_growing_epochs() {
        let mut m = Machine::default();
        let r = run(
            &mut m,
            1,
            &[
                Command::Grant { ttl_ms: 3000 },
                Command::Grant { ttl_ms: 3000 },
                Command::Acquire { leader: "c/jobmanager".into(), session: 1, address: "a:1".into() },
                Command::Acquire { leader: "c/jobmanager".into(), session: 2, address: "b:1".into() },
                Command::Acquire { leader: "c/resourcemanager".into(), session: 2, address: "b:2".into() },
                Command::Revoke { session: 1 },
                Command::Acquire { leader: "c/jobmanager".into(), session: 2, address: "b:1".into() },
            ],
        );
        assert_eq!(r[0], Reply::Session { id: 1 });
        assert_eq!(r[2], Reply::Won { epoch: 3 });
        assert_eq!(r[3], Reply::Taken { leader: Some(LeaderInfo { address: "a:1".into(), epoch: 3 }) });
        assert_eq!(r[4], Reply::Won { epoch: 5 });
        assert_eq!(r[6], Reply::Won { epoch: 7 });
        // Sent again by its holder, the acquire answers the same epoch.
        let again = Command::Acquire { leader: "c/jobmanager".into(), session: 2, address: "b:1".into() };
        assert_eq!(m.apply(8, &again), Reply::Won { epoch: 7 });
        assert_eq!(m.leader("c/jobmanager"), Some(LeaderInfo { address: "b:1".into(), epoch: 7 }));
        // Another cluster id is another role.
        assert_eq!(m.leader("d/jobmanager"), None);
    }

    /// A fenced write applies only while its epoch leads the role: a deposed leader's put,
    /// delete and increment are refused and change nothing, its successor's apply.
    #[test]
    fn fenced_writes_of_a_deposed_leader_change_nothing() {
        let mut m = Machine::default();
        run(
            &mut m,
            1,
            &[
                Command::Grant { ttl_ms: 3000 },
                Command::Acquire { leader: "c/jobmanager".into(), session: 1, address: "a".into() },
                Command::Put { fence: fence("c/jobmanager", 2), key: "c/k".into(), value: b"old".to_vec() },
                Command::Expire { session: 1, renewed: 1 },
                Command::Grant { ttl_ms: 3000 },
                Command::Acquire { leader: "c/jobmanager".into(), session: 5, address: "b".into() },
            ],
        );
        let before = m.clone();
        let refused = run(
            &mut m,
            7,
            &[
                Command::Put { fence: fence("c/jobmanager", 2), key: "c/k".into(), value: b"stale".to_vec() },
                Command::Delete { fence: fence("c/jobmanager", 2), key: "c/k".into() },
                Command::Increment { fence: fence("c/jobmanager", 2), key: "c/n".into() },
            ],
        );
        assert!(refused.iter().all(|r| *r == Reply::Fenced { current: Some(6) }), "{refused:?}");
        assert_eq!(m, before, "a refused write changed the store");
        let ok = run(
            &mut m,
            10,
            &[
                Command::Increment { fence: fence("c/jobmanager", 6), key: "c/n".into() },
                Command::Increment { fence: fence("c/jobmanager", 6), key: "c/n".into() },
                Command::Put { fence: fence("c/jobmanager", 6), key: "c/k".into(), value: b"new".to_vec() },
            ],
        );
        assert_eq!(ok, vec![Reply::Counter { value: 1 }, Reply::Counter { value: 2 }, Reply::Done]);
        assert_eq!(m.query(&Query::Get { key: "c/k".into() }), Reply::Value { value: Some(b"new".to_vec()) });
    }

    /// An expiry applies only if the session was not renewed after the renewal it was decided
    /// on: a keep-alive committed in between saves the session (and its leadership).
    #[test]
    fn an_expiry_decided_before_a_renewal_does_not_apply() {
        let mut m = Machine::default();
        run(
            &mut m,
            1,
            &[
                Command::Grant { ttl_ms: 1000 },
                Command::Acquire { leader: "c/jobmanager".into(), session: 1, address: "a".into() },
                Command::KeepAlive { session: 1 },
                Command::Expire { session: 1, renewed: 1 },
            ],
        );
        assert!(m.leader("c/jobmanager").is_some(), "a stale expiry ended a renewed session");
        run(&mut m, 5, &[Command::Expire { session: 1, renewed: 3 }]);
        assert_eq!(m.leader("c/jobmanager"), None);
        assert_eq!(m.apply(6, &Command::KeepAlive { session: 1 }), Reply::NoSession { session: 1 });
        assert_eq!(
            m.apply(7, &Command::Acquire { leader: "c/x".into(), session: 1, address: "a".into() }),
            Reply::NoSession { session: 1 }
        );
    }

    /// Resign vacates the role only for the epoch that holds it (a late resign of an old
    /// leadership leaves its successor alone).
    #[test]
    fn resign_of_an_old_epoch_leaves_the_successor() {
        let mut m = Machine::default();
        run(
            &mut m,
            1,
            &[
                Command::Grant { ttl_ms: 1000 },
                Command::Acquire { leader: "c/jobmanager".into(), session: 1, address: "a".into() },
                Command::Resign { leader: "c/jobmanager".into(), epoch: 1 },
            ],
        );
        assert!(m.leader("c/jobmanager").is_some());
        m.apply(4, &Command::Resign { leader: "c/jobmanager".into(), epoch: 2 });
        assert_eq!(m.leader("c/jobmanager"), None);
    }

    /// Lists are by prefix and sorted; a counter that is not a number is reported, not reset;
    /// a snapshot restores the same state.
    #[test]
    fn list_counter_and_snapshot_round_trip() -> Result<(), serde_json::Error> {
        let mut m = Machine::default();
        let f = fence("c/jobmanager", 2);
        run(
            &mut m,
            1,
            &[
                Command::Grant { ttl_ms: 1000 },
                Command::Acquire { leader: "c/jobmanager".into(), session: 1, address: "a".into() },
                Command::Put { fence: f.clone(), key: "c/jobs/b".into(), value: b"2".to_vec() },
                Command::Put { fence: f.clone(), key: "c/jobs/a".into(), value: b"1".to_vec() },
                Command::Put { fence: f.clone(), key: "c/jobsx".into(), value: b"x".to_vec() },
            ],
        );
        assert_eq!(
            m.query(&Query::List { prefix: "c/jobs/".into() }),
            Reply::List {
                entries: vec![("c/jobs/a".into(), b"1".to_vec()), ("c/jobs/b".into(), b"2".to_vec())]
            }
        );
        assert_eq!(
            m.apply(6, &Command::Increment { fence: f, key: "c/jobsx".into() }),
            Reply::NotACounter { key: "c/jobsx".into() }
        );
        let restored = Machine::from_bytes(&m.to_bytes()?)?;
        assert_eq!(restored, m);
        assert_eq!(Machine::from_bytes(&[])?, Machine::default());
        Ok(())
    }

    /// The timers expire a session only after its full TTL since the leader saw its latest
    /// renewal; a renewal restarts the timer; a new Raft leader restarts every timer, so a
    /// session renewed just before the old leader died gets its full TTL again.
    #[test]
    fn timers_expire_only_after_a_full_ttl_since_the_last_renewal_seen() {
        let mut m = Machine::default();
        m.apply(1, &Command::Grant { ttl_ms: 1000 });
        let mut t = LeaseTimers::default();
        let retry = Duration::from_millis(500);
        t.observe(&m, at(100));
        assert!(t.due(&m, at(1099), retry).is_empty());
        m.apply(2, &Command::KeepAlive { session: 1 });
        t.observe(&m, at(1050));
        assert!(t.due(&m, at(2049), retry).is_empty(), "expired before a full TTL after the renewal");
        assert_eq!(t.due(&m, at(2050), retry), vec![Command::Expire { session: 1, renewed: 2 }]);
        // Not proposed again until `retry` has passed.
        assert!(t.due(&m, at(2100), retry).is_empty());
        assert_eq!(t.due(&m, at(2550), retry), vec![Command::Expire { session: 1, renewed: 2 }]);
        // A new leader starts afresh.
        t.restart();
        t.observe(&m, at(3000));
        assert!(t.due(&m, at(3999), retry).is_empty(), "a new leader expired before a full TTL");
        assert_eq!(t.due(&m, at(4000), retry).len(), 1);
        // Once applied, the session is gone and nothing more is due.
        m.apply(3, &Command::Expire { session: 1, renewed: 2 });
        t.observe(&m, at(4100));
        assert!(t.due(&m, at(9000), retry).is_empty());
    }
}
