//! [`ExactlyOnceSink`]: the `exactly-once` Kafka sink. Records reach `read_committed` readers
//! only when the checkpoint that covers them has completed, once, even across task failures.
//!
//! One transactional producer per subtask, with the fixed id `<prefix>-<subtask>`: a bounded
//! set of ids (one per subtask) reused by every checkpoint and every restart, never a new id per
//! checkpoint. At most one transaction is open at a time.
//!
//! Records are grouped in *segments*: the records between two checkpoint barriers. Each
//! segment is also appended to a spool file ([`crate::spool`]) under the job's checkpoint
//! directory, and fsynced when the barrier seals it.
//!
//! - **Live**: the open transaction holds the current (unsealed) segment; records are sent as
//!   they come.
//! - **Barrier N** (pre-commit): the producer is flushed (everything acknowledged), the segment
//!   is sealed as segment N, and the checkpoint's state lists the sealed segments that are not
//!   committed yet (id, spool file). The transaction stays open, holding segment N. Records
//!   after the barrier cannot join it (it must hold exactly what checkpoint N covers), so they
//!   are only spooled until it is committed.
//! - **Checkpoint K complete** (notify): the open transaction, if it holds only segments ≤ K,
//!   is committed, and with it (`send_offsets_to_transaction`) the *marker*: the offset of the
//!   marker group `<prefix>-<subtask>` on partition 0 of the sink topic is set to the highest
//!   segment id committed. Commit and marker are one atomic transaction. Spooled segments ≤ K
//!   are then written and committed the same way; a spooled segment above K is written into a
//!   new pre-committed transaction; otherwise the spooled records of the current segment are
//!   sent into a new transaction and the sink is live again.
//! - **Restore from checkpoint N**: opening the producer (`init_transactions`) fences every
//!   earlier producer of the id and aborts its open transaction (a lingering transaction of a
//!   dead attempt). The marker says which segments committed: segments of N's state above the
//!   marker are written again from their spool files in one transaction and committed with the
//!   marker. So a transaction that was pre-committed for a completed checkpoint, and aborted
//!   because its task died before committing it, is replaced by an identical one.
//! - **End of input**: everything is committed. **Cancel**: the open transaction is aborted;
//!   its records stay spooled for a restore.
//! - **A transactional call fails** (begin, adding the marker, commit; a timeout above all):
//!   librdkafka 2.12 has no KIP-890, so a timed-out EndTxn or AddPartitionsToTxn is not
//!   retried on the same producer (the retry can hang on, or race with, the request still in
//!   flight). The failure is fatal for the producer: it is dropped, a new one with the same
//!   transactional id is created, and its `init_transactions` fences the old epoch (the
//!   coordinator completes a commit it had already logged, else aborts). The marker then says
//!   which segments committed; the others are written again from the spool, as on a restore.
//!   A producer that was *fenced* (a newer attempt took its id over) does not do this: it is a
//!   zombie, and its error fails the task.
//!
//! librdkafka cannot resume a transaction another producer opened (Flink's Java sink does this
//! through reflection); the spool is what makes the re-write possible instead.

use std::cell::Cell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_proto::{error_chain, KeelError, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::error::KafkaResult;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::client::to_keel;
use crate::metrics::KafkaSinkMetrics;
use crate::options::{DeliveryGuarantee, KafkaSinkOptions};
use crate::sink::{KafkaSinkWriter, WriterContext};
use crate::spool::{SpoolReader, SpoolWriter};

/// The part of a checkpoint an exactly-once sink needs to finish its transactions after a
/// failure (in `keel-state`, the one home of checkpoint state).
pub use keel_state::kafka::{ExactlyOnceState, SegmentState};

/// What the open transaction holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Txn {
    /// No transaction is open.
    None,
    /// The current (unsealed) segment: records are sent as they come.
    Live,
    /// Sealed segments up to this checkpoint id (pre-committed, awaiting completion).
    Sealed(u64),
}

#[derive(Debug)]
struct Segment {
    checkpoint_id: u64,
    path: PathBuf,
    records: u64,
    /// In the open transaction (else only spooled).
    sent: bool,
}

