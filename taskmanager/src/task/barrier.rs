//! The checkpoint bookkeeping of a task, without I/O.
//!
//! Two pure state machines, each fed events by one of the chain's loops and answering with the
//! actions that loop carries out (the loops in [`super::chain`] only do I/O):
//!
//! - [`SourceBook`], fed by the source driver: checkpoint triggers (periodic, savepoint, drain),
//!   checkpoint-complete notifications, the end of a bounded input and cancellation. It decides
//!   when a barrier is injected, which Kafka positions are committed to the consumer group (only
//!   those of the newest completed checkpoint; older ones are subsumed), when the sinks are told
//!   a checkpoint completed, and when the task finishes (the end of the input, or the completion
//!   of a drain's savepoint). While a drain is under way the sources emit nothing.
//! - [`SinkBook`], fed by the sink thread: a barrier arriving, each sink's snapshot for it
//!   (the barrier is acknowledged once every sink has snapshotted: the alignment), completions,
//!   the end of the input, and the input closing without an end (cancel, failed sources).
//!
//! ```text
//!  SourceBook                                    SinkBook
//!  Trigger ─▶ InjectBarrier ─────(stream)─────▶ BarrierArrived ─▶ SnapshotSink × n
//!                                               SinkSnapshotted × n ─▶ SendAck
//!  Complete ─▶ NotifySinks ──(notify channel)─▶ Complete ─▶ CommitSinks
//!           ─▶ CommitOffsets (newest pending)
//!           ─▶ Finish (drain complete) ──────▶ InputEnd ─▶ FlushDurable, FinishSinks, Stop(End)
//!  InputEnded ─▶ Finish ─────────────────────▶ (same)
//!  Cancel ─▶ Abort ──────(stream closed)─────▶ InputClosed ─▶ AbortSinks, FlushDurable, Stop(Closed)
//! ```

use std::collections::{BTreeMap, BTreeSet};

use keel_proto::{KeelError, Result};

/// What the source driver tells its book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent<P> {
    /// The JobManager triggered a checkpoint. `positions` are the positions of the Kafka sources
    /// (by source index) at this instant, which is also when the driver snapshots the sources:
    /// exactly the records emitted before are behind the barrier.
    Trigger { checkpoint_id: u64, is_savepoint: bool, drain: bool, positions: Vec<(usize, P)> },
    /// The JobManager completed a checkpoint (every task acknowledged it).
    Complete { checkpoint_id: u64 },
    /// Every source reached the end of its (bounded) input.
    InputEnded,
    /// The task was canceled.
    Cancel,
}

/// What the source driver carries out, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAction<P> {
    /// Snapshot the sources and put a barrier with that snapshot into the stream.
    InjectBarrier { checkpoint_id: u64, is_savepoint: bool },
    /// Tell the sink thread that the checkpoint completed (its exactly-once sinks commit).
    NotifySinks { checkpoint_id: u64 },
    /// Commit this position of source `source` to the consumer group.
    CommitOffsets { source: usize, position: P },
    /// Put the end of the input into the stream: the sinks finish and the task ends.
    Finish,
    /// Stop without an end of input: the sinks abort what they have not committed.
    Abort,
}

/// The source side's bookkeeping. `P` is a source position (a Kafka reader's offsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceBook<P> {
    /// Kafka positions of checkpoints whose barrier was injected and which have not completed.
    pending_commits: BTreeMap<u64, Vec<(usize, P)>>,
    /// The drain checkpoint whose barrier was injected: nothing more is emitted, and the task
    /// finishes when that checkpoint (or a later one) completes.
    drain: Option<u64>,
    /// `Finish` or `Abort` was returned: the driver has stopped.
    stopped: bool,
}

impl<P> Default for SourceBook<P> {
    fn default() -> Self {
        SourceBook { pending_commits: BTreeMap::new(), drain: None, stopped: false }
    }
}

impl<P> SourceBook<P> {
    pub fn new() -> SourceBook<P> {
        SourceBook::default()
    }

    /// Whether the sources may emit records now (not after a drain's barrier, nor after the
    /// end).
    pub fn may_emit(&self) -> bool {
        self.drain.is_none() && !self.stopped
    }

    /// The drain checkpoint, once its barrier was injected.
    pub fn draining(&self) -> Option<u64> {
        self.drain
    }

