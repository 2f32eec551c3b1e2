//! The Kafka source reader against real Apache Kafka: the node this test binary shares
//! (`Kafka::shared`, or the cluster `KEEL_TEST_KAFKA_BOOTSTRAP` names), and a node of its own
//! for the test that freezes the broker (`Kafka::single`).

mod common;

use std::time::{Duration, Instant};

use common::{number, numbers, open, read_for, read_n, source_options};
use keel_kafka::{KafkaSourceMetrics, KafkaSourceReader, SourcePosition, TopicPartition};
use keel_proto::KeelError;
use keel_testkit::{
    committed_offsets, create_topic, free_port, produce, produce_numbered, produce_numbered_to, unique_topic,
    wait_until, Kafka, Produce,
};

fn numbered(range: std::ops::Range<u64>, partition: Option<i32>) -> Vec<Produce> {
    range.map(|n| Produce { partition, value: n.to_string(), ..Produce::default() }).collect()
}

/// earliest-offset reads every record of every partition from the start, and the position
/// afterwards is each partition's last offset + 1.
#[test]
fn earliest_offset_reads_every_record_from_the_start() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("earliest");
    create_topic(bootstrap, &topic, 3).expect("topic");
    let written = produce_numbered(bootstrap, &topic, 0..30, |n| Some(format!("key-{n}"))).expect("produce");

    let mut reader = open(bootstrap, &[("topic", &topic), ("scan.startup.mode", "earliest-offset")]);
    let records = read_n(&mut reader, 30);
    assert_eq!(numbers(&records), (0..30).collect::<Vec<_>>());
    assert!(read_for(&mut reader, Duration::from_millis(300)).is_empty(), "no record twice");

    let mut expected = SourcePosition::new();
    for r in &written {
        let next = expected.get(&topic, r.partition).unwrap_or(0).max(r.offset + 1);
        expected.set(&topic, r.partition, next);
    }
    assert_eq!(reader.position(), expected);
    let first = records.iter().find(|r| number(r) == 7).expect("record 7");
    assert_eq!(first.key.as_deref(), Some(&b"key-7"[..]));
    assert_eq!(&*first.topic, topic.as_str());
}

/// latest-offset starts at the end at open: only records produced after open are read, and
/// the position right after open already names that end (the records before open are
/// produced in multi-record batches: the end is the last record + 1, not a batch's base).
#[test]
fn latest_offset_reads_only_records_produced_after_open() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("latest");
    create_topic(bootstrap, &topic, 2).expect("topic");
    let mut before = numbered(0..4, Some(0));
    before.extend(numbered(4..6, Some(1)));
    produce(bootstrap, &topic, before).expect("produce before");

    let mut reader = open(bootstrap, &[("topic", &topic), ("scan.startup.mode", "latest-offset")]);
    assert_eq!(reader.position().get(&topic, 0), Some(4));
    assert_eq!(reader.position().get(&topic, 1), Some(2));
    produce_numbered(bootstrap, &topic, 100..110, |n| Some(n.to_string())).expect("produce after");
    let records = read_n(&mut reader, 10);
    assert_eq!(numbers(&records), (100..110).collect::<Vec<_>>());
    assert!(read_for(&mut reader, Duration::from_millis(300)).is_empty());
}

/// group-offsets: a new group falls back to properties.auto.offset.reset=earliest; offsets
/// committed with `commit` are where the next reader of the group starts.
#[test]
fn group_offsets_resume_where_the_last_commit_left_off() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("group");
    let group = unique_topic("group-g");
    create_topic(bootstrap, &topic, 1).expect("topic");
    produce_numbered(bootstrap, &topic, 0..20, |_| None).expect("produce");

    let pairs = [
        ("topic", topic.as_str()),
        ("properties.group.id", group.as_str()),
        ("properties.auto.offset.reset", "earliest"),
    ];
    let mut reader = open(bootstrap, &pairs);
    let first = read_n(&mut reader, 10);
    assert_eq!(numbers(&first[..10]), (0..10).collect::<Vec<_>>());
    let mut checkpoint = SourcePosition::new();
    checkpoint.set(&topic, 0, 10);
    reader.commit(&checkpoint).expect("commit");
    wait_until("the commit to reach the group", Duration::from_secs(10), || {
        let committed = committed_offsets(bootstrap, &group, &topic)?;
        Ok((committed.get(&0) == Some(&Some(10))).then_some(()))
    })
    .expect("committed");
    drop(reader);

    // No auto.offset.reset this time: the committed offset must be there.
    let mut again = open(
        bootstrap,
        &[("topic", &topic), ("properties.group.id", &group), ("scan.startup.mode", "group-offsets")],
    );
    assert_eq!(again.position().get(&topic, 0), Some(10));
    let rest = read_n(&mut again, 10);
    assert_eq!(numbers(&rest), (10..20).collect::<Vec<_>>());
}

