//! The fault schedule: a list of faults drawn from a seed.
//!
//! The list depends only on the seed and the kinds allowed, never on the run: the first
//! faults of a long run are the faults of a short run with the same seed, and a failing seed
//! replays the same faults in the same order with the same timings. What a fault hits (which
//! process is the leader then) is resolved when it is injected, from the cluster's state; the
//! `pick` number chooses among equal candidates (which TaskManager, which HA-store member).
//!
//! The HA store's member faults apply to either backend's members (`--ha etcd`: the three etcd
//! members; `--ha raft`: the three `keel ha-member` processes): `restart-etcd` (also spelled
//! `kill-ha-member`), `partition-etcd-member` (`partition-ha-member`) and `pause-ha-member`.
//! Their etcd names are kept so that etcd runs replay as before. `pause-ha-member` came later:
//! it is not in [`FaultKind::ALL`], the default kinds of an etcd run (a default etcd schedule
//! draws what it drew before), but it is among the defaults of a raft run
//! ([`default_kinds`]) and can be asked for by name on either.

use std::fmt;
use std::str::FromStr;

use super::rng::Rng;

/// What a fault does. Names are the ones `--faults` takes and the report prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// kill -9 of a TaskManager that runs tasks of the job; restarted after `hold`.
    KillTm,
    /// kill -9 of the JobManager leader; restarted after `hold`.
    KillJmLeader,
    /// kill -9 of the ResourceManager leader; restarted after `hold`.
    KillRmLeader,
    /// kill -9 of a standby JobManager or ResourceManager; restarted after `hold`.
    KillStandby,
    /// SIGSTOP of the JobManager leader, SIGCONT after `hold` (longer than the lease or not).
    PauseJmLeader,
    /// SIGSTOP of the ResourceManager leader, SIGCONT after `hold`.
    PauseRmLeader,
    /// SIGSTOP of a TaskManager that runs tasks, SIGCONT after `hold`.
    PauseTm,
    /// kill -9 of the Kafka broker that leads one of the job's output partitions (which one:
    /// `pick`), found in the metadata at injection; started again with its data after `hold`.
    KillBrokerLeader,
    /// SIGTERM of one Kafka broker (a controlled shutdown: its leaderships move away first; which
    /// broker: `pick`), started again with its data after `hold`.
    RestartBroker,
    /// SIGSTOP of one Kafka broker (by `pick`: the leader of an output partition, or any
    /// broker), SIGCONT after `hold` (shorter or longer than the 3 s broker session timeout).
    PauseBroker,
    /// kill -9 of one member of the HA store (its leader or another, by `pick`), started again
    /// after `hold`: an etcd member with `--initial-cluster-state existing`, a Raft member with
    /// the same id and data directory. Also spelled `kill-ha-member`.
    RestartEtcd,
    /// The JobManager leader cut from every other node (both directions) for `hold`.
    PartitionJmLeader,
    /// The ResourceManager leader cut from every other node (both directions) for `hold`.
    PartitionRmLeader,
    /// A TaskManager running tasks cut from every JobManager and ResourceManager (both
    /// directions; it still reaches etcd and the broker) for `hold`.
    PartitionTm,
    /// Packets from a TaskManager running tasks to every JobManager and ResourceManager dropped
    /// (one direction only; the other direction passes) for `hold`.
    PartitionTmOneWay,
    /// One member of the HA store cut from the other two (both directions) for `hold`; by
    /// `pick` the store's leader (a partition of the leader) or a follower (a partition of a
    /// minority). Also spelled `partition-ha-member`.
    PartitionEtcdMember,
    /// One Kafka broker (by `pick`: the leader of an output partition, or any broker) cut from
    /// every other node, the other brokers included (both directions), for `hold`.
    PartitionBroker,
    /// SIGSTOP of one member of the HA store (its leader or another, by `pick`), SIGCONT after
    /// `hold`. Not in [`FaultKind::ALL`] (see the module documentation).
    PauseHaMember,
}

impl FaultKind {
    /// The default kinds of an etcd run (the kinds that existed before `pause-ha-member`; the
    /// order is part of every seed's schedule: never reorder or extend it).
    pub const ALL: [FaultKind; 17] = [
        FaultKind::KillTm,
        FaultKind::KillJmLeader,
        FaultKind::KillRmLeader,
        FaultKind::KillStandby,
        FaultKind::PauseJmLeader,
        FaultKind::PauseRmLeader,
        FaultKind::PauseTm,
        FaultKind::KillBrokerLeader,
        FaultKind::RestartBroker,
        FaultKind::PauseBroker,
        FaultKind::RestartEtcd,
        FaultKind::PartitionJmLeader,
        FaultKind::PartitionRmLeader,
        FaultKind::PartitionTm,
        FaultKind::PartitionTmOneWay,
        FaultKind::PartitionEtcdMember,
        FaultKind::PartitionBroker,
    ];

