//! The exactly-once Kafka sink end to end on real Apache Kafka: real `keel` processes, a
//! `read_committed` reader of the output, and a fault in the middle of a steady stream.
//!
//! Each fault test proves the same claim for its fault: every input record is read exactly
//! once by a `read_committed` reader (0 lost, 0 duplicated). Apache Kafka hides the records of
//! aborted transactions from such a reader, so a duplicate here would be a record Keel
//! committed twice: the test fails on it. The input is written by an idempotent producer, so
//! it holds every number once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_testkit::{create_topic, unique_topic, Kafka};
use keel_tests::{Ha, Sandbox};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

const LONG: Duration = Duration::from_secs(120);

/// What a `read_committed` reader of `topic` sees: each number with how often it was read.
/// Reads until `done` holds for what was read, or `timeout`.
fn read_committed_until(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
    done: impl Fn(&BTreeMap<u64, usize>) -> bool,
) -> BTreeMap<u64, usize> {
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
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !done(&seen) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let text = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            if let Ok(n) = text.parse::<u64>() {
                *seen.entry(n).or_insert(0) += 1;
            }
        }
    }
    seen
}

fn spec(name: &str, bootstrap: &str, input: &str, output: &str, prefix: &str) -> String {
    format!(
        r#"name: {name}
parallelism: 2
config:
  execution.checkpointing.interval: 500 ms
sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: {bootstrap}
    properties.group.id: {name}
    scan.startup.mode: earliest-offset
sinks:
  - name: out
    connector: kafka
    topic: {output}
    properties.bootstrap.servers: {bootstrap}
    sink.delivery-guarantee: exactly-once
    sink.transactional-id-prefix: {prefix}
"#
    )
}

/// Writes the numbers `0..total` to `topic` (number `n` to partition `n % 2`), 100 every
/// 50 ms, with an idempotent producer that rides out broker failovers (each number is in the
/// input once). Returns when all are acknowledged.
fn steady_input(bootstrap: String, topic: String, total: u64) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("log_level", "3")
            .create()?;
        for start in (0..total).step_by(100) {
            for n in start..(start + 100).min(total) {
                let value = n.to_string();
                let mut record =
                    BaseRecord::<[u8], [u8]>::to(&topic).partition((n % 2) as i32).payload(value.as_bytes());
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            record = back;
                            producer.poll(Duration::from_millis(10));
                        }
                    }
                }
            }
            producer.flush(Duration::from_secs(120))?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })
}