/// group-offsets for a group with no committed offset: without properties.auto.offset.reset
/// open fails naming group, topic and partition; with `latest` it starts at the end.
#[test]
fn group_offsets_without_a_commit_needs_auto_offset_reset() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("nocommit");
    let group = unique_topic("fresh-group");
    create_topic(bootstrap, &topic, 1).expect("topic");
    produce(bootstrap, &topic, numbered(0..3, None)).expect("produce");

    let opts = source_options(bootstrap, &[("topic", &topic), ("properties.group.id", &group)]);
    let err = KafkaSourceReader::open(opts, 0, 1, None, KafkaSourceMetrics::new()).err().expect("must fail");
    let KeelError::FailedPrecondition { reason } = &err else {
        panic!("expected FailedPrecondition, got {err:?}")
    };
    let expected = format!("no committed offset for group {group} on topic {topic} partition 0 and no properties.auto.offset.reset");
    assert!(reason.contains(&expected), "{reason}");
    assert!(reason.contains("sources[0].properties.auto.offset.reset"), "{reason}");

    let mut reader = open(
        bootstrap,
        &[("topic", &topic), ("properties.group.id", &group), ("properties.auto.offset.reset", "latest")],
    );
    assert_eq!(reader.position().get(&topic, 0), Some(3));
    produce_numbered(bootstrap, &topic, 50..52, |_| None).expect("produce");
    assert_eq!(numbers(&read_n(&mut reader, 2)), vec![50, 51]);
}

/// timestamp: each partition starts where the broker's offset-for-timestamp lookup
/// (ListOffsets) puts scan.startup.timestamp-millis. On Kafka that is the first record at or
/// after it (offset 5 for a time between the 5th and 6th records), or the end (10) when there is
/// none; the reader then reads exactly records 5..10.
#[test]
fn timestamp_mode_starts_at_the_first_record_at_or_after_it() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("timestamp");
    create_topic(bootstrap, &topic, 1).expect("topic");
    let base: i64 = 1_700_000_000_000;
    let records: Vec<Produce> = (0..10u64)
        .map(|n| Produce {
            value: n.to_string(),
            timestamp_ms: Some(base + i64::try_from(n).expect("small") * 1000),
            ..Produce::default()
        })
        .collect();
    produce(bootstrap, &topic, records).expect("produce");

    let (at, later) = (base + 4500, base + 60_000);
    assert_eq!(broker_offset_for_time(bootstrap, &topic, at), Some(5), "the broker's lookup by time");
    assert_eq!(broker_offset_for_time(bootstrap, &topic, later), None, "nothing at or after it");
    let at_text = at.to_string();
    let mut reader = open(
        bootstrap,
        &[("topic", &topic), ("scan.startup.mode", "timestamp"), ("scan.startup.timestamp-millis", &at_text)],
    );
    assert_eq!(reader.position().get(&topic, 0), Some(5));
    let got = read_n(&mut reader, 5);
    assert_eq!(numbers(&got), vec![5, 6, 7, 8, 9]);
    assert_eq!(got.iter().map(|r| r.timestamp_ms).min(), Some(Some(base + 5000)));
    assert!(read_for(&mut reader, Duration::from_millis(300)).is_empty(), "nothing before record 5");

    let later_text = later.to_string();
    let reader = open(
        bootstrap,
        &[
            ("topic", &topic),
            ("scan.startup.mode", "timestamp"),
            ("scan.startup.timestamp-millis", &later_text),
        ],
    );
    // No record at or after it: the end.
    assert_eq!(reader.position().get(&topic, 0), Some(10));
}

/// The broker's answer to "which offset has the first record at or after `ts`" (`None`: none).
fn broker_offset_for_time(bootstrap: &str, topic: &str, ts: i64) -> Option<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(ts)).expect("tpl");
    let found = consumer.offsets_for_times(tpl, Duration::from_secs(10)).expect("offsets for times");
    found.elements().first().and_then(|e| match e.offset() {
        rdkafka::Offset::Offset(o) if o >= 0 => Some(o),
        _ => None,
    })
}

/// specific-offsets: listed partitions start at the listed offsets; a partition not listed
/// (and no group offset) starts at the earliest offset.
#[test]
fn specific_offsets_start_each_listed_partition_there() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("specific");
    create_topic(bootstrap, &topic, 3).expect("topic");
    for p in 0..3 {
        let base = u64::try_from(p).expect("small") * 100;
        produce_numbered_to(bootstrap, &topic, p, base..base + 10).expect("produce");
    }
    let mut reader = open(
        bootstrap,
        &[
            ("topic", &topic),
            ("scan.startup.mode", "specific-offsets"),
            ("scan.startup.specific-offsets", "partition:0,offset:3;partition:1,offset:7"),
        ],
    );
    let got = read_n(&mut reader, 7 + 3 + 10);
    let mut expected: Vec<u64> = (3..10).chain(107..110).chain(200..210).collect();
    expected.sort_unstable();
    assert_eq!(numbers(&got), expected);
}

