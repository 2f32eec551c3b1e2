//! [`KafkaSinkWriter`]: writes one subtask's records to the sink topic.
//!
//! A librdkafka producer whose delivery reports are served on the caller's thread (in `send`
//! and `flush`): each report counts an acknowledgement or remembers the first delivery error.
//! A full producer queue is backpressure: `send` serves reports until there is room.
//!
//! Delivery guarantees:
//! - `at-least-once`: [`KafkaSinkWriter::flush`] (what a checkpoint barrier calls) returns only
//!   when everything sent before is acknowledged, or fails with the first delivery error, naming
//!   topic and partition. After a delivery error every `send` fails too, so the task fails and
//!   restarts from the last checkpoint: nothing acknowledged by a checkpoint is lost.
//! - `none`: `flush` does not wait; delivery errors are logged and counted only.
//! - `exactly-once`: [`crate::ExactlyOnceSink`] drives a transactional writer (opened with
//!   [`KafkaSinkWriter::open_transactional`]): `flush` waits for acknowledgements as with
//!   `at-least-once`, and the transactions are committed when checkpoints complete.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_proto::{error_chain, KeelError, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig};
use rdkafka::types::RDKafkaErrorCode;

use crate::client::{log, to_keel};
use crate::metrics::KafkaSinkMetrics;
use crate::options::{
    set_defaults, sink_queue_defaults, DeliveryGuarantee, KafkaSinkOptions, SinkPartitioner,
};

/// How long `send` pauses between two attempts while the producer queue is full; after each
/// pause it serves the delivery reports that arrived (they free room) and tries again. Not a
/// blocking `poll` with a timeout: rdkafka's returns only when its whole time has passed and
/// spins (librdkafka's waits have millisecond steps, rdkafka rounds the last one down to 0),
/// which cost a core and starved librdkafka's own threads, and the queue is bounded
/// ([`crate::options::sink_queue_defaults`]), so it fills under load and must be refilled at
/// once when there is room.
const QUEUE_FULL_PAUSE: Duration = Duration::from_micros(200);
/// `send` serves delivery reports (a `poll` without waiting) once every this many records
/// rather than after each: a report frees its record's memory in librdkafka and counts it
/// acknowledged, neither needs to happen per record, and a poll costs a lock round of the
/// client's queue. `flush` and a full queue serve them all.
const SENDS_PER_POLL: u32 = 64;
/// `currentSendTime` is measured on one record in this many (the first one included).
const SEND_TIME_EVERY: u64 = 64;
/// `transaction.timeout.ms` of exactly-once sinks unless the spec sets it: 15 min, the default
/// `transaction.max.timeout.ms` of Kafka brokers.
const DEFAULT_TRANSACTION_TIMEOUT_MS: &str = "900000";
/// How long `flush` pauses between two checks whether everything is acknowledged (see
/// [`KafkaSinkWriter::flush_acknowledged`]).
const FLUSH_PAUSE: Duration = Duration::from_micros(200);
/// Delivery report events `flush` serves per check at most (each holds a batch of reports).
const FLUSH_EVENTS_PER_CHECK: usize = 16;
/// How often `flush` refreshes the partition count (for `fixed` and `round-robin`) at most.
const PARTITION_REFRESH: Duration = Duration::from_secs(30);

/// librdkafka's callbacks: logs, errors, delivery reports.
pub(crate) struct WriterContext {
    subtask: u32,
    topic: String,
    bootstrap: String,
    metrics: Arc<KafkaSinkMetrics>,
    /// Base of the send timestamps carried as a timed record's delivery opaque (µs since it,
    /// plus 1; 0 marks a record that is not timed, see [`SEND_TIME_EVERY`]).
    started: Instant,
    first_error: Mutex<Option<String>>,
    /// Set once `first_error` is: `send` checks this, not the lock, per record.
    failed: AtomicBool,
}

