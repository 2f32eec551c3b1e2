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
//! - (d) with a format (issue 15): `p1-csv`, `p1-json`: the p1 pass-through with `format: csv`
//!   resp. `json` on source and sink (columns `id BIGINT, name STRING, age INT`) over an input
//!   topic of CSV lines `id,name-<id>,<age>` resp. JSON objects with those fields; `bare-csv`,
//!   `bare-json`: the one-thread bare loop over those topics (the bytes differ from `bare`'s).
//! - (e) without Kafka: `dg`: datagen -> blackhole, parallelism 1, `--dg-records` rows, 1 s
//!   checkpoints, unpaced; `dg-fp`: the same with the sink's `filter: "id >= <half>"` (keeps
//!   half) and `select: [id as n]`. Their span is read from the TaskManager's task counters
//!   (`GET /metrics`, scraped every 10 ms): from the first row out of the source to the last row
//!   written by the sink, each placed between two scrapes at the span's rate (see
//!   [`scrape::span`]). TaskManager CPU is taken over the whole job
//!   (`keel run` until the job is finished), as the issue's figure, and over that span.
//! - (f) `lat`: end-to-end latency at `--lat-rate` records/s: a p1 raw pass-through job
//!   (at-least-once, 1 s checkpoints) runs while this process produces to its input in real
//!   time for 2 s (warm-up, not counted) plus `--lat-seconds`, every record with an explicit
//!   create timestamp; the output topic is created with `message.timestamp.type=LogAppendTime`.
//!   A record's latency is its output's append time (the broker's clock) minus its input's create
//!   time (this process's clock): the same host, the same clock, no skew. p50, p99 and max.
//!   `lat-bare`: the same load through the one-thread bare loop. Before the first of them the
//!   broker gets `--lat-broker-warmup` seconds of that load, unmeasured (a fresh broker answered
//!   it with latencies of seconds for its first 10-20 s, the bare loop's too).
//!
//! Every Kafka run writes to an output topic of its own (2 partitions) with a consumer group of
//! its own, and is measured the same way: the output is read back with `read_committed` (so an
//! exactly-once run's records count only once committed), its records counted (and their
//! sequence numbers checked: nothing lost, nothing twice), and the time is the span from the
//! first to the last record's create timestamp, which the producer stamps when the record is
//! handed to it (neither the bare loop nor Keel's raw sink sets one). Start-up (job deployment,
//! the first fetch) is outside that span; the `wall s` column includes it. For exactly-once
//! runs, `commit s` is how long after the last record's timestamp every output partition had
//! no open transaction left (the last checkpoint's commit). CPU is read from /proc: the
//! TaskManager's (Keel), this process's (bare; only the loop works during it) and the broker
//! JVM's, over each run. The TaskManager's peak RSS (`VmHWM`, reset before every Keel run
//! through `/proc/<pid>/clear_refs`) is shown per run. `--repeat` repetitions go round-robin
//! over the runs; the tables show each run's median.
//!
//! Modules: [`kafka`] (input, bare loop, reading outputs, the paced producer), [`cluster`] (the
//! `keel` processes and client verbs), [`procfs`] (memory and CPU time from /proc), [`scrape`]
//! (the TaskManager's task counters).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;

use keel_testkit::Kafka;

use keel_bench::cluster::Cluster;
use keel_bench::kafka::{Format, OutputStats};
use keel_bench::{cluster, kafka, procfs, scrape};

/// Partitions of the input topic and of every output topic.
const PARTITIONS: i32 = 2;
/// Slots of the one TaskManager.
const SLOTS: u32 = 2;
/// Datagen's `rows-per-second` in the `dg` runs: far above what one subtask can emit, so the
/// source never waits for its pacing (it emits batches of up to 1,024 rows as fast as it can).
const DG_ROWS_PER_SECOND: u64 = 1_000_000_000;
/// How often the `dg` runs scrape the TaskManager's counters.
const SCRAPE_EVERY: Duration = Duration::from_millis(10);
/// The latency run's warm-up: records produced in it are not counted.
const LAT_WARMUP_SECS: u64 = 2;

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
    /// p1-eos, p2-eos (exactly-once, 1 s checkpoints); p1-csv, p1-json (p1 with that format on
    /// source and sink), bare-csv, bare-json (the bare loop over those inputs); dg (datagen ->
    /// blackhole), dg-fp (datagen -> filter + projection -> blackhole); lat (end-to-end latency
    /// of a Keel job at --lat-rate records/s), lat-bare (the same load through the bare loop).
    #[arg(long, value_delimiter = ',', default_value = "bare,bare2,p1,p1-chk,p2,p2-chk,p1-eos,p2-eos")]
    runs: Vec<String>,
    /// Rows the dg and dg-fp runs generate.
    #[arg(long, default_value_t = 20_000_000)]
    dg_records: u64,
    /// Seconds the lat run measures (after a 2 s warm-up).
    #[arg(long, default_value_t = 30)]
    lat_seconds: u64,
    /// Records per second the lat run produces.
    #[arg(long, default_value_t = 1000)]
    lat_rate: u64,
    /// Seconds of paced load through the bare loop, unmeasured, before the first latency run: a
    /// broker started for this benchmark answers a paced load slowly for its first seconds
    /// (latencies of seconds, even for the bare loop), which would otherwise fall on the first
    /// repetition. 0: none.
    #[arg(long, default_value_t = 15)]
    lat_broker_warmup: u64,
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

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The bare rdkafka loop in this process.
    Bare,
    /// A Kafka pass-through job.
    Kafka,
    /// datagen -> blackhole; with `filter`, through the sink's filter and projection.
    Datagen { filter: bool },
    /// End-to-end latency of a paced Kafka pass-through job; with `bare`, of the bare loop.
    Latency { bare: bool },
}