/// A restored position wins over every startup mode: with each mode, a reader restored at
/// offset 6 reads exactly records 6.. and nothing before.
#[test]
fn a_restored_position_wins_over_every_startup_mode() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("restored");
    let group = unique_topic("restored-g");
    create_topic(bootstrap, &topic, 1).expect("topic");
    let base: i64 = 1_700_000_000_000;
    let records: Vec<Produce> = (0..10u64)
        .map(|n| Produce {
            value: n.to_string(),
            timestamp_ms: Some(base + i64::try_from(n).expect("small")),
            ..Produce::default()
        })
        .collect();
    produce(bootstrap, &topic, records).expect("produce");
    // The group has committed offset 2, to be ignored as well.
    let mut committer = open(
        bootstrap,
        &[("topic", &topic), ("properties.group.id", &group), ("scan.startup.mode", "earliest-offset")],
    );
    let mut two = SourcePosition::new();
    two.set(&topic, 0, 2);
    committer.commit(&two).expect("commit");
    wait_until("the commit to reach the group", Duration::from_secs(10), || {
        Ok((committed_offsets(bootstrap, &group, &topic)?.get(&0) == Some(&Some(2))).then_some(()))
    })
    .expect("committed");
    drop(committer);

    let ts = (base + 1).to_string();
    let modes: Vec<Vec<(&str, &str)>> = vec![
        vec![("scan.startup.mode", "earliest-offset")],
        vec![("scan.startup.mode", "latest-offset")],
        vec![("scan.startup.mode", "group-offsets"), ("properties.group.id", &group)],
        vec![("scan.startup.mode", "timestamp"), ("scan.startup.timestamp-millis", &ts)],
        vec![
            ("scan.startup.mode", "specific-offsets"),
            ("scan.startup.specific-offsets", "partition:0,offset:1"),
        ],
    ];
    let mut restored = SourcePosition::new();
    restored.set(&topic, 0, 6);
    // A position of another partition (another subtask's) is ignored.
    restored.set("some-other-topic", 3, 99);
    for mode in modes {
        let mut pairs = vec![("topic", topic.as_str())];
        pairs.extend(mode.iter().copied());
        let opts = source_options(bootstrap, &pairs);
        let mut reader =
            KafkaSourceReader::open(opts, 0, 1, Some(restored.clone()), KafkaSourceMetrics::new())
                .unwrap_or_else(|e| panic!("open with {mode:?}: {e}"));
        assert_eq!(reader.assignment(), vec![TopicPartition::new(topic.clone(), 0)]);
        let got = read_n(&mut reader, 4);
        assert_eq!(numbers(&got), vec![6, 7, 8, 9], "{mode:?}");
        assert!(read_for(&mut reader, Duration::from_millis(200)).is_empty(), "{mode:?}");
    }
}

/// Reading does not move the group's offsets (auto-commit is off); `commit` does, and the
/// commit is counted in commitsSucceeded and shown as committedOffset.
#[test]
fn offsets_reach_the_group_only_through_commit() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("commit");
    let group = unique_topic("commit-g");
    create_topic(bootstrap, &topic, 2).expect("topic");
    produce_numbered(bootstrap, &topic, 0..20, |n| Some(n.to_string())).expect("produce");
    let metrics = KafkaSourceMetrics::new();
    let opts = source_options(
        bootstrap,
        &[("topic", &topic), ("properties.group.id", &group), ("properties.auto.offset.reset", "earliest")],
    );
    let mut reader = KafkaSourceReader::open(opts, 0, 1, None, metrics.clone()).expect("open");
    read_n(&mut reader, 20);
    // Keep the consumer busy for a while: nothing may be committed meanwhile.
    read_for(&mut reader, Duration::from_millis(1500));
    let committed = committed_offsets(bootstrap, &group, &topic).expect("committed");
    assert!(committed.values().all(Option::is_none), "nothing committed yet: {committed:?}");
    assert_eq!(metrics.commits_succeeded(), 0);

    let position = reader.position();
    reader.commit(&position).expect("commit");
    wait_until("commitsSucceeded", Duration::from_secs(10), || {
        Ok((metrics.commits_succeeded() == 1).then_some(()))
    })
    .expect("commit counted");
    let committed = committed_offsets(bootstrap, &group, &topic).expect("committed");
    for p in 0..2 {
        assert_eq!(committed.get(&p).copied().flatten(), position.get(&topic, p), "partition {p}");
    }
    let snapshot = metrics.snapshot();
    for pm in &snapshot.partitions {
        assert_eq!(pm.committed_offset, position.get(&pm.topic, pm.partition));
        assert_eq!(pm.current_offset, position.get(&pm.topic, pm.partition));
    }
    assert_eq!(snapshot.commits_failed, 0);
}