/// The exactly-once sink of one subtask. See the module doc.
pub struct ExactlyOnceSink {
    writer: KafkaSinkWriter,
    marker: BaseConsumer,
    group: Arc<ConsumerGroupMetadata>,
    transactional_id: String,
    marker_group: String,
    spool_dir: PathBuf,
    tag: String,
    next_file: u64,
    sealed: VecDeque<Segment>,
    current: SpoolWriter,
    txn: Txn,
    /// The highest segment id known committed (the marker).
    committed: Option<u64>,
    timeout: Duration,
    subtask: u32,
    parallelism: u32,
    /// Set when a transactional call failed because the producer was fenced.
    fenced: Cell<bool>,
}

/// How long a recovery (a new producer and its `init_transactions`) may keep trying, in
/// multiples of the sink's request timeout.
const RECOVERY_BUDGET_TIMEOUTS: u32 = 3;
/// How long a cancel may take to discard unacknowledged records, and then to abort.
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause between two recovery attempts.
const RECOVERY_BACKOFF: Duration = Duration::from_millis(500);

/// True when `e` says the producer was fenced: a newer producer of the same transactional id
/// bumped the epoch (the broker's PRODUCER_FENCED or INVALID_PRODUCER_EPOCH, which librdkafka
/// raises as its fatal `_FENCED`).
pub fn is_fenced(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    )
}

/// The transactional id (and marker group) of subtask `subtask` of a sink with `prefix`.
pub fn transactional_id(prefix: &str, subtask: u32) -> String {
    format!("{prefix}-{subtask}")
}

/// How much longer than its own timeout a transactional call is waited for before it is
/// abandoned ([`bounded_call`]): librdkafka answers within the timeout it is given, or not at
/// all.
const BOUND_SLACK: Duration = Duration::from_secs(5);

/// Runs a transactional call on a thread of its own and waits for it up to `wait`. librdkafka
/// usually returns within the timeout it is given, but its transactional calls were seen to
/// block without a deadline: `send_offsets_to_transaction` and `init_transactions` after the
/// broker holding the transaction or group coordinator was killed (librdkafka #5456, #5511),
/// and a commit against a frozen broker for minutes. Past the wait the call is abandoned (its
/// thread holds the old producer until it returns; a recreated producer fences it) and
/// reported as unavailable, which the caller recovers from or fails the task with.
fn bounded_call(
    producer: Arc<BaseProducer<WriterContext>>,
    wait: Duration,
    what: &str,
    opts: &KafkaSinkOptions,
    transactional_id: &str,
    call: impl FnOnce(&BaseProducer<WriterContext>) -> KafkaResult<()> + Send + 'static,
) -> Result<KafkaResult<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name(format!("txn-{transactional_id}")).spawn(move || {
        let _ = tx.send(call(&producer));
    });
    if let Err(e) = spawned {
        return Err(KeelError::internal(format!("cannot start a thread for {what}: {e}")));
    }
    rx.recv_timeout(wait).map_err(|_| {
        KeelError::unavailable(
            &opts.bootstrap_servers,
            format!(
                "{what} (topic {}, transactional id {transactional_id}): no answer within {wait:?}; the call \
                 is abandoned",
                opts.topic
            ),
        )
    })
}

fn txn_error(e: &KafkaError, what: &str, opts: &KafkaSinkOptions, id: &str) -> KeelError {
    if is_fenced(e) {
        return KeelError::precondition(format!(
            "{what} (topic {}, transactional id {id}): fenced: a newer producer of the same \
             transactional id (a newer attempt of this subtask) took over, so this one may write no \
             more ({:?}: {})",
            opts.topic,
            e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fenced),
            error_chain(e)
        ));
    }
    to_keel(e, &format!("{what} (topic {}, transactional id {id})", opts.topic), &opts.bootstrap_servers)
}

/// The marker the last transaction at the end of the input commits with: `top`, the highest
/// segment it finishes, only when that is above the marker already `committed`.
///
/// An upgrade's drain commits the savepoint's transaction (with its marker) on the completion
/// notice, and the end of the input follows at once with an empty transaction: nothing was
/// written after the barrier. Committing that one with the same marker again changed nothing
/// but cost broker round trips (AddOffsetsToTxn, TxnOffsetCommit, EndTxn), and the coordinator
/// answers CONCURRENT_TRANSACTIONS to the first while it still completes the previous commit,
/// which librdkafka retries only after `retry.backoff.ms` (100 ms): the old version finished
/// that much later. Without a marker, and with no records, librdkafka commits the empty
/// transaction locally (no EndTxn). With records and no new marker, the records commit alone:
/// the marker names sealed segments only, and it already says what it would say again.
fn final_marker(top: Option<u64>, committed: Option<u64>) -> Option<u64> {
    top.filter(|t| Some(*t) > committed)
}