/// One run of the table.
struct Run {
    key: &'static str,
    label: &'static str,
    kind: Kind,
    /// The input's values (and the job's format).
    format: Format,
    /// Keel: the job's parallelism; bare: the loop's threads.
    parallelism: u32,
    checkpoints: bool,
    /// `sink.delivery-guarantee: exactly-once` (else at-least-once).
    exactly_once: bool,
}

impl Run {
    fn keel(&self) -> bool {
        !matches!(self.kind, Kind::Bare | Kind::Latency { bare: true })
    }

    /// Whether the run reads the input topic of its format.
    fn reads_input(&self) -> bool {
        matches!(self.kind, Kind::Bare | Kind::Kafka)
    }
}

const fn pass(
    key: &'static str,
    label: &'static str,
    kind: Kind,
    format: Format,
    parallelism: u32,
    checkpoints: bool,
    exactly_once: bool,
) -> Run {
    Run { key, label, kind, format, parallelism, checkpoints, exactly_once }
}

const RUNS: [Run; 16] = [
    pass("bare", "(a) bare rdkafka loop", Kind::Bare, Format::Raw, 1, false, false),
    pass("bare2", "(a2) bare loop, 2 threads", Kind::Bare, Format::Raw, 2, false, false),
    pass("p1", "(b) keel p=1", Kind::Kafka, Format::Raw, 1, false, false),
    pass("p1-chk", "(b) keel p=1, checkpoint 1 s", Kind::Kafka, Format::Raw, 1, true, false),
    pass("p2", "(b) keel p=2", Kind::Kafka, Format::Raw, 2, false, false),
    pass("p2-chk", "(b) keel p=2, checkpoint 1 s", Kind::Kafka, Format::Raw, 2, true, false),
    pass("p1-eos", "(c) keel p=1, exactly-once, 1 s", Kind::Kafka, Format::Raw, 1, true, true),
    pass("p2-eos", "(c) keel p=2, exactly-once, 1 s", Kind::Kafka, Format::Raw, 2, true, true),
    pass("bare-csv", "(a) bare loop, csv input", Kind::Bare, Format::Csv, 1, false, false),
    pass("bare-json", "(a) bare loop, json input", Kind::Bare, Format::Json, 1, false, false),
    pass("p1-csv", "(d) keel p=1, csv", Kind::Kafka, Format::Csv, 1, false, false),
    pass("p1-json", "(d) keel p=1, json", Kind::Kafka, Format::Json, 1, false, false),
    pass("dg", "(e) datagen -> blackhole", Kind::Datagen { filter: false }, Format::Raw, 1, true, false),
    pass(
        "dg-fp",
        "(e) datagen -> filter+proj -> bh",
        Kind::Datagen { filter: true },
        Format::Raw,
        1,
        true,
        false,
    ),
    pass(
        "lat",
        "(f) latency, keel p=1 raw, chk 1 s",
        Kind::Latency { bare: false },
        Format::Raw,
        1,
        true,
        false,
    ),
    pass(
        "lat-bare",
        "(f) latency, bare rdkafka loop",
        Kind::Latency { bare: true },
        Format::Raw,
        1,
        false,
        false,
    ),
];

/// The unmeasured pass that warms the broker up for the latency runs.
const LAT_BROKER_WARMUP: Run =
    pass("lat-broker-warmup", "broker warm-up", Kind::Latency { bare: true }, Format::Raw, 1, false, false);

/// What a run measured.
struct Measured {
    label: &'static str,
    keel: bool,
    parallelism: u32,
    format: Format,
    /// Keel: the TaskManager's peak RSS during the run (KiB).
    tm_peak_kib: Option<u64>,
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

/// What a `dg` run measured.
struct DgMeasured {
    label: &'static str,
    /// Rows generated, and rows the sink should write (half with the filter).
    rows: u64,
    written: u64,
    /// The job's records out (`keel status`, the tasks' reports) after it finished.
    out: Option<u64>,
    /// The TaskManager's CPU seconds from `keel run` until the job was seen finished.
    cpu_s: Option<f64>,
    /// From `keel run` until the job was seen finished.
    wall_s: f64,
    span: Option<scrape::Span>,
    tm_peak_kib: Option<u64>,
    notes: Vec<String>,
}

impl DgMeasured {
    fn per_cpu_second(&self) -> Option<f64> {
        self.cpu_s.filter(|s| *s > 0.0).map(|s| self.rows as f64 / s)
    }

    /// Rows per second over the span.
    fn rate(&self) -> Option<f64> {
        self.span.map(|sp| self.rows as f64 / sp.secs())
    }
}

/// What a `lat` run measured.
struct LatMeasured {
    label: &'static str,
    /// The repetition's name (`lat-2`).
    tag: String,
    /// Records produced after the warm-up, and how many of them came out.
    measured: u64,
    received: u64,
    /// Latencies of those records, ms, sorted.
    latencies: Vec<i64>,
    /// The largest latency among the warm-up records.
    warmup_max_ms: Option<i64>,
    /// Per second of production (warm-up included), the largest latency of the records produced
    /// in it (`None`: none came out).
    max_by_second: Vec<Option<i64>>,
    /// Achieved production rate (records/s) over the whole production.
    produced_rate: f64,
    /// The worker's (TaskManager's; bare: this process's, the producer included) CPU seconds
    /// per second of production.
    worker_cpu_share: Option<f64>,
    tm_peak_kib: Option<u64>,
    notes: Vec<String>,
}

impl LatMeasured {
    fn p(&self, q: f64) -> Option<i64> {
        percentile(&self.latencies, q)
    }
}

/// The nearest-rank percentile `q` (0 < q <= 1) of sorted values.
fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// One repetition of a run.
enum Outcome {
    Pass(Measured),
    Dg(DgMeasured),
    Lat(LatMeasured),
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

