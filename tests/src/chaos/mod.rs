//! The chaos suite: a real cluster (3 members of the HA store: etcd members, or `keel
//! ha-member` processes with `--ha raft`; 3 Apache Kafka brokers with replication
//! factor 3 and `min.insync.replicas` 2, 2 ResourceManagers, 2 JobManagers, 3 TaskManagers), a job copying a numbered workload Kafka -> Kafka with
//! checkpoints every 500 ms, and a fault schedule drawn from a seed; then an exact account of
//! every record. See docs/chaos.md.
//!
//! - [`rng`]: the seeded random numbers (`rand`); [`schedule`]: faults from a seed.
//! - [`net`]: network namespaces and partitions; [`cluster`]: the processes.
//! - [`workload`]: the producer; [`observe`]: output reader, task and HA-store watchers.
//! - [`check`]: the accounting; [`report`]: what a run prints.
//!
//! [`run`] does it all and returns a [`report::Report`]; `report.violations` lists what
//! broke a guarantee (empty: the run passed).

pub mod check;
pub mod cluster;
pub mod net;
pub mod observe;
pub mod report;
pub mod rng;
pub mod schedule;
pub mod workload;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::Backend;
use check::InRecord;
use cluster::{Cluster, Role};
use observe::{lock, ms_since, HaWatcher, OutputReader, TaskWatcher};
use report::{FaultOutcome, Report};
use schedule::{Fault, FaultKind};
use workload::{Workload, IN_PARTITIONS};

/// Output partitions (one per subtask).
const OUT_PARTITIONS: i32 = 3;
const PARALLELISM: u32 = 3;
const JOB: &str = "chaos";

/// Delivery guarantee of the job's sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    AtLeastOnce,
    ExactlyOnce,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::AtLeastOnce => "at-least-once",
            Mode::ExactlyOnce => "exactly-once",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "at-least-once" => Ok(Mode::AtLeastOnce),
            "exactly-once" => Ok(Mode::ExactlyOnce),
            _ => Err(format!("unknown mode {s:?}; at-least-once or exactly-once")),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// Inject faults until this much time has passed since the first one (a long run)...
    pub duration: Option<Duration>,
    /// ... or exactly this many faults (the first ones of the seed's schedule).
    pub faults: Option<usize>,
    /// Fault kinds to draw from; empty: the backend's defaults ([`schedule::default_kinds`]).
    pub kinds: Vec<FaultKind>,
    /// The HA backend: [`Backend::Etcd`] (three etcd members) or [`Backend::Raft`] (three
    /// `keel ha-member` processes in their place).
    pub ha: Backend,
    pub mode: Mode,
    /// Records per second of the workload.
    pub rate: u64,
    /// Use network namespaces when they can be made.
    pub network: bool,
    /// Longest wait for output to flow again after a fault before the run is declared hung.
    pub recovery_timeout: Duration,
    /// The job's checkpoint interval.
    pub checkpoint_interval: Duration,
    /// Start the etcd members with `--pre-vote` (etcd 3.4's default is off; on here, as in
    /// `deploy/`; `--no-etcd-pre-vote` turns it off).
    pub etcd_pre_vote: bool,
    /// The leader lease TTL of the HA backend (`high-availability.etcd.lease-ttl` or
    /// `high-availability.raft.lease-ttl`); Keel's default is 3 s.
    pub lease_ttl: Duration,
    /// Keep the run directory (logs) even when the run passed.
    pub keep: bool,
    /// The keel binary; `None`: [`crate::keel_bin`].
    pub keel: Option<PathBuf>,
}

/// Keel's default leader lease TTL on etcd and raft.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);

impl Default for Options {
    fn default() -> Options {
        Options {
            seed: 1,
            duration: None,
            faults: Some(5),
            kinds: Vec::new(),
            ha: Backend::Etcd,
            mode: Mode::AtLeastOnce,
            rate: 200,
            network: true,
            recovery_timeout: Duration::from_secs(90),
            keep: false,
            checkpoint_interval: Duration::from_millis(500),
            etcd_pre_vote: true,
            lease_ttl: DEFAULT_LEASE_TTL,
            keel: None,
        }
    }
}

impl Options {
    /// The kinds the schedule draws from: those given, or the backend's defaults.
    pub fn schedule_kinds(&self) -> Vec<FaultKind> {
        if self.kinds.is_empty() {
            schedule::default_kinds(self.ha == Backend::Raft)
        } else {
            self.kinds.clone()
        }
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut c = format!("cargo run -p keel-tests --bin keel-chaos -- --seed {}", self.seed);
        if let Some(d) = self.duration {
            c += &format!(" --duration {}s", d.as_secs());
        }
        if let Some(n) = self.faults {
            c += &format!(" --faults {n}");
        }
        if !self.kinds.is_empty() {
            c += &format!(" --kinds {}", self.kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(","));
        }
        if self.ha == Backend::Raft {
            c += " --ha raft";
        }
        if self.mode == Mode::ExactlyOnce {
            c += " --mode exactly-once";
        }
        if self.rate != Options::default().rate {
            c += &format!(" --rate {}", self.rate);
        }
        if !self.network {
            c += " --no-network";
        }
        if !self.etcd_pre_vote {
            c += " --no-etcd-pre-vote";
        }
        if self.lease_ttl != DEFAULT_LEASE_TTL {
            c += &format!(" --lease-ttl {}ms", self.lease_ttl.as_millis());
        }
        if self.checkpoint_interval != Options::default().checkpoint_interval {
            c += &format!(" --checkpoint-interval {}ms", self.checkpoint_interval.as_millis());
        }
        c
    }
}

