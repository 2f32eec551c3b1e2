//! The exactly-once sink against real Apache Kafka: the node this test binary shares
//! (`Kafka::shared`, or the cluster `KEEL_TEST_KAFKA_BOOTSTRAP` names), and a node of its own for
//! the test that freezes the broker in the middle of a commit (`Kafka::single`).
//!
//! Kafka hides the records of aborted transactions from `read_committed` readers
//! ([`read_committed_readers_skip_aborted_transactions`] asserts it), so every test here asserts
//! "exactly once" for such a reader: nothing lost, nothing duplicated.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sink_options;
use keel_kafka::{ExactlyOnceSink, ExactlyOnceState, KafkaSinkMetrics};
use keel_testkit::{
    create_topic, last_stable_offset, unique_topic, wait_until, watermarks, Kafka, TopicReader,
};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// Every record of `topic` a reader with `isolation.level` sees, until nothing new arrived for
/// `quiet`.
fn read(bootstrap: &str, topic: &str, committed_only: bool, quiet: Duration) -> Vec<String> {
    let group = unique_topic("reader");
    let reader = if committed_only {
        TopicReader::open(bootstrap, topic, &group)
    } else {
        TopicReader::open_uncommitted(bootstrap, topic, &group)
    }
    .expect("reader");
    reader.read_until_quiet(quiet).iter().map(keel_testkit::TestRecord::value_str).collect()
}

struct Setup {
    bootstrap: String,
    topic: String,
    prefix: String,
    spool: PathBuf,
    _dir: tempfile::TempDir,
}

fn setup(bootstrap: &str, name: &str) -> Setup {
    let topic = unique_topic(name);
    create_topic(bootstrap, &topic, 2).expect("topic");
    let dir = tempfile::tempdir().expect("temp dir");
    Setup {
        spool: dir.path().join("spool"),
        _dir: dir,
        prefix: unique_topic("tx"),
        topic,
        bootstrap: bootstrap.to_string(),
    }
}

fn shared(name: &str) -> Setup {
    setup(Kafka::shared().expect("kafka").bootstrap(), name)
}

impl Setup {
    fn open_with(
        &self,
        attempt: u32,
        restore: Option<&ExactlyOnceState>,
        metrics: Arc<KafkaSinkMetrics>,
        extra: &[(&str, &str)],
    ) -> ExactlyOnceSink {
        let mut pairs = vec![
            ("topic", self.topic.as_str()),
            ("sink.delivery-guarantee", "exactly-once"),
            ("sink.transactional-id-prefix", self.prefix.as_str()),
        ];
        pairs.extend_from_slice(extra);
        let opts = sink_options(&self.bootstrap, &pairs);
        ExactlyOnceSink::open(opts, 0, 1, metrics, self.spool.clone(), attempt, restore)
            .expect("open the exactly-once sink")
    }

    fn open(&self, attempt: u32, restore: Option<&ExactlyOnceState>) -> ExactlyOnceSink {
        self.open_with(attempt, restore, KafkaSinkMetrics::new(), &[])
    }

    /// What a `read_committed` reader sees.
    fn read(&self) -> Vec<String> {
        read(&self.bootstrap, &self.topic, true, Duration::from_secs(2))
    }

    /// What a `read_uncommitted` reader sees (aborted and open transactions included).
    fn read_uncommitted(&self) -> Vec<String> {
        read(&self.bootstrap, &self.topic, false, Duration::from_secs(2))
    }

