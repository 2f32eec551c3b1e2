//! What the runner watches while the schedule runs, each on a thread of its own:
//!
//! - [`OutputReader`]: every record of the output topic as it arrives (read_committed for the
//!   exactly-once mode), with its arrival time; *probes* measure when output flows again after
//!   a fault.
//! - [`TaskWatcher`]: every TaskManager's `GET /metrics`, a few times a second: which attempt
//!   of which subtask runs where, and how many records its sink wrote. Two attempts of one
//!   subtask alive at once, and an older one still writing, are recorded.
//! - [`HaWatcher`]: the cluster's HA keys. On etcd, `etcdctl watch`: every leader change and
//!   every move of a checkpoint pointer, in etcd's revision order. A pointer moved with an epoch
//!   that is not the JobManager leader's at that revision, or to a checkpoint id that does not
//!   grow, is recorded; each completed checkpoint's source positions are read from its metadata.
//!   On raft (no history API) the leaders and the pointers are *sampled*: linearizable reads
//!   every 50 ms, each round reading the JobManager leader, the pointers, then the leader again,
//!   so a pointer move's epoch is checked against the leaders read around it (see
//!   [`HaWatcher::start_raft`]); a pointer moved twice between two rounds shows once.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use super::cluster::http_get;
use super::workload::{parse_value, partition_of, IN_PARTITIONS};

/// Locks, recovering from a poisoned mutex (a panicking observer thread must not hide data).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0)
}

/// Milliseconds since `start`.
pub fn ms_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One output record.
#[derive(Debug, Clone, Copy)]
pub struct OutRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: u64,
    pub n: u64,
    /// Arrival at the reader, ms since the run started.
    pub at_ms: u64,
}

/// Waits for output to flow again: satisfied when, for every input partition, the output has
/// a number at least the threshold (the first number of that partition produced after the
/// probe started).
#[derive(Debug, Clone)]
struct Probe {
    started_ms: u64,
    thresholds: Vec<Option<u64>>,
    /// When each input partition was satisfied.
    satisfied_ms: Vec<Option<u64>>,
    done_ms: Option<u64>,
}

#[derive(Default)]
pub struct OutState {
    pub records: Vec<OutRecord>,
    pub garbage: Vec<String>,
    probes: Vec<Probe>,
    max_by_partition: Vec<Option<u64>>,
    /// Per topic partition, the offset after the last record read.
    pub read_ends: Vec<i64>,
}

impl OutState {
    fn read(&mut self, partition: i32, offset: i64) {
        if let Ok(p) = usize::try_from(partition) {
            if self.read_ends.len() <= p {
                self.read_ends.resize(p + 1, 0);
            }
            self.read_ends[p] = self.read_ends[p].max(offset + 1);
        }
    }

    fn add(&mut self, r: OutRecord) {
        let p = partition_of(r.n) as usize;
        if self.max_by_partition.len() < IN_PARTITIONS as usize {
            self.max_by_partition.resize(IN_PARTITIONS as usize, None);
        }
        let m = &mut self.max_by_partition[p];
        *m = Some(m.map_or(r.n, |m| m.max(r.n)));
        for probe in self.probes.iter_mut().filter(|p| p.done_ms.is_none()) {
            if let Some(t) = probe.thresholds[p] {
                if r.n >= t {
                    probe.thresholds[p] = None;
                    probe.satisfied_ms[p] = Some(r.at_ms);
                }
            }
            if probe.thresholds.iter().all(Option::is_none) {
                probe.done_ms = Some(r.at_ms);
            }
        }
        self.records.push(r);
    }
}

