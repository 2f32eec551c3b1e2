//! A Kafka source on its own thread.
//!
//! librdkafka's consumer is blocking, so each Kafka source of a subtask runs a reader thread
//! that polls, decodes messages with the source's format straight into a columnar batch and hands batches to the
//! async source driver through a bounded channel (backpressure: a full channel stops polling).
//! Every batch carries the reader's position right after its records; the driver keeps the
//! position of the last batch it forwarded, and that is what a checkpoint barrier snapshots:
//! exactly the records before the barrier are behind it. Offsets are committed to the
//! consumer group only when the driver asks, after a checkpoint completed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_formats::{KafkaMessage, RecordDecoder, RecordFormat, Schema, TimestampType};
use keel_kafka::{KafkaSourceOptions, KafkaSourceReader, SourcePosition};
use keel_proto::{KeelError, Result};
use tokio::sync::mpsc;

use super::batch::{Batch, BatchHeader};
use super::metrics::{KafkaSourceProbe, TopicSizes};

/// Records read per poll.
const POLL_BATCH: usize = 1024;
/// How long one poll waits for records.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

enum Command {
    Commit(SourcePosition),
}

/// The driver's handle on a reader thread.
pub struct KafkaSource {
    /// The position of the last batch forwarded downstream (at open: where reading starts).
    pub position: SourcePosition,
    commands: std::sync::mpsc::Sender<Command>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KafkaSource {
    /// Opens the reader (blocking: connects, resolves start offsets) and starts its thread,
    /// which sends its batches, or its fatal error, to `out`, and keeps `probe` current.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        index: usize,
        name: &str,
        opts: KafkaSourceOptions,
        schema: &Schema,
        format: &RecordFormat,
        subtask: u32,
        parallelism: u32,
        restored: Option<SourcePosition>,
        probe: KafkaSourceProbe,
        out: mpsc::Sender<Result<Batch>>,
    ) -> Result<KafkaSource> {
        let reader = KafkaSourceReader::open(opts, subtask, parallelism, restored, probe.metrics)?;
        publish_topic_sizes(&reader, &probe.topic_sizes);
        let position = reader.position();
        let decoder = RecordDecoder::new(schema, format);
        let (commands, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name(format!("kafka-{name}-{subtask}"))
            .spawn(move || {
                span.in_scope(|| read_loop(index, reader, decoder, rx, out, &probe.topic_sizes, &thread_stop))
            })
            .map_err(|e| KeelError::internal(format!("cannot start the kafka reader thread: {e}")))?;
        Ok(KafkaSource { position, commands, stop, thread: Some(thread) })
    }

    /// Commits `position` to the consumer group (after the checkpoint holding it completed).
    pub fn commit(&self, position: SourcePosition) {
        let _ = self.commands.send(Command::Commit(position));
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // The thread notices `stop` within one poll timeout; do not block the runtime on it.
            std::thread::spawn(move || {
                let _ = t.join();
            });
        }
    }
}

/// Copies the reader's topic sizes to `sizes` when they changed (after open and discovery).
fn publish_topic_sizes(reader: &KafkaSourceReader, sizes: &TopicSizes) {
    let mut shared = sizes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if *shared != *reader.topic_sizes() {
        shared.clone_from(reader.topic_sizes());
    }
}

fn read_loop(
    index: usize,
    mut reader: KafkaSourceReader,
    mut decoder: RecordDecoder,
    commands: std::sync::mpsc::Receiver<Command>,
    out: mpsc::Sender<Result<Batch>>,
    topic_sizes: &TopicSizes,
    stop: &AtomicBool,
) {
    let needs_headers = decoder.needs_headers();
    let mut builder = decoder.builder(POLL_BATCH);
    // The headers of one message, for a schema with a `headers` column: one vector whose
    // allocation is reused from message to message.
    let mut spare_headers: Vec<(&str, Option<&[u8]>)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        commit_requested(&mut reader, &commands);
        match reader.discover_if_due(Instant::now()) {
            Ok(new) if !new.is_empty() => {
                tracing::info!(
                    partitions = new.len(),
                    "discovered new partitions; reading them from the earliest offset"
                )
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "partition discovery failed"),
        }
        let mut bytes = 0u64;
        let malformed_before = decoder.skipped_malformed();
        // Each message is decoded where the client holds it, straight into the builder.
        let polled = reader.poll_each(POLL_BATCH, POLL_TIMEOUT, |m| {
            bytes += (m.key.map_or(0, <[u8]>::len) + m.value.map_or(0, <[u8]>::len)) as u64;
            let mut headers = recycle(std::mem::take(&mut spare_headers));
            if needs_headers {
                headers.extend(m.headers());
            }
            let msg = KafkaMessage {
                topic: m.topic,
                partition: m.partition,
                offset: m.offset,
                timestamp: m.timestamp_ms,
                timestamp_type: match m.timestamp_type {
                    keel_kafka::TimestampType::NotAvailable => TimestampType::NoTimestampType,
                    keel_kafka::TimestampType::CreateTime => TimestampType::CreateTime,
                    keel_kafka::TimestampType::LogAppendTime => TimestampType::LogAppendTime,
                },
                leader_epoch: m.leader_epoch,
                headers: &headers,
                key: m.key,
                value: m.value,
            };
            let decoded = decoder.decode_into(&msg, &mut builder);
            spare_headers = recycle(headers);
            decoded.map(|_| ()).map_err(KeelError::from)
        });
        let polled = match polled {
            Ok(n) => n,
            Err(e) => {
                let _ = out.blocking_send(Err(e));
                return;
            }
        };
        // Discovery runs in `discover_if_due` and in `poll_each`.
        publish_topic_sizes(&reader, topic_sizes);
        if polled == 0 {
            continue;
        }
        let malformed = decoder.skipped_malformed().saturating_sub(malformed_before);
        let header = BatchHeader { source: index, bytes, malformed, position: Some(reader.position()) };
        let batch = Batch { header, records: builder.finish() };
        if out.blocking_send(Ok(batch)).is_err() {
            break;
        }
    }
    // The driver is gone (or stopping). A drained task asks for the commit of its drain
    // savepoint's offsets and ends right after: that request must not be dropped with it (the
    // loop above may be past its last check of the commands, or blocked on a full channel that
    // the drained driver no longer reads).
    commit_requested(&mut reader, &commands);
}

/// Commits to the consumer group every position the driver asked for (after the checkpoints
/// holding them completed).
fn commit_requested(reader: &mut KafkaSourceReader, commands: &std::sync::mpsc::Receiver<Command>) {
    while let Ok(Command::Commit(position)) = commands.try_recv() {
        if let Err(error) = reader.commit(&position) {
            tracing::warn!(%error, "committing offsets to the consumer group failed");
        }
    }
}

/// The same (emptied) vector, for borrows of another lifetime: its allocation is reused, as an
/// in-place collect of an empty vector keeps it.
fn recycle<'b>(mut v: Vec<(&str, Option<&[u8]>)>) -> Vec<(&'b str, Option<&'b [u8]>)> {
    v.clear();
    v.into_iter().map(|_| ("", None)).collect()
}
