//! Sinks. They run on the task's blocking sink thread, never on the async runtime.
//!
//! - `print`: `<identifier>:<subtask>> <value>` (or `<subtask>> <value>`) to stdout or stderr.
//! - `blackhole`: discards.
//! - `file`: appends `<value>\n` to `<path>/part-<subtask>`; a restarted attempt continues the
//!   same file. Flushed at least every [`FLUSH_INTERVAL`] or [`FLUSH_RECORDS`] records, and
//!   flushed and fsynced at every checkpoint barrier and at the end.
//! - `kafka`: a Kafka producer; at every checkpoint barrier (`at-least-once`) everything sent
//!   before is acknowledged by the broker before the checkpoint is acknowledged. With
//!   `exactly-once`, a [`keel_kafka::ExactlyOnceSink`]: pre-commit at the barrier (its state goes
//!   into the checkpoint), commit when the checkpoint completes.
//!
//! A sink receives the columnar batches of its source, filtered and projected by its
//! [`SinkEdge`], and encodes them with the sink's format (`file`/`print`: one CSV line per row)
//! into the edge's reused buffer, only if it writes bytes at all: a blackhole encodes nothing.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_proto::{KeelError, Result};
use keel_spec::SinkConfig;

use arrow_array::{BooleanArray, RecordBatch};
use arrow_select::filter::filter_record_batch;
use keel_formats::{EncodedBatch, RecordEncoder};
use keel_spec::pipeline;

use keel_kafka::{ExactlyOnceSink, ExactlyOnceState, KafkaSinkMetrics, KafkaSinkWriter};

pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
pub const FLUSH_RECORDS: usize = 1000;

pub enum Sink {
    Print { prefix: String, stderr: bool },
    Blackhole,
    File(FileSink),
    Kafka(Box<KafkaSinkWriter>),
    KafkaExactlyOnce(Box<ExactlyOnceSink>),
}

/// How long a checkpoint barrier waits for the broker to acknowledge what was sent.
pub const KAFKA_FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

pub struct FileSink {
    path: PathBuf,
    writer: BufWriter<File>,
    pending: usize,
    last_flush: Instant,
}

fn io_error(what: &str, path: &std::path::Path, e: std::io::Error) -> KeelError {
    KeelError::internal(format!("file sink: cannot {what} {}: {e}", path.display()))
}