    /// Checkpoints whose barrier was injected, with Kafka positions to commit, not yet
    /// complete.
    pub fn pending(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending_commits.keys().copied()
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The actions for `event`. A trigger during a drain is refused (the task takes no more
    /// checkpoints once its sources stopped at the drain's barrier). Events after the end are
    /// ignored.
    pub fn on(&mut self, event: SourceEvent<P>) -> Result<Vec<SourceAction<P>>> {
        if self.stopped {
            return Ok(Vec::new());
        }
        match event {
            SourceEvent::Trigger { checkpoint_id, is_savepoint, drain, positions } => {
                if self.drain.is_some() {
                    return Err(KeelError::precondition(format!(
                        "checkpoint {checkpoint_id}: the task is draining and takes no more checkpoints"
                    )));
                }
                if !positions.is_empty() {
                    self.pending_commits.insert(checkpoint_id, positions);
                }
                if drain {
                    // Nothing after the barrier: the sources stop here (a consistent cut).
                    self.drain = Some(checkpoint_id);
                }
                Ok(vec![SourceAction::InjectBarrier { checkpoint_id, is_savepoint }])
            }
            SourceEvent::Complete { checkpoint_id } => {
                // The sinks are told of every completion (they ignore one they already
                // committed); the offsets of the newest pending checkpoint it covers reach the
                // consumer group, older pending ones are subsumed by it.
                let mut actions = vec![SourceAction::NotifySinks { checkpoint_id }];
                let later = self.pending_commits.split_off(&checkpoint_id.saturating_add(1));
                let covered = std::mem::replace(&mut self.pending_commits, later);
                if let Some((_, positions)) = covered.into_iter().next_back() {
                    actions.extend(
                        positions
                            .into_iter()
                            .map(|(source, position)| SourceAction::CommitOffsets { source, position }),
                    );
                }
                if self.drain.is_some_and(|d| checkpoint_id >= d) {
                    self.stopped = true;
                    actions.push(SourceAction::Finish);
                }
                Ok(actions)
            }
            SourceEvent::InputEnded => {
                self.stopped = true;
                Ok(vec![SourceAction::Finish])
            }
            SourceEvent::Cancel => {
                // Nothing more is committed: a restore starts from the last completed checkpoint.
                self.stopped = true;
                self.pending_commits.clear();
                Ok(vec![SourceAction::Abort])
            }
        }
    }
}

/// What the sink thread tells its book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkEvent {
    /// A barrier reached the sink thread: every record before it has been written.
    BarrierArrived { checkpoint_id: u64 },
    /// Sink `sink` made its writes durable for the checkpoint (and gave its state, if any).
    SinkSnapshotted { sink: usize, checkpoint_id: u64 },
    /// The checkpoint completed.
    Complete { checkpoint_id: u64 },
    /// The end of the input reached the sink thread.
    InputEnd,
    /// The input stopped without an end (the task was canceled or its sources failed).
    InputClosed,
}

/// How the sink thread stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkStop {
    /// The end of the input was reached: everything is written and committed.
    End,
    /// The input stopped without an end.
    Closed,
}

/// What the sink thread carries out, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkAction {
    /// Sink `sink` makes its writes durable (an exactly-once sink pre-commits and returns its
    /// state); answer with [`SinkEvent::SinkSnapshotted`].
    SnapshotSink { sink: usize, checkpoint_id: u64 },
    /// Every sink snapshotted: acknowledge the checkpoint to the JobManager.
    SendAck { checkpoint_id: u64 },
    /// The sinks commit what the completed checkpoint covers.
    CommitSinks { checkpoint_id: u64 },
    /// Flush and fsync every sink.
    FlushDurable,
    /// The sinks commit everything (after the durable flush).
    FinishSinks,
    /// The sinks abort their open transactions (their records stay spooled for a restore).
    AbortSinks,
    /// The sink thread ends.
    Stop(SinkStop),
}

/// The sink side's bookkeeping: the alignment of a barrier over the task's sinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkBook {
    sinks: usize,
    /// The barrier being aligned and the sinks that have snapshotted for it.
    aligning: Option<(u64, BTreeSet<usize>)>,
    /// The newest checkpoint acknowledged.
    last_acked: Option<u64>,
    stopped: Option<SinkStop>,
}

