//! `keel-bench`: how fast Keel passes Kafka records through, next to a bare rdkafka loop.
//!
//! On one Apache Kafka node (keel-testkit's `Kafka::single()`: a KRaft broker + controller JVM
//! on loopback, started for this run and stopped after it; or the external cluster
//! `KEEL_TEST_KAFKA_BOOTSTRAP` names) it writes `--records` records of `--size` bytes to topic
//! `in` (2 partitions) once, then runs:
//!
//! - (a) `bare`: one thread of this process consumes `in` from the earliest offset and produces
//!   every record to its output topic (rdkafka `BaseConsumer` + `BaseProducer`, acks=all, flush
//!   and check every acknowledgement at the end); `bare2`: the same on two threads, one per
//!   input partition (the bare counterpart of a parallelism-2 job);
//! - (b) the same pass-through as a Keel job (kafka source, earliest-offset -> kafka sink, raw
//!   format, `sink.delivery-guarantee: at-least-once`, acks=all) on a cluster of real `keel`
//!   processes (ResourceManager, JobManager, one TaskManager with 2 slots, local HA backend in
//!   the benchmark's directory): at parallelism 1 and 2, each with checkpoints every second and
//!   without;
//! - (c) the same job with `sink.delivery-guarantee: exactly-once` (Kafka transactions
//!   committed when a checkpoint completes; checkpoints every second, which exactly-once needs)
//!   at parallelism 1 and 2.
//!
//! Every run writes to an output topic of its own (2 partitions) with a consumer group of its
//! own, and is measured the same way: the output is read back with `read_committed` (so an
//! exactly-once run's records count only once committed), its records counted (and their
//! sequence numbers checked: nothing lost, nothing twice), and the time is the span from the
//! first to the last record's create timestamp, which the producer stamps when the record is
//! handed to it (neither the bare loop nor Keel's raw sink sets one). Start-up (job deployment,
//! the first fetch) is outside that span; the `wall s` column includes it. For exactly-once
//! runs, `commit s` is how long after the last record's timestamp every output partition had
//! no open transaction left (the last checkpoint's commit). CPU is read from /proc: the
//! TaskManager's (Keel), this process's (bare; only the loop works during it) and the broker
//! JVM's, over each run. `--repeat` repetitions go round-robin over the runs; the table shows
//! each run's median.
//!
//! Modules: [`kafka`] (input, bare loop, reading outputs), [`cluster`] (the `keel` processes
//! and client verbs), [`procfs`] (memory and CPU time from /proc).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;

use keel_testkit::Kafka;

use keel_bench::cluster::Cluster;
use keel_bench::kafka::OutputStats;
use keel_bench::{cluster, kafka, procfs};

/// Partitions of the input topic and of every output topic.
const PARTITIONS: i32 = 2;
/// Slots of the one TaskManager.
const SLOTS: u32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "keel-bench",
    about = "Kafka pass-through throughput: a bare rdkafka loop against Keel jobs"
)]
struct Args {
    /// Records in the input topic (every run passes all of them through).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Bytes per record value.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Runs to do, comma-separated, of: bare, bare2 (the bare loop on 2 threads, one per
    /// partition), p1, p1-chk, p2, p2-chk (at-least-once, without and with 1 s checkpoints),
    /// p1-eos, p2-eos (exactly-once, 1 s checkpoints).
    #[arg(long, value_delimiter = ',', default_value = "bare,bare2,p1,p1-chk,p2,p2-chk,p1-eos,p2-eos")]
    runs: Vec<String>,
    /// Repetitions of every run (round-robin over the runs); the table shows each run's median.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// The keel binary (default: $KEEL_BIN, else `keel` next to this executable).
    #[arg(long)]
    keel_bin: Option<PathBuf>,
    /// Directory for the cluster's config, HA data, checkpoints, job specs and logs (default:
    /// a new directory under the system temp dir, removed after a successful run).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the directory after a successful run.
    #[arg(long)]
    keep: bool,
    /// Longest time one run may take, in seconds.
    #[arg(long, default_value_t = 600)]
    run_timeout: u64,
}

/// One run of the table.
struct Run {
    key: &'static str,
    label: &'static str,
    /// False for the bare loop.
    keel: bool,
    /// Keel: the job's parallelism; bare: the loop's threads.
    parallelism: u32,
    checkpoints: bool,
    /// `sink.delivery-guarantee: exactly-once` (else at-least-once).
    exactly_once: bool,
}

