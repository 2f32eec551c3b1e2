//! [`KafkaSourceReader`]: reads the partitions one subtask owns.
//!
//! ```text
//! open ──▶ list partitions ──▶ keep own (assign::owner) ──▶ resolve start offsets ──▶ assign
//!            poll_each ─┬─▶ messages, borrowed, to a visitor (position advances per message taken)
//!                       └─▶ discovery when due: new partitions start at the earliest offset
//!            position() ──▶ checkpoint state;  commit(position) when the checkpoint completes
//! ```
//!
//! The consumer is a librdkafka consumer that Keel assigns partitions to (`assign`, never
//! `subscribe`: there is no group rebalance). Every start offset is resolved to a number at
//! open, so [`KafkaSourceReader::position`] is exact from the first moment, even before the
//! first record: a checkpoint taken right after a `latest-offset` start restores to the same
//! place, not to "the end at restore time".
//!
//! Where a partition starts, first rule that applies:
//! 1. its offset in the restored position;
//! 2. with a restored position that lacks it: the earliest offset (the partition appeared after
//!    that checkpoint, like one found by discovery);
//! 3. `scan.startup.mode`: `earliest-offset`, `latest-offset`, `timestamp` (first record at or
//!    after it, else the end), `specific-offsets` (listed partitions; the others as
//!    `group-offsets`, falling back to earliest), `group-offsets` (the committed offset, else
//!    `properties.auto.offset.reset`, else an error naming group, topic and partition).
//!
//! A position that is out of range later (records deleted by retention) moves per
//! `properties.auto.offset.reset`; without one, `poll` fails naming the partition.
//!
//! Broker outages: librdkafka reconnects by itself; `poll` logs transient errors and returns
//! what it has (possibly nothing) rather than failing, until the outage outlasts
//! `properties.default.api.timeout.ms`: once librdkafka reported every broker connection down
//! (`AllBrokersDown`), `poll` probes the cluster with a metadata request about once a second,
//! and when none has answered for longer than that timeout it fails, naming the bootstrap
//! servers (`KeelError::Unavailable`), so that the task fails visibly instead of idling
//! forever; a record or an answered probe ends the outage. Fatal client errors and errors that
//! need a human (authorization, out of range without a reset policy) are returned as `Err`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use keel_proto::{error_chain, KeelError, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::metadata::Metadata;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::assign::{assign, spread_warning, TopicPartition};
use crate::client::{is_transient, log, to_keel};
use crate::fetch::{FetchQueue, Fetched, RawHeaders, RawMessage};
use crate::metrics::{now_ms, KafkaSourceMetrics, PartitionMetrics};
use crate::options::{
    set_defaults, source_queue_defaults, KafkaSourceOptions, OffsetReset, StartupMode, Subscription,
};
use crate::position::SourcePosition;

/// Longest a discovery round may block the poll loop waiting for metadata.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// librdkafka statistics interval unless `properties.statistics.interval.ms` says otherwise;
/// they carry the high watermarks behind `pendingRecords`.
const DEFAULT_STATISTICS_INTERVAL_MS: &str = "5000";

/// While every broker connection is down: how often `poll` probes the cluster, and how long
/// one probe (a metadata request) may block it at most.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// librdkafka's `reconnect.backoff.max.ms` unless the source sets it: the Java client's
/// default (librdkafka's own, 10 s, leaves a source idle for up to 10 s after a broker is back).
pub(crate) const RECONNECT_BACKOFF_MAX_MS: &str = "1000";

/// The group id of a consumer whose source has no `properties.group.id`.
const NO_GROUP_ID: &str = "keel-source-without-group";

/// One record read from Kafka, owned: what [`KafkaSourceReader::poll`] returns, and how a
/// message is kept across polls (see [`KafkaSourceReader::poll_each`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord {
    /// `poll` shares one between consecutive records of the same topic.
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Create time or log-append time, as the topic is configured; `None` when absent.
    pub timestamp_ms: Option<i64>,
    /// Which of the two the timestamp is.
    pub timestamp_type: TimestampType,
    /// The partition leader's epoch when the record was written; `None` when unknown.
    pub leader_epoch: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// In message order; a header without a value has `None`.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl KafkaRecord {
    /// An owned copy of `message`, whose topic is `topic`.
    fn of(message: &SourceMessage<'_>, topic: Arc<str>) -> KafkaRecord {
        KafkaRecord {
            topic,
            partition: message.partition,
            offset: message.offset,
            timestamp_ms: message.timestamp_ms,
            timestamp_type: message.timestamp_type,
            leader_epoch: message.leader_epoch,
            key: message.key.map(<[u8]>::to_vec),
            value: message.value.map(<[u8]>::to_vec),
            headers: message.headers().map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec))).collect(),
        }
    }

    /// This record as the message [`KafkaSourceReader::poll_each`] hands out.
    pub fn as_message(&self) -> SourceMessage<'_> {
        SourceMessage {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            timestamp_type: self.timestamp_type,
            leader_epoch: self.leader_epoch,
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers: MessageHeaders::Owned(&self.headers),
        }
    }
}

/// One message as [`KafkaSourceReader::poll_each`] hands it to its visitor: borrowed from the
/// Kafka client's buffers (nothing is copied), valid only during the visit.
#[derive(Clone, Copy)]
pub struct SourceMessage<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Create time or log-append time, as the topic is configured; `None` when absent.
    pub timestamp_ms: Option<i64>,
    /// Which of the two the timestamp is ([`TimestampType::NotAvailable`] without one).
    pub timestamp_type: TimestampType,
    /// The partition leader's epoch when the record was written; `None` when the broker or
    /// the message format does not tell (KIP-320).
    pub leader_epoch: Option<i32>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    headers: MessageHeaders<'a>,
}

/// How a record's timestamp was set: Kafka's timestamp type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TimestampType {
    /// The record has no timestamp.
    #[default]
    NotAvailable,
    /// Set by the producer.
    CreateTime,
    /// Set by the broker when it appended the record (the topic's `message.timestamp.type`).
    LogAppendTime,
}

impl<'a> SourceMessage<'a> {
    /// `raw` (which is not an error) of `topic`, read in place.
    fn of_raw(raw: RawMessage<'a>, topic: &'a str) -> SourceMessage<'a> {
        let timestamp = raw.timestamp();
        SourceMessage {
            topic,
            partition: raw.partition(),
            offset: raw.offset(),
            timestamp_ms: timestamp.map(|(ms, _)| ms),
            timestamp_type: match timestamp {
                None => TimestampType::NotAvailable,
                Some((_, true)) => TimestampType::CreateTime,
                Some((_, false)) => TimestampType::LogAppendTime,
            },
            leader_epoch: raw.leader_epoch(),
            key: raw.key(),
            value: raw.value(),
            headers: raw.headers().map_or(MessageHeaders::None, MessageHeaders::Client),
        }
    }
}

