//! The fault schedule: a list of faults drawn from a seed.
//!
//! The list depends only on the seed and the kinds allowed, never on the run: the first
//! faults of a long run are the faults of a short run with the same seed, and a failing seed
//! replays the same faults in the same order with the same timings. What a fault hits (which
//! process is the leader then) is resolved when it is injected, from the cluster's state; the
//! `pick` number chooses among equal candidates (which TaskManager, which etcd member).

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
    /// kill -9 of one etcd member (the etcd leader or another, by `pick`), started again after
    /// `hold` with `--initial-cluster-state existing`.
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
    /// One etcd member cut from the other two (both directions) for `hold`.
    PartitionEtcdMember,
    /// One Kafka broker (by `pick`: the leader of an output partition, or any broker) cut from
    /// every other node, the other brokers included (both directions), for `hold`.
    PartitionBroker,
}

impl FaultKind {
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
        }
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
            | FaultKind::PauseBroker => (1_000, 8_000),
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
        FaultKind::ALL.iter().copied().find(|k| k.name() == s.trim()).ok_or_else(|| {
            format!(
                "unknown fault kind {s:?}; one of {}",
                FaultKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
            )
        })
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
        for k in FaultKind::ALL {
            assert_eq!(k.name().parse::<FaultKind>(), Ok(k));
        }
        assert!("kill-everything".parse::<FaultKind>().is_err());
    }
}
