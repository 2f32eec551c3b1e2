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
//! Sinks receive rows already encoded by the sink's format (`file`/`print`: one CSV line): a
//! [`SinkEdge`] filters, projects and encodes the rows of the sink's source.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_proto::{KeelError, Result};
use keel_spec::SinkConfig;

use keel_formats::{EncodedRecord, RecordEncoder};
use keel_spec::pipeline;

use super::batch::Record as Row;
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

    pub fn write(&mut self, records: &[EncodedRecord]) -> Result<()> {
        match self {
            Sink::Print { prefix, stderr } => {
                let mut text = Vec::with_capacity(records.len() * (prefix.len() + 12));
                for r in records {
                    text.extend_from_slice(prefix.as_bytes());
                    text.extend_from_slice(r.value.as_deref().unwrap_or_default());
                    text.push(b'\n');
                }
                let result = if *stderr {
                    let mut out = std::io::stderr().lock();
                    out.write_all(&text).and_then(|_| out.flush())
                } else {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&text).and_then(|_| out.flush())
                };
                result.map_err(|e| KeelError::internal(format!("print sink: cannot write: {e}")))
            }
            Sink::Blackhole => Ok(()),
            Sink::File(f) => {
                for r in records {
                    f.writer
                        .write_all(r.value.as_deref().unwrap_or_default())
                        .and_then(|_| f.writer.write_all(b"\n"))
                        .map_err(|e| io_error("write", &f.path, e))?;
                }
                f.pending += records.len();
                if f.pending >= FLUSH_RECORDS {
                    f.flush(false)?;
                }
                Ok(())
            }
            Sink::Kafka(k) => {
                for r in records {
                    k.send(r.key.as_deref(), r.value.as_deref(), &headers_of(r), r.timestamp)?;
                }
                Ok(())
            }
            Sink::KafkaExactlyOnce(k) => {
                for r in records {
                    k.send(r.key.as_deref(), r.value.as_deref(), &headers_of(r), r.timestamp)?;
                }
                Ok(())
            }
        }
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

/// What one sink does with the rows of its source.
pub struct SinkEdge {
    filter: Option<keel_formats::Filter>,
    projection: Option<keel_formats::Projection>,
    encoder: RecordEncoder,
}

impl SinkEdge {
    pub fn new(plan: &pipeline::SinkPlan) -> SinkEdge {
        SinkEdge {
            filter: plan.filter.clone(),
            projection: plan.projection.clone(),
            encoder: RecordEncoder::new(&plan.schema, &plan.format),
        }
    }

    /// The rows of `rows` this sink writes, encoded; marks in `written` (one flag per row) the
    /// rows it writes.
    pub fn encode(&self, rows: &[Row], written: &mut [bool]) -> Result<Vec<EncodedRecord>> {
        let mut out = Vec::with_capacity(rows.len());
        for (row, written) in rows.iter().zip(written.iter_mut()) {
            if self.filter.as_ref().is_some_and(|f| !f.matches(row)) {
                continue;
            }
            let encoded = match &self.projection {
                Some(p) => self.encoder.encode(&p.apply(row.clone())),
                None => self.encoder.encode(row),
            };
            out.push(encoded?);
            *written = true;
        }
        Ok(out)
    }
}

/// The record's headers as the Kafka sinks take them; a header without a value is sent with
/// an empty one, as before. Allocates only for a record with headers.
fn headers_of(r: &EncodedRecord) -> Vec<(&str, Option<&[u8]>)> {
    r.headers.iter().map(|(k, v)| (k.as_str(), Some(v.as_deref().unwrap_or_default()))).collect()
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
