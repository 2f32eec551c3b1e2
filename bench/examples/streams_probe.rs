//! A hand check of the Kafka Streams peer on one real Kafka node (the testkit's), with the
//! benchmark's own workload and checker:
//!
//! - `streams_probe throughput [RECORDS] [THREADS] [eos|alos] [pass-through|filter-projection]`:
//!   RECORDS numbered records (CSV; JSON for the filter) preloaded into 2 input partitions, one
//!   instance runs the job into 2 output partitions; input records/s (over the span of the
//!   output's LogAppendTime timestamps), the instance's CPU seconds and peak RSS, and a
//!   `read_committed` count: lost and duplicated.
//! - `streams_probe failover [RATE] [eos|alos] [receive-time] [key=value ...]`: two instances of one
//!   application (one thread each) share 2 partitions under a steady load; one is killed with
//!   SIGKILL; how long until output flows again on every partition, and lost/duplicated.
//!   `receive-time`: the checker times records by when they became visible to its
//!   `read_committed` reader instead of by when the broker appended them.
//!   `key=value` are further Kafka Streams settings for both instances (e.g.
//!   `session.timeout.ms=10000`, `group.protocol=streams`).
//!
//! Run: `cargo run -p keel-bench --example streams_probe -- throughput 500000`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use keel_bench::kafka::now_ms;
use keel_bench::procfs;
use keel_bench::streams::{self, StreamsInstance, StreamsJob, StreamsOptions};
use keel_bench::workload::{self, JobKind, OutputLog, SteadyLoad, Tally};
use keel_testkit::{create_topic, create_topic_with, Kafka};

const PARTITIONS: u64 = 2;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let app = streams::install(&repo)?;
    eprintln!("kafka streams {} from {}", app.kafka_streams_version, app.libs.display());
    let dir = tempfile::tempdir()?;
    match args.first().map(String::as_str) {
        Some("throughput") => {
            let records: u64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(500_000);
            let threads: u32 = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(1);
            let eos = eos(args.get(3))?;
            let kind = match args.get(4).map(String::as_str) {
                None | Some("pass-through") => JobKind::PassThrough,
                Some("filter-projection") => JobKind::FilterProjection,
                Some(other) => bail!("{other}: expected pass-through or filter-projection"),
            };
            throughput(&app, dir.path(), records, threads, eos, kind)
        }
        Some("failover") => {
            let rate: u64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(5_000);
            let eos = eos(args.get(2))?;
            let receive_time = args.iter().skip(3).any(|a| a == "receive-time");
            let configs = args
                .iter()
                .skip(3)
                .filter(|a| *a != "receive-time")
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow!("{kv}: expected key=value"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            failover(&app, dir.path(), rate, eos, receive_time, configs)
        }
        _ => bail!(
            "usage: streams_probe throughput [RECORDS] [THREADS] [eos|alos] [pass-through|filter-projection] \
             | failover [RATE] [eos|alos] [receive-time] [key=value ...]"
        ),
    }
}

fn eos(arg: Option<&String>) -> anyhow::Result<bool> {
    match arg.map(String::as_str) {
        None | Some("eos") => Ok(true),
        Some("alos") => Ok(false),
        Some(other) => bail!("{other}: expected eos or alos"),
    }
}

/// Input and output topics, 2 partitions each. The output is stamped by the broker
/// (LogAppendTime: the checker's times are append times; Kafka Streams would otherwise pass the
/// input's timestamps on), or with `receive_time` keeps CreateTime, and the checker's times are
/// when its `read_committed` consumer received each record (when it became visible).
fn topics(kafka: &Kafka, name: &str, receive_time: bool) -> anyhow::Result<(String, String)> {
    let (input, output) = (format!("{name}-in"), format!("{name}-out"));
    create_topic(kafka.bootstrap(), &input, 2)?;
    let stamp = if receive_time { "CreateTime" } else { "LogAppendTime" };
    create_topic_with(kafka.bootstrap(), &output, 2, &[("message.timestamp.type", stamp)])?;
    Ok((input, output))
}

