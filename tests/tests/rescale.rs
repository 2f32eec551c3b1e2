//! Rescales of a job whose source is not Kafka: the README's demo job shape (a `datagen`
//! sequence) rescaled with `keel rescale`, and stopped then restored at another parallelism with
//! `keel run --from-savepoint`. Real `keel` processes and real Apache Kafka (the test binary's
//! shared node from keel-testkit, or the cluster `KEEL_TEST_KAFKA_BOOTSTRAP` names).
//!
//! The sink is Kafka with `sink.delivery-guarantee: exactly-once`, read `read_committed`: there,
//! "no repeat" is the contract (a file or at-least-once sink may legitimately repeat what
//! followed the last checkpoint). The datagen source is bounded (`number-of-rows`), so the job
//! finishes by itself and the whole output can be compared with the whole sequence.

use std::collections::BTreeMap;
use std::time::Duration;

use std::time::Instant;

use keel_testkit::{create_topic, partition_count, unique_topic, watermarks, Kafka};
use keel_tests::{Ha, Sandbox};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

const LONG: Duration = Duration::from_secs(120);
/// Numbers the datagen source emits (0 .. ROWS), at RATE per second over all subtasks: about
/// 30 s, long enough for the rescales to happen mid-sequence.
const ROWS: u64 = 6000;
const RATE: u32 = 200;

/// The demo job's shape (`deploy/demo-job.yaml`, a datagen sequence), bounded, into an
/// exactly-once Kafka sink as JSON (`{"id": n}`).
fn spec(name: &str, parallelism: u32, bootstrap: &str, topic: &str, prefix: &str) -> String {
    format!(
        r#"name: {name}
parallelism: {parallelism}
maxParallelism: 128
config:
  execution.checkpointing.interval: 500 ms
sources:
  - name: numbers
    connector: datagen
    rows-per-second: {RATE}
    number-of-rows: {ROWS}
sinks:
  - name: out
    connector: kafka
    from: numbers
    topic: {topic}
    properties.bootstrap.servers: {bootstrap}
    sink.delivery-guarantee: exactly-once
    sink.transactional-id-prefix: {prefix}
    format: json
"#
    )
}

/// How often each number came out, read `read_committed` from the beginning of every partition.
struct Output {
    consumer: BaseConsumer,
    bootstrap: String,
    topic: String,
    partitions: i32,
    counts: BTreeMap<i64, usize>,
    read: usize,
}

impl Output {
    fn open(bootstrap: &str, topic: &str) -> anyhow::Result<Output> {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique_topic("check"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()?;
        let partitions = i32::try_from(partition_count(bootstrap, topic)?)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(Output {
            consumer,
            bootstrap: bootstrap.to_string(),
            topic: topic.to_string(),
            partitions,
            counts: BTreeMap::new(),
            read: 0,
        })
    }

    /// Polls once (up to 100 ms), counting the record read, if any.
    fn poll(&mut self) -> anyhow::Result<()> {
        match self.consumer.poll(Duration::from_millis(100)) {
            None | Some(Err(_)) => Ok(()),
            Some(Ok(m)) => {
                let text = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                let value: serde_json::Value = serde_json::from_str(&text)?;
                let id =
                    value["id"].as_i64().ok_or_else(|| anyhow::anyhow!("no id in output record {text:?}"))?;
                *self.counts.entry(id).or_insert(0) += 1;
                self.read += 1;
                Ok(())
            }
        }
    }

    /// Reads until at least `n` records were read, or fails after `LONG`.
    fn read_until(&mut self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + LONG;
        while self.read < n {
            anyhow::ensure!(Instant::now() < deadline, "output: {} records after {LONG:?}", self.read);
            self.poll()?;
        }
        Ok(())
    }

    /// Reads everything the topic holds, once every writer is done (the job finished: its
    /// transactions are committed, so the last stable offset is the high watermark): until the
    /// consumer's position reaches the high watermark of every partition (librdkafka moves the
    /// position past transaction markers too). Fails after `LONG`, e.g. if a transaction were
    /// left open.
    fn read_to_end(&mut self) -> anyhow::Result<()> {
        let mut high = Vec::new();
        for p in 0..self.partitions {
            let (_, h) = watermarks(&self.bootstrap, &self.topic, p)?;
            high.push((p, h));
        }
        let deadline = Instant::now() + LONG;
        loop {
            let position = self.consumer.position()?;
            let behind: Vec<(i32, i64, i64)> = high
                .iter()
                .filter_map(|(p, h)| {
                    let at = match position.find_partition(&self.topic, *p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        _ => 0,
                    };
                    (at < *h).then_some((*p, at, *h))
                })
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "output not read to its end after {LONG:?}: (partition, position, high watermark) {behind:?}"
            );
            self.poll()?;
        }
    }

