//! `keel-versus`: the same Kafka jobs on Apache Flink, on Kafka Streams and on Keel, on one
//! Apache Kafka broker, one system after the other on the same machine, every figure from the
//! same run. `scripts/bench.sh --peer flink,streams` installs the peers and runs it;
//! docs/benchmarks.md says what each figure means and shows the last table.
//!
//! The parts (`--parts`, all by default):
//! - `throughput`: the input topics hold `--records` numbered people (2 partitions), written
//!   once; each system runs pass-through (CSV) and filter + projection (JSON, `age >= 18`) at
//!   parallelism 1 and 2, at-least-once and exactly-once with 1 s checkpoints. A run's rate is
//!   its output records over the span of their broker append times, its CPU the worker
//!   processes' CPU seconds over that span (sampled from /proc every 100 ms).
//! - `cost`: datagen -> blackhole, `--datagen-rows` rows at parallelism 1: rows per worker
//!   CPU-second over the whole job.
//! - `faults`: a steady load of `--rate` records/s into a pass-through job at parallelism 1,
//!   at-least-once with 1 s checkpoints; `--kills` times the worker running it is killed -9
//!   (and started again once the output flows), then the leading master is. Each time: how long
//!   until the output flows again on every partition, and how many records came out twice.
//! - `changes`: the same load into an exactly-once pass-through job; it is upgraded (Keel: a
//!   handover; Flink: stop-with-savepoint and a new job from the savepoint) and then rescaled
//!   1 -> 2. Each time: the largest gap in the output, and lost / duplicated at the end.
//!
//! Memory: the RSS of a worker before any job, its peak over the throughput runs, and the
//! leading master's after them.

mod flink_peer;
mod peers;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use keel_bench::kafka::now_ms;
use keel_bench::procfs::{self, UsageSampler};
use keel_bench::report::{self, Better, Goal, Row, Unit};
use keel_bench::streams::{self, StreamsInstance, StreamsJob, StreamsOptions};
use keel_bench::workload::{self, JobKind, OutputLog, Seen, SteadyLoad, Tally};
use keel_testkit::Kafka;

use crate::peers::{JobDef, KeelPeer, Peer};

/// Partitions of every input and output topic.
const PARTITIONS: u64 = 2;
/// After a master kill, the output counts as flowing again at the end of its last pause longer
/// than this (at the steady load's rate records arrive every few milliseconds).
const MASTER_PAUSE: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(
    name = "keel-versus",
    about = "The same Kafka jobs on Apache Flink, Kafka Streams and Keel, side by side"
)]
struct Args {
    /// Peers to run beside Keel, comma-separated: flink, streams (or none).
    #[arg(long, value_delimiter = ',', default_value = "flink,streams")]
    peers: Vec<String>,
    /// Parts to run, comma-separated: throughput, cost, faults, changes.
    #[arg(long, value_delimiter = ',', default_value = "throughput,cost,faults,changes")]
    parts: Vec<String>,
    /// Throughput runs to do (all by default): those whose name contains one of these,
    /// comma-separated (names: `pass-through p1 at-least-once`, `filter-projection p2
    /// exactly-once`, ...).
    #[arg(long, value_delimiter = ',')]
    runs: Vec<String>,
    /// Throughput runs without a warm-up run first (by default every system first passes the
    /// pass-through input once, unmeasured, so that a JVM's just-in-time compiler has done its
    /// work before the measured runs: a first run of Flink spends most of its CPU compiling).
    #[arg(long)]
    no_warmup: bool,
    /// Records in each input topic of the throughput runs.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Rows of the datagen -> blackhole run.
    #[arg(long, default_value_t = 20_000_000)]
    datagen_rows: u64,
    /// Records per second of the steady load of the faults and changes parts.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Worker kills in the faults part (the median is reported).
    #[arg(long, default_value_t = 3)]
    kills: u32,
    /// Seconds of steady output before and after each event.
    #[arg(long, default_value_t = 8)]
    settle: u64,
    /// Least seconds between two worker kills. Keel restarts at once after the loss of a
    /// TaskManager only when the job had no failure for `restart-strategy.taskmanager-loss.
    /// quiet-period` (1 min by default; a loss sooner waits the growing backoff, as a crash
    /// loop should), so the default spaces the kills by more than that.
    #[arg(long, default_value_t = 65)]
    kill_spacing: u64,
    /// A further option of every Keel job's Kafka source, `KEY=VALUE` (repeatable), for
    /// experiments (e.g. `properties.queued.min.messages=10000`).
    #[arg(long)]
    keel_source_option: Vec<String>,
    /// Skip Keel (to try a peer alone).
    #[arg(long)]
    no_keel: bool,
    /// The keel binary (default: `keel` next to this executable).
    #[arg(long)]
    keel_bin: Option<PathBuf>,
    /// The etcd binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// The repository (for the install scripts of the peers).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Working directory (logs, configs, specs, checkpoints); default: a new one under the
    /// system temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where to write the report (Markdown), the timeline CSV and the chart's data.
    #[arg(long, default_value = "target/versus")]
    out: PathBuf,
}

/// A system's memory: (label, idle worker RSS KiB, peak loaded worker RSS KiB, master RSS KiB).
type MemoryRow = (String, Option<u64>, Option<u64>, Option<u64>);
/// A timeline: (system, part, start ms, records received per second).
type TimelineRow = (String, String, i64, Vec<(i64, u64)>);