    /// The input topic of `format` (`in` for raw, as before; `in-csv`, `in-json`).
    fn input(&self, format: Format) -> String {
        match format {
            Format::Raw => format!("{}in", self.prefix),
            f => format!("{}in-{}", self.prefix, f.key()),
        }
    }

    fn read_output(&self, topic: &str, format: Format) -> anyhow::Result<OutputStats> {
        kafka::read_output(
            &self.bootstrap,
            topic,
            &self.group("read"),
            self.args.records,
            format,
            self.args.size,
            false,
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
    if selected.iter().any(|r| matches!(r.kind, Kind::Latency { .. })) {
        if args.lat_seconds == 0 || args.lat_rate == 0 {
            bail!("--lat-seconds and --lat-rate must be at least 1");
        }
        if args.size < 12 {
            bail!("the lat run needs --size of at least 12 (the sequence number in every value)");
        }
    }
    if selected.iter().any(|r| matches!(r.kind, Kind::Datagen { .. })) && args.dg_records < 2 {
        bail!("--dg-records must be at least 2");
    }
    let keel = if selected.iter().any(|r| r.keel()) {
        Some(cluster::keel_binary(args.keel_bin.clone())?)
    } else {
        None
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    // A broker only when a run needs one (the dg runs do not).
    let needs_kafka = selected.iter().any(|r| !matches!(r.kind, Kind::Datagen { .. }));
    // KEEL_TEST_KAFKA_BOOTSTRAP names an external cluster (Kafka::shared uses it); else a
    // node of this run's own, stopped when it is dropped.
    let external = std::env::var(keel_testkit::ENV_BOOTSTRAP).is_ok_and(|v| !v.trim().is_empty());
    let own;
    let broker: Option<&Kafka> = if !needs_kafka {
        None
    } else if external {
        Some(Kafka::shared()?)
    } else {
        own = Kafka::single().context("starting Apache Kafka")?;
        Some(&own)
    };
    let bootstrap = broker.map(|b| b.bootstrap().to_string()).unwrap_or_default();
    // Topic names and transactional ids of their own on a shared cluster.
    let prefix = if broker.is_some_and(|b| b.is_external()) {
        format!("keel-bench-{}-{}-", std::process::id(), kafka::now_ms())
    } else {
        String::new()
    };
    let env = Env {
        args,
        dir,
        broker_pid: broker.and_then(|b| b.node_ids().first().and_then(|id| b.pid(*id))),
        bootstrap,
        prefix,
    };
    println!(
        "keel-bench: {} records of {} bytes, {} repetition(s) of each run; broker {} ({}); work dir {}",
        args.records,
        args.size,
        args.repeat,
        if env.bootstrap.is_empty() { "-" } else { env.bootstrap.as_str() },
        match broker {
            None => "none: no run needs one".to_string(),
            Some(b) if b.is_external() => "external".to_string(),
            Some(b) => format!(
                "Apache Kafka, one KRaft node, pid {}, started in {:.1} s",
                env.broker_pid.unwrap_or_default(),
                b.startup.as_secs_f64()
            ),
        },
        dir.display()
    );
    for format in [Format::Raw, Format::Csv, Format::Json] {
        if !selected.iter().any(|r| r.reads_input() && r.format == format) {
            continue;
        }
        let input = env.input(format);
        keel_testkit::create_topic(&env.bootstrap, &input, PARTITIONS)?;
        let took = kafka::produce_input(&env.bootstrap, &input, PARTITIONS, args.records, format, args.size)?;
        println!(
            "input: {} {} records in topic {input} ({PARTITIONS} partitions), produced in {:.2} s ({:.0} records/s)",
            args.records,
            format.key(),
            took.as_secs_f64(),
            args.records as f64 / took.as_secs_f64()
        );
    }

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

    if args.lat_broker_warmup > 0 && selected.iter().any(|r| matches!(r.kind, Kind::Latency { .. })) {
        let warm = latency_run(&env, None, &LAT_BROKER_WARMUP, "lat-broker-warmup", args.lat_broker_warmup)
            .context("the latency runs' broker warm-up")?;
        let by_second: Vec<String> = warm.max_by_second.iter().map(|v| fmt_ms(*v)).collect();
        println!(
            "broker warm-up for the latency runs (bare loop, {} s at {} records/s, not counted): max ms per second: {}",
            args.lat_broker_warmup,
            args.lat_rate,
            by_second.join(" ")
        );
    }

    // Repetitions go round the runs, so that a drift of the machine or broker hits all alike.
    let mut results: Vec<Vec<Outcome>> = selected.iter().map(|_| Vec::new()).collect();
    for rep in 1..=args.repeat {
        for (i, run) in selected.iter().enumerate() {
            let tag = if args.repeat > 1 { format!("{}-{rep}", run.key) } else { run.key.to_string() };
            let outcome = match (&mut cluster, run.kind) {
                (_, Kind::Bare) => {
                    Outcome::Pass(bare_run(&env, run, &tag).with_context(|| format!("run {tag}"))?)
                }
                (_, Kind::Latency { bare: true }) => Outcome::Lat(
                    latency_run(&env, None, run, &tag, args.lat_seconds)
                        .with_context(|| format!("run {tag}"))?,
                ),
                (Some((cluster, tm, _)), kind) => {
                    let m = match kind {
                        Kind::Datagen { filter } => {
                            datagen_run(&env, cluster, run, &tag, *tm, filter).map(Outcome::Dg)
                        }
                        Kind::Latency { .. } => {
                            latency_run(&env, Some((&*cluster, *tm)), run, &tag, args.lat_seconds)
                                .map(Outcome::Lat)
                        }
                        _ => keel_run(&env, cluster, run, &tag, *tm).map(Outcome::Pass),
                    };
                    let m = m.with_context(|| format!("run {tag}"));
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
                (None, _) => bail!("run {tag} needs the cluster"),
            };
            match &outcome {
                Outcome::Pass(m) => println!(
                    "  {:<10} {:<32} {} records in {:.2} s ({:.0} records/s)",
                    tag,
                    m.label,
                    m.output.count,
                    m.output.span_secs(),
                    m.rate()
                ),
                Outcome::Dg(m) => println!(
                    "  {:<10} {:<32} {} rows, {} TaskManager CPU s ({} rows per CPU s), {} rows/s",
                    tag,
                    m.label,
                    m.rows,
                    fmt_opt(m.cpu_s, 2),
                    fmt_opt(m.per_cpu_second(), 0),
                    fmt_opt(m.rate(), 0)
                ),
                Outcome::Lat(m) => println!(
                    "  {:<10} {:<32} {} of {} records, latency p50 {} ms, p99 {} ms, max {} ms",
                    tag,
                    m.label,
                    m.received,
                    m.measured,
                    fmt_ms(m.p(0.5)),
                    fmt_ms(m.p(0.99)),
                    fmt_ms(m.latencies.last().copied())
                ),
            }
            if let Some(r) = results.get_mut(i) {
                r.push(outcome);
            }
        }
    }

    let mut pass = Vec::new();
    let mut dg = Vec::new();
    let mut lat = Vec::new();
    for reps in results {
        let (mut p, mut d, mut l) = (Vec::new(), Vec::new(), Vec::new());
        for o in reps {
            match o {
                Outcome::Pass(m) => p.push(m),
                Outcome::Dg(m) => d.push(m),
                Outcome::Lat(m) => l.push(m),
            }
        }
        if !p.is_empty() {
            pass.push(p);
        }
        if !d.is_empty() {
            dg.push(d);
        }
        if !l.is_empty() {
            lat.push(l);
        }
    }
    let mut run_peaks: Vec<u64> = Vec::new();
    run_peaks.extend(pass.iter().flatten().filter_map(|m| m.tm_peak_kib));
    run_peaks.extend(dg.iter().flatten().filter_map(|m| m.tm_peak_kib));
    run_peaks.extend(lat.iter().flatten().filter_map(|m| m.tm_peak_kib));
    if !pass.is_empty() {
        print_table(pass, args.records);
    }
    if !dg.is_empty() {
        print_datagen_table(dg);
    }
    if !lat.is_empty() {
        print_latency_table(lat, args);
    }
    if let (Some((_, tm, idle)), Some(sampler)) = (&cluster, sampler) {
        let peak_rss = sampler.finish();
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
            mib(run_peaks.iter().copied().max().unwrap_or_default())
        );
        println!(
            "  (loaded VmRSS: the largest of samples every 100 ms; VmHWM: the largest of the runs' peaks, each"
        );
        println!("  read after its run with the peak reset before it: the `TM MiB` columns)");
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
        if stats.count > distinct + stats.bad {
            notes.push(format!("duplicates {}", stats.count - distinct - stats.bad));
        }
    } else if stats.count != records {
        notes.push(format!("{} records for {records} in", stats.count));
    }
    if stats.bad > 0 {
        notes.push(format!(
            "WRONG VALUES {} (first: {})",
            stats.bad,
            stats.first_bad.as_deref().unwrap_or_default()
        ));
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
        &env.input(run.format),
        PARTITIONS,
        &output,
        &env.group(tag),
        env.args.records,
        usize::try_from(run.parallelism)?,
        env.timeout(),
    )?;
    let (cpu1, bcpu1) = (cpu(me), cpu(env.broker_pid));
    let stats = env.read_output(&output, run.format)?;
    Ok(Measured {
        label: run.label,
        keel: false,
        parallelism: run.parallelism,
        format: run.format,
        tm_peak_kib: None,
        wall_s: (stats.last_ts - bare.started_ms) as f64 / 1000.0,
        notes: check_output(&stats, env.args.records),
        output: stats,
        cpu_s: diff(cpu1, cpu0),
        broker_cpu_s: diff(bcpu1, bcpu0),
        commit_s: None,
    })
}

/// The columns of the csv and json inputs.
const PERSON_COLUMNS: &str = "    columns:\n      - {name: id, type: BIGINT}\n      - {name: name, type: STRING}\n      - {name: age, type: INT}\n";

/// The spec of a Kafka pass-through job from `input` to `output` in `format`.
#[allow(clippy::too_many_arguments)]
fn pass_through_spec(
    job: &str,
    parallelism: u32,
    checkpoints: bool,
    guarantee: &str,
    input: &str,
    output: &str,
    bootstrap: &str,
    group: &str,
    format: Format,
) -> String {
    let config = if checkpoints { "config:\n  execution.checkpointing.interval: 1 s\n" } else { "" };
    let columns = if format == Format::Raw { "" } else { PERSON_COLUMNS };
    let format = format.key();
    format!(
        r#"name: {job}
parallelism: {parallelism}
{config}sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: '{bootstrap}'
    properties.group.id: {group}
    scan.startup.mode: earliest-offset
    format: {format}
{columns}sinks:
  - name: out
    connector: kafka
    from: in
    topic: {output}
    properties.bootstrap.servers: '{bootstrap}'
    properties.acks: all
    {guarantee}
    format: {format}
"#
    )
}

/// The spec of a datagen job of `rows` rows into a blackhole, through the sink's filter (keeps
/// the upper half) and projection when `filter`; returns it with the rows the sink writes.
fn datagen_spec(job: &str, rows: u64, filter: bool) -> (String, u64) {
    let half = rows / 2;
    let (transform, written) = if filter {
        (format!("    filter: \"id >= {half}\"\n    select: [id as n]\n"), rows - half)
    } else {
        (String::new(), rows)
    };
    let spec = format!(
        "name: {job}\nparallelism: 1\nconfig:\n  execution.checkpointing.interval: 1 s\nsources:\n  - name: gen\n    \
         connector: datagen\n    rows-per-second: {DG_ROWS_PER_SECOND}\n    number-of-rows: {rows}\nsinks:\n  - name: out\n    \
         connector: blackhole\n    from: gen\n{transform}"
    );
    (spec, written)
}

fn write_spec(env: &Env<'_>, job: &str, spec: &str) -> anyhow::Result<PathBuf> {
    let path = env.dir.join(format!("{job}.yaml"));
    std::fs::write(&path, spec).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Resets the TaskManager's peak RSS; a note when that is not possible.
fn reset_peak(tm: u32, notes: &mut Vec<String>) -> bool {
    match procfs::reset_peak(tm) {
        Ok(()) => true,
        Err(e) => {
            notes.push(format!("TM peak not reset ({e:#}): VmHWM since the TaskManager started"));
            false
        }
    }
}

/// Notes on a job's checkpoints and restarts from its status.
fn status_notes(status: &serde_json::Value, checkpoints: bool, notes: &mut Vec<String>) {
    if checkpoints {
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
}

/// A Keel job run to topic `out-<tag>`: submitted with `keel run`, done when its tasks report
/// every record written, then read back and canceled.
fn keel_run(env: &Env<'_>, cluster: &Cluster, run: &Run, tag: &str, tm: u32) -> anyhow::Result<Measured> {
    let args = env.args;
    let parallelism = run.parallelism;
    let job = format!("bench-{tag}");
    let output = format!("{}out-{tag}", env.prefix);
    keel_testkit::create_topic(&env.bootstrap, &output, PARTITIONS)?;
    let guarantee = if run.exactly_once {
        format!(
            "sink.delivery-guarantee: exactly-once\n    sink.transactional-id-prefix: {}bench-{tag}",
            env.prefix
        )
    } else {
        "sink.delivery-guarantee: at-least-once".to_string()
    };
    let spec = pass_through_spec(
        &job,
        parallelism,
        run.checkpoints,
        &guarantee,
        &env.input(run.format),
        &output,
        &env.bootstrap,
        &env.group(tag),
        run.format,
    );
    let path = write_spec(env, &job, &spec)?;

    let mut notes = Vec::new();
    let peak_reset = reset_peak(tm, &mut notes);
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
    let tm_peak_kib = procfs::memory(tm).ok().filter(|_| peak_reset).map(|m| m.hwm_kib);
    let committed_ms = if run.exactly_once {
        Some(kafka::wait_all_committed(&env.bootstrap, &output, PARTITIONS, env.timeout())?)
    } else {
        None
    };
    let stats = env.read_output(&output, run.format)?;
    let status = cluster.status(&job)?;
    cluster.cancel(&job)?;

    notes.extend(check_output(&stats, args.records));
    status_notes(&status, run.checkpoints, &mut notes);
    Ok(Measured {
        label: run.label,
        keel: true,
        parallelism,
        format: run.format,
        tm_peak_kib,
        wall_s: (stats.last_ts - started_ms) as f64 / 1000.0,
        commit_s: committed_ms.map(|c| (c - stats.last_ts) as f64 / 1000.0),
        output: stats,
        cpu_s: diff(cpu1, cpu0),
        broker_cpu_s: diff(bcpu1, bcpu0),
        notes,
    })
}

/// Waits until `job` is finished; fails when it failed or was canceled.
fn wait_finished(env: &Env<'_>, cluster: &Cluster, job: &str) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + env.timeout();
    loop {
        let last = match cluster.status(job) {
            Ok(s) => {
                let state = s["job"]["state"].as_str().unwrap_or_default().to_ascii_lowercase();
                if state == "finished" {
                    return Ok(s);
                }
                if state == "failed" || state == "canceled" {
                    bail!("job {job} is {state}: {}", s["status_message"]);
                }
                format!("job {state}, {}", s["status_message"])
            }
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("job {job} did not finish within {}s; last: {last}", env.args.run_timeout);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `dg` run: datagen -> (filter + projection ->) blackhole, until the job is finished.
fn datagen_run(
    env: &Env<'_>,
    cluster: &Cluster,
    run: &Run,
    tag: &str,
    tm: u32,
    filter: bool,
) -> anyhow::Result<DgMeasured> {
    let rows = env.args.dg_records;
    let job = format!("bench-{tag}");
    let (spec, written) = datagen_spec(&job, rows, filter);
    let path = write_spec(env, &job, &spec)?;
    let metrics = cluster.taskmanager_metrics_address()?;

    let mut notes = Vec::new();
    let peak_reset = reset_peak(tm, &mut notes);
    let scraper = scrape::Scraper::start(&metrics, &job, tm, SCRAPE_EVERY);
    let cpu0 = cpu(Some(tm));
    let started = Instant::now();
    cluster.run(&path)?;
    let status = wait_finished(env, cluster, &job);
    let cpu1 = cpu(Some(tm));
    let wall_s = started.elapsed().as_secs_f64();
    let samples = scraper.finish()?;
    let status = status?;
    let tm_peak_kib = procfs::memory(tm).ok().filter(|_| peak_reset).map(|m| m.hwm_kib);

    let out = status["tasks"]
        .as_array()
        .map(|tasks| tasks.iter().filter_map(|t| t["records_out"].as_u64()).sum::<u64>());
    if out != Some(written) {
        notes.push(format!(
            "RECORDS OUT {} (expected {written})",
            out.map(|o| o.to_string()).unwrap_or("-".into())
        ));
    }
    let span = scrape::span(&samples, written);
    match &span {
        None => notes.push(format!("no span: none of {} scrapes saw a row", samples.len())),
        Some(sp) if !sp.complete => notes.push(format!(
            "span end extrapolated (the task ended between two scrapes; last seen {} in, {} out)",
            sp.max_in, sp.max_out
        )),
        Some(_) => {}
    }
    status_notes(&status, true, &mut notes);
    Ok(DgMeasured {
        label: run.label,
        rows,
        written,
        out,
        cpu_s: diff(cpu1, cpu0),
        wall_s,
        span,
        tm_peak_kib,
        notes,
    })
}

/// The `lat` run: a p1 raw pass-through job (at-least-once, 1 s checkpoints) from a fresh input
/// topic to a fresh `LogAppendTime` output topic, fed at `--lat-rate` records/s; `lat-bare`
/// (`keel` is `None`): the one-thread bare loop in this process instead of the job. Measures
/// `seconds` after the warm-up.
fn latency_run(
    env: &Env<'_>,
    keel: Option<(&Cluster, u32)>,
    run: &Run,
    tag: &str,
    seconds: u64,
) -> anyhow::Result<LatMeasured> {
    let args = env.args;
    let job = format!("bench-{tag}");
    let input = format!("{}lat-in-{tag}", env.prefix);
    let output = format!("{}out-{tag}", env.prefix);
    keel_testkit::create_topic(&env.bootstrap, &input, PARTITIONS)?;
    keel_testkit::create_topic_with(
        &env.bootstrap,
        &output,
        PARTITIONS,
        &[("message.timestamp.type", "LogAppendTime")],
    )?;
    let spec = pass_through_spec(
        &job,
        1,
        true,
        "sink.delivery-guarantee: at-least-once",
        &input,
        &output,
        &env.bootstrap,
        &env.group(tag),
        Format::Raw,
    );
    let path = write_spec(env, &job, &spec)?;
    let mut notes = Vec::new();
    let took = kafka::warm_group_coordinator(&env.bootstrap, &input, env.timeout())?;
    if took > Duration::from_millis(500) {
        notes.push(format!(
            "the broker took {:.1} s to take a first offset commit (before the run)",
            took.as_secs_f64()
        ));
    }
    let warmup = args.lat_rate * LAT_WARMUP_SECS;
    let total = warmup + args.lat_rate * seconds;
    let mut peak_reset = false;
    if let Some((cluster, tm)) = keel {
        peak_reset = reset_peak(tm, &mut notes);
        cluster.run(&path)?;
    }
    let worker = keel.map(|(_, tm)| tm).unwrap_or_else(std::process::id);
    let cpu0 = cpu(Some(worker));
    let (paced, cpu1) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let bare = keel.is_none().then(|| {
            let group = env.group(tag);
            let (input, output) = (&input, &output);
            scope.spawn(move || {
                kafka::bare_loop(&env.bootstrap, input, PARTITIONS, output, &group, total, 1, env.timeout())
            })
        });
        let paced =
            kafka::produce_paced(&env.bootstrap, &input, PARTITIONS, total, args.size, args.lat_rate as f64);
        if let Some(b) = bare {
            b.join().map_err(|_| anyhow::anyhow!("the bare loop panicked"))??;
        }
        Ok((paced?, cpu(Some(worker))))
    })?;
    let stats = kafka::read_output(
        &env.bootstrap,
        &output,
        &env.group("read"),
        total,
        Format::Raw,
        args.size,
        true,
        env.timeout(),
    )?;
    let tm_peak_kib =
        keel.and_then(|(_, tm)| procfs::memory(tm).ok()).filter(|_| peak_reset).map(|m| m.hwm_kib);
    if let Some((cluster, _)) = keel {
        let status = cluster.status(&job)?;
        cluster.cancel(&job)?;
        status_notes(&status, true, &mut notes);
    }
    if stats.append_time != stats.count {
        bail!(
            "{} of {} records of {output} carry no LogAppendTime timestamp: the latencies would mix clocks",
            stats.count - stats.append_time,
            stats.count
        );
    }
    let latency = |seq: usize| -> Option<i64> {
        let out = *stats.times.get(seq)?;
        (out != i64::MIN).then(|| out - paced.created.get(seq).copied().unwrap_or(out))
    };
    let (warm, measured) = (usize::try_from(warmup)?, usize::try_from(total)?);
    let mut latencies: Vec<i64> = (warm..measured).filter_map(latency).collect();
    latencies.sort_unstable();
    let warmup_max_ms = (0..warm).filter_map(latency).max();
    let rate = usize::try_from(args.lat_rate)?.max(1);
    let max_by_second: Vec<Option<i64>> = (0..measured)
        .step_by(rate)
        .map(|from| (from..(from + rate).min(measured)).filter_map(latency).max())
        .collect();
    notes.extend(check_output(&stats, total));
    let produced_s = (paced.ended_ms - paced.started_ms).max(1) as f64 / 1000.0;
    Ok(LatMeasured {
        label: run.label,
        tag: tag.to_string(),
        measured: total - warmup,
        received: latencies.len() as u64,
        latencies,
        warmup_max_ms,
        max_by_second,
        produced_rate: total as f64 / produced_s,
        worker_cpu_share: diff(cpu1, cpu0).map(|c| c / produced_s),
        tm_peak_kib,
        notes,
    })
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}")).unwrap_or_else(|| "-".into())
}

fn fmt_ms(v: Option<i64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn fmt_mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "-".into())
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
        rows.iter()
            .find(|(m, ..)| !m.keel && m.parallelism == threads && m.format == Format::Raw)
            .map(|(m, ..)| m.rate())
    };
    // The bare loop a Keel run's CPU per record is compared with: the same input format and
    // threads, else the same format on one thread, else raw (`bare`).
    let bare_cpu = |m: &Measured| {
        let find = |format: Format, threads: u32| {
            rows.iter()
                .find(|(b, ..)| !b.keel && b.format == format && b.parallelism == threads)
                .and_then(|(b, ..)| b.per_million(b.cpu_s))
        };
        find(m.format, m.parallelism).or_else(|| find(m.format, 1)).or_else(|| find(Format::Raw, 1))
    };
    println!();
    println!(
        "throughput = records / (last - first output record timestamp); {records} records in, each run to"
    );
    println!("its own output topic; with repetitions, the run with the median throughput is shown");
    println!(
        "{:<32} {:>8} {:>6} {:>9} {:>5} {:>7} {:>13} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>6}  notes",
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
        "brkr s/M",
        "cpu/bare",
        "TM MiB"
    );
    for (m, min, max, n) in &rows {
        let ratio =
            |base: Option<f64>| base.map(|b| format!("{:.2}", m.rate() / b)).unwrap_or_else(|| "-".into());
        let range = if *n > 1 { format!("{:.0}-{:.0}", min, max) } else { "-".into() };
        let cpu_ratio = match (m.keel, m.per_million(m.cpu_s), bare_cpu(m)) {
            (true, Some(k), Some(b)) if b > 0.0 => Some(k / b),
            _ => None,
        };
        println!(
            "{:<32} {:>8} {:>6.2} {:>9.0} {:>5} {:>7} {:>13} {:>6.2} {:>6} {:>8} {:>8} {:>8} {:>8} {:>6}  {}",
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
            fmt_opt(cpu_ratio, 2),
            fmt_mib(m.tm_peak_kib),
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
        "  cpu/bare: the TaskManager's cpu s/M over the bare loop's, the loop over the same input format with",
        "  as many threads if it ran (bare-csv, bare-json), else over the same format on one thread, else `bare`.",
        "  TM MiB: the TaskManager's peak RSS (VmHWM) during the run, reset before it. (d) runs: CSV/JSON",
        "  values of about 20/40 bytes (--size applies to raw values only).",
    ] {
        println!("{line}");
    }
}

fn print_datagen_table(results: Vec<Vec<DgMeasured>>) {
    println!();
    println!("datagen runs (no Kafka): parallelism 1, 1 s checkpoints, unpaced; with repetitions, the run with the");
    println!("median rows per TaskManager CPU-second is shown");
    println!(
        "{:<34} {:>10} {:>10} {:>7} {:>11} {:>6} {:>11} {:>8} {:>11} {:>6} {:>6} {:>17}  notes",
        "run",
        "rows",
        "written",
        "TM cpu",
        "rows/cpu s",
        "span s",
        "rows/s",
        "span cpu",
        "rows/spcpu",
        "wall s",
        "TM MiB",
        "range rows/cpu s"
    );
    for mut reps in results {
        reps.sort_by(|a, b| {
            a.per_cpu_second().unwrap_or_default().total_cmp(&b.per_cpu_second().unwrap_or_default())
        });
        let range = match (reps.first(), reps.last()) {
            (Some(a), Some(b)) if reps.len() > 1 => {
                format!("{}-{}", fmt_opt(a.per_cpu_second(), 0), fmt_opt(b.per_cpu_second(), 0))
            }
            _ => "-".into(),
        };
        let mid = reps.len() / 2;
        let Some(m) = reps.get(mid) else { continue };
        let span_cpu = m.span.and_then(|s| s.cpu_s);
        let per_span_cpu = span_cpu.filter(|c| *c > 0.0).map(|c| m.rows as f64 / c);
        let mut notes = m.notes.clone();
        if let Some(out) = m.out.filter(|o| *o == m.written) {
            notes.insert(0, format!("{out} out"));
        }
        println!(
            "{:<34} {:>10} {:>10} {:>7} {:>11} {:>6} {:>11} {:>8} {:>11} {:>6.2} {:>6} {:>17}  {}",
            m.label,
            m.rows,
            m.written,
            fmt_opt(m.cpu_s, 2),
            fmt_opt(m.per_cpu_second(), 0),
            fmt_opt(m.span.map(|s| s.secs()), 2),
            fmt_opt(m.rate(), 0),
            fmt_opt(span_cpu, 2),
            fmt_opt(per_span_cpu, 0),
            m.wall_s,
            fmt_mib(m.tm_peak_kib),
            range,
            notes.join("; ")
        );
    }
    for line in [
        "rows: generated; written: rows the sink should write (dg-fp's filter keeps id >= rows/2). TM cpu: the",
        "  TaskManager's CPU seconds (user+system, /proc) from `keel run` until `keel status` showed the job",
        "  finished (deployment, the run, the last checkpoint, teardown); rows/cpu s: rows per TaskManager",
        "  CPU-second over that (the issue's figure). span s: the job's running span from the TaskManager's own",
        "  counters (GET /metrics scraped every 10 ms): from the first row out of the source to the last row",
        "  written by the sink, each placed between two scrapes at the span's rate (the task's counters vanish",
        "  when it ends, so the last rows are seldom seen: 'span end extrapolated'); rows/s: rows over that",
        "  span; span cpu: the TaskManager's CPU seconds between those scrapes, rows/spcpu: rows per CPU-second",
        "  over it. wall s: `keel run` until seen finished. TM MiB: the TaskManager's peak RSS (VmHWM) during",
        "  the run, reset before it.",
    ] {
        println!("{line}");
    }
}

fn print_latency_table(results: Vec<Vec<LatMeasured>>, args: &Args) {
    let mut shown = Vec::new();
    println!();
    println!(
        "end-to-end latency at {} records/s for {} s (after a {LAT_WARMUP_SECS} s warm-up); with repetitions, the",
        args.lat_rate, args.lat_seconds
    );
    println!("run with the median p99 is shown");
    println!(
        "{:<32} {:>8} {:>8} {:>6} {:>6} {:>6} {:>7} {:>6} {:>11} {:>8} {:>7} {:>6} {:>11}  notes",
        "run",
        "records",
        "received",
        "p50 ms",
        "p99 ms",
        "p99.9",
        "max ms",
        "min ms",
        "warm-up max",
        "rate",
        "cpu%",
        "TM MiB",
        "range p99"
    );
    for mut reps in results {
        reps.sort_by_key(|m| m.p(0.99).unwrap_or(i64::MAX));
        let range = match (reps.first(), reps.last()) {
            (Some(a), Some(b)) if reps.len() > 1 => format!("{}-{}", fmt_ms(a.p(0.99)), fmt_ms(b.p(0.99))),
            _ => "-".into(),
        };
        let mid = reps.len() / 2;
        let Some(m) = reps.get(mid) else { continue };
        println!(
            "{:<32} {:>8} {:>8} {:>6} {:>6} {:>6} {:>7} {:>6} {:>11} {:>8.0} {:>7} {:>6} {:>11}  {}",
            m.label,
            m.measured,
            m.received,
            fmt_ms(m.p(0.5)),
            fmt_ms(m.p(0.99)),
            fmt_ms(m.p(0.999)),
            fmt_ms(m.latencies.last().copied()),
            fmt_ms(m.latencies.first().copied()),
            fmt_ms(m.warmup_max_ms),
            m.produced_rate,
            fmt_opt(m.worker_cpu_share.map(|c| c * 100.0), 1),
            fmt_mib(m.tm_peak_kib),
            range,
            m.notes.join("; ")
        );
        shown.push(reps);
    }
    for reps in &shown {
        for m in reps {
            let by_second: Vec<String> = m.max_by_second.iter().map(|v| fmt_ms(*v)).collect();
            println!("{} {}: max ms per second of production: {}", m.label, m.tag, by_second.join(" "));
        }
    }
    for line in [
        "latency of a record: its output record's append time (the broker's clock; the output topic has",
        "  message.timestamp.type=LogAppendTime) minus its input record's create time (set by this process when",
        "  it handed the record to its producer, linger.ms=0, acks=all): the same host and clock, so no skew;",
        "  millisecond resolution. p50/p99/p99.9: nearest rank over the records produced after the warm-up.",
        "  warm-up max: the largest latency of the warm-up records (not counted). rate: records/s produced.",
        "  cpu%: the worker's CPU time over the production, per cent of one core (keel: the TaskManager;",
        "  bare: keel-bench, its paced producer included). The job: kafka source (earliest-offset) -> kafka",
        "  sink, raw, at-least-once, acks=all, 1 s checkpoints, p=1. lat-bare: the one-thread bare loop",
        "  (rdkafka consumer -> producer, acks=all, librdkafka's defaults) in this process instead of the job.",
    ] {
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specs the benchmark submits pass Keel's own spec validation (so that a run does not
    /// fail on a typo after minutes of set-up): the formats with their columns, the datagen
    /// source unpaced with its row count, and dg-fp's filter and projection on the sink.
    #[test]
    fn specs_parse() -> anyhow::Result<()> {
        for format in [Format::Raw, Format::Csv, Format::Json] {
            let yaml = pass_through_spec(
                "j",
                1,
                true,
                "sink.delivery-guarantee: at-least-once",
                "in",
                "out",
                "127.0.0.1:9092",
                "g",
                format,
            );
            let spec = keel_spec::JobSpec::parse(&yaml).map_err(|e| anyhow::anyhow!("{e}\n{yaml}"))?;
            assert_eq!(spec.sources.len(), 1, "{yaml}");
            assert!(yaml.contains(&format!("format: {}", format.key())), "{yaml}");
        }
        for filter in [false, true] {
            let (yaml, written) = datagen_spec("dg", 21, filter);
            let spec = keel_spec::JobSpec::parse(&yaml).map_err(|e| anyhow::anyhow!("{e}\n{yaml}"))?;
            let sink = spec.sinks.first().ok_or_else(|| anyhow::anyhow!("no sink\n{yaml}"))?;
            assert_eq!(sink.filter.is_some(), filter, "{yaml}");
            assert_eq!(written, if filter { 11 } else { 21 });
            assert!(yaml.contains("number-of-rows: 21"), "{yaml}");
        }
        Ok(())
    }

    /// Every run key is unique (a `--runs` name picks exactly one run).
    #[test]
    fn run_keys_are_unique() {
        let mut keys: Vec<&str> = RUNS.iter().map(|r| r.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), RUNS.len());
    }

    /// Nearest-rank percentiles: p50 of 1..=100 is 50, p99 is 99, p100 is the maximum, and an
    /// empty set has none.
    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&v, 0.001), Some(1));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