    /// Every kind, for parsing and help.
    pub const EVERY: [FaultKind; 18] = [
        FaultKind::KillTm,
        FaultKind::KillJmLeader,
        FaultKind::KillRmLeader,
        FaultKind::KillStandby,
        FaultKind::PauseJmLeader,
        FaultKind::PauseRmLeader,
        FaultKind::PauseTm,
        FaultKind::KillBrokerLeader,
        FaultKind::RestartBroker,
        FaultKind::PauseBroker,
        FaultKind::RestartEtcd,
        FaultKind::PartitionJmLeader,
        FaultKind::PartitionRmLeader,
        FaultKind::PartitionTm,
        FaultKind::PartitionTmOneWay,
        FaultKind::PartitionEtcdMember,
        FaultKind::PartitionBroker,
        FaultKind::PauseHaMember,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillTm => "kill-tm",
            FaultKind::KillJmLeader => "kill-jm-leader",
            FaultKind::KillRmLeader => "kill-rm-leader",
            FaultKind::KillStandby => "kill-standby",
            FaultKind::PauseJmLeader => "pause-jm-leader",
            FaultKind::PauseRmLeader => "pause-rm-leader",
            FaultKind::PauseTm => "pause-tm",
            FaultKind::KillBrokerLeader => "kill-broker-leader",
            FaultKind::RestartBroker => "restart-broker",
            FaultKind::PauseBroker => "pause-broker",
            FaultKind::RestartEtcd => "restart-etcd",
            FaultKind::PartitionJmLeader => "partition-jm-leader",
            FaultKind::PartitionRmLeader => "partition-rm-leader",
            FaultKind::PartitionTm => "partition-tm",
            FaultKind::PartitionTmOneWay => "partition-tm-oneway",
            FaultKind::PartitionEtcdMember => "partition-etcd-member",
            FaultKind::PartitionBroker => "partition-broker",
            FaultKind::PauseHaMember => "pause-ha-member",
        }
    }

    /// Other names a kind is parsed from (backend-neutral names of the HA-store member faults).
    fn aliases(self) -> &'static [&'static str] {
        match self {
            FaultKind::RestartEtcd => &["kill-ha-member"],
            FaultKind::PartitionEtcdMember => &["partition-ha-member"],
            _ => &[],
        }
    }

    /// A fault of one member of the HA store (etcd or Raft): one member of three lost, which
    /// must change no role's leader.
    pub fn is_ha_member_fault(self) -> bool {
        matches!(self, FaultKind::RestartEtcd | FaultKind::PartitionEtcdMember | FaultKind::PauseHaMember)
    }

    /// Needs network namespaces (a partition).
    pub fn needs_network(self) -> bool {
        matches!(
            self,
            FaultKind::PartitionJmLeader
                | FaultKind::PartitionRmLeader
                | FaultKind::PartitionTm
                | FaultKind::PartitionTmOneWay
                | FaultKind::PartitionEtcdMember
                | FaultKind::PartitionBroker
        )
    }

    /// Needs a Kafka cluster this run controls (not `KEEL_TEST_KAFKA_BOOTSTRAP`).
    pub fn needs_own_broker(self) -> bool {
        self.is_broker_fault()
    }

    /// A fault of one Kafka broker.
    pub fn is_broker_fault(self) -> bool {
        matches!(
            self,
            FaultKind::KillBrokerLeader
                | FaultKind::RestartBroker
                | FaultKind::PauseBroker
                | FaultKind::PartitionBroker
        )
    }

    /// How long the fault lasts, in milliseconds: (least, most).
    fn hold_range(self) -> (u64, u64) {
        match self {
            FaultKind::KillTm
            | FaultKind::KillJmLeader
            | FaultKind::KillRmLeader
            | FaultKind::KillStandby => (500, 4_000),
            // Below and above the 3 s lease / the 5 s heartbeat timeout (the 3 s broker session
            // timeout for a broker).
            FaultKind::PauseJmLeader
            | FaultKind::PauseRmLeader
            | FaultKind::PauseTm
            | FaultKind::PauseBroker
            | FaultKind::PauseHaMember => (1_000, 8_000),
            FaultKind::KillBrokerLeader | FaultKind::RestartBroker | FaultKind::RestartEtcd => (1_000, 5_000),
            // Mostly longer than the lease plus the heartbeat timeout: the successor must run
            // the job while the cut-off process is still away.
            _ => (4_000, 12_000),
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(s: &str) -> Result<FaultKind, String> {
        let s = s.trim();
        FaultKind::EVERY.iter().copied().find(|k| k.name() == s || k.aliases().contains(&s)).ok_or_else(
            || {
                format!(
                    "unknown fault kind {s:?}; one of {}",
                    FaultKind::EVERY.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
                )
            },
        )
    }
}

/// One fault of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Position in the schedule, from 1.
    pub index: usize,
    pub kind: FaultKind,
    /// Quiet time before the fault (after the previous one has recovered), ms.
    pub gap_ms: u64,
    /// How long the fault lasts, ms.
    pub hold_ms: u64,
    /// Chooses among equal candidates.
    pub pick: u64,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {} (after {} ms, for {} ms, pick {})",
            self.index, self.kind, self.gap_ms, self.hold_ms, self.pick
        )
    }
}

