//! Kafka jobs end to end: real Apache Kafka (the test binary's shared node from keel-testkit,
//! or the cluster `KEEL_TEST_KAFKA_BOOTSTRAP` names), real `keel` processes.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_testkit::{
    add_partitions, committed_offsets, create_topic, group_offsets_by_kafka_admin, produce, read_exactly,
    unique_topic, Kafka, Produce,
};
use keel_tests::{wait_until, Ha, Sandbox};

const LONG: Duration = Duration::from_secs(90);

fn cluster(test: &str) -> anyhow::Result<Sandbox> {
    let mut sb = Sandbox::new(test, Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    Ok(sb)
}

/// Seed 002's first example: CSV rows `id,name,age` from topic `source` to topic `sink` through a
/// running cluster (kafka source, csv format with declared columns, kafka sink, at-least-once).
/// Proves: the output equals the input, row for row (as a multiset: two partitions), on a real
/// broker.
#[test]
fn csv_rows_flow_from_source_topic_to_sink_topic_unchanged() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (source, sink) = (unique_topic("source"), unique_topic("sink"));
    create_topic(&bootstrap, &source, 2)?;
    create_topic(&bootstrap, &sink, 2)?;
    let input: Vec<String> = (0..500).map(|i| format!("{i},name-{i},{}", 18 + i % 50)).collect();
    produce(
        &bootstrap,
        &source,
        input.iter().map(|v| Produce { value: v.clone(), ..Produce::default() }).collect(),
    )?;

    let sb = cluster("kafka-csv")?;
    let spec = format!(
        r#"name: csv-copy
parallelism: 2
sources:
  - name: people
    connector: kafka
    topic: {source}
    properties.bootstrap.servers: {bootstrap}
    properties.group.id: csv-copy
    scan.startup.mode: earliest-offset
    format: csv
    columns:
      - {{name: id, type: BIGINT}}
      - {{name: name, type: STRING}}
      - {{name: age, type: INT}}
sinks:
  - name: out
    connector: kafka
    topic: {sink}
    properties.bootstrap.servers: {bootstrap}
    format: csv
"#
    );
    sb.run_spec("csv-copy", &spec, &[])?;

    let mut output = read_exactly(&bootstrap, &sink, input.len(), LONG)?;
    let mut expected = input.clone();
    output.sort();
    expected.sort();
    assert_eq!(output, expected);
    Ok(())
}