impl ExactlyOnceSink {
    /// Opens the sink of `subtask`: connects, fences earlier producers of its transactional id
    /// (aborting what they left open), finishes the transactions of `restore` that did not
    /// commit, and opens a transaction. Spool files go to `spool_dir`. Blocking.
    pub fn open(
        opts: KafkaSinkOptions,
        subtask: u32,
        parallelism: u32,
        metrics: Arc<KafkaSinkMetrics>,
        spool_dir: PathBuf,
        attempt: u32,
        restore: Option<&ExactlyOnceState>,
    ) -> Result<ExactlyOnceSink> {
        let DeliveryGuarantee::ExactlyOnce { transactional_id_prefix } = &opts.delivery_guarantee else {
            return Err(KeelError::internal(format!("{}: not an exactly-once sink", opts.field_prefix)));
        };
        let id = transactional_id(transactional_id_prefix, subtask);
        if let Some(state) = restore {
            if state.transactional_id != id {
                return Err(KeelError::precondition(format!(
                    "{}.sink.transactional-id-prefix: the state to restore was written with transactional \
                     id {}, this sink's is {id}; the prefix of an exactly-once sink cannot change across a \
                     restore",
                    opts.field_prefix, state.transactional_id
                )));
            }
        }
        let timeout = opts.request_timeout.max(Duration::from_secs(10));
        let writer =
            KafkaSinkWriter::open_transactional(opts.clone(), subtask, parallelism, metrics.clone(), &id)?;
        if writer.partitions() == 0 {
            return Err(KeelError::precondition(format!(
                "sink topic {} does not exist on {} ({}.topic); an exactly-once sink needs it to exist",
                opts.topic, opts.bootstrap_servers, opts.field_prefix
            )));
        }
        bounded_call(
            writer.shared_producer(),
            timeout + BOUND_SLACK,
            "initialising transactions",
            &opts,
            &id,
            move |p| p.init_transactions(timeout),
        )?
        .map_err(|e| txn_error(&e, "initialising transactions", &opts, &id))?;

        let mut config = ClientConfig::new();
        for (k, v) in &opts.client_properties {
            config.set(k, v);
        }
        config
            .set("group.id", &id)
            .set("enable.auto.commit", "false")
            .set("client.id", format!("{id}-marker"));
        let marker: BaseConsumer = config.create().map_err(|e| {
            KeelError::invalid_spec(
                format!("{}.properties", opts.field_prefix),
                format!("the Kafka client refuses the configuration: {}", error_chain(&e)),
            )
        })?;
        let group = marker.group_metadata().map(Arc::new).ok_or_else(|| {
            KeelError::internal(format!("no consumer group metadata for the marker group {id}"))
        })?;
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
        let tag = format!("{attempt}-{nanos:x}");
        let current = SpoolWriter::create(spool_dir.join(format!("{tag}-0.spool")))?;
        let mut sink = ExactlyOnceSink {
            writer,
            marker,
            group,
            marker_group: id.clone(),
            transactional_id: id,
            spool_dir,
            tag,
            next_file: 1,
            sealed: VecDeque::new(),
            current,
            txn: Txn::None,
            committed: None,
            timeout,
            subtask,
            parallelism,
            fenced: Cell::new(false),
        };
        sink.committed = sink.read_marker()?;
        if let Some(state) = restore {
            sink.finish_restored(state)?;
        }
        sink.remove_old_spools()?;
        sink.begin()?;
        sink.txn = Txn::Live;
        tracing::info!(subtask, transactional_id = %sink.transactional_id, topic = %sink.opts().topic,
            committed_checkpoint = ?sink.committed, restored_segments = restore.map_or(0, |s| s.segments.len()),
            "exactly-once kafka sink opened");
        Ok(sink)
    }

    fn opts(&self) -> &KafkaSinkOptions {
        self.writer.options()
    }

    fn err(&self, e: &KafkaError, what: &str) -> KeelError {
        if is_fenced(e) {
            self.fenced.set(true);
        }
        txn_error(e, what, self.opts(), &self.transactional_id)
    }