fn run_dir() -> anyhow::Result<PathBuf> {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "keel-chaos-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs the suite. Errors are failures of the harness (a process that cannot be started);
/// broken guarantees are in the report's violations.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let start = Instant::now();
    let dir = run_dir()?;
    if !matches!(opts.ha, Backend::Etcd | Backend::Raft) {
        bail!("the chaos suite runs on --ha etcd or --ha raft, not {}", opts.ha.name());
    }
    println!(
        "chaos: seed {} mode {} ha {} rate {}/s; run directory {}",
        opts.seed,
        opts.mode.name(),
        opts.ha.name(),
        opts.rate,
        dir.display()
    );
    println!("chaos: replay with: {}", opts.replay_command());
    let mut report = Report::new(opts, &dir);

    // A copy of the binary: a rebuild during the run must not change what is tested.
    let keel = dir.join("keel");
    let source = opts.keel.clone().unwrap_or_else(crate::keel_bin);
    std::fs::copy(&source, &keel).context("copying the keel binary")?;

    let external = std::env::var(keel_testkit::ENV_BOOTSTRAP).map(|s| !s.trim().is_empty()).unwrap_or(false);
    let network = if !opts.network {
        report.network = "loopback (--no-network): partitions skipped".into();
        None
    } else if external {
        report.network = format!(
            "loopback: {} names an external broker, which processes in namespaces cannot reach; partitions skipped",
            keel_testkit::ENV_BOOTSTRAP
        );
        None
    } else if let Some(why) = net::unavailable_reason() {
        report.network = format!("loopback: no network namespaces ({why}); partitions skipped");
        None
    } else {
        let layout: Vec<(&str, u8)> = cluster::layout(opts.ha).iter().map(|(n, _, o)| (*n, *o)).collect();
        let net = net::Network::create(&layout)?;
        report.network = net.describe();
        Some(net)
    };
    println!("chaos: {}", report.network);

    let cluster_id = format!("chaos-{}", std::process::id());
    let mut cluster = Cluster::layout(&dir, keel, network.as_ref(), &cluster_id, opts.ha)?;
    report.ha = match opts.ha {
        Backend::Raft => format!(
            "raft: 3 keel ha-member processes ({}); checkpoint pointers and leaders sampled (rounds of linearizable reads 50 ms apart)",
            cluster.raft_members
        ),
        _ => format!("etcd: 3 members ({}), watched", cluster.etcd_endpoints),
    };
    report.ha += &format!("; leader lease TTL {:?}", opts.lease_ttl);
    cluster.etcd_pre_vote = opts.etcd_pre_vote;
    cluster.lease_ttl = opts.lease_ttl;
    let result = run_in(opts, start, &mut cluster, network, &mut report);
    if let Err(e) = &result {
        report.violations.push(format!("the run stopped: {e:#}"));
    }
    report.elapsed = start.elapsed();
    report.load.1 = report::loadavg();
    cluster.shutdown();
    report.logs = cluster.log_paths();
    if report.violations.is_empty() && !opts.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        // The logs stay; the copy of the binary (about 90 MB) does not.
        let _ = std::fs::remove_file(dir.join("keel"));
    }
    Ok(report)
}