/// Where a [`SourceMessage`]'s headers live.
#[derive(Clone, Copy)]
enum MessageHeaders<'a> {
    None,
    /// In the client's message.
    Client(RawHeaders<'a>),
    /// In a [`KafkaRecord`].
    Owned(&'a [(String, Option<Vec<u8>>)]),
}

impl<'a> SourceMessage<'a> {
    /// The headers in message order, as (name, value); a header without a value has `None`.
    /// Reads them where they are, without allocating.
    pub fn headers(&self) -> SourceHeaders<'a> {
        SourceHeaders { headers: self.headers, index: 0 }
    }

    /// How many headers the message has.
    pub fn header_count(&self) -> usize {
        match self.headers {
            MessageHeaders::None => 0,
            MessageHeaders::Client(h) => h.count(),
            MessageHeaders::Owned(h) => h.len(),
        }
    }

    /// Key, value and header bytes: what `numBytesIn` counts.
    fn size(&self) -> u64 {
        let headers: usize = self.headers().map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len)).sum();
        let total = self.key.map_or(0, <[u8]>::len) + self.value.map_or(0, <[u8]>::len) + headers;
        u64::try_from(total).unwrap_or(u64::MAX)
    }
}

impl std::fmt::Debug for SourceMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceMessage")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("timestamp_ms", &self.timestamp_ms)
            .field("timestamp_type", &self.timestamp_type)
            .field("leader_epoch", &self.leader_epoch)
            .field("key", &self.key)
            .field("value", &self.value)
            .field("headers", &self.headers().collect::<Vec<_>>())
            .finish()
    }
}

/// The headers of a [`SourceMessage`]: (name, value), in message order.
pub struct SourceHeaders<'a> {
    headers: MessageHeaders<'a>,
    index: usize,
}

impl<'a> Iterator for SourceHeaders<'a> {
    type Item = (&'a str, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        let item = match self.headers {
            MessageHeaders::None => None,
            MessageHeaders::Client(h) => h.get(self.index),
            MessageHeaders::Owned(h) => h.get(self.index).map(|(k, v)| (k.as_str(), v.as_deref())),
        };
        if item.is_some() {
            self.index += 1;
        }
        item
    }
}

/// librdkafka's callbacks: logs, errors, statistics, commit results.
struct ReaderContext {
    subtask: u32,
    bootstrap: String,
    /// High watermarks from the statistics, by topic and partition.
    high_watermarks: Mutex<HashMap<String, HashMap<i32, i64>>>,
    /// A fatal client error; the reader is unusable once set.
    fatal: Mutex<Option<String>>,
    /// When librdkafka first reported every broker connection down (`AllBrokersDown`) with no
    /// sign of life since; `poll` clears it on a record or an answered probe.
    all_down_since: Mutex<Option<Instant>>,
}

