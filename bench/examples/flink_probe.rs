//! Proves the pieces of `keel_bench::flink` by hand on a real Kafka node (the testkit's):
//! `cargo run -p keel-bench --example flink_probe -- SCENARIO` with SCENARIO one of
//! `passthrough P [eo]`, `filter`, `datagen`, `tmkill [1s5s]`, `ha`, `savepoint`.
//! Prints what it sees (times, counts, RSS, CPU seconds) on stdout.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use keel_bench::flink::{self, FlinkCluster, FlinkOptions};
use keel_bench::procfs;
use keel_testkit::{create_topic, produce, Kafka, Produce, TopicReader};

/// A background producer of CSV or JSON records `id,name,age` with ids 0, 1, 2, ... at `rate`/s.
struct Producer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<u64>>>,
}

impl Producer {
    fn start(bootstrap: &str, topic: &str, json: bool, rate: u64) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, bootstrap, topic) = (stop.clone(), bootstrap.to_string(), topic.to_string());
        let thread = std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut next = 0u64;
            let began = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let due = began.elapsed().as_secs_f64() * rate as f64;
                let upto = (due as u64).max(next);
                if upto > next {
                    produce(
                        &bootstrap,
                        &topic,
                        (next..upto)
                            .map(|i| Produce { value: record(i, json), ..Default::default() })
                            .collect(),
                    )?;
                    next = upto;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(next)
        });
        Producer { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => bail!("the producer thread panicked"),
        }
    }
}

fn record(i: u64, json: bool) -> String {
    let age = i % 40;
    if json {
        format!("{{\"id\":{i},\"name\":\"n{i}\",\"age\":{age}}}")
    } else {
        format!("{i},n{i},{age}")
    }
}

/// Reads a topic on a thread, keeping (arrival, id) of every record.
struct Reader {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Instant, u64)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    fn start(bootstrap: &str, topic: &str, committed_only: bool) -> anyhow::Result<Reader> {
        let reader = if committed_only {
            TopicReader::open(bootstrap, topic, "probe-reader")?
        } else {
            TopicReader::open_uncommitted(bootstrap, topic, "probe-reader")?
        };
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(r) = reader.poll(Duration::from_millis(100)) {
                    let v = r.value_str();
                    let id = v
                        .trim_start_matches("{\"id\":")
                        .split([',', '}'])
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(u64::MAX);
                    if let Ok(mut o) = out.lock() {
                        o.push((Instant::now(), id));
                    }
                }
            }
        });
        Ok(Reader { stop, seen, thread: Some(thread) })
    }

    fn snapshot(&self) -> Vec<(Instant, u64)> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn count(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn finish(mut self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snapshot()
    }
}

