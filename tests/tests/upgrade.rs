//! Versioned upgrades end to end: handovers, rescales, savepoints and history, with real
//! `keel` processes and real Apache Kafka (the test binary's shared node from keel-testkit, or
//! the cluster `KEEL_TEST_KAFKA_BOOTSTRAP` names).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_testkit::{create_topic, produce, unique_topic, Kafka, Produce, TestRecord, TopicReader};
use keel_tests::{on_backends, Backend, Ha, Sandbox};

const LONG: Duration = Duration::from_secs(120);
const KEYS: u64 = 10;

/// A numbered, keyed workload: record `n` has key `n % KEYS` and value `k,n`.
fn record(n: u64) -> Produce {
    let k = n % KEYS;
    Produce { key: Some(k.to_string()), value: format!("{k},{n}"), ..Produce::default() }
}

fn spec(name: &str, bootstrap: &str, input: &str, output: &str, parallelism: u32, variant: u32) -> String {
    format!(
        r#"name: {name}
parallelism: {parallelism}
maxParallelism: 4
config:
  execution.checkpointing.interval: {interval} ms
sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: {bootstrap}
    properties.group.id: {name}
    scan.startup.mode: earliest-offset
    format: csv
    columns:
      - {{name: k, type: INT}}
      - {{name: n, type: BIGINT}}
sinks:
  - name: out
    connector: kafka
    topic: {output}
    properties.bootstrap.servers: {bootstrap}
    properties.linger.ms: {linger}
    format: csv
    key.fields: k
    key.format: csv
    sink.delivery-guarantee: at-least-once
"#,
        interval = 400 + 100 * (variant % 2),
        linger = 5 * (variant % 2),
    )
}

/// `spec` with the exactly-once sink (transactions committed on checkpoints, `prefix` as the
/// transactional-id prefix, the same in every version of the job).
fn exactly_once(spec: String, prefix: &str) -> String {
    spec.replace(
        "sink.delivery-guarantee: at-least-once\n",
        &format!("sink.delivery-guarantee: exactly-once\n    sink.transactional-id-prefix: {prefix}\n"),
    )
}

/// Starts a producer thread writing `chunk` records every `every` until `stop` (one
/// producer for the whole run, each chunk flushed); `written` counts the records acknowledged.
fn steady_producer(
    bootstrap: String,
    topic: String,
    chunk: u64,
    every: Duration,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    std::thread::spawn(move || {
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "5")
            .set("log_level", "3")
            .create()?;
        let mut next = 0;
        while !stop.load(Ordering::SeqCst) {
            for n in next..next + chunk {
                let r = record(n);
                let key = r.key.unwrap_or_default();
                let mut rec = BaseRecord::<str, str>::to(&topic).key(&key).payload(&r.value);
                loop {
                    match producer.send(rec) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            rec = back;
                            producer.poll(Duration::from_millis(10));
                        }
                    }
                }
            }
            producer.flush(Duration::from_secs(30))?;
            next += chunk;
            written.store(next, Ordering::SeqCst);
            std::thread::sleep(every);
        }
        Ok(())
    })
}

/// Everything read from the output so far.
struct Output {
    reader: TopicReader,
    records: Vec<TestRecord>,
}

impl Output {
    fn open(bootstrap: &str, topic: &str) -> anyhow::Result<Output> {
        Ok(Output {
            reader: TopicReader::open(bootstrap, topic, &unique_topic("check"))?,
            records: Vec::new(),
        })
    }

    fn len(&self) -> usize {
        self.records.len()
    }

    /// Reads until `done` holds for everything read, or fails after `timeout`.
    fn read_until(&mut self, timeout: Duration, done: impl Fn(&[TestRecord]) -> bool) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while !done(&self.records) {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("output: {} records after {timeout:?}", self.records.len());
            }
            if let Some(r) = self.reader.poll(Duration::from_millis(100)) {
                self.records.push(r);
            }
        }
        Ok(())
    }
}

/// What the output says about a numbered input of `total` records: per number how often it
/// came out, and the keys whose numbers came out of order (within one output partition).
struct Checked {
    counts: BTreeMap<u64, usize>,
    out_of_order: Vec<u64>,
}