fn throughput(
    app: &streams::StreamsApp,
    dir: &Path,
    records: u64,
    threads: u32,
    eos: bool,
    kind: JobKind,
) -> anyhow::Result<()> {
    let kafka = Kafka::single()?;
    let (input, output) = topics(&kafka, "tp", false)?;
    let t = Instant::now();
    workload::preload(kafka.bootstrap(), &input, PARTITIONS, kind, 0, records)?;
    eprintln!("preloaded {records} records in {:?}", t.elapsed());
    let log = OutputLog::start(kafka.bootstrap(), &output, kind, true)?;

    let mut opts =
        StreamsOptions::new(dir, kafka.bootstrap(), "probe-tp", &input, &output, StreamsJob::from(kind));
    opts.exactly_once = eos;
    opts.threads = threads;
    let launched_ms = now_ms();
    let mut instance = StreamsInstance::start(app, &opts, "tp")?;
    let pid = instance.pid();
    let running = instance.states().into_iter().find(|c| c.state == "RUNNING").context("no RUNNING line")?;
    let cpu_at_running = procfs::cpu_seconds(pid)?;
    let sampler = procfs::PeakSampler::start(pid);
    eprintln!(
        "RUNNING {} ms after launch, cpu {cpu_at_running:.2} s, tasks {:?}",
        running.at_ms - launched_ms,
        running.tasks
    );

    let deadline = Instant::now() + Duration::from_secs(600);
    let expected = kind.expected(records);
    while (log.count() as u64) < expected {
        if Instant::now() > deadline {
            bail!("{} of {expected} records out within 600 s", log.count());
        }
        if let Some(status) = instance.try_exit()? {
            bail!("the instance exited ({status}):\n{}", instance.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu_at_done = procfs::cpu_seconds(pid)?;
    let done_ms = now_ms();
    let peak_kib = sampler.finish();
    let hwm = procfs::memory(pid)?;
    log.wait_distinct(expected, Duration::from_secs(3), Duration::from_secs(60))?;
    let (seen, bad, bad_count) = log.finish()?;
    instance.stop()?;
    let tally = Tally::of(kind, records, &seen);

    // The output topic uses LogAppendTime: `at_ms` is when the broker appended each record.
    let first_at = seen.iter().map(|s| s.at_ms).min().unwrap_or_default();
    let last_at = seen.iter().map(|s| s.at_ms).max().unwrap_or_default();
    let rate = |ms: i64| records as f64 / (ms.max(1) as f64 / 1000.0);
    let cpu = cpu_at_done - cpu_at_running;
    println!(
        "kafka streams {} {}, {records} records in, {expected} out, 2 -> 2 partitions, {threads} thread(s), {}, \
         commit.interval.ms 1000",
        app.kafka_streams_version,
        kind.key(),
        if eos { "exactly_once_v2" } else { "at_least_once" }
    );
    println!(
        "  start: launch -> RUNNING {} ms; cpu to RUNNING {cpu_at_running:.2} s",
        running.at_ms - launched_ms
    );
    println!(
        "  records/s: {:.0} (LogAppendTime span {} ms); RUNNING -> last appended {} ms",
        rate(last_at - first_at),
        last_at - first_at,
        last_at - running.at_ms
    );
    println!(
        "  cpu seconds RUNNING -> all out: {cpu:.2} ({:.2} per million records; {:.0} records per cpu-second); total incl. start {cpu_at_done:.2}",
        cpu / (records as f64 / 1e6),
        records as f64 / cpu.max(0.001)
    );
    println!(
        "  peak RSS under load {} MiB (VmHWM {} MiB), done at {done_ms}",
        peak_kib / 1024,
        hwm.hwm_kib / 1024
    );
    println!(
        "  read_committed: {} read, expected {}, lost {}, duplicated {}, unexpected {}, bad {bad_count} {bad:?}",
        tally.count, tally.expected, tally.lost, tally.duplicated, tally.unexpected
    );
    Ok(())
}

fn failover(
    app: &streams::StreamsApp,
    dir: &Path,
    rate: u64,
    eos: bool,
    receive_time: bool,
    configs: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let kafka = Kafka::single()?;
    let (input, output) = topics(&kafka, "fo", receive_time)?;
    let kind = JobKind::PassThrough;
    let log = OutputLog::start(kafka.bootstrap(), &output, kind, true)?;
    let mut opts =
        StreamsOptions::new(dir, kafka.bootstrap(), "probe-fo", &input, &output, StreamsJob::from(kind));
    opts.exactly_once = eos;
    opts.configs = configs;
    let load = SteadyLoad::start(kafka.bootstrap(), &input, PARTITIONS, kind, rate)?;

    let mut a = StreamsInstance::start(app, &opts, "a")?;
    let mut b = StreamsInstance::start(app, &opts, "b")?;
    // Wait until the two split the tasks one each (a rebalances when b joins; Kafka Streams
    // may need a probing rebalance or two).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = |i: &StreamsInstance| {
            i.states().into_iter().rev().find(|c| c.state == "RUNNING" || c.state == "REBALANCING")
        };
        let (la, lb) = (last(&a), last(&b));
        let split = |c: &Option<streams::StateChange>| {
            c.as_ref().is_some_and(|c| c.state == "RUNNING" && c.partitions().len() == 1)
        };
        if split(&la) && split(&lb) {
            eprintln!("a has {:?}, b has {:?}", la.and_then(|c| c.tasks), lb.and_then(|c| c.tasks));
            break;
        }
        if Instant::now() > deadline {
            bail!("the two instances did not split the tasks within 120 s: a {la:?}, b {lb:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Steady state for 10 s.
    std::thread::sleep(Duration::from_secs(10));

    let b_runs = b.running_count();
    let next_id = load.next_id();
    let killed_ms = now_ms();
    a.kill()?;
    eprintln!("killed a (pid {}) at {killed_ms}, next id {next_id}", a.pid());
    let rerun = b.wait_running(b_runs, Duration::from_secs(180))?;
    eprintln!("b RUNNING again {} ms after the kill, tasks {:?}", rerun.at_ms - killed_ms, rerun.tasks);
    let rebalance_start = b
        .states()
        .into_iter()
        .rev()
        .find(|c| c.state == "REBALANCING" && c.at_ms >= killed_ms)
        .map(|c| c.at_ms - killed_ms);
    // Output for both partitions again, then 10 s more of steady load.
    let deadline = Instant::now() + Duration::from_secs(120);
    let recovery = loop {
        if let Some(r) = workload::recovery(&log.snapshot(), killed_ms, next_id, PARTITIONS) {
            break r;
        }
        if Instant::now() > deadline {
            bail!("output did not flow again on both partitions within 120 s of b's RUNNING");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(10));
    let produced = load.stop()?;
    log.wait_distinct(kind.expected(produced), Duration::from_secs(3), Duration::from_secs(120))?;
    let (seen, bad, bad_count) = log.finish()?;
    b.stop()?;
    let tally = Tally::of(kind, produced, &seen);
    let gap = workload::largest_gap(
        &seen,
        killed_ms - 1000,
        killed_ms + i64::try_from(recovery.as_millis())? + 1000,
    );
    let replayed = workload::replayed(&seen, killed_ms, now_ms());
    println!(
        "kafka streams {} failover, 2 instances x 1 thread, {}, {rate} records/s, times {}, settings {:?}",
        app.kafka_streams_version,
        if eos { "exactly_once_v2" } else { "at_least_once" },
        if receive_time { "received (read_committed)" } else { "appended (LogAppendTime)" },
        opts.configs
    );
    println!(
        "  kill -9 -> survivor REBALANCING {:?} ms, RUNNING {} ms (tasks {:?}), output flowing on both partitions {} ms; largest output gap {} ms",
        rebalance_start,
        rerun.at_ms - killed_ms,
        rerun.tasks,
        recovery.as_millis(),
        gap.as_millis()
    );
    println!(
        "  read_committed: produced {produced}, read {}, lost {}, duplicated {}, replayed after kill {replayed}, unexpected {}, bad {bad_count} {bad:?}",
        tally.count, tally.lost, tally.duplicated, tally.unexpected
    );
    Ok(())
}