impl ClientContext for ReaderContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log("source", self.subtask, level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(subtask = self.subtask, bootstrap = %self.bootstrap, %reason, "kafka consumer fatal error");
            if let Ok(mut fatal) = self.fatal.lock() {
                fatal.get_or_insert_with(|| reason.to_string());
            }
        } else {
            if code == Some(RDKafkaErrorCode::AllBrokersDown) {
                if let Ok(mut since) = self.all_down_since.lock() {
                    since.get_or_insert_with(Instant::now);
                }
            }
            tracing::warn!(
                subtask = self.subtask,
                bootstrap = %self.bootstrap,
                error = %error_chain(&error),
                %reason,
                "kafka consumer error, the client retries"
            );
        }
    }

    fn stats(&self, statistics: Statistics) {
        let Ok(mut hw) = self.high_watermarks.lock() else { return };
        for (name, topic) in statistics.topics {
            let entry = hw.entry(name).or_default();
            for (p, partition) in topic.partitions {
                if p >= 0 && partition.hi_offset >= 0 {
                    entry.insert(p, partition.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// What one poll handed out, for the metrics.
#[derive(Default)]
struct Handed {
    records: usize,
    bytes: u64,
    /// The timestamp of the last record handed out that has one (`currentEmitEventTimeLag`).
    timestamp_ms: Option<i64>,
    /// The timestamp of the last record fetched that has one (`currentFetchEventTimeLag`).
    fetched_timestamp_ms: Option<i64>,
}

impl Handed {
    fn took(&mut self, message: &SourceMessage<'_>) {
        self.records += 1;
        self.bytes = self.bytes.saturating_add(message.size());
        if message.timestamp_ms.is_some() {
            self.timestamp_ms = message.timestamp_ms;
        }
    }
}

struct PartitionState {
    topic: Arc<str>,
    next_offset: i64,
    gauges: Arc<PartitionMetrics>,
}

/// Reads the partitions subtask `subtask` of `parallelism` owns. See the module doc.
pub struct KafkaSourceReader {
    /// Commits offsets off the poll loop; `None` without `properties.group.id`. Declared
    /// before `consumer` so that it stops (and lets go of the consumer) first.
    committer: Option<Committer>,
    /// Messages fetched and not all handed out yet: the next poll hands out the rest first.
    /// Declared before `fetch` and `consumer`, whose client they belong to.
    fetched: Fetched,
    /// The queue the assigned partitions fetch into (see [`crate::fetch`]).
    fetch: FetchQueue<ReaderContext>,
    consumer: Arc<BaseConsumer<ReaderContext>>,
    opts: KafkaSourceOptions,
    subtask: u32,
    parallelism: u32,
    metrics: Arc<KafkaSourceMetrics>,
    /// Assigned partitions by topic, then partition (looked up by `&str` per record).
    assigned: HashMap<String, BTreeMap<i32, PartitionState>>,
    /// Partition count of each whole-topic subscription seen so far (for spread warnings).
    topic_sizes: BTreeMap<String, usize>,
    next_discovery: Option<Instant>,
    /// When `poll` last probed the cluster during an outage.
    last_probe: Option<Instant>,
}

impl KafkaSourceReader {
    /// Connects, lists the partitions, keeps this subtask's, resolves where each starts
    /// (`restored` wins over the startup mode) and assigns them. Blocks for at most about the
    /// request timeout per step; an unreachable cluster is `KeelError::Unavailable` naming the
    /// bootstrap servers.
    pub fn open(
        opts: KafkaSourceOptions,
        subtask: u32,
        parallelism: u32,
        restored: Option<SourcePosition>,
        metrics: Arc<KafkaSourceMetrics>,
    ) -> Result<KafkaSourceReader> {
        if parallelism == 0 || subtask >= parallelism {
            return Err(KeelError::InvalidArgument {
                reason: format!("subtask {subtask} is not within parallelism {parallelism}"),
            });
        }
        let config = consumer_config(&opts, subtask);
        let context = ReaderContext {
            subtask,
            bootstrap: opts.bootstrap_servers.clone(),
            high_watermarks: Mutex::new(HashMap::new()),
            fatal: Mutex::new(None),
            all_down_since: Mutex::new(None),
        };
        let consumer: BaseConsumer<ReaderContext> = config.create_with_context(context).map_err(|e| {
            KeelError::invalid_spec(
                format!("{}.properties", opts.field_prefix),
                format!("the Kafka client refuses the configuration: {}", error_chain(&e)),
            )
        })?;

        let metadata = consumer.fetch_metadata(None, opts.request_timeout).map_err(|e| {
            KeelError::unavailable(
                &opts.bootstrap_servers,
                format!(
                    "no Kafka broker answered a metadata request within {:?} (properties.default.api.timeout.ms): {}",
                    opts.request_timeout,
                    error_chain(&e)
                ),
            )
        })?;
        let listing = list_partitions(&opts.subscription, &metadata);
        if let Some(topic) = listing.missing_topics.first() {
            return Err(KeelError::precondition(format!(
                "topic {topic} does not exist on {} ({}.topic)",
                opts.bootstrap_servers, opts.field_prefix
            )));
        }
        if let Some(tp) = listing.missing_partitions.first() {
            return Err(KeelError::precondition(format!(
                "topic {} has no partition {} on {} ({}.topic)",
                tp.topic, tp.partition, opts.bootstrap_servers, opts.field_prefix
            )));
        }
        let mine = assign(&listing.partitions, parallelism, subtask);

        let consumer = Arc::new(consumer);
        let committer = match &opts.group_id {
            Some(group) => Some(Committer::start(
                consumer.clone(),
                subtask,
                group,
                &opts.bootstrap_servers,
                metrics.clone(),
            )?),
            None => None,
        };
        let fetch = FetchQueue::new(consumer.clone())
            .ok_or_else(|| KeelError::internal("the Kafka client gave no queue to fetch into"))?;
        let mut reader = KafkaSourceReader {
            committer,
            fetched: Fetched::default(),
            fetch,
            consumer,
            subtask,
            parallelism,
            metrics,
            assigned: HashMap::new(),
            topic_sizes: BTreeMap::new(),
            next_discovery: opts.discovery_interval.map(|i| Instant::now() + i),
            last_probe: None,
            opts,
        };
        let starts = reader.start_offsets(&mine, restored.as_ref())?;
        reader.add_partitions(&starts)?;
        reader.note_topic_sizes(&listing.whole_topic_sizes);
        tracing::info!(
            subtask,
            parallelism,
            bootstrap = %reader.opts.bootstrap_servers,
            group = reader.opts.group_id.as_deref().unwrap_or(""),
            startup_mode = reader.opts.startup_mode.name(),
            restored = restored.is_some(),
            partitions = %describe(&starts),
            "kafka source opened"
        );
        Ok(reader)
    }

    /// Reads up to `max_records` messages and hands each to `visit`, borrowed from the client
    /// (no copy), in the order read; returns how many `visit` took. Waits up to `timeout` for
    /// the first message (and not at all for the rest). Runs partition discovery first when
    /// it is due. Transient broker errors are logged and yield fewer (or no) messages; fatal
    /// ones are `Err`, and so is an outage longer than `properties.default.api.timeout.ms`
    /// (see the module doc; a poll during an outage may block up to a second longer, probing).
    ///
    /// The position moves past each message as `visit` returns `Ok` for it. An `Err` from
    /// `visit` means it did not take the message: the poll stops and returns that error, the
    /// position stays right after the last message taken, and the refused message is handed
    /// out first by the next poll, so nothing is skipped.
    ///
    /// Polling also serves the client's callbacks (statistics, logs, errors), so keep calling
    /// it. With `max_records` 0 it only does that, for up to `timeout` (say, while downstream
    /// is backpressured), and fetches nothing.
    pub fn poll_each(
        &mut self,
        max_records: usize,
        timeout: Duration,
        mut visit: impl FnMut(&SourceMessage<'_>) -> Result<()>,
    ) -> Result<usize> {
        self.check_fatal()?;
        self.discover_if_due(Instant::now())?;
        let deadline = Instant::now() + timeout;
        let mut handed = Handed::default();
        let outcome = self.serve_events(if max_records == 0 { timeout } else { Duration::ZERO });
        let outcome =
            outcome.and_then(|()| self.visit_messages(max_records, deadline, &mut visit, &mut handed));
        self.record_metrics(&handed);
        outcome?;
        self.check_reachable(handed.records > 0 || !self.fetched.is_done())?;
        Ok(handed.records)
    }

    /// [`Self::poll_each`] with an owned copy of every record (allocations per record: for
    /// tests and tools, not for the data path).
    pub fn poll(&mut self, max_records: usize, timeout: Duration) -> Result<Vec<KafkaRecord>> {
        let mut out: Vec<KafkaRecord> = Vec::with_capacity(max_records.min(1024));
        let mut topic: Option<Arc<str>> = None;
        self.poll_each(max_records, timeout, |m| {
            let shared = match &topic {
                Some(t) if **t == *m.topic => t.clone(),
                _ => topic.insert(Arc::from(m.topic)).clone(),
            };
            out.push(KafkaRecord::of(m, shared));
            Ok(())
        })?;
        Ok(out)
    }

    /// Serves what waits on the consumer's own queue (statistics, logs, client errors: the
    /// callbacks of [`ReaderContext`]); with a `wait`, blocks that long doing so. No record
    /// arrives there: every assigned partition fetches into [`Self::fetch`].
    fn serve_events(&mut self, wait: Duration) -> Result<()> {
        /// At most this many per poll, so that a flood of logs cannot stall the records.
        const MAX_EVENTS: usize = 64;
        if wait.is_zero() && self.fetch.events_waiting() == 0 {
            return Ok(());
        }
        for served in 0..MAX_EVENTS {
            if served > 0 && self.fetch.events_waiting() == 0 {
                break;
            }
            match self.consumer.poll(if served == 0 { wait } else { Duration::ZERO }) {
                None => {}
                Some(Err(e)) => self.consume_error(e)?,
                Some(Ok(m)) => {
                    return Err(KeelError::internal(format!(
                        "record {} [{}] at offset {} reached the consumer's queue instead of the fetch queue",
                        m.topic(),
                        m.partition(),
                        m.offset()
                    )))
                }
            }
        }
        Ok(())
    }

    /// The loop of [`Self::poll_each`]: hands out what is left of the last fetch, then fetches
    /// more; `handed` counts what `visit` took (and what was fetched), also when it fails.
    fn visit_messages(
        &mut self,
        max_records: usize,
        deadline: Instant,
        visit: &mut impl FnMut(&SourceMessage<'_>) -> Result<()>,
        handed: &mut Handed,
    ) -> Result<()> {
        if max_records == 0 {
            return Ok(());
        }
        // Taken out of `self` while its messages are borrowed; put back however this ends.
        let mut fetched = std::mem::take(&mut self.fetched);
        let outcome = self.visit_fetched(&mut fetched, max_records, deadline, visit, handed);
        if fetched.is_done() {
            fetched.clear();
        }
        self.fetched = fetched;
        outcome
    }

    fn visit_fetched(
        &mut self,
        fetched: &mut Fetched,
        max_records: usize,
        deadline: Instant,
        visit: &mut impl FnMut(&SourceMessage<'_>) -> Result<()>,
        handed: &mut Handed,
    ) -> Result<()> {
        loop {
            if handed.records >= max_records {
                return Ok(());
            }
            if fetched.is_done() {
                fetched.clear();
                let want = max_records - handed.records;
                let mut n =
                    self.fetch.consume(fetched, want, Duration::ZERO).map_err(|e| self.fetch_error(&e))?;
                // Waits only until the poll's deadline, however many error messages or skipped
                // records came before (the clock is read only when nothing was there).
                let wait = if n == 0 && handed.records == 0 {
                    deadline.saturating_duration_since(Instant::now())
                } else {
                    Duration::ZERO
                };
                if !wait.is_zero() {
                    // librdkafka waits for all it is asked for: wait for one, then take the rest.
                    n = self.fetch.consume(fetched, 1, wait).map_err(|e| self.fetch_error(&e))?;
                    if n > 0 {
                        self.fetch
                            .consume(fetched, want - 1, Duration::ZERO)
                            .map_err(|e| self.fetch_error(&e))?;
                    }
                }
                if fetched.is_done() {
                    return Ok(());
                }
            }
            self.visit_run(fetched, max_records, visit, handed)?;
        }
    }

    /// Hands out the next messages of `fetched` that are of one partition (an error message
    /// alone is a run of its own), until `max_records` were handed out in all.
    fn visit_run(
        &mut self,
        fetched: &Fetched,
        max_records: usize,
        visit: &mut impl FnMut(&SourceMessage<'_>) -> Result<()>,
        handed: &mut Handed,
    ) -> Result<()> {
        let first = fetched.view(fetched.next());
        if let Some(error) = first.error() {
            fetched.advance();
            return self.consume_error(error);
        }
        let (handle, partition) = (first.topic_handle(), first.partition());
        let Some(topic) = first.topic() else {
            fetched.advance();
            tracing::warn!(partition, offset = first.offset(), "record of a topic whose name is not UTF-8");
            return Ok(());
        };
        let Some(state) = self.assigned.get_mut(topic).and_then(|t| t.get_mut(&partition)) else {
            fetched.advance();
            tracing::debug!(topic, partition, "record of a partition not assigned");
            return Ok(());
        };
        while fetched.next() < fetched.len() && handed.records < max_records {
            let raw = fetched.view(fetched.next());
            if raw.topic_handle() != handle || raw.partition() != partition || raw.error().is_some() {
                break;
            }
            if raw.offset() < state.next_offset {
                // Only an offset reset moves a position back (properties.auto.offset.reset
                // after the position fell out of range).
                tracing::warn!(
                    subtask = self.subtask,
                    topic,
                    partition,
                    from = state.next_offset,
                    to = raw.offset(),
                    "position reset by properties.auto.offset.reset"
                );
            }
            let message = SourceMessage::of_raw(raw, topic);
            if message.timestamp_ms.is_some() {
                handed.fetched_timestamp_ms = message.timestamp_ms;
            }
            visit(&message)?;
            fetched.advance();
            state.next_offset = message.offset + 1;
            handed.took(&message);
        }
        Ok(())
    }

    /// The batch consume call itself failed (librdkafka refuses only a queue that is not a
    /// consumer's, so this is not expected).
    fn fetch_error(&self, error: &KafkaError) -> KeelError {
        to_keel(
            error,
            &format!("fetching subtask {}'s partitions", self.subtask),
            &self.opts.bootstrap_servers,
        )
    }

    /// During an outage (librdkafka reported every broker connection down): ends it when
    /// records arrived or a probe is answered, and fails once no broker has answered for
    /// longer than the request timeout (`properties.default.api.timeout.ms`).
    fn check_reachable(&mut self, got_records: bool) -> Result<()> {
        let since = self.consumer.context().all_down_since.lock().ok().and_then(|s| *s);
        let Some(since) = since else { return Ok(()) };
        let now = Instant::now();
        if !got_records && self.last_probe.is_some_and(|t| now.duration_since(t) < PROBE_EVERY) {
            return Ok(());
        }
        let probe = if got_records {
            Ok(())
        } else {
            self.last_probe = Some(now);
            self.consumer
                .fetch_metadata(None, self.opts.request_timeout.min(PROBE_TIMEOUT))
                .map(|_| ())
                .map_err(|e| error_chain(&e))
        };
        match probe {
            Ok(()) => {
                if let Ok(mut s) = self.consumer.context().all_down_since.lock() {
                    *s = None;
                }
                self.last_probe = None;
                tracing::info!(subtask = self.subtask, bootstrap = %self.opts.bootstrap_servers,
                    down_for = ?since.elapsed(), "a Kafka broker is reachable again");
                Ok(())
            }
            Err(error) => {
                let down = since.elapsed();
                if down < self.opts.request_timeout {
                    return Ok(());
                }
                Err(KeelError::unavailable(
                    &self.opts.bootstrap_servers,
                    format!(
                        "no Kafka broker has been reachable for {:.1} s, longer than {:?} \
                         (properties.default.api.timeout.ms); the last probe: {error}",
                        down.as_secs_f64(),
                        self.opts.request_timeout
                    ),
                ))
            }
        }
    }

    fn record_metrics(&mut self, handed: &Handed) {
        let m = &self.metrics;
        let now_ms = now_ms();
        if let Some(ts) = handed.fetched_timestamp_ms {
            m.fetch_lag_ms.store((now_ms - ts).max(0), Ordering::Relaxed);
        }
        if handed.records > 0 {
            m.num_records_in.fetch_add(u64::try_from(handed.records).unwrap_or(u64::MAX), Ordering::Relaxed);
            m.num_bytes_in.fetch_add(handed.bytes, Ordering::Relaxed);
            m.last_record_at_ms.store(now_ms, Ordering::Relaxed);
            if let Some(ts) = handed.timestamp_ms {
                m.emit_lag_ms.store((now_ms - ts).max(0), Ordering::Relaxed);
            }
            for partitions in self.assigned.values() {
                for state in partitions.values() {
                    state.gauges.current_offset.store(state.next_offset, Ordering::Relaxed);
                }
            }
        }
        self.update_pending();
    }

    fn update_pending(&self) {
        let Ok(hw) = self.consumer.context().high_watermarks.lock() else { return };
        let mut pending = 0i64;
        let mut known = false;
        for (topic, partitions) in &self.assigned {
            let Some(marks) = hw.get(topic.as_str()) else { continue };
            for (p, state) in partitions {
                if let Some(high) = marks.get(p) {
                    known = true;
                    pending += (high - state.next_offset).max(0);
                }
            }
        }
        if known {
            self.metrics.pending_records.store(pending, Ordering::Relaxed);
        }
    }

    /// An error the consumer reported instead of a record.
    fn consume_error(&mut self, error: KafkaError) -> Result<()> {
        if let KafkaError::PartitionEOF(_) = error {
            return Ok(());
        }
        let fatal = matches!(error, KafkaError::MessageConsumptionFatal(_));
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AutoOffsetReset) | Some(RDKafkaErrorCode::OffsetOutOfRange) => {
                Err(self.out_of_range_error(&error))
            }
            Some(code) if !fatal && is_transient(code) => {
                tracing::warn!(subtask = self.subtask, bootstrap = %self.opts.bootstrap_servers, error = %error_chain(&error),
                    "kafka fetch error, the client retries");
                Ok(())
            }
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition,
            ) if !fatal => {
                tracing::warn!(subtask = self.subtask, error = %error_chain(&error), "a partition of the source is not known to the broker (deleted?)");
                Ok(())
            }
            _ => Err(to_keel(
                &error,
                &format!("reading subtask {}'s partitions", self.subtask),
                &self.opts.bootstrap_servers,
            )),
        }
    }

    /// Names the partitions whose position lies outside what the broker has.
    fn out_of_range_error(&self, error: &KafkaError) -> KeelError {
        let positions: Vec<(TopicPartition, i64)> = self.position().iter().collect();
        let tps: Vec<TopicPartition> = positions.iter().map(|(tp, _)| tp.clone()).collect();
        let low = self.list_offsets(&tps, Offset::Beginning, self.opts.request_timeout).unwrap_or_default();
        let high = self.list_offsets(&tps, Offset::End, self.opts.request_timeout).unwrap_or_default();
        let outside: Vec<String> = positions
            .iter()
            .filter_map(|(tp, pos)| {
                let (l, h) = (low.get(tp).copied()?, high.get(tp).copied()?);
                (*pos < l || *pos > h).then(|| {
                    format!(
                        "topic {} partition {} at offset {pos} (broker has {l}..{h})",
                        tp.topic, tp.partition
                    )
                })
            })
            .collect();
        let which =
            if outside.is_empty() { "a partition of the source".to_string() } else { outside.join(", ") };
        KeelError::precondition(format!(
            "{which}: the position is out of range and there is no properties.auto.offset.reset \
             (earliest or latest) to move it ({}.properties.auto.offset.reset; {})",
            self.opts.field_prefix,
            error_chain(error)
        ))
    }

    fn check_fatal(&self) -> Result<()> {
        let fatal = self.consumer.context().fatal.lock().ok().and_then(|f| f.clone());
        match fatal {
            None => Ok(()),
            Some(reason) => Err(KeelError::precondition(format!(
                "the Kafka consumer of subtask {} (bootstrap servers {}) failed fatally: {reason}",
                self.subtask, self.opts.bootstrap_servers
            ))),
        }
    }

    /// The next offset of every assigned partition: the checkpoint state.
    pub fn position(&self) -> SourcePosition {
        let mut pos = SourcePosition::new();
        for (topic, partitions) in &self.assigned {
            for (p, state) in partitions {
                pos.set(topic, *p, state.next_offset);
            }
        }
        pos
    }

    /// The partitions this reader reads, sorted.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        let mut out: Vec<TopicPartition> = self
            .assigned
            .iter()
            .flat_map(|(t, ps)| ps.keys().map(move |p| TopicPartition::new(t.clone(), *p)))
            .collect();
        out.sort();
        out
    }

    pub fn metrics(&self) -> &Arc<KafkaSourceMetrics> {
        &self.metrics
    }

    /// The partition count of each topic the source reads whole (a `topic` list without
    /// partitions, or a `topic-pattern`), as of the latest listing (open or discovery): what
    /// [`spread_warning`] is about.
    pub fn topic_sizes(&self) -> &BTreeMap<String, usize> {
        &self.topic_sizes
    }

    /// Commits the offsets of `position` that belong to this reader to the consumer group
    /// (call it when the checkpoint that holds `position` completes). Without
    /// `properties.group.id` it does nothing.
    ///
    /// The commit runs on a thread of its own, so a slow or absent group coordinator never
    /// stalls the poll loop; commits requested while one is in flight are merged into one. Its
    /// outcome is counted in `commitsSucceeded` / `commitsFailed` and shown as
    /// `committedOffset`. A failed commit is logged and does not call for failing the task: the
    /// group's offsets are for monitoring, the checkpoint holds the truth.
    pub fn commit(&mut self, position: &SourcePosition) -> Result<()> {
        let Some(committer) = &self.committer else {
            tracing::debug!(subtask = self.subtask, "no properties.group.id: offsets are not committed");
            return Ok(());
        };
        let offsets: Vec<(TopicPartition, i64)> = position
            .iter()
            .filter(|(tp, _)| self.assigned.get(&tp.topic).is_some_and(|ps| ps.contains_key(&tp.partition)))
            .collect();
        if offsets.is_empty() {
            return Ok(());
        }
        committer.request(offsets)
    }

    /// Looks for new partitions when the discovery interval has passed since the last look;
    /// see [`KafkaSourceReader::discover`]. `poll` calls it; calling it yourself is harmless.
    pub fn discover_if_due(&mut self, now: Instant) -> Result<Vec<TopicPartition>> {
        let (Some(interval), Some(due)) = (self.opts.discovery_interval, self.next_discovery) else {
            return Ok(Vec::new());
        };
        if now < due {
            return Ok(Vec::new());
        }
        self.next_discovery = Some(now + interval);
        self.discover()
    }

    /// Lists the subscribed partitions (new partitions of the topics, new topics matching the
    /// pattern) and starts reading the ones this subtask owns and does not read yet, at their
    /// earliest offset (Flink's rule for discovered partitions), without disturbing the others.
    /// Returns the partitions added. A broker that does not answer in time is logged and the
    /// next round tries again.
    pub fn discover(&mut self) -> Result<Vec<TopicPartition>> {
        if let Subscription::Topics(list) = &self.opts.subscription {
            if list.iter().all(|t| t.partitions.is_some()) {
                return Ok(Vec::new());
            }
        }
        let metadata = match self
            .consumer
            .fetch_metadata(None, self.opts.request_timeout.min(DISCOVERY_TIMEOUT))
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(subtask = self.subtask, bootstrap = %self.opts.bootstrap_servers, error = %error_chain(&e),
                    "partition discovery: no metadata, trying again next round");
                return Ok(Vec::new());
            }
        };
        let listing = list_partitions(&self.opts.subscription, &metadata);
        let new: Vec<TopicPartition> = assign(&listing.partitions, self.parallelism, self.subtask)
            .into_iter()
            .filter(|tp| !self.assigned.get(&tp.topic).is_some_and(|ps| ps.contains_key(&tp.partition)))
            .collect();
        self.note_topic_sizes(&listing.whole_topic_sizes);
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let starts = match self.list_offsets(
            &new,
            Offset::Beginning,
            self.opts.request_timeout.min(DISCOVERY_TIMEOUT),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(subtask = self.subtask, error = %e, partitions = %describe_list(&new),
                    "partition discovery: no start offsets for new partitions, trying again next round");
                return Ok(Vec::new());
            }
        };
        self.add_partitions(&starts)?;
        tracing::info!(subtask = self.subtask, partitions = %describe(&starts), "discovered new partitions, reading them from the earliest offset");
        Ok(new)
    }

    /// Starts reading `starts` (partition → first offset) in addition to what is assigned,
    /// without disturbing the partitions read so far.
    fn add_partitions(&mut self, starts: &BTreeMap<TopicPartition, i64>) -> Result<()> {
        if starts.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(starts.len());
        for (tp, offset) in starts {
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset)).map_err(|e| {
                KeelError::internal(format!("start offset {offset} of {tp}: {}", error_chain(&e)))
            })?;
        }
        for tp in starts.keys() {
            self.fetch
                .route(&tp.topic, tp.partition)
                .map_err(|e| KeelError::internal(format!("routing {tp}: {e}")))?;
        }
        self.consumer.incremental_assign(&tpl).map_err(|e| {
            to_keel(&e, &format!("assigning partitions {}", describe(starts)), &self.opts.bootstrap_servers)
        })?;
        for (tp, offset) in starts {
            let gauges = self.metrics.partition(tp);
            gauges.current_offset.store(*offset, Ordering::Relaxed);
            let topics = self.assigned.entry(tp.topic.clone()).or_default();
            let topic: Arc<str> = match topics.values().next() {
                Some(s) => s.topic.clone(),
                None => Arc::from(tp.topic.as_str()),
            };
            topics.insert(tp.partition, PartitionState { topic, next_offset: *offset, gauges });
        }
        Ok(())
    }

    /// Warns once per change when a whole-topic subscription spreads unevenly.
    fn note_topic_sizes(&mut self, sizes: &BTreeMap<String, usize>) {
        for (topic, count) in sizes {
            if self.topic_sizes.get(topic) == Some(count) {
                continue;
            }
            self.topic_sizes.insert(topic.clone(), *count);
            if self.subtask == 0 {
                if let Some(warning) = spread_warning(*count, self.parallelism) {
                    tracing::warn!(topic = %topic, partitions = count, parallelism = self.parallelism, "{warning}");
                }
            }
        }
    }

    /// Where each of `mine` starts; see the module doc for the rules.
    fn start_offsets(
        &self,
        mine: &[TopicPartition],
        restored: Option<&SourcePosition>,
    ) -> Result<BTreeMap<TopicPartition, i64>> {
        let timeout = self.opts.request_timeout;
        let mut out = BTreeMap::new();
        let mut earliest = Vec::new();
        let mut latest = Vec::new();
        let mut by_mode = Vec::new();
        for tp in mine {
            match restored {
                Some(r) => match r.get(&tp.topic, tp.partition) {
                    Some(o) => {
                        out.insert(tp.clone(), o);
                    }
                    None => earliest.push(tp.clone()),
                },
                None => by_mode.push(tp.clone()),
            }
        }
        // Partitions that go by the group's committed offset, falling back to the reset policy
        // (`default_earliest`: or to earliest without one, instead of an error).
        let mut by_group: Vec<TopicPartition> = Vec::new();
        let mut default_earliest = false;
        match &self.opts.startup_mode {
            StartupMode::EarliestOffset => earliest.extend(by_mode),
            StartupMode::LatestOffset => latest.extend(by_mode),
            StartupMode::GroupOffsets => by_group = by_mode,
            StartupMode::Timestamp(ts) => {
                if !by_mode.is_empty() {
                    let found = self.list_offsets(&by_mode, Offset::Offset(*ts), timeout)?;
                    for tp in by_mode {
                        match found.get(&tp) {
                            Some(o) => {
                                out.insert(tp, *o);
                            }
                            // No record at or after the timestamp: start at the end.
                            None => latest.push(tp),
                        }
                    }
                }
            }
            StartupMode::SpecificOffsets(offsets) => {
                for tp in by_mode {
                    match offsets.get(&tp) {
                        Some(o) => {
                            out.insert(tp, *o);
                        }
                        None => by_group.push(tp),
                    }
                }
                default_earliest = true;
            }
        }
        if !by_group.is_empty() {
            let committed = match &self.opts.group_id {
                Some(_) => self.committed(&by_group, timeout)?,
                None => BTreeMap::new(),
            };
            for tp in by_group {
                match (committed.get(&tp), self.opts.auto_offset_reset) {
                    (Some(o), _) => {
                        out.insert(tp, *o);
                    }
                    (None, Some(OffsetReset::Earliest)) => earliest.push(tp),
                    (None, Some(OffsetReset::Latest)) => latest.push(tp),
                    (None, None) if default_earliest => earliest.push(tp),
                    (None, None) => {
                        return Err(KeelError::precondition(format!(
                            "no committed offset for group {} on topic {} partition {} and no \
                             properties.auto.offset.reset ({}.properties.auto.offset.reset: earliest or latest)",
                            self.opts.group_id.as_deref().unwrap_or(""),
                            tp.topic,
                            tp.partition,
                            self.opts.field_prefix
                        )))
                    }
                }
            }
        }
        for (list, which) in [(earliest, Offset::Beginning), (latest, Offset::End)] {
            if list.is_empty() {
                continue;
            }
            let found = self.list_offsets(&list, which, timeout)?;
            for tp in list {
                let o = found.get(&tp).copied().ok_or_else(|| {
                    KeelError::unavailable(
                        &self.opts.bootstrap_servers,
                        format!(
                            "the broker gave no {which:?} offset for topic {} partition {}",
                            tp.topic, tp.partition
                        ),
                    )
                })?;
                out.insert(tp, o);
            }
        }
        Ok(out)
    }

    /// The group's committed offsets of `tps`; partitions without one are absent.
    fn committed(&self, tps: &[TopicPartition], timeout: Duration) -> Result<BTreeMap<TopicPartition, i64>> {
        let mut tpl = TopicPartitionList::with_capacity(tps.len());
        for tp in tps {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        let group = self.opts.group_id.as_deref().unwrap_or("");
        let result = self.consumer.committed_offsets(tpl, timeout).map_err(|e| {
            to_keel(
                &e,
                &format!("reading the committed offsets of group {group}"),
                &self.opts.bootstrap_servers,
            )
        })?;
        let mut out = BTreeMap::new();
        for e in result.elements() {
            e.error().map_err(|err| {
                to_keel(
                    &err,
                    &format!(
                        "reading the committed offset of group {group} on topic {} partition {}",
                        e.topic(),
                        e.partition()
                    ),
                    &self.opts.bootstrap_servers,
                )
            })?;
            if let Offset::Offset(o) = e.offset() {
                out.insert(TopicPartition::new(e.topic(), e.partition()), o);
            }
        }
        Ok(out)
    }

    /// One ListOffsets round for `tps`: `Offset::Beginning` (earliest), `Offset::End` (latest)
    /// or `Offset::Offset(timestamp)`. Partitions the broker has no offset for are absent.
    fn list_offsets(
        &self,
        tps: &[TopicPartition],
        which: Offset,
        timeout: Duration,
    ) -> Result<BTreeMap<TopicPartition, i64>> {
        let mut tpl = TopicPartitionList::with_capacity(tps.len());
        for tp in tps {
            tpl.add_partition_offset(&tp.topic, tp.partition, which)
                .map_err(|e| KeelError::internal(format!("offset query for {tp}: {}", error_chain(&e))))?;
        }
        let what = match which {
            Offset::Beginning => "looking up the earliest offsets".to_string(),
            Offset::End => "looking up the latest offsets".to_string(),
            Offset::Offset(ts) => format!("looking up the offsets for timestamp {ts}"),
            other => format!("looking up offsets {other:?}"),
        };
        let result = self.consumer.offsets_for_times(tpl, timeout).map_err(|e| {
            to_keel(&e, &format!("{what} of {}", describe_list(tps)), &self.opts.bootstrap_servers)
        })?;
        let mut out = BTreeMap::new();
        for e in result.elements() {
            e.error().map_err(|err| {
                to_keel(
                    &err,
                    &format!("{what} of topic {} partition {}", e.topic(), e.partition()),
                    &self.opts.bootstrap_servers,
                )
            })?;
            if let Offset::Offset(o) = e.offset() {
                if o >= 0 {
                    out.insert(TopicPartition::new(e.topic(), e.partition()), o);
                }
            }
        }
        Ok(out)
    }
}

/// The consumer's configuration: the spec's `properties.*`, what Keel forces (no auto commit,
/// its own offset reset), and Keel's defaults where the spec is silent (statistics, client id,
/// reconnect backoff, the queue bounds of [`crate::options::source_queue_defaults`]).
fn consumer_config(opts: &KafkaSourceOptions, subtask: u32) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in &opts.client_properties {
        config.set(k, v);
    }
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match opts.auto_offset_reset {
                Some(OffsetReset::Earliest) => "earliest",
                Some(OffsetReset::Latest) => "latest",
                None => "error",
            },
        );
    if !opts.client_properties.contains_key("statistics.interval.ms") {
        config.set("statistics.interval.ms", DEFAULT_STATISTICS_INTERVAL_MS);
    }
    if !opts.client_properties.contains_key("client.id") {
        config.set("client.id", format!("keel-source-{subtask}"));
    }
    if !opts.client_properties.contains_key("reconnect.backoff.max.ms") {
        // The Java client's default: back within a second of a broker's return, not ten.
        config.set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX_MS);
    }
    if opts.group_id.is_none() {
        // librdkafka assigns partitions only to a consumer with a group id. This one never
        // joins the group nor commits to it (commit is a no-op without properties.group.id).
        config.set("group.id", NO_GROUP_ID);
    }
    set_defaults(&mut config, &opts.client_properties, &source_queue_defaults(opts.batch_records));
    config
}