/// A topic's reader thread (the output topic; the input topic too, for the final accounting):
/// every record from the beginning, as it arrives.
pub struct OutputReader {
    pub state: Arc<Mutex<OutState>>,
    start: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl OutputReader {
    pub fn start(
        bootstrap: &str,
        topic: &str,
        partitions: i32,
        read_committed: bool,
        background: bool,
        start: Instant,
    ) -> anyhow::Result<OutputReader> {
        let mut config = ClientConfig::new();
        if background {
            // A reader nobody waits on (the input, for the final accounting) asks the broker to
            // hold each fetch until it has more to return: fewer requests on a busy machine.
            config.set("fetch.wait.max.ms", "1000").set("fetch.min.bytes", "65536");
        }
        let consumer: BaseConsumer = config
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("{topic}-checker"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", if read_committed { "read_committed" } else { "read_uncommitted" })
            .set("reconnect.backoff.max.ms", "500")
            .set("log_level", "3")
            .create()
            .context("creating a topic reader")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let state = Arc::new(Mutex::new(OutState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t_state, t_stop) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("chaos-output".into()).spawn(move || {
            while !t_stop.load(Ordering::SeqCst) {
                match consumer.poll(Duration::from_millis(100)) {
                    None => {}
                    Some(Err(e)) => tracing::debug!(error = %e, "output reader: consumer error"),
                    Some(Ok(m)) => {
                        let at_ms = ms_since(start);
                        let payload = m.payload().unwrap_or_default();
                        let mut s = lock(&t_state);
                        s.read(m.partition(), m.offset());
                        match parse_value(payload) {
                            Some((key, n)) => s.add(OutRecord {
                                partition: m.partition(),
                                offset: m.offset(),
                                key,
                                n,
                                at_ms,
                            }),
                            None => s.garbage.push(String::from_utf8_lossy(payload).into_owned()),
                        }
                    }
                }
            }
        })?;
        Ok(OutputReader { state, start, stop, thread: Some(thread) })
    }

    /// Starts a probe for "output flows again" from the number the workload produces next.
    pub fn probe(&self, next_number: u64) -> usize {
        let thresholds = (0..IN_PARTITIONS)
            .map(|p| Some(next_number + (p + IN_PARTITIONS - next_number % IN_PARTITIONS) % IN_PARTITIONS))
            .collect();
        let mut s = lock(&self.state);
        let satisfied_ms = vec![None; IN_PARTITIONS as usize];
        s.probes.push(Probe { started_ms: ms_since(self.start), thresholds, satisfied_ms, done_ms: None });
        s.probes.len() - 1
    }

    /// How long the probe took, once it is satisfied.
    pub fn probe_result(&self, id: usize) -> Option<Duration> {
        let s = lock(&self.state);
        let p = s.probes.get(id)?;
        p.done_ms.map(|d| Duration::from_millis(d.saturating_sub(p.started_ms)))
    }

    /// The input partition that flowed last, and when (after the probe started).
    pub fn probe_slowest(&self, id: usize) -> Option<(usize, Duration)> {
        let s = lock(&self.state);
        let p = s.probes.get(id)?;
        p.satisfied_ms
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (i, Duration::from_millis(t.saturating_sub(p.started_ms)))))
            .max_by_key(|(_, d)| *d)
    }

    /// Input partitions the probe still waits for.
    pub fn probe_missing(&self, id: usize) -> Vec<usize> {
        let s = lock(&self.state);
        s.probes
            .get(id)
            .map(|p| p.thresholds.iter().enumerate().filter(|(_, t)| t.is_some()).map(|(i, _)| i).collect())
            .unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        lock(&self.state).records.len()
    }

    /// The pipeline's latency just before `at_ms` (ms since the start): the median, over the
    /// records that arrived in the `window_ms` before it, of arrival minus `due_ms(number)`.
    pub fn latency_before(&self, at_ms: u64, window_ms: u64, due_ms: impl Fn(u64) -> u64) -> Option<u64> {
        let s = lock(&self.state);
        let from = at_ms.saturating_sub(window_ms);
        let mut lags: Vec<u64> = s
            .records
            .iter()
            .rev()
            .skip_while(|r| r.at_ms > at_ms)
            .take_while(|r| r.at_ms >= from)
            .map(|r| r.at_ms.saturating_sub(due_ms(r.n)))
            .collect();
        if lags.is_empty() {
            return None;
        }
        lags.sort_unstable();
        Some(lags[lags.len() / 2])
    }

    /// The highest number in the output from each of the given input partitions.
    pub fn newest_of(&self, partitions: &[usize]) -> Vec<Option<u64>> {
        let s = lock(&self.state);
        partitions.iter().map(|p| s.max_by_partition.get(*p).copied().flatten()).collect()
    }

    /// Whether the reader has read every partition up to `ends` (offsets after the last record).
    pub fn reached(&self, ends: &[i64]) -> bool {
        let s = lock(&self.state);
        ends.iter().enumerate().all(|(p, e)| *e == 0 || s.read_ends.get(p).is_some_and(|r| r >= e))
    }

    /// Records read so far and the highest number among them.
    pub fn progress(&self) -> (usize, Option<u64>) {
        let s = lock(&self.state);
        (s.records.len(), s.max_by_partition.iter().flatten().max().copied())
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for OutputReader {
    fn drop(&mut self) {
        self.stop();
    }
}

// ----- tasks on the TaskManagers -----

/// An attempt of a subtask: `(version, attempt)`.
pub type AttemptId = (u32, u32);

/// Two attempts of one subtask alive at once (seen on the TaskManagers' metrics).
#[derive(Debug, Clone)]
pub struct Overlap {
    pub subtask: u32,
    pub old: AttemptId,
    pub old_tm: String,
    pub new: AttemptId,
    pub new_tm: String,
    pub first_ms: u64,
    pub last_ms: u64,
    /// Records the older attempt's sink wrote while the newer one was alive.
    pub old_wrote: u64,
}

#[derive(Default)]
pub struct TaskState {
    /// Per (subtask, attempt): the TaskManager and the sink's records-out counter last seen.
    last: HashMap<(u32, AttemptId), (String, u64)>,
    pub overlaps: Vec<Overlap>,
    /// Poll rounds and failed scrapes.
    pub rounds: u64,
    pub failed_scrapes: u64,
}

impl TaskState {
    /// Records the job's sinks have written (`numRecordsOut`, summed over every attempt seen,
    /// replays included): beside the output reader's count, it tells a job that falls behind
    /// from a reader that does.
    pub fn sink_records_out(&self) -> u64 {
        self.last.values().map(|(_, out)| out).sum()
    }
}

/// Scrapes every TaskManager's metrics endpoint every `every`.
pub struct TaskWatcher {
    pub state: Arc<Mutex<TaskState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// `(subtask, version, attempt, sink records out)` of every task in a metrics page.
pub fn parse_metrics(page: &str, job_id: &str) -> Vec<(u32, AttemptId, u64)> {
    let mut out: BTreeMap<(u32, AttemptId), u64> = BTreeMap::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("keel_num_records_out_total{") else { continue };
        let Some((labels, value)) = rest.rsplit_once('}') else { continue };
        if !labels.contains("sink=\"") {
            continue;
        }
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                kv.strip_prefix(&format!("{name}=\"")).map(|v| v.trim_end_matches('"').to_string())
            })
        };
        let Some(task_id) = label("task_id") else { continue };
        // <job_id>/v<version>/<subtask>#<attempt>
        let Some(rest) = task_id.strip_prefix(&format!("{job_id}/v")) else { continue };
        let Some((version, rest)) = rest.split_once('/') else { continue };
        let Some((subtask, attempt)) = rest.split_once('#') else { continue };
        let (Ok(version), Ok(subtask), Ok(attempt)) = (version.parse(), subtask.parse(), attempt.parse())
        else {
            continue;
        };
        let value = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        *out.entry((subtask, (version, attempt))).or_default() += value;
    }
    out.into_iter().map(|((s, a), v)| (s, a, v)).collect()
}