impl ClientContext for WriterContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log("sink", self.subtask, level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(subtask = self.subtask, bootstrap = %self.bootstrap, error = %error_chain(&error), %reason,
            "kafka producer error, the client retries");
    }
}

impl ProducerContext for WriterContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_at: usize) {
        match result {
            Ok(_) => {
                self.metrics.records_acked.fetch_add(1, Ordering::Relaxed);
                if let Some(sent_at_us) = sent_at.checked_sub(1) {
                    let now = self.started.elapsed().as_micros();
                    let took = now.saturating_sub(u128::try_from(sent_at_us).unwrap_or(0));
                    self.metrics
                        .send_time_us
                        .store(i64::try_from(took).unwrap_or(i64::MAX), Ordering::Relaxed);
                }
            }
            Err((e, m))
                if matches!(
                    e.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                ) =>
            {
                // Discarded on purpose (an aborted transaction): not a delivery failure.
                tracing::trace!(subtask = self.subtask, topic = %self.topic, partition = m.partition(),
                    "unacknowledged record discarded");
            }
            Err((e, m)) => {
                let n = self.metrics.delivery_errors.fetch_add(1, Ordering::Relaxed);
                let reason = format!(
                    "delivery to topic {} partition {} failed (bootstrap servers {}): {}",
                    self.topic,
                    m.partition(),
                    self.bootstrap,
                    error_chain(e)
                );
                if n == 0 {
                    tracing::warn!(subtask = self.subtask, topic = %self.topic, partition = m.partition(), error = %error_chain(e),
                        "kafka delivery failed");
                } else {
                    tracing::debug!(subtask = self.subtask, topic = %self.topic, partition = m.partition(), error = %error_chain(e),
                        "kafka delivery failed");
                }
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert(reason);
                }
                self.failed.store(true, Ordering::Release);
            }
        }
    }
}

/// Writes records of subtask `subtask` of `parallelism` to the sink topic. See the module doc.
pub struct KafkaSinkWriter {
    /// Shared only with a thread running a transactional call ([`crate::ExactlyOnceSink`]),
    /// which may outlive a wait for it.
    producer: Arc<BaseProducer<WriterContext>>,
    opts: KafkaSinkOptions,
    subtask: u32,
    metrics: Arc<KafkaSinkMetrics>,
    /// Partition count of the topic (0 = unknown, only with the default partitioner).
    partitions: i32,
    partitions_checked: Instant,
    /// The next partition of `round-robin`.
    next_partition: i32,
    /// Records sent since delivery reports were last served ([`SENDS_PER_POLL`]).
    unpolled_sends: u32,
    /// Records sent (for [`SEND_TIME_EVERY`]).
    sent: u64,
}

impl KafkaSinkWriter {
    /// Connects and reads the topic's partition count. Blocks for at most the request timeout
    /// (`properties.max.block.ms`); an unreachable cluster is `KeelError::Unavailable` naming the
    /// bootstrap servers. `exactly-once` sinks are opened by [`crate::ExactlyOnceSink::open`]
    /// instead (`FailedPrecondition` here).
    pub fn open(
        opts: KafkaSinkOptions,
        subtask: u32,
        parallelism: u32,
        metrics: Arc<KafkaSinkMetrics>,
    ) -> Result<KafkaSinkWriter> {
        if let DeliveryGuarantee::ExactlyOnce { .. } = opts.delivery_guarantee {
            return Err(KeelError::internal(format!(
                "{}: an exactly-once sink is opened with ExactlyOnceSink::open",
                opts.field_prefix
            )));
        }
        Self::open_with(opts, subtask, parallelism, metrics, None)
    }

    /// A writer whose producer has `transactional.id` = `transactional_id` (transactions are
    /// initialised and driven by the caller, [`crate::ExactlyOnceSink`]).
    pub(crate) fn open_transactional(
        opts: KafkaSinkOptions,
        subtask: u32,
        parallelism: u32,
        metrics: Arc<KafkaSinkMetrics>,
        transactional_id: &str,
    ) -> Result<KafkaSinkWriter> {
        Self::open_with(opts, subtask, parallelism, metrics, Some(transactional_id))
    }