const RUNS: [Run; 8] = [
    Run {
        key: "bare",
        label: "(a) bare rdkafka loop",
        keel: false,
        parallelism: 1,
        checkpoints: false,
        exactly_once: false,
    },
    Run {
        key: "bare2",
        label: "(a2) bare loop, 2 threads",
        keel: false,
        parallelism: 2,
        checkpoints: false,
        exactly_once: false,
    },
    Run {
        key: "p1",
        label: "(b) keel p=1",
        keel: true,
        parallelism: 1,
        checkpoints: false,
        exactly_once: false,
    },
    Run {
        key: "p1-chk",
        label: "(b) keel p=1, checkpoint 1 s",
        keel: true,
        parallelism: 1,
        checkpoints: true,
        exactly_once: false,
    },
    Run {
        key: "p2",
        label: "(b) keel p=2",
        keel: true,
        parallelism: 2,
        checkpoints: false,
        exactly_once: false,
    },
    Run {
        key: "p2-chk",
        label: "(b) keel p=2, checkpoint 1 s",
        keel: true,
        parallelism: 2,
        checkpoints: true,
        exactly_once: false,
    },
    Run {
        key: "p1-eos",
        label: "(c) keel p=1, exactly-once, 1 s",
        keel: true,
        parallelism: 1,
        checkpoints: true,
        exactly_once: true,
    },
    Run {
        key: "p2-eos",
        label: "(c) keel p=2, exactly-once, 1 s",
        keel: true,
        parallelism: 2,
        checkpoints: true,
        exactly_once: true,
    },
];