/// The source metrics: numRecordsIn / numBytesIn count what poll handed out, the event-time
/// lags are measured from record timestamps, currentOffset is the position, sourceIdleTime grows
/// while idle, and pendingRecords is high watermark − position: N − position while behind, 0 at
/// the end (the records are produced in large batches: the high watermark is the real end; tiny
/// fetches, so that the client's statistics arrive while records are still unread).
#[test]
fn source_metrics_follow_what_was_read() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("metrics");
    create_topic(bootstrap, &topic, 1).expect("topic");
    let now = keel_kafka_now_ms();
    // 1.5 MB in big batches.
    const N: u64 = 1500;
    let record = |n: u64| Produce {
        value: format!("{n:01000}"),
        timestamp_ms: Some(now - 60_000),
        ..Produce::default()
    };
    produce(bootstrap, &topic, (0..N).map(record).collect()).expect("produce");
    let metrics = KafkaSourceMetrics::new();
    let opts = source_options(
        bootstrap,
        &[
            ("topic", &topic),
            ("scan.startup.mode", "earliest-offset"),
            // Prefetch little, so that statistics arrive while records are unread.
            ("properties.queued.max.messages.kbytes", "1"),
            ("properties.max.partition.fetch.bytes", "262144"),
            ("properties.statistics.interval.ms", "50"),
        ],
    );
    let mut reader = KafkaSourceReader::open(opts, 0, 1, None, metrics.clone()).expect("open");
    let got = read_n(&mut reader, 4);
    assert_eq!(got.len(), 4);
    let snapshot = metrics.snapshot();
    assert_eq!(snapshot.num_records_in, 4);
    assert_eq!(snapshot.num_bytes_in, 4 * 1000);
    assert!(snapshot.current_emit_event_time_lag.is_some_and(|l| l >= 60_000), "{snapshot:?}");
    assert!(snapshot.current_fetch_event_time_lag.is_some_and(|l| l >= 60_000), "{snapshot:?}");
    assert_eq!(snapshot.partitions.first().and_then(|p| p.current_offset), Some(4));

    let n = i64::try_from(N).expect("small");
    let behind = wait_until("pendingRecords = N - position while behind", Duration::from_secs(10), || {
        let read = reader.poll(10, Duration::from_millis(100)).map_err(anyhow::Error::from)?;
        let position = reader.position().get(&topic, 0).unwrap_or(0);
        let pending = metrics.snapshot().pending_records;
        if read.is_empty() && position == n {
            anyhow::bail!("read everything before the statistics showed pendingRecords {pending:?}");
        }
        Ok((pending == Some(n - position) && position < n).then_some(pending))
    })
    .expect("pending while behind");
    assert!(behind.is_some_and(|p| p > 0));
    wait_until("pendingRecords = 0 and sourceIdleTime > 0 at the end", Duration::from_secs(10), || {
        reader.poll(1000, Duration::from_millis(100)).map_err(anyhow::Error::from)?;
        let s = metrics.snapshot();
        if s.pending_records == Some(0) && s.source_idle_time > 0 && s.num_records_in == N {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("{s:?}"))
        }
    })
    .expect("drained");
}

fn keel_kafka_now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis(),
    )
    .expect("fits")
}

/// Opens subtasks 0 and 1 of 2 with the same options.
fn two_readers(bootstrap: &str, pairs: &[(&str, &str)]) -> Vec<KafkaSourceReader> {
    (0..2)
        .map(|s| {
            KafkaSourceReader::open(source_options(bootstrap, pairs), s, 2, None, KafkaSourceMetrics::new())
                .expect("open")
        })
        .collect()
}

/// Polls every reader until `n` records arrived in total.
fn read_all(readers: &mut [KafkaSourceReader], n: usize) -> Vec<keel_kafka::KafkaRecord> {
    let mut got = Vec::new();
    let deadline = Instant::now() + common::READ_TIMEOUT;
    while got.len() < n {
        assert!(Instant::now() < deadline, "read {} of {n}: {:?}", got.len(), numbers(&got));
        for r in readers.iter_mut() {
            got.extend(r.poll(100, Duration::from_millis(100)).expect("poll"));
        }
    }
    got
}

/// After discovery, each subtask still reads what it read before and owns what it reads.
fn check_assignments(before: &[Vec<TopicPartition>], readers: &[KafkaSourceReader], total: usize) {
    let after: Vec<Vec<TopicPartition>> = readers.iter().map(KafkaSourceReader::assignment).collect();
    for (s, (b, a)) in before.iter().zip(&after).enumerate() {
        for tp in b {
            assert!(a.contains(tp), "subtask {s} lost {tp}");
        }
        for tp in a {
            assert_eq!(
                keel_kafka::owner(&tp.topic, tp.partition, 2),
                u32::try_from(s).expect("small"),
                "{tp}"
            );
        }
    }
    assert_eq!(after.iter().map(Vec::len).sum::<usize>(), total, "{after:?}");
}

/// Partitions added to a listed topic while subtasks 0 and 1 of 2 run are discovered without
/// reopening, each by exactly one subtask (its owner), and read from their earliest offset; the
/// old partitions keep their readers (CreatePartitions through the admin API).
#[test]
fn discovery_reads_partitions_added_to_a_listed_topic() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("grow");
    create_topic(bootstrap, &topic, 1).expect("topic");
    produce_numbered_to(bootstrap, &topic, 0, 0..3).expect("produce");
    let pairs = [
        ("topic", topic.as_str()),
        ("scan.startup.mode", "earliest-offset"),
        ("scan.topic-partition-discovery.interval", "200 ms"),
    ];
    let mut readers = two_readers(bootstrap, &pairs);
    assert_eq!(numbers(&read_all(&mut readers, 3)), vec![0, 1, 2]);
    let before: Vec<Vec<TopicPartition>> = readers.iter().map(KafkaSourceReader::assignment).collect();

    keel_testkit::add_partitions(bootstrap, &topic, 4).expect("add partitions");
    let mut expected = Vec::new();
    for p in 1..4 {
        let base = u64::try_from(p).expect("small") * 100;
        produce_numbered_to(bootstrap, &topic, p, base..base + 5).expect("produce");
        expected.extend(base..base + 5);
    }
    assert_eq!(numbers(&read_all(&mut readers, 15)), expected, "every record exactly once");
    check_assignments(&before, &readers, 4);
}