    fn open_with(
        opts: KafkaSinkOptions,
        subtask: u32,
        parallelism: u32,
        metrics: Arc<KafkaSinkMetrics>,
        transactional_id: Option<&str>,
    ) -> Result<KafkaSinkWriter> {
        if parallelism == 0 || subtask >= parallelism {
            return Err(KeelError::InvalidArgument {
                reason: format!("subtask {subtask} is not within parallelism {parallelism}"),
            });
        }
        let config = producer_config(&opts, subtask, transactional_id);
        let context = WriterContext {
            subtask,
            topic: opts.topic.clone(),
            bootstrap: opts.bootstrap_servers.clone(),
            metrics: metrics.clone(),
            started: Instant::now(),
            first_error: Mutex::new(None),
            failed: AtomicBool::new(false),
        };
        let producer: BaseProducer<WriterContext> = config.create_with_context(context).map_err(|e| {
            KeelError::invalid_spec(
                format!("{}.properties", opts.field_prefix),
                format!("the Kafka client refuses the configuration: {}", error_chain(&e)),
            )
        })?;
        let mut writer = KafkaSinkWriter {
            producer: Arc::new(producer),
            subtask,
            metrics,
            partitions: 0,
            partitions_checked: Instant::now(),
            next_partition: 0,
            unpolled_sends: 0,
            sent: 0,
            opts,
        };
        let count = writer.partition_count(writer.opts.request_timeout)?;
        if count == 0 {
            if writer.opts.partitioner == SinkPartitioner::Default {
                tracing::warn!(subtask, topic = %writer.opts.topic, "the sink topic does not exist (yet); writing anyway");
            } else {
                return Err(KeelError::precondition(format!(
                    "sink topic {} does not exist on {} ({}.topic); sink.partitioner {} needs its partitions",
                    writer.opts.topic,
                    writer.opts.bootstrap_servers,
                    writer.opts.field_prefix,
                    match writer.opts.partitioner {
                        SinkPartitioner::Fixed => "fixed",
                        _ => "round-robin",
                    }
                )));
            }
        }
        writer.partitions = count;
        let parallel = i32::try_from(subtask).unwrap_or(0);
        writer.next_partition = if count > 0 { parallel % count } else { 0 };
        tracing::info!(
            subtask,
            parallelism,
            topic = %writer.opts.topic,
            partitions = count,
            bootstrap = %writer.opts.bootstrap_servers,
            delivery_guarantee = writer.opts.delivery_guarantee.name(),
            "kafka sink opened"
        );
        Ok(writer)
    }

    /// The topic's partition count from fresh metadata (0 when the topic does not exist).
    fn partition_count(&self, timeout: Duration) -> Result<i32> {
        let metadata =
            self.producer.client().fetch_metadata(Some(&self.opts.topic), timeout).map_err(|e| {
                KeelError::unavailable(
                    &self.opts.bootstrap_servers,
                    format!(
                        "no Kafka broker answered a metadata request for topic {} within {timeout:?} \
                     (properties.max.block.ms): {}",
                        self.opts.topic,
                        error_chain(&e)
                    ),
                )
            })?;
        let count = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.opts.topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        Ok(i32::try_from(count).unwrap_or(i32::MAX))
    }

    fn first_error(&self) -> Option<String> {
        self.producer.context().first_error.lock().ok().and_then(|e| e.clone())
    }

    fn check_delivery(&self) -> Result<()> {
        if self.opts.delivery_guarantee == DeliveryGuarantee::None
            || !self.producer.context().failed.load(Ordering::Acquire)
        {
            return Ok(());
        }
        match self.first_error() {
            None => Ok(()),
            Some(reason) => Err(KeelError::unavailable(&self.opts.bootstrap_servers, reason)),
        }
    }