    /// For each partition: (last stable offset, high watermark).
    fn stable_and_high(&self) -> Vec<(i64, i64)> {
        (0..2)
            .map(|p| {
                let lso = last_stable_offset(&self.bootstrap, &self.topic, p).expect("LSO");
                let (_, high) = watermarks(&self.bootstrap, &self.topic, p).expect("watermarks");
                (lso, high)
            })
            .collect()
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

fn once(range: std::ops::Range<u32>) -> BTreeMap<u32, usize> {
    range.map(|n| (n, 1)).collect()
}

fn spool_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// What the broker guarantees and the sink builds on: a `read_committed` reader skips the
/// records of an aborted transaction (a `read_uncommitted` reader sees them).
#[test]
fn read_committed_readers_skip_aborted_transactions() {
    let bootstrap = Kafka::shared().expect("kafka").bootstrap();
    let topic = unique_topic("aborted");
    create_topic(bootstrap, &topic, 1).expect("topic");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", unique_topic("probe-tx"))
        .set("log_level", "3")
        .create()
        .expect("producer");
    let timeout = Duration::from_secs(10);
    producer.init_transactions(timeout).expect("init");
    producer.begin_transaction().expect("begin");
    producer.send(BaseRecord::<[u8], [u8]>::to(&topic).payload(b"aborted")).expect("send");
    producer.flush(timeout).expect("flush");
    producer.abort_transaction(timeout).expect("abort");
    producer.begin_transaction().expect("begin");
    producer.send(BaseRecord::<[u8], [u8]>::to(&topic).payload(b"committed")).expect("send");
    producer.commit_transaction(timeout).expect("commit");
    let quiet = Duration::from_secs(2);
    assert_eq!(read(bootstrap, &topic, true, quiet), vec!["committed"]);
    assert_eq!(read(bootstrap, &topic, false, quiet), vec!["aborted", "committed"]);
}

/// Records become visible to read_committed readers only when the checkpoint covering them
/// completes; records arriving between a barrier and its completion wait for it and are not
/// committed by it; at the end everything is committed once, and the spool is empty.
#[test]
fn records_are_visible_only_after_their_checkpoint_completes() {
    let s = shared("eos-visible");
    let mut sink = s.open(1, None);
    send_range(&mut sink, 0..10);
    let state = sink.pre_commit(1).expect("pre-commit 1");
    assert_eq!(state.segments.len(), 1);
    assert_eq!(state.segments[0].records, 10);
    send_range(&mut sink, 10..15); // after barrier 1: spooled, not in checkpoint 1
    assert!(s.read().is_empty(), "nothing may be visible before checkpoint 1 completes");

    sink.notify_complete(1).expect("complete 1");
    assert_eq!(counts(&s.read()), once(0..10), "exactly checkpoint 1's records");

    let state = sink.pre_commit(2).expect("pre-commit 2");
    send_range(&mut sink, 15..20);
    let state3 = sink.pre_commit(3).expect("pre-commit 3 before 2 completes");
    assert_eq!(state.segments.len(), 1);
    assert_eq!(state3.segments.iter().map(|s| s.checkpoint_id).collect::<Vec<_>>(), vec![2, 3]);
    send_range(&mut sink, 20..22);
    // Checkpoint 3 completes (2 was subsumed): both segments commit, the tail stays open.
    sink.notify_complete(3).expect("complete 3");
    assert_eq!(counts(&s.read()), once(0..20));
    sink.finish().expect("finish");
    assert_eq!(counts(&s.read()), once(0..22));
    assert_eq!(spool_files(&s.spool), 0, "finished: no spool file left");
}

/// A task that died after its checkpoint completed but before its sink committed: the
/// restored sink's producer fences the dead one and aborts its transaction, then writes the
/// pre-committed records again from the spool and commits them. A read_committed reader sees
/// checkpoint 7's records exactly once and nothing written after its barrier (the aborted
/// copies are there for a read_uncommitted reader: the first writes did reach the log).
#[test]
fn a_pre_committed_transaction_of_a_dead_task_is_written_again_on_restore() {
    let s = shared("eos-restore");
    let mut dead = s.open(1, None);
    send_range(&mut dead, 0..50);
    let state = dead.pre_commit(7).expect("pre-commit 7");
    send_range(&mut dead, 50..60); // after the barrier: lost with the task, replayed by the source
                                   // The task dies here: checkpoint 7 completed at the JobManager, the notification never came.
    std::mem::forget(dead);

    let mut restored = s.open(2, Some(&state));
    assert_eq!(counts(&s.read()), once(0..50), "exactly once, nothing after the barrier");
    let uncommitted = counts(&s.read_uncommitted());
    assert!(
        (0..50).all(|n| uncommitted.get(&n) == Some(&2)),
        "the aborted first copy is in the log: {uncommitted:?}"
    );
    // Restoring again from the same checkpoint writes nothing twice: the marker says 7 committed.
    restored.finish().expect("finish");
    let again = s.open(3, Some(&state));
    drop(again);
    assert_eq!(counts(&s.read()), once(0..50), "a committed checkpoint is never written again");
}

/// A task that died after its sink committed checkpoint 4: restoring from checkpoint 4 writes
/// nothing again (the marker, committed in the same transaction, says 4 is done).
#[test]
fn a_committed_checkpoint_is_not_written_again_on_restore() {
    let s = shared("eos-committed");
    let mut first = s.open(1, None);
    send_range(&mut first, 0..30);
    let state = first.pre_commit(4).expect("pre-commit 4");
    first.notify_complete(4).expect("complete 4");
    std::mem::forget(first);
    let _restored = s.open(2, Some(&state));
    assert_eq!(counts(&s.read()), once(0..30), "exactly once");
}

/// The spool keeps only uncommitted segments: a restored state whose spool file is gone
/// although its checkpoint never committed is an error naming the checkpoint and the id.
#[test]
fn a_missing_spool_of_an_uncommitted_checkpoint_is_a_clear_error() {
    let s = shared("eos-missing");
    let mut dead = s.open(1, None);
    send_range(&mut dead, 0..5);
    let state = dead.pre_commit(3).expect("pre-commit");
    std::mem::forget(dead);
    for seg in &state.segments {
        std::fs::remove_file(&seg.path).expect("remove spool");
    }
    let opts = sink_options(
        &s.bootstrap,
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

/// Fencing: a zombie (the attempt of a task on a TaskManager cut off from the cluster) has
/// pre-committed checkpoint 1, which completed; the restarted attempt restores from checkpoint
/// 1 with the same transactional id. The zombie's commit fails with the broker's fencing error
/// (PRODUCER_FENCED / INVALID_PRODUCER_EPOCH, raised by librdkafka as fatal `_FENCED`), not a
/// timeout, and does not try to recover (it would fence the new attempt in turn). The new
/// attempt recovers the zombie's checkpoint from the spool: a read_committed reader sees
/// checkpoint 1's records and the new attempt's exactly once.
#[test]
fn a_zombie_producer_is_fenced_and_the_new_attempt_recovers_its_checkpoint() {
    let s = shared("eos-fence");
    let zombie_metrics = KafkaSinkMetrics::new();
    let mut zombie = s.open_with(1, None, zombie_metrics.clone(), &[]);
    send_range(&mut zombie, 0..10);
    let checkpoint_1 = zombie.pre_commit(1).expect("zombie pre-commit");
    assert_eq!(checkpoint_1.segments.len(), 1);
    let mut fresh = s.open(2, Some(&checkpoint_1));

    let err = zombie.notify_complete(1).expect_err("a fenced producer must not commit");
    let text = err.to_string();
    assert!(text.contains("fenced"), "{text}");
    assert!(
        ["Fenced", "ProducerFenced", "InvalidProducerEpoch"]
            .iter()
            .any(|code| text.contains(&format!("({code}:"))),
        "the broker's fencing error, not a timeout: {text}"
    );
    assert!(!text.to_lowercase().contains("timed out"), "{text}");
    let m = zombie_metrics.snapshot();
    assert_eq!((m.transaction_failures, m.producers_recreated), (0, 0), "a fenced zombie does not recreate");
    drop(zombie);

    send_range(&mut fresh, 100..105);
    fresh.pre_commit(2).expect("pre-commit");
    fresh.notify_complete(2).expect("the new attempt commits");
    let seen = counts(&s.read());
    assert_eq!(seen, once(0..10).into_iter().chain(once(100..105)).collect(), "exactly once");
}

/// A canceled sink (the task of a canceled job, or of a version retired by an upgrade) leaves
/// no transaction open: while a transaction holds records, the partitions' last stable offset
/// (what read_committed readers may read up to) stays below the high watermark; after the
/// cancel it equals the high watermark again, at once, not after `transaction.timeout.ms`. Three
/// ways: a live transaction canceled, a pre-committed one canceled, and a sink whose last
/// checkpoint (the upgrade's savepoint) completed and that is then stopped with records after
/// it.
#[test]
fn a_canceled_sink_leaves_no_open_transaction() {
    let s = shared("eos-cancel");
    let blocked = |s: &Setup| {
        wait_until("a transaction to hold the LSO back", Duration::from_secs(20), || {
            let now = s.stable_and_high();
            Ok(now.iter().any(|(lso, high)| lso < high).then_some(now))
        })
    };
    // The coordinator writes the abort markers just after it answered the abort: a short wait,
    // against the 15 minutes (transaction.timeout.ms) an abandoned transaction would block.
    let unblocked = |s: &Setup, what: &str| {
        let now = wait_until(what, Duration::from_secs(30), || {
            let now = s.stable_and_high();
            Ok(now.iter().all(|(lso, high)| lso == high).then_some(now))
        })
        .expect("no transaction left open");
        assert!(now.iter().all(|(_, high)| *high > 0), "records were written to both partitions: {now:?}");
    };

    // 1. Live: records sent into the open transaction reach the log, then the task is canceled.
    let mut sink = s.open(1, None);
    send_range(&mut sink, 0..20);
    println!("live transaction open: (LSO, high) {:?}", blocked(&s).expect("blocked"));
    sink.abort();
    unblocked(&s, "after canceling a live transaction");
    drop(sink);

    // 2. Pre-committed (a checkpoint's barrier passed, its completion not yet): canceled.
    let mut sink = s.open(2, None);
    send_range(&mut sink, 20..30);
    sink.pre_commit(1).expect("pre-commit");
    blocked(&s).expect("blocked by the pre-committed transaction");
    drop(sink); // a failed or canceled task drops its sink
    unblocked(&s, "after dropping a sink with a pre-committed transaction");

    // 3. Retired by an upgrade: the savepoint completes (its transaction commits), records that
    //    arrive after its barrier go into the next transaction, and the version is stopped.
    let mut sink = s.open(3, None);
    send_range(&mut sink, 30..40);
    sink.pre_commit(2).expect("savepoint barrier");
    send_range(&mut sink, 40..45);
    sink.notify_complete(2).expect("savepoint complete");
    blocked(&s).expect("blocked by the records after the savepoint");
    sink.abort();
    unblocked(&s, "after stopping the retired version");
    drop(sink);
    assert_eq!(counts(&s.read()), once(30..40), "only the savepoint's records are committed");
}

/// librdkafka 2.12 has no KIP-890, so a transactional call that times out must not be retried
/// on the same producer. Here the broker is frozen (SIGSTOP) while checkpoint 1 commits: the
/// commit's calls time out, the sink counts the failure, drops its producer and creates a new
/// one, whose `init_transactions` (once the broker runs again) fences the old epoch; the marker
/// then says whether checkpoint 1 committed, and if not it is written again from the spool. A
/// read_committed reader sees every record exactly once, and the sink goes on committing.
#[test]
fn a_timed_out_commit_recreates_the_producer_without_loss_or_duplicates() {
    let kafka = Kafka::single().expect("kafka");
    let s = setup(kafka.bootstrap(), "eos-timeout");
    let metrics = KafkaSinkMetrics::new();
    // librdkafka bounds the transactional requests by socket.timeout.ms (60 s by default), not
    // by the API call's timeout: 10 s keeps the test short.
    let mut sink = s.open_with(1, None, metrics.clone(), &[("properties.socket.timeout.ms", "10000")]);
    send_range(&mut sink, 0..100);
    sink.pre_commit(1).expect("pre-commit 1");
    send_range(&mut sink, 100..110); // after the barrier: spooled for the next transaction

    kafka.pause(1).expect("pause");
    let started = Instant::now();
    let committer = std::thread::spawn(move || {
        let result = sink.notify_complete(1);
        (sink, result)
    });
    let failed_after = wait_until("the commit to fail", Duration::from_secs(180), || {
        Ok((metrics.snapshot().transaction_failures == 1).then(|| started.elapsed()))
    })
    .expect("a failed commit");
    kafka.resume(1).expect("resume");
    let (mut sink, result) = committer.join().expect("the committing thread");
    let recovered_after = started.elapsed();
    result.expect("the commit succeeds with a recreated producer");
    println!("commit failed after {failed_after:?}; recovered and committed after {recovered_after:?}");
    let m = metrics.snapshot();
    assert_eq!((m.transaction_failures, m.producers_recreated), (1, 1), "{m:?}");
    assert_eq!(counts(&s.read()), once(0..100), "checkpoint 1 exactly once");

    sink.pre_commit(2).expect("pre-commit 2");
    sink.notify_complete(2).expect("complete 2");
    sink.finish().expect("finish");
    assert_eq!(counts(&s.read()), once(0..110), "everything exactly once");
    assert!(s.stable_and_high().iter().all(|(lso, high)| lso == high), "no transaction left open");
}

/// The submission check of `transaction.timeout.ms` reads the broker's
/// `transaction.max.timeout.ms` through the admin API: a node started with 60000 reports 60000
/// (the shared node Kafka's default, 900000), and a sink asking for more (Keel's default of 15
/// minutes here, or Flink's hour) is refused naming its field, while 60000 passes. The premise
/// holds too: a sink opened anyway with more than the maximum fails at `init_transactions`.
#[test]
fn the_transaction_timeout_is_checked_against_the_brokers_maximum() {
    use keel_kafka::{broker_transaction_max_timeout, check_transaction_timeout};
    let field = "sinks[0].properties.transaction.timeout.ms";
    let shared = Kafka::shared().expect("kafka");
    let opts = |bootstrap: &str, topic: &str, timeout: Option<&str>| {
        let mut pairs = vec![
            ("topic", topic),
            ("sink.delivery-guarantee", "exactly-once"),
            ("sink.transactional-id-prefix", "max-timeout"),
        ];
        pairs.extend(timeout.map(|t| ("properties.transaction.timeout.ms", t)));
        sink_options(bootstrap, &pairs)
    };
    let timeout = Duration::from_secs(10);
    let default_max =
        broker_transaction_max_timeout(&opts(shared.bootstrap(), "t", None), timeout).expect("describe");
    assert_eq!(default_max, Duration::from_secs(900));

    let kafka = Kafka::start_with(1, &[("transaction.max.timeout.ms", "60000")]).expect("kafka");
    let s = setup(kafka.bootstrap(), "eos-max-timeout");
    let max = broker_transaction_max_timeout(&opts(&s.bootstrap, &s.topic, None), timeout).expect("describe");
    assert_eq!(max, Duration::from_secs(60));
    let (interval, budget) = (Duration::from_secs(1), Duration::from_secs(20));
    for asked in [None, Some("3600000")] {
        match check_transaction_timeout(&opts(&s.bootstrap, &s.topic, asked), Some(max), interval, budget) {
            Err(keel_proto::KeelError::InvalidSpec { field: f, reason }) => {
                assert_eq!(f, field);
                assert!(reason.contains("transaction.max.timeout.ms (60000 ms)"), "{reason}");
            }
            other => panic!("{asked:?} must be refused naming {field}, got {other:?}"),
        }
    }
    check_transaction_timeout(&opts(&s.bootstrap, &s.topic, Some("60000")), Some(max), interval, budget)
        .expect("60000 fits");

    let refused = ExactlyOnceSink::open(
        opts(&s.bootstrap, &s.topic, Some("3600000")),
        0,
        1,
        KafkaSinkMetrics::new(),
        s.spool.clone(),
        1,
        None,
    );
    let err =
        refused.err().expect("init_transactions refuses a timeout above the broker's maximum").to_string();
    assert!(err.contains("initialising transactions"), "{err}");
}
