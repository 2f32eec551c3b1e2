//! The Kafka sink writer against real Apache Kafka: the node this test binary shares
//! (`Kafka::shared`, or the cluster `KEEL_TEST_KAFKA_BOOTSTRAP` names), and a node of its own
//! for the test that freezes the broker (`Kafka::single`).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{sink_options, READ_TIMEOUT};
use keel_kafka::{KafkaSinkMetrics, KafkaSinkWriter};
use keel_proto::KeelError;
use keel_testkit::{consume_all, create_topic, free_port, unique_topic, Kafka, TestRecord};

fn open(bootstrap: &str, pairs: &[(&str, &str)], subtask: u32, parallelism: u32) -> KafkaSinkWriter {
    KafkaSinkWriter::open(sink_options(bootstrap, pairs), subtask, parallelism, KafkaSinkMetrics::new())
        .expect("open the writer")
}

fn numbers(records: &[TestRecord]) -> Vec<u64> {
    let mut v: Vec<u64> = records.iter().filter_map(TestRecord::number).collect();
    v.sort_unstable();
    v
}

/// at-least-once: after `flush` returns, every record sent before it is in the topic: a
/// consumer reads all N, with keys, headers and timestamps as sent; the metrics count N out
/// and N acknowledged.
#[test]
fn at_least_once_flush_means_every_record_sent_is_in_the_topic() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("sink");
    create_topic(bootstrap, &topic, 3).expect("topic");
    let metrics = KafkaSinkMetrics::new();
    let opts = sink_options(bootstrap, &[("topic", &topic)]);
    let mut writer = KafkaSinkWriter::open(opts, 0, 1, metrics.clone()).expect("open");
    const N: u64 = 2000;
    let headers: &[(&str, Option<&[u8]>)] = &[("trace", Some(b"abc"))];
    for n in 0..N {
        let key = format!("k{}", n % 17);
        let value = n.to_string();
        writer
            .send(Some(key.as_bytes()), Some(value.as_bytes()), headers, Some(1_700_000_000_000))
            .expect("send");
    }
    writer.flush(Duration::from_secs(10)).expect("flush");
    assert_eq!(writer.in_flight(), 0);
    let snapshot = metrics.snapshot();
    assert_eq!(snapshot.num_records_out, N);
    assert_eq!(snapshot.records_acked, N);
    assert_eq!(snapshot.delivery_errors, 0);
    assert!(snapshot.current_send_time_us.is_some());
    assert!(snapshot.num_bytes_out > N * 5);

    let usize_n = usize::try_from(N).expect("small");
    let got = consume_all(bootstrap, &topic, &unique_topic("check"), usize_n, READ_TIMEOUT).expect("consume");
    assert_eq!(numbers(&got), (0..N).collect::<Vec<_>>());
    let sample = got.iter().find(|r| r.number() == Some(42)).expect("record 42");
    assert_eq!(sample.key.as_deref(), Some(&b"k8"[..]));
    assert_eq!(sample.headers, vec![("trace".to_string(), b"abc".to_vec())]);
    assert_eq!(sample.timestamp_ms, Some(1_700_000_000_000));
    // The default partitioner keeps a key on one partition.
    let mut partition_of_key: BTreeMap<Vec<u8>, i32> = BTreeMap::new();
    for r in &got {
        let key = r.key.clone().expect("key");
        let p = *partition_of_key.entry(key.clone()).or_insert(r.partition);
        assert_eq!(p, r.partition, "key {:?} on two partitions", String::from_utf8_lossy(&key));
    }
    assert!(partition_of_key.values().collect::<std::collections::BTreeSet<_>>().len() > 1, "keys spread");
}

/// sink.partitioner fixed: subtask i of the sink writes every record to partition
/// i % partitions (5 subtasks, 3 partitions).
#[test]
fn fixed_partitioner_writes_subtask_i_to_partition_i_mod_n() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("fixed");
    create_topic(bootstrap, &topic, 3).expect("topic");
    for subtask in 0..5u32 {
        let mut writer = open(bootstrap, &[("topic", &topic), ("sink.partitioner", "fixed")], subtask, 5);
        for i in 0..10u32 {
            let value = (subtask * 100 + i).to_string();
            writer.send(Some(b"same-key"), Some(value.as_bytes()), &[], None).expect("send");
        }
        writer.flush(Duration::from_secs(10)).expect("flush");
    }
    let got = consume_all(bootstrap, &topic, &unique_topic("check"), 50, READ_TIMEOUT).expect("consume");
    assert_eq!(got.len(), 50);
    for r in &got {
        let subtask = i32::try_from(r.number().expect("number") / 100).expect("small");
        assert_eq!(r.partition, subtask % 3, "record {} of subtask {subtask}", r.value_str());
    }
}

