//! The operator chain of one subtask: its sources, merged, feeding its sinks.
//!
//! ```text
//!  control (trigger / notify)
//!        │
//!  ┌─────▼──────────┐  bounded channel   ┌────────────────────────┐  acks
//!  │ source driver  │ ─────────────────▶ │ sink thread (blocking) │ ─────▶ JobManager
//!  │ (async, paced) │  records, barriers │ routes by `from`       │
//!  └────────────────┘  end               └────────────────────────┘
//! ```
//!
//! The source driver owns every source of the subtask. A checkpoint trigger makes it snapshot
//! the sources (their next positions) and put a barrier carrying that snapshot into the stream,
//! behind every record emitted before it. When the barrier reaches the sink thread, every earlier
//! record has been written; the sinks are flushed and fsynced (exactly-once Kafka sinks
//! pre-commit and add their state to the snapshot), and the snapshot is acknowledged. A
//! checkpoint-complete notification goes to the source driver (offsets to the consumer group)
//! and, on a channel of its own that overtakes records, to the sink thread (transactions commit).
//! The bounded channel gives backpressure: a slow sink slows the sources down.
//!
//! Records travel as [`Batch`]es, one header per batch ([`super::batch`]). Both loops only do
//! I/O: what to do on a trigger, a completion, a barrier, the end or a cancel is decided by the
//! pure books of [`super::barrier`] ([`SourceBook`], [`SinkBook`]), which the loops feed with
//! events and whose actions they carry out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_arith::boolean::or_kleene;
use arrow_array::{ArrayRef, BooleanArray, Int64Array, RecordBatch};
use arrow_schema::SchemaRef;
use keel_proto::{KeelError, Result};
use keel_spec::{JobSpec, SinkConfig, SourceConfig};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use keel_kafka::{KafkaSinkMetrics, SourcePosition};
use keel_spec::pipeline;

use super::barrier::{SinkAction, SinkBook, SinkEvent, SinkStop, SourceAction, SourceBook, SourceEvent};
use super::batch::{Batch, BatchHeader, Counters, Counting};
use super::datagen::{Datagen, MAX_BATCH};
use super::kafka::KafkaSource;
use super::metrics::{Operator, TaskMetrics, TaskShape};
use super::sinks::{Sink, SinkEdge, FLUSH_INTERVAL};
use super::threads::{drop_off_thread, off_runtime};

/// Elements in flight between the Kafka readers and the source driver, and again between the
/// driver and the sink thread (each up to [`MAX_BATCH`] records). Each hand-off is one channel
/// send per batch whatever the capacity; a larger one only holds more batches in memory when
/// the sink is the slower side (measured: Kafka pass-through peak RSS 2-3 MiB lower with 4
/// than with 16, records/s and datagen rows per CPU-second unchanged).
const CHANNEL_CAPACITY: usize = 4;
/// Shortest pause between two pacing rounds of a source that is not behind.
const MIN_TICK: Duration = Duration::from_millis(5);
/// How long a canceled chain waits for its sink thread before giving up on it.
const CANCEL_GRACE: Duration = Duration::from_secs(10);

/// Requests delivered to a running task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// `drain`: stop with this savepoint: the sources stop at the barrier, and the task
    /// finishes once the checkpoint is complete (an upgrade's handover).
    TriggerCheckpoint {
        checkpoint_id: u64,
        timestamp_ms: u64,
        is_savepoint: bool,
        drain: bool,
    },
    NotifyCheckpointComplete {
        checkpoint_id: u64,
    },
}

/// A checkpoint barrier that has passed every sink of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub checkpoint_id: u64,
    pub is_savepoint: bool,
    /// [`TaskSnapshot`] as JSON.
    pub state: Vec<u8>,
}

/// The state of a subtask at a checkpoint (its sources' splits, its exactly-once sinks' open
/// transactions), sent as JSON in `AcknowledgeCheckpoint.state_handle` and given back in
/// `DeployTaskRequest.restore_state`. The types live in `keel-state`, shared with the
/// JobManager, which stores them and redistributes them in a rescale.
pub use keel_state::{SinkSnapshot, SourceSnapshot, TaskSnapshot};