/// With topic-pattern, a topic created later that matches is discovered while subtasks 0 and
/// 1 of 2 run, without reopening: each of its partitions is read by exactly one subtask (its
/// owner) from the earliest offset, the partitions read before keep their readers, and a new
/// topic that does not match is not read.
#[test]
fn discovery_reads_a_new_topic_matching_the_pattern() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let prefix = unique_topic("pat");
    let first = format!("{prefix}-a");
    create_topic(bootstrap, &first, 2).expect("topic");
    produce_numbered(bootstrap, &first, 0..6, |n| Some(n.to_string())).expect("produce");
    let pattern = format!("{}-.*", regex_escape(&prefix));
    let pairs = [
        ("topic-pattern", pattern.as_str()),
        ("scan.startup.mode", "earliest-offset"),
        ("scan.topic-partition-discovery.interval", "200 ms"),
    ];
    let mut readers = two_readers(bootstrap, &pairs);
    assert_eq!(numbers(&read_all(&mut readers, 6)), (0..6).collect::<Vec<_>>());
    let before: Vec<Vec<TopicPartition>> = readers.iter().map(KafkaSourceReader::assignment).collect();

    let second = format!("{prefix}-b");
    let other = format!("x{prefix}-c");
    create_topic(bootstrap, &second, 3).expect("topic");
    create_topic(bootstrap, &other, 1).expect("topic");
    // Produced before any discovery round can have seen the topic: read from its earliest offset.
    produce_numbered(bootstrap, &second, 10..22, |n| Some(n.to_string())).expect("produce");
    produce_numbered(bootstrap, &other, 90..93, |_| None).expect("produce");
    let got = read_all(&mut readers, 12);
    assert_eq!(numbers(&got), (10..22).collect::<Vec<_>>(), "every record exactly once");
    assert!(got.iter().all(|r| &*r.topic == second.as_str()));
    for r in readers.iter_mut() {
        assert!(read_for(r, Duration::from_millis(500)).is_empty(), "the non-matching topic is not read");
    }
    check_assignments(&before, &readers, 5);
    // Every subtask knows the size of every topic it reads whole, not only its own share.
    for r in &readers {
        let sizes: Vec<(&str, usize)> = r.topic_sizes().iter().map(|(t, n)| (t.as_str(), *n)).collect();
        assert_eq!(sizes, vec![(first.as_str(), 2), (second.as_str(), 3)]);
    }
}

fn regex_escape(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_ascii_alphanumeric() { vec![c] } else { vec!['\\', c] }).collect()
}