/// The thread that commits offsets to the consumer group, one synchronous commit at a time.
/// A synchronous commit waits for the group coordinator, up to `session.timeout.ms` when there
/// is none, which is why it does not run on the poll loop.
struct Committer {
    requests: Option<mpsc::Sender<Vec<(TopicPartition, i64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    fn start(
        consumer: Arc<BaseConsumer<ReaderContext>>,
        subtask: u32,
        group: &str,
        bootstrap: &str,
        metrics: Arc<KafkaSourceMetrics>,
    ) -> Result<Committer> {
        let (tx, rx) = mpsc::channel::<Vec<(TopicPartition, i64)>>();
        let (group, bootstrap) = (group.to_string(), bootstrap.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("kafka-commit-{subtask}"))
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Later requests carry later offsets: merge everything waiting into one commit.
                    let mut offsets: BTreeMap<TopicPartition, i64> = first.into_iter().collect();
                    while let Ok(more) = rx.try_recv() {
                        offsets.extend(more);
                    }
                    commit_now(&consumer, &offsets, subtask, &group, &bootstrap, &metrics);
                }
            })
            .map_err(|e| {
                KeelError::internal(format!("cannot start the offset commit thread: {}", error_chain(&e)))
            })?;
        Ok(Committer { requests: Some(tx), thread: Some(thread) })
    }

    fn request(&self, offsets: Vec<(TopicPartition, i64)>) -> Result<()> {
        self.requests
            .as_ref()
            .and_then(|tx| tx.send(offsets).ok())
            .ok_or_else(|| KeelError::internal("the offset commit thread has stopped"))
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // Closing the channel ends the thread once the commit in flight (if any) returns.
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn commit_now(
    consumer: &BaseConsumer<ReaderContext>,
    offsets: &BTreeMap<TopicPartition, i64>,
    subtask: u32,
    group: &str,
    bootstrap: &str,
    metrics: &KafkaSourceMetrics,
) {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (tp, offset) in offsets {
        if let Err(e) = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset)) {
            tracing::warn!(subtask, partition = %tp, error = %error_chain(&e), "offset not committable");
        }
    }
    let failed = match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => None,
        Err(e) => Some(error_chain(&e)),
    };
    match failed {
        None => {
            metrics.commits_succeeded.fetch_add(1, Ordering::Relaxed);
            for (tp, offset) in offsets {
                metrics.set_committed(tp, *offset);
            }
            tracing::debug!(subtask, group, partitions = offsets.len(), "offsets committed");
        }
        Some(error) => {
            metrics.commits_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(subtask, group, bootstrap, %error,
                "committing offsets to the consumer group failed (the checkpoint is unaffected)");
        }
    }
}

