//! The workload `keel-versus` gives every system, and the checker that reads their output.
//!
//! Input record `id` (a number from 0 up, each written once, to partition `id % partitions`) is a
//! person `id,name-<id>,<age>` with `age = id % 100`:
//! - [`JobKind::PassThrough`] reads it as CSV and writes it on unchanged (seed 002 Example 1);
//! - [`JobKind::FilterProjection`] reads it as JSON (`{"id":..,"name":..,"age":..}`), keeps the
//!   adults (`age >= 18`) and writes `{"id":..,"name":..}`.
//!
//! The checker ([`OutputLog`]) reads an output topic on a thread of its own while the systems
//! run, and keeps for every record its id and when the broker appended it. Output topics are
//! created with `message.timestamp.type=LogAppendTime`, so that time is the broker's clock for
//! every system alike (with the default `CreateTime` a record would carry the input's time for
//! Kafka Streams, which forwards it, and the sink's send time for the others); a record without
//! an append time gets the time it was received. [`Tally`] counts lost and duplicated ids
//! against what was produced; [`recovery`] and [`largest_gap`] measure the output around an
//! event.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::now_ms;

/// How long a producer may wait for acknowledgements at its final flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// The two Kafka jobs every system runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// CSV `id,name,age` in, the same out.
    PassThrough,
    /// JSON in, `WHERE age >= 18`, `id, name` out as JSON.
    FilterProjection,
}

impl JobKind {
    pub const ALL: [JobKind; 2] = [JobKind::PassThrough, JobKind::FilterProjection];

    /// Short name used in run names and topic names.
    pub fn key(self) -> &'static str {
        match self {
            JobKind::PassThrough => "pass-through",
            JobKind::FilterProjection => "filter-projection",
        }
    }

    /// Age of person `id`.
    pub fn age(id: u64) -> u64 {
        id % 100
    }

    /// The input value of record `id`.
    pub fn encode(self, id: u64) -> Vec<u8> {
        let age = Self::age(id);
        match self {
            JobKind::PassThrough => format!("{id},name-{id},{age}").into_bytes(),
            JobKind::FilterProjection => {
                format!(r#"{{"id":{id},"name":"name-{id}","age":{age}}}"#).into_bytes()
            }
        }
    }

    /// Whether record `id` belongs in the output.
    pub fn passes(self, id: u64) -> bool {
        match self {
            JobKind::PassThrough => true,
            JobKind::FilterProjection => Self::age(id) >= 18,
        }
    }

    /// How many of the ids `0..produced` belong in the output.
    pub fn expected(self, produced: u64) -> u64 {
        match self {
            JobKind::PassThrough => produced,
            JobKind::FilterProjection => {
                let full = produced / 100 * 82;
                full + (produced / 100 * 100..produced).filter(|id| self.passes(*id)).count() as u64
            }
        }
    }

    /// The id of an output record; an error says what is wrong with the value. The output of
    /// the pass-through job must be the input unchanged, and the filter's must be exactly
    /// `{"id":..,"name":"name-<id>"}` (key order and spacing free).
    pub fn output_id(self, value: &[u8]) -> anyhow::Result<u64> {
        let text = std::str::from_utf8(value).map_err(|_| anyhow!("not UTF-8"))?;
        match self {
            JobKind::PassThrough => {
                let id: u64 = text
                    .split(',')
                    .next()
                    .and_then(|f| f.trim().parse().ok())
                    .ok_or_else(|| anyhow!("no id before the first comma in {text:?}"))?;
                if text.trim_end() != format!("{id},name-{id},{}", Self::age(id)) {
                    bail!("{text:?} is not input record {id}");
                }
                Ok(id)
            }
            JobKind::FilterProjection => {
                let v: serde_json::Value = serde_json::from_str(text).with_context(|| format!("{text:?}"))?;
                let obj = v.as_object().ok_or_else(|| anyhow!("{text:?} is not a JSON object"))?;
                let id =
                    obj.get("id").and_then(|i| i.as_u64()).ok_or_else(|| anyhow!("{text:?} has no id"))?;
                let name = obj.get("name").and_then(|n| n.as_str()).unwrap_or_default();
                if obj.len() != 2 || name != format!("name-{id}") {
                    bail!("{text:?} is not the projection (id, name) of record {id}");
                }
                Ok(id)
            }
        }
    }
}

