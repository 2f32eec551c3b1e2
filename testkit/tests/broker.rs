//! The testkit's own checks against real Apache Kafka: the shared node (or
//! `KEEL_TEST_KAFKA_BOOTSTRAP`), and clusters of their own for the fault controls.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_testkit::{
    committed_offsets, consume_all, create_topic, free_port, partition_count, produce_numbered,
    produce_numbered_to, unique_topic, wait_until, Kafka, TestRecord,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};

fn by_position(records: &[TestRecord]) -> Vec<(i32, i64, Option<u64>)> {
    let mut out: Vec<_> = records.iter().map(|r| (r.partition, r.offset, r.number())).collect();
    out.sort_unstable();
    out
}

fn commit(bootstrap: &str, group: &str, topic: &str, partition: i32, offset: i64) {
    let committer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .expect("client");
    let mut offsets = rdkafka::TopicPartitionList::new();
    offsets.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset)).expect("offset");
    committer.commit(&offsets, CommitMode::Sync).expect("commit");
}

/// What was produced is what `consume_all` reads back, with the partitions and offsets the
/// producer was told; a new group has no committed offsets.
#[test]
fn produce_and_consume_round_trip_with_positions() {
    let kafka = Kafka::shared().expect("kafka");
    let bootstrap = kafka.bootstrap();
    let topic = unique_topic("testkit");
    create_topic(bootstrap, &topic, 2).expect("topic");
    assert_eq!(partition_count(bootstrap, &topic).expect("count"), 2);
    let mut written = produce_numbered(bootstrap, &topic, 0..20, |n| Some(format!("k{n}"))).expect("produce");
    written.extend(produce_numbered_to(bootstrap, &topic, 1, 20..25).expect("produce"));
    assert!(written[20..].iter().all(|r| r.partition == 1));
    let read = consume_all(bootstrap, &topic, "testkit-check", 25, Duration::from_secs(15)).expect("consume");
    assert_eq!(by_position(&read), by_position(&written));
    let committed = committed_offsets(bootstrap, "testkit-check", &topic).expect("committed");
    assert_eq!(committed, [(0, None), (1, None)].into_iter().collect());
}

/// A single node keeps its data over kill -9 and a start on the same port: the topic, every
/// record at its offset, a group's committed offset; new records get offsets after the old
/// ones. A paused node answers nothing; resumed, it answers with its data.
#[test]
fn a_node_keeps_its_data_over_kill_and_restart_and_answers_after_pause() {
    let kafka = Kafka::single().expect("kafka");
    let bootstrap = kafka.bootstrap().to_string();
    eprintln!("single-node start-up: {:?}", kafka.startup);
    let topic = unique_topic("persist");
    create_topic(&bootstrap, &topic, 2).expect("topic");
    let mut written =
        produce_numbered(&bootstrap, &topic, 0..200, |n| Some(format!("k{n}"))).expect("produce");
    let group = unique_topic("persist-group");
    commit(&bootstrap, &group, &topic, 0, 42);

    kafka.pause(1).expect("pause");
    let client: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &bootstrap).create().expect("client");
    assert!(
        client.fetch_metadata(None, Duration::from_millis(700)).is_err(),
        "a paused broker answers nothing"
    );
    kafka.resume(1).expect("resume");
    assert_eq!(partition_count(&bootstrap, &topic).expect("count"), 2);

    let pid = kafka.pid(1).expect("running");
    kafka.restart(1).expect("restart");
    assert_ne!(kafka.pid(1), Some(pid), "a new process");

    assert_eq!(partition_count(&bootstrap, &topic).expect("count"), 2);
    assert_eq!(
        committed_offsets(&bootstrap, &group, &topic).expect("committed"),
        [(0, Some(42)), (1, None)].into_iter().collect()
    );
    let before_end: BTreeMap<i32, i64> = written.iter().fold(BTreeMap::new(), |mut ends, r| {
        let end = ends.entry(r.partition).or_insert(-1);
        *end = (*end).max(r.offset);
        ends
    });
    let after = produce_numbered(&bootstrap, &topic, 200..300, |n| Some(format!("k{n}"))).expect("produce");
    for r in &after {
        assert!(r.offset > before_end.get(&r.partition).copied().unwrap_or(-1), "offset reused: {r:?}");
    }
    written.extend(after);
    let read = consume_all(&bootstrap, &topic, "persist-check", 300, Duration::from_secs(30)).expect("all");
    assert_eq!(by_position(&read), by_position(&written));
}