/// A numbered workload through a job with checkpoints every 500 ms: after every record came out
/// and a later checkpoint completed, the job is canceled; more records are produced; the job is
/// run again with `--restore`. Proves: the restored job continues from the checkpoint's offsets
/// exactly: the output is every number once, no gap and no duplicate (at-least-once sink, no
/// failure in between, so nothing is replayed). Also proves offsets reach the consumer group
/// only through completed checkpoints: the group's committed offsets equal the input's end, as
/// read by a consumer and by Kafka's own Admin client.
#[test]
fn cancel_after_checkpoint_then_restore_continues_without_gap_or_duplicate() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("numbers"), unique_topic("copy"));
    create_topic(&bootstrap, &input, 2)?;
    create_topic(&bootstrap, &output, 1)?;
    let numbered = |range: std::ops::Range<u64>| -> Vec<Produce> {
        range
            .map(|n| Produce { partition: Some((n % 2) as i32), value: n.to_string(), ..Produce::default() })
            .collect()
    };
    produce(&bootstrap, &input, numbered(0..300))?;

    let sb = cluster("kafka-restore")?;
    let group = unique_topic("group");
    let spec = format!(
        r#"name: numbers
parallelism: 2
config:
  execution.checkpointing.interval: 500 ms
sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: {bootstrap}
    properties.group.id: {group}
    scan.startup.mode: earliest-offset
sinks:
  - name: out
    connector: kafka
    topic: {output}
    properties.bootstrap.servers: {bootstrap}
    sink.delivery-guarantee: at-least-once
"#
    );
    let path = sb.run_spec("numbers", &spec, &[])?;
    read_exactly(&bootstrap, &output, 300, LONG)?;
    // A checkpoint triggered after all 300 came out holds the end offsets.
    let after = sb.status("numbers")?["checkpoints"]
        .as_array()
        .and_then(|c| c.iter().filter_map(|c| c["id"].as_u64()).max())
        .unwrap_or(0);
    wait_until("a later checkpoint to complete", LONG, || {
        let s = sb.status("numbers")?;
        let done = s["checkpoints"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| c["id"].as_u64().unwrap_or(0) > after && c["state"] == "completed")
        });
        Ok(done.then_some(()))
    })?;
    let committed = wait_until("the group's offsets to reach the end", LONG, || {
        let c = committed_offsets(&bootstrap, &group, &input)?;
        Ok((c.values().all(|o| *o == Some(150))).then_some(c))
    })?;
    assert_eq!(committed, BTreeMap::from([(0, Some(150)), (1, Some(150))]));
    // The same, read independently by Kafka's own Admin client (kafka-consumer-groups).
    let by_admin = group_offsets_by_kafka_admin(&bootstrap, &group)?;
    assert_eq!(by_admin, BTreeMap::from([((input.clone(), 0), Some(150)), ((input.clone(), 1), Some(150))]));

    let cancel = sb.keel(&["cancel", "numbers"])?;
    assert!(cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
    produce(&bootstrap, &input, numbered(300..600))?;
    let run = sb.keel(&["run", "--restore", path.to_str().unwrap_or_default()])?;
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let out = read_exactly(&bootstrap, &output, 600, LONG)?;
    let mut numbers: Vec<u64> = out.iter().map(|v| v.parse()).collect::<Result<_, _>>()?;
    numbers.sort_unstable();
    assert_eq!(numbers, (0..600).collect::<Vec<u64>>(), "every number exactly once");
    Ok(())
}

/// Without checkpointing, a job that has processed every record commits nothing to its
/// consumer group. Proves offsets are committed only on checkpoint completion (auto-commit
/// off).
#[test]
fn offsets_are_not_committed_without_a_checkpoint() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("in"), unique_topic("out"));
    create_topic(&bootstrap, &input, 1)?;
    create_topic(&bootstrap, &output, 1)?;
    produce(
        &bootstrap,
        &input,
        (0..50).map(|n| Produce { value: n.to_string(), ..Produce::default() }).collect(),
    )?;
    let sb = cluster("kafka-nocommit")?;
    let group = unique_topic("group");
    let spec = format!(
        "name: nocommit\nsources:\n  - {{name: in, connector: kafka, topic: {input}, properties.bootstrap.servers: '{bootstrap}', properties.group.id: {group}, scan.startup.mode: earliest-offset}}\nsinks:\n  - {{name: out, connector: kafka, topic: {output}, properties.bootstrap.servers: '{bootstrap}'}}\n"
    );
    sb.run_spec("nocommit", &spec, &[])?;
    read_exactly(&bootstrap, &output, 50, LONG)?;
    let committed = committed_offsets(&bootstrap, &group, &input)?;
    assert_eq!(committed, BTreeMap::from([(0, None)]), "nothing committed without a checkpoint");
    Ok(())
}

