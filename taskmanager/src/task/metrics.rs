//! The metrics of one task, registered in the TaskManager's [`Registry`] (served on
//! `GET /metrics`) and summed up for the JobManager's task reports.
//!
//! Every series of a task carries the labels `job_id`, `job` (the job's name), `version`,
//! `subtask` and `task_id`, plus `source` or `sink` (the operator's name in the spec), plus
//! `topic` and `partition` for the per-partition gauges of a Kafka source. They exist from the
//! moment the task starts until it ends ([`TaskMetrics::close`]).
//!
//! | operator | metrics |
//! | --- | --- |
//! | every source | `numRecordsIn`, `numRecordsInPerSecond` |
//! | Kafka source | also `numBytesIn`, `numBytesInPerSecond`, `numRecordsInErrors`, `sourceIdleTime`, `commitsSucceeded`, `commitsFailed`, and once the client knows them `pendingRecords`, `currentFetchEventTimeLag`, `currentEmitEventTimeLag`; per partition `currentOffset` and `committedOffset` (-1 until known, as in Flink) |
//! | every sink | `numRecordsOut`, `numRecordsOutPerSecond`, `numBytesOut`, `numBytesOutPerSecond` |
//! | Kafka sink | also `currentSendTime` once a record was acknowledged |
//!
//! Counts are taken where records flow: the source driver counts what each source hands
//! downstream (rows after decoding; records skipped as malformed go to `numRecordsInErrors`),
//! the sink thread counts what each sink writes (bytes: encoded keys and values). The Kafka
//! connector keeps its own gauges in atomics ([`KafkaSourceMetrics`], [`KafkaSinkMetrics`]);
//! a ticker per task (`tick_until` of the task module, every [`TICK`]) copies their snapshots into the registry
//! and hands the task a [`Throughput`] summary for its reports.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keel_kafka::{
    spread_warning, KafkaSinkMetrics, KafkaSourceMetrics, SourceMetricsSnapshot, TopicPartition,
};
use keel_metrics::registry::DEFAULT_METER_WINDOW;
use keel_metrics::{names, Counter, ElapsedGauge, Gauge, Meter, MetricGroup, PartitionMetrics, Registry};
use keel_proto::pb::SourcePartitions;

use super::info::TaskInfo;

/// How often the ticker copies the Kafka connector's metrics and refreshes the task's
/// [`Throughput`].
pub const TICK: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The partition count of each topic a Kafka reader reads whole; its reader thread keeps it
/// current ([`keel_kafka::KafkaSourceReader::topic_sizes`]).
pub type TopicSizes = Arc<Mutex<BTreeMap<String, usize>>>;

/// What the metrics of a Kafka source read from its reader thread.
#[derive(Debug, Clone)]
pub struct KafkaSourceProbe {
    pub metrics: Arc<KafkaSourceMetrics>,
    pub topic_sizes: TopicSizes,
}

impl KafkaSourceProbe {
    pub fn new() -> KafkaSourceProbe {
        KafkaSourceProbe { metrics: KafkaSourceMetrics::new(), topic_sizes: TopicSizes::default() }
    }
}

impl Default for KafkaSourceProbe {
    fn default() -> Self {
        KafkaSourceProbe::new()
    }
}

/// A task's throughput as reported to the JobManager: rates over the last minute, and the
/// Kafka sources' backlog, lag and partitions. All zero / empty when the task is not running.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Throughput {
    pub records_in_per_second: f64,
    pub records_out_per_second: f64,
    pub bytes_in_per_second: f64,
    pub bytes_out_per_second: f64,
    /// `pendingRecords` of the Kafka sources, summed; `None` while none knows it.
    pub pending_records: Option<i64>,
    /// The largest `currentEmitEventTimeLag` of the Kafka sources (ms); `None` while unknown.
    pub emit_lag_ms: Option<i64>,
    /// The topics of the Kafka sources with their partition counts and spread warnings.
    pub sources: Vec<SourcePartitions>,
}