/// Three nodes replicate every topic three times with `min.insync.replicas` 2: killing the
/// leader of a partition moves its leadership to another node and acks=all writes go on (two
/// in sync); the killed node comes back, catches up, and nothing acknowledged is lost. A
/// stopped node (SIGTERM) hands its leadership over before it exits.
#[test]
fn three_nodes_survive_the_kill_of_a_partition_leader() {
    let kafka = Kafka::three().expect("kafka");
    let bootstrap = kafka.bootstrap().to_string();
    eprintln!("three-node start-up: {:?}", kafka.startup);
    assert_eq!(kafka.live_brokers().expect("brokers"), vec![1, 2, 3]);
    let topic = unique_topic("replicated");
    create_topic(&bootstrap, &topic, 3).expect("topic");
    kafka.wait_in_sync(&topic, Duration::from_secs(30)).expect("in sync");
    let mut written =
        produce_numbered(&bootstrap, &topic, 0..300, |n| Some(format!("k{n}"))).expect("produce");

    let leader = kafka.leader_of(&topic, 0).expect("leader");
    kafka.kill(leader).expect("kill the leader");
    let new_leader = wait_until("partition 0 to get another leader", Duration::from_secs(60), || {
        let now = kafka.leader_of(&topic, 0)?;
        Ok((now != leader).then_some(now))
    })
    .expect("failover");
    assert_ne!(new_leader, leader);
    written.extend(
        produce_numbered(&bootstrap, &topic, 300..600, |n| Some(format!("k{n}"))).expect("two of three"),
    );

    kafka.start(leader).expect("start again");
    kafka.wait_in_sync(&topic, Duration::from_secs(60)).expect("caught up");

    let leader = kafka.leader_of(&topic, 1).expect("leader");
    kafka.stop(leader).expect("controlled shutdown");
    assert_ne!(kafka.leader_of(&topic, 1).expect("leader"), leader, "leadership moved before the exit");
    written
        .extend(produce_numbered(&bootstrap, &topic, 600..700, |n| Some(format!("k{n}"))).expect("produce"));
    kafka.start(leader).expect("start again");

    let read =
        consume_all(&bootstrap, &topic, "replicated-check", 700, Duration::from_secs(60)).expect("all");
    assert_eq!(by_position(&read), by_position(&written));
}

/// The JVMs of a cluster die with the process that started it, even when that process is
/// killed with SIGKILL (no Drop runs): a child test process starts a node, the parent kills
/// the child, and the node's JVM must be gone.
#[test]
fn a_killed_test_process_leaves_no_broker_behind() {
    if std::env::var_os("KEEL_TESTKIT_ORPHAN_CHILD").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("test executable");
    let mut child = std::process::Command::new(exe)
        .args(["--exact", "orphan_child", "--ignored", "--nocapture"])
        .env("KEEL_TESTKIT_ORPHAN_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("child");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let pid: u32 = lines
        .find_map(|l| l.ok()?.strip_prefix("kafka pid ").map(|p| p.trim().parse().expect("pid")))
        .expect("the child printed its broker's pid");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    child.kill().expect("kill -9 the child");
    child.wait().expect("reap");
    wait_until("the orphaned broker to be killed", Duration::from_secs(30), || {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for init to reap it.
        Ok((state.is_empty() || state.contains(") Z ")).then_some(()))
    })
    .expect("no broker left behind");
}

/// Run only as the child of `a_killed_test_process_leaves_no_broker_behind`.
#[test]
#[ignore = "run by a_killed_test_process_leaves_no_broker_behind"]
fn orphan_child() {
    let kafka = Kafka::single().expect("kafka");
    println!("kafka pid {}", kafka.pid(1).expect("pid"));
    loop {
        std::thread::park();
    }
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

/// Cluster ids are valid for Kafka's storage tool: 22 base64url characters (16 bytes), never
/// starting with `-` (which the tool's argument parser takes for an option).
#[test]
fn cluster_ids_never_start_with_a_dash() {
    for _ in 0..5000 {
        let id = keel_testkit::new_cluster_id();
        assert_eq!(id.len(), 22, "{id}");
        assert!(!id.starts_with('-'), "{id}");
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{id}");
    }
}
