//! Test helpers shared by Keel's test crates.
//!
//! Layout:
//! - [`free_port`], [`wait_until`], [`unique_topic`]: the basics every test needs (no fixed
//!   ports, no sleeps as waits, no shared names).
//! - [`Kafka`] (module `kafka`): real Apache Kafka: one KRaft node shared by the tests of a
//!   test binary ([`Kafka::shared`], or the external cluster `KEEL_TEST_KAFKA_BOOTSTRAP`
//!   names), or a cluster of a test's own, one or three nodes, with kill -9, SIGSTOP/SIGCONT,
//!   stop and start of any node ([`Kafka::single`], [`Kafka::three`]); [`KafkaLayout`] for
//!   runners that start the nodes themselves (the chaos suite, the benchmark).
//! - Kafka helpers on top of rdkafka: [`create_topic`], [`add_partitions`], [`produce`],
//!   [`produce_numbered`], [`consume_all`], [`TopicReader`] (`read_committed`, as every reader
//!   here), [`committed_offsets`], [`watermarks`], [`last_stable_offset`].
//!
//! Everything is synchronous and blocking; call it from a plain `#[test]` or from
//! `spawn_blocking`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

mod kafka;
pub use kafka::{
    group_offsets_by_kafka_admin, java_binary, kafka_libs, new_cluster_id, Kafka, KafkaLayout,
    KafkaNodeAddress, ENV_KAFKA_HEAP, ENV_KAFKA_JVM_OPTS, ENV_KAFKA_LIBS, ENV_KEEP, LIGHT_JVM_OPTS,
};

/// Environment variable naming an external Kafka cluster (`host:port,...`) that
/// [`Kafka::shared`] uses instead of starting a node.
pub const ENV_BOOTSTRAP: &str = "KEEL_TEST_KAFKA_BOOTSTRAP";

/// How often [`wait_until`] polls its condition.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Timeout of one admin or metadata request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address of a bound listener").port()
}

/// Polls `check` every 100 ms until it returns `Ok(Some(value))`, and returns that value.
///
/// `Ok(None)` means "not yet". `Err(e)` also means "not yet", and `e` says what was observed;
/// when `timeout` passes, the error names `what` was awaited and carries the last observation.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("the condition was never met");
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last observation: {last}");
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// A topic name no other test (or earlier run against the same external broker) uses.
pub fn unique_topic(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    format!("{prefix}-{}-{n}-{:x}", std::process::id(), nanos & 0xff_ffff)
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    // Reconnect within half a second of a broker restart (librdkafka backs off up to 10 s), so
    // that what a test measures after an outage is the code under test, not its helpers.
    config.set("bootstrap.servers", bootstrap).set("log_level", "3").set("reconnect.backoff.max.ms", "500");
    config
}

fn admin(bootstrap: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    client_config(bootstrap).create().context("creating an admin client")
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT)).operation_timeout(Some(REQUEST_TIMEOUT))
}

/// Number of partitions of `topic` as the broker's metadata reports it (0 = no such topic).
pub fn partition_count(bootstrap: &str, topic: &str) -> anyhow::Result<usize> {
    let consumer: BaseConsumer = client_config(bootstrap).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .unwrap_or(0))
}

/// Creates `name` with `partitions` partitions (the cluster's default replication factor: 3
/// on [`Kafka::three`]) and waits until the metadata shows them.
pub fn create_topic(bootstrap: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    create_topic_with(bootstrap, name, partitions, &[])
}

/// [`create_topic`] with topic configs (`("min.insync.replicas", "2")`, ...).
pub fn create_topic_with(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) -> anyhow::Result<()> {
    let admin = admin(bootstrap)?;
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(-1));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let results = futures::executor::block_on(admin.create_topics([&topic], &admin_options()))
        .with_context(|| format!("creating topic {name}"))?;
    for r in results {
        r.map_err(|(t, code)| anyhow!("creating topic {t}: {code}"))?;
    }
    let want = usize::try_from(partitions)?;
    wait_until(&format!("topic {name} to have {partitions} partitions"), REQUEST_TIMEOUT, || {
        let n = partition_count(bootstrap, name)?;
        if n == want {
            Ok(Some(()))
        } else {
            Err(anyhow!("{n} partitions"))
        }
    })
}

/// Grows `name` to `new_total` partitions and waits until the metadata shows them.
pub fn add_partitions(bootstrap: &str, name: &str, new_total: usize) -> anyhow::Result<()> {
    let admin = admin(bootstrap)?;
    let request = NewPartitions::new(name, new_total);
    let results = futures::executor::block_on(admin.create_partitions([&request], &admin_options()))
        .with_context(|| format!("adding partitions to {name}"))?;
    for r in results {
        r.map_err(|(t, code)| anyhow!("adding partitions to {t}: {code}"))?;
    }
    wait_until(&format!("topic {name} to have {new_total} partitions"), REQUEST_TIMEOUT, || {
        let n = partition_count(bootstrap, name)?;
        if n == new_total {
            Ok(Some(()))
        } else {
            Err(anyhow!("{n} partitions"))
        }
    })
}