/// The metrics of one source of the task.
pub struct SourceMeters {
    pub name: String,
    num_records_in: Counter,
    num_records_in_per_second: Meter,
    kafka: Option<KafkaSourceMeters>,
    /// The registration: `None` once closed.
    reg: Mutex<Option<SourceRegistration>>,
}

struct KafkaSourceMeters {
    num_bytes_in: Counter,
    num_bytes_in_per_second: Meter,
    num_records_in_errors: Counter,
    source_idle_time: ElapsedGauge,
    commits_succeeded: Counter,
    commits_failed: Counter,
    probe: KafkaSourceProbe,
}

struct SourceRegistration {
    group: MetricGroup,
    /// Gauges registered once the Kafka client knows their value.
    pending_records: Option<Gauge>,
    fetch_lag: Option<Gauge>,
    emit_lag: Option<Gauge>,
    partitions: BTreeMap<TopicPartition, PartitionMetrics>,
    /// The connector's commit counts already added to the counters.
    commits_seen: (u64, u64),
}

impl SourceMeters {
    fn register(group: MetricGroup, name: &str, kafka: bool) -> SourceMeters {
        let num_records_in = group.counter(names::NUM_RECORDS_IN);
        let num_records_in_per_second = group.meter(names::NUM_RECORDS_IN_PER_SECOND, &num_records_in);
        let kafka = kafka.then(|| {
            let num_bytes_in = group.counter(names::NUM_BYTES_IN);
            KafkaSourceMeters {
                num_bytes_in_per_second: group.meter(names::NUM_BYTES_IN_PER_SECOND, &num_bytes_in),
                num_bytes_in,
                num_records_in_errors: group.counter(names::NUM_RECORDS_IN_ERRORS),
                source_idle_time: group.elapsed(names::SOURCE_IDLE_TIME),
                commits_succeeded: group.counter(names::COMMITS_SUCCEEDED),
                commits_failed: group.counter(names::COMMITS_FAILED),
                probe: KafkaSourceProbe::new(),
            }
        });
        SourceMeters {
            name: name.to_string(),
            num_records_in,
            num_records_in_per_second,
            kafka,
            reg: Mutex::new(Some(SourceRegistration {
                group,
                pending_records: None,
                fetch_lag: None,
                emit_lag: None,
                partitions: BTreeMap::new(),
                commits_seen: (0, 0),
            })),
        }
    }

    /// Counts `records` rows handed downstream, `bytes` of message keys and values read for
    /// them, and `malformed` records skipped (Kafka sources).
    pub fn record_in(&self, records: u64, bytes: u64, malformed: u64) {
        self.num_records_in.add(records);
        if let Some(k) = &self.kafka {
            k.num_bytes_in.add(bytes);
            k.num_records_in_errors.add(malformed);
            if records + malformed > 0 {
                k.source_idle_time.mark();
            }
        }
    }

    /// The probe a Kafka source's reader thread feeds; `None` for other sources.
    pub fn kafka_probe(&self) -> Option<&KafkaSourceProbe> {
        self.kafka.as_ref().map(|k| &k.probe)
    }

    pub fn num_records_in(&self) -> u64 {
        self.num_records_in.get()
    }