/// A running exactly-once job (`eos`, parallelism 2, checkpoints every 500 ms) over a steady
/// numbered input, on a sandbox the caller started.
struct EosRun {
    bootstrap: String,
    output: String,
    total: u64,
    producer: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl EosRun {
    /// Creates the topics, submits the job, starts the input and waits until `warm` numbers
    /// were committed to the output (checkpoints complete).
    fn start(sb: &Sandbox, bootstrap: &str, total: u64, warm: usize) -> anyhow::Result<EosRun> {
        let (input, output) = (unique_topic("eos-in"), unique_topic("eos-out"));
        create_topic(bootstrap, &input, 2)?;
        create_topic(bootstrap, &output, 2)?;
        sb.run_spec("eos", &spec("eos", bootstrap, &input, &output, &unique_topic("eos-tx")), &[])?;
        sb.wait_job_state("eos", "running", LONG)?;
        let producer = Some(steady_input(bootstrap.to_string(), input, total));
        let run = EosRun { bootstrap: bootstrap.to_string(), output, total, producer };
        let first = read_committed_until(bootstrap, &run.output, 2, LONG, |s| s.len() >= warm);
        anyhow::ensure!(first.len() >= warm, "too little committed output before the fault: {}", first.len());
        Ok(run)
    }

    /// After the fault: waits for the whole input to be written, reads the output until every
    /// number came or `LONG` passed, then a little longer (a duplicate would show), and
    /// asserts that every number was read exactly once.
    fn check(mut self, fault: &str) -> anyhow::Result<()> {
        if let Some(p) = self.producer.take() {
            p.join().map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
        }
        let total = self.total;
        let mut seen =
            read_committed_until(&self.bootstrap, &self.output, 2, LONG, |s| s.len() as u64 >= total);
        // Anything after the last number would be a duplicate: a fresh reader, read to the end.
        let count: usize = seen.values().sum();
        let again = read_committed_until(&self.bootstrap, &self.output, 2, Duration::from_secs(3), |s| {
            s.values().sum::<usize>() > count
        });
        if again.values().sum::<usize>() > count {
            seen = again;
        }
        let lost: Vec<u64> = (0..total).filter(|n| !seen.contains_key(n)).collect();
        let duplicated: Vec<u64> = seen.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
        println!(
            "exactly-once, {fault}: {total} in, {} distinct out (read_committed), {} lost, {} duplicated",
            seen.len(),
            lost.len(),
            duplicated.len()
        );
        assert!(lost.is_empty(), "{fault}: lost {:?}", &lost[..lost.len().min(20)]);
        assert!(duplicated.is_empty(), "{fault}: duplicated {:?}", &duplicated[..duplicated.len().min(20)]);
        Ok(())
    }
}

/// A sandbox on the local HA backend: a ResourceManager, `jobmanagers` JobManagers and two
/// TaskManagers with 2 slots each.
fn sandbox(test: &str, jobmanagers: usize) -> anyhow::Result<Sandbox> {
    let mut sb = Sandbox::new(test, Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    for i in 1..=jobmanagers {
        sb.start("jobmanager", &format!("jm-{i}"), &[])?;
    }
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    sb.start("taskmanager", "tm-2", &["taskmanager.numberOfTaskSlots=2".into()])?;
    Ok(sb)
}

/// A TaskManager running subtask 0 is killed with SIGKILL mid-stream; the job restarts on
/// the other one from its latest checkpoint. Proves, for a `read_committed` reader: every
/// record exactly once. Transactions the dead task had pre-committed for a completed
/// checkpoint are written again from the spool and committed once; what it wrote after that
/// checkpoint is aborted (fenced by the new attempt's `init_transactions`) and hidden.
#[test]
fn exactly_once_across_a_taskmanager_kill() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let mut sb = sandbox("eos-tm-kill", 1)?;
    let run = EosRun::start(&sb, broker.bootstrap(), 4000, 800)?;
    let status = sb.status("eos")?;
    let attempt_before = max_attempt(&status);
    let victim = status["tasks"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["subtask"] == 0))
        .and_then(|t| t["taskmanager_address"].as_str())
        .unwrap_or_default()
        .to_string();
    let name = sb.by_address(&victim).map(|p| p.proc.name.clone());
    let name = name.ok_or_else(|| anyhow::anyhow!("no sandbox TaskManager at {victim:?}: {status}"))?;
    sb.proc(&name).proc.kill9();
    run.check("TaskManager kill -9")?;
    assert!(max_attempt(&sb.status("eos")?) > attempt_before, "the job restarted after the kill");
    Ok(())
}

/// The JobManager leader is killed with SIGKILL mid-stream; the standby takes over and adopts
/// the running tasks (or restarts them from the latest checkpoint). Proves, for a
/// `read_committed` reader: every record exactly once, and checkpoints (which commit the
/// transactions) complete again under the new leader, or the output could not be complete.
#[test]
fn exactly_once_across_a_jobmanager_leader_kill() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let mut sb = sandbox("eos-jm-kill", 2)?;
    let run = EosRun::start(&sb, broker.bootstrap(), 4000, 800)?;
    let cluster = sb.cluster()?;
    let leader = cluster["jobmanager"]["leader"].as_str().unwrap_or_default().to_string();
    let name = sb.by_address(&leader).map(|p| p.proc.name.clone());
    let name = name.ok_or_else(|| anyhow::anyhow!("leader {leader} is not a sandbox process: {cluster}"))?;
    sb.proc(&name).proc.kill9();
    run.check("JobManager leader kill -9")?;
    let after = sb.cluster()?;
    assert_ne!(after["jobmanager"]["leader"].as_str().unwrap_or_default(), leader, "a new leader: {after}");
    Ok(())
}