/// Where a task keeps files that belong to its job's checkpoints: exactly-once sinks spool
/// their uncommitted records under `<dir>/<job_id>/eos/<sink>/<subtask>/`. The directory must be
/// reachable by every TaskManager that may restore the job (as Flink's checkpoint storage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLocation {
    pub dir: std::path::PathBuf,
    pub job_id: String,
    pub attempt: u32,
}

impl Default for StateLocation {
    fn default() -> StateLocation {
        StateLocation::of_task("", "job", 0)
    }
}

impl StateLocation {
    /// `dir` as the JobManager sent it; empty: the default `state.checkpoints.dir`.
    pub fn of_task(dir: &str, job_id: &str, attempt: u32) -> StateLocation {
        let dir = if dir.trim().is_empty() { "/tmp/keel/checkpoints" } else { dir.trim() };
        StateLocation { dir: dir.into(), job_id: job_id.to_string(), attempt }
    }

    /// The spool directory of sink `sink` of subtask `subtask`.
    pub fn spool_dir(&self, sink: &str, subtask: u32) -> std::path::PathBuf {
        let safe = |s: &str| -> String {
            s.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
        };
        self.dir.join(safe(&self.job_id)).join("eos").join(safe(sink)).join(subtask.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct SourcePlan {
    pub name: String,
    pub config: SourceConfig,
    /// Its rows (schema, and for kafka the format and client options).
    pub rows: pipeline::SourcePlan,
}

#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub name: String,
    pub config: SinkConfig,
    /// Index of the source feeding it.
    pub source: usize,
    /// Filter, projection and encoding of the rows it writes.
    pub edge: pipeline::SinkPlan,
}

/// What a subtask runs, decided from the spec before anything is opened.
#[derive(Debug, Clone)]
pub struct ChainPlan {
    pub subtask: u32,
    pub parallelism: u32,
    pub sources: Vec<SourcePlan>,
    pub sinks: Vec<SinkPlan>,
    pub restore: Option<TaskSnapshot>,
    /// Where checkpoint files of the task go (set by the TaskManager from the deployment).
    pub state: StateLocation,
}

impl ChainPlan {
    /// Plans subtask `subtask` of `parallelism` of `spec`, restoring from `restore_state` (a
    /// [`TaskSnapshot`] as JSON) when it is not empty. Connectors this TaskManager cannot run
    /// yet (kafka) are refused here, before the task exists.
    pub fn build(spec: &JobSpec, subtask: u32, parallelism: u32, restore_state: &[u8]) -> Result<ChainPlan> {
        if parallelism == 0 || subtask >= parallelism {
            return Err(KeelError::InvalidArgument {
                reason: format!("subtask {subtask} is not within parallelism {parallelism}"),
            });
        }
        let mut sources = Vec::new();
        for (i, s) in spec.sources.iter().enumerate() {
            let config = spec.source_config(i)?;
            let rows = spec.source_plan(i)?;
            sources.push(SourcePlan { name: s.name.clone(), config, rows });
        }
        let mut sinks = Vec::new();
        for (i, s) in spec.sinks.iter().enumerate() {
            let config = spec.sink_config(i)?;
            let edge = spec.sink_plan(i)?;
            sinks.push(SinkPlan { name: s.name.clone(), config, source: edge.source, edge });
        }
        let restore = if restore_state.is_empty() {
            None
        } else {
            let snapshot =
                TaskSnapshot::from_json(restore_state).map_err(|e| KeelError::InvalidArgument {
                    reason: format!("restore_state is not a task snapshot of this TaskManager: {e}"),
                })?;
            // The JobManager redistributes a checkpoint's states over the subtasks of the
            // attempt (keel_state::rescale): a state of another subtask is its mistake.
            if snapshot.subtask != subtask || snapshot.parallelism != parallelism {
                return Err(KeelError::InvalidArgument {
                    reason: format!(
                        "restore_state belongs to subtask {} of {}, not to subtask {subtask} of {parallelism}",
                        snapshot.subtask, snapshot.parallelism
                    ),
                });
            }
            Some(snapshot)
        };
        let plan =
            ChainPlan { subtask, parallelism, sources, sinks, restore, state: StateLocation::default() };
        // Build the sources once now so that a bad restore position fails the deployment.
        plan.sources()?;
        Ok(plan)
    }

    fn restored(&self, name: &str) -> Option<&SourceSnapshot> {
        self.restore.as_ref().and_then(|r| r.sources.get(name))
    }

    /// Builds the datagen sources (cheap, no I/O); Kafka sources are opened in [`Self::open`].
    fn sources(&self) -> Result<Vec<(String, Option<Datagen>)>> {
        let mut out = Vec::new();
        for s in &self.sources {
            match &s.config {
                SourceConfig::Datagen(opts) => {
                    let restore = match self.restored(&s.name) {
                        Some(SourceSnapshot::Datagen { splits }) => Some(splits.as_slice()),
                        Some(other) => return Err(wrong_snapshot(&s.name, other)),
                        None => None,
                    };
                    out.push((
                        s.name.clone(),
                        Some(Datagen::new(opts, self.subtask, self.parallelism, restore)?),
                    ));
                }
                SourceConfig::Kafka(_) => {
                    if let Some(other @ SourceSnapshot::Datagen { .. }) = self.restored(&s.name) {
                        return Err(wrong_snapshot(&s.name, other));
                    }
                    out.push((s.name.clone(), None));
                }
            }
        }
        Ok(out)
    }

    /// Opens the sinks and the sources at the same time (blocking work, run off the async
    /// runtime: [`off_runtime`]). The Kafka readers and writers update the connector metrics of
    /// `metrics`.
    pub async fn open(self, metrics: &TaskMetrics) -> Result<OpenChain> {
        let datagens = self.sources()?;
        let subtask = self.subtask;
        let parallelism = self.parallelism;
        let sink_plans = self.sinks.clone();
        let state = self.state.clone();
        let restored_sinks = self.restore.as_ref().map(|r| r.sinks.clone()).unwrap_or_default();
        let sink_metrics: Vec<Arc<KafkaSinkMetrics>> = (0..sink_plans.len())
            .map(|i| {
                metrics.sink(i).and_then(|m| m.kafka_metrics().cloned()).unwrap_or_else(KafkaSinkMetrics::new)
            })
            .collect();
        let sinks = off_runtime(format!("open-sinks-{subtask}"), move || {
            sink_plans
                .iter()
                .zip(sink_metrics)
                .map(|(s, kafka_metrics)| {
                    let sink = match &s.edge.kafka {
                        Some(opts) if opts.delivery_guarantee.name() == "exactly-once" => {
                            let restore = restored_sinks.get(&s.name).map(|SinkSnapshot::Kafka(state)| state);
                            Sink::open_kafka_exactly_once(
                                opts.clone(),
                                subtask,
                                parallelism,
                                kafka_metrics,
                                state.spool_dir(&s.name, subtask),
                                state.attempt,
                                restore,
                            )?
                        }
                        Some(opts) => Sink::open_kafka(opts.clone(), subtask, parallelism, kafka_metrics)?,
                        None => Sink::open(&s.name, &s.config, subtask)?,
                    };
                    let edge = SinkEdge::new(&s.edge);
                    Ok((s.name.clone(), sink, edge))
                })
                .collect::<Result<Vec<_>>>()
        });
        let sinks = async move {
            sinks.await.map_err(|_| {
                KeelError::internal(
                    "opening the sinks failed: its thread panicked or did not start".to_string(),
                )
            })?
        };
        // Kafka sources: readers on their own threads, all feeding one channel. They open at the
        // same time as the sinks (each open is a few round trips to a broker: after a restart the
        // job waits for the slowest open, not for the sum of them).
        let (kafka_tx, kafka_rx) = mpsc::channel(CHANNEL_CAPACITY);
        let mut source_opens = Vec::new();
        for (idx, ((name, datagen), plan)) in datagens.into_iter().zip(self.sources.iter()).enumerate() {
            let open: futures::future::BoxFuture<'static, Result<(String, SourceRt)>> =
                match (datagen, &plan.rows.kafka, &plan.rows.format) {
                    (Some(g), _, _) => Box::pin(futures::future::ready(Ok((name, SourceRt::Datagen(g))))),
                    (None, Some(opts), Some(format)) => {
                        let restored = self.restored(&name).and_then(SourceSnapshot::kafka_position);
                        let (opts, schema, format, tx) =
                            (opts.clone(), plan.rows.schema.clone(), format.clone(), kafka_tx.clone());
                        let probe =
                            metrics.source(idx).and_then(|m| m.kafka_probe().cloned()).unwrap_or_default();
                        let source_name = name.clone();
                        let span = tracing::Span::current();
                        let opened = off_runtime(format!("open-{name}-{subtask}"), move || {
                            span.in_scope(|| {
                                KafkaSource::open(
                                    idx,
                                    &source_name,
                                    opts,
                                    &schema,
                                    &format,
                                    subtask,
                                    parallelism,
                                    restored,
                                    probe,
                                    tx,
                                )
                            })
                        });
                        Box::pin(async move {
                            let source = opened.await.map_err(|_| {
                                KeelError::internal(format!(
                                    "opening kafka source {name} failed: its thread panicked or did not start"
                                ))
                            })??;
                            Ok((name, SourceRt::Kafka(source)))
                        })
                    }
                    _ => return Err(KeelError::internal(format!("source {name} has no runtime"))),
                };
            source_opens.push(open);
        }
        // Both finish before either error is returned: a source opened while a sink failed is
        // dropped here, which stops its reader thread.
        let (sinks, sources) = futures::future::join(sinks, futures::future::join_all(source_opens)).await;
        let sinks = sinks?;
        let sources = sources.into_iter().collect::<Result<Vec<_>>>()?;
        let mut routes = vec![Vec::new(); self.sources.len()];
        for (i, s) in self.sinks.iter().enumerate() {
            if let Some(r) = routes.get_mut(s.source) {
                r.push(i);
            }
        }
        let schemas = self.sources.iter().map(|s| keel_formats::arrow_schema(&s.rows.schema)).collect();
        Ok(OpenChain { subtask, parallelism: self.parallelism, sources, schemas, sinks, routes, kafka_rx })
    }
}

impl From<&ChainPlan> for TaskShape {
    fn from(plan: &ChainPlan) -> TaskShape {
        TaskShape {
            parallelism: plan.parallelism,
            sources: plan
                .sources
                .iter()
                .map(|s| Operator { name: s.name.clone(), kafka: s.rows.kafka.is_some() })
                .collect(),
            sinks: plan
                .sinks
                .iter()
                .map(|s| Operator { name: s.name.clone(), kafka: s.edge.kafka.is_some() })
                .collect(),
        }
    }
}

fn wrong_snapshot(name: &str, snapshot: &SourceSnapshot) -> KeelError {
    KeelError::InvalidArgument {
        reason: format!("restore_state of source '{name}' is of another connector: {snapshot:?}"),
    }
}

/// A source of a running chain.
enum SourceRt {
    Datagen(Datagen),
    Kafka(KafkaSource),
}

impl SourceRt {
    fn is_exhausted(&self) -> bool {
        match self {
            SourceRt::Datagen(g) => g.is_exhausted(),
            SourceRt::Kafka(_) => false,
        }
    }

    fn snapshot(&self) -> SourceSnapshot {
        match self {
            SourceRt::Datagen(g) => SourceSnapshot::Datagen { splits: g.splits() },
            SourceRt::Kafka(k) => SourceSnapshot::kafka(&k.position),
        }
    }
}

/// How a chain ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainEnd {
    /// Every source reached its end and the sinks flushed everything.
    Finished,
    Canceled,
}

/// What a running chain is connected to.
pub struct ChainIo {
    pub cancel: CancellationToken,
    pub control: mpsc::Receiver<Control>,
    pub acks: mpsc::UnboundedSender<Ack>,
    pub counters: Arc<Counters>,
    /// Counted per source and sink, as records flow.
    pub metrics: Arc<TaskMetrics>,
}

/// A chain whose sinks are open, ready to run.
pub struct OpenChain {
    subtask: u32,
    parallelism: u32,
    sources: Vec<(String, SourceRt)>,
    /// The Arrow schema of each source's batches.
    schemas: Vec<SchemaRef>,
    sinks: Vec<(String, Sink, SinkEdge)>,
    routes: Vec<Vec<usize>>,
    kafka_rx: mpsc::Receiver<Result<Batch>>,
}

enum Element {
    Records(Batch),
    Barrier(Barrier),
    End,
}

/// A checkpoint barrier on its way to the sinks, with the sources' part of the snapshot.
struct Barrier {
    checkpoint_id: u64,
    is_savepoint: bool,
    snapshot: TaskSnapshot,
}

#[derive(Debug, PartialEq, Eq)]
enum SourceEnd {
    Exhausted,
    Canceled,
    DownstreamGone,
}

impl OpenChain {
    /// Runs the chain until its sources end, it is canceled or an operator fails.
    pub async fn run(self, io: ChainIo) -> Result<ChainEnd> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        let span = tracing::Span::current();
        let counting = Counting { counters: io.counters, metrics: io.metrics };
        let driver = SourceDriver {
            sink_notify: notify_tx,
            book: SourceBook::new(),
            kafka_rx: self.kafka_rx,
            sources: self.sources,
            schemas: self.schemas,
            subtask: self.subtask,
            parallelism: self.parallelism,
            tx,
            cancel: io.cancel.clone(),
            counting: counting.clone(),
        };
        let source = tokio::spawn(driver.run(io.control).instrument(span.clone()));
        let handle = tokio::runtime::Handle::current();
        let sink_thread = SinkThread {
            book: SinkBook::new(self.sinks.len()),
            sinks: self.sinks,
            routes: self.routes,
            acks: io.acks,
            counting,
        };
        let mut sink =
            tokio::task::spawn_blocking(move || span.in_scope(|| sink_thread.run(rx, notify_rx, &handle)));