    /// Hands one record to the producer. Blocks (serving delivery reports) while the producer's
    /// queue is full. With `at-least-once`, fails once any earlier delivery has failed.
    ///
    /// `headers` are (name, value) in order; a header without a value has `None`. Nothing is
    /// allocated here for a record without headers (librdkafka copies the key and value into a
    /// message of its own; the headers of a record that has some into a header list).
    pub fn send(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        timestamp_ms: Option<i64>,
    ) -> Result<()> {
        self.check_delivery()?;
        let partition = match self.opts.partitioner {
            SinkPartitioner::Default => None,
            _ if self.partitions <= 0 => None,
            SinkPartitioner::Fixed => Some(i32::try_from(self.subtask).unwrap_or(0) % self.partitions),
            SinkPartitioner::RoundRobin => {
                let p = self.next_partition % self.partitions;
                self.next_partition = (p + 1) % self.partitions;
                Some(p)
            }
        };
        // One record in SEND_TIME_EVERY carries its send time (reading the clock for every
        // record, here and in its delivery report, was 1.5 % of a pass-through's CPU).
        let sent_at = if self.sent.is_multiple_of(SEND_TIME_EVERY) {
            let us = self.producer.context().started.elapsed().as_micros();
            usize::try_from(us).unwrap_or(usize::MAX - 1).saturating_add(1)
        } else {
            0
        };
        self.sent = self.sent.wrapping_add(1);
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.opts.topic, sent_at);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(ts) = timestamp_ms {
            record = record.timestamp(ts);
        }
        let mut header_bytes = 0;
        if !headers.is_empty() {
            let mut owned = OwnedHeaders::new_with_capacity(headers.len());
            for (k, v) in headers {
                header_bytes += k.len() + v.map_or(0, <[u8]>::len);
                owned = owned.insert(Header { key: k, value: *v });
            }
            record = record.headers(owned);
        }
        let mut full = false;
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Backpressure: serve the delivery reports (they free room) and try again,
                    // pausing briefly from the second try on.
                    record = back;
                    if full {
                        std::thread::sleep(QUEUE_FULL_PAUSE);
                    }
                    full = true;
                    self.producer.poll(Duration::ZERO);
                    self.unpolled_sends = 0;
                    self.check_delivery()?;
                }
                Err((e, _)) => {
                    return Err(to_keel(
                        &e,
                        &format!("sending a record to topic {} partition {partition:?}", self.opts.topic),
                        &self.opts.bootstrap_servers,
                    ))
                }
            }
        }
        let bytes = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + header_bytes;
        self.metrics.num_records_out.fetch_add(1, Ordering::Relaxed);
        self.metrics.num_bytes_out.fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.unpolled_sends += 1;
        if self.unpolled_sends >= SENDS_PER_POLL {
            self.producer.poll(Duration::ZERO);
            self.unpolled_sends = 0;
        }
        Ok(())
    }

    /// At a checkpoint barrier. `at-least-once`: waits up to `timeout` until every record sent
    /// before is acknowledged; fails with the first delivery error (naming topic and partition)
    /// or when the time runs out. `none`: serves delivery reports and returns at once.
    pub fn flush(&mut self, timeout: Duration) -> Result<()> {
        match self.opts.delivery_guarantee {
            DeliveryGuarantee::None => {
                self.producer.poll(Duration::ZERO);
            }
            DeliveryGuarantee::AtLeastOnce | DeliveryGuarantee::ExactlyOnce { .. } => {
                self.check_delivery()?;
                if let Err(e) = self.flush_acknowledged(timeout) {
                    self.check_delivery()?;
                    return Err(KeelError::unavailable(
                        &self.opts.bootstrap_servers,
                        format!(
                            "{} records to topic {} not acknowledged within {timeout:?}: {}",
                            self.producer.in_flight_count(),
                            self.opts.topic,
                            error_chain(&e)
                        ),
                    ));
                }
                self.check_delivery()?;
            }
        }
        self.refresh_partitions();
        Ok(())
    }

    /// Waits up to `timeout` until every record sent is acknowledged and its delivery report
    /// served (counted by the context's `delivery`).
    ///
    /// Not rust-rdkafka's `BaseProducer::flush`: it serves the delivery reports in
    /// `BaseProducer::poll` slices of 100 ms, and that `poll` returns only when its whole
    /// timeout has passed, not at the first report. So every flush that had anything in flight
    /// took at least 100 ms, however fast the broker acknowledged: the exactly-once sink's
    /// pre-commit at a barrier (an upgrade's drain savepoint waited for it) and the
    /// at-least-once sink's barrier flush. Nor `poll` with a short timeout: it spins through
    /// its last millisecond (rdkafka rounds librdkafka's wait down to 0 ms). Here the reports
    /// that arrived are served without waiting, then the flush pauses for [`FLUSH_PAUSE`]: it
    /// ends at most about that long after the last acknowledgement, and waits without
    /// spinning.
    fn flush_acknowledged(&self, timeout: Duration) -> rdkafka::error::KafkaResult<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // librdkafka's flush without waiting: tells the broker threads to send what they
            // hold now (linger.ms counts as elapsed) and succeeds once no record is left
            // unacknowledged or with its delivery report unserved.
            match self.producer.flush(Duration::ZERO) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {
                    for _ in 0..FLUSH_EVENTS_PER_CHECK {
                        self.producer.poll(Duration::ZERO);
                    }
                    std::thread::sleep(FLUSH_PAUSE);
                }
            }
        }
    }

    /// Picks up partitions added to the topic (for `fixed` and `round-robin`), at most every
    /// [`PARTITION_REFRESH`]. A failed look-up keeps the old count.
    fn refresh_partitions(&mut self) {
        if self.opts.partitioner == SinkPartitioner::Default
            || self.partitions_checked.elapsed() < PARTITION_REFRESH
        {
            return;
        }
        self.partitions_checked = Instant::now();
        match self.partition_count(Duration::from_secs(5)) {
            Ok(n) if n > self.partitions => {
                tracing::info!(subtask = self.subtask, topic = %self.opts.topic, from = self.partitions, to = n,
                    "the sink topic has more partitions now");
                self.partitions = n;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(subtask = self.subtask, error = %e, "sink partition refresh failed"),
        }
    }

    /// Discards the records not acknowledged yet (queued or in flight) and serves their
    /// delivery reports, for up to `timeout`. Before aborting a transaction.
    pub(crate) fn discard_unacknowledged(&self, timeout: Duration) {
        self.producer.purge(PurgeConfig::default().queue().inflight());
        let deadline = Instant::now() + timeout;
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            self.producer.poll(Duration::from_millis(50));
        }
    }

    /// Records handed to the producer and not yet acknowledged (or failed).
    pub fn in_flight(&self) -> usize {
        usize::try_from(self.producer.in_flight_count()).unwrap_or(0)
    }

    pub fn metrics(&self) -> &Arc<KafkaSinkMetrics> {
        &self.metrics
    }

    pub(crate) fn producer(&self) -> &BaseProducer<WriterContext> {
        &self.producer
    }

    /// The producer, for a transactional call on a thread of its own.
    pub(crate) fn shared_producer(&self) -> Arc<BaseProducer<WriterContext>> {
        self.producer.clone()
    }

    pub(crate) fn options(&self) -> &KafkaSinkOptions {
        &self.opts
    }

    /// The number of partitions of the topic found at open (0 when it did not exist).
    pub(crate) fn partitions(&self) -> i32 {
        self.partitions
    }
}