/// What the run found, per system (`Keel`, `Flink`, `Flink (heartbeat ...)`, `Kafka Streams`).
#[derive(Default)]
struct Findings {
    /// (system, run key) -> measured throughput run.
    throughput: Vec<(String, String, Throughput)>,
    /// system -> rows per worker CPU-second of datagen -> blackhole.
    cost: Vec<(String, f64, f64)>,
    /// system -> (idle worker RSS KiB, loaded worker RSS KiB, master RSS KiB).
    memory: Vec<MemoryRow>,
    /// system -> events of the faults and changes parts.
    events: Vec<(String, Event)>,
    /// system -> lost and duplicated of every run, by guarantee.
    tallies: Vec<(String, bool, Tally)>,
    /// (system, part, start_ms, records per second): the chart's data.
    timelines: Vec<TimelineRow>,
    notes: Vec<String>,
}

#[derive(Debug, Clone)]
struct Throughput {
    records: u64,
    span_s: f64,
    cpu_s: Option<f64>,
}

impl Throughput {
    fn rate(&self) -> f64 {
        self.records as f64 / self.span_s.max(0.001)
    }
    fn per_core(&self) -> Option<f64> {
        self.cpu_s.filter(|c| *c > 0.0).map(|c| self.records as f64 / c)
    }
}

#[derive(Debug, Clone)]
struct Event {
    part: String,
    label: String,
    at_ms: i64,
    /// Until the output flowed again on every partition.
    recovery: Option<Duration>,
    /// The largest gap between output records around the event.
    gap: Duration,
    /// Records written twice because of it.
    replayed: u64,
}

/// The broker and the topics' names.
struct Env {
    bootstrap: String,
    prefix: String,
    dir: PathBuf,
    args: Args,
    /// The input topic of each kind for the throughput runs (filled once).
    inputs: Vec<(JobKind, String)>,
}

impl Env {
    fn topic(&self, what: &str) -> String {
        format!("{}{what}-{}", self.prefix, now_ms())
    }

    /// A topic of 2 partitions; output topics time their records by the broker's append.
    fn create(&self, name: &str, output: bool) -> anyhow::Result<()> {
        let configs: &[(&str, &str)] =
            if output { &[("message.timestamp.type", "LogAppendTime")] } else { &[] };
        keel_testkit::create_topic_with(&self.bootstrap, name, PARTITIONS as i32, configs)
    }

    fn input_of(&self, kind: JobKind) -> anyhow::Result<String> {
        self.inputs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| anyhow!("no input topic for {}", kind.key()))
    }

    fn job(
        &self,
        name: &str,
        kind: JobKind,
        parallelism: u32,
        exactly_once: bool,
        input: &str,
    ) -> anyhow::Result<JobDef> {
        let output = self.topic(&format!("{name}-out"));
        self.create(&output, true)?;
        Ok(JobDef {
            name: format!("{name}-{}", now_ms() % 1_000_000),
            kind,
            parallelism,
            exactly_once,
            input: input.to_string(),
            output,
            bootstrap: self.bootstrap.clone(),
        })
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-versus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = Args::parse();
    args.peers.retain(|p| p != "none");
    for p in &args.peers {
        if !["flink", "streams"].contains(&p.as_str()) {
            bail!("--peers: unknown peer {p:?} (flink, streams)");
        }
    }
    for p in &args.parts {
        if !["throughput", "cost", "faults", "changes"].contains(&p.as_str()) {
            bail!("--parts: unknown part {p:?} (throughput, cost, faults, changes)");
        }
    }
    let keel = keel_bench::cluster::keel_binary(args.keel_bin.clone())?;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("keel-versus-{}", now_ms())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let repo = args.repo.canonicalize().with_context(|| format!("the repository {}", args.repo.display()))?;
    let flink_home =
        if args.peers.iter().any(|p| p == "flink") { Some(flink_peer::install(&repo)?) } else { None };
    let streams_app =
        if args.peers.iter().any(|p| p == "streams") { Some(streams::install(&repo)?) } else { None };

    println!("keel-versus: working directory {}", dir.display());
    let started = Instant::now();
    let kafka = Kafka::single().context("starting the Kafka broker")?;
    println!(
        "Apache Kafka broker at {} (started in {:.1} s)",
        kafka.bootstrap(),
        kafka.startup.as_secs_f64()
    );
    let mut env = Env {
        bootstrap: kafka.bootstrap().to_string(),
        prefix: format!("versus-{}-", std::process::id()),
        dir: dir.clone(),
        args,
        inputs: Vec::new(),
    };
    if env.args.parts.iter().any(|p| p == "throughput") {
        for kind in JobKind::ALL {
            let topic = env.topic(&format!("in-{}", kind.key()));
            env.create(&topic, false)?;
            let t = Instant::now();
            workload::preload(&env.bootstrap, &topic, PARTITIONS, kind, 0, env.args.records)?;
            println!("input {topic}: {} records in {:.1} s", env.args.records, t.elapsed().as_secs_f64());
            env.inputs.push((kind, topic));
        }
    }
    let mut found = Findings::default();

    if !env.args.no_keel {
        let mut keel_peer = KeelPeer::start(&keel, &env.args.etcd_bin, &dir.join("keel"))?;
        for o in &env.args.keel_source_option {
            let (k, v) =
                o.split_once('=').ok_or_else(|| anyhow!("--keel-source-option {o:?} is not KEY=VALUE"))?;
            keel_peer.source_options.push((k.trim().to_string(), v.trim().to_string()));
        }
        system_parts(&env, &mut keel_peer, &mut found, true)?;
    }
    // Flink with its defaults (ZooKeeper HA, a standby JobManager), then with Keel's heartbeats.
    if let Some(home) = &flink_home {
        {
            let mut flink = flink_peer::FlinkPeer::start(home, &dir.join("flink"), None)?;
            system_parts(&env, &mut flink, &mut found, true)?;
        }
        if env.args.parts.iter().any(|p| p == "faults") {
            let mut flink = flink_peer::FlinkPeer::start(home, &dir.join("flink-hb"), Some(KEEL_HEARTBEATS))?;
            faults(&env, &mut flink, &mut found)?;
        }
    }
    if let Some(app) = &streams_app {
        streams_parts(&env, app, &mut found)?;
    }

    let rows = rows(&env, &found, flink_home.as_ref());
    let table = report::text_table(&rows);
    println!("\n{table}");
    let detail = throughput_table(&found);
    println!("{detail}");
    for n in &found.notes {
        println!("note: {n}");
    }
    write_outputs(&env, &found, &rows, flink_home.as_ref(), streams_app.as_ref(), started.elapsed())?;
    drop(kafka);
    Ok(())
}