fn check_output(out: &mut Output, total: u64) -> anyhow::Result<Checked> {
    out.read_until(LONG, |all| all.len() as u64 >= total)?;
    // Anything beyond the input is a duplicate: give it a moment to show.
    let extra = out.reader.read_for(Duration::from_secs(2));
    out.records.extend(extra);
    let records = &out.records;
    let mut counts = BTreeMap::new();
    let mut last: BTreeMap<(i32, u64), u64> = BTreeMap::new();
    let mut out_of_order = Vec::new();
    for r in records {
        let text = r.value_str();
        let mut parts = text.split(',');
        let (Some(k), Some(n)) = (parts.next(), parts.next()) else {
            anyhow::bail!("bad output record {text:?}")
        };
        let (k, n): (u64, u64) = (k.parse()?, n.parse()?);
        *counts.entry(n).or_insert(0) += 1;
        if let Some(prev) = last.insert((r.partition, k), n) {
            if prev > n {
                out_of_order.push(k);
            }
        }
    }
    Ok(Checked { counts, out_of_order })
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return -1;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A keyed, numbered workload runs continuously (a steady load, its rate printed) through 10
/// consecutive handover upgrades that alternate spec changes and rescales (1 -> 2 -> 3 -> 1 ...),
/// through the exactly-once sink. Proves: a `read_committed` reader of the output sees the input
/// exactly — no record lost, none duplicated (each old version's last transactions commit at
/// its drain savepoint, and the new version's producers, with the same transactional ids,
/// neither fence them early nor write anything twice) — and per key the order is kept. Prints
/// the output pause of each handover (p50/p99) and the time of each upgrade.
#[test]
fn ten_handovers_with_rescales_keep_output_equal_to_input() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("up-in"), unique_topic("up-out"));
    create_topic(&bootstrap, &input, 6)?;
    create_topic(&bootstrap, &output, 3)?;

    let mut sb = Sandbox::new("upgrade-10", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=4".into()])?;
    sb.start("taskmanager", "tm-2", &["taskmanager.numberOfTaskSlots=4".into()])?;
    let prefix = unique_topic("numbers-tx");
    sb.run_spec("numbers", &exactly_once(spec("numbers", &bootstrap, &input, &output, 1, 0), &prefix), &[])?;
    sb.wait_job_state("numbers", "running", LONG)?;

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let producer = steady_producer(
        bootstrap.clone(),
        input.clone(),
        250,
        Duration::from_millis(50),
        stop.clone(),
        written.clone(),
    );
    let load_started = std::time::Instant::now();
    let mut reader = Output::open(&bootstrap, &output)?;
    reader.read_until(LONG, |all| all.len() >= 500)?;

    let plan: [(u32, bool); 10] = [
        (1, false),
        (2, true),
        (2, false),
        (3, true),
        (3, false),
        (1, true),
        (1, false),
        (2, true),
        (2, false),
        (1, true),
    ];
    let mut pauses = Vec::new();
    let mut totals = Vec::new();
    for (i, (parallelism, rescale)) in plan.iter().enumerate() {
        let result = if *rescale {
            sb.keel_json(&["rescale", "numbers", "--parallelism", &parallelism.to_string()])?
        } else {
            let yaml = exactly_once(
                spec("numbers", &bootstrap, &input, &output, *parallelism, i as u32 + 1),
                &prefix,
            );
            let path = sb.write_spec(&format!("numbers-{i}"), &yaml)?;
            sb.keel_json(&["upgrade", "numbers", path.to_str().unwrap_or_default()])?
        };
        assert_eq!(result["error"], "", "upgrade {i} failed: {result}");
        let pause = result["pause_ms"].as_i64().unwrap_or(-1);
        let total = result["total_ms"].as_i64().unwrap_or(-1);
        println!(
            "upgrade {} ({}, parallelism {parallelism}): version {} -> {}, pause {pause} ms, total {total} ms",
            i + 1,
            if *rescale { "rescale" } else { "spec change" },
            result["from_version"],
            result["to_version"]
        );
        pauses.push(pause);
        totals.push(total);
        let status = sb.status("numbers")?;
        assert_eq!(status["job"]["parallelism"], *parallelism, "{status}");
        // Some output of the new version before the next upgrade.
        let seen = reader.len();
        reader.read_until(LONG, |all| all.len() >= seen + 200)?;
    }
    stop.store(true, Ordering::SeqCst);
    producer.join().map_err(|_| anyhow::anyhow!("producer panicked"))??;
    let total = written.load(Ordering::SeqCst);
    let rate = total as f64 / load_started.elapsed().as_secs_f64();

    let checked = check_output(&mut reader, total)?;
    let lost: Vec<u64> = (0..total).filter(|n| !checked.counts.contains_key(n)).collect();
    let duplicated: Vec<u64> = checked.counts.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
    let history = sb.keel_json(&["history", "numbers"])?;
    let versions = history["versions"].as_array().map(Vec::len).unwrap_or(0);
    let mut sorted = pauses.clone();
    sorted.sort_unstable();
    println!(
        "10 handovers under a steady {rate:.0} records/s: {total} in, {} distinct out, {} lost, {} duplicated, \
         {} out of order; pause p50 {} ms, p99 {} ms, max {} ms; upgrade total {:?} ms; {versions} versions",
        checked.counts.len(),
        lost.len(),
        duplicated.len(),
        checked.out_of_order.len(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(-1),
        totals
    );
    assert!(lost.is_empty(), "lost: {:?}", &lost[..lost.len().min(20)]);
    assert!(duplicated.is_empty(), "duplicated: {:?}", &duplicated[..duplicated.len().min(20)]);
    assert!(checked.out_of_order.is_empty(), "keys out of order: {:?}", checked.out_of_order);
    assert_eq!(versions, 11, "{history}");
    Ok(())
}

/// Savepoints and stop: `keel savepoint` leaves the job running; `keel rescale` above
/// maxParallelism is refused naming it; `keel stop` drains the job at a savepoint and finishes
/// it; records produced while it is stopped are read by `keel run --from-savepoint` at another
/// parallelism. The sink is exactly-once. Proves: a `read_committed` reader sees the input
/// exactly (no gap, no duplicate) across the stop and the restart from the savepoint (the
/// stop's final transactions are committed, none is left open), and `keel history` shows the
/// savepoint the version ended with.
#[test]
fn stop_with_savepoint_then_run_from_it_continues_exactly() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("sp-in"), unique_topic("sp-out"));
    create_topic(&bootstrap, &input, 4)?;
    create_topic(&bootstrap, &output, 2)?;
    produce(&bootstrap, &input, (0..1000).map(record).collect())?;

    let mut sb = Sandbox::new("savepoint", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=4".into()])?;
    let prefix = unique_topic("sp-tx");
    let versioned = |p: u32| exactly_once(spec("sp", &bootstrap, &input, &output, p, 0), &prefix);
    sb.run_spec("sp", &versioned(2), &[])?;
    let mut out = Output::open(&bootstrap, &output)?;
    out.read_until(LONG, |all| all.len() >= 1000)?;

    let sp = sb.keel_json(&["savepoint", "sp"])?;
    let sp_path = sp["path"].as_str().unwrap_or_default().to_string();
    assert!(std::path::Path::new(&sp_path).is_file(), "savepoint metadata at {sp_path}: {sp}");
    assert_eq!(sb.status("sp")?["job"]["state"], "running", "a savepoint leaves the job running");

    let refused = sb.keel(&["rescale", "sp", "--parallelism", "5"])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("maxParallelism"), "{stderr}");

    produce(&bootstrap, &input, (1000..1500).map(record).collect())?;
    out.read_until(LONG, |all| all.len() >= 1500)?;
    let stopped = sb.keel_json(&["stop", "sp"])?;
    let stop_path = stopped["path"].as_str().unwrap_or_default().to_string();
    let stop_id = stopped["savepoint_id"].as_u64().unwrap_or(0);
    assert_eq!(sb.status("sp")?["job"]["state"], "finished", "stopped: {stopped}");
    let history = sb.keel_json(&["history", "sp"])?;
    assert_eq!(history["versions"][0]["ended_with"]["checkpoint_id"], stop_id, "{history}");

    produce(&bootstrap, &input, (1500..2000).map(record).collect())?;
    sb.run_spec("sp-again", &versioned(3), &["--from-savepoint", &stop_path])?;
    let checked = check_output(&mut out, 2000)?;
    let lost: Vec<u64> = (0..2000).filter(|n| !checked.counts.contains_key(n)).collect();
    let duplicated: Vec<u64> = checked.counts.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
    println!(
        "stop at savepoint {stop_id}, run from it at parallelism 3: {} distinct of 2000, {} lost, {} duplicated",
        checked.counts.len(),
        lost.len(),
        duplicated.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    assert!(checked.out_of_order.is_empty(), "out of order: {:?}", checked.out_of_order);
    Ok(())
}