/// The producer's configuration: the spec's `properties.*`, the transactional id of an
/// exactly-once sink, and Keel's defaults where the spec is silent (transaction timeout,
/// partitioner, client id, reconnect backoff, the queue bounds of
/// [`crate::options::sink_queue_defaults`]).
fn producer_config(opts: &KafkaSinkOptions, subtask: u32, transactional_id: Option<&str>) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in &opts.client_properties {
        config.set(k, v);
    }
    if let Some(id) = transactional_id {
        config.set("transactional.id", id);
        if !opts.client_properties.contains_key("transaction.timeout.ms") {
            // A pre-committed transaction waits for its checkpoint to complete; the broker
            // must not abort it meanwhile (Kafka's default broker maximum).
            config.set("transaction.timeout.ms", DEFAULT_TRANSACTION_TIMEOUT_MS);
        }
    }
    if !opts.client_properties.contains_key("partitioner") {
        // The Java client's hash, so that keys land where Flink would put them.
        config.set("partitioner", "murmur2_random");
    }
    if !opts.client_properties.contains_key("client.id") {
        config.set("client.id", format!("keel-sink-{subtask}"));
    }
    if !opts.client_properties.contains_key("reconnect.backoff.max.ms") {
        // As the source: reconnect within 1 s after a broker outage (librdkafka's default
        // backs off up to 10 s).
        config.set("reconnect.backoff.max.ms", crate::source::RECONNECT_BACKOFF_MAX_MS);
    }
    set_defaults(
        &mut config,
        &opts.client_properties,
        &sink_queue_defaults(opts.batch_records, &opts.client_properties),
    );
    config
}