/// Waits until `reader` holds at least `n` records.
fn wait_count(reader: &Reader, n: usize, timeout: Duration) -> anyhow::Result<Duration> {
    let began = Instant::now();
    while reader.count() < n {
        if began.elapsed() > timeout {
            bail!("only {} of {n} records in the sink after {timeout:?}", reader.count());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(began.elapsed())
}

/// Lost and duplicated ids among `0..produced`, and the largest gap between arrivals after `from`.
fn check(seen: &[(Instant, u64)], produced: u64, expect: impl Fn(u64) -> bool) -> (u64, u64) {
    let mut counts = vec![0u32; produced as usize];
    for &(_, id) in seen {
        if let Some(c) = counts.get_mut(id as usize) {
            *c += 1;
        }
    }
    let lost = (0..produced).filter(|&i| expect(i) && counts[i as usize] == 0).count() as u64;
    let dup = counts.iter().map(|&c| u64::from(c.saturating_sub(1))).sum();
    (lost, dup)
}

/// The largest gap between consecutive arrivals after `from`, and when output came again after it.
fn largest_gap(seen: &[(Instant, u64)], from: Instant) -> (Duration, Duration) {
    let mut prev = from;
    let mut best = (Duration::ZERO, Duration::ZERO);
    for &(at, _) in seen.iter().filter(|(at, _)| *at > from) {
        let gap = at.duration_since(prev);
        if gap > best.0 {
            best = (gap, at.duration_since(from));
        }
        prev = at;
    }
    best
}

fn rss_mb(pid: u32) -> f64 {
    procfs::memory(pid).map(|m| m.rss_kib as f64 / 1024.0).unwrap_or(f64::NAN)
}

fn kafka_table(name: &str, topic: &str, bootstrap: &str, format: &str, columns: &str, extra: &str) -> String {
    format!(
        "CREATE TEMPORARY TABLE {name} (\n  {columns}\n) WITH (\n  'connector' = 'kafka',\n  'topic' = '{topic}',\n  \
         'properties.bootstrap.servers' = '{bootstrap}',\n  'properties.group.id' = 'flink-probe',\n  \
         'format' = '{format}'{extra}\n);\n"
    )
}

/// Seed 002 Example 1, filled in: CSV id,name,age from `source` to `sink`.
fn passthrough_sql(bootstrap: &str, parallelism: u32, exactly_once: bool, savepoint: Option<&str>) -> String {
    let mut sql = format!(
        "SET 'parallelism.default' = '{parallelism}';\nSET 'execution.checkpointing.interval' = '1s';\n"
    );
    if let Some(path) = savepoint {
        sql += &format!("SET 'execution.savepoint.path' = '{path}';\n");
    }
    let cols = "id INT,\n  name STRING,\n  age INT";
    sql += &kafka_table(
        "kafka_source",
        "source",
        bootstrap,
        "csv",
        cols,
        ",\n  'scan.startup.mode' = 'earliest-offset'",
    );
    let sink_extra = if exactly_once {
        ",\n  'sink.delivery-guarantee' = 'exactly-once',\n  'sink.transactional-id-prefix' = 'flink-probe',\n  \
         'properties.transaction.timeout.ms' = '900000'"
    } else {
        ",\n  'sink.delivery-guarantee' = 'at-least-once'"
    };
    sql += &kafka_table("kafka_sink", "sink", bootstrap, "csv", cols, sink_extra);
    sql += "INSERT INTO kafka_sink SELECT id, name, age FROM kafka_source;\n";
    sql
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = args.first().map(String::as_str).unwrap_or("passthrough");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let t = Instant::now();
    let home = flink::install(&repo)?;
    println!(
        "install: {:.2} s, {} (Flink {}, connector {}, ZooKeeper {})",
        t.elapsed().as_secs_f64(),
        home.home.display(),
        home.flink_version,
        home.connector_version,
        home.zookeeper_version
    );
    let dir = tempfile::Builder::new().prefix("flink-probe-").tempdir()?;
    let keep = std::env::var_os("PROBE_KEEP").is_some();
    let dir_path = if keep { dir.keep() } else { dir.path().to_path_buf() };
    println!("dir: {}", dir_path.display());

    if scenario == "datagen" {
        let mut cluster = FlinkCluster::start(&home, FlinkOptions::new(dir_path.join("flink")))?;
        report_idle(&cluster);
        let tm = cluster.taskmanager_pids()[0];
        let cpu0 = procfs::cpu_seconds(tm)?;
        // Columns: PROBE_DATAGEN_COLUMNS, else the seed's id,name,age (random name of 100 chars,
        // the datagen default).
        let columns = std::env::var("PROBE_DATAGEN_COLUMNS")
            .unwrap_or_else(|_| "id BIGINT, name STRING, age INT".into());
        let options = std::env::var("PROBE_DATAGEN_OPTIONS").unwrap_or_default();
        let sql = format!(
            "SET 'parallelism.default' = '1';\nSET 'execution.checkpointing.interval' = '1s';\n\
             CREATE TABLE gen ({columns}) WITH ('connector' = 'datagen', 'number-of-rows' = '20000000', 'rows-per-second' = '1000000000'{options});\n\
             CREATE TABLE sink ({columns}) WITH ('connector' = 'blackhole');\n\
             INSERT INTO sink SELECT * FROM gen;\n"
        );
        println!("{sql}");
        let t = Instant::now();
        let job = cluster.submit_sql(&sql)?;
        let submitted = t.elapsed();
        cluster.wait_state(&job, "FINISHED", Duration::from_secs(600))?;
        let total = t.elapsed();
        let cpu = procfs::cpu_seconds(tm)? - cpu0;
        let details = job_duration(&cluster, &job)?;
        println!(
            "datagen->blackhole 20M: submit {:.2} s, submit->FINISHED {:.2} s, job duration (REST) {:.2} s, TM CPU {:.2} s -> {:.2} M records per TM CPU-second, TM RSS after {:.0} MB",
            submitted.as_secs_f64(), total.as_secs_f64(), details, cpu, 20.0 / cpu, rss_mb(tm)
        );
        cluster.kill(tm)?;
        return Ok(());
    }

    let kafka = Kafka::single()?;
    let bootstrap = kafka.bootstrap().to_string();
    create_topic(&bootstrap, "source", 2)?;
    create_topic(&bootstrap, "sink", 2)?;
    match scenario {
        "passthrough" => {
            let p: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1);
            let eo = args.get(2).is_some_and(|s| s == "eo");
            let mut opts = FlinkOptions::new(dir_path.join("flink"));
            opts.slots_per_tm = p;
            let cluster = FlinkCluster::start(&home, opts)?;
            report_idle(&cluster);
            let n = 20_000u64;
            produce(
                &bootstrap,
                "source",
                (0..n).map(|i| Produce { value: record(i, false), ..Default::default() }).collect(),
            )?;
            let reader = Reader::start(&bootstrap, "sink", eo)?;
            let t = Instant::now();
            let job = cluster.submit_sql(&passthrough_sql(&bootstrap, p, eo, None))?;
            println!("submitted {job} in {:.2} s (every subtask RUNNING)", t.elapsed().as_secs_f64());
            let took = wait_count(&reader, n as usize, Duration::from_secs(120))?;
            let seen = reader.finish();
            let (lost, dup) = check(&seen, n, |_| true);
            println!(
                "pass-through p={p} {}: {n} records in the sink {:.2} s after RUNNING; lost {lost}, duplicated {dup}; TM RSS {:.0} MB",
                if eo { "exactly-once" } else { "at-least-once" },
                took.as_secs_f64(),
                rss_mb(cluster.taskmanager_pids()[0])
            );
        }
        "filter" => {
            let cluster = FlinkCluster::start(&home, FlinkOptions::new(dir_path.join("flink")))?;
            let n = 20_000u64;
            produce(
                &bootstrap,
                "source",
                (0..n).map(|i| Produce { value: record(i, true), ..Default::default() }).collect(),
            )?;
            let reader = Reader::start(&bootstrap, "sink", false)?;
            let sql = format!(
                "SET 'parallelism.default' = '1';\nSET 'execution.checkpointing.interval' = '1s';\n{}{}INSERT INTO sink SELECT id, name FROM src WHERE age >= 18;\n",
                kafka_table("src", "source", &bootstrap, "json", "id INT, name STRING, age INT", ",\n  'scan.startup.mode' = 'earliest-offset'"),
                kafka_table("sink", "sink", &bootstrap, "json", "id INT, name STRING", "")
            );
            let job = cluster.submit_sql(&sql)?;
            let expected = (0..n).filter(|i| i % 40 >= 18).count();
            let took = wait_count(&reader, expected, Duration::from_secs(120))?;
            std::thread::sleep(Duration::from_secs(2));
            let seen = reader.finish();
            let (lost, dup) = check(&seen, n, |i| i % 40 >= 18);
            let wrong = seen.iter().filter(|(_, id)| id % 40 < 18).count();
            println!("filter+projection (json): job {job}; {} records out of {n} ({expected} expected) {:.2} s after RUNNING; lost {lost}, duplicated {dup}, filtered-out present {wrong}", seen.len(), took.as_secs_f64());
        }
        "tmkill" => {
            let fast = args.get(1).is_some_and(|s| s == "1s5s");
            let mut opts = FlinkOptions::new(dir_path.join("flink"));
            opts.task_managers = 2;
            if fast {
                opts.heartbeat = Some((Duration::from_secs(1), Duration::from_secs(5)));
            }
            let mut cluster = FlinkCluster::start(&home, opts)?;
            report_idle(&cluster);
            let producer = Producer::start(&bootstrap, "source", false, 1000);
            let reader = Reader::start(&bootstrap, "sink", false)?;
            let job = cluster.submit_sql(&passthrough_sql(&bootstrap, 1, false, None))?;
            wait_count(&reader, 3000, Duration::from_secs(60))?;
            std::thread::sleep(Duration::from_secs(3));
            let victim = cluster.taskmanagers_of_job(&job)?;
            println!(
                "job {job} runs on TM pid(s) {victim:?} of {:?}; TM RSS under load {:.0} MB",
                cluster.taskmanager_pids(),
                rss_mb(victim[0])
            );
            let killed_at = Instant::now();
            cluster.kill(victim[0])?;
            // Region failover: the job stays RUNNING while the subtasks of the lost TM restart.
            while cluster.all_running(&job).unwrap_or(false) {
                if killed_at.elapsed() > Duration::from_secs(120) {
                    bail!("the job's subtasks still all RUNNING 120 s after the kill");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let detected = killed_at.elapsed();
            cluster.wait_all_running(&job, Duration::from_secs(120))?;
            let running = killed_at.elapsed();
            let now_on = cluster.taskmanagers_of_job(&job)?;
            let before = reader.count();
            wait_count(&reader, before + 2000, Duration::from_secs(60))?;
            let produced = producer.finish()?;
            std::thread::sleep(Duration::from_secs(5));
            let seen = reader.finish();
            let (gap, flowing) = largest_gap(&seen, killed_at - Duration::from_millis(1));
            let (lost, dup) = check(&seen, produced, |_| true);
            println!(
                "TM kill -9 ({}): failure noticed (a subtask not RUNNING) {:.2} s after, all RUNNING again {:.2} s after (on {now_on:?}); largest output gap {:.2} s, output flowing again {:.2} s after the kill; restarts {}; produced {produced}, lost {lost}, duplicated (replayed) {dup}",
                if fast { "heartbeat 1 s / 5 s" } else { "Flink's default heartbeats" },
                detected.as_secs_f64(), running.as_secs_f64(), gap.as_secs_f64(), flowing.as_secs_f64(), cluster.restarts(&job)?
            );
            cluster.replace_killed()?;
            println!("replaced: TMs {:?}", cluster.taskmanager_pids());
        }
        "ha" => {
            let mut opts = FlinkOptions::new(dir_path.join("flink"));
            opts.standby_jobmanager = true;
            for (k, v) in args.iter().skip(1).filter_map(|a| a.split_once('=')) {
                opts.extra_config.push((k.to_string(), v.to_string()));
            }
            let mut cluster = FlinkCluster::start(&home, opts)?;
            report_idle(&cluster);
            let leader = cluster.leader_jobmanager_pid()?;
            println!(
                "JMs {:?}, leader {leader}, ZooKeeper {:?} ({:.0} MB)",
                cluster.jobmanager_pids(),
                cluster.zookeeper_pid(),
                cluster.zookeeper_pid().map(rss_mb).unwrap_or(0.0)
            );
            let producer = Producer::start(&bootstrap, "source", false, 1000);
            let reader = Reader::start(&bootstrap, "sink", false)?;
            let job = cluster.submit_sql(&passthrough_sql(&bootstrap, 1, false, None))?;
            wait_count(&reader, 3000, Duration::from_secs(60))?;
            std::thread::sleep(Duration::from_secs(3));
            let killed_at = Instant::now();
            cluster.kill(leader)?;
            let new_leader = loop {
                if let Ok(pid) = cluster.leader_jobmanager_pid() {
                    break pid;
                }
                if killed_at.elapsed() > Duration::from_secs(180) {
                    bail!("no new leader 180 s after the kill");
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let elected = killed_at.elapsed();
            cluster.wait_all_running(&job, Duration::from_secs(180))?;
            let running = killed_at.elapsed();
            let before = reader.count();
            wait_count(&reader, before + 2000, Duration::from_secs(60))?;
            let produced = producer.finish()?;
            std::thread::sleep(Duration::from_secs(5));
            let seen = reader.finish();
            let (gap, flowing) = largest_gap(&seen, killed_at - Duration::from_millis(1));
            let (lost, dup) = check(&seen, produced, |_| true);
            println!(
                "JM leader kill -9: new leader {new_leader} after {:.2} s, job all RUNNING again after {:.2} s; largest output gap {:.2} s, flowing again {:.2} s after the kill; produced {produced}, lost {lost}, duplicated (replayed) {dup}",
                elected.as_secs_f64(), running.as_secs_f64(), gap.as_secs_f64(), flowing.as_secs_f64()
            );
            let t = Instant::now();
            cluster.replace_killed()?;
            println!(
                "replaced the killed JM in {:.2} s: JMs {:?}, leader {}",
                t.elapsed().as_secs_f64(),
                cluster.jobmanager_pids(),
                cluster.leader_jobmanager_pid()?
            );
        }
        "savepoint" => {
            let mut opts = FlinkOptions::new(dir_path.join("flink"));
            opts.slots_per_tm = 2;
            let cluster = FlinkCluster::start(&home, opts)?;
            let producer = Producer::start(&bootstrap, "source", false, 1000);
            let reader = Reader::start(&bootstrap, "sink", true)?;
            let job = cluster.submit_sql(&passthrough_sql(&bootstrap, 1, true, None))?;
            wait_count(&reader, 3000, Duration::from_secs(60))?;
            std::thread::sleep(Duration::from_secs(2));
            let stop_at = Instant::now();
            let savepoint = cluster.stop_with_savepoint(&job)?;
            let stopped = stop_at.elapsed();
            let job2 = cluster.submit_sql(&passthrough_sql(&bootstrap, 2, true, Some(&savepoint)))?;
            let resubmitted = stop_at.elapsed();
            let before = reader.count();
            wait_count(&reader, before + 3000, Duration::from_secs(60))?;
            let produced = producer.finish()?;
            std::thread::sleep(Duration::from_secs(5));
            let seen = reader.finish();
            let (gap, flowing) = largest_gap(&seen, stop_at - Duration::from_millis(1));
            let (lost, dup) = check(&seen, produced, |_| true);
            let details = cluster_job_parallelism(&cluster, &job2)?;
            println!(
                "stop-with-savepoint {:.2} s -> {savepoint}; resubmitted at p=2 ({job2}, vertex parallelism {details:?}) {:.2} s after the stop began; largest output gap {:.2} s (flowing again {:.2} s after the stop began); produced {produced}, lost {lost}, duplicated {dup} (exactly-once, read_committed)",
                stopped.as_secs_f64(), resubmitted.as_secs_f64(), gap.as_secs_f64(), flowing.as_secs_f64()
            );
            cluster.cancel(&job2)?;
            println!("cancelled: {}", cluster.job_state(&job2)?);
        }
        other => bail!("unknown scenario {other}"),
    }
    Ok(())
}

fn report_idle(cluster: &FlinkCluster) {
    let jms: Vec<String> =
        cluster.jobmanager_pids().iter().map(|&p| format!("{p}: {:.0} MB", rss_mb(p))).collect();
    let tms: Vec<String> =
        cluster.taskmanager_pids().iter().map(|&p| format!("{p}: {:.0} MB", rss_mb(p))).collect();
    println!(
        "cluster up in {:.2} s; idle RSS JM [{}], TM [{}], gateway {:.0} MB",
        cluster.startup.as_secs_f64(),
        jms.join(", "),
        tms.join(", "),
        cluster.gateway_pid().map(rss_mb).unwrap_or(0.0)
    );
}

fn job_duration(cluster: &FlinkCluster, job: &str) -> anyhow::Result<f64> {
    let v = cluster.rest_get(&format!("/jobs/{job}"))?;
    Ok(v["duration"].as_f64().context("no duration")? / 1000.0)
}

fn cluster_job_parallelism(cluster: &FlinkCluster, job: &str) -> anyhow::Result<Vec<u64>> {
    let v = cluster.rest_get(&format!("/jobs/{job}"))?;
    Ok(flink::job_vertices(&v)?.into_iter().map(|(_, p, ..)| p).collect())
}
