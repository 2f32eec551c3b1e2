//! The Kafka side of the benchmark: writing the input (raw, CSV or JSON values, see [`Format`]),
//! the bare rdkafka pass-through loop (run (a)), reading an output topic back to count its
//! records and find their time span, and the paced producer of the latency run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::workload::JobKind;

/// How long a producer may wait for acknowledgements at its final flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);
/// Digits of the sequence number at the start of every input value.
const SEQ_DIGITS: usize = 12;

/// Milliseconds since the epoch (the clock Kafka create timestamps use).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

fn client(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap).set("log_level", "3");
    config
}

/// The value of input record `seq`: the number, zero-padded to 12 digits, then `x` up to
/// `size` bytes (cut to `size` when that is shorter).
pub fn value(seq: u64, size: usize) -> Vec<u8> {
    let mut v = format!("{seq:0SEQ_DIGITS$}").into_bytes();
    v.resize(size, b'x');
    v
}

/// The values of an input topic, and how an output record's id is read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// [`value`]: the sequence number, zero-padded to 12 digits, then `x` up to `--size` bytes.
    Raw,
    /// `{id},name-{id},{age}` with `age = id % 100` (the workload's pass-through input).
    Csv,
    /// `{"id":{id},"name":"name-{id}","age":{age}}`.
    Json,
}

impl Format {
    /// The name in the job spec (`format: ...`) and in topic names.
    pub fn key(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Csv => "csv",
            Format::Json => "json",
        }
    }

    /// The value of input record `seq` (`size` matters for [`Format::Raw`] only).
    pub fn input_value(self, seq: u64, size: usize) -> Vec<u8> {
        match self {
            Format::Raw => value(seq, size),
            Format::Csv => JobKind::PassThrough.encode(seq),
            Format::Json => JobKind::FilterProjection.encode(seq),
        }
    }

    /// The sequence number of an output record, which must be the input record passed through
    /// (for JSON: an object with exactly the fields `id`, `name` and `age` of that record, in any
    /// order and spacing). `Ok(None)` for a raw value too short to carry one.
    pub fn output_id(self, value: &[u8]) -> anyhow::Result<Option<u64>> {
        match self {
            Format::Raw => Ok(value
                .get(..SEQ_DIGITS)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| d.parse::<u64>().ok())),
            Format::Csv => JobKind::PassThrough.output_id(value).map(Some),
            Format::Json => {
                let text = std::str::from_utf8(value).map_err(|_| anyhow!("not UTF-8"))?;
                let v: serde_json::Value =
                    serde_json::from_str(text).with_context(|| format!("{text:?} is not JSON"))?;
                let obj = v.as_object().ok_or_else(|| anyhow!("{text:?} is not a JSON object"))?;
                let id =
                    obj.get("id").and_then(|i| i.as_u64()).ok_or_else(|| anyhow!("{text:?} has no id"))?;
                let name = obj.get("name").and_then(|n| n.as_str());
                let age = obj.get("age").and_then(|a| a.as_u64());
                if obj.len() != 3 || name != Some(&format!("name-{id}")) || age != Some(JobKind::age(id)) {
                    bail!("{text:?} is not input record {id}");
                }
                Ok(Some(id))
            }
        }
    }
}

/// Counts acknowledgements and keeps the first delivery error.
#[derive(Default)]
pub struct Deliveries {
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, m)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| format!("partition {}: {e}", m.partition()));
                }
            }
        }
    }
}

type Prod = BaseProducer<Deliveries>;

/// An acks=all producer; `extra` are further librdkafka properties.
fn producer(bootstrap: &str, extra: &[(&str, &str)]) -> anyhow::Result<Prod> {
    let mut config = client(bootstrap);
    config.set("acks", "all");
    for (k, v) in extra {
        config.set(*k, *v);
    }
    config.create_with_context(Deliveries::default()).context("creating a producer")
}

/// Hands one record to the producer, serving delivery reports while its queue is full.
fn send(producer: &Prod, mut record: BaseRecord<'_, [u8], [u8]>, topic: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + FLUSH_TIMEOUT;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if Instant::now() < deadline =>
            {
                record = back;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(anyhow!("producing to {topic}: {e}")),
        }
    }
}