/// The partitions a subscription covers in one metadata snapshot.
struct Listing {
    partitions: Vec<TopicPartition>,
    /// Listed topics the cluster does not have.
    missing_topics: Vec<String>,
    /// Listed partitions the cluster does not have.
    missing_partitions: Vec<TopicPartition>,
    /// Partition count of each topic read whole.
    whole_topic_sizes: BTreeMap<String, usize>,
}

fn list_partitions(subscription: &Subscription, metadata: &Metadata) -> Listing {
    let mut listing = Listing {
        partitions: Vec::new(),
        missing_topics: Vec::new(),
        missing_partitions: Vec::new(),
        whole_topic_sizes: BTreeMap::new(),
    };
    let present: BTreeMap<&str, BTreeSet<i32>> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name(), t.partitions().iter().map(|p| p.id()).collect()))
        .collect();
    match subscription {
        Subscription::Topics(list) => {
            for sel in list {
                let Some(ids) = present.get(sel.topic.as_str()) else {
                    listing.missing_topics.push(sel.topic.clone());
                    continue;
                };
                match &sel.partitions {
                    None => {
                        listing.whole_topic_sizes.insert(sel.topic.clone(), ids.len());
                        listing
                            .partitions
                            .extend(ids.iter().map(|p| TopicPartition::new(sel.topic.clone(), *p)));
                    }
                    Some(wanted) => {
                        for p in wanted {
                            let tp = TopicPartition::new(sel.topic.clone(), *p);
                            if ids.contains(p) {
                                listing.partitions.push(tp);
                            } else {
                                listing.missing_partitions.push(tp);
                            }
                        }
                    }
                }
            }
        }
        Subscription::Pattern { .. } => {
            for (name, ids) in &present {
                if subscription.matches(name) {
                    listing.whole_topic_sizes.insert(name.to_string(), ids.len());
                    listing.partitions.extend(ids.iter().map(|p| TopicPartition::new(*name, *p)));
                }
            }
        }
    }
    listing
}