/// The health gate: a new version that fails to start (its added file sink cannot create its
/// directory: a file is in the way) is rolled back automatically to the old version from the
/// drain savepoint; `keel upgrade` fails saying so, `keel status` says why, the history shows
/// the new version failed. Then a good version 3 is deployed and `keel rollback` goes back to
/// version 1's spec (as version 4). Proves: the output still equals the input exactly (the
/// failed version wrote nothing, the old version continues at the savepoint's cut, and the
/// requested rollback is a clean handover: no gap, no duplicate).
#[test]
fn a_new_version_that_fails_to_start_rolls_back_automatically() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("rb-in"), unique_topic("rb-out"));
    create_topic(&bootstrap, &input, 2)?;
    create_topic(&bootstrap, &output, 2)?;
    produce(&bootstrap, &input, (0..1000).map(record).collect())?;

    let mut sb = Sandbox::new("rollback", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=4".into()])?;
    sb.run_spec("rb", &spec("rb", &bootstrap, &input, &output, 2, 0), &[])?;
    let mut out = Output::open(&bootstrap, &output)?;
    out.read_until(LONG, |all| all.len() >= 1000)?;

    let blocker = sb.dir.join("not-a-directory");
    std::fs::write(&blocker, "a file where the sink wants a directory")?;
    let broken = format!(
        "{}  - name: audit\n    connector: file\n    from: in\n    path: {}\n",
        spec("rb", &bootstrap, &input, &output, 2, 1),
        blocker.join("sub").display()
    );
    let path = sb.write_spec("rb-broken", &broken)?;
    let upgrade = sb.keel(&["upgrade", "rb", path.to_str().unwrap_or_default()])?;
    let stdout = String::from_utf8_lossy(&upgrade.stdout);
    let stderr = String::from_utf8_lossy(&upgrade.stderr);
    println!("keel upgrade (expected to fail):\n{stdout}{stderr}");
    assert!(!upgrade.status.success(), "the broken upgrade must fail");
    assert!(stderr.contains("rolled back to version 1"), "{stderr}");

    let status = sb.wait_job_state("rb", "running", LONG)?;
    assert_eq!(status["job"]["active_version"], 1, "{status}");
    assert!(
        status["status_message"].as_str().unwrap_or_default().contains("rolled back")
            || sb.keel_json(&["history", "rb"])?["versions"][1]["state"] == "failed",
        "{status}"
    );
    let history = sb.keel_json(&["history", "rb"])?;
    assert_eq!(history["versions"][1]["state"], "failed", "{history}");

    produce(&bootstrap, &input, (1000..1500).map(record).collect())?;
    out.read_until(LONG, |all| all.len() >= 1500)?;
    let good = sb.write_spec("rb-good", &spec("rb", &bootstrap, &input, &output, 1, 1))?;
    let t = std::time::Instant::now();
    let v3 = sb.keel_json(&["upgrade", "rb", good.to_str().unwrap_or_default()])?;
    println!("v3 upgrade took {:?}: {v3}", t.elapsed());
    assert_eq!(v3["to_version"], 3, "{v3}");
    let t = std::time::Instant::now();
    let back = sb.keel_json(&["rollback", "rb"])?;
    println!("rollback took {:?}: {back}", t.elapsed());
    assert_eq!(back["to_version"], 4, "{back}");
    let status = sb.status("rb")?;
    assert_eq!(status["job"]["parallelism"], 2, "version 4 runs version 1's spec: {status}");
    produce(&bootstrap, &input, (1500..2000).map(record).collect())?;
    let checked = check_output(&mut out, 2000)?;
    let lost: Vec<u64> = (0..2000).filter(|n| !checked.counts.contains_key(n)).collect();
    let duplicated: Vec<u64> = checked.counts.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
    println!(
        "after the rollback: {} distinct of 2000, {} lost, {} duplicated",
        checked.counts.len(),
        lost.len(),
        duplicated.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    Ok(())
}

/// The other ways to replace a version. `--mode cancel-on-update` (seed 003): the old version
/// is canceled at once and the new one starts from the latest checkpoint. Proves no record is
/// lost (duplicates only from what came after that checkpoint: none here, the input was idle
/// and a checkpoint covered it). `--upgrade-strategy stateless --restore-strategy none`: the
/// new version starts without state, so its source goes by `scan.startup.mode:
/// earliest-offset` and reads the whole topic again. Proves the state was really not restored:
/// every number comes out a second time.
#[test]
fn cancel_on_update_and_a_stateless_restart_without_state() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("cu-in"), unique_topic("cu-out"));
    create_topic(&bootstrap, &input, 2)?;
    create_topic(&bootstrap, &output, 2)?;
    produce(&bootstrap, &input, (0..1000).map(record).collect())?;

    let mut sb = Sandbox::new("cancel-on-update", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=4".into()])?;
    sb.run_spec("cu", &spec("cu", &bootstrap, &input, &output, 2, 0), &[])?;
    let mut out = Output::open(&bootstrap, &output)?;
    out.read_until(LONG, |all| all.len() >= 1000)?;
    // A checkpoint after all 1000 came out.
    let after = sb.status("cu")?["checkpoints"]
        .as_array()
        .and_then(|c| c.iter().filter_map(|c| c["id"].as_u64()).max())
        .unwrap_or(0);
    keel_tests::wait_until("a checkpoint after the output", LONG, || {
        let s = sb.status("cu")?;
        let done = s["checkpoints"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| c["id"].as_u64().unwrap_or(0) > after && c["state"] == "completed")
        });
        Ok(done.then_some(()))
    })?;

    let v2 = sb.write_spec("cu-2", &spec("cu", &bootstrap, &input, &output, 2, 1))?;
    let r =
        sb.keel_json(&["upgrade", "cu", v2.to_str().unwrap_or_default(), "--mode", "cancel-on-update"])?;
    let steps = r["steps"].to_string();
    assert!(steps.contains("canceling version 1 at once"), "{r}");
    produce(&bootstrap, &input, (1000..1500).map(record).collect())?;
    out.read_until(LONG, |all| {
        let mut seen = std::collections::BTreeSet::new();
        for rec in all {
            seen.insert(rec.value_str());
        }
        seen.len() >= 1500
    })?;
    let distinct: std::collections::BTreeSet<String> =
        out.records.iter().map(TestRecord::value_str).collect();
    println!("cancel-on-update: {} records out, {} distinct of 1500", out.len(), distinct.len());
    assert_eq!(distinct.len(), 1500, "cancel-on-update lost records");

    let before = out.len();
    let v3 = sb.write_spec("cu-3", &spec("cu", &bootstrap, &input, &output, 2, 0))?;
    let r = sb.keel_json(&[
        "upgrade",
        "cu",
        v3.to_str().unwrap_or_default(),
        "--upgrade-strategy",
        "stateless",
        "--restore-strategy",
        "none",
    ])?;
    assert_eq!(r["error"], "", "{r}");
    out.read_until(LONG, |all| all.len() >= before + 1500)?;
    let checked = check_output(&mut out, 0)?;
    let twice = checked.counts.values().filter(|c| **c >= 2).count();
    println!(
        "stateless restart without state: {} records out, {twice} of 1500 numbers read twice",
        out.len()
    );
    assert_eq!(twice, 1500, "without state, the new version reads the topic from the start again");
    Ok(())
}

