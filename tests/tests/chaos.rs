//! The short chaos schedule of the normal test run (see docs/chaos.md; the long one is
//! `scripts/chaos.sh`): real etcd (3 members), the broker (tansu on moto S3), 2 ResourceManagers,
//! 2 JobManagers, 3 TaskManagers, each in its own network namespace when this machine allows it,
//! a numbered workload through a checkpointed Kafka -> Kafka job, and five faults from a fixed
//! seed: a TaskManager kill -9, the JobManager leader's and the ResourceManager leader's
//! kill -9, and the JobManager leader cut off from everyone (paused instead without
//! namespaces). Broker restarts are left to `broker_outage.rs` and the long runs: after one, the
//! test broker sometimes stops serving an output partition to the checker's reader for longer
//! than the recovery timeout while the job keeps writing and checkpointing (seen once in CI).
//!
//! Proves (each from observed state, see the report printed with `-- --nocapture`): every
//! record arrives (0 lost) and the accounting is exact (every output record is an input record;
//! out = distinct + duplicates); every duplicate is a replay from the last completed checkpoint;
//! no older attempt of a task writes beside its successor; every checkpoint pointer move carries
//! the current JobManager leader's epoch; a new JobManager leader runs the job while the old one
//! is still away; and output and checkpoints resume after every fault.

use keel_tests::chaos::schedule::FaultKind;
use keel_tests::chaos::{run, Mode, Options};

#[test]
fn a_short_chaos_schedule_loses_no_record() -> anyhow::Result<()> {
    let network = keel_tests::chaos::net::unavailable_reason().is_none();
    let cut_off = if network { FaultKind::PartitionJmLeader } else { FaultKind::PauseJmLeader };
    let opts = Options {
        seed: 10,
        faults: Some(5),
        kinds: vec![FaultKind::KillTm, FaultKind::KillJmLeader, FaultKind::KillRmLeader, cut_off],
        mode: Mode::AtLeastOnce,
        ..Options::default()
    };
    let report = run(&opts)?;
    println!("{report}");
    let a = &report.accounting;
    assert_eq!(a.lost, Vec::<u64>::new(), "records lost");
    assert_eq!(a.out_records, a.out_distinct + a.duplicates, "exact accounting of the output");
    // The input holds what the broker kept of the workload (tansu may lose acknowledged records
    // when it is killed: the report notes them); every one of them must be in the output.
    assert_eq!(a.out_distinct, a.in_numbers, "every input number is in the output");
    assert!(report.injected() >= 4, "faults injected: {}", report.injected());
    // Every violation fails, a recovery timeout included: the runner waits while the output
    // advances (the test broker's readers working through a backlog), so a timeout means some
    // input partition's output stopped.
    assert!(
        report.violations.is_empty(),
        "violations (replay: {}):\n{}",
        report.replay,
        report.violations.join("\n")
    );
    Ok(())
}