        let source_result = source
            .await
            .map_err(|e| KeelError::internal(format!("the source driver panicked: {e}")))
            .and_then(|r| r);
        let sink_result = tokio::select! {
            r = &mut sink => r
                .map_err(|e| KeelError::internal(format!("the sink thread panicked: {e}")))
                .and_then(|r| r),
            _ = async {
                io.cancel.cancelled().await;
                tokio::time::sleep(CANCEL_GRACE).await;
            } => Err(KeelError::internal(format!(
                "the sinks did not stop within {CANCEL_GRACE:?} of the cancellation"
            ))),
        };
        match (source_result, sink_result) {
            (_, Err(e)) | (Err(e), _) => Err(e),
            (_, Ok(SinkStop::End)) => Ok(ChainEnd::Finished),
            (Ok(SourceEnd::Canceled), Ok(SinkStop::Closed)) => Ok(ChainEnd::Canceled),
            (Ok(end), Ok(SinkStop::Closed)) => {
                if io.cancel.is_cancelled() {
                    Ok(ChainEnd::Canceled)
                } else {
                    Err(KeelError::internal(format!(
                        "the chain stopped before the end of its input ({end:?})"
                    )))
                }
            }
        }
    }
}

/// The async side of the chain: paces the sources, forwards their batches, and carries out
/// what its [`SourceBook`] decides on checkpoint triggers and completions.
struct SourceDriver {
    sources: Vec<(String, SourceRt)>,
    schemas: Vec<SchemaRef>,
    kafka_rx: mpsc::Receiver<Result<Batch>>,
    /// The checkpoint bookkeeping: pending Kafka commits, the drain.
    book: SourceBook<SourcePosition>,
    subtask: u32,
    parallelism: u32,
    tx: mpsc::Sender<Element>,
    /// Checkpoint-complete notifications for the sink thread.
    sink_notify: mpsc::UnboundedSender<u64>,
    cancel: CancellationToken,
    counting: Counting,
}