fn run_in(
    opts: &Options,
    start: Instant,
    cluster: &mut Cluster,
    mut network: Option<net::Network>,
    report: &mut Report,
) -> anyhow::Result<()> {
    cluster.start_ha_store()?;
    let kafka_started = Instant::now();
    cluster.start_brokers()?;
    let bootstrap = cluster.bootstrap();
    report.broker = match &cluster.broker {
        cluster::BrokerKind::External(_) => {
            format!("external Kafka cluster {bootstrap} ({}); broker faults skipped", keel_testkit::ENV_BOOTSTRAP)
        }
        _ => format!(
            "Apache Kafka, 3 KRaft nodes (broker and controller each; replication factor 3, min.insync.replicas 2) at \
             {bootstrap}, started in {:.1}s",
            kafka_started.elapsed().as_secs_f64()
        ),
    };
    println!("chaos: [{:>6.1}s] {}", start.elapsed().as_secs_f64(), report.broker);
    if opts.mode == Mode::ExactlyOnce {
        let hides = broker_hides_aborted_records(&bootstrap)?;
        report.hides_aborted = Some(hides);
    }
    let tag = keel_testkit::unique_topic("chaos");
    let (input, output) = (format!("{tag}-in"), format!("{tag}-out"));
    keel_testkit::create_topic(&bootstrap, &input, IN_PARTITIONS as i32)?;
    keel_testkit::create_topic(&bootstrap, &output, OUT_PARTITIONS)?;

    let mut etcd = match opts.ha {
        Backend::Raft => {
            let members: Vec<String> =
                cluster.nodes.iter().filter(|n| n.role.is_ha_member()).map(|n| n.address()).collect();
            HaWatcher::start_raft(members, &cluster.cluster_id, input.clone(), start)?
        }
        _ => HaWatcher::start(cluster.etcd_endpoints.clone(), &cluster.cluster_id, input.clone(), start)?,
    };
    cluster.write_config()?;
    for name in ["rm1", "rm2", "jm1", "jm2", "tm1", "tm2", "tm3"] {
        cluster.start_keel(name)?;
    }
    keel_testkit::wait_until(
        "the cluster to have leaders and 3 taskmanagers",
        Duration::from_secs(60),
        || {
            let l = cluster.leaders()?;
            Ok((l.taskmanagers == 3 && !l.jm.is_empty() && !l.rm.is_empty()).then_some(()))
        },
    )?;

    let workload = Workload::start(&bootstrap, &input, opts.rate)?;
    let mut reader = OutputReader::start(
        &bootstrap,
        &output,
        OUT_PARTITIONS,
        opts.mode == Mode::ExactlyOnce,
        false,
        start,
    )?;
    // The input is read along the way too, for the final accounting.
    let mut input_reader = OutputReader::start(&bootstrap, &input, IN_PARTITIONS as i32, false, true, start)?;
    let spec = cluster.dir.join("job.yaml");
    std::fs::write(&spec, job_spec(opts, &bootstrap, &input, &output, &tag))?;
    cluster.keel_run(&spec)?;
    let status = cluster.keel_json(&["status", JOB])?;
    let job_id =
        status["job"]["job_id"].as_str().ok_or_else(|| anyhow!("no job id in {status}"))?.to_string();
    let tms = cluster.metrics.clone();
    let mut tasks = TaskWatcher::start(tms, job_id.clone(), Duration::from_millis(250), start)?;
    let first = reader.probe(workload.next());
    keel_testkit::wait_until("the job's output to flow", Duration::from_secs(60), || {
        Ok(reader.probe_result(first).map(|_| ()))
    })?;
    println!("chaos: [{:>6.1}s] job {JOB} ({job_id}) runs; output flows", start.elapsed().as_secs_f64());
    // The pipeline's own latency, without a fault: what every recovery time includes.
    for _ in 0..3 {
        let probe = reader.probe(workload.next());
        let took = keel_testkit::wait_until("output to flow (baseline)", Duration::from_secs(60), || {
            Ok(reader.probe_result(probe))
        })?;
        report.baseline.push(took.as_millis() as u64);
        std::thread::sleep(Duration::from_millis(700));
    }

    // The schedule.
    let count = opts.faults.unwrap_or(100_000);
    let faults = schedule::schedule(opts.seed, &opts.schedule_kinds(), count);
    let schedule_start = Instant::now();
    for fault in faults {
        if opts.duration.is_some_and(|d| schedule_start.elapsed() >= d) {
            break;
        }
        if !workload.is_running() {
            bail!("the workload producer stopped");
        }
        // Each fault starts from a pipeline that has caught up (its newest output due at most
        // a few baseline latencies ago), so that its recovery time is its own.
        let caught_up = Duration::from_millis(
            check::p50_max(&report.baseline).map_or(2_000, |(p50, _)| (3 * p50).max(2_000)),
        );
        let caught = keel_testkit::wait_until("the output to catch up", Duration::from_secs(60), || {
            let newest = reader.progress().1;
            Ok(newest
                .filter(|n| Instant::now().saturating_duration_since(workload.due(*n)) <= caught_up)
                .map(|_| ()))
        });
        println!("chaos: {}", progress_line(start, &workload, &reader, &etcd, &tasks));
        std::thread::sleep(Duration::from_millis(fault.gap_ms));
        let watch = Watch { reader: &reader, workload: &workload, etcd: &etcd, start, opts, output: &output };
        let mut outcome = inject(cluster, network.as_mut(), &watch, &fault);
        outcome.caught_up = caught.is_ok();
        if !outcome.caught_up {
            outcome.notes.push("the output had not caught up before it (60 s)".into());
        }
        let stop = outcome.recovery.is_none() && outcome.skipped.is_none();
        println!("chaos: {}", outcome.line());
        report.faults.push(outcome);
        for (name, status) in cluster.exited() {
            report.violations.push(format!("{name} exited by itself ({status}) during the run"));
            if let Err(e) = cluster.restart(&name) {
                report.violations.push(format!("{name} could not be started again: {e:#}"));
            }
        }
        if stop {
            let missing =
                report.faults.last().map(|o| o.error.clone().unwrap_or_default()).unwrap_or_default();
            report.violations.push(format!(
                "fault {}: the job did not recover within {:?} ({missing}); the schedule stops here",
                fault, opts.recovery_timeout
            ));
            break;
        }
    }

    // The end: stop the input, read everything, account.
    println!("chaos: [{:>6.1}s] schedule done; draining", start.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(2));
    let workload_start_ms = u64::try_from(workload.started.duration_since(start).as_millis()).unwrap_or(0);
    let rate = workload.rate.max(1);
    let acked_ends = workload.acked_ends.clone();
    let (end, resent) = workload.finish()?;
    report.resent = resent;
    let acked_ends = lock(&acked_ends).clone();
    let mut progress = (0usize, Instant::now());
    loop {
        if input_reader.reached(&acked_ends) {
            break;
        }
        let n = input_reader.count();
        if n > progress.0 {
            progress = (n, Instant::now());
        }
        if progress.1.elapsed() > Duration::from_secs(120) {
            report.violations.push(format!(
                "the input topic could not be read to its end (offsets {acked_ends:?} acknowledged to the \
                 producer) within 120 s without progress: the accounting below is incomplete"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Records the producer wrote again after a failed delivery may follow.
    std::thread::sleep(Duration::from_secs(2));
    input_reader.stop();
    let input_records: Vec<InRecord> = lock(&input_reader.state)
        .records
        .iter()
        .map(|r| InRecord { partition: r.partition, offset: r.offset, n: r.n })
        .collect();
    let wanted: HashSet<u64> = input_records.iter().map(|r| r.n).collect();
    let mut last_missing = usize::MAX;
    let mut last_progress = Instant::now();
    loop {
        let missing = {
            let s = lock(&reader.state);
            let seen: HashSet<u64> = s.records.iter().map(|r| r.n).collect();
            wanted.iter().filter(|n| !seen.contains(n)).count()
        };
        if missing == 0 {
            break;
        }
        if missing < last_missing {
            last_missing = missing;
            last_progress = Instant::now();
        }
        if last_progress.elapsed() > Duration::from_secs(60) {
            println!(
                "chaos: {missing} input numbers still missing from the output after 60 s without progress"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Whatever the job still writes (replays) arrives within this.
    std::thread::sleep(Duration::from_secs(3));
    reader.stop();
    tasks.stop();
    etcd.stop();
    match cluster.keel_json(&["status", JOB]) {
        Ok(s) => {
            report.job_restarts = s["restarts"].as_u64();
            report.job_state = s["job"]["state"].as_str().unwrap_or_default().to_string();
        }
        Err(e) => report.job_state = format!("unknown: {e:#}"),
    }
    let out_state = lock(&reader.state);
    let etcd_state = lock(&etcd.state);
    // End-to-end latency of each number's first copy: arrival minus when it was due.
    let mut first_seen: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    for r in &out_state.records {
        first_seen.entry(r.n).or_insert(r.at_ms);
    }
    let lags: Vec<u64> =
        first_seen.iter().map(|(n, at)| at.saturating_sub(workload_start_ms + n * 1000 / rate)).collect();
    // Every output record as it arrived, for a closer look at a run (kept with --keep or when
    // the run fails): number, output partition and offset, ms since the start when it arrived and
    // when it was due.
    let mut csv = String::from("n,partition,offset,arrived_ms,due_ms\n");
    for r in &out_state.records {
        let due = workload_start_ms + r.n * 1000 / rate;
        csv += &format!("{},{},{},{},{due}\n", r.n, r.partition, r.offset, r.at_ms);
    }
    if let Err(e) = std::fs::write(cluster.dir.join("output.csv"), csv) {
        report.notes.push(format!("cannot write output.csv: {e}"));
    }
    report.latency = check::p50_p99_max(&lags);
    let mut fault_times: Vec<(usize, u64, u64)> = Vec::new();
    for f in report.faults.iter().filter(|f| f.skipped.is_none()) {
        let bound = if f.caught_up { f.at_ms } else { fault_times.last().map_or(0, |p| p.2) };
        fault_times.push((f.fault.index, f.at_ms, bound));
    }
    report.accounting = check::account(
        end,
        &input_records,
        &out_state.records,
        out_state.garbage.len(),
        &etcd_state.completed,
        &fault_times,
        &report
            .faults
            .iter()
            .filter(|f| f.fault.kind.is_broker_fault())
            .map(|f| f.fault.index)
            .collect::<Vec<_>>(),
    );
    report.end = end;
    report.checkpoints = etcd_state.completed.len();
    report.unread_metadata = etcd_state.unread_metadata;
    report.leaders = etcd_state.leaders.clone();
    report.completed = etcd_state.completed.clone();
    report.violations.extend(etcd_state.violations.iter().cloned());
    report.notes.extend(etcd_state.notes.iter().cloned());
    if opts.ha == Backend::Raft {
        let (first, last) = etcd_state.rounds_ms;
        let period = last.saturating_sub(first) / etcd_state.rounds.saturating_sub(1).max(1);
        report.notes.push(format!(
            "raft HA store sampled in {} rounds of linearizable reads, one every {period} ms on average ({} failed: no \
             Raft leader answered in time); pointer moves and leaderships that lasted less than a round are not seen",
            etcd_state.rounds, etcd_state.failed_rounds
        ));
    }
    report.overlaps = lock(&tasks.state).overlaps.clone();
    let committed_ends = out_state.read_ends.clone();
    drop(out_state);
    drop(etcd_state);
    if opts.mode == Mode::ExactlyOnce && !report.accounting.lost.is_empty() {
        explain_invisible(&bootstrap, &output, &committed_ends, start, report);
    }
    report.judge();
    // The network goes after the processes (the caller's shutdown); dropping it here is fine
    // because every process is killed first.
    cluster.shutdown();
    drop(network.take());
    Ok(())
}

fn job_spec(opts: &Options, bootstrap: &str, input: &str, output: &str, tag: &str) -> String {
    let mode = opts.mode;
    let interval_ms = opts.checkpoint_interval.as_millis();
    let guarantee = match mode {
        Mode::AtLeastOnce => "    sink.delivery-guarantee: at-least-once\n".to_string(),
        Mode::ExactlyOnce => {
            format!("    sink.delivery-guarantee: exactly-once\n    sink.transactional-id-prefix: {tag}-tx\n")
        }
    };
    format!(
        r#"name: {JOB}
parallelism: {PARALLELISM}
config:
  execution.checkpointing.interval: {interval_ms} ms
  state.checkpoints.num-retained: 5
  restart-strategy.exponential-delay.reset-backoff-threshold: 2 s
sources:
  - name: in
    connector: kafka
    topic: {input}
    properties.bootstrap.servers: {bootstrap}
    properties.group.id: {tag}-job
    scan.startup.mode: earliest-offset
    format: csv
    columns:
      - {{name: k, type: STRING}}
      - {{name: n, type: BIGINT}}
sinks:
  - name: out
    connector: kafka
    from: in
    topic: {output}
    properties.bootstrap.servers: {bootstrap}
    format: csv
    key.format: raw
    key.fields: k
    sink.partitioner: fixed
    properties.linger.ms: 50
{guarantee}"#
    )
}

/// Where the fault lands, resolved from the cluster's state now (`output`: the job's output
/// topic, whose partitions' leaders broker faults aim at).
fn resolve(cluster: &Cluster, fault: &Fault, output: &str) -> anyhow::Result<(String, String)> {
    let leaders = || cluster.leaders();
    let node_at = |address: &str| {
        cluster
            .by_address(address)
            .map(|n| n.name.clone())
            .ok_or_else(|| anyhow!("no node listens on {address}"))
    };
    let task_tms = || -> anyhow::Result<Vec<String>> {
        let s = cluster.keel_json(&["status", JOB])?;
        let mut names: Vec<String> = s["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["taskmanager_address"].as_str())
            .filter_map(|a| cluster.by_address(a).map(|n| n.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            bail!("no taskmanager runs a task of {JOB}: {s}");
        }
        Ok(names)
    };
    let pick = |names: &[String]| names[(fault.pick % names.len() as u64) as usize].clone();
    Ok(match fault.kind {
        FaultKind::KillJmLeader | FaultKind::PauseJmLeader | FaultKind::PartitionJmLeader => {
            let l = leaders()?;
            (node_at(&l.jm)?, format!("jobmanager leader, epoch {}", l.jm_epoch))
        }
        FaultKind::KillRmLeader | FaultKind::PauseRmLeader | FaultKind::PartitionRmLeader => {
            let l = leaders()?;
            (node_at(&l.rm)?, format!("resourcemanager leader, epoch {}", l.rm_epoch))
        }
        FaultKind::KillStandby => {
            let l = leaders()?;
            let (leader, others) =
                if fault.pick.is_multiple_of(2) { (l.jm, ["jm1", "jm2"]) } else { (l.rm, ["rm1", "rm2"]) };
            let leader = node_at(&leader)?;
            let standby = others.iter().find(|n| **n != leader).map(|s| s.to_string()).unwrap_or_default();
            (standby, "standby".into())
        }
        FaultKind::KillTm | FaultKind::PauseTm | FaultKind::PartitionTm | FaultKind::PartitionTmOneWay => {
            let names = task_tms()?;
            let n = pick(&names);
            (n, format!("runs tasks; taskmanagers with tasks: {}", names.join(",")))
        }
        FaultKind::KillBrokerLeader => output_leader(cluster, output, fault.pick)?,
        FaultKind::PauseBroker | FaultKind::PartitionBroker if fault.pick.is_multiple_of(2) => {
            output_leader(cluster, output, fault.pick / 2)?
        }
        FaultKind::RestartBroker | FaultKind::PauseBroker | FaultKind::PartitionBroker => {
            let names = cluster.names_of(|r| matches!(r, Role::Kafka(_)));
            let name = names[(fault.pick / 2 % names.len() as u64) as usize].clone();
            let id = cluster.node(&name)?.role;
            let leads: Vec<i32> = (0..OUT_PARTITIONS)
                .filter(|p| {
                    cluster::leader_of(&cluster.bootstrap(), output, *p).is_ok_and(|l| Role::Kafka(l) == id)
                })
                .collect();
            (name, format!("a broker; leads output partitions {leads:?}"))
        }
        FaultKind::RestartEtcd | FaultKind::PartitionEtcdMember | FaultKind::PauseHaMember => {
            let leader = cluster.ha_leader()?;
            let store = if cluster.ha == Backend::Raft { "raft" } else { "etcd" };
            if (fault.pick / 2).is_multiple_of(2) {
                (leader, format!("{store} leader"))
            } else {
                let followers: Vec<String> =
                    cluster.ha_member_names().into_iter().filter(|n| *n != leader).collect();
                (pick(&followers), format!("{store} follower"))
            }
        }
    })
}

/// The Kafka node leading output partition `pick % OUT_PARTITIONS`: (name, description).
fn output_leader(cluster: &Cluster, output: &str, pick: u64) -> anyhow::Result<(String, String)> {
    let partition = (pick % OUT_PARTITIONS as u64) as i32;
    let id = cluster::leader_of(&cluster.bootstrap(), output, partition)?;
    Ok((cluster.kafka_name(id)?, format!("broker {id}, leader of output partition {partition}")))
}

/// What [`inject`] watches.
struct Watch<'a> {
    reader: &'a OutputReader,
    workload: &'a Workload,
    etcd: &'a HaWatcher,
    start: Instant,
    opts: &'a Options,
    /// The job's output topic.
    output: &'a str,
}

fn inject(
    cluster: &mut Cluster,
    network: Option<&mut net::Network>,
    w: &Watch<'_>,
    fault: &Fault,
) -> FaultOutcome {
    let (reader, workload, start, opts) = (w.reader, w.workload, w.start, w.opts);
    let mut outcome = FaultOutcome::new(fault.clone(), ms_since(start));
    if fault.kind.needs_network() && network.is_none() {
        outcome.skipped = Some("no network namespaces".into());
        return outcome;
    }
    if fault.kind.needs_own_broker() && cluster.broker_is_external() {
        outcome.skipped = Some("external broker".into());
        return outcome;
    }
    // The target may be briefly unknown (a job being recovered by a new leader has no tasks).
    let resolved = keel_testkit::wait_until("the fault's target", Duration::from_secs(30), || {
        resolve(cluster, fault, w.output).map(Some)
    });
    let (mut target, mut about) = match resolved {
        Ok(t) => t,
        Err(e) => {
            outcome.error = Some(format!("cannot resolve the target: {e:#}"));
            return outcome;
        }
    };
    // `keel cluster` asks a JobManager, and a deposed one that has just come back from a
    // partition may still name itself from a stale leader watch (seen once on raft). The HA
    // store decides: a newer leadership there is the one a leader fault hits.
    let role = match fault.kind {
        FaultKind::KillJmLeader | FaultKind::PauseJmLeader | FaultKind::PartitionJmLeader => {
            Some("jobmanager")
        }
        FaultKind::KillRmLeader | FaultKind::PauseRmLeader | FaultKind::PartitionRmLeader => {
            Some("resourcemanager")
        }
        _ => None,
    };
    if let Some(role) = role {
        let said = about.rsplit("epoch ").next().and_then(|e| e.parse::<u64>().ok());
        let store = lock(&w.etcd.state)
            .leaders
            .iter()
            .rfind(|l| l.role == role)
            .and_then(|l| l.epoch.map(|e| (e, l.address.clone())));
        if let (Some(said), Some((epoch, address))) = (said, store) {
            if let Some(node) = cluster.by_address(&address).filter(|_| epoch > said) {
                outcome.notes.push(format!(
                    "keel cluster named {target} (epoch {said}) as the {role} leader, but the HA store's is epoch \
                     {epoch} ({address}): that one is hit"
                ));
                target = node.name.clone();
                about = format!("{role} leader, epoch {epoch}, from the HA store");
            }
        }
    }
    outcome.target = format!("{target} ({about})");
    let restarts_before = cluster.keel_json(&["status", JOB]).ok().and_then(|s| s["restarts"].as_u64());
    let hold = Duration::from_millis(fault.hold_ms);
    outcome.at_ms = ms_since(start);
    let at_wall_ms = observe::wall_ms();
    outcome.at_wall_ms = at_wall_ms;
    outcome.lag_before_ms = reader.latency_before(outcome.at_ms, 3_000, |n| {
        workload.due(n).saturating_duration_since(start).as_millis() as u64
    });
    let probe = reader.probe(workload.next());
    let result: anyhow::Result<()> = (|| {
        match fault.kind {
            FaultKind::KillTm
            | FaultKind::KillJmLeader
            | FaultKind::KillRmLeader
            | FaultKind::KillStandby => {
                cluster.kill9(&target)?;
                std::thread::sleep(hold);
                cluster.restart(&target)?;
            }
            FaultKind::PauseJmLeader
            | FaultKind::PauseRmLeader
            | FaultKind::PauseTm
            | FaultKind::PauseBroker => {
                cluster.pause(&target)?;
                std::thread::sleep(hold);
                cluster.resume(&target)?;
            }
            FaultKind::KillBrokerLeader => {
                cluster.kill9(&target)?;
                std::thread::sleep(hold);
                cluster.restart(&target)?;
            }
            FaultKind::RestartBroker => {
                cluster.stop_kafka(&target)?;
                std::thread::sleep(hold);
                cluster.restart(&target)?;
            }
            FaultKind::RestartEtcd => {
                cluster.kill9(&target)?;
                std::thread::sleep(hold);
                cluster.restart(&target)?;
                cluster.wait_ha_store_healthy(Duration::from_secs(60))?;
            }
            FaultKind::PauseHaMember => {
                cluster.pause(&target)?;
                std::thread::sleep(hold);
                cluster.resume(&target)?;
                cluster.wait_ha_store_healthy(Duration::from_secs(60))?;
            }
            _ => {
                let net = network.ok_or_else(|| anyhow!("no network"))?;
                let control: Vec<String> =
                    ["rm1", "rm2", "jm1", "jm2"].iter().map(|s| s.to_string()).collect();
                let everyone: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
                let tms = cluster.names_of(|r| r == Role::TaskManager);
                let etcds = cluster.ha_member_names();
                let me = vec![target.clone()];
                let cut = match fault.kind {
                    FaultKind::PartitionJmLeader | FaultKind::PartitionRmLeader => {
                        net.cut(&me, &everyone, true)?
                    }
                    FaultKind::PartitionTm => net.cut(&me, &control, true)?,
                    FaultKind::PartitionTmOneWay => net.cut(&me, &control, false)?,
                    FaultKind::PartitionEtcdMember => net.cut(&me, &etcds, true)?,
                    FaultKind::PartitionBroker => net.cut(&me, &everyone, true)?,
                    _ => net.cut(&me, &tms, true)?,
                };
                outcome.notes.push(format!("{} links cut", cut.pairs.len()));
                std::thread::sleep(hold);
                net.heal(cut)?;
            }
        }
        Ok(())
    })();
    outcome.held_ms = ms_since(start).saturating_sub(outcome.at_ms);
    if let Err(e) = result {
        outcome.error = Some(format!("injecting the fault failed: {e:#}"));
        return outcome;
    }
    match wait_for_output(reader, probe, opts.recovery_timeout) {
        Ok(d) => outcome.recovery = Some(d),
        Err(why) => {
            outcome.error = Some(format!(
                "output did not flow again for input partitions {:?} ({why}); {}",
                reader.probe_missing(probe),
                status_summary(cluster)
            ));
        }
    }
    outcome.slowest_partition = reader.probe_slowest(probe);
    // Healthy again also means checkpointing again. Reported: the first checkpoint triggered
    // after the fault that completed; waited for (before the next fault): one completed after
    // the fault ended.
    let healed_ms = outcome.at_ms + outcome.held_ms;
    let checkpointed =
        keel_testkit::wait_until("a checkpoint after the fault", opts.recovery_timeout, || {
            Ok(lock(&w.etcd.state).completed.iter().find(|c| c.seen_ms > healed_ms).map(|c| c.checkpoint_id))
        });
    match checkpointed {
        Ok(_) => {
            let first = lock(&w.etcd.state)
                .completed
                .iter()
                .find(|c| c.trigger_wall_ms > at_wall_ms)
                .map(|c| (c.seen_ms, c.checkpoint_id));
            if let Some((seen_ms, id)) = first {
                outcome.checkpointed = Some(Duration::from_millis(seen_ms.saturating_sub(outcome.at_ms)));
                outcome.notes.push(format!("first checkpoint triggered after it: {id}"));
            }
        }
        Err(_) => {
            let e =
                format!("no checkpoint completed within {:?} after the fault ended", opts.recovery_timeout);
            outcome.error = Some(outcome.error.take().map_or(e.clone(), |prev| format!("{prev}; {e}")));
            outcome.recovery = None;
        }
    }
    // A broker fault ends when the Kafka cluster is whole again (every replica back in sync), so
    // that the next fault does not find partitions with one replica in sync (which would stop
    // acks=all producers: unavailability, not a fault of its own).
    if fault.kind.is_broker_fault() {
        if let Err(e) = cluster.wait_kafka_in_sync(opts.recovery_timeout) {
            let e =
                format!("the Kafka cluster was not in sync again within {:?}: {e:#}", opts.recovery_timeout);
            outcome.error = Some(outcome.error.take().map_or(e.clone(), |prev| format!("{prev}; {e}")));
            outcome.recovery = None;
        }
    }
    let status_after = cluster.keel_json(&["status", JOB]).ok();
    let restarts_after = status_after.as_ref().and_then(|s| s["restarts"].as_u64());
    if let (Some(b), Some(a)) = (restarts_before, restarts_after) {
        outcome.job_restarts = Some(a.saturating_sub(b));
        let history = status_after.as_ref().and_then(|s| s["restart_history"].as_array().cloned());
        outcome.restart_pause_ms = history.map(|h| {
            h.iter()
                .filter(|r| r["restart"].as_u64().is_some_and(|n| n > b))
                .filter_map(|r| r["delay_ms"].as_u64())
                .sum()
        });
    }
    outcome
}

/// Waits for the probe: output from every input partition produced after the fault. A
/// partition whose output is behind but advancing (the job working through a backlog) is
/// waited for; one whose output has not advanced for `timeout` has stopped, and so
/// has everything after four times `timeout`.
fn wait_for_output(reader: &OutputReader, probe: usize, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut newest = Vec::new();
    let mut advanced = Instant::now();
    loop {
        if let Some(d) = reader.probe_result(probe) {
            return Ok(d);
        }
        let now = reader.newest_of(&reader.probe_missing(probe));
        if now != newest {
            newest = now;
            advanced = Instant::now();
        }
        if advanced.elapsed() >= timeout {
            return Err(format!("their output has not advanced for {timeout:?}"));
        }
        if started.elapsed() >= 4 * timeout {
            return Err(format!("their output is advancing but still behind after {:?}", 4 * timeout));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where the workload, the output and the checkpoints are: how far the producer is behind its
/// schedule, and how long ago the newest number in the output was due.
fn progress_line(
    start: Instant,
    workload: &Workload,
    reader: &OutputReader,
    etcd: &HaWatcher,
    tasks: &TaskWatcher,
) -> String {
    let now = Instant::now();
    let next = workload.next();
    let producer_behind = now.saturating_duration_since(workload.due(next));
    let (records, newest) = reader.progress();
    let output_behind = newest.map(|n| now.saturating_duration_since(workload.due(n)));
    let checkpoints = lock(&etcd.state).completed.len();
    let sinks = lock(&tasks.state).sink_records_out();
    format!(
        "[{:>6.1}s] produced {next} (producer {:.1}s behind its schedule); the job's sinks wrote {sinks}; output read \
         {records} records, newest number due {} ago; {checkpoints} checkpoints",
        start.elapsed().as_secs_f64(),
        producer_behind.as_secs_f64(),
        output_behind.map_or("-".to_string(), |d| format!("{:.1}s", d.as_secs_f64())),
    )
}

/// Exactly-once records a read_committed reader never saw: are they in the topic, behind a
/// transaction that was never committed or aborted (the partition's last stable offset stuck)?
/// Reads the output once more, read_uncommitted, and says so in the report.
fn explain_invisible(
    bootstrap: &str,
    output: &str,
    committed_ends: &[i64],
    start: Instant,
    report: &mut Report,
) {
    let Ok(mut all) = OutputReader::start(bootstrap, output, OUT_PARTITIONS, false, false, start) else {
        return;
    };
    let highs: Vec<i64> = (0..OUT_PARTITIONS)
        .map(|p| keel_testkit::watermarks(bootstrap, output, p).map(|(_, h)| h).unwrap_or(0))
        .collect();
    let _ = keel_testkit::wait_until("the output read uncommitted", Duration::from_secs(120), || {
        Ok(all.reached(&highs.iter().map(|h| h - 1).collect::<Vec<_>>()).then_some(()))
    });
    all.stop();
    let state = lock(&all.state);
    let present: HashSet<u64> = state.records.iter().map(|r| r.n).collect();
    let lost = &report.accounting.lost;
    let hidden = lost.iter().filter(|n| present.contains(n)).count();
    let stuck: Vec<String> = (0..OUT_PARTITIONS as usize)
        .filter(|p| committed_ends.get(*p).copied().unwrap_or(0) < state.read_ends.get(*p).copied().unwrap_or(0))
        .map(|p| {
            format!(
                "partition {p}: read_committed stopped at offset {}, read_uncommitted reached {} (high watermark {})",
                committed_ends.get(p).copied().unwrap_or(0),
                state.read_ends.get(p).copied().unwrap_or(0),
                highs.get(p).copied().unwrap_or(0)
            )
        })
        .collect();
    report.notes.push(format!(
        "exactly-once: {hidden} of the {} records a read_committed reader never saw are in the output topic \
         (read_uncommitted); {}",
        lost.len(),
        if stuck.is_empty() {
            "no output partition is held back by an open transaction".to_string()
        } else {
            format!(
                "held back by a transaction never committed nor aborted (the last stable offset stuck): {}",
                stuck.join("; ")
            )
        }
    ));
}

/// A short account of the job from `keel status`.
fn status_summary(cluster: &Cluster) -> String {
    match cluster.keel_json(&["status", JOB]) {
        Ok(s) => {
            let tasks: Vec<String> = s["tasks"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    format!(
                        "{}#{} {} on {} in/s {:.0} pending {}",
                        t["subtask"],
                        t["attempt"],
                        t["state"],
                        t["taskmanager_id"],
                        t["records_in_per_second"].as_f64().unwrap_or(0.0),
                        t["pending_records"]
                    )
                })
                .collect();
            let last = s["checkpoints"]
                .as_array()
                .and_then(|c| c.last())
                .map(|c| format!("{} {}", c["id"], c["state"]));
            format!(
                "job {} ({}), restarts {}, last checkpoint {}; tasks: {}",
                s["job"]["state"],
                s["status_message"],
                s["restarts"],
                last.unwrap_or_default(),
                tasks.join("; ")
            )
        }
        Err(e) => format!("keel status failed: {e:#}"),
    }
}

/// Whether `read_committed` readers of this broker skip records of aborted transactions (as
/// tests/tests/exactly_once.rs probes it).
pub fn broker_hides_aborted_records(bootstrap: &str) -> anyhow::Result<bool> {
    let topic = keel_testkit::unique_topic("chaos-probe");
    keel_testkit::create_topic(bootstrap, &topic, 1)?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", keel_testkit::unique_topic("chaos-probe-tx"))
        .set("log_level", "3")
        .create()?;
    let t = Duration::from_secs(10);
    producer.init_transactions(t)?;
    producer.begin_transaction()?;
    producer.send(BaseRecord::<[u8], [u8]>::to(&topic).payload(b"1")).map_err(|(e, _)| e)?;
    producer.flush(t)?;
    producer.abort_transaction(t)?;
    producer.begin_transaction()?;
    producer.send(BaseRecord::<[u8], [u8]>::to(&topic).payload(b"2")).map_err(|(e, _)| e)?;
    producer.commit_transaction(t)?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", keel_testkit::unique_topic("chaos-probe-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let (mut saw_aborted, mut saw_committed) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !saw_committed {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            match m.payload() {
                Some(b"1") => saw_aborted = true,
                Some(b"2") => saw_committed = true,
                _ => {}
            }
        }
    }
    anyhow::ensure!(saw_committed, "probe: the committed record was not read");
    Ok(!saw_aborted)
}
