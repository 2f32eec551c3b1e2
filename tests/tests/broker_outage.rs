//! Kafka jobs across broker outages on a real three-node Apache Kafka cluster (KRaft, every
//! node broker and controller, replication factor 3, `min.insync.replicas` 2), real `keel`
//! processes. Each test has a cluster of its own: it kills nodes.
//!
//! The workload is numbered: the value of every input record is its number, partition
//! `n % 2`. A background thread produces numbers in chunks before, during and after the
//! outage (a chunk that fails is produced again, so the input itself may hold duplicates);
//! at the end every number must be in the output (0 lost). Duplicates are allowed (an
//! at-least-once sink, replay after a restart, producer retries) and are counted and printed.
//! Timings are printed, not asserted; run with `-- --nocapture` to see them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keel_testkit::{create_topic, produce, unique_topic, Kafka, Produce, TopicReader};
use keel_tests::{wait_until, Ha, Sandbox};

/// Generous bound for every wait (never reached when things work).
const LONG: Duration = Duration::from_secs(90);
/// Numbers produced before the job starts.
const BACKLOG: u64 = 10_000;
/// Numbers per produce call of the background workload, and the pause between calls.
const CHUNK: u64 = 200;
const CHUNK_PAUSE: Duration = Duration::from_millis(20);