impl SourceDriver {
    fn snapshot(&self) -> TaskSnapshot {
        TaskSnapshot {
            subtask: self.subtask,
            parallelism: self.parallelism,
            sources: self.sources.iter().map(|(name, source)| (name.clone(), source.snapshot())).collect(),
            sinks: BTreeMap::new(),
        }
    }

    /// The positions of the Kafka sources now, by source index.
    fn kafka_positions(&self) -> Vec<(usize, SourcePosition)> {
        self.sources
            .iter()
            .enumerate()
            .filter_map(|(i, (_, s))| match s {
                SourceRt::Kafka(k) => Some((i, k.position.clone())),
                _ => None,
            })
            .collect()
    }

    /// Sends one element; `Some(end)` when the driver must stop instead.
    async fn send(&self, element: Element) -> Option<SourceEnd> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Some(SourceEnd::Canceled),
            r = self.tx.send(element) => match r {
                Ok(()) => None,
                Err(_) => Some(SourceEnd::DownstreamGone),
            },
        }
    }

    /// Counts a batch in and sends it on (unless every record of it was skipped).
    async fn forward(&self, batch: Batch) -> Option<SourceEnd> {
        self.counting.batch_in(&batch.header, batch.len());
        if batch.is_empty() {
            return None;
        }
        self.send(Element::Records(batch)).await
    }

    /// Feeds `event` to the book and carries out its actions; `Some(end)` when the driver stops.
    async fn apply(&mut self, event: SourceEvent<SourcePosition>) -> Result<Option<SourceEnd>> {
        for action in self.book.on(event)? {
            match action {
                SourceAction::InjectBarrier { checkpoint_id, is_savepoint } => {
                    // No await since the book took the Kafka positions: the snapshot matches them.
                    let barrier = Barrier { checkpoint_id, is_savepoint, snapshot: self.snapshot() };
                    let drain = self.book.draining() == Some(checkpoint_id);
                    tracing::info!(checkpoint_id, is_savepoint, drain, "checkpoint barrier injected");
                    if let Some(end) = self.send(Element::Barrier(barrier)).await {
                        return Ok(Some(end));
                    }
                }
                SourceAction::NotifySinks { checkpoint_id } => {
                    // The sink thread may be gone already.
                    let _ = self.sink_notify.send(checkpoint_id);
                }
                SourceAction::CommitOffsets { source, position } => {
                    // For monitoring only: recovery uses the checkpoint.
                    if let Some((_, SourceRt::Kafka(k))) = self.sources.get(source) {
                        k.commit(position);
                    }
                }
                SourceAction::Finish => {
                    return Ok(Some(self.send(Element::End).await.unwrap_or(SourceEnd::Exhausted)));
                }
                SourceAction::Abort => return Ok(Some(SourceEnd::Canceled)),
            }
        }
        Ok(None)
    }

    async fn run(mut self, mut control: mpsc::Receiver<Control>) -> Result<SourceEnd> {
        let mut control_open = true;
        let mut kafka_open = true;
        let mut last_round = Instant::now();
        let mut behind = true;
        loop {
            if self.sources.iter().all(|(_, g)| g.is_exhausted()) {
                // Checkpoints requested before the end still get their barrier.
                while let Ok(msg) = control.try_recv() {
                    if let Some(end) = self.handle_control(msg).await? {
                        return Ok(end);
                    }
                }
                tracing::info!("sources reached their end");
                return Ok(self.apply(SourceEvent::InputEnded).await?.unwrap_or(SourceEnd::Exhausted));
            }
            let due = self
                .sources
                .iter()
                .filter_map(|(_, s)| match s {
                    SourceRt::Datagen(g) if !g.is_exhausted() => Some(g.next_due()),
                    _ => None,
                })
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let wake = if behind { due } else { due.max(last_round + MIN_TICK) };
            let emitting = self.book.may_emit();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    return Ok(self.apply(SourceEvent::Cancel).await?.unwrap_or(SourceEnd::Canceled));
                }
                _ = self.tx.closed() => return Ok(SourceEnd::DownstreamGone),
                batch = self.kafka_rx.recv(), if kafka_open && emitting => match batch {
                    Some(Ok(batch)) => {
                        let source = batch.header.source;
                        if let (Some((_, SourceRt::Kafka(k))), Some(position)) =
                            (self.sources.get_mut(source), &batch.header.position)
                        {
                            k.position = position.clone();
                        }
                        if let Some(end) = self.forward(batch).await {
                            return Ok(end);
                        }
                    }
                    Some(Err(e)) => return Err(e),
                    // Every reader is gone: there are no kafka sources.
                    None => kafka_open = false,
                },
                msg = control.recv(), if control_open => match msg {
                    None => control_open = false,
                    Some(msg) => {
                        if let Some(end) = self.handle_control(msg).await? {
                            return Ok(end);
                        }
                    }
                },
                _ = tokio::time::sleep_until(wake), if emitting => {
                    let now = Instant::now();
                    last_round = now;
                    behind = false;
                    for idx in 0..self.sources.len() {
                        let values = match self.sources.get_mut(idx) {
                            Some((_, SourceRt::Datagen(g))) => g.emit_due(now),
                            _ => continue,
                        };
                        if values.is_empty() {
                            continue;
                        }
                        behind |= values.len() >= MAX_BATCH;
                        let Some(schema) = self.schemas.get(idx) else { continue };
                        // The numbers become the batch's one column without a copy.
                        let column: ArrayRef = Arc::new(Int64Array::from(values));
                        let records = RecordBatch::try_new(schema.clone(), vec![column])
                            .map_err(|e| KeelError::internal(format!("datagen batch: {e}")))?;
                        let batch = Batch { header: BatchHeader::generated(idx), records };
                        if let Some(end) = self.forward(batch).await {
                            return Ok(end);
                        }
                    }
                }
            }
        }
    }

    async fn handle_control(&mut self, msg: Control) -> Result<Option<SourceEnd>> {
        match msg {
            Control::TriggerCheckpoint { checkpoint_id, timestamp_ms, is_savepoint, drain } => {
                tracing::debug!(checkpoint_id, timestamp_ms, is_savepoint, drain, "checkpoint triggered");
                let positions = self.kafka_positions();
                self.apply(SourceEvent::Trigger { checkpoint_id, is_savepoint, drain, positions }).await
            }
            Control::NotifyCheckpointComplete { checkpoint_id } => {
                tracing::info!(checkpoint_id, "checkpoint complete");
                let end = self.apply(SourceEvent::Complete { checkpoint_id }).await?;
                if end.is_some() {
                    tracing::info!(checkpoint_id, "drained: the savepoint is complete, the task finishes");
                }
                Ok(end)
            }
        }
    }
}

