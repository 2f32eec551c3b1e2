//! The testkit's own checks, against the broker it starts (tansu) or `KEEL_TEST_KAFKA_BOOTSTRAP`.

use std::time::Duration;

use keel_testkit::{
    committed_offsets, consume_all, create_topic, free_port, partition_count, produce_numbered,
    produce_numbered_to, unique_topic, wait_until, Broker,
};

/// What was produced is what `consume_all` reads back, with the partitions and offsets the
/// producer was told; a new group has no committed offsets.
#[test]
fn produce_and_consume_round_trip_with_positions() {
    let broker = Broker::start().expect("broker");
    let topic = unique_topic("testkit");
    create_topic(&broker.bootstrap, &topic, 2).expect("topic");
    assert_eq!(partition_count(&broker.bootstrap, &topic).expect("count"), 2);
    let mut written =
        produce_numbered(&broker.bootstrap, &topic, 0..20, |n| Some(format!("k{n}"))).expect("produce");
    written.extend(produce_numbered_to(&broker.bootstrap, &topic, 1, 20..25).expect("produce"));
    assert!(written[20..].iter().all(|r| r.partition == 1));
    let mut read = consume_all(&broker.bootstrap, &topic, "testkit-check", 25, Duration::from_secs(15))
        .expect("consume");
    let key = |r: &keel_testkit::TestRecord| (r.partition, r.offset);
    read.sort_by_key(key);
    written.sort_by_key(key);
    assert_eq!(
        read.iter().map(|r| (r.partition, r.offset, r.number())).collect::<Vec<_>>(),
        written.iter().map(|r| (r.partition, r.offset, r.number())).collect::<Vec<_>>()
    );
    let committed = committed_offsets(&broker.bootstrap, "testkit-check", &topic).expect("committed");
    assert_eq!(committed, [(0, None), (1, None)].into_iter().collect());
}

/// A frozen broker does not answer; a resumed one does, with its data.
#[test]
fn a_paused_broker_answers_again_after_resume() {
    let mut broker = Broker::start().expect("broker");
    if broker.is_external() {
        return;
    }
    let topic = unique_topic("pause");
    create_topic(&broker.bootstrap, &topic, 1).expect("topic");
    broker.pause().expect("pause");
    let client: rdkafka::consumer::BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &broker.bootstrap).create().expect("client");
    use rdkafka::consumer::Consumer;
    assert!(
        client.fetch_metadata(None, Duration::from_millis(700)).is_err(),
        "a paused broker answers nothing"
    );
    broker.resume().expect("resume");
    assert_eq!(partition_count(&broker.bootstrap, &topic).expect("count"), 1);
}

/// `wait_until` returns the value once the check yields one, and on timeout names what it
/// awaited and the last observation.
#[test]
fn wait_until_reports_what_it_waited_for() {
    let mut n = 0;
    let got = wait_until("n to reach 3", Duration::from_secs(5), || {
        n += 1;
        Ok((n >= 3).then_some(n))
    })
    .expect("reached");
    assert_eq!(got, 3);
    let err =
        wait_until::<()>("the impossible", Duration::from_millis(250), || Err(anyhow::anyhow!("still 7")))
            .expect_err("times out");
    let text = err.to_string();
    assert!(text.contains("the impossible") && text.contains("still 7"), "{text}");
    assert_ne!(free_port(), 0);
}

/// A persistent broker (tansu on moto's S3) keeps its data over a kill -9 and restart on the
/// same port: the topic with its partitions, every record at its offset, a group's committed
/// offset, and new records get offsets after the old ones (none reused). Skipped against an
/// external broker, which this process cannot restart.
#[test]
fn a_persistent_broker_keeps_topics_and_records_over_a_restart() {
    let mut broker = Broker::start_persistent().expect("persistent broker");
    if broker.is_external() {
        eprintln!(
            "skipped: {} names an external broker, which cannot be restarted",
            keel_testkit::ENV_BOOTSTRAP
        );
        return;
    }
    assert!(broker.is_persistent());
    let topic = unique_topic("persist");
    create_topic(&broker.bootstrap, &topic, 2).expect("topic");
    let mut written =
        produce_numbered(&broker.bootstrap, &topic, 0..200, |n| Some(format!("k{n}"))).expect("produce");
    let group = unique_topic("persist-group");
    let committer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", &group)
        .create()
        .expect("client");
    let mut offsets = rdkafka::TopicPartitionList::new();
    offsets.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(42)).expect("offset");
    use rdkafka::consumer::Consumer;
    committer.commit(&offsets, rdkafka::consumer::CommitMode::Sync).expect("commit");
    drop(committer);

    broker.restart().expect("restart");

    assert_eq!(partition_count(&broker.bootstrap, &topic).expect("count"), 2);
    assert_eq!(
        committed_offsets(&broker.bootstrap, &group, &topic).expect("committed"),
        [(0, Some(42)), (1, None)].into_iter().collect()
    );
    let before_end: std::collections::BTreeMap<i32, i64> =
        written.iter().fold(Default::default(), |mut ends, r| {
            let end = ends.entry(r.partition).or_insert(-1);
            *end = (*end).max(r.offset);
            ends
        });
    let after =
        produce_numbered(&broker.bootstrap, &topic, 200..300, |n| Some(format!("k{n}"))).expect("produce");
    for r in &after {
        assert!(r.offset > before_end.get(&r.partition).copied().unwrap_or(-1), "offset reused: {r:?}");
    }
    written.extend(after);
    let mut read = consume_all(&broker.bootstrap, &topic, "persist-check", 300, Duration::from_secs(20))
        .expect("every record, old and new");
    let key = |r: &keel_testkit::TestRecord| (r.partition, r.offset);
    read.sort_by_key(key);
    written.sort_by_key(key);
    assert_eq!(
        read.iter().map(|r| (r.partition, r.offset, r.number())).collect::<Vec<_>>(),
        written.iter().map(|r| (r.partition, r.offset, r.number())).collect::<Vec<_>>()
    );
}