/// A malformed JSON record: with `json.ignore-parse-errors: true` it is skipped (the good
/// records still come out), and without it the task fails with the topic, partition and offset
/// of the bad record in the job's status. Nothing panics.
#[test]
fn malformed_records_are_skipped_or_fail_naming_topic_partition_offset() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let input = unique_topic("json-in");
    let (skip_out, fail_out) = (unique_topic("skip-out"), unique_topic("fail-out"));
    for t in [&input, &skip_out, &fail_out] {
        create_topic(&bootstrap, t, 1)?;
    }
    let values = [r#"{"id": 1, "name": "a"}"#, "not json at all", r#"{"id": 3, "name": "c"}"#];
    produce(
        &bootstrap,
        &input,
        values.iter().map(|v| Produce { value: v.to_string(), ..Produce::default() }).collect(),
    )?;
    let sb = cluster("kafka-malformed")?;
    let spec = |name: &str, out: &str, ignore: bool| {
        format!(
            r#"name: {name}
sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: {bootstrap}
    scan.startup.mode: earliest-offset
    format: json
    json.ignore-parse-errors: {ignore}
    columns:
      - {{name: id, type: BIGINT}}
      - {{name: name, type: STRING}}
sinks:
  - name: out
    connector: kafka
    topic: {out}
    properties.bootstrap.servers: {bootstrap}
    format: csv
"#
        )
    };
    sb.run_spec("skip", &spec("skip", &skip_out, true), &[])?;
    let mut out = read_exactly(&bootstrap, &skip_out, 2, LONG)?;
    out.sort();
    assert_eq!(out, vec!["1,a".to_string(), "3,c".to_string()]);

    sb.run_spec("fail", &spec("fail", &fail_out, false), &["--detached"])?;
    let message = wait_until("the task failure to name the bad record", LONG, || {
        let s = sb.status("fail")?;
        let text = format!("{} {}", s["status_message"], s["tasks"]);
        Ok((text.contains("malformed")).then_some(text))
    })?;
    assert!(
        message.contains(&input) && message.contains("partition 0") && message.contains("offset 1"),
        "{message}"
    );
    Ok(())
}

/// A job whose broker cannot be reached fails its task after the client's timeout with an
/// error naming the bootstrap servers (shown by `keel status`), instead of hanging.
#[test]
fn unreachable_broker_is_named_in_the_job_status() -> anyhow::Result<()> {
    let sb = cluster("kafka-unreachable")?;
    let bootstrap = format!("127.0.0.1:{}", keel_testkit::free_port());
    let spec = format!(
        "name: nobroker\nsources:\n  - {{name: in, connector: kafka, topic: t, scan.startup.mode: earliest-offset, properties.bootstrap.servers: '{bootstrap}', properties.default.api.timeout.ms: '2000'}}\nsinks:\n  - {{name: out, connector: blackhole}}\n"
    );
    sb.run_spec("nobroker", &spec, &["--detached"])?;
    let message = wait_until("the failure to name the bootstrap servers", LONG, || {
        let s = sb.status("nobroker")?;
        let text = format!("{} {}", s["status_message"], s["tasks"]);
        Ok(text.contains(&bootstrap).then_some(text))
    })?;
    assert!(message.contains(&bootstrap), "{message}");
    Ok(())
}

/// Partition discovery while a job runs: a job reads `topic-pattern` with discovery every
/// second; a topic created afterwards that matches the pattern is picked up and read from its
/// earliest offset without restarting the job (same attempt).
#[test]
fn topics_matching_the_pattern_later_are_read_without_a_restart() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let prefix = unique_topic("disc");
    let (first, second, output) = (format!("{prefix}-a"), format!("{prefix}-b"), unique_topic("disc-out"));
    create_topic(&bootstrap, &first, 1)?;
    create_topic(&bootstrap, &output, 1)?;
    produce(
        &bootstrap,
        &first,
        (0..10).map(|n| Produce { value: n.to_string(), ..Produce::default() }).collect(),
    )?;
    let sb = cluster("kafka-discovery")?;
    let spec = format!(
        r#"name: discovery
sources:
  - name: in
    connector: kafka
    topic-pattern: '{prefix}-.*'
    properties.bootstrap.servers: {bootstrap}
    scan.startup.mode: earliest-offset
    scan.topic-partition-discovery.interval: 1 s
sinks:
  - name: out
    connector: kafka
    topic: {output}
    properties.bootstrap.servers: {bootstrap}
"#
    );
    sb.run_spec("discovery", &spec, &[])?;
    read_exactly(&bootstrap, &output, 10, LONG)?;
    let attempt = sb.status("discovery")?["tasks"][0]["attempt"].clone();

    create_topic(&bootstrap, &second, 1)?;
    produce(
        &bootstrap,
        &second,
        (10..20).map(|n| Produce { value: n.to_string(), ..Produce::default() }).collect(),
    )?;
    let out = read_exactly(&bootstrap, &output, 20, LONG)?;
    let mut numbers: Vec<u64> = out.iter().map(|v| v.parse()).collect::<Result<_, _>>()?;
    numbers.sort_unstable();
    assert_eq!(numbers, (0..20).collect::<Vec<u64>>());
    let after = sb.status("discovery")?;
    assert_eq!(after["tasks"][0]["attempt"], attempt, "no restart");
    assert_eq!(after["restarts"], 0);
    Ok(())
}