/// The blocking side of the chain: writes records to the sinks their source feeds, flushes on
/// time, and carries out what its [`SinkBook`] decides on barriers, completions and the end.
struct SinkThread {
    sinks: Vec<(String, Sink, SinkEdge)>,
    /// The sinks fed by each source.
    routes: Vec<Vec<usize>>,
    book: SinkBook,
    acks: mpsc::UnboundedSender<Ack>,
    counting: Counting,
}

impl SinkThread {
    fn run(
        mut self,
        mut rx: mpsc::Receiver<Element>,
        mut notify_rx: mpsc::UnboundedReceiver<u64>,
        handle: &tokio::runtime::Handle,
    ) -> Result<SinkStop> {
        loop {
            let now = std::time::Instant::now();
            let wait = self
                .sinks
                .iter()
                .filter_map(|(_, s, _)| s.flush_deadline())
                .min()
                .map(|d| d.saturating_duration_since(now))
                .unwrap_or(FLUSH_INTERVAL);
            let received = handle.block_on(async {
                tokio::select! {
                    biased;
                    Some(id) = notify_rx.recv() => Ok(Err(id)),
                    r = tokio::time::timeout(wait, rx.recv()) => r.map(Ok),
                }
            });
            let stop = match received {
                Err(_elapsed) => None,
                Ok(Err(checkpoint_id)) => self.apply(SinkEvent::Complete { checkpoint_id }, None)?,
                // Canceled or the sources failed: nothing more is committed.
                Ok(Ok(None)) => self.apply(SinkEvent::InputClosed, None)?,
                Ok(Ok(Some(Element::Records(batch)))) => {
                    self.write(&batch)?;
                    None
                }
                Ok(Ok(Some(Element::Barrier(mut barrier)))) => {
                    let event = SinkEvent::BarrierArrived { checkpoint_id: barrier.checkpoint_id };
                    self.apply(event, Some(&mut barrier))?
                }
                Ok(Ok(Some(Element::End))) => self.apply(SinkEvent::InputEnd, None)?,
            };
            if let Some(stop) = stop {
                if stop == SinkStop::End {
                    // Everything is written and committed: the task may report that it
                    // finished. Closing the sinks' Kafka clients is no part of that, and it is
                    // slow: rust-rdkafka's consumer drop (the exactly-once sink's marker
                    // consumer) waits for the group close in `poll` slices of 100 ms, which
                    // return only when their whole 100 ms have passed. An upgrade's old version
                    // reported finished that much later, and the new version waited for it.
                    drop_off_thread("close-sinks", self.sinks);
                }
                return Ok(stop);
            }
            let now = std::time::Instant::now();
            for (_, s, _) in self.sinks.iter_mut() {
                s.flush_if_due(now)?;
            }
        }
    }