/// Flushes and fails unless every record was acknowledged; returns the acknowledged count.
fn finish(producer: &Prod, topic: &str) -> anyhow::Result<u64> {
    producer.flush(FLUSH_TIMEOUT).with_context(|| format!("flushing to {topic}"))?;
    let d = producer.context();
    let failed = d.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = d.first_error.lock().ok().and_then(|e| e.clone()).unwrap_or_default();
        bail!("{failed} records to {topic} were not delivered; first error: {first}");
    }
    Ok(d.acked.load(Ordering::Relaxed))
}

/// Writes `records` values of `format` (raw: of `size` bytes) to `topic`, record `i` to
/// partition `i % partitions`.
pub fn produce_input(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    records: u64,
    format: Format,
    size: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let producer = producer(bootstrap, &[("linger.ms", "5")])?;
    for seq in 0..records {
        let v = format.input_value(seq, size);
        let partition = i32::try_from(seq % u64::try_from(partitions.max(1))?)?;
        send(&producer, BaseRecord::to(topic).payload(v.as_slice()).partition(partition), topic)?;
        producer.poll(Duration::ZERO);
    }
    let acked = finish(&producer, topic)?;
    if acked != records {
        bail!("{acked} of {records} input records acknowledged");
    }
    Ok(started.elapsed())
}

fn partition_count(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<i32> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let n = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if n == 0 {
        bail!("topic {topic} does not exist");
    }
    Ok(i32::try_from(n)?)
}