    /// Copies the connector's snapshot into the registry and adds this source to `out`.
    fn tick(&self, parallelism: u32, out: &mut Throughput) {
        out.records_in_per_second += self.num_records_in_per_second.rate();
        let Some(k) = &self.kafka else { return };
        out.bytes_in_per_second += k.num_bytes_in_per_second.rate();
        let snap = k.probe.metrics.snapshot();
        if let Some(p) = snap.pending_records {
            out.pending_records = Some(out.pending_records.unwrap_or(0).saturating_add(p));
        }
        if let Some(lag) = snap.current_emit_event_time_lag {
            out.emit_lag_ms = Some(out.emit_lag_ms.map_or(lag, |l| l.max(lag)));
        }
        let sizes = lock(&k.probe.topic_sizes).clone();
        out.sources.extend(self.partitions_of(&snap, &sizes, parallelism));

        let mut reg = lock(&self.reg);
        let Some(reg) = reg.as_mut() else { return };
        let set = |slot: &mut Option<Gauge>, name: &str, value: Option<i64>| {
            if let Some(v) = value {
                slot.get_or_insert_with(|| reg.group.gauge(name)).set_i64(v);
            }
        };
        set(&mut reg.pending_records, names::PENDING_RECORDS, snap.pending_records);
        set(&mut reg.fetch_lag, names::CURRENT_FETCH_EVENT_TIME_LAG, snap.current_fetch_event_time_lag);
        set(&mut reg.emit_lag, names::CURRENT_EMIT_EVENT_TIME_LAG, snap.current_emit_event_time_lag);
        let (ok, failed) = reg.commits_seen;
        k.commits_succeeded.add(snap.commits_succeeded.saturating_sub(ok));
        k.commits_failed.add(snap.commits_failed.saturating_sub(failed));
        reg.commits_seen = (snap.commits_succeeded.max(ok), snap.commits_failed.max(failed));
        for p in &snap.partitions {
            let tp = TopicPartition::new(p.topic.clone(), p.partition);
            let gauges = match reg.partitions.get(&tp) {
                Some(g) => g,
                None => {
                    let g = PartitionMetrics::register(&reg.group, &p.topic, p.partition);
                    // Flink's value for "no offset yet".
                    g.current_offset.set_i64(-1);
                    g.committed_offset.set_i64(-1);
                    reg.partitions.entry(tp).or_insert(g)
                }
            };
            if let Some(o) = p.current_offset {
                gauges.current_offset.set_i64(o);
            }
            if let Some(o) = p.committed_offset {
                gauges.committed_offset.set_i64(o);
            }
        }
    }

    /// One entry per topic the source reads: the topic's partition count (when read whole),
    /// how many this subtask reads, and the spread warning.
    fn partitions_of(
        &self,
        snap: &SourceMetricsSnapshot,
        sizes: &BTreeMap<String, usize>,
        parallelism: u32,
    ) -> Vec<SourcePartitions> {
        let mut topics: BTreeMap<&str, (usize, u32)> = BTreeMap::new();
        for (topic, n) in sizes {
            topics.entry(topic).or_default().0 = *n;
        }
        for p in &snap.partitions {
            topics.entry(&p.topic).or_default().1 += 1;
        }
        topics
            .into_iter()
            .map(|(topic, (partitions, assigned))| SourcePartitions {
                source: self.name.clone(),
                topic: topic.to_string(),
                partitions: u32::try_from(partitions).unwrap_or(u32::MAX),
                assigned,
                spread_warning: spread_warning(partitions, parallelism)
                    .map(|w| format!("source {}, topic {topic}: {w}", self.name))
                    .unwrap_or_default(),
            })
            .collect()
    }
}

/// The metrics of one sink of the task.
pub struct SinkMeters {
    pub name: String,
    num_records_out: Counter,
    num_records_out_per_second: Meter,
    num_bytes_out: Counter,
    num_bytes_out_per_second: Meter,
    /// A Kafka sink's connector metrics.
    kafka: Option<Arc<KafkaSinkMetrics>>,
    reg: Mutex<Option<SinkRegistration>>,
}

struct SinkRegistration {
    group: MetricGroup,
    current_send_time: Option<Gauge>,
}

impl SinkMeters {
    fn register(group: MetricGroup, name: &str, kafka: bool) -> SinkMeters {
        let num_records_out = group.counter(names::NUM_RECORDS_OUT);
        let num_bytes_out = group.counter(names::NUM_BYTES_OUT);
        SinkMeters {
            name: name.to_string(),
            num_records_out_per_second: group.meter(names::NUM_RECORDS_OUT_PER_SECOND, &num_records_out),
            num_bytes_out_per_second: group.meter(names::NUM_BYTES_OUT_PER_SECOND, &num_bytes_out),
            num_records_out,
            num_bytes_out,
            kafka: kafka.then(KafkaSinkMetrics::new),
            reg: Mutex::new(Some(SinkRegistration { group, current_send_time: None })),
        }
    }

