//! What a drained Kafka source leaves in its consumer group, with real `keel` processes and
//! real Apache Kafka (the test binary's shared node from keel-testkit, or the cluster
//! `KEEL_TEST_KAFKA_BOOTSTRAP` names).

use std::collections::BTreeMap;
use std::time::Duration;

use keel_testkit::{committed_offsets, create_topic, produce_numbered, unique_topic, Kafka};
use keel_tests::{lines_in, wait_until, Ha, Sandbox};

const LONG: Duration = Duration::from_secs(120);

/// A `kafka -> file` job without periodic checkpoints is stopped with `keel stop`: its drain
/// savepoint is its only checkpoint, so only the drain can commit offsets to the consumer
/// group. Proves: the group's committed offsets become the savepoint's (the whole input) after
/// the stop. The draining source asks its reader for that commit and ends right away; the
/// reader used to exit without doing it (issue 13's suspicion, confirmed: the group then stayed
/// one checkpoint behind after every stop and upgrade).
#[test]
fn a_drained_kafka_source_commits_its_savepoint_offsets_to_the_group() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let input = unique_topic("drain-in");
    create_topic(&bootstrap, &input, 2)?;
    produce_numbered(&bootstrap, &input, 0..1000, |n| Some((n % 7).to_string()))?;
    let group = unique_topic("drain-group");

    let mut sb = Sandbox::new("drain-commit", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=1".into()])?;
    let out = sb.dir.join("out");
    let spec = format!(
        r#"name: drain
parallelism: 1
sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: {bootstrap}
    properties.group.id: {group}
    scan.startup.mode: earliest-offset
    format: raw
sinks:
  - name: out
    connector: file
    from: in
    path: {}
"#,
        out.display()
    );
    sb.run_spec("drain", &spec, &[])?;
    wait_until("the input in the output", LONG, || Ok((lines_in(&out) >= 1000).then_some(())))?;
    assert_eq!(
        committed_offsets(&bootstrap, &group, &input)?.values().flatten().count(),
        0,
        "no checkpoint yet"
    );

    let stopped = sb.keel_json(&["stop", "drain"])?;
    let path = stopped["path"].as_str().unwrap_or_default().to_string();
    let metadata: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut savepoint: BTreeMap<i32, Option<i64>> = BTreeMap::new();
    for entry in metadata["subtasks"][0]["state"]["sources"]["in"]["offsets"].as_array().into_iter().flatten()
    {
        let partition = entry[1].as_i64().and_then(|p| i32::try_from(p).ok());
        let (Some(partition), Some(offset)) = (partition, entry[2].as_i64()) else {
            anyhow::bail!("bad offset entry {entry} in {path}")
        };
        savepoint.insert(partition, Some(offset));
    }
    assert_eq!(savepoint.values().flatten().sum::<i64>(), 1000, "the savepoint covers the input: {metadata}");
    wait_until("the group to hold the savepoint's offsets", LONG, || {
        let committed = committed_offsets(&bootstrap, &group, &input)?;
        anyhow::ensure!(committed == savepoint, "committed {committed:?}, savepoint {savepoint:?}");
        Ok(Some(()))
    })?;
    Ok(())
}
