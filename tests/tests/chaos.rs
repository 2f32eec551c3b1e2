//! The short chaos schedule of the normal test run (see docs/chaos.md; the long one is
//! `scripts/chaos.sh`), once on each HA backend that runs across machines: real etcd (3 members),
//! and the raft backend (3 `keel ha-member` processes in their place); Apache Kafka (3 KRaft nodes, replication factor 3,
//! `min.insync.replicas` 2), 2 ResourceManagers, 2 JobManagers, 3 TaskManagers, each in its own
//! network namespace when this machine allows it, a numbered workload through a checkpointed
//! Kafka -> Kafka job (exactly-once sink, read back `read_committed`), and five faults from a
//! fixed seed: a TaskManager kill -9, the JobManager leader's kill -9, the JobManager leader cut
//! off from everyone (paused instead without namespaces), a kill -9 of the Kafka broker leading
//! one of the job's output partitions (found in the metadata), and a fault of the HA store's
//! leader member (the etcd leader, or the member leading the Raft group): cut off from the
//! other members (a kill -9 and restart without namespaces).
//!
//! Proves (each from observed state, see the report printed with `-- --nocapture`): every
//! record arrives (0 lost) and the broker lost no acknowledged input record; the accounting is
//! exact (every output record is an input record; out = distinct + duplicates); every duplicate
//! is a replay from the last completed checkpoint (or a resend right after the broker fault); no
//! older attempt of a task writes beside its successor; every checkpoint pointer move carries
//! the current JobManager leader's epoch (watched on etcd, sampled on raft); a new JobManager
//! leader runs the job while the old one is still away; losing the store's leader member changes
//! no role's leader; output and checkpoints resume after every fault; and, the sink being
//! exactly-once, that the `read_committed` reader saw no duplicate and the broker hides aborted
//! records from it.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use keel_tests::chaos::schedule::FaultKind;
use keel_tests::chaos::{run, Mode, Options};
use keel_tests::Backend;

/// The sink's delivery guarantee in the short schedule.
const MODE: Mode = Mode::ExactlyOnce;

/// The seed of the short schedule: its member fault (third of the kinds below) picks the store's
/// leader (`keel-chaos --seed SEED --faults 5 --kinds ... --list` shows the picks).
const SEED: u64 = 10;

/// The leader lease TTL of the short schedule, on both backends. It claims that losing the
/// store's leader member changes no role's leader: every leader must get a keep-alive through
/// the store's own election. With etcd's default 1 s election timeout, etcd served writes again
/// only about 2.9 s after its leader's partition on a loaded CI machine (load average 9), past
/// what a 3 s lease leaves a leader (`TTL - margin - TTL/10`, 2.4 s), and the ResourceManager
/// lost its leadership. The tests
/// that make the same claim in `store_faults.rs` use 6 s for the same reason (docs/fencing.md,
/// "etcd trouble"); the long runs of `scripts/chaos.sh` keep Keel's default of 3 s.
const LEASE_TTL: Duration = Duration::from_secs(6);

/// One chaos run at a time: each starts three Kafka nodes and nine more processes on 2 cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The short schedule on `ha` loses no record, duplicates none for a `read_committed` reader,
/// accounts for every output record, and breaks no guarantee the report checks (see the module
/// documentation), across five faults: one of each kind, the HA store's leader member among them.
fn a_short_chaos_schedule(ha: Backend) -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let network = keel_tests::chaos::net::unavailable_reason().is_none();
    let cut_off = if network { FaultKind::PartitionJmLeader } else { FaultKind::PauseJmLeader };
    let member = if network { FaultKind::PartitionEtcdMember } else { FaultKind::RestartEtcd };
    let opts = Options {
        seed: SEED,
        faults: Some(5),
        kinds: vec![FaultKind::KillTm, FaultKind::KillJmLeader, member, cut_off, FaultKind::KillBrokerLeader],
        ha,
        mode: MODE,
        lease_ttl: LEASE_TTL,
        ..Options::default()
    };
    let report = run(&opts)?;
    println!("{report}");
    let a = &report.accounting;
    assert_eq!(a.lost, Vec::<u64>::new(), "records lost");
    assert_eq!(a.in_gaps, Vec::<u64>::new(), "acknowledged input records the broker lost");
    assert_eq!(a.out_distinct, a.in_numbers, "every input number is in the output");
    assert_eq!(a.out_records, a.out_distinct + a.duplicates, "exact accounting of the output");
    if MODE == Mode::ExactlyOnce {
        assert_eq!(a.duplicates_by_job, 0, "duplicates a read_committed reader saw");
        assert_eq!(report.hides_aborted, Some(true), "the broker hides aborted records from read_committed");
    }
    let injected: Vec<_> = report.faults.iter().filter(|f| f.skipped.is_none()).collect();
    let kinds: std::collections::BTreeSet<FaultKind> = injected.iter().map(|f| f.fault.kind).collect();
    assert!(kinds.contains(&FaultKind::KillBrokerLeader), "a broker-leader kill was injected: {kinds:?}");
    let store_fault = injected.iter().find(|f| f.fault.kind == member);
    assert!(
        store_fault.is_some_and(|f| f.target.contains(&format!("({} leader)", ha.name()))),
        "the {} leader member was hit by {member}: {:?}",
        ha.name(),
        store_fault.map(|f| &f.target)
    );
    assert_eq!(report.injected(), 5, "faults injected");
    // Every violation fails, a recovery timeout included: the runner waits while the output
    // advances, so a timeout means some input partition's output stopped.
    assert!(
        report.violations.is_empty(),
        "violations (replay: {}):\n{}",
        report.replay,
        report.violations.join("\n")
    );
    Ok(())
}

keel_tests::on_backends!(a_short_chaos_schedule_loses_no_record, a_short_chaos_schedule, [Etcd, Raft]);