impl Drop for KafkaSinkWriter {
    fn drop(&mut self) {
        let left = self.in_flight();
        if left > 0 {
            tracing::debug!(subtask = self.subtask, topic = %self.opts.topic, records = left,
                "kafka sink closed with unacknowledged records");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn options_with(pairs: &[(&str, &str)]) -> Result<KafkaSinkOptions> {
        let mut options: BTreeMap<String, String> =
            [("topic", "out"), ("properties.bootstrap.servers", "b:9092")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        options.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        KafkaSinkOptions::from_spec("sinks[0]", &options)
    }

    /// What librdkafka's configuration of the producer says for `key`.
    fn producer_property(
        opts: &KafkaSinkOptions,
        transactional_id: Option<&str>,
        key: &str,
    ) -> Result<String> {
        let native = producer_config(opts, 0, transactional_id)
            .create_native_config()
            .map_err(|e| KeelError::internal(format!("librdkafka refuses the configuration: {e}")))?;
        native.get(key).map_err(|e| KeelError::internal(format!("{key}: {e}")))
    }

    /// The producer's queue bounds: Keel's, sized from the batch, where the spec is silent
    /// (also for an exactly-once sink's transactional producer); the spec's where it sets one
    /// (`properties.queue.buffering.max.messages` wins), as librdkafka reads its configuration.
    #[test]
    fn the_producer_queue_is_sized_from_the_batch_unless_the_spec_says_otherwise() -> Result<()> {
        let default = options_with(&[])?;
        assert_eq!(producer_property(&default, None, "queue.buffering.max.messages")?, "8192");
        assert_eq!(producer_property(&default, None, "queue.buffering.max.kbytes")?, "8192");
        assert_eq!(producer_property(&default, Some("p-0"), "queue.buffering.max.messages")?, "8192");

        let mut smaller = options_with(&[])?;
        smaller.batch_records = 256;
        assert_eq!(producer_property(&smaller, None, "queue.buffering.max.messages")?, "2048");

        let user = options_with(&[("properties.queue.buffering.max.messages", "100000")])?;
        assert_eq!(producer_property(&user, None, "queue.buffering.max.messages")?, "100000");
        assert_eq!(
            producer_property(&user, None, "queue.buffering.max.kbytes")?,
            "8192",
            "the other stays Keel's"
        );
        Ok(())
    }
}