    /// Asserts the output holds every number of `0 .. ROWS` exactly once.
    fn assert_exactly_the_sequence(&self, what: &str) {
        let missing: Vec<i64> = (0..ROWS as i64).filter(|n| !self.counts.contains_key(n)).collect();
        let repeated: Vec<(i64, usize)> =
            self.counts.iter().filter(|(_, c)| **c > 1).map(|(n, c)| (*n, *c)).collect();
        let foreign: Vec<i64> =
            self.counts.keys().copied().filter(|n| !(0..ROWS as i64).contains(n)).collect();
        println!(
            "{what}: {} records read, {} distinct of {ROWS}, {} missing, {} repeated",
            self.read,
            self.counts.len(),
            missing.len(),
            repeated.len()
        );
        assert!(missing.is_empty(), "{what}: gap, missing {:?}", &missing[..missing.len().min(20)]);
        assert!(repeated.is_empty(), "{what}: repeated {:?}", &repeated[..repeated.len().min(20)]);
        assert!(foreign.is_empty(), "{what}: numbers outside the sequence {foreign:?}");
        assert_eq!(self.read, ROWS as usize, "{what}");
    }
}

fn cluster(test: &str) -> anyhow::Result<Sandbox> {
    let mut sb = Sandbox::new(test, Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=3".into()])?;
    sb.start("taskmanager", "tm-2", &["taskmanager.numberOfTaskSlots=3".into()])?;
    Ok(sb)
}

/// The demo job (a datagen sequence) rescaled 1 -> 3 -> 2 with `keel rescale` while it runs
/// (each a handover from a drain savepoint whose datagen splits the JobManager redistributes),
/// then left to finish its bounded sequence. Proves: every rescale is accepted, and a
/// `read_committed` reader of the output sees every number of the sequence exactly once: no
/// gap, no repeat.
#[test]
fn the_demo_job_rescales_1_3_2_with_no_gap_and_no_repeat() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let topic = unique_topic("rescale-out");
    create_topic(&bootstrap, &topic, 3)?;
    let prefix = unique_topic("rescale-tx");
    let sb = cluster("rescale-datagen")?;
    sb.run_spec("demo", &spec("demo", 1, &bootstrap, &topic, &prefix), &[])?;
    let mut out = Output::open(&bootstrap, &topic)?;
    out.read_until(500)?;

    for (parallelism, seen) in [(3u32, 1000usize), (2, 1500)] {
        let result = sb.keel_json(&["rescale", "demo", "--parallelism", &parallelism.to_string()])?;
        assert_eq!(result["error"], "", "rescale to {parallelism}: {result}");
        let status = sb.status("demo")?;
        assert_eq!(status["job"]["parallelism"], parallelism, "{status}");
        println!(
            "rescaled to {parallelism}: version {} -> {}, pause {} ms, {} records read before",
            result["from_version"], result["to_version"], result["pause_ms"], out.read
        );
        // The new version writes before the next step.
        out.read_until(seen)?;
    }
    let status = sb.status("demo")?;
    assert!(out.read < ROWS as usize, "the sequence ended before the last rescale took effect: {status}");
    sb.wait_job_state("demo", "finished", LONG)?;
    out.read_to_end()?;
    out.assert_exactly_the_sequence("datagen rescaled 1 -> 3 -> 2");
    Ok(())
}

/// A datagen job of parallelism 2 stopped with `keel stop` (a drain savepoint) and run again
/// from that savepoint at parallelism 3 with `keel run --from-savepoint`. Proves: the restore
/// at another parallelism is accepted, and a `read_committed` reader sees the whole bounded
/// sequence exactly once across the stop and the restore: no gap, no repeat.
#[test]
fn stop_then_run_from_the_savepoint_at_another_parallelism_continues_a_datagen_job() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let topic = unique_topic("restore-out");
    create_topic(&bootstrap, &topic, 3)?;
    let prefix = unique_topic("restore-tx");
    let sb = cluster("restore-datagen")?;
    sb.run_spec("gen", &spec("gen", 2, &bootstrap, &topic, &prefix), &[])?;
    let mut out = Output::open(&bootstrap, &topic)?;
    out.read_until(1000)?;

    let stopped = sb.keel_json(&["stop", "gen"])?;
    let path = stopped["path"].as_str().unwrap_or_default().to_string();
    assert!(std::path::Path::new(&path).is_file(), "savepoint metadata at {path}: {stopped}");
    assert_eq!(sb.status("gen")?["job"]["state"], "finished", "stopped: {stopped}");
    // Everything up to the savepoint is committed, and the job wrote nothing after it.
    out.read_to_end()?;
    let before = out.read;
    assert!(before < ROWS as usize, "the sequence ended before the stop");

    sb.run_spec(
        "gen-again",
        &spec("gen-again", 3, &bootstrap, &topic, &prefix),
        &["--from-savepoint", &path],
    )?;
    let status = sb.status("gen-again")?;
    assert_eq!(status["job"]["parallelism"], 3, "{status}");
    sb.wait_job_state("gen-again", "finished", LONG)?;
    out.read_to_end()?;
    println!("stopped at savepoint {} after {before} records", stopped["savepoint_id"]);
    out.assert_exactly_the_sequence("datagen stopped at parallelism 2, restored at 3");
    Ok(())
}