impl Sink {
    /// Opens the sink of `subtask` (blocking: creates directories and files).
    pub fn open(name: &str, config: &SinkConfig, subtask: u32) -> Result<Sink> {
        match config {
            SinkConfig::Print(p) => Ok(Sink::Print {
                prefix: match &p.print_identifier {
                    Some(id) => format!("{id}:{subtask}> "),
                    None => format!("{subtask}> "),
                },
                stderr: p.standard_error,
            }),
            SinkConfig::Blackhole => Ok(Sink::Blackhole),
            SinkConfig::File(f) => {
                let dir = PathBuf::from(&f.path);
                std::fs::create_dir_all(&dir).map_err(|e| io_error("create directory", &dir, e))?;
                let path = dir.join(format!("part-{subtask}"));
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| io_error("open", &path, e))?;
                Ok(Sink::File(FileSink {
                    path,
                    writer: BufWriter::with_capacity(64 * 1024, file),
                    pending: 0,
                    last_flush: Instant::now(),
                }))
            }
            SinkConfig::Kafka(_) => Err(KeelError::internal(format!(
                "sink '{name}': a kafka sink is opened with Sink::open_kafka"
            ))),
        }
    }

    /// Opens a Kafka sink (blocking: connects and reads the topic's metadata).
    pub fn open_kafka(
        opts: keel_kafka::KafkaSinkOptions,
        subtask: u32,
        parallelism: u32,
        metrics: std::sync::Arc<KafkaSinkMetrics>,
    ) -> Result<Sink> {
        Ok(Sink::Kafka(Box::new(KafkaSinkWriter::open(opts, subtask, parallelism, metrics)?)))
    }

    /// Opens an exactly-once Kafka sink (blocking: connects, fences earlier producers of its
    /// transactional id, and finishes the transactions of `restore` that did not commit).
    pub fn open_kafka_exactly_once(
        opts: keel_kafka::KafkaSinkOptions,
        subtask: u32,
        parallelism: u32,
        metrics: std::sync::Arc<KafkaSinkMetrics>,
        spool_dir: PathBuf,
        attempt: u32,
        restore: Option<&ExactlyOnceState>,
    ) -> Result<Sink> {
        Ok(Sink::KafkaExactlyOnce(Box::new(ExactlyOnceSink::open(
            opts,
            subtask,
            parallelism,
            metrics,
            spool_dir,
            attempt,
            restore,
        )?)))
    }

    /// Writes the rows of `batch` (already filtered and projected by `edge`), encoding them
    /// with `edge`'s encoder only if this sink writes bytes; returns the key and value bytes
    /// written.
    pub fn write(&mut self, batch: &RecordBatch, edge: &mut SinkEdge) -> Result<usize> {
        if matches!(self, Sink::Blackhole) || batch.num_rows() == 0 {
            return Ok(0);
        }
        edge.encoder.encode_batch(batch, &mut edge.encoded)?;
        let encoded = &edge.encoded;
        match self {
            Sink::Blackhole => {}
            Sink::Print { prefix, stderr } => {
                let text = &mut edge.text;
                text.clear();
                for i in 0..encoded.len() {
                    text.extend_from_slice(prefix.as_bytes());
                    text.extend_from_slice(encoded.value(i).unwrap_or_default());
                    text.push(b'\n');
                }
                let result = if *stderr {
                    let mut out = std::io::stderr().lock();
                    out.write_all(text).and_then(|_| out.flush())
                } else {
                    let mut out = std::io::stdout().lock();
                    out.write_all(text).and_then(|_| out.flush())
                };
                result.map_err(|e| KeelError::internal(format!("print sink: cannot write: {e}")))?;
            }
            Sink::File(f) => {
                for i in 0..encoded.len() {
                    f.writer
                        .write_all(encoded.value(i).unwrap_or_default())
                        .and_then(|_| f.writer.write_all(b"\n"))
                        .map_err(|e| io_error("write", &f.path, e))?;
                }
                f.pending += encoded.len();
                if f.pending >= FLUSH_RECORDS {
                    f.flush(false)?;
                }
            }
            Sink::Kafka(k) => {
                edge.encoder.for_each(batch, encoded, |r| k.send(r.key, r.value, r.headers, r.timestamp))?
            }
            Sink::KafkaExactlyOnce(k) => {
                edge.encoder.for_each(batch, encoded, |r| k.send(r.key, r.value, r.headers, r.timestamp))?
            }
        }
        Ok(encoded.payload_len())
    }

    /// At a checkpoint barrier: makes everything written so far durable (flush and fsync, or
    /// the broker's acknowledgements); an exactly-once sink pre-commits and returns its state
    /// (which the chain puts into the task's snapshot).
    pub fn checkpoint(&mut self, checkpoint_id: u64) -> Result<Option<ExactlyOnceState>> {
        match self {
            Sink::KafkaExactlyOnce(k) => Ok(Some(k.pre_commit(checkpoint_id)?)),
            _ => {
                self.flush(true)?;
                Ok(None)
            }
        }
    }

    /// Checkpoint `checkpoint_id` is complete: an exactly-once sink commits what it covers.
    pub fn notify_complete(&mut self, checkpoint_id: u64) -> Result<()> {
        match self {
            Sink::KafkaExactlyOnce(k) => k.notify_complete(checkpoint_id),
            _ => Ok(()),
        }
    }

    /// The end of the input (after a durable flush): an exactly-once sink commits everything.
    pub fn finish(&mut self) -> Result<()> {
        match self {
            Sink::KafkaExactlyOnce(k) => k.finish(),
            _ => Ok(()),
        }
    }

    /// The chain stops without reaching the end: an exactly-once sink aborts its open
    /// transaction (its records stay spooled for a restore).
    pub fn abort(&mut self) {
        if let Sink::KafkaExactlyOnce(k) = self {
            k.abort();
        }
    }

    /// Flushes when the flush interval has passed since the last flush.
    pub fn flush_if_due(&mut self, now: Instant) -> Result<()> {
        if let Sink::File(f) = self {
            if f.pending > 0 && now.duration_since(f.last_flush) >= FLUSH_INTERVAL {
                f.flush(false)?;
            }
        }
        Ok(())
    }

    /// When this sink next needs a timed flush, if it has buffered data.
    pub fn flush_deadline(&self) -> Option<Instant> {
        match self {
            Sink::File(f) if f.pending > 0 => Some(f.last_flush + FLUSH_INTERVAL),
            _ => None,
        }
    }

    /// Flushes everything written so far; `durable` also fsyncs it (checkpoints, the end).
    pub fn flush(&mut self, durable: bool) -> Result<()> {
        match self {
            Sink::File(f) => f.flush(durable),
            // A durable flush is a checkpoint barrier or the end: wait for the broker's acks.
            Sink::Kafka(k) if durable => k.flush(KAFKA_FLUSH_TIMEOUT),
            _ => Ok(()),
        }
    }
}

/// What one sink does with the rows of its source: a filter, a projection and an encoder, with
/// the buffers they reuse from one batch to the next.
pub struct SinkEdge {
    filter: Option<keel_formats::Filter>,
    projection: Option<keel_formats::Projection>,
    encoder: RecordEncoder,
    encoded: EncodedBatch,
    /// Print sinks: the text of one batch.
    text: Vec<u8>,
}

/// The rows of a batch one sink writes.
pub struct Selected {
    /// Filtered and projected.
    pub rows: RecordBatch,
    /// Which input rows they are (`None`: all of them).
    pub mask: Option<BooleanArray>,
}

impl SinkEdge {
    pub fn new(plan: &pipeline::SinkPlan) -> SinkEdge {
        SinkEdge {
            filter: plan.filter.clone(),
            projection: plan.projection.clone(),
            encoder: RecordEncoder::new(&plan.schema, &plan.format),
            encoded: EncodedBatch::new(),
            text: Vec::new(),
        }
    }

    /// The rows of `batch` this sink writes: the filter's kernels pick them, the projection
    /// selects their columns (shared with `batch`, not copied).
    pub fn select(&self, batch: &RecordBatch) -> Result<Selected> {
        let (rows, mask) = match &self.filter {
            None => (batch.clone(), None),
            Some(f) => {
                let mask = f.evaluate(batch)?;
                let rows = if mask.true_count() == batch.num_rows() {
                    batch.clone()
                } else {
                    filter_record_batch(batch, &mask)
                        .map_err(|e| KeelError::internal(format!("filter: {e}")))?
                };
                (rows, Some(mask))
            }
        };
        let rows = match &self.projection {
            Some(p) => p.apply_batch(&rows)?,
            None => rows,
        };
        Ok(Selected { rows, mask })
    }
}

impl FileSink {
    fn flush(&mut self, durable: bool) -> Result<()> {
        self.writer.flush().map_err(|e| io_error("flush", &self.path, e))?;
        if durable {
            self.writer.get_ref().sync_data().map_err(|e| io_error("fsync", &self.path, e))?;
        }
        self.pending = 0;
        self.last_flush = Instant::now();
        Ok(())
    }
}