    /// Writes a batch to the sinks its source feeds and counts it: per sink, and once for the
    /// task however many sinks wrote a record (the union of the sinks' filter masks).
    fn write(&mut self, batch: &Batch) -> Result<()> {
        let mut all = false;
        let mut union: Option<BooleanArray> = None;
        for &i in self.routes.get(batch.header.source).map(Vec::as_slice).unwrap_or_default() {
            if let Some((_, sink, edge)) = self.sinks.get_mut(i) {
                let selected = edge.select(&batch.records)?;
                match selected.mask {
                    None => all = true,
                    Some(m) if !all => {
                        union = Some(match union {
                            None => m,
                            Some(u) => or_kleene(&u, &m)
                                .map_err(|e| KeelError::internal(format!("counting written records: {e}")))?,
                        })
                    }
                    Some(_) => {}
                }
                let bytes = sink.write(&selected.rows, edge)?;
                self.counting.sink_out(i, selected.rows.num_rows(), bytes);
            }
        }
        let written = if all { batch.len() } else { union.map_or(0, |u| u.true_count()) };
        self.counting.task_out(written);
        Ok(())
    }

    /// Feeds `event` to the book and carries out its actions (`barrier`: the barrier that
    /// arrived, which collects the sinks' states); `Some(stop)` when the thread stops.
    fn apply(&mut self, event: SinkEvent, mut barrier: Option<&mut Barrier>) -> Result<Option<SinkStop>> {
        let mut actions: std::collections::VecDeque<SinkAction> = self.book.on(event)?.into();
        while let Some(action) = actions.pop_front() {
            match action {
                SinkAction::SnapshotSink { sink, checkpoint_id } => {
                    if let Some((name, s, _)) = self.sinks.get_mut(sink) {
                        if let Some(state) = s.checkpoint(checkpoint_id)? {
                            if let Some(barrier) = barrier.as_deref_mut() {
                                barrier.snapshot.sinks.insert(name.clone(), SinkSnapshot::Kafka(state));
                            }
                        }
                    }
                    actions.extend(self.book.on(SinkEvent::SinkSnapshotted { sink, checkpoint_id })?);
                }
                SinkAction::SendAck { checkpoint_id } => {
                    tracing::debug!(checkpoint_id, "checkpoint barrier passed the sinks");
                    let Some(barrier) = barrier.as_deref() else {
                        return Err(KeelError::internal(format!(
                            "checkpoint {checkpoint_id} aligned without its barrier"
                        )));
                    };
                    let ack = Ack {
                        checkpoint_id,
                        is_savepoint: barrier.is_savepoint,
                        state: barrier.snapshot.to_json()?,
                    };
                    // The task may be gone already; then nobody waits for the ack.
                    let _ = self.acks.send(ack);
                }
                SinkAction::CommitSinks { checkpoint_id } => {
                    for (_, s, _) in self.sinks.iter_mut() {
                        s.notify_complete(checkpoint_id)?;
                    }
                }
                SinkAction::FlushDurable => {
                    for (_, s, _) in self.sinks.iter_mut() {
                        s.flush(true)?;
                    }
                }
                SinkAction::FinishSinks => {
                    for (_, s, _) in self.sinks.iter_mut() {
                        s.finish()?;
                    }
                }
                SinkAction::AbortSinks => {
                    for (_, s, _) in self.sinks.iter_mut() {
                        s.abort();
                    }
                }
                SinkAction::Stop(stop) => return Ok(Some(stop)),
            }
        }
        Ok(None)
    }
}