/// sink.partitioner round-robin: consecutive records of a subtask go to consecutive
/// partitions, starting at the subtask's index, whatever the key.
#[test]
fn round_robin_partitioner_cycles_over_the_partitions() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("rr");
    create_topic(bootstrap, &topic, 3).expect("topic");
    let mut writer = open(bootstrap, &[("topic", &topic), ("sink.partitioner", "round-robin")], 1, 2);
    for i in 0..12u32 {
        writer.send(Some(b"same-key"), Some(i.to_string().as_bytes()), &[], None).expect("send");
    }
    writer.flush(Duration::from_secs(10)).expect("flush");
    let got = consume_all(bootstrap, &topic, &unique_topic("check"), 12, READ_TIMEOUT).expect("consume");
    for r in &got {
        let i = i32::try_from(r.number().expect("number")).expect("small");
        assert_eq!(r.partition, (1 + i) % 3, "record {i}");
    }
    for p in 0..3 {
        assert_eq!(got.iter().filter(|r| r.partition == p).count(), 4, "partition {p}");
    }
}

/// The plain writer refuses exactly-once options with an error naming the sink (exactly-once
/// sinks are opened as `ExactlyOnceSink`, see tests/eos.rs), without connecting.
#[test]
fn the_plain_writer_refuses_exactly_once_options() {
    let opts = sink_options(
        "127.0.0.1:1",
        &[
            ("topic", "t"),
            ("sink.delivery-guarantee", "exactly-once"),
            ("sink.transactional-id-prefix", "job"),
        ],
    );
    let err = KafkaSinkWriter::open(opts, 0, 1, KafkaSinkMetrics::new()).err().expect("must fail");
    assert!(err.to_string().contains("sinks[0]"), "{err}");
    assert!(err.to_string().contains("ExactlyOnceSink"), "{err}");
}

/// A broker that does not exist fails `open` within properties.max.block.ms with Unavailable
/// naming the bootstrap servers.
#[test]
fn unreachable_broker_fails_sink_open_naming_the_bootstrap_servers() {
    let bootstrap = format!("127.0.0.1:{}", free_port());
    let opts = sink_options(&bootstrap, &[("topic", "t"), ("properties.max.block.ms", "1500")]);
    let started = Instant::now();
    let err = KafkaSinkWriter::open(opts, 0, 1, KafkaSinkMetrics::new()).err().expect("must fail");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    match &err {
        KeelError::Unavailable { address, .. } => assert_eq!(address, &bootstrap),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// at-least-once: records that cannot be delivered (the broker is frozen longer than
/// properties.message.timeout.ms) make `flush` fail, naming topic and partition, and every
/// later `send` fails too; with `none`, flush returns at once and only counts the errors
/// (a node of the test's own, whatever `KEEL_TEST_KAFKA_BOOTSTRAP` says). Once the broker runs
/// again, a new writer delivers.
#[test]
fn undeliverable_records_fail_flush_at_least_once_but_not_none() {
    let kafka = Kafka::single().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("lost");
    create_topic(bootstrap, &topic, 1).expect("topic");
    let pairs = [("topic", topic.as_str()), ("properties.message.timeout.ms", "1500")];
    let mut alo = open(bootstrap, &pairs, 0, 1);
    let mut none_pairs = pairs.to_vec();
    none_pairs.push(("sink.delivery-guarantee", "none"));
    let none_metrics = KafkaSinkMetrics::new();
    let mut none = KafkaSinkWriter::open(sink_options(bootstrap, &none_pairs), 0, 1, none_metrics.clone())
        .expect("open");
    kafka.pause(1).expect("pause");

    none.send(None, Some(b"x"), &[], None).expect("send (none)");
    let started = Instant::now();
    none.flush(Duration::from_secs(10)).expect("flush (none) does not wait");
    assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());

    alo.send(None, Some(b"y"), &[], None).expect("send");
    let err = alo.flush(Duration::from_secs(10)).expect_err("flush must fail");
    let text = err.to_string();
    assert!(text.contains(&format!("delivery to topic {topic} partition 0 failed")), "{text}");
    assert!(alo.send(None, Some(b"z"), &[], None).is_err(), "send after a delivery error");

    keel_testkit::wait_until("the none writer to count its delivery error", Duration::from_secs(10), || {
        none.flush(Duration::ZERO).map_err(anyhow::Error::from)?;
        Ok((none_metrics.snapshot().delivery_errors == 1).then_some(()))
    })
    .expect("counted");
    kafka.resume(1).expect("resume");
    let mut again = open(bootstrap, &pairs, 0, 1);
    again.send(None, Some(b"after"), &[], None).expect("send");
    again.flush(Duration::from_secs(10)).expect("flush after the broker is back");
}