    /// Counts `records` written with `bytes` of keys and values.
    pub fn record_out(&self, records: u64, bytes: u64) {
        self.num_records_out.add(records);
        self.num_bytes_out.add(bytes);
    }

    /// The connector metrics a Kafka sink's writer updates; `None` for other sinks.
    pub fn kafka_metrics(&self) -> Option<&Arc<KafkaSinkMetrics>> {
        self.kafka.as_ref()
    }

    pub fn num_records_out(&self) -> u64 {
        self.num_records_out.get()
    }

    /// This sink's records written per second over the last minute (the task's rate counts a
    /// record written by several sinks once: [`TaskMetrics::tick`]).
    pub fn num_records_out_per_second(&self) -> f64 {
        self.num_records_out_per_second.rate()
    }

    fn tick(&self, out: &mut Throughput) {
        out.bytes_out_per_second += self.num_bytes_out_per_second.rate();
        let Some(kafka) = &self.kafka else { return };
        let Some(us) = kafka.snapshot().current_send_time_us else { return };
        let mut reg = lock(&self.reg);
        if let Some(reg) = reg.as_mut() {
            let gauge =
                reg.current_send_time.get_or_insert_with(|| reg.group.gauge(names::CURRENT_SEND_TIME));
            gauge.set(us as f64 / 1000.0);
        }
    }
}

/// One operator of a task, as its metrics see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// Its name in the spec (the `source` or `sink` label).
    pub name: String,
    /// A Kafka connector: it has the connector's metrics too.
    pub kafka: bool,
}

/// What a task runs, as its metrics see it: its operators in the order of the spec. The chain
/// plan converts into it (`From<&ChainPlan>`), so that this module does not import the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskShape {
    pub parallelism: u32,
    pub sources: Vec<Operator>,
    pub sinks: Vec<Operator>,
}

/// The metrics of one task: its sources' and sinks', in the order of the spec.
pub struct TaskMetrics {
    pub sources: Vec<SourceMeters>,
    pub sinks: Vec<SinkMeters>,
    parallelism: u32,
    /// Records the task wrote, each once however many sinks wrote it (not exported: the
    /// per-sink `numRecordsOut` are), and its rate for the task's reports.
    records_out: Counter,
    records_out_per_second: Meter,
}

impl TaskMetrics {
    /// Registers the metrics of the task `info` that runs `shape` (a chain plan) in `registry`.
    pub fn register(registry: &Registry, info: &TaskInfo, shape: impl Into<TaskShape>) -> TaskMetrics {
        let shape: TaskShape = shape.into();
        let version = info.version.to_string();
        let subtask = info.subtask.to_string();
        let task = registry.group(&[
            ("job_id", &info.job_id),
            ("job", &info.job_name),
            ("version", &version),
            ("subtask", &subtask),
            ("task_id", &info.task_id),
        ]);
        let sources = shape
            .sources
            .iter()
            .map(|s| SourceMeters::register(task.group(&[("source", &s.name)]), &s.name, s.kafka))
            .collect();
        let sinks = shape
            .sinks
            .iter()
            .map(|s| SinkMeters::register(task.group(&[("sink", &s.name)]), &s.name, s.kafka))
            .collect();
        let records_out = Counter::default();
        let records_out_per_second = Meter::new(&records_out, DEFAULT_METER_WINDOW);
        TaskMetrics { sources, sinks, parallelism: shape.parallelism, records_out, records_out_per_second }
    }

    /// Metrics in a registry of their own, which nobody serves (tests, tools).
    pub fn detached(info: &TaskInfo, shape: impl Into<TaskShape>) -> TaskMetrics {
        TaskMetrics::register(&Registry::new(), info, shape)
    }

    pub fn source(&self, index: usize) -> Option<&SourceMeters> {
        self.sources.get(index)
    }

    pub fn sink(&self, index: usize) -> Option<&SinkMeters> {
        self.sinks.get(index)
    }

    /// Counts `records` records written by at least one sink (each once for the task).
    pub fn record_task_out(&self, records: u64) {
        self.records_out.add(records);
    }