/// The kinds a run draws from when none are given: [`FaultKind::ALL`] on etcd (as before the
/// raft backend, so an etcd seed keeps its schedule), and those plus `pause-ha-member` on raft.
pub fn default_kinds(raft: bool) -> Vec<FaultKind> {
    let mut kinds = FaultKind::ALL.to_vec();
    if raft {
        kinds.push(FaultKind::PauseHaMember);
    }
    kinds
}

/// The schedule of `seed` over `kinds` (in the order given; `ALL` when empty): every kind once
/// in a shuffled order, then again in a new shuffled order, and so on, `count` faults in all.
/// So a schedule of `kinds.len()` faults covers every kind.
pub fn schedule(seed: u64, kinds: &[FaultKind], count: usize) -> Vec<Fault> {
    let kinds: Vec<FaultKind> = if kinds.is_empty() { FaultKind::ALL.to_vec() } else { kinds.to_vec() };
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(count);
    let mut round: Vec<FaultKind> = Vec::new();
    while out.len() < count {
        if round.is_empty() {
            round = kinds.clone();
            rng.shuffle(&mut round);
            round.reverse();
        }
        let Some(kind) = round.pop() else { break };
        let (lo, hi) = kind.hold_range();
        out.push(Fault {
            index: out.len() + 1,
            kind,
            gap_ms: rng.millis(1_000, 4_000),
            hold_ms: rng.millis(lo, hi),
            pick: rng.next_u64(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_schedule_and_covers_every_kind() {
        let a = schedule(42, &[], 40);
        assert_eq!(a, schedule(42, &[], 40));
        assert_eq!(&a[..10], &schedule(42, &[], 10)[..], "a longer run starts with the shorter one");
        assert_ne!(a, schedule(43, &[], 40));
        let first: std::collections::BTreeSet<FaultKind> =
            a[..FaultKind::ALL.len()].iter().map(|f| f.kind).collect();
        assert_eq!(first.len(), FaultKind::ALL.len());
        for k in FaultKind::EVERY {
            assert_eq!(k.name().parse::<FaultKind>(), Ok(k));
        }
        assert_eq!("kill-ha-member".parse::<FaultKind>(), Ok(FaultKind::RestartEtcd));
        assert_eq!("partition-ha-member".parse::<FaultKind>(), Ok(FaultKind::PartitionEtcdMember));
        assert!("kill-everything".parse::<FaultKind>().is_err());
    }

    /// Adding `pause-ha-member` left every etcd schedule as it was: the default kinds of an etcd
    /// run are the 17 of before, in their order (a schedule over them equals the one over `&[]`),
    /// and seed 42's first faults are the ones recorded before the raft backend. A raft run's
    /// defaults add the pause, and its schedule covers all 18 kinds.
    #[test]
    fn etcd_schedules_are_unchanged_and_raft_adds_the_member_pause() {
        assert_eq!(schedule(42, &default_kinds(false), 40), schedule(42, &[], 40));
        assert!(!FaultKind::ALL.contains(&FaultKind::PauseHaMember));
        let recorded: Vec<&str> = schedule(42, &[], 6).iter().map(|f| f.kind.name()).collect();
        assert_eq!(recorded, RECORDED_SEED_42);
        assert_eq!(
            schedule(42, &[], 1)[0].pick,
            7_487_565_853_151_867_058,
            "seed 42's first pick, as before"
        );
        let raft = schedule(42, &default_kinds(true), 18);
        let kinds: std::collections::BTreeSet<FaultKind> = raft.iter().map(|f| f.kind).collect();
        assert_eq!(kinds.len(), 18);
    }

    /// Seed 42's first six kinds over the 17 etcd kinds, as main's `keel-chaos --seed 42 --list`
    /// drew them before `pause-ha-member` existed (rand 0.10.4).
    const RECORDED_SEED_42: [&str; 6] = [
        "partition-rm-leader",
        "partition-broker",
        "partition-tm",
        "kill-rm-leader",
        "kill-jm-leader",
        "pause-rm-leader",
    ];
}