/// Keel's default heartbeat interval and timeout, given to Flink in its second run.
const KEEL_HEARTBEATS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(5));

/// Every part `--parts` names, on one system.
fn system_parts(env: &Env, peer: &mut dyn Peer, found: &mut Findings, memory: bool) -> anyhow::Result<()> {
    let label = peer.label();
    let idle = worker_rss(peer);
    let mut loaded_peak = None;
    if env.args.parts.iter().any(|p| p == "throughput") {
        if !env.args.no_warmup {
            let (t, _) = throughput(env, peer, JobKind::PassThrough, 1, false, found)?;
            found.tallies.pop();
            println!("{label}: warm-up run done ({:.0} records/s), not counted", t.rate());
        }
        for kind in JobKind::ALL {
            for parallelism in [1, 2] {
                for exactly_once in [false, true] {
                    let key = run_key(kind, parallelism, exactly_once);
                    if !env.args.runs.is_empty() && !env.args.runs.iter().any(|r| key.contains(r.as_str())) {
                        continue;
                    }
                    let (t, peak) = throughput(env, peer, kind, parallelism, exactly_once, found)?;
                    loaded_peak = loaded_peak.max(Some(peak));
                    found.throughput.push((label.clone(), run_key(kind, parallelism, exactly_once), t));
                }
            }
        }
    }
    if env.args.parts.iter().any(|p| p == "cost") {
        let pids = peer.worker_pids();
        let sampler = UsageSampler::start(pids);
        let name = format!("cost-{}", now_ms() % 1_000_000);
        let t = Instant::now();
        peer.datagen(&name, env.args.datagen_rows)?;
        let wall = t.elapsed().as_secs_f64();
        let (samples, _) = sampler.finish();
        let cpu = procfs::cpu_between(&samples, i64::MIN, i64::MAX).unwrap_or_default();
        println!(
            "{label}: datagen -> blackhole {} rows in {wall:.1} s, {cpu:.2} worker CPU s",
            env.args.datagen_rows
        );
        found.cost.push((label.clone(), env.args.datagen_rows as f64 / cpu.max(0.001), cpu));
    }
    if memory {
        let master = peer.leader_pid().ok().and_then(|p| procfs::memory(p).ok()).map(|m| m.rss_kib);
        found.memory.push((label.clone(), idle, loaded_peak.filter(|p| *p > 0), master));
    }
    if env.args.parts.iter().any(|p| p == "faults") {
        faults(env, peer, found)?;
    }
    if env.args.parts.iter().any(|p| p == "changes") {
        changes(env, peer, found)?;
    }
    Ok(())
}

fn worker_rss(peer: &dyn Peer) -> Option<u64> {
    peer.worker_pids().iter().filter_map(|p| procfs::memory(*p).ok()).map(|m| m.rss_kib).max()
}

fn run_key(kind: JobKind, parallelism: u32, exactly_once: bool) -> String {
    format!("{} p{parallelism} {}", kind.key(), if exactly_once { "exactly-once" } else { "at-least-once" })
}

/// Sum of the high watermarks of `topic`'s partitions.
fn end_offsets(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<i64> {
    let mut sum = 0;
    for p in 0..PARTITIONS as i32 {
        sum += consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?.1;
    }
    Ok(sum)
}

/// One throughput run; returns it and the largest worker RSS seen (KiB).
fn throughput(
    env: &Env,
    peer: &mut dyn Peer,
    kind: JobKind,
    parallelism: u32,
    exactly_once: bool,
    found: &mut Findings,
) -> anyhow::Result<(Throughput, u64)> {
    let key = run_key(kind, parallelism, exactly_once);
    let input = env.input_of(kind)?;
    let job =
        env.job(&format!("tp-{}-p{parallelism}", kind.key()), kind, parallelism, exactly_once, &input)?;
    let expected = kind.expected(env.args.records);
    let sampler = UsageSampler::start(peer.worker_pids());
    let watch: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &env.bootstrap).set("log_level", "3").create()?;
    peer.submit(&job)?;
    wait_output_settled(&watch, &job.output, expected, &format!("{}: {key}", peer.label()))?;
    let (samples, peak) = sampler.finish();
    peer.cancel(&job)?;
    let (t, tally) = measure_output(env, &peer.label(), &key, &job, &samples, found)?;
    println!(
        "{}: {key}: {} records in {:.2} s = {:.0}/s, worker CPU {:.2} s, {} lost, {} duplicated",
        peer.label(),
        t.records,
        t.span_s,
        t.rate(),
        t.cpu_s.unwrap_or(f64::NAN),
        tally.lost,
        tally.duplicated
    );
    Ok((t, peak))
}