/// Partitions added to an existing topic while a job reads it (Kafka's CreatePartitions): a
/// job at parallelism 2 reads a 2-partition topic with discovery every second; the topic grows
/// to 3 partitions and records go to the new one. Proves: the new partition is read from its
/// earliest offset (its first records, produced before the job could have seen it, are not
/// skipped) by the running tasks, with no restart (same attempt, 0 restarts), nothing read
/// twice, and `keel status` warns that 3 partitions spread unevenly over 2 subtasks.
#[test]
fn partitions_added_to_a_topic_are_read_from_earliest_without_a_restart() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("grow"), unique_topic("grow-out"));
    create_topic(&bootstrap, &input, 2)?;
    create_topic(&bootstrap, &output, 1)?;
    let to = |partition: i32, range: std::ops::Range<u64>| -> Vec<Produce> {
        range
            .map(|n| Produce { partition: Some(partition), value: n.to_string(), ..Produce::default() })
            .collect()
    };
    produce(&bootstrap, &input, to(0, 0..10))?;
    produce(&bootstrap, &input, to(1, 10..20))?;
    let sb = cluster("kafka-added-partitions")?;
    let spec = format!(
        r#"name: grow
parallelism: 2
sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: {bootstrap}
    scan.startup.mode: earliest-offset
    scan.topic-partition-discovery.interval: 1 s
sinks:
  - name: out
    connector: kafka
    topic: {output}
    properties.bootstrap.servers: {bootstrap}
"#
    );
    sb.run_spec("grow", &spec, &[])?;
    read_exactly(&bootstrap, &output, 20, LONG)?;
    let attempts = |s: &serde_json::Value| -> Vec<serde_json::Value> {
        s["tasks"].as_array().map(|ts| ts.iter().map(|t| t["attempt"].clone()).collect()).unwrap_or_default()
    };
    let before = attempts(&sb.status("grow")?);

    add_partitions(&bootstrap, &input, 3)?;
    // Produced at once, before discovery can have seen the partition: read from earliest.
    produce(&bootstrap, &input, to(2, 1000..1050))?;
    let out = read_exactly(&bootstrap, &output, 70, LONG)?;
    let mut new: Vec<u64> = out.iter().filter_map(|v| v.parse().ok()).filter(|n| *n >= 1000).collect();
    new.sort_unstable();
    assert_eq!(new, (1000..1050).collect::<Vec<u64>>(), "the new partition, from its first record, once");

    let after = wait_until("status to warn about the uneven spread", LONG, || {
        let s = sb.status("grow")?;
        Ok((!s["warnings"].as_array().is_none_or(Vec::is_empty)).then_some(s))
    })?;
    let warning = after["warnings"][0].as_str().unwrap_or_default().to_string();
    assert!(warning.contains(&input) && warning.contains("3 partitions over parallelism 2"), "{warning}");
    assert_eq!(attempts(&after), before, "no task restarted");
    assert_eq!(after["restarts"], 0);
    Ok(())
}