/// A consumer that reads `partitions` of `topic` (all when `None`) from the beginning
/// (assigned, no group rebalance, nothing committed), `read_committed`: records of open or
/// aborted transactions are not seen.
fn reader(
    bootstrap: &str,
    topic: &str,
    group: &str,
    partitions: Option<&[i32]>,
) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating a consumer")?;
    let all: Vec<i32> = (0..partition_count(&consumer, topic)?).collect();
    let mut tpl = TopicPartitionList::new();
    for p in partitions.unwrap_or(&all) {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// What the bare loop did.
pub struct BareRun {
    /// Wall clock (ms since the epoch) when the loop started.
    pub started_ms: i64,
}

/// Run (a): `threads` threads, thread `i` reading the input partitions `p` with
/// `p % threads == i` (one thread: all of them). Each consumes its partitions from the earliest
/// offset and produces every record to `output` (acks=all, the Keel sink's partitioner) until
/// it passed all its records (input partition `p` holds the sequence numbers `s` with
/// `s % partitions == p`); then it flushes and checks that every one was acknowledged.
#[allow(clippy::too_many_arguments)]
pub fn bare_loop(
    bootstrap: &str,
    input: &str,
    partitions: i32,
    output: &str,
    group: &str,
    records: u64,
    threads: usize,
    timeout: Duration,
) -> anyhow::Result<BareRun> {
    let started_ms = now_ms();
    let threads = i32::try_from(threads.max(1))?;
    let per_partition = |p: i32| -> u64 {
        let (p, n) = (u64::try_from(p).unwrap_or(0), u64::try_from(partitions).unwrap_or(1));
        if p >= records {
            0
        } else {
            (records - p).div_ceil(n)
        }
    };
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<i32> = (0..partitions).filter(|p| p % threads == t).collect();
                let expect: u64 = mine.iter().map(|p| per_partition(*p)).sum();
                scope.spawn(move || bare_thread(bootstrap, input, &mine, output, group, expect, timeout))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a bare loop thread panicked"))))
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(BareRun { started_ms })
}

fn bare_thread(
    bootstrap: &str,
    input: &str,
    partitions: &[i32],
    output: &str,
    group: &str,
    records: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let consumer = reader(bootstrap, input, group, Some(partitions))?;
    let producer = producer(bootstrap, &[("partitioner", "murmur2_random")])?;
    let mut passed = 0u64;
    while passed < records {
        if Instant::now() > deadline {
            bail!("the bare loop passed {passed} of {records} records within {timeout:?}");
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => eprintln!("bare loop: consumer error (the client retries): {e}"),
            Some(Ok(m)) => {
                let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(output);
                if let Some(k) = m.key() {
                    record = record.key(k);
                }
                if let Some(v) = m.payload() {
                    record = record.payload(v);
                }
                send(&producer, record, output)?;
                producer.poll(Duration::ZERO);
                passed += 1;
            }
        }
    }
    let acked = finish(&producer, output)?;
    if acked != records {
        bail!("{acked} of {records} records to {output} acknowledged");
    }
    Ok(())
}

/// An output topic as read back.
#[derive(Debug, Clone, Default)]
pub struct OutputStats {
    pub count: u64,
    /// Distinct input sequence numbers among them (`None` when values are too short to carry
    /// one).
    pub distinct: Option<u64>,
    /// Smallest and largest record timestamp (ms since the epoch).
    pub first_ts: i64,
    pub last_ts: i64,
    /// Records that are not an input record passed through (the value is wrong), and the
    /// first such, with where it was.
    pub bad: u64,
    pub first_bad: Option<String>,
    /// Records whose timestamp is the broker's append time (`LogAppendTime` topics).
    pub append_time: u64,
    /// Per sequence number `0..expect`, the timestamp of its first sighting (`i64::MIN`:
    /// never seen); empty unless asked for.
    pub times: Vec<i64>,
}

impl OutputStats {
    /// From the first to the last record's timestamp, in seconds.
    pub fn span_secs(&self) -> f64 {
        (self.last_ts - self.first_ts).max(1) as f64 / 1000.0
    }
}

/// Reads `topic` from the beginning until `expect` records arrived and no more came for a
/// second; counts them, the distinct sequence numbers among them (of `0..expect`, values of
/// `format`; for [`Format::Raw`] only when `size` leaves room for one), the values that are
/// not an input record passed through, and their first and last timestamps. With
/// `keep_times`, also each sequence number's first timestamp.
#[allow(clippy::too_many_arguments)]
pub fn read_output(
    bootstrap: &str,
    topic: &str,
    group: &str,
    expect: u64,
    format: Format,
    size: usize,
    keep_times: bool,
    timeout: Duration,
) -> anyhow::Result<OutputStats> {
    const QUIET: Duration = Duration::from_secs(1);
    let consumer = reader(bootstrap, topic, group, None)?;
    let deadline = Instant::now() + timeout;
    let mut seen = vec![0u64; usize::try_from(expect / 64 + 1)?];
    let check_seq = format != Format::Raw || size >= SEQ_DIGITS;
    let mut stats = OutputStats { first_ts: i64::MAX, last_ts: i64::MIN, ..OutputStats::default() };
    if keep_times {
        stats.times = vec![i64::MIN; usize::try_from(expect)?];
    }
    let mut distinct = 0u64;
    let mut last_record = Instant::now();
    loop {
        let now = Instant::now();
        if stats.count >= expect && now.duration_since(last_record) >= QUIET {
            break;
        }
        if now > deadline {
            bail!("read {} of {expect} records from {topic} within {timeout:?}", stats.count);
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => eprintln!("reading {topic}: consumer error (the client retries): {e}"),
            Some(Ok(m)) => {
                last_record = Instant::now();
                stats.count += 1;
                let ts = m
                    .timestamp()
                    .to_millis()
                    .ok_or_else(|| anyhow!("a record of {topic} has no timestamp"))?;
                if matches!(m.timestamp(), rdkafka::Timestamp::LogAppendTime(_)) {
                    stats.append_time += 1;
                }
                stats.first_ts = stats.first_ts.min(ts);
                stats.last_ts = stats.last_ts.max(ts);
                if !check_seq {
                    continue;
                }
                let seq = match format.output_id(m.payload().unwrap_or_default()) {
                    Ok(Some(seq)) if seq < expect => seq,
                    Ok(other) => {
                        stats.bad += 1;
                        stats.first_bad.get_or_insert_with(|| {
                            format!(
                                "partition {} offset {}: sequence number {other:?} is not below {expect}",
                                m.partition(),
                                m.offset()
                            )
                        });
                        continue;
                    }
                    Err(e) => {
                        stats.bad += 1;
                        stats.first_bad.get_or_insert_with(|| {
                            format!("partition {} offset {}: {e:#}", m.partition(), m.offset())
                        });
                        continue;
                    }
                };
                let (word, bit) = (usize::try_from(seq / 64)?, seq % 64);
                if let Some(w) = seen.get_mut(word) {
                    if *w & (1 << bit) == 0 {
                        *w |= 1 << bit;
                        distinct += 1;
                        if let Some(t) = stats.times.get_mut(usize::try_from(seq)?) {
                            *t = ts;
                        }
                    }
                }
            }
        }
    }
    stats.distinct = check_seq.then_some(distinct);
    Ok(stats)
}

/// Commits offset 0 of `topic`'s partition 0 for a group of its own, retrying until the broker
/// takes it (at most `timeout`); returns how long that took. On a fresh broker the first offset
/// commit waits for the group coordinator (the `__consumer_offsets` topic is created then); a job
/// that commits its source offsets after each checkpoint would otherwise meet that wait inside
/// a measurement.
pub fn warm_group_coordinator(bootstrap: &str, topic: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", format!("keel-bench-warm-{}", now_ms()))
        .set("enable.auto.commit", "false")
        .create()
        .context("creating a consumer")?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(0))?;
    loop {
        match consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync) {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) if started.elapsed() > timeout => {
                bail!("committing an offset of {topic} failed for {timeout:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// What [`produce_paced`] wrote.
pub struct Paced {
    /// Per sequence number, the create timestamp it was produced with (ms since the epoch).
    pub created: Vec<i64>,
    /// Wall clock when the first and the last record were handed to the producer.
    pub started_ms: i64,
    pub ended_ms: i64,
}

/// Writes `records` raw values of `size` bytes to `topic` at `rate` records per second in real
/// time (record `i` is due `i / rate` seconds after the start; the thread sleeps until then),
/// record `i` to partition `i % partitions`, each with an explicit create timestamp: the wall
/// clock when it was handed to the producer. The producer does not linger (`linger.ms=0`),
/// acks=all; every record must be acknowledged.
pub fn produce_paced(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    records: u64,
    size: usize,
    rate: f64,
) -> anyhow::Result<Paced> {
    let producer = producer(bootstrap, &[("linger.ms", "0")])?;
    let mut created = Vec::with_capacity(usize::try_from(records)?);
    let started = Instant::now();
    let started_ms = now_ms();
    for seq in 0..records {
        let due = started + Duration::from_secs_f64(seq as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let v = value(seq, size);
        let partition = i32::try_from(seq % u64::try_from(partitions.max(1))?)?;
        let ts = now_ms();
        send(
            &producer,
            BaseRecord::to(topic).payload(v.as_slice()).partition(partition).timestamp(ts),
            topic,
        )?;
        created.push(ts);
        producer.poll(Duration::ZERO);
    }
    let ended_ms = now_ms();
    let acked = finish(&producer, topic)?;
    if acked != records {
        bail!("{acked} of {records} paced records acknowledged");
    }
    Ok(Paced { created, started_ms, ended_ms })
}

/// Waits until every partition of `topic` has its last stable offset (what `read_committed`
/// readers may read up to) at its high watermark: no transaction is open, everything written
/// is committed (or aborted). Returns the wall clock (ms since the epoch) when that was seen.
pub fn wait_all_committed(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> anyhow::Result<i64> {
    let committed: BaseConsumer = client(bootstrap).set("isolation.level", "read_committed").create()?;
    let uncommitted: BaseConsumer = client(bootstrap).set("isolation.level", "read_uncommitted").create()?;
    let deadline = Instant::now() + timeout;
    loop {
        let mut open = Vec::new();
        for p in 0..partitions {
            let (_, lso) = committed.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            let (_, hw) = uncommitted.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            if lso < hw {
                open.push(format!("{p}: LSO {lso} < HW {hw}"));
            }
        }
        if open.is_empty() {
            return Ok(now_ms());
        }
        if Instant::now() > deadline {
            bail!("{topic} still has open transactions after {timeout:?}: {}", open.join(", "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every format's input value reads back as its own id, and a value that is not an input
    /// record passed through (another record's name or age, a field more or less, not JSON) is
    /// refused rather than counted.
    #[test]
    fn output_ids_are_read_and_wrong_values_refused() -> anyhow::Result<()> {
        for format in [Format::Raw, Format::Csv, Format::Json] {
            for id in [0, 17, 99, 123_456] {
                assert_eq!(format.output_id(&format.input_value(id, 100))?, Some(id), "{format:?} {id}");
            }
        }
        assert_eq!(Format::Raw.output_id(b"short")?, None);
        assert_eq!(Format::Json.output_id(br#"{"age":7,"name":"name-7","id":7}"#)?, Some(7));
        assert!(Format::Csv.output_id(b"7,name-8,7").is_err());
        assert!(Format::Json.output_id(br#"{"id":7,"name":"name-7","age":8}"#).is_err());
        assert!(Format::Json.output_id(br#"{"id":7,"name":"name-7"}"#).is_err());
        assert!(Format::Json.output_id(br#"{"id":7,"name":"name-7","age":7,"x":1}"#).is_err());
        assert!(Format::Json.output_id(b"7,name-7,7").is_err());
        Ok(())
    }
}