/// A broker that does not exist (a free port, nothing listening) fails `open` within the
/// configured timeout with `Unavailable` naming the bootstrap servers: no hang.
#[test]
fn unreachable_broker_fails_open_naming_the_bootstrap_servers() {
    let bootstrap = format!("127.0.0.1:{}", free_port());
    let opts = KafkaSourceOptionsBuilder::new(&bootstrap)
        .with("topic", "t")
        .with("scan.startup.mode", "earliest-offset")
        .with("properties.default.api.timeout.ms", "1500")
        .build();
    let started = Instant::now();
    let err = KafkaSourceReader::open(opts, 0, 1, None, KafkaSourceMetrics::new()).err().expect("must fail");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(took >= Duration::from_millis(1400), "gave up before the timeout: {took:?}");
    match &err {
        KeelError::Unavailable { address, reason } => {
            assert_eq!(address, &bootstrap);
            assert!(reason.contains("1.5s"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(err.to_string().contains(&bootstrap), "{err}");
}

/// A listed topic that does not exist fails `open`, naming it.
#[test]
fn a_missing_topic_fails_open_naming_it() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("missing");
    let opts = source_options(bootstrap, &[("topic", &topic), ("scan.startup.mode", "earliest-offset")]);
    let err = KafkaSourceReader::open(opts, 0, 1, None, KafkaSourceMetrics::new()).err().expect("must fail");
    assert!(err.to_string().contains(&format!("topic {topic} does not exist")), "{err}");
}

/// A broker outage is not an error for `poll`: while the broker is frozen (SIGSTOP: no
/// answers, connections open) poll returns no records and no error, and once it runs again the
/// same reader (not reopened) reads what is produced; likewise over a kill -9 and restart of
/// the broker (a node of the test's own, whatever `KEEL_TEST_KAFKA_BOOTSTRAP` says).
#[test]
fn poll_rides_out_a_broker_outage() {
    let kafka = Kafka::single().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("outage");
    create_topic(bootstrap, &topic, 1).expect("topic");
    produce_numbered(bootstrap, &topic, 0..3, |_| None).expect("produce");
    let mut reader = open(bootstrap, &[("topic", &topic), ("scan.startup.mode", "earliest-offset")]);
    assert_eq!(numbers(&read_n(&mut reader, 3)), vec![0, 1, 2]);
    kafka.pause(1).expect("pause");
    assert!(read_for(&mut reader, Duration::from_millis(1500)).is_empty(), "no records, and no error");
    kafka.resume(1).expect("resume");
    produce_numbered(bootstrap, &topic, 3..8, |_| None).expect("produce");
    assert_eq!(numbers(&read_n(&mut reader, 5)), vec![3, 4, 5, 6, 7]);
    assert_eq!(reader.position().get(&topic, 0), Some(8));
    kafka.kill(1).expect("kill -9");
    assert!(read_for(&mut reader, Duration::from_millis(1500)).is_empty(), "no records, and no error");
    kafka.start(1).expect("start again");
    produce_numbered(bootstrap, &topic, 8..12, |_| None).expect("produce");
    assert_eq!(numbers(&read_n(&mut reader, 4)), vec![8, 9, 10, 11]);
    assert_eq!(reader.position().get(&topic, 0), Some(12));
}

/// Builds source options without the test defaults of `common::options`.
struct KafkaSourceOptionsBuilder(std::collections::BTreeMap<String, String>);

impl KafkaSourceOptionsBuilder {
    fn new(bootstrap: &str) -> Self {
        let mut m = std::collections::BTreeMap::new();
        m.insert("properties.bootstrap.servers".to_string(), bootstrap.to_string());
        KafkaSourceOptionsBuilder(m)
    }
    fn with(mut self, k: &str, v: &str) -> Self {
        self.0.insert(k.to_string(), v.to_string());
        self
    }
    fn build(self) -> keel_kafka::KafkaSourceOptions {
        keel_kafka::KafkaSourceOptions::from_spec("sources[0]", &self.0).expect("valid")
    }
}

/// A restored position beyond what the partition holds is out of range: without
/// properties.auto.offset.reset, poll fails naming topic, partition and offset; with
/// `earliest` the reader moves to the earliest offset and reads everything (the broker answers
/// the fetch with OFFSET_OUT_OF_RANGE).
#[test]
fn an_out_of_range_position_needs_auto_offset_reset() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("range");
    create_topic(bootstrap, &topic, 1).expect("topic");
    produce(bootstrap, &topic, numbered(0..5, Some(0))).expect("produce");
    let mut restored = SourcePosition::new();
    restored.set(&topic, 0, 1000);

    let opts = source_options(bootstrap, &[("topic", &topic), ("scan.startup.mode", "earliest-offset")]);
    let mut reader =
        KafkaSourceReader::open(opts, 0, 1, Some(restored.clone()), KafkaSourceMetrics::new()).expect("open");
    let err = wait_until("poll to fail", Duration::from_secs(10), || {
        match reader.poll(10, Duration::from_millis(200)) {
            Ok(records) => Err(anyhow::anyhow!("poll returned {} records", records.len())),
            Err(e) => Ok(Some(e)),
        }
    })
    .expect("an error");
    let text = err.to_string();
    assert!(text.contains(&format!("topic {topic} partition 0 at offset 1000")), "{text}");
    assert!(text.contains("sources[0].properties.auto.offset.reset"), "{text}");
    drop(reader);

    let opts = source_options(
        bootstrap,
        &[
            ("topic", &topic),
            ("scan.startup.mode", "earliest-offset"),
            ("properties.auto.offset.reset", "earliest"),
        ],
    );
    let mut reader =
        KafkaSourceReader::open(opts, 0, 1, Some(restored), KafkaSourceMetrics::new()).expect("open");
    assert_eq!(numbers(&read_n(&mut reader, 5)), vec![0, 1, 2, 3, 4]);
}

/// The number a numbered record's value holds.
fn value_number(value: Option<&[u8]>) -> anyhow::Result<u64> {
    let text = std::str::from_utf8(value.ok_or_else(|| anyhow::anyhow!("no value"))?)?;
    Ok(text.parse()?)
}

/// poll_each: a visitor's `Err` stops the poll with that error, the position stays right
/// after the last message the visitor took, and the next poll hands the refused message out
/// first, so every record is taken exactly once and in order. Polls with `max_records` 0
/// before it (which may keep a message back) hand out nothing and leave the position alone.
#[test]
fn poll_each_keeps_the_position_after_the_last_message_taken() -> anyhow::Result<()> {
    let kafka = Kafka::shared()?;
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("visit");
    create_topic(bootstrap, &topic, 1)?;
    produce_numbered_to(bootstrap, &topic, 0, 0..10)?;
    let mut reader = open(bootstrap, &[("topic", &topic), ("scan.startup.mode", "earliest-offset")]);

    for _ in 0..3 {
        let n = reader.poll_each(0, Duration::from_millis(300), |m| {
            Err(KeelError::internal(format!("visited with max_records 0: offset {}", m.offset)))
        })?;
        assert_eq!(n, 0);
        assert_eq!(reader.position().get(&topic, 0), Some(0));
    }

    let mut taken: Vec<u64> = Vec::new();
    let deadline = Instant::now() + common::READ_TIMEOUT;
    let refusal = loop {
        assert!(Instant::now() < deadline, "record 3 never reached the visitor; took {taken:?}");
        let polled = reader.poll_each(100, Duration::from_millis(200), |m| {
            let n = value_number(m.value).map_err(|e| KeelError::internal(e.to_string()))?;
            if n == 3 {
                return Err(KeelError::internal("record 3 refused"));
            }
            taken.push(n);
            Ok(())
        });
        match polled {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(refusal.to_string().contains("record 3 refused"), "{refusal}");
    assert_eq!(taken, vec![0, 1, 2]);
    assert_eq!(reader.position().get(&topic, 0), Some(3), "right after the last message taken");

    let mut offsets: Vec<i64> = Vec::new();
    while taken.len() < 10 {
        assert!(Instant::now() < deadline, "read {taken:?}");
        let before = taken.len();
        let n = reader.poll_each(100, Duration::from_millis(200), |m| {
            taken.push(value_number(m.value).map_err(|e| KeelError::internal(e.to_string()))?);
            offsets.push(m.offset);
            Ok(())
        })?;
        assert_eq!(n, taken.len() - before, "poll_each counts what the visitor took");
    }
    assert_eq!(taken, (0..10).collect::<Vec<_>>(), "the refused record first, then the rest, once each");
    assert_eq!(offsets.first(), Some(&3));
    assert_eq!(reader.position().get(&topic, 0), Some(10));
    assert!(read_for(&mut reader, Duration::from_millis(300)).is_empty(), "no record twice");
    Ok(())
}

/// poll_each hands the visitor each message's headers, in order and borrowed: a header with a
/// value, one with an empty value, one without a value (`None`, not empty) and a repeated
/// name, as the sink wrote them from borrowed headers; a message without headers has none.
/// `poll`'s owned copy keeps the same distinction.
#[test]
fn poll_each_hands_the_headers_to_the_visitor() -> anyhow::Result<()> {
    let kafka = Kafka::shared()?;
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("headers");
    create_topic(bootstrap, &topic, 1)?;
    let headers: &[(&str, Option<&[u8]>)] =
        &[("a", Some(b"1")), ("empty", Some(b"")), ("none", None), ("a", Some(b"2"))];
    let mut writer = keel_kafka::KafkaSinkWriter::open(
        common::sink_options(bootstrap, &[("topic", &topic)]),
        0,
        1,
        keel_kafka::KafkaSinkMetrics::new(),
    )?;
    writer.send(Some(b"k"), Some(b"with"), headers, Some(1_700_000_000_000))?;
    writer.send(None, Some(b"without"), &[], None)?;
    writer.flush(Duration::from_secs(10))?;

    type Seen = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Option<Vec<u8>>)>, usize);
    let mut seen: Vec<Seen> = Vec::new();
    let mut reader = open(bootstrap, &[("topic", &topic), ("scan.startup.mode", "earliest-offset")]);
    let deadline = Instant::now() + common::READ_TIMEOUT;
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "read {} of 2 records", seen.len());
        reader.poll_each(10, Duration::from_millis(200), |m| {
            let hs = m.headers().map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec))).collect();
            seen.push((m.key.map(<[u8]>::to_vec), m.value.map(<[u8]>::to_vec), hs, m.header_count()));
            Ok(())
        })?;
    }
    let owned = |hs: &[(&str, Option<&[u8]>)]| -> Vec<(String, Option<Vec<u8>>)> {
        hs.iter().map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec))).collect()
    };
    assert_eq!(seen[0], (Some(b"k".to_vec()), Some(b"with".to_vec()), owned(headers), 4));
    assert_eq!(seen[1], (None, Some(b"without".to_vec()), Vec::new(), 0));

    let mut again = open(bootstrap, &[("topic", &topic), ("scan.startup.mode", "earliest-offset")]);
    let records = read_n(&mut again, 2);
    assert_eq!(records.first().map(|r| r.headers.clone()), Some(owned(headers)));
    Ok(())
}