fn cluster(test: &str) -> anyhow::Result<Sandbox> {
    let mut sb = Sandbox::new(test, Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    Ok(sb)
}

fn numbered(range: std::ops::Range<u64>) -> Vec<Produce> {
    range
        .map(|n| Produce { partition: Some((n % 2) as i32), value: n.to_string(), ..Produce::default() })
        .collect()
}

/// A kafka -> kafka pass-through job at parallelism 2, at-least-once, checkpoints every second.
/// `source_extra` / `sink_extra` are further option lines (indented like the others).
fn job_spec(
    name: &str,
    bootstrap: &str,
    input: &str,
    output: &str,
    source_extra: &str,
    sink_extra: &str,
) -> String {
    format!(
        r#"name: {name}
parallelism: 2
config:
  execution.checkpointing.interval: 1 s
sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: {bootstrap}
    properties.group.id: {name}-group
    scan.startup.mode: earliest-offset
{source_extra}sinks:
  - name: out
    connector: kafka
    from: in
    topic: {output}
    properties.bootstrap.servers: {bootstrap}
    sink.delivery-guarantee: at-least-once
{sink_extra}"#
    )
}

/// Numbers produced by a thread of its own, in chunks, until stopped. A chunk that fails (the
/// broker is down) is produced again until it is acknowledged.
struct Workload {
    /// The first number not yet acknowledged by the broker.
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<u64>>>,
}

impl Workload {
    fn start(bootstrap: &str, topic: &str, from: u64) -> Workload {
        let next = Arc::new(AtomicU64::new(from));
        let stop = Arc::new(AtomicBool::new(false));
        let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
        let (thread_next, thread_stop) = (next.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut retries = 0u64;
            while !thread_stop.load(Ordering::SeqCst) {
                let start = thread_next.load(Ordering::SeqCst);
                let deadline = Instant::now() + LONG;
                loop {
                    match produce(&bootstrap, &topic, numbered(start..start + CHUNK)) {
                        Ok(_) => break,
                        Err(e) if Instant::now() < deadline => {
                            retries += 1;
                            eprintln!("workload: chunk {start}.. failed, producing it again: {e:#}");
                        }
                        Err(e) => return Err(e.context(format!("producing chunk {start}.. for {LONG:?}"))),
                    }
                }
                thread_next.store(start + CHUNK, Ordering::SeqCst);
                // Pacing, not waiting for anything.
                std::thread::sleep(CHUNK_PAUSE);
            }
            Ok(retries)
        });
        Workload { next, stop, thread: Some(thread) }
    }

    fn next(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` numbers are acknowledged (the thread must still be running).
    fn wait_for(&self, n: u64) -> anyhow::Result<()> {
        wait_until(&format!("the workload to produce {n} numbers"), LONG, || {
            if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                return Ok(Some(Err(anyhow::anyhow!("the workload thread ended early at {}", self.next()))));
            }
            Ok((self.next() >= n).then_some(Ok(())))
        })?
    }

    /// Stops after the chunk in progress; returns the end of the produced range and how many
    /// chunks had to be produced again.
    fn finish(mut self) -> anyhow::Result<(u64, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        let retries = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result?,
            Some(Err(_)) => anyhow::bail!("the workload thread panicked"),
            None => 0,
        };
        Ok((self.next(), retries))
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// How often each number was seen on a topic.
#[derive(Default)]
struct Tally {
    counts: BTreeMap<u64, u32>,
    records: u64,
    /// Values that are not numbers.
    garbage: Vec<String>,
}

impl Tally {
    fn add(&mut self, records: impl IntoIterator<Item = keel_testkit::TestRecord>) {
        for r in records {
            self.records += 1;
            match r.number() {
                Some(n) => *self.counts.entry(n).or_default() += 1,
                None => self.garbage.push(r.value_str()),
            }
        }
    }

    /// Numbers of `0..end` never seen.
    fn missing(&self, end: u64) -> Vec<u64> {
        (0..end).filter(|n| !self.counts.contains_key(n)).collect()
    }

    /// Records beyond the first of each number.
    fn duplicates(&self) -> u64 {
        self.counts.values().map(|c| u64::from(c.saturating_sub(1))).sum()
    }

    fn max(&self) -> Option<u64> {
        self.counts.keys().next_back().copied()
    }
}

/// Reads `reader` into `tally` until every number of `0..end` was seen.
fn read_all(reader: &TopicReader, tally: &mut Tally, end: u64, what: &str) -> anyhow::Result<()> {
    wait_until(&format!("{what} to hold every number below {end}"), LONG, || {
        tally.add(reader.read_for(Duration::from_millis(300)));
        let missing = tally.missing(end);
        if missing.is_empty() {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!(
                "{} numbers missing (first {:?}), {} records read",
                missing.len(),
                &missing[..missing.len().min(5)],
                tally.records
            ))
        }
    })
}

/// Reads the output until it holds a number of at least `first`; returns how long that took.
fn time_until_output_reaches(
    reader: &TopicReader,
    tally: &mut Tally,
    first: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    wait_until(&format!("the output to hold a number >= {first}"), LONG, || {
        tally.add(reader.read_for(Duration::from_millis(50)));
        Ok(tally.max().is_some_and(|m| m >= first).then_some(()))
    })?;
    Ok(started.elapsed())
}

/// The job's attempts (per subtask) and restarts from `keel status`.
fn attempts(sb: &Sandbox, job: &str) -> anyhow::Result<(Vec<u64>, u64)> {
    let s = sb.status(job)?;
    let attempts = s["tasks"].as_array().map(|ts| ts.iter().filter_map(|t| t["attempt"].as_u64()).collect());
    Ok((attempts.unwrap_or_default(), s["restarts"].as_u64().unwrap_or(0)))
}

/// Final accounting: the output holds every input number; prints duplicates of input and output.
fn check_no_loss(
    bootstrap: &str,
    input: &str,
    out_reader: &TopicReader,
    mut out: Tally,
    end: u64,
) -> anyhow::Result<()> {
    read_all(out_reader, &mut out, end, "the output")?;
    // Whatever else the job still writes (replayed duplicates) arrives within the quiet time.
    out.add(out_reader.read_until_quiet(Duration::from_secs(3)));
    let in_reader = TopicReader::open(bootstrap, input, &unique_topic("input-check"))?;
    let mut inp = Tally::default();
    read_all(&in_reader, &mut inp, end, "the input")?;
    inp.add(in_reader.read_until_quiet(Duration::from_secs(2)));
    // Copies in the output beyond those in the input: what the job itself duplicated.
    let by_job: u64 = out
        .counts
        .iter()
        .map(|(n, c)| u64::from(c.saturating_sub(inp.counts.get(n).copied().unwrap_or(0))))
        .sum();
    println!(
        "input: {} records, {} numbers, {} duplicates (chunks produced again); output: {} records, \
         0 lost, {} duplicates, {by_job} of them beyond the input's",
        inp.records,
        inp.counts.len(),
        inp.duplicates(),
        out.records,
        out.duplicates()
    );
    assert!(out.garbage.is_empty(), "output values that are not numbers: {:?}", out.garbage);
    assert!(
        out.counts.keys().all(|n| inp.counts.contains_key(n)),
        "the output holds numbers that were never produced"
    );
    assert_eq!(out.missing(end), Vec::<u64>::new(), "numbers lost");
    Ok(())
}

/// One node of three, the leader of output partition 0, is killed with SIGKILL while a
/// checkpointed Kafka job runs, stays down while thousands of records pass, and comes back.
/// Proves: losing one broker of three fails no task: the clients follow the partitions' new
/// leaders (the job keeps its attempts and has no restart), and the output holds every input
/// number: 0 lost.
#[test]
fn losing_one_broker_of_three_fails_no_task() -> anyhow::Result<()> {
    let test_started = Instant::now();
    let kafka = Kafka::three()?;
    let bootstrap = kafka.bootstrap().to_string();
    let (input, output) = (unique_topic("outage-in"), unique_topic("outage-out"));
    create_topic(&bootstrap, &input, 2)?;
    create_topic(&bootstrap, &output, 2)?;
    kafka.wait_in_sync(&output, LONG)?;
    produce(&bootstrap, &input, numbered(0..BACKLOG))?;

    let sb = cluster("outage-one-of-three")?;
    sb.run_spec("one", &job_spec("one", &bootstrap, &input, &output, "", ""), &[])?;
    let out_reader = TopicReader::open(&bootstrap, &output, &unique_topic("output-check"))?;
    let mut out = Tally::default();
    read_all(&out_reader, &mut out, BACKLOG, "the output")?;
    let before = attempts(&sb, "one")?;

    let workload = Workload::start(&bootstrap, &input, BACKLOG);
    workload.wait_for(BACKLOG + 2_000)?;
    let victim = kafka.leader_of(&output, 0)?;
    kafka.kill(victim)?;
    let killed = Instant::now();
    // Down while records keep flowing through the two survivors.
    let first_after = workload.next();
    let took = time_until_output_reaches(&out_reader, &mut out, first_after + 3_000)?;
    println!(
        "node {victim} (leader of {output}/0) killed; output passed {} records later after {took:?}",
        3_000
    );
    kafka.start(victim)?;
    println!("node {victim} down {:?}", killed.elapsed());
    let first_after = workload.next();
    workload.wait_for(first_after + 2_000)?;
    let (end, retries) = workload.finish()?;
    println!("workload: 0..{end}, {retries} chunks produced again");

    check_no_loss(&bootstrap, &input, &out_reader, out, end)?;
    let after = attempts(&sb, "one")?;
    assert_eq!(after, before, "no task failed: the same attempts, no restart");
    println!("test took {:?}", test_started.elapsed());
    Ok(())
}

/// All three nodes killed with SIGKILL and kept down longer than the connector's timeouts
/// (5 s: `properties.default.api.timeout.ms`, `properties.message.timeout.ms`,
/// `properties.max.block.ms`) while a checkpointed Kafka job runs. Proves: the task fails with
/// an error naming the bootstrap servers (seen in `keel status`), the JobManager restarts the
/// job, and once the cluster is back the job runs again and its output holds every input
/// number: 0 lost (duplicates from the replay are counted).
#[test]
fn all_brokers_down_longer_than_the_timeout_fail_the_job_which_recovers_without_loss() -> anyhow::Result<()> {
    let test_started = Instant::now();
    let kafka = Kafka::three()?;
    let bootstrap = kafka.bootstrap().to_string();
    let (input, output) = (unique_topic("outage-in"), unique_topic("outage-out"));
    create_topic(&bootstrap, &input, 2)?;
    create_topic(&bootstrap, &output, 2)?;
    produce(&bootstrap, &input, numbered(0..BACKLOG))?;

    let sb = cluster("outage-all")?;
    let spec = job_spec(
        "all",
        &bootstrap,
        &input,
        &output,
        "    properties.default.api.timeout.ms: 5000\n",
        "    properties.message.timeout.ms: 5000\n    properties.max.block.ms: 5000\n",
    );
    // Restart every second for as long as the cluster is down (the default exponential delay
    // would be a minute apart by the time three JVMs have recovered their logs): the time
    // until output resumes is then the cluster's, not the backoff's.
    let spec = spec.replacen(
        "config:\n",
        "config:\n  restart-strategy.type: fixed-delay\n  restart-strategy.fixed-delay.attempts: 10000\n  \
         restart-strategy.fixed-delay.delay: 1 s\n",
        1,
    );
    sb.run_spec("all", &spec, &[])?;
    let out_reader = TopicReader::open(&bootstrap, &output, &unique_topic("output-check"))?;
    let mut out = Tally::default();
    read_all(&out_reader, &mut out, BACKLOG, "the output")?;
    let (_, restarts_before) = attempts(&sb, "all")?;

    let workload = Workload::start(&bootstrap, &input, BACKLOG);
    workload.wait_for(BACKLOG + 5_000)?;
    let ids = kafka.node_ids();
    for &id in &ids {
        kafka.kill(id)?;
    }
    let killed = Instant::now();
    let failure = wait_until("the job to fail naming the bootstrap servers", LONG, || {
        let s = sb.status("all")?;
        let text = format!("{} {}", s["status_message"], s["tasks"]);
        let restarted = s["restarts"].as_u64().unwrap_or(0) > restarts_before;
        let named = ids.iter().any(|&id| kafka.address(id).is_ok_and(|a| text.contains(&a)));
        Ok((restarted && named).then_some(s["status_message"].to_string()))
    })?;
    println!("failed {:?} after the kill: {failure}", killed.elapsed());
    kafka.start_all(&ids)?;
    let back = Instant::now();
    let first_after = workload.next();
    let took = time_until_output_reaches(&out_reader, &mut out, first_after)?;
    println!(
        "cluster down {:?}; output had a number produced after the restart {took:?} after the cluster was back",
        back - killed
    );
    workload.wait_for(first_after + 5_000)?;
    let (end, retries) = workload.finish()?;
    println!("workload: 0..{end}, {retries} chunks produced again");

    check_no_loss(&bootstrap, &input, &out_reader, out, end)?;
    let status = sb.wait_job_state("all", "running", LONG)?;
    let (attempts_after, restarts) = attempts(&sb, "all")?;
    println!(
        "restarts {restarts}, attempts {attempts_after:?}; status message: {}",
        status["status_message"]
    );
    assert!(restarts > restarts_before, "the job was restarted");
    println!("test took {:?}", test_started.elapsed());
    Ok(())
}