/// A record read from, or written to, a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl TestRecord {
    /// The value as UTF-8 (lossy; empty when there is none).
    pub fn value_str(&self) -> String {
        self.value.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
    }

    /// The value parsed as a number (what [`produce_numbered`] writes).
    pub fn number(&self) -> Option<u64> {
        self.value_str().parse().ok()
    }
}

/// A record to produce.
#[derive(Debug, Clone, Default)]
pub struct Produce {
    /// `None`: the producer's partitioner decides (by key hash).
    pub partition: Option<i32>,
    pub key: Option<String>,
    pub value: String,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Records delivery reports: `(partition, offset)` or the error, by the index of the record.
struct DeliveryLog(Mutex<Vec<Option<Delivery>>>);

/// Where a record landed (partition, offset), or why it did not.
type Delivery = Result<(i32, i64), String>;

impl ClientContext for DeliveryLog {}

impl ProducerContext for DeliveryLog {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, m)) => Err(format!("partition {}: {e}", m.partition())),
        };
        if let Ok(mut log) = self.0.lock() {
            if let Some(slot) = log.get_mut(index) {
                *slot = Some(outcome);
            }
        }
    }
}

/// Produces `records` to `topic` (acks=all) and returns them as written, with the partition and
/// offset the broker gave each, in the order given. Fails on the first delivery error.
pub fn produce(bootstrap: &str, topic: &str, records: Vec<Produce>) -> anyhow::Result<Vec<TestRecord>> {
    let context = DeliveryLog(Mutex::new(vec![None; records.len()]));
    let producer: BaseProducer<DeliveryLog> = client_config(bootstrap)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create_with_context(context)
        .context("creating a producer")?;
    for (index, r) in records.iter().enumerate() {
        let mut record: BaseRecord<'_, str, str, usize> =
            BaseRecord::with_opaque_to(topic, index).payload(r.value.as_str());
        if let Some(key) = r.key.as_deref() {
            record = record.key(key);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        if let Some(ts) = r.timestamp_ms {
            record = record.timestamp(ts);
        }
        if !r.headers.is_empty() {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &r.headers {
                headers = headers.insert(Header { key: k, value: Some(v) });
            }
            record = record.headers(headers);
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(anyhow!("producing to {topic}: {e}")),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(REQUEST_TIMEOUT).with_context(|| format!("flushing records to {topic}"))?;
    let log = producer.context().0.lock().map_err(|_| anyhow!("delivery log poisoned"))?.clone();
    records
        .into_iter()
        .zip(log)
        .map(|(r, outcome)| {
            let (partition, offset) = outcome
                .ok_or_else(|| anyhow!("no delivery report for a record to {topic}"))?
                .map_err(|e| anyhow!("delivering to {topic}: {e}"))?;
            Ok(TestRecord {
                topic: topic.to_string(),
                partition,
                offset,
                timestamp_ms: r.timestamp_ms,
                key: r.key.map(String::into_bytes),
                value: Some(r.value.into_bytes()),
                headers: r.headers,
            })
        })
        .collect()
}

/// Produces the numbers of `range` as values (decimal text) to `topic`, keyed by `key_fn`.
pub fn produce_numbered(
    bootstrap: &str,
    topic: &str,
    range: Range<u64>,
    key_fn: impl Fn(u64) -> Option<String>,
) -> anyhow::Result<Vec<TestRecord>> {
    let records =
        range.map(|n| Produce { key: key_fn(n), value: n.to_string(), ..Produce::default() }).collect();
    produce(bootstrap, topic, records)
}

/// Produces the numbers of `range` as values to one partition of `topic`.
pub fn produce_numbered_to(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    range: Range<u64>,
) -> anyhow::Result<Vec<TestRecord>> {
    let records = range
        .map(|n| Produce { partition: Some(partition), value: n.to_string(), ..Produce::default() })
        .collect();
    produce(bootstrap, topic, records)
}

/// Reads `topic` from the beginning of every partition until `expect_count` records arrived,
/// and returns them (with partition and offset) in arrival order. The consumer assigns all
/// partitions itself (no group rebalance) and commits nothing; `group` is only its `group.id`.
/// Fails after `timeout` saying how many records arrived.
pub fn consume_all(
    bootstrap: &str,
    topic: &str,
    group: &str,
    expect_count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<TestRecord>> {
    let reader = TopicReader::open(bootstrap, topic, group)?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(expect_count);
    while out.len() < expect_count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "read {} of {expect_count} records from {topic} within {timeout:?}; last: {:?}",
                out.len(),
                out.last().map(|r: &TestRecord| (r.partition, r.offset, r.value_str()))
            );
        }
        out.extend(reader.poll(left.min(Duration::from_millis(200))));
    }
    Ok(out)
}

/// A consumer of every partition of one topic from its beginning, kept across calls (no group
/// rebalance, nothing committed; the group is only its `group.id`). It rides out broker
/// outages: librdkafka reconnects and goes on where it was.
pub struct TopicReader {
    consumer: BaseConsumer,
    topic: String,
}

impl TopicReader {
    /// Assigns every partition `topic` has now, each from its beginning, reading committed
    /// records only (`isolation.level=read_committed`: what exactly-once promises to readers).
    pub fn open(bootstrap: &str, topic: &str, group: &str) -> anyhow::Result<TopicReader> {
        TopicReader::open_with(bootstrap, topic, group, "read_committed")
    }

    /// Like [`TopicReader::open`], but also reading records of open and aborted transactions
    /// (`isolation.level=read_uncommitted`).
    pub fn open_uncommitted(bootstrap: &str, topic: &str, group: &str) -> anyhow::Result<TopicReader> {
        TopicReader::open_with(bootstrap, topic, group, "read_uncommitted")
    }

    fn open_with(bootstrap: &str, topic: &str, group: &str, isolation: &str) -> anyhow::Result<TopicReader> {
        let consumer: BaseConsumer = client_config(bootstrap)
            .set("isolation.level", isolation)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .context("creating a consumer")?;
        let partitions = partition_count(bootstrap, topic)?;
        if partitions == 0 {
            bail!("topic {topic} does not exist on {bootstrap}");
        }
        let mut tpl = TopicPartitionList::new();
        for p in 0..i32::try_from(partitions)? {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(TopicReader { consumer, topic: topic.to_string() })
    }

    /// The next record, waiting up to `wait` for it. Consumer errors (a broker outage) are
    /// logged and read as "nothing yet".
    pub fn poll(&self, wait: Duration) -> Option<TestRecord> {
        match self.consumer.poll(wait) {
            None => None,
            Some(Err(e)) => {
                tracing::debug!(topic = %self.topic, error = %e, "topic reader: consumer error");
                None
            }
            Some(Ok(m)) => Some(TestRecord {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
        }
    }

    /// Every record that arrives within `window`.
    pub fn read_for(&self, window: Duration) -> Vec<TestRecord> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            out.extend(self.poll(left.min(Duration::from_millis(200))));
        }
    }

    /// Reads until no record arrived for `quiet` (the topic's end, once its writers are done).
    pub fn read_until_quiet(&self, quiet: Duration) -> Vec<TestRecord> {
        let mut out = Vec::new();
        let mut last = Instant::now();
        while last.elapsed() < quiet {
            if let Some(r) = self.poll(Duration::from_millis(100)) {
                out.push(r);
                last = Instant::now();
            }
        }
        out
    }
}

/// Reads exactly `n` records from `topic` (each value as text), waiting up to `timeout` for
/// them, and checks that no further record follows (a second reader finds no `n + 1`-th within
/// 3 s: a duplicate written later than that is not caught here).
pub fn read_exactly(
    bootstrap: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let records = consume_all(bootstrap, topic, &unique_topic("reader"), n, timeout)?;
    let more = consume_all(bootstrap, topic, &unique_topic("reader"), n + 1, Duration::from_secs(3));
    if more.is_ok() {
        bail!("{topic} holds more than {n} records");
    }
    Ok(records.iter().map(|r| r.value_str()).collect())
}

/// Commits `offset` for `group` on every partition of `topic`, as a consumer group that has read
/// up to there would have (a job started with `scan.startup.mode: group-offsets` resumes there).
pub fn commit_offsets(bootstrap: &str, group: &str, topic: &str, offset: i64) -> anyhow::Result<()> {
    let consumer: BaseConsumer = client_config(bootstrap).set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..i32::try_from(partition_count(bootstrap, topic)?)? {
        tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
    }
    consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync)?;
    Ok(())
}

/// The offsets `group` has committed for each partition of `topic` (`None`: nothing committed).
pub fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
    let consumer: BaseConsumer = client_config(bootstrap).set("group.id", group).create()?;
    let partitions = partition_count(bootstrap, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..i32::try_from(partitions)? {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, REQUEST_TIMEOUT)?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), offset)
        })
        .collect())
}

/// The last stable offset of one partition: the first offset of the oldest transaction still
/// open on it, else its high watermark (a `read_committed` ListOffsets "latest"). A transaction
/// left open blocks every `read_committed` reader at this offset.
pub fn last_stable_offset(bootstrap: &str, topic: &str, partition: i32) -> anyhow::Result<i64> {
    let consumer: BaseConsumer =
        client_config(bootstrap).set("isolation.level", "read_committed").create()?;
    Ok(consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)?.1)
}

/// `(low, high)` watermarks of one partition as the broker reports them.
pub fn watermarks(bootstrap: &str, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
    let consumer: BaseConsumer =
        client_config(bootstrap).set("isolation.level", "read_uncommitted").create()?;
    Ok(consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)?)
}