/// Waits until `topic` holds at least `expected` records (an exactly-once topic also holds the
/// transactions' markers) and has not grown for 2 s: the job has passed its whole input.
fn wait_output_settled(watch: &BaseConsumer, topic: &str, expected: u64, what: &str) -> anyhow::Result<()> {
    let expected = i64::try_from(expected)?;
    let deadline = Instant::now() + peers::JOB_TIMEOUT;
    let mut last = (-1, Instant::now());
    loop {
        let end = end_offsets(watch, topic)?;
        if end != last.0 {
            last = (end, Instant::now());
        }
        if end >= expected && last.1.elapsed() >= Duration::from_secs(2) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: the output has {end} of {expected} records after {:?}", peers::JOB_TIMEOUT);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads a throughput run's whole output back, counts it against the input (recorded in
/// `found`), and measures its rate and the CPU the `samples` show over its span.
fn measure_output(
    env: &Env,
    label: &str,
    key: &str,
    job: &JobDef,
    samples: &[procfs::Usage],
    found: &mut Findings,
) -> anyhow::Result<(Throughput, Tally)> {
    let log = OutputLog::start(&env.bootstrap, &job.output, job.kind, job.exactly_once)?;
    log.wait_distinct(job.kind.expected(env.args.records), Duration::from_secs(1), peers::JOB_TIMEOUT)?;
    let (seen, bad, bad_count) = log.finish()?;
    note_bad(found, label, key, &bad, bad_count);
    let tally = Tally::of(job.kind, env.args.records, &seen);
    found.tallies.push((label.to_string(), job.exactly_once, tally));
    let first = seen.iter().map(|s| s.at_ms).min().unwrap_or_default();
    let last = seen.iter().map(|s| s.at_ms).max().unwrap_or_default();
    let cpu_s = procfs::cpu_between(samples, first, last);
    Ok((Throughput { records: tally.count, span_s: (last - first) as f64 / 1000.0, cpu_s }, tally))
}

fn note_bad(found: &mut Findings, label: &str, key: &str, bad: &[String], count: u64) {
    if count > 0 {
        found
            .notes
            .push(format!("{label}: {key}: {count} output records were not the job's: {}", bad.join("; ")));
    }
}

/// Waits until `seen` (re-read with `snapshot`) shows the output flowing again after an event
/// at `at_ms` whose first fresh id is `next_id`.
fn wait_recovery(log: &OutputLog, at_ms: i64, next_id: u64) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + peers::JOB_TIMEOUT;
    loop {
        if let Some(d) = workload::recovery(&log.snapshot(), at_ms, next_id, PARTITIONS) {
            return Ok(d);
        }
        if Instant::now() > deadline {
            bail!("the output did not flow again within {:?} of the event", peers::JOB_TIMEOUT);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every id below `upto` that belongs in the output is in it.
fn wait_caught_up(log: &OutputLog, kind: JobKind, upto: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + peers::JOB_TIMEOUT;
    loop {
        let seen = log.snapshot();
        let below: Vec<Seen> = seen.into_iter().filter(|s| s.id < upto).collect();
        if workload::distinct_ids(&below) >= kind.expected(upto) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the output did not catch up with record {upto} within {:?}", peers::JOB_TIMEOUT);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A steady load into a job of its own, the log of its output, and the events on it.
struct Timeline {
    part: String,
    kind: JobKind,
    /// `None` once drained.
    load: Option<SteadyLoad>,
    log: OutputLog,
    start_ms: i64,
    events: Vec<Event>,
}

impl Timeline {
    fn start(env: &Env, part: &str, committed: bool) -> anyhow::Result<(Timeline, String, String)> {
        let kind = JobKind::PassThrough;
        let input = env.topic(&format!("{part}-in"));
        env.create(&input, false)?;
        let output = env.topic(&format!("{part}-out"));
        env.create(&output, true)?;
        let log = OutputLog::start(&env.bootstrap, &output, kind, committed)?;
        let start_ms = now_ms();
        let load = SteadyLoad::start(&env.bootstrap, &input, PARTITIONS, kind, env.args.rate)?;
        Ok((
            Timeline { part: part.into(), kind, load: Some(load), log, start_ms, events: Vec::new() },
            input,
            output,
        ))
    }

    /// The next id the load writes.
    fn next_id(&self) -> u64 {
        self.load.as_ref().map(SteadyLoad::next_id).unwrap_or_default()
    }

    /// Waits until the output has everything written so far, then `settle` seconds more.
    fn settle(&self, env: &Env) -> anyhow::Result<()> {
        wait_caught_up(&self.log, self.kind, self.next_id())?;
        // A benchmark's steady phase (not a test's wait): the chart shows the flow between events.
        std::thread::sleep(Duration::from_secs(env.args.settle));
        Ok(())
    }

    /// Waits until `--kill-spacing` seconds have passed since the last event (a benchmark's
    /// steady phase, not a test's wait).
    fn space(&self, env: &Env) {
        if let Some(last) = self.events.last() {
            let due = last.at_ms + i64::try_from(env.args.kill_spacing).unwrap_or(0) * 1000;
            let left = due - now_ms();
            if left > 0 {
                std::thread::sleep(Duration::from_millis(left.unsigned_abs()));
            }
        }
    }

    /// Runs `action` as event `label`, waits until the output flows again and has caught up.
    fn event(&mut self, label: &str, action: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        let next_id = self.next_id();
        let at_ms = now_ms();
        action().with_context(|| label.to_string())?;
        let recovery = wait_recovery(&self.log, at_ms, next_id)?;
        wait_caught_up(&self.log, self.kind, self.next_id())?;
        println!("  {label}: output flowing again after {:.2} s", recovery.as_secs_f64());
        self.events.push(Event {
            part: self.part.clone(),
            label: label.into(),
            at_ms,
            recovery: Some(recovery),
            gap: Duration::ZERO,
            replayed: 0,
        });
        Ok(())
    }

    /// Stops the load and waits until the output has all of it (before the job is stopped);
    /// returns how many records were written.
    fn drain(&mut self) -> anyhow::Result<u64> {
        let load = self.load.take().ok_or_else(|| anyhow!("the load was stopped already"))?;
        let produced = load.stop()?;
        self.log.wait_distinct(self.kind.expected(produced), Duration::from_secs(2), peers::JOB_TIMEOUT)?;
        Ok(produced)
    }

    /// Fills in each event's gap and replays from the whole output of `produced` records.
    fn finish(mut self, found: &mut Findings, label: &str, produced: u64) -> anyhow::Result<()> {
        let (seen, bad, bad_count) = self.log.finish()?;
        note_bad(found, label, &self.part, &bad, bad_count);
        let tally = Tally::of(self.kind, produced, &seen);
        let exactly_once = self.part == "changes";
        found.tallies.push((label.to_string(), exactly_once, tally));
        let end = seen.iter().map(|s| s.at_ms).max().unwrap_or(i64::MAX);
        let times: Vec<i64> = self.events.iter().map(|e| e.at_ms).chain([end]).collect();
        for (i, e) in self.events.iter_mut().enumerate() {
            let until = times[i + 1];
            e.gap = workload::largest_gap(&seen, e.at_ms - 1000, until);
            e.replayed = workload::replayed(&seen, e.at_ms, until);
        }
        println!(
            "{label}: {}: {produced} records in, {} out, {} lost, {} duplicated; {}",
            self.part,
            tally.count,
            tally.lost,
            tally.duplicated,
            self.events
                .iter()
                .map(|e| format!("{} gap {:.2} s, {} replayed", e.label, e.gap.as_secs_f64(), e.replayed))
                .collect::<Vec<_>>()
                .join("; ")
        );
        found.timelines.push((
            label.to_string(),
            self.part.clone(),
            self.start_ms,
            workload::per_second(&seen, self.start_ms),
        ));
        found.events.extend(self.events.into_iter().map(|e| (label.to_string(), e)));
        Ok(())
    }
}

/// Worker kills, then a master kill, under a steady load (at-least-once).
fn faults(env: &Env, peer: &mut dyn Peer, found: &mut Findings) -> anyhow::Result<()> {
    let label = peer.label();
    println!("{label}: faults");
    let (mut tl, input, output) = Timeline::start(env, "faults", false)?;
    let job = JobDef {
        name: format!("faults-{}", now_ms() % 1_000_000),
        kind: tl.kind,
        parallelism: 1,
        exactly_once: false,
        input,
        output,
        bootstrap: env.bootstrap.clone(),
    };
    peer.submit(&job)?;
    tl.settle(env)?;
    for i in 1..=env.args.kills {
        let victim = peer.worker_of(&job)?;
        tl.event(&format!("worker kill {i}"), || peer.kill(victim))?;
        peer.heal()?;
        tl.settle(env)?;
        if i < env.args.kills {
            tl.space(env);
        }
    }
    let leader = peer.leader_pid()?;
    let next_id = tl.next_id();
    let at_ms = now_ms();
    peer.kill(leader)?;
    peer.wait_new_leader_running(&job, leader)?;
    let running_ms = now_ms();
    // A master's death may stop the output only later (Flink restarts the job when the new
    // leader takes over): watch the output for a while after the job runs under the new leader.
    std::thread::sleep(Duration::from_secs(env.args.settle));
    wait_caught_up(&tl.log, tl.kind, tl.next_id())?;
    let fresh = wait_recovery(&tl.log, at_ms, next_id)?;
    let resumed = workload::last_resume_after_pause(&tl.log.snapshot(), at_ms, now_ms(), MASTER_PAUSE);
    let recovery =
        resumed.map(|r| Duration::from_millis((r - at_ms).unsigned_abs())).unwrap_or(fresh).max(fresh);
    println!(
        "  master kill: a new leader ran the job after {:.2} s; output flowing for good after {:.2} s",
        (running_ms - at_ms) as f64 / 1000.0,
        recovery.as_secs_f64()
    );
    found.notes.push(format!(
        "{label}: master kill: a new leader ran the job {:.2} s after the kill",
        (running_ms - at_ms) as f64 / 1000.0
    ));
    tl.events.push(Event {
        part: tl.part.clone(),
        label: "master kill".into(),
        at_ms,
        recovery: Some(recovery),
        gap: Duration::ZERO,
        replayed: 0,
    });
    peer.heal()?;
    tl.settle(env)?;
    let produced = tl.drain()?;
    peer.cancel(&job)?;
    tl.finish(found, &label, produced)
}

/// An upgrade, then a rescale 1 -> 2, under a steady load (exactly-once).
fn changes(env: &Env, peer: &mut dyn Peer, found: &mut Findings) -> anyhow::Result<()> {
    let label = peer.label();
    println!("{label}: changes");
    let (mut tl, input, output) = Timeline::start(env, "changes", true)?;
    let v1 = JobDef {
        name: format!("changes-{}", now_ms() % 1_000_000),
        kind: tl.kind,
        parallelism: 1,
        exactly_once: true,
        input,
        output,
        bootstrap: env.bootstrap.clone(),
    };
    peer.submit(&v1)?;
    tl.settle(env)?;
    tl.event("upgrade", || peer.upgrade(&v1, &v1))?;
    tl.settle(env)?;
    let v2 = JobDef { parallelism: 2, ..v1.clone() };
    tl.event("rescale 1 -> 2", || peer.upgrade(&v1, &v2))?;
    tl.settle(env)?;
    let produced = tl.drain()?;
    peer.cancel(&v2)?;
    tl.finish(found, &label, produced)
}

/// Kafka Streams: throughput of the pass-through job (one instance, one thread), and kills of
/// one of two instances under a steady load.
fn streams_parts(env: &Env, app: &streams::StreamsApp, found: &mut Findings) -> anyhow::Result<()> {
    let label = "Kafka Streams".to_string();
    let dir = env.dir.join("streams");
    std::fs::create_dir_all(&dir)?;
    if env.args.parts.iter().any(|p| p == "throughput") {
        for exactly_once in [false, true] {
            let kind = JobKind::PassThrough;
            let key = run_key(kind, 1, exactly_once);
            if !env.args.runs.is_empty() && !env.args.runs.iter().any(|r| key.contains(r.as_str())) {
                continue;
            }
            let input = env.input_of(kind)?;
            let job = env.job("streams-tp", kind, 1, exactly_once, &input)?;
            let mut opts = StreamsOptions::new(
                &dir,
                &env.bootstrap,
                &job.name,
                &input,
                &job.output,
                StreamsJob::PassThrough,
            );
            opts.exactly_once = exactly_once;
            let watch: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &env.bootstrap)
                .set("log_level", "3")
                .create()?;
            let mut instance = StreamsInstance::start(app, &opts, &job.name)?;
            let sampler = UsageSampler::start(vec![instance.pid()]);
            wait_output_settled(&watch, &job.output, env.args.records, &format!("{label}: {key}"))?;
            let (samples, peak) = sampler.finish();
            instance.stop()?;
            let (t, tally) = measure_output(env, &label, &key, &job, &samples, found)?;
            let cpu = t.cpu_s;
            println!(
                "{label}: {key}: {} records in {:.2} s = {:.0}/s, CPU {:.2} s, peak RSS {} MiB, {} lost, {} duplicated",
                t.records,
                t.span_s,
                t.rate(),
                cpu.unwrap_or(f64::NAN),
                peak / 1024,
                tally.lost,
                tally.duplicated
            );
            found.throughput.push((label.clone(), key, t));
            if found.memory.iter().all(|(l, ..)| *l != label) {
                found.memory.push((label.clone(), None, Some(peak), None));
            }
        }
    }
    if env.args.parts.iter().any(|p| p == "faults") {
        println!("{label}: faults");
        let (mut tl, input, output) = Timeline::start(env, "faults", false)?;
        let app_id = format!("streams-faults-{}", now_ms() % 1_000_000);
        let mut opts =
            StreamsOptions::new(&dir, &env.bootstrap, &app_id, &input, &output, StreamsJob::PassThrough);
        opts.exactly_once = false;
        let mut instances = vec![
            StreamsInstance::start(app, &opts, &format!("{app_id}-a"))?,
            StreamsInstance::start(app, &opts, &format!("{app_id}-b"))?,
        ];
        tl.settle(env)?;
        for i in 1..=env.args.kills {
            let victim = &mut instances[(i as usize - 1) % 2];
            let name = victim.name.clone();
            tl.event(&format!("worker kill {i}"), || victim.kill())?;
            instances.retain(|x| x.name != name);
            instances.push(StreamsInstance::start(app, &opts, &format!("{name}-{i}"))?);
            tl.settle(env)?;
            if i < env.args.kills {
                tl.space(env);
            }
        }
        let produced = tl.drain()?;
        for mut x in instances {
            x.stop()?;
        }
        tl.finish(found, &label, produced)?;
    }
    Ok(())
}

/// The summary table.
fn rows(env: &Env, found: &Findings, flink: Option<&flink_peer::FlinkHome>) -> Vec<Row> {
    let _ = (env, flink);
    let flink_hb = format!("{} (heartbeat 1 s / 5 s)", flink_peer::LABEL);
    let mut rows = Vec::new();
    let tp = |system: &str, key: &str| {
        found.throughput.iter().find(|(s, k, _)| s == system && k == key).map(|(_, _, t)| t.clone())
    };
    for kind in JobKind::ALL {
        for p in [1, 2] {
            for eos in [false, true] {
                let key = run_key(kind, p, eos);
                let f = tp(flink_peer::LABEL, &key).and_then(|t| t.per_core());
                let k = tp("Keel", &key).and_then(|t| t.per_core());
                let s = tp("Kafka Streams", &key).and_then(|t| t.per_core());
                if f.is_none() && k.is_none() {
                    continue;
                }
                rows.push(
                    Row::new(format!("records per worker CPU-second, {key}"), Unit::Count, Better::Higher)
                        .values(f, k)
                        .streams(s)
                        .goal(Goal::Factor(3.0)),
                );
            }
        }
    }
    let cost = |system: &str| found.cost.iter().find(|(s, ..)| s == system).map(|(_, r, _)| *r);
    if cost("Keel").is_some() {
        rows.push(
            Row::new(
                format!(
                    "datagen -> blackhole, {} rows, p1: rows per worker CPU-second",
                    env.args.datagen_rows
                ),
                Unit::Count,
                Better::Higher,
            )
            .values(cost(flink_peer::LABEL), cost("Keel")),
        );
    }
    let mem = |system: &str| found.memory.iter().find(|(s, ..)| s == system).cloned();
    let mib = |kib: Option<u64>| kib.map(|k| k as f64 / 1024.0);
    let (fm, km, sm) = (mem(flink_peer::LABEL), mem("Keel"), mem("Kafka Streams"));
    if km.is_some() {
        rows.push(
            Row::new("worker RSS, idle", Unit::MiB, Better::Lower)
                .values(fm.as_ref().and_then(|m| mib(m.1)), km.as_ref().and_then(|m| mib(m.1))),
        );
        rows.push(
            Row::new("worker RSS, peak under load", Unit::MiB, Better::Lower)
                .values(fm.as_ref().and_then(|m| mib(m.2)), km.as_ref().and_then(|m| mib(m.2)))
                .streams(sm.as_ref().and_then(|m| mib(m.2)))
                .goal(Goal::Factor(20.0)),
        );
        rows.push(
            Row::new("master (JobManager) RSS, after the throughput runs", Unit::MiB, Better::Lower)
                .values(fm.as_ref().and_then(|m| mib(m.3)), km.as_ref().and_then(|m| mib(m.3))),
        );
    }
    let events = |system: &str, prefix: &str| -> Vec<&Event> {
        found
            .events
            .iter()
            .filter(|(s, e)| s == system && e.label.starts_with(prefix))
            .map(|(_, e)| e)
            .collect()
    };
    let med = |evs: &[&Event], f: &dyn Fn(&Event) -> Option<f64>| {
        report::median(&evs.iter().filter_map(|e| f(e)).collect::<Vec<_>>())
    };
    let recovery = |e: &Event| e.recovery.map(|d| d.as_secs_f64());
    let replayed = |e: &Event| Some(e.replayed as f64);
    let gap = |e: &Event| Some(e.gap.as_secs_f64());
    let keel_kill = events("Keel", "worker kill");
    if !keel_kill.is_empty() {
        let streams_kill = events("Kafka Streams", "worker kill");
        rows.push(
            Row::new(
                "worker kill -9 -> output flowing again, median (Flink's defaults)",
                Unit::Seconds,
                Better::Lower,
            )
            .values(med(&events(flink_peer::LABEL, "worker kill"), &recovery), med(&keel_kill, &recovery))
            .streams(med(&streams_kill, &recovery))
            .goal(Goal::FactorAndAtMost { factor: 20.0, limit: 0.5 }),
        );
        rows.push(
            Row::new(
                "worker kill -9 -> output flowing again, median (Flink with heartbeat 1 s / 5 s)",
                Unit::Seconds,
                Better::Lower,
            )
            .values(med(&events(&flink_hb, "worker kill"), &recovery), med(&keel_kill, &recovery))
            .goal(Goal::FactorAndAtMost { factor: 4.0, limit: 0.5 }),
        );
        rows.push(
            Row::new("records replayed per worker kill, median (at-least-once)", Unit::Count, Better::Lower)
                .values(med(&events(flink_peer::LABEL, "worker kill"), &replayed), med(&keel_kill, &replayed))
                .streams(med(&streams_kill, &replayed)),
        );
        for (system, what) in [
            (flink_peer::LABEL.to_string(), "Flink's defaults"),
            (flink_hb.clone(), "Flink with heartbeat 1 s / 5 s"),
        ] {
            rows.push(
                Row::new(
                    format!("master leader kill -9 -> output flowing again ({what})"),
                    Unit::Seconds,
                    Better::Lower,
                )
                .values(
                    med(&events(&system, "master kill"), &recovery),
                    med(&events("Keel", "master kill"), &recovery),
                )
                .goal(Goal::Factor(10.0)),
            );
        }
        rows.push(
            Row::new("records replayed per master kill (at-least-once)", Unit::Count, Better::Lower).values(
                med(&events(flink_peer::LABEL, "master kill"), &replayed),
                med(&events("Keel", "master kill"), &replayed),
            ),
        );
    }
    for (prefix, what) in [("upgrade", "upgrade"), ("rescale", "rescale 1 -> 2")] {
        let k = events("Keel", prefix);
        if !k.is_empty() {
            rows.push(
                Row::new(format!("{what}: largest output gap"), Unit::Seconds, Better::Lower)
                    .values(med(&events(flink_peer::LABEL, prefix), &gap), med(&k, &gap))
                    .goal(Goal::Factor(20.0)),
            );
        }
    }
    let sum = |system: &str, eos: Option<bool>, f: &dyn Fn(&Tally) -> u64| -> Option<f64> {
        let v: Vec<u64> = found
            .tallies
            .iter()
            .filter(|(s, e, _)| s == system && eos.is_none_or(|x| x == *e))
            .map(|(_, _, t)| f(t))
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<u64>() as f64)
    };
    let flink_lost = [flink_peer::LABEL.to_string(), flink_hb.clone()]
        .iter()
        .filter_map(|s| sum(s, None, &|t| t.lost))
        .reduce(|a, b| a + b);
    rows.push(
        Row::new("records lost, all runs", Unit::Count, Better::Lower)
            .values(flink_lost, sum("Keel", None, &|t| t.lost))
            .streams(sum("Kafka Streams", None, &|t| t.lost))
            .goal(Goal::BothAtMost(0.0)),
    );
    rows.push(
        Row::new("records duplicated, exactly-once runs", Unit::Count, Better::Lower)
            .values(
                sum(flink_peer::LABEL, Some(true), &|t| t.duplicated),
                sum("Keel", Some(true), &|t| t.duplicated),
            )
            .streams(sum("Kafka Streams", Some(true), &|t| t.duplicated))
            .goal(Goal::AtMost(0.0)),
    );
    rows
}

/// Records/s and CPU seconds per million records of every throughput run.
fn throughput_table(found: &Findings) -> String {
    let mut systems: Vec<String> = Vec::new();
    for (s, _, _) in &found.throughput {
        if !systems.contains(s) {
            systems.push(s.clone());
        }
    }
    let mut keys: Vec<String> = Vec::new();
    for (_, k, _) in &found.throughput {
        if !keys.contains(k) {
            keys.push(k.clone());
        }
    }
    let mut out = String::from("| run |");
    for s in &systems {
        out.push_str(&format!(" {s} records/s | {s} worker CPU s per million |"));
    }
    out.push_str("\n| --- |");
    out.push_str(&" --- | --- |".repeat(systems.len()));
    out.push('\n');
    for k in &keys {
        out.push_str(&format!("| {k} |"));
        for s in &systems {
            match found.throughput.iter().find(|(x, y, _)| x == s && y == k) {
                Some((_, _, t)) => out.push_str(&format!(
                    " {} | {} |",
                    report::thousands(t.rate().round() as i64),
                    t.cpu_s
                        .map(|c| format!("{:.2}", c * 1e6 / t.records.max(1) as f64))
                        .unwrap_or_else(|| "-".into())
                )),
                None => out.push_str(" - | - |"),
            }
        }
        out.push('\n');
    }
    out
}

/// Writes the report (Markdown), the timelines (CSV) and the events (CSV) under `--out`, and
/// draws the chart when its script and Python are there.
fn write_outputs(
    env: &Env,
    found: &Findings,
    rows: &[Row],
    flink: Option<&flink_peer::FlinkHome>,
    streams_app: Option<&streams::StreamsApp>,
    took: Duration,
) -> anyhow::Result<()> {
    let out = &env.args.out;
    // The page's fixed text (what is measured, how, the settings), then this run's figures.
    let about = env.args.repo.join("scripts/versus/about.md");
    let mut md = std::fs::read_to_string(&about).with_context(|| format!("reading {}", about.display()))?;
    md.push_str("\n## The last run\n\n");
    md.push_str(&format!(
        "Measured {} on {} ({} CPUs), in {:.0} s.\n\n",
        utc_now(),
        hostname(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        took.as_secs_f64()
    ));
    md.push_str(&format!(
        "Versions: Keel {}, Apache Kafka broker {}{}{}.\n\n",
        env!("CARGO_PKG_VERSION"),
        kafka_version(),
        flink
            .map(|f| format!(
                ", Apache Flink {} with flink-sql-connector-kafka {} (ZooKeeper {})",
                f.flink_version, f.connector_version, f.zookeeper_version
            ))
            .unwrap_or_default(),
        streams_app.map(|s| format!(", Kafka Streams {}", s.kafka_streams_version)).unwrap_or_default()
    ));
    md.push_str(&report::markdown_table(rows));
    md.push_str("\nThroughput runs:\n\n");
    md.push_str(&throughput_table(found));
    md.push_str("\nEvents:\n\n| system | part | event | output flowing again | largest gap | replayed |\n| --- | --- | --- | --- | --- | --- |\n");
    for (s, e) in &found.events {
        md.push_str(&format!(
            "| {s} | {} | {} | {} | {:.2} s | {} |\n",
            e.part,
            e.label,
            e.recovery.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "-".into()),
            e.gap.as_secs_f64(),
            e.replayed
        ));
    }
    if !found.notes.is_empty() {
        md.push_str("\nNotes:\n\n");
        for n in &found.notes {
            md.push_str(&format!("- {n}\n"));
        }
    }
    let report_path = out.join("report.md");
    std::fs::write(&report_path, md).with_context(|| format!("writing {}", report_path.display()))?;
    let mut csv = String::from("system,part,second,records\n");
    for (s, part, _, series) in &found.timelines {
        for (sec, n) in series {
            csv.push_str(&format!("{s},{part},{sec},{n}\n"));
        }
    }
    std::fs::write(out.join("timeline.csv"), csv)?;
    let mut ev = String::from("system,part,second,event\n");
    for (s, e) in &found.events {
        if let Some((_, _, start, _)) = found.timelines.iter().find(|(x, p, _, _)| x == s && *p == e.part) {
            ev.push_str(&format!("{s},{},{:.1},{}\n", e.part, (e.at_ms - start) as f64 / 1000.0, e.label));
        }
    }
    std::fs::write(out.join("events.csv"), ev)?;
    println!(
        "wrote {}, {}, {}",
        report_path.display(),
        out.join("timeline.csv").display(),
        out.join("events.csv").display()
    );
    Ok(())
}

/// The time now in UTC (`date -u`), to the minute.
fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("at {} ms since the epoch", now_ms()))
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this machine".into())
}

/// The Kafka version of the broker's jars (`kafka_2.13-<version>.jar`).
fn kafka_version() -> String {
    keel_testkit::kafka_libs()
        .ok()
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("kafka_2.13-").and_then(|v| v.strip_suffix(".jar")).map(str::to_string)
        })
        .find(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .unwrap_or_else(|| "(unknown)".into())
}