/// What a run measured.
struct Measured {
    label: &'static str,
    keel: bool,
    parallelism: u32,
    output: OutputStats,
    /// From the start of the run (loop start, `keel run`) to the last output timestamp.
    wall_s: f64,
    /// CPU seconds of the process doing the work: this process (bare) or the TaskManager.
    cpu_s: Option<f64>,
    broker_cpu_s: Option<f64>,
    /// Exactly-once: from the last record's timestamp until no output partition had an open
    /// transaction.
    commit_s: Option<f64>,
    notes: Vec<String>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.output.count as f64 / self.output.span_secs()
    }

    /// `seconds` per million output records.
    fn per_million(&self, seconds: Option<f64>) -> Option<f64> {
        let count = self.output.count as f64;
        seconds.filter(|_| count > 0.0).map(|s| s * 1e6 / count)
    }

    /// Output records per CPU second of the worker.
    fn per_cpu_second(&self) -> Option<f64> {
        self.cpu_s.filter(|s| *s > 0.0).map(|s| self.output.count as f64 / s)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("keel-bench-{}", std::process::id())));
    match bench(&args, &dir) {
        Ok(()) => {
            if !args.keep && args.dir.is_none() {
                let _ = std::fs::remove_dir_all(&dir);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keel-bench failed: {e:#}");
            eprintln!("logs, specs and config are in {}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn cpu(pid: Option<u32>) -> Option<f64> {
    pid.and_then(|p| procfs::cpu_seconds(p).ok())
}

fn diff(after: Option<f64>, before: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}

/// What every run needs to know.
struct Env<'a> {
    args: &'a Args,
    dir: &'a Path,
    bootstrap: String,
    /// Prefix of topic names and transactional ids (empty on a broker of this run's own).
    prefix: String,
    input: String,
    broker_pid: Option<u32>,
}

impl Env<'_> {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.args.run_timeout)
    }

    /// A consumer group of its own.
    fn group(&self, what: &str) -> String {
        format!("{}bench-{what}-{}", self.prefix, kafka::now_ms())
    }

    fn read_output(&self, topic: &str) -> anyhow::Result<OutputStats> {
        kafka::read_output(
            &self.bootstrap,
            topic,
            &self.group("read"),
            self.args.records,
            self.args.size,
            self.timeout(),
        )
    }
}

fn bench(args: &Args, dir: &Path) -> anyhow::Result<()> {
    for r in &args.runs {
        if !RUNS.iter().any(|run| run.key == r.as_str()) {
            let known: Vec<&str> = RUNS.iter().map(|run| run.key).collect();
            bail!("--runs: unknown run {r:?}; the runs are {}", known.join(", "));
        }
    }
    if args.records == 0 || args.repeat == 0 {
        bail!("--records and --repeat must be at least 1");
    }
    let selected: Vec<&Run> = RUNS.iter().filter(|r| args.runs.iter().any(|k| k == r.key)).collect();
    let keel = if selected.iter().any(|r| r.keel) {
        Some(cluster::keel_binary(args.keel_bin.clone())?)
    } else {
        None
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    // KEEL_TEST_KAFKA_BOOTSTRAP names an external cluster (Kafka::shared uses it); else a
    // node of this run's own, stopped when it is dropped.
    let external = std::env::var(keel_testkit::ENV_BOOTSTRAP).is_ok_and(|v| !v.trim().is_empty());
    let own;
    let broker: &Kafka = if external {
        Kafka::shared()?
    } else {
        own = Kafka::single().context("starting Apache Kafka")?;
        &own
    };
    let bootstrap = broker.bootstrap().to_string();
    // Topic names and transactional ids of their own on a shared cluster.
    let prefix = if broker.is_external() {
        format!("keel-bench-{}-{}-", std::process::id(), kafka::now_ms())
    } else {
        String::new()
    };
    let env = Env {
        args,
        dir,
        broker_pid: broker.node_ids().first().and_then(|id| broker.pid(*id)),
        input: format!("{prefix}in"),
        bootstrap,
        prefix,
    };
    println!(
        "keel-bench: {} records of {} bytes, {} repetition(s) of each run; broker {} ({}); work dir {}",
        args.records,
        args.size,
        args.repeat,
        env.bootstrap,
        if broker.is_external() {
            "external".to_string()
        } else {
            format!(
                "Apache Kafka, one KRaft node, pid {}, started in {:.1} s",
                env.broker_pid.unwrap_or_default(),
                broker.startup.as_secs_f64()
            )
        },
        dir.display()
    );
    keel_testkit::create_topic(&env.bootstrap, &env.input, PARTITIONS)?;
    let took = kafka::produce_input(&env.bootstrap, &env.input, PARTITIONS, args.records, args.size)?;
    println!(
        "input: {} records in topic {} ({PARTITIONS} partitions), produced in {:.2} s ({:.0} records/s)",
        args.records,
        env.input,
        took.as_secs_f64(),
        args.records as f64 / took.as_secs_f64()
    );

    // The cluster runs (idle) during the bare runs too, so that every run sees the same machine.
    let mut cluster = match &keel {
        Some(keel) => {
            let cluster = Cluster::start(keel, &dir.join("cluster"), SLOTS)?;
            let tm = cluster.taskmanager_pid()?;
            // Let the TaskManager settle (registration, first heartbeats) before the idle sample.
            std::thread::sleep(Duration::from_secs(2));
            let idle = procfs::memory(tm)?;
            Some((cluster, tm, idle))
        }
        None => None,
    };
    let sampler = cluster.as_ref().map(|(_, tm, _)| procfs::PeakSampler::start(*tm));

    // Repetitions go round the runs, so that a drift of the machine or broker hits all alike.
    let mut results: Vec<Vec<Measured>> = selected.iter().map(|_| Vec::new()).collect();
    for rep in 1..=args.repeat {
        for (i, run) in selected.iter().enumerate() {
            let tag = if args.repeat > 1 { format!("{}-{rep}", run.key) } else { run.key.to_string() };
            let measured = match (&mut cluster, run.keel) {
                (_, false) => bare_run(&env, run, &tag).with_context(|| format!("run {tag}"))?,
                (Some((cluster, tm, _)), true) => {
                    let m = keel_run(&env, cluster, run, &tag, *tm).with_context(|| format!("run {tag}"));
                    let m = m.and_then(|m| cluster.check_alive().map(|()| m));
                    match m {
                        Ok(m) => m,
                        Err(e) => {
                            for (name, log) in cluster.logs() {
                                eprintln!("{name} log: {}", log.display());
                            }
                            return Err(e);
                        }
                    }
                }
                (None, true) => bail!("run {tag} needs the cluster"),
            };
            println!(
                "  {:<8} {:<32} {} records in {:.2} s ({:.0} records/s)",
                tag,
                measured.label,
                measured.output.count,
                measured.output.span_secs(),
                measured.rate()
            );
            if let Some(r) = results.get_mut(i) {
                r.push(measured);
            }
        }
    }

    print_table(results, args.records);
    if let (Some((_, tm, idle)), Some(sampler)) = (&cluster, sampler) {
        let peak_rss = sampler.finish();
        let loaded = procfs::memory(*tm)?;
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!();
        println!("TaskManager resident memory (pid {tm}, /proc/{tm}/status):");
        println!(
            "  idle (before the first job):   VmRSS {:7.1} MiB   VmHWM {:7.1} MiB",
            mib(idle.rss_kib),
            mib(idle.hwm_kib)
        );
        println!(
            "  loaded (peak during the runs): VmRSS {:7.1} MiB   VmHWM {:7.1} MiB",
            mib(peak_rss),
            mib(loaded.hwm_kib)
        );
        println!("  (loaded VmRSS: the largest of samples every 100 ms; VmHWM: read after the last run)");
    }
    drop(cluster);
    Ok(())
}

/// Notes on an output that is not exactly the input.
fn check_output(stats: &OutputStats, records: u64) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(distinct) = stats.distinct {
        if distinct < records {
            notes.push(format!("MISSING {}", records - distinct));
        }
        if stats.count > distinct {
            notes.push(format!("duplicates {}", stats.count - distinct));
        }
    } else if stats.count != records {
        notes.push(format!("{} records for {records} in", stats.count));
    }
    notes
}

/// A bare loop run to topic `out-<tag>`.
fn bare_run(env: &Env<'_>, run: &Run, tag: &str) -> anyhow::Result<Measured> {
    let output = format!("{}out-{tag}", env.prefix);
    keel_testkit::create_topic(&env.bootstrap, &output, PARTITIONS)?;
    let me = Some(std::process::id());
    let (cpu0, bcpu0) = (cpu(me), cpu(env.broker_pid));
    let bare = kafka::bare_loop(
        &env.bootstrap,
        &env.input,
        PARTITIONS,
        &output,
        &env.group(tag),
        env.args.records,
        usize::try_from(run.parallelism)?,
        env.timeout(),
    )?;
    let (cpu1, bcpu1) = (cpu(me), cpu(env.broker_pid));
    let stats = env.read_output(&output)?;
    Ok(Measured {
        label: run.label,
        keel: false,
        parallelism: run.parallelism,
        wall_s: (stats.last_ts - bare.started_ms) as f64 / 1000.0,
        notes: check_output(&stats, env.args.records),
        output: stats,
        cpu_s: diff(cpu1, cpu0),
        broker_cpu_s: diff(bcpu1, bcpu0),
        commit_s: None,
    })
}

/// A Keel job run to topic `out-<tag>`: submitted with `keel run`, done when its tasks report
/// every record written, then read back and canceled.
fn keel_run(env: &Env<'_>, cluster: &Cluster, run: &Run, tag: &str, tm: u32) -> anyhow::Result<Measured> {
    let args = env.args;
    let parallelism = run.parallelism;
    let job = format!("bench-{tag}");
    let output = format!("{}out-{tag}", env.prefix);
    keel_testkit::create_topic(&env.bootstrap, &output, PARTITIONS)?;
    let config = if run.checkpoints { "config:\n  execution.checkpointing.interval: 1 s\n" } else { "" };
    let guarantee = if run.exactly_once {
        format!(
            "sink.delivery-guarantee: exactly-once\n    sink.transactional-id-prefix: {}bench-{tag}",
            env.prefix
        )
    } else {
        "sink.delivery-guarantee: at-least-once".to_string()
    };
    let spec = format!(
        r#"name: {job}
parallelism: {parallelism}
{config}sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: '{bootstrap}'
    properties.group.id: {group}
    scan.startup.mode: earliest-offset
    format: raw
sinks:
  - name: out
    connector: kafka
    from: in
    topic: {output}
    properties.bootstrap.servers: '{bootstrap}'
    properties.acks: all
    {guarantee}
    format: raw
"#,
        input = env.input,
        bootstrap = env.bootstrap,
        group = env.group(tag)
    );
    let path = env.dir.join(format!("{job}.yaml"));
    std::fs::write(&path, spec).with_context(|| format!("writing {}", path.display()))?;

    let (cpu0, bcpu0) = (cpu(Some(tm)), cpu(env.broker_pid));
    let started_ms = kafka::now_ms();
    cluster.run(&path)?;
    // Done when the tasks report every record written (the output is then read back to count).
    let deadline = Instant::now() + env.timeout();
    let mut last: String;
    loop {
        match cluster.status(&job) {
            Ok(s) => {
                let tasks = s["tasks"].as_array().cloned().unwrap_or_default();
                let out: u64 = tasks.iter().filter_map(|t| t["records_out"].as_u64()).sum();
                if out >= args.records {
                    break;
                }
                let state = s["job"]["state"].as_str().unwrap_or_default().to_ascii_lowercase();
                if state == "failed" || state == "canceled" || state == "finished" {
                    bail!("job {job} is {state}: {}", s["status_message"]);
                }
                last = format!("{out} records out, job {state}, {}", s["status_message"]);
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!(
                "job {job} did not write {} records within {}s; last: {last}",
                args.records,
                args.run_timeout
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (cpu1, bcpu1) = (cpu(Some(tm)), cpu(env.broker_pid));
    let committed_ms = if run.exactly_once {
        Some(kafka::wait_all_committed(&env.bootstrap, &output, PARTITIONS, env.timeout())?)
    } else {
        None
    };
    let stats = env.read_output(&output)?;
    let status = cluster.status(&job)?;
    cluster.cancel(&job)?;

    let mut notes = check_output(&stats, args.records);
    if run.checkpoints {
        let completed = status["checkpoints"]
            .as_array()
            .map(|cs| cs.iter().filter(|c| c["state"] == "completed").count())
            .unwrap_or(0);
        let last_id = status["checkpoints"]
            .as_array()
            .and_then(|cs| cs.iter().filter_map(|c| c["id"].as_u64()).max())
            .unwrap_or(0);
        notes.push(format!("checkpoints: last id {last_id}, {completed} completed listed"));
    }
    let restarts = status["restarts"].as_u64().unwrap_or(0);
    if restarts > 0 {
        notes.push(format!("RESTARTS {restarts}"));
    }
    Ok(Measured {
        label: run.label,
        keel: true,
        parallelism,
        wall_s: (stats.last_ts - started_ms) as f64 / 1000.0,
        commit_s: committed_ms.map(|c| (c - stats.last_ts) as f64 / 1000.0),
        output: stats,
        cpu_s: diff(cpu1, cpu0),
        broker_cpu_s: diff(bcpu1, bcpu0),
        notes,
    })
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}")).unwrap_or_else(|| "-".into())
}

/// The median of a run's repetitions by throughput, and the range of their throughputs.
fn median(mut reps: Vec<Measured>) -> Option<(Measured, f64, f64)> {
    reps.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let min = reps.first()?.rate();
    let max = reps.last()?.rate();
    let mid = reps.len() / 2;
    let m = reps.into_iter().nth(mid)?;
    Some((m, min, max))
}

fn print_table(results: Vec<Vec<Measured>>, records: u64) {
    let rows: Vec<(Measured, f64, f64, usize)> = results
        .into_iter()
        .filter_map(|reps| {
            let n = reps.len();
            median(reps).map(|(m, min, max)| (m, min, max, n))
        })
        .collect();
    let bare = |threads: u32| {
        rows.iter().find(|(m, ..)| !m.keel && m.parallelism == threads).map(|(m, ..)| m.rate())
    };
    println!();
    println!(
        "throughput = records / (last - first output record timestamp); {records} records in, each run to"
    );
    println!("its own output topic; with repetitions, the run with the median throughput is shown");
    println!(
        "{:<32} {:>8} {:>6} {:>9} {:>5} {:>7} {:>13} {:>6} {:>6} {:>8} {:>8} {:>8}  notes",
        "run",
        "records",
        "secs",
        "records/s",
        "ratio",
        "ratio=p",
        "range rec/s",
        "wall s",
        "commit",
        "cpu s/M",
        "rec/cpus",
        "brkr s/M"
    );
    for (m, min, max, n) in &rows {
        let ratio =
            |base: Option<f64>| base.map(|b| format!("{:.2}", m.rate() / b)).unwrap_or_else(|| "-".into());
        let range = if *n > 1 { format!("{:.0}-{:.0}", min, max) } else { "-".into() };
        println!(
            "{:<32} {:>8} {:>6.2} {:>9.0} {:>5} {:>7} {:>13} {:>6.2} {:>6} {:>8} {:>8} {:>8}  {}",
            m.label,
            m.output.count,
            m.output.span_secs(),
            m.rate(),
            ratio(bare(1)),
            ratio(bare(m.parallelism)),
            range,
            m.wall_s,
            fmt_opt(m.commit_s, 2),
            fmt_opt(m.per_million(m.cpu_s), 2),
            fmt_opt(m.per_cpu_second(), 0),
            fmt_opt(m.per_million(m.broker_cpu_s), 2),
            m.notes.join("; ")
        );
    }
    for line in [
        "ratio: to (a), the one-thread bare loop; ratio=p: to the bare loop with as many threads as the job",
        "  has subtasks (a2 for p=2). range: slowest-fastest repetition. wall s: from the start of the run",
        "  (bare loop start / `keel run`) to the last output record. commit: exactly-once only, seconds from",
        "  the last record's timestamp until no output partition had an open transaction (read_committed",
        "  readers see everything). cpu s/M: CPU seconds per million records of the process doing the work",
        "  (bare: keel-bench, whose only busy threads are the loop's; keel: the TaskManager), rec/cpus: records",
        "  per CPU second of it; brkr s/M: the broker JVM's CPU seconds per million records. All CPU is",
        "  user+system time from /proc/<pid>/stat over the run (keel: `keel run` until every record is out).",
    ] {
        println!("{line}");
    }
}