impl TaskWatcher {
    /// `tms`: each TaskManager's metrics address by name (read again every round: on loopback
    /// a restarted TaskManager serves on a new port).
    pub fn start(
        tms: Arc<Mutex<BTreeMap<String, String>>>,
        job_id: String,
        every: Duration,
        start: Instant,
    ) -> anyhow::Result<TaskWatcher> {
        let state = Arc::new(Mutex::new(TaskState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t_state, t_stop) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("chaos-tasks".into()).spawn(move || {
            while !t_stop.load(Ordering::SeqCst) {
                let now = ms_since(start);
                // (subtask) -> [(attempt, tm, out)]
                let mut live: BTreeMap<u32, Vec<(AttemptId, String, u64)>> = BTreeMap::new();
                let mut failed = 0;
                let current: Vec<(String, String)> =
                    lock(&tms).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                for (tm, address) in &current {
                    match http_get(address, "/metrics", Duration::from_millis(300)) {
                        Ok(page) => {
                            for (subtask, attempt, out) in parse_metrics(&page, &job_id) {
                                live.entry(subtask).or_default().push((attempt, tm.clone(), out));
                            }
                        }
                        Err(_) => failed += 1,
                    }
                }
                let mut s = lock(&t_state);
                s.rounds += 1;
                s.failed_scrapes += failed;
                for (subtask, attempts) in &live {
                    let newest = attempts.iter().map(|a| a.0).max();
                    for (attempt, tm, out) in attempts {
                        let prev = s.last.insert((*subtask, *attempt), (tm.clone(), *out));
                        let Some(newest) = newest else { continue };
                        if *attempt >= newest {
                            continue;
                        }
                        let Some((new_tm, _)) =
                            attempts.iter().find(|a| a.0 == newest).map(|a| (a.1.clone(), a.2))
                        else {
                            continue;
                        };
                        let grew = prev.map_or(0, |(_, before)| out.saturating_sub(before));
                        match s
                            .overlaps
                            .iter_mut()
                            .find(|o| o.subtask == *subtask && o.old == *attempt && o.new == newest)
                        {
                            Some(o) => {
                                o.last_ms = now;
                                o.old_wrote += grew;
                            }
                            None => s.overlaps.push(Overlap {
                                subtask: *subtask,
                                old: *attempt,
                                old_tm: tm.clone(),
                                new: newest,
                                new_tm,
                                first_ms: now,
                                last_ms: now,
                                old_wrote: 0,
                            }),
                        }
                    }
                }
                drop(s);
                std::thread::sleep(every);
            }
        })?;
        Ok(TaskWatcher { state, stop, thread: Some(thread) })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TaskWatcher {
    fn drop(&mut self) {
        self.stop();
    }
}

// ----- etcd -----

/// A completed checkpoint (a pointer move seen on the HA store).
#[derive(Debug, Clone)]
pub struct Completed {
    pub checkpoint_id: u64,
    pub epoch: u64,
    pub attempt: u64,
    /// etcd's revision of the move; on raft the number of the sampling round that saw it.
    pub revision: u64,
    /// Arrival of the watch event, ms since the run started.
    pub seen_ms: u64,
    /// When the JobManager triggered it (ms since the Unix epoch, the pointer's
    /// `trigger_time_ms`; every process runs on this machine's clock).
    pub trigger_wall_ms: u64,
    /// Source positions (next offset) by input partition, from the metadata file.
    pub positions: BTreeMap<i32, i64>,
}

/// A leader key change.
#[derive(Debug, Clone)]
pub struct LeaderChange {
    pub role: String,
    /// `None`: the key was deleted (no leader).
    pub epoch: Option<u64>,
    pub address: String,
    /// etcd's revision; on raft the sampling round.
    pub revision: u64,
    pub seen_ms: u64,
}

#[derive(Default)]
pub struct HaState {
    pub leaders: Vec<LeaderChange>,
    pub completed: Vec<Completed>,
    /// Violations of fencing seen on the HA store.
    pub violations: Vec<String>,
    pub notes: Vec<String>,
    pub last_revision: u64,
    pub watch_restarts: u64,
    /// Metadata files that could not be read (deleted by retention before the read).
    pub unread_metadata: u64,
    /// Raft: sampling rounds, rounds whose reads failed (no Raft leader answered), and when
    /// the first and the last round ended (ms since the run started).
    pub rounds: u64,
    pub failed_rounds: u64,
    pub rounds_ms: (u64, u64),
}

impl HaState {
    /// Records a move of job `job`'s checkpoint pointer to `p` (the pointer's JSON): the id must
    /// grow; the source positions are read from the checkpoint's metadata file.
    fn pointer_moved(
        &mut self,
        last_checkpoint: &mut HashMap<String, u64>,
        job: &str,
        p: &serde_json::Value,
        revision: u64,
        seen_ms: u64,
        input_topic: &str,
    ) {
        let id = p["checkpoint_id"].as_u64().unwrap_or(0);
        let epoch = p["epoch"].as_u64().unwrap_or(0);
        if let Some(prev) = last_checkpoint.insert(job.to_string(), id) {
            if id < prev {
                self.violations.push(format!(
                    "checkpoint pointer of job {job} went back from checkpoint {prev} to {id} (revision {revision})"
                ));
            } else if id == prev {
                self.notes.push(format!(
                    "checkpoint pointer of job {job} written twice with checkpoint {id} (again at \
                     revision {revision}, epoch {epoch}): a write applied and then sent again"
                ));
            }
        }
        let mut positions = BTreeMap::new();
        let path = p["metadata_path"].as_str().map(PathBuf::from);
        match path.and_then(|path| std::fs::read(path).ok()) {
            Some(bytes) => {
                let meta: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                collect_positions(&meta["subtasks"], input_topic, &mut positions);
            }
            None => self.unread_metadata += 1,
        }
        self.completed.push(Completed {
            checkpoint_id: id,
            epoch,
            attempt: p["attempt"].as_u64().unwrap_or(0),
            trigger_wall_ms: p["trigger_time_ms"].as_u64().unwrap_or(0),
            revision,
            seen_ms,
            positions,
        });
    }
}

/// The fencing check of a sampled pointer move (raft): a fenced write applies only while its
/// epoch leads, and epochs only grow, so a pointer first seen in a round must carry an epoch at
/// least the JobManager leader's read before the previous round's pointer read (`lower`: the
/// move came after that read) and at most the leader's read after this round's pointer read
/// (`upper`). When both reads show one leadership, the pointer's epoch must be exactly it.
pub fn sampled_epoch_violation(epoch: u64, lower: Option<u64>, upper: Option<u64>) -> Option<String> {
    if let Some(l) = lower.filter(|l| epoch < *l) {
        return Some(format!(
            "its epoch {epoch} is older than the jobmanager leadership (epoch {l}) read before the pointer last showed \
             its previous value: a deposed leader's write applied"
        ));
    }
    if let Some(u) = upper.filter(|u| epoch > *u) {
        return Some(format!(
            "its epoch {epoch} is newer than the jobmanager leadership (epoch {u}) read after it: no such leader"
        ));
    }
    None
}

pub struct HaWatcher {
    pub state: Arc<Mutex<HaState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    child: Arc<Mutex<Option<Child>>>,
}

fn b64(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Finds `{"offsets": {topic: {partition: offset}}}` anywhere in a subtask state.
fn collect_positions(v: &serde_json::Value, topic: &str, out: &mut BTreeMap<i32, i64>) {
    match v {
        serde_json::Value::Object(map) => {
            match map.get("offsets") {
                // {"offsets": {topic: {partition: offset}}}
                Some(serde_json::Value::Object(topics)) => {
                    for (p, o) in topics.get(topic).and_then(|t| t.as_object()).into_iter().flatten() {
                        if let (Ok(p), Some(o)) = (p.parse::<i32>(), o.as_i64()) {
                            out.insert(p, o);
                        }
                    }
                }
                // {"offsets": [[topic, partition, offset], ...]} (what task snapshots hold)
                Some(serde_json::Value::Array(triples)) => {
                    for t in triples {
                        if let (Some(name), Some(p), Some(o)) = (t[0].as_str(), t[1].as_i64(), t[2].as_i64())
                        {
                            if name == topic {
                                out.insert(i32::try_from(p).unwrap_or(-1), o);
                            }
                        }
                    }
                }
                _ => {}
            }
            for child in map.values() {
                collect_positions(child, topic, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_positions(i, topic, out)),
        _ => {}
    }
}

impl HaWatcher {
    pub fn start(
        endpoints: String,
        cluster_id: &str,
        input_topic: String,
        start: Instant,
    ) -> anyhow::Result<HaWatcher> {
        let prefix = format!("/keel/{cluster_id}/");
        let state = Arc::new(Mutex::new(HaState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let child: Arc<Mutex<Option<Child>>> = Arc::new(Mutex::new(None));
        let (t_state, t_stop, t_child) = (state.clone(), stop.clone(), child.clone());
        let thread = std::thread::Builder::new().name("chaos-etcd".into()).spawn(move || {
            let mut leader_epoch: HashMap<String, Option<u64>> = HashMap::new();
            let mut last_checkpoint: HashMap<String, u64> = HashMap::new();
            while !t_stop.load(Ordering::SeqCst) {
                let from = lock(&t_state).last_revision + 1;
                let spawned = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args(["--endpoints", &endpoints, "watch", "--prefix", &prefix, "--rev", &from.to_string(), "-w", "json"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn();
                let Ok(mut c) = spawned else {
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                };
                let Some(stdout) = c.stdout.take() else { continue };
                *lock(&t_child) = Some(c);
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                    for e in v["Events"].as_array().into_iter().flatten() {
                        let key = String::from_utf8_lossy(&b64(e["kv"]["key"].as_str().unwrap_or_default())).into_owned();
                        let value = b64(e["kv"]["value"].as_str().unwrap_or_default());
                        let revision = e["kv"]["mod_revision"].as_u64().unwrap_or(0);
                        let deleted = e["type"].as_u64() == Some(1);
                        let seen_ms = ms_since(start);
                        let mut s = lock(&t_state);
                        if revision <= s.last_revision {
                            continue;
                        }
                        s.last_revision = revision;
                        let rel = key.strip_prefix(&prefix).unwrap_or(&key);
                        if let Some(role) = rel.strip_prefix("leader/") {
                            let epoch = (!deleted).then(|| e["kv"]["create_revision"].as_u64().unwrap_or(0));
                            let info: serde_json::Value = serde_json::from_slice(&value).unwrap_or_default();
                            leader_epoch.insert(role.to_string(), epoch);
                            s.leaders.push(LeaderChange {
                                role: role.to_string(),
                                epoch,
                                address: info["address"].as_str().unwrap_or_default().to_string(),
                                revision,
                                seen_ms,
                            });
                        } else if let Some(job) = rel.strip_prefix("meta/checkpoints/") {
                            if deleted {
                                continue;
                            }
                            let Ok(p) = serde_json::from_slice::<serde_json::Value>(&value) else { continue };
                            let id = p["checkpoint_id"].as_u64().unwrap_or(0);
                            let epoch = p["epoch"].as_u64().unwrap_or(0);
                            let current = leader_epoch.get("jobmanager").copied().flatten();
                            if current != Some(epoch) {
                                s.violations.push(format!(
                                    "checkpoint pointer of job {job} moved to checkpoint {id} at revision {revision} with epoch {epoch}, \
                                     but the jobmanager leader's epoch at that revision is {current:?}"
                                ));
                            }
                            s.pointer_moved(&mut last_checkpoint, job, &p, revision, seen_ms, &input_topic);
                        }
                    }
                }
                if let Some(mut c) = lock(&t_child).take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                if !t_stop.load(Ordering::SeqCst) {
                    lock(&t_state).watch_restarts += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })?;
        Ok(HaWatcher { state, stop, thread: Some(thread), child })
    }

    /// The watcher of the raft backend, which has no history to watch: every 50 ms a round of
    /// linearizable reads (read-index at the Raft leader, through [`keel_ha::raft::RaftHaServices`]
    /// at `members`): the JobManager leader, every checkpoint pointer (`checkpoints/`), the
    /// JobManager leader again, and the ResourceManager leader. A leader that differs from the
    /// last one read is a [`LeaderChange`]; a pointer that differs from the last one read is a
    /// move, checked with [`sampled_epoch_violation`] and recorded as on etcd. The history is
    /// sampled, not complete: a leadership or a pointer value that lasted less than a round may
    /// be missed, and `seen_ms` is up to a round late.
    pub fn start_raft(
        members: Vec<String>,
        cluster_id: &str,
        input_topic: String,
        start: Instant,
    ) -> anyhow::Result<HaWatcher> {
        use keel_ha::{HaServices as _, Role};
        let state = Arc::new(Mutex::new(HaState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t_state, t_stop) = (state.clone(), stop.clone());
        let cluster_id = cluster_id.to_string();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name("chaos-raft-ha".into()).spawn(move || {
            rt.block_on(async move {
                let ha = loop {
                    if t_stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let connected = keel_ha::raft::RaftHaServices::connect(
                        &members,
                        &cluster_id,
                        Duration::from_secs(3),
                        Duration::from_secs(5),
                    )
                    .await;
                    match connected {
                        Ok(ha) => break ha,
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                };
                let mut last_leader: HashMap<&'static str, Option<(u64, String)>> = HashMap::new();
                let mut last_pointer: HashMap<String, Vec<u8>> = HashMap::new();
                let mut last_checkpoint: HashMap<String, u64> = HashMap::new();
                // The highest JobManager epoch read before the last successful pointer read.
                let mut lower: Option<u64> = None;
                let mut round = 0u64;
                let note = |s: &mut HaState,
                            last: &mut HashMap<&'static str, Option<(u64, String)>>,
                            role: &'static str,
                            now: Option<(u64, String)>,
                            round: u64,
                            seen_ms: u64| {
                    if last.get(role) == Some(&now) {
                        return;
                    }
                    last.insert(role, now.clone());
                    s.leaders.push(LeaderChange {
                        role: role.to_string(),
                        epoch: now.as_ref().map(|(e, _)| *e),
                        address: now.map(|(_, a)| a).unwrap_or_default(),
                        revision: round,
                        seen_ms,
                    });
                };
                while !t_stop.load(Ordering::SeqCst) {
                    round += 1;
                    let read = async {
                        let before = ha.leader(Role::JobManager).await?;
                        let before_ms = ms_since(start);
                        let pointers = ha.list("checkpoints/").await?;
                        let pointers_ms = ms_since(start);
                        // Both after the pointer read; one does not need the other.
                        let (after, rm) =
                            tokio::join!(ha.leader(Role::JobManager), ha.leader(Role::ResourceManager));
                        let (after, rm) = (after?, rm?);
                        let after_ms = ms_since(start);
                        Ok::<_, keel_proto::KeelError>((before, before_ms, pointers, pointers_ms, after, after_ms, rm))
                    };
                    let Ok((before, before_ms, pointers, pointers_ms, after, after_ms, rm)) = read.await else {
                        {
                            let mut s = lock(&t_state);
                            s.rounds += 1;
                            s.failed_rounds += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let upper = after.as_ref().map(|l| l.epoch);
                    let before_epoch = before.as_ref().map(|l| l.epoch);
                    {
                        let mut s = lock(&t_state);
                        s.rounds += 1;
                        if s.rounds_ms.0 == 0 {
                            s.rounds_ms.0 = after_ms;
                        }
                        s.rounds_ms.1 = after_ms;
                        let info = |l: Option<keel_ha::LeaderInfo>| l.map(|l| (l.epoch, l.address));
                        note(&mut s, &mut last_leader, "jobmanager", info(before), round, before_ms);
                        for (key, value) in pointers {
                            if last_pointer.get(&key) == Some(&value) {
                                continue;
                            }
                            last_pointer.insert(key.clone(), value.clone());
                            let job = key.strip_prefix("checkpoints/").unwrap_or(&key).to_string();
                            let Ok(p) = serde_json::from_slice::<serde_json::Value>(&value) else { continue };
                            let id = p["checkpoint_id"].as_u64().unwrap_or(0);
                            let epoch = p["epoch"].as_u64().unwrap_or(0);
                            if let Some(why) = sampled_epoch_violation(epoch, lower, upper) {
                                s.violations.push(format!(
                                    "checkpoint pointer of job {job} moved to checkpoint {id} (seen in sampling round {round}): {why}"
                                ));
                            }
                            s.pointer_moved(&mut last_checkpoint, &job, &p, round, pointers_ms, &input_topic);
                        }
                        note(&mut s, &mut last_leader, "jobmanager", info(after), round, after_ms);
                        note(&mut s, &mut last_leader, "resourcemanager", info(rm), round, ms_since(start));
                    }
                    lower = lower.max(before_epoch);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        })?;
        Ok(HaWatcher { state, stop, thread: Some(thread), child: Arc::new(Mutex::new(None)) })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(mut c) = lock(&self.child).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HaWatcher {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampled fencing check (raft) flags exactly the pointer moves that no fenced write
    /// could make: an epoch below a leadership read before the previous pointer read (a deposed
    /// leader's write), or above the leadership read after it; within the bounds, and with a
    /// bound unknown (no leader read), it passes.
    #[test]
    fn a_sampled_pointer_move_is_checked_against_the_leaders_read_around_it() {
        assert_eq!(sampled_epoch_violation(7, Some(7), Some(7)), None);
        assert_eq!(sampled_epoch_violation(9, Some(7), Some(12)), None);
        assert_eq!(sampled_epoch_violation(9, None, None), None);
        assert!(sampled_epoch_violation(5, Some(7), Some(7)).is_some_and(|w| w.contains("deposed")));
        assert!(sampled_epoch_violation(8, Some(7), Some(7)).is_some());
        assert!(sampled_epoch_violation(5, Some(7), None).is_some());
        assert!(sampled_epoch_violation(13, None, Some(12)).is_some());
    }

    #[test]
    fn base64_and_metrics_parse() {
        assert_eq!(b64("L2tlZWwvYQ=="), b"/keel/a");
        let page = "# HELP x\nkeel_num_records_out_total{job=\"chaos\",job_id=\"j1\",sink=\"out\",subtask=\"1\",task_id=\"j1/v1/1#3\",version=\"1\"} 42\n\
                    keel_num_records_out_total{job=\"chaos\",job_id=\"j1\",source=\"in\",subtask=\"1\",task_id=\"j1/v1/1#3\",version=\"1\"} 40\n";
        assert_eq!(parse_metrics(page, "j1"), vec![(1, (1, 3), 42)]);
        let state = serde_json::json!([{"state": {"sources": {"in": {"offsets": {"t": {"0": 5, "3": 9}}}}}}]);
        let mut pos = BTreeMap::new();
        collect_positions(&state, "t", &mut pos);
        assert_eq!(pos, BTreeMap::from([(0, 5), (3, 9)]));
        let state =
            serde_json::json!([{"state": {"sources": {"in": {"offsets": [["t", 2, 7], ["u", 1, 3]]}}}}]);
        let mut pos = BTreeMap::new();
        collect_positions(&state, "t", &mut pos);
        assert_eq!(pos, BTreeMap::from([(2, 7)]));
    }
}