/// Three Kafka nodes (replication 3, `min.insync.replicas` 2); the node leading output
/// partition 0 is killed with SIGKILL mid-stream, while transactions are open on it. Proves,
/// for a `read_committed` reader: every record exactly once, whether the sink's producer rode
/// out the leader change or the task failed and was restored from its checkpoint.
#[test]
fn exactly_once_across_a_kill_of_the_output_partition_leader() -> anyhow::Result<()> {
    let kafka = Kafka::three()?;
    let sb = sandbox("eos-broker-kill", 1)?;
    let run = EosRun::start(&sb, kafka.bootstrap(), 4000, 800)?;
    let leader = kafka.leader_of(&run.output, 0)?;
    kafka.kill(leader)?;
    let result = run.check(&format!("kill -9 of Kafka node {leader}, leader of output partition 0"));
    if result.is_err() {
        sb.dump_logs();
    }
    result?;
    let status = sb.status("eos")?;
    println!("after the broker kill: job restarts {}", status["restarts"]);
    Ok(())
}

fn max_attempt(status: &serde_json::Value) -> u64 {
    status["tasks"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["attempt"].as_u64()).max().unwrap_or(0))
        .unwrap_or(0)
}

/// Submission checks of exactly-once: a second live job with the same
/// `sink.transactional-id-prefix` is refused naming the field and the job that uses it; an
/// exactly-once job without checkpointing is refused naming the delivery guarantee; two sinks
/// of one job with one prefix are refused. Nothing is submitted in those cases.
#[test]
fn a_second_job_with_the_same_transactional_id_prefix_is_refused() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("eos-in"), unique_topic("eos-out"));
    create_topic(&bootstrap, &input, 1)?;
    create_topic(&bootstrap, &output, 1)?;
    let mut sb = Sandbox::new("eos-prefix", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let prefix = unique_topic("shared-tx");
    sb.run_spec("first", &spec("first", &bootstrap, &input, &output, &prefix), &[])?;

    let err = sb
        .run_spec("second", &spec("second", &bootstrap, &input, &output, &prefix), &[])
        .expect_err("a second job with the same prefix must be refused")
        .to_string();
    assert!(err.contains("sinks[0].sink.transactional-id-prefix"), "{err}");
    assert!(err.contains("first"), "the error names the job using the prefix: {err}");

    let no_checkpoints = spec("third", &bootstrap, &input, &output, &unique_topic("tx"))
        .replace("config:\n  execution.checkpointing.interval: 500 ms\n", "");
    let err = sb.run_spec("third", &no_checkpoints, &[]).expect_err("no checkpointing").to_string();
    assert!(err.contains("sinks[0].sink.delivery-guarantee"), "{err}");
    assert!(err.contains("execution.checkpointing.interval"), "{err}");

    let twice = format!(
        "{}  - name: again\n    connector: kafka\n    from: in\n    topic: {output}\n    properties.bootstrap.servers: {bootstrap}\n    sink.delivery-guarantee: exactly-once\n    sink.transactional-id-prefix: own\n",
        spec("fourth", &bootstrap, &input, &output, "own")
    );
    let err = sb.run_spec("fourth", &twice, &[]).expect_err("two sinks, one prefix").to_string();
    assert!(err.contains("sinks[1].sink.transactional-id-prefix"), "{err}");

    let jobs = sb.keel_json(&["list"])?;
    let names: Vec<String> = jobs
        .as_array()
        .map(|a| a.iter().filter_map(|j| j["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["first".to_string()], "only the first job was submitted");
    Ok(())
}