impl SinkBook {
    /// The book of a sink thread writing to `sinks` sinks.
    pub fn new(sinks: usize) -> SinkBook {
        SinkBook { sinks, aligning: None, last_acked: None, stopped: None }
    }

    /// The newest checkpoint acknowledged.
    pub fn last_acked(&self) -> Option<u64> {
        self.last_acked
    }

    /// How the sink thread stopped, once it did.
    pub fn stopped(&self) -> Option<SinkStop> {
        self.stopped
    }

    /// The actions for `event`. A barrier arriving while another is being aligned, or a
    /// snapshot for another barrier or of an unknown sink, is an internal error (the sink
    /// thread aligns one barrier at a time). Events after the stop are ignored.
    pub fn on(&mut self, event: SinkEvent) -> Result<Vec<SinkAction>> {
        if self.stopped.is_some() {
            return Ok(Vec::new());
        }
        match event {
            SinkEvent::BarrierArrived { checkpoint_id } => {
                if let Some((aligning, _)) = &self.aligning {
                    return Err(KeelError::internal(format!(
                        "barrier {checkpoint_id} arrived while barrier {aligning} is being aligned"
                    )));
                }
                if self.sinks == 0 {
                    self.last_acked = Some(checkpoint_id);
                    return Ok(vec![SinkAction::SendAck { checkpoint_id }]);
                }
                self.aligning = Some((checkpoint_id, BTreeSet::new()));
                Ok((0..self.sinks).map(|sink| SinkAction::SnapshotSink { sink, checkpoint_id }).collect())
            }
            SinkEvent::SinkSnapshotted { sink, checkpoint_id } => {
                let Some((aligning, done)) = &mut self.aligning else {
                    return Err(KeelError::internal(format!(
                        "sink {sink} snapshotted for checkpoint {checkpoint_id}, but no barrier is being aligned"
                    )));
                };
                if *aligning != checkpoint_id || sink >= self.sinks {
                    return Err(KeelError::internal(format!(
                        "sink {sink} snapshotted for checkpoint {checkpoint_id} while barrier {aligning} is \
                         being aligned over {} sinks",
                        self.sinks
                    )));
                }
                done.insert(sink);
                if done.len() < self.sinks {
                    return Ok(Vec::new());
                }
                self.aligning = None;
                self.last_acked = Some(checkpoint_id);
                Ok(vec![SinkAction::SendAck { checkpoint_id }])
            }
            SinkEvent::Complete { checkpoint_id } => Ok(vec![SinkAction::CommitSinks { checkpoint_id }]),
            SinkEvent::InputEnd => {
                self.stopped = Some(SinkStop::End);
                Ok(vec![SinkAction::FlushDurable, SinkAction::FinishSinks, SinkAction::Stop(SinkStop::End)])
            }
            SinkEvent::InputClosed => {
                self.stopped = Some(SinkStop::Closed);
                Ok(vec![SinkAction::AbortSinks, SinkAction::FlushDurable, SinkAction::Stop(SinkStop::Closed)])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SourceAction::*;

    type Book = SourceBook<i64>;

    fn trigger(checkpoint_id: u64, drain: bool, positions: &[(usize, i64)]) -> SourceEvent<i64> {
        SourceEvent::Trigger { checkpoint_id, is_savepoint: drain, drain, positions: positions.to_vec() }
    }

    fn complete(checkpoint_id: u64) -> SourceEvent<i64> {
        SourceEvent::Complete { checkpoint_id }
    }

    /// A periodic trigger injects a barrier and keeps the Kafka positions until the checkpoint
    /// completes; completion notifies the sinks and then commits exactly those positions; the
    /// sources keep emitting throughout.
    #[test]
    fn a_periodic_checkpoint_injects_then_commits_its_positions() -> Result<()> {
        let mut book = Book::new();
        assert_eq!(
            book.on(trigger(1, false, &[(0, 10), (2, 7)]))?,
            vec![InjectBarrier { checkpoint_id: 1, is_savepoint: false }]
        );
        assert_eq!(book.pending().collect::<Vec<_>>(), vec![1]);
        assert!(book.may_emit());
        assert_eq!(
            book.on(complete(1))?,
            vec![
                NotifySinks { checkpoint_id: 1 },
                CommitOffsets { source: 0, position: 10 },
                CommitOffsets { source: 2, position: 7 }
            ]
        );
        assert_eq!(book.pending().count(), 0);
        assert!(book.may_emit() && !book.is_stopped());
        Ok(())
    }

    /// A task without Kafka sources remembers nothing to commit; completion only notifies the
    /// sinks.
    #[test]
    fn without_kafka_sources_completion_only_notifies_the_sinks() -> Result<()> {
        let mut book = Book::new();
        book.on(trigger(4, false, &[]))?;
        assert_eq!(book.pending().count(), 0);
        assert_eq!(book.on(complete(4))?, vec![NotifySinks { checkpoint_id: 4 }]);
        Ok(())
    }

    /// Completions out of order or twice: the newest completed checkpoint's positions are
    /// committed once; an older or repeated completion commits nothing (its positions were
    /// subsumed), though the sinks still hear of it.
    #[test]
    fn out_of_order_and_duplicate_completions_commit_only_the_newest_once() -> Result<()> {
        let mut book = Book::new();
        book.on(trigger(1, false, &[(0, 100)]))?;
        book.on(trigger(2, false, &[(0, 200)]))?;
        book.on(trigger(3, false, &[(0, 300)]))?;
        assert_eq!(
            book.on(complete(2))?,
            vec![NotifySinks { checkpoint_id: 2 }, CommitOffsets { source: 0, position: 200 }]
        );
        assert_eq!(book.pending().collect::<Vec<_>>(), vec![3]);
        // Late completion of 1, subsumed by 2; repeated completion of 2.
        assert_eq!(book.on(complete(1))?, vec![NotifySinks { checkpoint_id: 1 }]);
        assert_eq!(book.on(complete(2))?, vec![NotifySinks { checkpoint_id: 2 }]);
        assert_eq!(
            book.on(complete(3))?,
            vec![NotifySinks { checkpoint_id: 3 }, CommitOffsets { source: 0, position: 300 }]
        );
        assert_eq!(book.on(complete(3))?, vec![NotifySinks { checkpoint_id: 3 }]);
        Ok(())
    }

    /// A checkpoint that never completes (aborted or timed out by the JobManager) keeps its
    /// positions only until a later one completes: they are never committed, and not kept.
    #[test]
    fn an_aborted_checkpoint_is_superseded_by_the_next_completed_one() -> Result<()> {
        let mut book = Book::new();
        book.on(trigger(5, false, &[(1, 50)]))?;
        book.on(trigger(6, false, &[(1, 60)]))?;
        assert_eq!(
            book.on(complete(6))?,
            vec![NotifySinks { checkpoint_id: 6 }, CommitOffsets { source: 1, position: 60 }]
        );
        assert_eq!(book.pending().count(), 0, "checkpoint 5's positions are dropped, not committed");
        // A completion for an id this task never saw (a checkpoint it joined too late for)
        // commits the newest pending one it covers.
        book.on(trigger(8, false, &[(1, 80)]))?;
        assert_eq!(
            book.on(complete(9))?,
            vec![NotifySinks { checkpoint_id: 9 }, CommitOffsets { source: 1, position: 80 }]
        );
        Ok(())
    }

    /// A drain: its barrier is injected, the sources stop emitting, further triggers are
    /// refused, and the task finishes once the drain's savepoint completes (after its offsets
    /// are committed); nothing happens after that.
    #[test]
    fn a_drain_stops_the_sources_and_finishes_when_its_savepoint_completes() -> Result<()> {
        let mut book = Book::new();
        assert_eq!(
            book.on(trigger(7, true, &[(0, 70)]))?,
            vec![InjectBarrier { checkpoint_id: 7, is_savepoint: true }]
        );
        assert!(!book.may_emit());
        assert_eq!(book.draining(), Some(7));
        let refused = book.on(trigger(8, false, &[(0, 70)]));
        assert!(matches!(refused, Err(KeelError::FailedPrecondition { .. })), "{refused:?}");
        assert_eq!(
            book.on(complete(7))?,
            vec![NotifySinks { checkpoint_id: 7 }, CommitOffsets { source: 0, position: 70 }, Finish]
        );
        assert!(book.is_stopped());
        assert_eq!(book.on(complete(7))?, vec![]);
        assert_eq!(book.on(trigger(9, false, &[]))?, vec![]);
        Ok(())
    }

    /// A drain racing a periodic checkpoint: the periodic one triggered just before the drain
    /// completes without ending the task (its offsets are committed), whether it completes
    /// before or after the drain; the task finishes on the drain's completion only.
    #[test]
    fn a_drain_racing_a_periodic_checkpoint_finishes_on_the_drain_only() -> Result<()> {
        // The periodic checkpoint completes first.
        let mut book = Book::new();
        book.on(trigger(10, false, &[(0, 1)]))?;
        book.on(trigger(11, true, &[(0, 2)]))?;
        assert_eq!(
            book.on(complete(10))?,
            vec![NotifySinks { checkpoint_id: 10 }, CommitOffsets { source: 0, position: 1 }]
        );
        assert!(!book.is_stopped() && !book.may_emit());
        assert_eq!(
            book.on(complete(11))?,
            vec![NotifySinks { checkpoint_id: 11 }, CommitOffsets { source: 0, position: 2 }, Finish]
        );

        // The drain completes first: it subsumes the periodic one and finishes the task; the
        // late periodic completion is ignored.
        let mut book = Book::new();
        book.on(trigger(10, false, &[(0, 1)]))?;
        book.on(trigger(11, true, &[(0, 2)]))?;
        assert_eq!(
            book.on(complete(11))?,
            vec![NotifySinks { checkpoint_id: 11 }, CommitOffsets { source: 0, position: 2 }, Finish]
        );
        assert_eq!(book.on(complete(10))?, vec![]);

        // A periodic trigger arriving after the drain's is refused, not injected.
        let mut book = Book::new();
        book.on(trigger(11, true, &[]))?;
        assert!(book.on(trigger(12, false, &[])).is_err());
        Ok(())
    }

    /// A completion of a checkpoint newer than the drain (the drain's own completion lost)
    /// also finishes the task; an older one does not.
    #[test]
    fn a_later_completion_also_ends_a_drain() -> Result<()> {
        let mut book = Book::new();
        book.on(trigger(3, true, &[]))?;
        assert_eq!(book.on(complete(2))?, vec![NotifySinks { checkpoint_id: 2 }]);
        assert_eq!(book.on(complete(4))?, vec![NotifySinks { checkpoint_id: 4 }, Finish]);
        Ok(())
    }

    /// The end of a bounded input (a datagen with `number-of-rows`) finishes the task, with
    /// checkpoints triggered before it still injected first; nothing follows the end.
    #[test]
    fn the_end_of_a_bounded_input_finishes_the_task() -> Result<()> {
        let mut book = Book::new();
        assert_eq!(
            book.on(trigger(1, false, &[]))?,
            vec![InjectBarrier { checkpoint_id: 1, is_savepoint: false }]
        );
        assert_eq!(book.on(SourceEvent::InputEnded)?, vec![Finish]);
        assert!(book.is_stopped() && !book.may_emit());
        assert_eq!(book.on(complete(1))?, vec![]);
        assert_eq!(book.on(SourceEvent::InputEnded)?, vec![]);
        Ok(())
    }

    /// Cancel aborts: nothing pending is committed, even if its completion arrives later.
    #[test]
    fn cancel_aborts_and_commits_nothing_more() -> Result<()> {
        let mut book = Book::new();
        book.on(trigger(1, false, &[(0, 5)]))?;
        assert_eq!(book.on(SourceEvent::Cancel)?, vec![Abort]);
        assert_eq!(book.pending().count(), 0);
        assert_eq!(book.on(complete(1))?, vec![]);
        // A drain canceled before its savepoint completed does not finish either.
        let mut book = Book::new();
        book.on(trigger(2, true, &[]))?;
        assert_eq!(book.on(SourceEvent::Cancel)?, vec![Abort]);
        assert_eq!(book.on(complete(2))?, vec![]);
        Ok(())
    }

    /// A barrier is acknowledged once every sink has snapshotted for it, whatever their order,
    /// and once only (a repeated snapshot of one sink does not count twice).
    #[test]
    fn a_barrier_is_acked_once_every_sink_snapshotted() -> Result<()> {
        let mut book = SinkBook::new(3);
        assert_eq!(
            book.on(SinkEvent::BarrierArrived { checkpoint_id: 4 })?,
            (0..3).map(|sink| SinkAction::SnapshotSink { sink, checkpoint_id: 4 }).collect::<Vec<_>>()
        );
        assert_eq!(book.on(SinkEvent::SinkSnapshotted { sink: 2, checkpoint_id: 4 })?, vec![]);
        assert_eq!(book.on(SinkEvent::SinkSnapshotted { sink: 2, checkpoint_id: 4 })?, vec![]);
        assert_eq!(book.on(SinkEvent::SinkSnapshotted { sink: 0, checkpoint_id: 4 })?, vec![]);
        assert_eq!(book.last_acked(), None);
        assert_eq!(
            book.on(SinkEvent::SinkSnapshotted { sink: 1, checkpoint_id: 4 })?,
            vec![SinkAction::SendAck { checkpoint_id: 4 }]
        );
        assert_eq!(book.last_acked(), Some(4));
        // The next barrier aligns afresh.
        assert_eq!(book.on(SinkEvent::BarrierArrived { checkpoint_id: 5 })?.len(), 3);
        Ok(())
    }

    /// Misaligned input is an error, not a silent ack: a second barrier before the first is
    /// aligned, a snapshot for another checkpoint, of an unknown sink, or with no barrier.
    #[test]
    fn misaligned_snapshots_are_errors() -> Result<()> {
        let mut book = SinkBook::new(2);
        assert!(book.on(SinkEvent::SinkSnapshotted { sink: 0, checkpoint_id: 1 }).is_err());
        book.on(SinkEvent::BarrierArrived { checkpoint_id: 1 })?;
        assert!(book.on(SinkEvent::BarrierArrived { checkpoint_id: 2 }).is_err());
        assert!(book.on(SinkEvent::SinkSnapshotted { sink: 0, checkpoint_id: 2 }).is_err());
        assert!(book.on(SinkEvent::SinkSnapshotted { sink: 2, checkpoint_id: 1 }).is_err());
        assert_eq!(book.last_acked(), None);
        Ok(())
    }

    /// A chain without sinks acknowledges a barrier at once.
    #[test]
    fn without_sinks_a_barrier_is_acked_at_once() -> Result<()> {
        let mut book = SinkBook::new(0);
        assert_eq!(
            book.on(SinkEvent::BarrierArrived { checkpoint_id: 9 })?,
            vec![SinkAction::SendAck { checkpoint_id: 9 }]
        );
        Ok(())
    }

    /// Every completion reaches the sinks, in the order it came, duplicates and older ids too
    /// (the sinks commit what it covers and ignore what they already committed).
    #[test]
    fn completions_reach_the_sinks_as_they_come() -> Result<()> {
        let mut book = SinkBook::new(1);
        for id in [3, 2, 3] {
            assert_eq!(
                book.on(SinkEvent::Complete { checkpoint_id: id })?,
                vec![SinkAction::CommitSinks { checkpoint_id: id }]
            );
        }
        Ok(())
    }

    /// The end of the input flushes durably, then finishes (commits) the sinks and stops;
    /// closing without an end aborts before the flush; nothing is done after either.
    #[test]
    fn end_finishes_and_close_aborts_the_sinks() -> Result<()> {
        let mut book = SinkBook::new(2);
        assert_eq!(
            book.on(SinkEvent::InputEnd)?,
            vec![SinkAction::FlushDurable, SinkAction::FinishSinks, SinkAction::Stop(SinkStop::End)]
        );
        assert_eq!(book.stopped(), Some(SinkStop::End));
        assert_eq!(book.on(SinkEvent::Complete { checkpoint_id: 1 })?, vec![]);
        assert_eq!(book.on(SinkEvent::InputClosed)?, vec![]);

        let mut book = SinkBook::new(2);
        book.on(SinkEvent::BarrierArrived { checkpoint_id: 1 })?;
        assert_eq!(
            book.on(SinkEvent::InputClosed)?,
            vec![SinkAction::AbortSinks, SinkAction::FlushDurable, SinkAction::Stop(SinkStop::Closed)]
        );
        assert_eq!(book.stopped(), Some(SinkStop::Closed));
        assert_eq!(book.on(SinkEvent::BarrierArrived { checkpoint_id: 2 })?, vec![]);
        Ok(())
    }
}