/// A header name that is not UTF-8 (the protocol carries bytes; another client may write
/// them) does not stop the reader: it reads as U+FFFD, its value and the record's other
/// headers and value arrive intact, in order. (rdkafka's own header accessor unwraps the name
/// as UTF-8 and would panic the reading thread on this record.)
#[test]
#[allow(unsafe_code)]
fn a_header_name_that_is_not_utf8_reads_as_a_replacement_character() -> anyhow::Result<()> {
    use rdkafka::bindings as rdsys;
    use rdkafka::producer::{BaseProducer, Producer};
    let kafka = Kafka::shared()?;
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("bad-header");
    create_topic(bootstrap, &topic, 1)?;
    let producer: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let topic_c = std::ffi::CString::new(topic.clone())?;
    let (bad_name, good_name) = (c"\xff\xfeid", c"ok");
    let (value, one, two) = (b"payload", b"1", b"2");
    let vu = |vtype, u| rdsys::rd_kafka_vu_t { vtype, u };
    let header = |name: &std::ffi::CStr, val: &[u8]| rdsys::rd_kafka_vu_s__bindgen_ty_1 {
        header: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
            name: name.as_ptr(),
            val: val.as_ptr().cast(),
            size: isize::try_from(val.len()).unwrap_or(0),
        },
    };
    let vus = [
        vu(
            rdsys::rd_kafka_vtype_t::RD_KAFKA_VTYPE_TOPIC,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 { cstr: topic_c.as_ptr() },
        ),
        vu(
            rdsys::rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                mem: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                    ptr: value.as_ptr().cast_mut().cast(),
                    size: value.len(),
                },
            },
        ),
        vu(rdsys::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADER, header(bad_name, one)),
        vu(rdsys::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADER, header(good_name, two)),
    ];
    // SAFETY: a live producer; every pointer in `vus` outlives the call, which copies the
    // value and the headers (librdkafka's default is to copy).
    let error = unsafe { rdsys::rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), vus.len()) };
    anyhow::ensure!(error.is_null(), "rd_kafka_produceva refused the record");
    producer.flush(Duration::from_secs(10))?;

    let mut reader = open(bootstrap, &[("topic", &topic), ("scan.startup.mode", "earliest-offset")]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + common::READ_TIMEOUT;
    while seen.is_empty() {
        assert!(Instant::now() < deadline, "the record never arrived");
        reader.poll_each(10, Duration::from_millis(200), |m| {
            let hs: Vec<(String, Option<Vec<u8>>)> =
                m.headers().map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec))).collect();
            seen.push((m.value.map(<[u8]>::to_vec), hs));
            Ok(())
        })?;
    }
    let want = vec![("\u{fffd}".to_string(), Some(one.to_vec())), ("ok".to_string(), Some(two.to_vec()))];
    assert_eq!(seen, vec![(Some(value.to_vec()), want)]);
    assert_eq!(reader.position().get(&topic, 0), Some(1));
    Ok(())
}