    /// [`bounded_call`] on this sink's producer, its errors classified by [`Self::err`].
    fn bounded(
        &self,
        what: &str,
        call: impl FnOnce(&BaseProducer<WriterContext>) -> KafkaResult<()> + Send + 'static,
    ) -> Result<()> {
        let outcome = bounded_call(
            self.writer.shared_producer(),
            self.timeout + BOUND_SLACK,
            what,
            self.opts(),
            &self.transactional_id,
            call,
        )?;
        outcome.map_err(|e| self.err(&e, what))
    }

    /// Runs `step`; when it fails other than by fencing, recreates the producer
    /// ([`Self::recover`]) and runs it once more.
    fn with_recovery(&mut self, what: &str, step: impl Fn(&mut Self) -> Result<()>) -> Result<()> {
        let Err(cause) = step(self) else {
            return Ok(());
        };
        if self.fenced.get() {
            return Err(cause);
        }
        self.recover(what, &cause)?;
        step(self)
    }

    /// After a failed transactional call: drops the producer, creates a new one with the same
    /// transactional id and lets `init_transactions` fence the old one and finish its
    /// transaction; then reads the marker, drops the segments it covers and marks the others
    /// for writing again. Keeps trying for [`RECOVERY_BUDGET_TIMEOUTS`] request timeouts.
    fn recover(&mut self, what: &str, cause: &KeelError) -> Result<()> {
        let started = Instant::now();
        let metrics = self.writer.metrics().clone();
        metrics.transaction_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(transactional_id = %self.transactional_id, topic = %self.opts().topic, %what,
            error = %cause, "a transactional call failed: recreating the producer (init_transactions fences the old one)");
        let deadline = started + self.timeout * RECOVERY_BUDGET_TIMEOUTS;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.recreate_producer(&metrics) {
                Ok(()) => break,
                Err(e) if !self.fenced.get() && Instant::now() + RECOVERY_BACKOFF < deadline => {
                    tracing::debug!(transactional_id = %self.transactional_id, attempts, error = %e,
                        "recreating the producer failed; trying again");
                    std::thread::sleep(RECOVERY_BACKOFF);
                }
                Err(e) => {
                    return Err(KeelError::unavailable(
                        &self.opts().bootstrap_servers,
                        format!(
                            "{what} failed ({cause}), and recreating the producer of transactional id {} \
                             failed too after {attempts} attempts: {e}",
                            self.transactional_id
                        ),
                    ))
                }
            }
        }
        self.txn = Txn::None;
        self.committed = self.committed.max(self.read_marker()?);
        let committed = self.committed;
        let mut rewrite = 0;
        self.sealed.retain(|s| {
            if Some(s.checkpoint_id) <= committed {
                Self::remove_file(&s.path);
                false
            } else {
                rewrite += 1;
                true
            }
        });
        for s in self.sealed.iter_mut() {
            s.sent = false;
        }
        metrics.producers_recreated.fetch_add(1, Ordering::Relaxed);
        tracing::info!(transactional_id = %self.transactional_id, attempts, committed_checkpoint = ?committed,
            segments_to_rewrite = rewrite, took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "producer recreated");
        Ok(())
    }

    fn recreate_producer(&mut self, metrics: &Arc<KafkaSinkMetrics>) -> Result<()> {
        let writer = KafkaSinkWriter::open_transactional(
            self.opts().clone(),
            self.subtask,
            self.parallelism,
            metrics.clone(),
            &self.transactional_id,
        )?;
        // The old producer goes first: nothing of it may be retried after the new one fenced it.
        drop(std::mem::replace(&mut self.writer, writer));
        let timeout = self.timeout;
        self.bounded("initialising transactions of the recreated producer", move |p| {
            p.init_transactions(timeout)
        })
    }

    /// The marker: the highest checkpoint id whose segment was committed, if any.
    /// The group coordinator may answer NOT_COORDINATOR or COORDINATOR_LOAD_IN_PROGRESS for a
    /// moment (a new group, a broker that just started or moved the coordinator): asked again
    /// until the request timeout.
    fn read_marker(&self) -> Result<Option<u64>> {
        let deadline = Instant::now() + self.timeout;
        let committed = loop {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.opts().topic, 0);
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
            match self.marker.committed_offsets(tpl, left) {
                Ok(c) => break c,
                Err(e)
                    if Instant::now() + RECOVERY_BACKOFF < deadline
                        && matches!(
                            e.rdkafka_error_code(),
                            Some(
                                RDKafkaErrorCode::NotCoordinator
                                    | RDKafkaErrorCode::CoordinatorLoadInProgress
                                    | RDKafkaErrorCode::CoordinatorNotAvailable
                            )
                        ) =>
                {
                    tracing::debug!(marker_group = %self.marker_group, error = %error_chain(&e),
                        "the group coordinator is not ready; asking again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(self.err(
                        &e,
                        &format!("reading the committed checkpoint of marker group {}", self.marker_group),
                    ))
                }
            }
        };
        let offset = committed.elements().first().map(|e| e.offset());
        Ok(match offset {
            Some(Offset::Offset(n)) if n >= 0 => u64::try_from(n).ok(),
            _ => None,
        })
    }

    fn begin(&mut self) -> Result<()> {
        self.writer.producer().begin_transaction().map_err(|e| self.err(&e, "beginning a transaction"))
    }

    /// Flushes, then commits the open transaction together with the marker `marker`.
    fn commit(&mut self, marker: Option<u64>) -> Result<()> {
        self.writer.flush(self.timeout)?;
        if let Some(m) = marker {
            let mut tpl = TopicPartitionList::new();
            let offset = i64::try_from(m).map_err(|_| KeelError::internal(format!("checkpoint id {m}")))?;
            tpl.add_partition_offset(&self.opts().topic, 0, Offset::Offset(offset))
                .map_err(|e| self.err(&e, "building the marker"))?;
            let (group, timeout) = (self.group.clone(), self.timeout);
            self.bounded(&format!("adding the marker of checkpoint {m} to the transaction"), move |p| {
                p.send_offsets_to_transaction(&tpl, &group, timeout)
            })?;
        }
        let timeout = self.timeout;
        self.bounded(&format!("committing the transaction of checkpoint {marker:?}"), move |p| {
            p.commit_transaction(timeout)
        })?;
        self.txn = Txn::None;
        if marker > self.committed {
            self.committed = marker;
        }
        tracing::debug!(transactional_id = %self.transactional_id, checkpoint_id = ?marker, "transaction committed");
        Ok(())
    }

    /// Sends every record of a spool file into the open transaction. Allocates per record
    /// only for a record with headers (the list of them).
    fn send_spooled(&mut self, path: &Path) -> Result<u64> {
        let mut reader = SpoolReader::open(path)?;
        let mut n = 0;
        while let Some(r) = reader.next_record()? {
            if r.header_count() == 0 {
                self.writer.send(r.key, r.value, &[], r.timestamp_ms)?;
            } else {
                let headers: Vec<(&str, Option<&[u8]>)> = r.headers().collect();
                self.writer.send(r.key, r.value, &headers, r.timestamp_ms)?;
            }
            n += 1;
        }
        Ok(n)
    }

    fn remove_file(path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a spool file");
            }
        }
    }

    /// Writes again, in one transaction with the marker, the restored segments that did not
    /// commit (above the marker); then removes their spool files.
    fn finish_restored(&mut self, state: &ExactlyOnceState) -> Result<()> {
        let pending: Vec<&SegmentState> =
            state.segments.iter().filter(|s| Some(s.checkpoint_id) > self.committed).collect();
        if let Some(last) = pending.last().map(|s| s.checkpoint_id) {
            self.begin()?;
            let mut records = 0;
            for s in &pending {
                records += self.send_spooled(Path::new(&s.path)).map_err(|e| {
                    KeelError::precondition(format!(
                        "cannot write again the uncommitted records of checkpoint {} (transactional id {}): {e}",
                        s.checkpoint_id, self.transactional_id
                    ))
                })?;
            }
            self.commit(Some(last))?;
            tracing::info!(transactional_id = %self.transactional_id, segments = pending.len(), records,
                checkpoint_id = last, "restored transactions that had not committed were written and committed");
        }
        for s in &state.segments {
            Self::remove_file(Path::new(&s.path));
        }
        Ok(())
    }

    /// Removes the spool files of earlier attempts (their segments are committed or were
    /// written again by [`Self::finish_restored`]), keeping this attempt's.
    fn remove_old_spools(&self) -> Result<()> {
        let entries = match std::fs::read_dir(&self.spool_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(KeelError::internal(format!(
                    "cannot list the spool directory {}: {e}",
                    self.spool_dir.display()
                )))
            }
        };
        let mine = format!("{}-", self.tag);
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".spool") && !name.starts_with(&mine) {
                Self::remove_file(&entry.path());
            }
        }
        Ok(())
    }

    fn new_spool(&mut self) -> Result<SpoolWriter> {
        let path = self.spool_dir.join(format!("{}-{}.spool", self.tag, self.next_file));
        self.next_file += 1;
        SpoolWriter::create(path)
    }

    /// Writes one record: spooled always (appended to the spool's buffer), and sent at once
    /// while the sink is live. `headers` as [`KafkaSinkWriter::send`] takes them; nothing is
    /// allocated here per record.
    pub fn send(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        timestamp_ms: Option<i64>,
    ) -> Result<()> {
        self.current.append(key, value, headers, timestamp_ms)?;
        if self.txn == Txn::Live {
            self.writer.send(key, value, headers, timestamp_ms)?;
        }
        Ok(())
    }

    /// At the barrier of checkpoint `checkpoint_id`: pre-commits (flushes the open
    /// transaction), seals the current segment, and returns the state to keep in the
    /// checkpoint.
    pub fn pre_commit(&mut self, checkpoint_id: u64) -> Result<ExactlyOnceState> {
        if self.current.records() > 0 {
            let live = self.txn == Txn::Live;
            if live {
                self.writer.flush(self.timeout)?;
            }
            self.current.flush(true)?;
            let next = self.new_spool()?;
            let sealed = std::mem::replace(&mut self.current, next);
            self.sealed.push_back(Segment {
                checkpoint_id,
                path: sealed.path().to_path_buf(),
                records: sealed.records(),
                sent: live,
            });
            if live {
                self.txn = Txn::Sealed(checkpoint_id);
            }
        }
        Ok(self.state())
    }

    fn state(&self) -> ExactlyOnceState {
        ExactlyOnceState {
            transactional_id: self.transactional_id.clone(),
            segments: self
                .sealed
                .iter()
                .map(|s| SegmentState {
                    checkpoint_id: s.checkpoint_id,
                    path: s.path.display().to_string(),
                    records: s.records,
                })
                .collect(),
        }
    }

    /// Checkpoint `checkpoint_id` is complete: commits what it covers, then goes on writing. A
    /// failed transactional call (not fencing) recreates the producer and tries once more.
    pub fn notify_complete(&mut self, checkpoint_id: u64) -> Result<()> {
        self.with_recovery(&format!("committing checkpoint {checkpoint_id}"), |sink| {
            sink.try_notify_complete(checkpoint_id)
        })
    }

    fn try_notify_complete(&mut self, checkpoint_id: u64) -> Result<()> {
        if let Txn::Sealed(top) = self.txn {
            if top > checkpoint_id {
                return Ok(());
            }
            self.commit(Some(top))?;
            self.drop_sent();
        }
        if self.txn == Txn::None {
            self.resume(checkpoint_id)?;
        }
        Ok(())
    }

    /// Removes the segments that were in the transaction just committed.
    fn drop_sent(&mut self) {
        while self.sealed.front().is_some_and(|s| s.sent) {
            if let Some(s) = self.sealed.pop_front() {
                Self::remove_file(&s.path);
            }
        }
    }

    /// With no transaction open: commits the spooled segments `completed` covers, then opens
    /// the next transaction (pre-committed for the remaining sealed segments, or live).
    fn resume(&mut self, completed: u64) -> Result<()> {
        let ready = self.sealed.iter().take_while(|s| s.checkpoint_id <= completed).count();
        if ready > 0 {
            self.begin()?;
            let paths: Vec<PathBuf> = self.sealed.iter().take(ready).map(|s| s.path.clone()).collect();
            for p in &paths {
                self.send_spooled(p)?;
            }
            let top = self.sealed.get(ready - 1).map(|s| s.checkpoint_id);
            for s in self.sealed.iter_mut().take(ready) {
                s.sent = true;
            }
            self.commit(top)?;
            self.drop_sent();
        }
        self.begin()?;
        if self.sealed.is_empty() {
            self.current.flush(false)?;
            let path = self.current.path().to_path_buf();
            self.send_spooled(&path)?;
            self.txn = Txn::Live;
        } else {
            let paths: Vec<PathBuf> = self.sealed.iter().map(|s| s.path.clone()).collect();
            for p in &paths {
                self.send_spooled(p)?;
            }
            for s in self.sealed.iter_mut() {
                s.sent = true;
            }
            self.txn = Txn::Sealed(self.sealed.back().map_or(0, |s| s.checkpoint_id));
        }
        Ok(())
    }

    /// The end of the input: commits everything written, then removes the spool files. A failed
    /// transactional call (not fencing) recreates the producer and tries once more.
    pub fn finish(&mut self) -> Result<()> {
        self.with_recovery("committing at the end of the input", Self::try_finish)
    }

    fn try_finish(&mut self) -> Result<()> {
        let top = self.sealed.back().map(|s| s.checkpoint_id).or(self.committed);
        if let Txn::Sealed(t) = self.txn {
            self.commit(Some(t))?;
            self.drop_sent();
        }
        if self.txn == Txn::None {
            // The rest (spooled segments and the current one) go in one last transaction.
            self.begin()?;
            let paths: Vec<PathBuf> = self.sealed.iter().map(|s| s.path.clone()).collect();
            for p in &paths {
                self.send_spooled(p)?;
            }
            self.current.flush(false)?;
            let path = self.current.path().to_path_buf();
            self.send_spooled(&path)?;
        }
        self.commit(final_marker(top, self.committed))?;
        for s in self.sealed.drain(..) {
            Self::remove_file(&s.path);
        }
        Self::remove_file(self.current.path());
        tracing::info!(transactional_id = %self.transactional_id, "exactly-once sink finished: everything committed");
        Ok(())
    }

    /// Stops without committing (cancel, failure): aborts the open transaction. The spool files
    /// stay for a restore.
    pub fn abort(&mut self) {
        if self.txn != Txn::None {
            let started = Instant::now();
            // librdkafka's abort purges the records not acknowledged yet and waits for their
            // delivery reports, which only a poll of this client serves: without this the abort
            // failed after its timeout, and the transaction blocked read_committed readers until
            // transaction.timeout.ms.
            self.writer.discard_unacknowledged(ABORT_TIMEOUT);
            // Bounded like every transactional call: a cancel must not hang on librdkafka.
            let aborted = bounded_call(
                self.writer.shared_producer(),
                ABORT_TIMEOUT + BOUND_SLACK,
                "aborting the open transaction",
                self.opts(),
                &self.transactional_id,
                |p| p.abort_transaction(ABORT_TIMEOUT),
            )
            .and_then(|outcome| outcome.map_err(|e| self.err(&e, "aborting the open transaction")));
            match aborted {
                Ok(()) => tracing::debug!(transactional_id = %self.transactional_id,
                    took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "transaction aborted"),
                Err(e) => tracing::warn!(transactional_id = %self.transactional_id, error = %e,
                    "aborting the open transaction failed; the next attempt's producer aborts it, else the \
                     broker does after transaction.timeout.ms"),
            }
            self.txn = Txn::None;
        }
        if let Err(e) = self.current.flush(false) {
            tracing::debug!(error = %e, "flushing the spool at abort");
        }
    }

    pub fn transactional_id(&self) -> &str {
        &self.transactional_id
    }

    pub fn metrics(&self) -> &Arc<KafkaSinkMetrics> {
        self.writer.metrics()
    }
}

impl Drop for ExactlyOnceSink {
    /// A sink dropped without [`ExactlyOnceSink::finish`] (a failed task) aborts its open
    /// transaction at once rather than leaving it to block `read_committed` readers until the
    /// next attempt opens or the transaction times out.
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::final_marker;

    /// The last transaction at the end of the input carries the marker only when it moves it
    /// forward: not again after the drain's commit set it, and never backwards.
    #[test]
    fn the_final_marker_is_sent_only_when_it_advances() {
        // The drain: checkpoint 10 was committed on its notice, nothing sealed since.
        assert_eq!(final_marker(Some(10), Some(10)), None);
        // Sealed segments above the marker are finished by this transaction.
        assert_eq!(final_marker(Some(12), Some(10)), Some(12));
        assert_eq!(final_marker(Some(3), None), Some(3));
        // Nothing sealed and no marker yet: none to send.
        assert_eq!(final_marker(None, None), None);
        // Never below what is committed.
        assert_eq!(final_marker(Some(9), Some(10)), None);
    }
}