    /// Copies the Kafka connector's metrics into the registry and sums the task's throughput
    /// (records out per second: each record once, as the task counts them out).
    pub fn tick(&self) -> Throughput {
        let mut out = Throughput {
            records_out_per_second: self.records_out_per_second.rate(),
            ..Throughput::default()
        };
        for s in &self.sources {
            s.tick(self.parallelism, &mut out);
        }
        for s in &self.sinks {
            s.tick(&mut out);
        }
        out
    }

    /// Unregisters every series of the task. The handles keep counting (a sink thread that
    /// has not noticed the end yet), unseen.
    pub fn close(&self) {
        for s in &self.sources {
            lock(&s.reg).take();
        }
        for s in &self.sinks {
            lock(&s.reg).take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_kafka::PartitionMetricsSnapshot;

    fn snapshot(partitions: &[(&str, i32)]) -> SourceMetricsSnapshot {
        SourceMetricsSnapshot {
            num_records_in: 0,
            num_bytes_in: 0,
            pending_records: None,
            current_fetch_event_time_lag: None,
            current_emit_event_time_lag: None,
            source_idle_time: 0,
            commits_succeeded: 0,
            commits_failed: 0,
            partitions: partitions
                .iter()
                .map(|(t, p)| PartitionMetricsSnapshot {
                    topic: t.to_string(),
                    partition: *p,
                    current_offset: Some(0),
                    committed_offset: None,
                })
                .collect(),
        }
    }

    /// Each topic of a source is reported with its size, this subtask's share and, when the
    /// size does not divide by the parallelism, the spread warning naming the even choices.
    #[test]
    fn topics_are_reported_with_their_spread() {
        let r = Registry::new();
        let source = SourceMeters::register(r.group(&[("source", "in")]), "in", true);
        let sizes = BTreeMap::from([("three".to_string(), 3), ("four".to_string(), 4)]);
        let snap = snapshot(&[("three", 0), ("three", 2), ("four", 1), ("four", 3), ("listed", 5)]);
        let topics = source.partitions_of(&snap, &sizes, 2);
        let summary: Vec<(&str, u32, u32, bool)> = topics
            .iter()
            .map(|t| (t.topic.as_str(), t.partitions, t.assigned, t.spread_warning.is_empty()))
            .collect();
        assert_eq!(summary, vec![("four", 4, 2, true), ("listed", 0, 1, true), ("three", 3, 2, false)]);
        let warning = &topics[2].spread_warning;
        assert!(warning.starts_with("source in, topic three: 3 partitions over parallelism 2"), "{warning}");
        assert!(warning.ends_with("parallelisms that spread 3 partitions evenly: 1, 3"), "{warning}");
    }

    /// A Kafka source registers its counters at once and its client-fed gauges only once the
    /// client knows them; closing removes them all.
    #[test]
    fn kafka_gauges_appear_once_known_and_go_on_close() {
        let r = Registry::new();
        let source = SourceMeters::register(r.group(&[("source", "in")]), "in", true);
        source.record_in(3, 30, 1);
        let mut out = Throughput::default();
        source.tick(2, &mut out);
        let labels = [("source", "in")];
        assert_eq!(r.get(names::NUM_RECORDS_IN, &labels), Some(3.0));
        assert_eq!(r.get(names::NUM_BYTES_IN, &labels), Some(30.0));
        assert_eq!(r.get(names::NUM_RECORDS_IN_ERRORS, &labels), Some(1.0));
        assert_eq!(r.get(names::COMMITS_SUCCEEDED, &labels), Some(0.0));
        assert!(r.get(names::SOURCE_IDLE_TIME, &labels).is_some());
        assert_eq!(r.get(names::PENDING_RECORDS, &labels), None, "unknown until the client's statistics");
        assert_eq!(out.pending_records, None);
        assert!(out.records_in_per_second > 0.0 && out.bytes_in_per_second > 0.0);
        lock(&source.reg).take();
        assert!(r.snapshot().is_empty(), "{:?}", r.snapshot());
    }
}