/// An idempotent acks=all producer (an id is in the input once, whatever the broker does).
fn producer(bootstrap: &str) -> anyhow::Result<BaseProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("log_level", "3")
        .create()
        .with_context(|| format!("a producer for {bootstrap}"))
}

/// Sends one record, waiting while the producer's queue is full.
fn send(producer: &BaseProducer, topic: &str, partitions: u64, kind: JobKind, id: u64) -> anyhow::Result<()> {
    let value = kind.encode(id);
    let partition = i32::try_from(id % partitions.max(1))?;
    let mut record = BaseRecord::<[u8], [u8]>::to(topic).partition(partition).payload(value.as_slice());
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((e, r)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                producer.poll(Duration::from_millis(10));
                record = r;
            }
            Err((e, _)) => bail!("producing record {id} to {topic}: {e}"),
        }
    }
}

fn flush(producer: &BaseProducer, topic: &str) -> anyhow::Result<()> {
    producer.flush(FLUSH_TIMEOUT).with_context(|| format!("flushing the input to {topic}"))
}

/// Writes the ids `from..to` to `topic` as fast as the broker takes them.
pub fn preload(
    bootstrap: &str,
    topic: &str,
    partitions: u64,
    kind: JobKind,
    from: u64,
    to: u64,
) -> anyhow::Result<()> {
    let producer = producer(bootstrap)?;
    for id in from..to {
        send(&producer, topic, partitions, kind, id)?;
        producer.poll(Duration::ZERO);
    }
    flush(&producer, topic)
}

/// A producer thread writing ids from 0 up at a steady rate until stopped.
pub struct SteadyLoad {
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl SteadyLoad {
    /// Starts writing `rate` records per second to `topic` (in 10 ms steps).
    pub fn start(
        bootstrap: &str,
        topic: &str,
        partitions: u64,
        kind: JobKind,
        rate: u64,
    ) -> anyhow::Result<SteadyLoad> {
        let producer = producer(bootstrap)?;
        let next = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s, topic) = (next.clone(), stop.clone(), topic.to_string());
        let handle = std::thread::spawn(move || -> anyhow::Result<()> {
            let started = Instant::now();
            while !s.load(Ordering::SeqCst) {
                let due = u64::try_from(started.elapsed().as_millis())? * rate / 1000;
                let mut id = n.load(Ordering::SeqCst);
                while id < due {
                    send(&producer, &topic, partitions, kind, id)?;
                    id += 1;
                    n.store(id, Ordering::SeqCst);
                }
                producer.poll(Duration::from_millis(10));
            }
            flush(&producer, &topic)
        });
        Ok(SteadyLoad { next, stop, handle: Some(handle) })
    }

    /// The next id to be written: every id below it has been handed to the producer.
    pub fn next_id(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// Stops writing; returns how many ids were written (all acknowledged).
    pub fn stop(mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.handle.take().ok_or_else(|| anyhow!("the load was stopped already"))?;
        handle.join().map_err(|_| anyhow!("the load thread panicked"))??;
        Ok(self.next_id())
    }
}

impl Drop for SteadyLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One output record as the checker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub id: u64,
    /// When the broker appended it (ms since the epoch); when it was received if the topic does
    /// not use append times.
    pub at_ms: i64,
}

#[derive(Default)]
struct LogState {
    seen: Vec<Seen>,
    /// Values that are not output of the job, with where they were (at most 10 kept).
    bad: Vec<String>,
    bad_count: u64,
    /// Records without a broker append time (the topic was not created for the checker).
    not_append_time: u64,
}

/// A thread reading an output topic from the beginning, as it is written.
pub struct OutputLog {
    state: Arc<Mutex<LogState>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    topic: String,
}