/// Crash safety: the JobManager leader is killed with SIGKILL at different moments of an
/// upgrade (right after the request, during the slot request and drain, after the switch,
/// while the new version starts), and a new JobManager is started each time. Proves, after
/// every kill: the job ends up running on exactly one active version, every task belongs to
/// it, and no version that did not run stays pending; and over all the kills no record is
/// lost (at-least-once: duplicates only from replaying what came after the latest completed
/// checkpoint, reported).
fn jobmanager_killed_during_upgrades(backend: Backend) -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("crash-in"), unique_topic("crash-out"));
    create_topic(&bootstrap, &input, 4)?;
    create_topic(&bootstrap, &output, 2)?;

    let mut sb = Sandbox::on(backend, "upgrade-crash", &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm-0", &[])?;
    sb.start("jobmanager", "jm-1", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=4".into()])?;
    sb.start("taskmanager", "tm-2", &["taskmanager.numberOfTaskSlots=4".into()])?;
    sb.run_spec("crash", &spec("crash", &bootstrap, &input, &output, 2, 0), &[])?;
    sb.wait_job_state("crash", "running", LONG)?;

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let producer = steady_producer(
        bootstrap.clone(),
        input.clone(),
        50,
        Duration::from_millis(50),
        stop.clone(),
        written.clone(),
    );
    let mut out = Output::open(&bootstrap, &output)?;
    out.read_until(LONG, |all| all.len() >= 300)?;

    for (round, delay_ms) in [0u64, 40, 120, 300, 700].into_iter().enumerate() {
        let parallelism = if round % 2 == 0 { 3 } else { 2 };
        let before = sb.keel_json(&["history", "crash"])?;
        let upgrade = std::process::Command::new(keel_tests::keel_bin())
            .arg("--config")
            .arg(&sb.config)
            .args(["rescale", "crash", "--parallelism", &parallelism.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(delay_ms));
        let leader = sb.cluster()?["jobmanager"]["leader"].as_str().unwrap_or_default().to_string();
        let name = sb.by_address(&leader).map(|p| p.proc.name.clone());
        let name = name.ok_or_else(|| anyhow::anyhow!("leader {leader} is not a sandbox process"))?;
        sb.proc(&name).proc.kill9();
        sb.start("jobmanager", &format!("jm-{}", round + 2), &[])?;
        let mut upgrade = upgrade;
        let _ = upgrade.wait();

        let status = sb.wait_job_state("crash", "running", LONG)?;
        let history = sb.keel_json(&["history", "crash"])?;
        let active = status["job"]["active_version"].as_u64().unwrap_or(0);
        let versions = history["versions"].as_array().cloned().unwrap_or_default();
        let active_rows: Vec<&serde_json::Value> = versions.iter().filter(|v| v["active"] == true).collect();
        assert_eq!(active_rows.len(), 1, "exactly one active version: {history}");
        assert!(
            versions.iter().all(|v| v["active"] == true || v["state"] != "created"),
            "no version stays pending: {history}"
        );
        let tasks = status["tasks"].as_array().cloned().unwrap_or_default();
        assert!(
            tasks.iter().all(|t| t["version"].as_u64() == Some(active)),
            "every task belongs to the active version {active}: {status}"
        );
        println!(
            "kill {delay_ms} ms into a rescale to {parallelism}: active version {active} (before: {} versions, now {}), \
             parallelism {}",
            before["versions"].as_array().map_or(0, Vec::len),
            versions.len(),
            status["job"]["parallelism"]
        );
        let seen = out.len();
        out.read_until(LONG, |all| all.len() >= seen + 100)?;
    }
    stop.store(true, Ordering::SeqCst);
    producer.join().map_err(|_| anyhow::anyhow!("producer panicked"))??;
    let total = written.load(Ordering::SeqCst);
    let checked = check_output(&mut out, 0)?;
    out.read_until(LONG, |all| {
        let distinct: std::collections::BTreeSet<String> = all.iter().map(TestRecord::value_str).collect();
        distinct.len() as u64 >= total
    })?;
    let checked = if checked.counts.len() as u64 >= total { checked } else { check_output(&mut out, 0)? };
    let lost: Vec<u64> = (0..total).filter(|n| !checked.counts.contains_key(n)).collect();
    let duplicates: usize = checked.counts.values().map(|c| c - 1).sum();
    println!(
        "5 leader kills during upgrades: {total} in, {} distinct out, {} lost, {duplicates} duplicates (replay)",
        checked.counts.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost: {:?}", &lost[..lost.len().min(20)]);
    Ok(())
}

fn side_spec(name: &str, bootstrap: &str, input: &str, output: &str, group: &str) -> String {
    spec(name, bootstrap, input, output, 2, 0)
        .replace(&format!("properties.group.id: {name}\n"), &format!("properties.group.id: {group}\n"))
}

/// Side by side, then promote. A new version that would write to the running version's
/// topic, or read with its consumer group, is refused naming the field. With its own topic and
/// group it runs beside the old version (as job `<name>.v2`) from a savepoint of it, and
/// `keel promote` turns it into the active version by a handover. Proves: while both run, the
/// old version's topic keeps getting everything and the new one's gets exactly what came
/// after the savepoint; after the promotion the old topic gets nothing more, and the new
/// version's topic holds every record from the savepoint on, once (no gap, no duplicate).
#[test]
fn side_by_side_then_promote() -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, out_a, out_b) = (unique_topic("sbs-in"), unique_topic("sbs-a"), unique_topic("sbs-b"));
    create_topic(&bootstrap, &input, 2)?;
    create_topic(&bootstrap, &out_a, 2)?;
    create_topic(&bootstrap, &out_b, 2)?;
    produce(&bootstrap, &input, (0..1000).map(record).collect())?;

    let mut sb = Sandbox::new("side-by-side", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=4".into()])?;
    sb.start("taskmanager", "tm-2", &["taskmanager.numberOfTaskSlots=4".into()])?;
    sb.run_spec("sbs", &side_spec("sbs", &bootstrap, &input, &out_a, "group-a"), &[])?;
    let mut a = Output::open(&bootstrap, &out_a)?;
    a.read_until(LONG, |all| all.len() >= 1000)?;

    for (yaml, field) in [
        (side_spec("sbs", &bootstrap, &input, &out_a, "group-b"), "sinks[0].topic"),
        (side_spec("sbs", &bootstrap, &input, &out_b, "group-a"), "sources[0].properties.group.id"),
    ] {
        let path = sb.write_spec("sbs-bad", &yaml)?;
        let refused =
            sb.keel(&["upgrade", "sbs", path.to_str().unwrap_or_default(), "--mode", "side-by-side"])?;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(field),
            "expected a refusal naming {field}: {stderr}"
        );
    }

    let v2 = sb.write_spec("sbs-2", &side_spec("sbs", &bootstrap, &input, &out_b, "group-b"))?;
    let r = sb.keel_json(&["upgrade", "sbs", v2.to_str().unwrap_or_default(), "--mode", "side-by-side"])?;
    assert_eq!(r["error"], "", "{r}");
    sb.wait_job_state("sbs.v2", "running", LONG)?;
    produce(&bootstrap, &input, (1000..1500).map(record).collect())?;
    let mut b = Output::open(&bootstrap, &out_b)?;
    a.read_until(LONG, |all| all.len() >= 1500)?;
    b.read_until(LONG, |all| all.len() >= 500)?;

    let p = sb.keel_json(&["promote", "sbs"])?;
    assert_eq!(p["error"], "", "{p}");
    let status = sb.wait_job_state("sbs", "running", LONG)?;
    assert_eq!(status["job"]["active_version"], 2, "{status}");
    assert_eq!(sb.status("sbs.v2")?["job"]["state"], "finished");
    produce(&bootstrap, &input, (1500..2000).map(record).collect())?;

    let checked_b = check_output(&mut b, 1000)?;
    let expected_b: Vec<u64> = (1000..2000).collect();
    let got_b: Vec<u64> = checked_b.counts.keys().copied().collect();
    let dup_b = checked_b.counts.values().filter(|c| **c > 1).count();
    let checked_a = check_output(&mut a, 1500)?;
    println!(
        "side by side then promote: old topic {} records ({} distinct), new topic {} records ({} distinct, {dup_b} duplicated)",
        a.len(),
        checked_a.counts.len(),
        b.len(),
        checked_b.counts.len()
    );
    assert_eq!(got_b, expected_b, "the new version's topic: every record from the savepoint on");
    assert_eq!(dup_b, 0, "no duplicate in the new version's topic");
    assert_eq!(a.len(), 1500, "the old version wrote nothing after the promotion, and nothing twice");
    Ok(())
}

/// Failure paths that must leave the job running. A savepoint that cannot complete
/// (`execution.checkpointing.timeout` of 1 ms: it always times out) makes `keel savepoint` fail
/// saying why, and the job keeps running and writing. An upgrade whose drain savepoint fails
/// the same way fails saying why, and version 1 stays the active version and continues (from
/// its latest checkpoint: none here, so it reads from the start again: duplicates, no loss).
/// Then, on a cluster without the slots to run both versions at once, an upgrade falls back to
/// stop-then-start and says so. Proves: no record is lost anywhere, and the stop-then-start
/// upgrade (still drained at a savepoint) neither loses nor duplicates a record.
#[test]
fn a_failed_savepoint_leaves_the_job_running_and_a_full_cluster_falls_back_to_stop_start(
) -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output, output2) = (unique_topic("sf-in"), unique_topic("sf-out"), unique_topic("sf-out2"));
    create_topic(&bootstrap, &input, 2)?;
    create_topic(&bootstrap, &output, 2)?;
    create_topic(&bootstrap, &output2, 2)?;
    produce(&bootstrap, &input, (0..1000).map(record).collect())?;

    let mut sb = Sandbox::new("savepoint-fails", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    // Exactly the slots of one version.
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=2".into()])?;
    let impossible = spec("sf", &bootstrap, &input, &output, 2, 0).replace(
        "config:\n  execution.checkpointing.interval: 400 ms\n",
        "config:\n  execution.checkpointing.timeout: 1 ms\n",
    );
    sb.run_spec("sf", &impossible, &[])?;
    let mut out = Output::open(&bootstrap, &output)?;
    out.read_until(LONG, |all| all.len() >= 1000)?;
    let failed = sb.keel(&["savepoint", "sf"])?;
    let stderr = String::from_utf8_lossy(&failed.stderr);
    println!("keel savepoint with a 1 ms timeout: {}", stderr.trim());
    assert!(!failed.status.success(), "the savepoint cannot complete in 1 ms");
    assert!(stderr.contains("keeps running"), "{stderr}");
    assert_eq!(sb.status("sf")?["job"]["state"], "running");

    let v2 = sb.write_spec("sf-2", &spec("sf", &bootstrap, &input, &output, 2, 1))?;
    let upgrade = sb.keel(&["upgrade", "sf", v2.to_str().unwrap_or_default()])?;
    let stderr = String::from_utf8_lossy(&upgrade.stderr);
    println!("keel upgrade with a failing drain: {}", stderr.trim());
    assert!(!upgrade.status.success() && stderr.contains("version 1 stays active"), "{stderr}");
    let status = sb.wait_job_state("sf", "running", LONG)?;
    assert_eq!(status["job"]["active_version"], 1, "{status}");
    produce(&bootstrap, &input, (1000..1500).map(record).collect())?;
    out.read_until(LONG, |all| {
        let distinct: std::collections::BTreeSet<String> = all.iter().map(TestRecord::value_str).collect();
        distinct.len() >= 1500
    })?;
    sb.keel(&["cancel", "sf"])?;

    // The stop-then-start fallback, on a job that checkpoints normally.
    sb.run_spec("sf-b", &spec("sf-b", &bootstrap, &input, &output2, 2, 0), &[])?;
    let mut out2 = Output::open(&bootstrap, &output2)?;
    out2.read_until(LONG, |all| all.len() >= 1500)?;
    let v2 = sb.write_spec("sf-b-2", &spec("sf-b", &bootstrap, &input, &output2, 2, 1))?;
    let r = sb.keel_json(&["upgrade", "sf-b", v2.to_str().unwrap_or_default()])?;
    assert_eq!(r["error"], "", "{r}");
    assert!(r["steps"].to_string().contains("falling back to stop-then-start"), "{r}");
    produce(&bootstrap, &input, (1500..2000).map(record).collect())?;
    let checked = check_output(&mut out2, 2000)?;
    let lost: Vec<u64> = (0..2000).filter(|n| !checked.counts.contains_key(n)).collect();
    let duplicated: Vec<u64> = checked.counts.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
    println!(
        "a stop-then-start upgrade on a full cluster (pause {} ms, total {} ms): {} lost, {} duplicated",
        r["pause_ms"],
        r["total_ms"],
        lost.len(),
        duplicated.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    Ok(())
}

/// A JobManager leader killed -9 inside the health gate of a failing new version: the next
/// leader resumes the gate from the job record (phase `switched`, with its deadline) and still
/// rolls the upgrade back. Version 2 adds a Kafka sink whose broker does not exist, so it never
/// completes a checkpoint (and fails once its producer gives up); the leader is killed as soon
/// as version 2 is the active version, before anything rolled back. Proves: the rollback is
/// done by the new leader (its log says so, the killed one's does not), version 1 is the
/// active version again and runs, version 2 is recorded failed, and the exactly-once output
/// equals the input (nothing lost, nothing duplicated). Before the upgrade phase was
/// persisted, the new leader redeployed version 2 again and again and version 1 never ran.
fn leader_killed_in_the_health_gate(backend: Backend) -> anyhow::Result<()> {
    let broker = Kafka::shared()?;
    let bootstrap = broker.bootstrap().to_string();
    let (input, output) = (unique_topic("gate-in"), unique_topic("gate-out"));
    create_topic(&bootstrap, &input, 2)?;
    create_topic(&bootstrap, &output, 2)?;
    produce(&bootstrap, &input, (0..1000).map(record).collect())?;

    let gate = vec!["upgrade.health-timeout=30 s".to_string()];
    let mut sb = Sandbox::on(backend, "gate-kill", &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm-0", &gate)?;
    sb.start("jobmanager", "jm-1", &gate)?;
    sb.start("taskmanager", "tm-1", &["taskmanager.numberOfTaskSlots=4".into()])?;
    let v1 = exactly_once(spec("gate", &bootstrap, &input, &output, 2, 0), "gate-tx");
    sb.run_spec("gate", &v1, &[])?;
    let mut out = Output::open(&bootstrap, &output)?;
    out.read_until(LONG, |all| all.len() >= 1000)?;

    // A broker that never answers: a socket this test holds open and never accepts on (no
    // other process can take the port meanwhile).
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let nowhere = silent.local_addr()?.to_string();
    let v2 = format!(
        "{v1}  - name: audit\n    connector: kafka\n    from: in\n    topic: audit\n    \
         properties.bootstrap.servers: {nowhere}\n    format: csv\n    sink.delivery-guarantee: at-least-once\n"
    );
    let path = sb.write_spec("gate-v2", &v2)?;
    let client_log = sb.dir.join("upgrade-client.log");
    let upgrade = std::process::Command::new(keel_tests::keel_bin())
        .arg("--config")
        .arg(&sb.config)
        .args(["upgrade", "gate", path.to_str().unwrap_or_default()])
        .stdout(std::fs::File::create(&client_log)?)
        .stderr(std::fs::File::create(sb.dir.join("upgrade-client.err"))?)
        .spawn()?;
    let mut upgrade = upgrade;

    // As soon as the switch is recorded (the progress step comes after its fenced write),
    // the leader dies.
    keel_tests::wait_until("the switch to version 2", LONG, || {
        let text = std::fs::read_to_string(&client_log)?;
        match text.contains("switched") {
            true => Ok(Some(())),
            false => Err(anyhow::anyhow!("upgrade progress so far: {text}")),
        }
    })?;
    let leader = sb.cluster()?["jobmanager"]["leader"].as_str().unwrap_or_default().to_string();
    let killed = sb.by_address(&leader).map(|p| p.proc.name.clone());
    let killed = killed.ok_or_else(|| anyhow::anyhow!("leader {leader} is not a sandbox process"))?;
    sb.proc(&killed).proc.kill9();
    let _ = upgrade.wait();
    let client =
        std::fs::read_to_string(&client_log)? + &std::fs::read_to_string(sb.dir.join("upgrade-client.err"))?;
    println!("keel upgrade, cut off by the kill:\n{client}");
    assert!(client.contains("switched"), "the kill came after the switch: {client}");
    assert!(!client.contains("rolled back"), "the kill came before any rollback: {client}");
    sb.start("jobmanager", "jm-2", &gate)?;

    keel_tests::wait_until("version 1 to run again", LONG, || {
        let s = sb.status("gate")?;
        if s["job"]["active_version"] == 1 && s["job"]["state"] == "running" {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!(
                "version {} is {} ({})",
                s["job"]["active_version"],
                s["job"]["state"],
                s["status_message"]
            ))
        }
    })?;
    let history = sb.keel_json(&["history", "gate"])?;
    assert_eq!(history["versions"][1]["state"], "failed", "{history}");
    let upgrade = &sb.status("gate")?["upgrade"];
    assert_eq!(upgrade["phase"], "failed", "{upgrade}");
    assert_eq!(upgrade["rolled_back"], true, "{upgrade}");
    let killed_log = sb.proc(&killed).proc.log_text();
    assert!(!killed_log.contains("rolling back an upgrade"), "the killed leader rolled back already");
    let survivors = ["jm-0", "jm-1", "jm-2"].into_iter().filter(|n| *n != killed);
    let rolled_back_by: Vec<&str> =
        survivors.filter(|n| sb.proc(n).proc.log_text().contains("rolling back an upgrade")).collect();
    assert!(!rolled_back_by.is_empty(), "a new leader rolled back the upgrade");
    println!("killed {killed} in the health gate; rolled back by {rolled_back_by:?}");

    produce(&bootstrap, &input, (1000..1500).map(record).collect())?;
    let checked = check_output(&mut out, 1500)?;
    let lost: Vec<u64> = (0..1500).filter(|n| !checked.counts.contains_key(n)).collect();
    let duplicated: Vec<u64> = checked.counts.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
    drop(silent);
    println!(
        "{} distinct of 1500, {} lost, {} duplicated",
        checked.counts.len(),
        lost.len(),
        duplicated.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    Ok(())
}

on_backends!(
    a_jobmanager_leader_killed_during_upgrades_leaves_one_active_version_and_loses_nothing,
    jobmanager_killed_during_upgrades,
    [Local, Etcd, Raft]
);
on_backends!(
    a_leader_killed_in_the_health_gate_still_rolls_the_upgrade_back,
    leader_killed_in_the_health_gate,
    [Local, Etcd, Raft]
);