fn describe(starts: &BTreeMap<TopicPartition, i64>) -> String {
    if starts.is_empty() {
        return "none".into();
    }
    starts.iter().map(|(tp, o)| format!("{tp}@{o}")).collect::<Vec<_>>().join(" ")
}

fn describe_list(tps: &[TopicPartition]) -> String {
    tps.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    fn open_reader(bootstrap: &str, topic: &str, timeout_ms: &str) -> KafkaSourceReader {
        let options: BTreeMap<String, String> = [
            ("topic", topic),
            ("properties.bootstrap.servers", bootstrap),
            ("scan.startup.mode", "earliest-offset"),
            ("properties.default.api.timeout.ms", timeout_ms),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let opts = KafkaSourceOptions::from_spec("sources[0]", &options).expect("valid options");
        KafkaSourceReader::open(opts, 0, 1, None, KafkaSourceMetrics::new()).expect("open")
    }

    /// Polls until `n` records arrived (failing on any error) or 20 s passed.
    fn read_n(reader: &mut KafkaSourceReader, n: usize) -> Vec<i64> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            out.extend(reader.poll(100, Duration::from_millis(100)).expect("poll").iter().map(|r| r.offset));
        }
        out
    }

    fn options_with(pairs: &[(&str, &str)]) -> Result<KafkaSourceOptions> {
        let mut options: BTreeMap<String, String> = [
            ("topic", "t"),
            ("properties.bootstrap.servers", "b:9092"),
            ("scan.startup.mode", "earliest-offset"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        options.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        KafkaSourceOptions::from_spec("sources[0]", &options)
    }

    /// What librdkafka's configuration of the consumer says for `key`.
    fn consumer_property(opts: &KafkaSourceOptions, key: &str) -> Result<String> {
        let native = consumer_config(opts, 0)
            .create_native_config()
            .map_err(|e| KeelError::internal(format!("librdkafka refuses the configuration: {e}")))?;
        native.get(key).map_err(|e| KeelError::internal(format!("{key}: {e}")))
    }

    /// The consumer's queue bounds: Keel's, sized from the batch, where the spec is silent;
    /// the spec's where it sets one (`properties.queued.min.messages` and
    /// `properties.fetch.queue.backoff.ms` win), as librdkafka itself reads its configuration.
    /// (librdkafka lowers `fetch.max.bytes` to the queue's byte bound when it creates the
    /// client, unless the spec sets it.)
    #[test]
    fn the_consumer_queue_is_sized_from_the_batch_unless_the_spec_says_otherwise() -> Result<()> {
        let default = options_with(&[])?;
        assert_eq!(consumer_property(&default, "queued.min.messages")?, "2048");
        assert_eq!(consumer_property(&default, "fetch.message.max.bytes")?, "262144");
        assert_eq!(consumer_property(&default, "queued.max.messages.kbytes")?, "8192");
        assert_eq!(consumer_property(&default, "fetch.queue.backoff.ms")?, "2");

        let mut larger = options_with(&[])?;
        larger.batch_records = 4096;
        assert_eq!(consumer_property(&larger, "queued.min.messages")?, "8192");

        let user = options_with(&[
            ("properties.queued.min.messages", "50"),
            ("properties.fetch.queue.backoff.ms", "1000"),
        ])?;
        assert_eq!(consumer_property(&user, "queued.min.messages")?, "50");
        assert_eq!(consumer_property(&user, "fetch.queue.backoff.ms")?, "1000");
        assert_eq!(consumer_property(&user, "queued.max.messages.kbytes")?, "8192", "the others stay Keel's");
        Ok(())
    }

    /// Every broker refusing connections for longer than `properties.default.api.timeout.ms`
    /// makes `poll` fail with `Unavailable` naming the bootstrap servers (librdkafka's mock
    /// cluster, broker set down). Proves an outage does not leave a running source idling
    /// forever.
    #[test]
    fn poll_fails_when_no_broker_answers_for_longer_than_the_timeout() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let bootstrap = mock.bootstrap_servers();
        mock.create_topic("down", 1, 1).expect("topic");
        keel_testkit::produce_numbered_to(&bootstrap, "down", 0, 0..3).expect("produce");
        let mut reader = open_reader(&bootstrap, "down", "1500");
        assert_eq!(read_n(&mut reader, 3), vec![0, 1, 2]);

        mock.broker_down(-1).expect("broker down");
        let started = Instant::now();
        let error = loop {
            match reader.poll(100, Duration::from_millis(100)) {
                Ok(records) => assert!(records.is_empty(), "records from a down broker"),
                Err(e) => break e,
            }
            assert!(started.elapsed() < Duration::from_secs(30), "poll never failed during the outage");
        };
        assert!(matches!(error, KeelError::Unavailable { .. }), "{error:?}");
        let text = error.to_string();
        assert!(text.contains(&bootstrap) && text.contains("default.api.timeout.ms"), "{text}");
        assert!(started.elapsed() >= Duration::from_millis(1500), "failed after {:?}", started.elapsed());
    }

    /// An outage shorter than the timeout is ridden out: `poll` returns nothing and no error
    /// while every broker refuses connections, and once they accept again the same reader
    /// reads what was produced meanwhile (librdkafka's mock cluster).
    #[test]
    fn poll_rides_out_an_outage_shorter_than_the_timeout() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let bootstrap = mock.bootstrap_servers();
        mock.create_topic("blip", 1, 1).expect("topic");
        keel_testkit::produce_numbered_to(&bootstrap, "blip", 0, 0..3).expect("produce");
        let mut reader = open_reader(&bootstrap, "blip", "10000");
        assert_eq!(read_n(&mut reader, 3), vec![0, 1, 2]);

        mock.broker_down(-1).expect("broker down");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(2) {
            let records = reader.poll(100, Duration::from_millis(100)).expect("no error within the timeout");
            assert!(records.is_empty(), "records from a down broker");
        }
        mock.broker_up(-1).expect("broker up");
        keel_testkit::produce_numbered_to(&bootstrap, "blip", 0, 3..5).expect("produce");
        assert_eq!(read_n(&mut reader, 2), vec![3, 4]);
        assert!(reader.consumer.context().all_down_since.lock().is_ok_and(|s| s.is_none()), "outage over");
    }
}