impl OutputLog {
    /// Starts reading `topic` (`read_committed` when `committed`, else every record written,
    /// aborted transactions included), decoding records as `kind`'s output.
    pub fn start(bootstrap: &str, topic: &str, kind: JobKind, committed: bool) -> anyhow::Result<OutputLog> {
        let isolation = if committed { "read_committed" } else { "read_uncommitted" };
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("versus-check-{topic}-{}-{isolation}", now_ms()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", isolation)
            // Receive times are what the recovery figures are made of: do not let the broker
            // hold a fetch for long.
            .set("fetch.wait.max.ms", "10")
            .set("topic.metadata.refresh.interval.ms", "1000")
            .set("log_level", "3")
            .create()
            .with_context(|| format!("a reader of {topic}"))?;
        consumer.subscribe(&[topic]).with_context(|| format!("subscribing to {topic}"))?;
        let state = Arc::new(Mutex::new(LogState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, name) = (state.clone(), stop.clone(), topic.to_string());
        let handle = std::thread::spawn(move || -> anyhow::Result<()> {
            while !sp.load(Ordering::SeqCst) {
                let Some(msg) = consumer.poll(Duration::from_millis(50)) else { continue };
                let at_ms = now_ms();
                let mut s = st.lock().map_err(|_| anyhow!("checker state poisoned"))?;
                match msg {
                    Err(e) => {
                        s.bad_count += 1;
                        if s.bad.len() < 10 {
                            s.bad.push(format!("consumer error on {name}: {e}"));
                        }
                    }
                    Ok(m) => {
                        let at_ms = match m.timestamp() {
                            rdkafka::Timestamp::LogAppendTime(t) => t,
                            _ => {
                                s.not_append_time += 1;
                                at_ms
                            }
                        };
                        match kind.output_id(m.payload().unwrap_or_default()) {
                            Ok(id) => s.seen.push(Seen { id, at_ms }),
                            Err(e) => {
                                s.bad_count += 1;
                                if s.bad.len() < 10 {
                                    s.bad.push(format!(
                                        "{name} partition {} offset {}: {e:#}",
                                        m.partition(),
                                        m.offset()
                                    ));
                                }
                            }
                        }
                    }
                }
            }
            Ok(())
        });
        Ok(OutputLog { state, stop, handle: Some(handle), topic: topic.to_string() })
    }

    /// Records received so far.
    pub fn count(&self) -> usize {
        self.state.lock().map(|s| s.seen.len()).unwrap_or_default()
    }

    /// A copy of what was received so far.
    pub fn snapshot(&self) -> Vec<Seen> {
        self.state.lock().map(|s| s.seen.clone()).unwrap_or_default()
    }

    /// Waits until the output holds `distinct` different ids and nothing new came for `quiet`
    /// (or fails after `timeout`, saying how far it got).
    pub fn wait_distinct(&self, distinct: u64, quiet: Duration, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = (usize::MAX, Instant::now());
        loop {
            let seen = self.snapshot();
            if seen.len() != last.0 {
                last = (seen.len(), Instant::now());
            }
            let have = distinct_ids(&seen);
            if have >= distinct && last.1.elapsed() >= quiet {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: {have} of {distinct} expected records arrived within {timeout:?}", self.topic);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops reading; returns everything received and the values that were not output of the
    /// job (with their count).
    pub fn finish(mut self) -> anyhow::Result<(Vec<Seen>, Vec<String>, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().map_err(|_| anyhow!("the checker thread panicked"))??;
        }
        let mut s = self.state.lock().map_err(|_| anyhow!("checker state poisoned"))?;
        if s.not_append_time > 0 {
            let n = s.not_append_time;
            s.bad.push(format!("{n} records of {} carry no append time (timed on receipt)", self.topic));
        }
        Ok((std::mem::take(&mut s.seen), std::mem::take(&mut s.bad), s.bad_count))
    }
}

impl Drop for OutputLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// How many different ids `seen` holds.
pub fn distinct_ids(seen: &[Seen]) -> u64 {
    let mut ids: Vec<u64> = seen.iter().map(|s| s.id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len() as u64
}

/// The output of a run, counted against its input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Records that belong in the output (of the ids produced).
    pub expected: u64,
    /// Records read.
    pub count: u64,
    /// Expected ids never read.
    pub lost: u64,
    /// Reads of an id beyond its first.
    pub duplicated: u64,
    /// Ids read that do not belong in the output (filtered out, or never produced).
    pub unexpected: u64,
}

impl Tally {
    /// Counts `seen` against the ids `0..produced` of `kind`.
    pub fn of(kind: JobKind, produced: u64, seen: &[Seen]) -> Tally {
        let mut ids: Vec<u64> = seen.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        let count = ids.len() as u64;
        ids.dedup();
        let (valid, unexpected): (Vec<u64>, Vec<u64>) =
            ids.iter().partition(|id| **id < produced && kind.passes(**id));
        let expected = kind.expected(produced);
        Tally {
            expected,
            count,
            lost: expected - valid.len() as u64,
            duplicated: count - ids.len() as u64,
            unexpected: unexpected.len() as u64,
        }
    }
}

/// How long after `at_ms` the output flowed again on every input partition: for each partition
/// `p` (of `partitions`), the first record received after `at_ms` whose id was produced after
/// the event (`id >= next_id`, so it went through a live pipeline) and belongs to `p`
/// (`id % partitions == p`); the latest of those, minus `at_ms`. `None` if some partition
/// never flowed again.
pub fn recovery(seen: &[Seen], at_ms: i64, next_id: u64, partitions: u64) -> Option<Duration> {
    let mut first = vec![None::<i64>; usize::try_from(partitions.max(1)).ok()?];
    for s in seen.iter().filter(|s| s.at_ms >= at_ms && s.id >= next_id) {
        let slot = first.get_mut(usize::try_from(s.id % partitions.max(1)).ok()?)?;
        if slot.is_none_or(|t| s.at_ms < t) {
            *slot = Some(s.at_ms);
        }
    }
    let latest = first.into_iter().collect::<Option<Vec<i64>>>()?.into_iter().max()?;
    Some(Duration::from_millis(u64::try_from(latest - at_ms).ok()?))
}

/// The largest gap between consecutive receive times within `[from_ms, to_ms]`.
pub fn largest_gap(seen: &[Seen], from_ms: i64, to_ms: i64) -> Duration {
    let mut times: Vec<i64> =
        seen.iter().map(|s| s.at_ms).filter(|t| (from_ms..=to_ms).contains(t)).collect();
    times.sort_unstable();
    let gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    Duration::from_millis(u64::try_from(gap).unwrap_or_default())
}

/// When the output last resumed after a pause longer than `min_gap` within `[from_ms, to_ms]`
/// (the end of the last such gap between consecutive records, `from_ms` counting as a record),
/// or `None` when it never paused that long. For an event whose effect on the output may come
/// late (a Flink JobManager's death stops the output only when the job restarts, tens of seconds
/// later), this is when the output was flowing again for good.
pub fn last_resume_after_pause(seen: &[Seen], from_ms: i64, to_ms: i64, min_gap: Duration) -> Option<i64> {
    let min = i64::try_from(min_gap.as_millis()).ok()?;
    let mut times: Vec<i64> =
        seen.iter().map(|s| s.at_ms).filter(|t| (from_ms..=to_ms).contains(t)).collect();
    times.push(from_ms);
    times.sort_unstable();
    times.windows(2).filter(|w| w[1] - w[0] > min).map(|w| w[1]).next_back()
}

/// Reads beyond the first of an id whose repeat was received within `[from_ms, to_ms)`: the
/// records the system wrote twice because of what happened in that window.
pub fn replayed(seen: &[Seen], from_ms: i64, to_ms: i64) -> u64 {
    let mut sorted: Vec<&Seen> = seen.iter().collect();
    sorted.sort_by_key(|s| (s.id, s.at_ms));
    sorted.windows(2).filter(|w| w[0].id == w[1].id && (from_ms..to_ms).contains(&w[1].at_ms)).count() as u64
}

/// Output records per second over time: `(second since start_ms, records received in it)`.
pub fn per_second(seen: &[Seen], start_ms: i64) -> Vec<(i64, u64)> {
    let mut counts = std::collections::BTreeMap::<i64, u64>::new();
    for s in seen {
        *counts.entry((s.at_ms - start_ms).div_euclid(1000)).or_default() += 1;
    }
    let Some(&last) = counts.keys().next_back() else { return Vec::new() };
    (0..=last).map(|sec| (sec, counts.get(&sec).copied().unwrap_or_default())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: u64, at_ms: i64) -> Seen {
        Seen { id, at_ms }
    }

    #[test]
    fn encoding_round_trips_and_the_filter_keeps_adults() -> anyhow::Result<()> {
        for id in [0, 17, 18, 99, 100, 123_456_789] {
            assert_eq!(JobKind::PassThrough.output_id(&JobKind::PassThrough.encode(id))?, id);
        }
        assert_eq!(JobKind::FilterProjection.output_id(br#"{"name":"name-42","id":42}"#)?, 42);
        assert_eq!(JobKind::FilterProjection.output_id(br#"{"id": 42, "name": "name-42"}"#)?, 42);
        assert!(!JobKind::FilterProjection.passes(17) && JobKind::FilterProjection.passes(18));
        assert!(JobKind::FilterProjection.passes(99) && !JobKind::FilterProjection.passes(100));
        Ok(())
    }

    /// The error text of a value the job could not have written.
    fn refusal(kind: JobKind, value: &[u8]) -> String {
        match kind.output_id(value) {
            Ok(id) => panic!("{value:?} was taken for record {id}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn output_that_is_not_the_jobs_is_refused_with_the_value() {
        let e = refusal(JobKind::PassThrough, b"7,name-8,7");
        assert!(e.contains("not input record 7"), "{e}");
        assert!(JobKind::PassThrough.output_id(b"x,y").is_err());
        assert!(JobKind::PassThrough.output_id(&[0xff, 0xfe]).is_err());
        // The unfiltered input is not the projection.
        let e = refusal(JobKind::FilterProjection, &JobKind::FilterProjection.encode(20));
        assert!(e.contains("not the projection"), "{e}");
        assert!(JobKind::FilterProjection.output_id(b"{\"id\":1").is_err());
    }

    #[test]
    fn expected_counts_the_ids_that_pass() {
        for n in [0, 1, 18, 19, 100, 117, 118, 1000, 1234] {
            let brute = (0..n).filter(|id| JobKind::FilterProjection.passes(*id)).count() as u64;
            assert_eq!(JobKind::FilterProjection.expected(n), brute, "n = {n}");
            assert_eq!(JobKind::PassThrough.expected(n), n);
        }
    }

    #[test]
    fn tally_counts_lost_duplicated_and_unexpected() {
        let out = [seen(0, 1), seen(1, 2), seen(1, 3), seen(3, 4), seen(9, 5)];
        let t = Tally::of(JobKind::PassThrough, 4, &out);
        assert_eq!(t, Tally { expected: 4, count: 5, lost: 1, duplicated: 1, unexpected: 1 });
        // Filtered ids are not lost, and an output id the filter drops is unexpected.
        let out = [seen(18, 1), seen(19, 2), seen(5, 3)];
        let t = Tally::of(JobKind::FilterProjection, 20, &out);
        assert_eq!(t, Tally { expected: 2, count: 3, lost: 0, duplicated: 0, unexpected: 1 });
    }

    #[test]
    fn recovery_waits_for_fresh_records_on_every_partition() {
        // Event at 1000, ids >= 10 produced after it. Partition 0 flows at 1100 (id 10),
        // partition 1 only at 1500 (id 13); old ids and records before the event do not count.
        let out =
            [seen(11, 900), seen(3, 1050), seen(10, 1100), seen(12, 1200), seen(13, 1500), seen(15, 1600)];
        assert_eq!(recovery(&out, 1000, 10, 2), Some(Duration::from_millis(500)));
        assert_eq!(recovery(&out, 1000, 10, 1), Some(Duration::from_millis(100)));
        assert_eq!(recovery(&out[..4], 1000, 10, 2), None);
    }

    #[test]
    fn gaps_replays_and_rates() {
        let out = [seen(1, 1000), seen(2, 1100), seen(3, 2600), seen(2, 2700), seen(4, 2800)];
        assert_eq!(largest_gap(&out, 0, 5000), Duration::from_millis(1500));
        assert_eq!(largest_gap(&out, 2600, 5000), Duration::from_millis(100));
        assert_eq!(replayed(&out, 2000, 3000), 1);
        assert_eq!(replayed(&out, 0, 2000), 0);
        assert_eq!(per_second(&out, 1000), vec![(0, 2), (1, 3)]);
        let pause = Duration::from_millis(1000);
        assert_eq!(last_resume_after_pause(&out, 0, 5000, pause), Some(2600));
        assert_eq!(last_resume_after_pause(&out, 1050, 5000, pause), Some(2600));
        assert_eq!(last_resume_after_pause(&out, 2600, 5000, pause), None);
        // The event itself counts: nothing for 1.5 s after it is a pause.
        assert_eq!(last_resume_after_pause(&out, -500, 1100, pause), Some(1000));
    }
}