/// The timestamp type and the leader epoch reach the visitor and `poll`'s owned copy: a topic
/// with producer timestamps gives `CreateTime` and the producer's time, one with
/// `message.timestamp.type=LogAppendTime` gives `LogAppendTime` and the broker's time (not the
/// producer's); the broker tells the partition leader's epoch (KIP-320), so it is known and
/// not negative.
#[test]
fn messages_carry_the_timestamp_type_and_the_leader_epoch() -> anyhow::Result<()> {
    use keel_kafka::TimestampType;
    let kafka = Kafka::shared()?;
    let bootstrap = kafka.bootstrap();
    let create_time = unique_topic("ts-create");
    let append_time = unique_topic("ts-append");
    keel_testkit::create_topic(bootstrap, &create_time, 1)?;
    keel_testkit::create_topic_with(
        bootstrap,
        &append_time,
        1,
        &[("message.timestamp.type", "LogAppendTime")],
    )?;
    let producer_time = 1_600_000_000_000;
    for topic in [&create_time, &append_time] {
        let records = (0..3)
            .map(|n| Produce {
                value: n.to_string(),
                timestamp_ms: Some(producer_time),
                ..Produce::default()
            })
            .collect();
        produce(bootstrap, topic, records)?;
    }
    let before = keel_kafka_now_ms() - 60_000;

    for (topic, want) in
        [(&create_time, TimestampType::CreateTime), (&append_time, TimestampType::LogAppendTime)]
    {
        let mut seen = Vec::new();
        let mut reader = open(bootstrap, &[("topic", topic), ("scan.startup.mode", "earliest-offset")]);
        let deadline = Instant::now() + common::READ_TIMEOUT;
        while seen.len() < 3 {
            assert!(Instant::now() < deadline, "{topic}: read {} of 3 records", seen.len());
            reader.poll_each(10, Duration::from_millis(200), |m| {
                seen.push((m.timestamp_type, m.timestamp_ms, m.leader_epoch));
                Ok(())
            })?;
        }
        for (tt, ts, epoch) in seen {
            assert_eq!(tt, want, "{topic}");
            let ts = ts.ok_or_else(|| anyhow::anyhow!("{topic}: no timestamp"))?;
            if want == TimestampType::CreateTime {
                assert_eq!(ts, producer_time);
            } else {
                assert!(ts >= before, "{topic}: the broker's append time, not the producer's: {ts}");
            }
            assert!(epoch.is_some_and(|e| e >= 0), "{topic}: leader epoch {epoch:?}");
        }
        let mut again = open(bootstrap, &[("topic", topic), ("scan.startup.mode", "earliest-offset")]);
        for r in read_n(&mut again, 3) {
            assert_eq!(r.timestamp_type, want, "{topic}: owned copy");
            assert!(
                r.leader_epoch.is_some_and(|e| e >= 0),
                "{topic}: owned copy's epoch {:?}",
                r.leader_epoch
            );
            assert_eq!(r.as_message().timestamp_type, want);
        }
    }
    Ok(())
}
