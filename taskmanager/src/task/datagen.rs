//! The `datagen` source: sequence numbers split over the subtasks, paced in small batches.
//!
//! The source's state is a set of splits ([`SequenceSplit`]: arithmetic progressions with their
//! next number). Without a restored state, subtask `i` of `p` owns one, `start + i`,
//! `start + i + p`, `start + i + 2p`, ... so the subtasks together emit every number exactly
//! once. After a rescale the JobManager hands each subtask its share of the splits
//! (`keel_state::rescale`); a subtask emits the numbers of its splits smallest first. With
//! `number-of-rows = n` the numbers stop before `start + n`.

use std::time::Duration;

use keel_proto::{KeelError, Result};
use keel_spec::DatagenOptions;
use keel_state::{SequenceReader, SequenceSplit};
use tokio::time::Instant;

/// The most records emitted in one batch.
pub const MAX_BATCH: usize = 8192;
/// A source that fell behind its rate (backpressure, a pause) catches up by at most this much.
const MAX_CATCH_UP: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Datagen {
    /// The splits this subtask owns, bounded by `start + number-of-rows`.
    reader: SequenceReader,
    /// Rows per second of this subtask.
    rate: f64,
    /// Pacing: `emitted` records have been emitted since `epoch`.
    epoch: Option<Instant>,
    emitted: u64,
}

impl Datagen {
    /// The source of `subtask` of `parallelism`. `restore` is the splits from a snapshot (the
    /// JobManager gave this subtask); without it, the subtask's own progression from `start`.
    pub fn new(
        options: &DatagenOptions,
        subtask: u32,
        parallelism: u32,
        restore: Option<&[SequenceSplit]>,
    ) -> Result<Datagen> {
        if parallelism == 0 || subtask >= parallelism {
            return Err(KeelError::InvalidArgument {
                reason: format!("subtask {subtask} is not within parallelism {parallelism}"),
            });
        }
        let end = options.number_of_rows.and_then(|n| options.start.checked_add_unsigned(n));
        let splits: Vec<SequenceSplit> = match restore {
            Some(splits) => {
                if let Some(bad) = splits.iter().find(|s| s.step < 1) {
                    return Err(KeelError::InvalidArgument {
                        reason: format!("restored datagen split {bad:?} has a step below 1"),
                    });
                }
                splits.to_vec()
            }
            None => SequenceSplit::initial(options.start, subtask, parallelism).into_iter().collect(),
        };
        Ok(Datagen {
            reader: SequenceReader::new(splits, end),
            rate: options.rows_per_second / f64::from(parallelism),
            epoch: None,
            emitted: 0,
        })
    }

    /// The splits with their next numbers (this source's state).
    pub fn splits(&self) -> Vec<SequenceSplit> {
        self.reader.splits()
    }

    pub fn is_exhausted(&self) -> bool {
        self.reader.is_exhausted()
    }

    /// Emits up to `max` numbers, without pacing.
    pub fn take(&mut self, max: usize) -> Vec<i64> {
        self.reader.take(max)
    }

    /// When the next record is due (now, before the first).
    pub fn next_due(&self) -> Instant {
        match self.epoch {
            None => Instant::now(),
            Some(epoch) => epoch + Duration::from_secs_f64(self.emitted as f64 / self.rate),
        }
    }

    /// Emits the numbers due at `now` (at most [`MAX_BATCH`]). The rate is kept against the time
    /// of the first emission, so it does not drift; a source held back by backpressure catches
    /// up by at most one second's worth of records.
    pub fn emit_due(&mut self, now: Instant) -> Vec<i64> {
        let epoch = *self.epoch.get_or_insert(now);
        let elapsed = now.saturating_duration_since(epoch).as_secs_f64();
        let mut allowed = (elapsed * self.rate).floor() as u64 + 1;
        let max_owed = (self.rate * MAX_CATCH_UP.as_secs_f64()).max(1.0) as u64;
        if allowed.saturating_sub(self.emitted) > max_owed {
            // Behind by more than the catch-up window: move the epoch so that we are behind by
            // exactly that window.
            let target = self.emitted + max_owed;
            let shift = Duration::from_secs_f64((target.saturating_sub(1)) as f64 / self.rate);
            self.epoch = Some(now.checked_sub(shift).unwrap_or(now));
            allowed = target;
        }
        let due = allowed.saturating_sub(self.emitted).min(MAX_BATCH as u64) as usize;
        let out = self.take(due);
        self.emitted += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn options(rate: f64, rows: Option<u64>, start: i64) -> DatagenOptions {
        DatagenOptions { rows_per_second: rate, number_of_rows: rows, start }
    }

    /// For several parallelisms and row counts (multiples or not), the subtasks together emit
    /// every number of `[start, start + n)` exactly once.
    #[test]
    fn subtasks_cover_every_number_exactly_once() {
        for p in 1..=5u32 {
            for n in [0u64, 1, 7, 100, 1001] {
                let opts = options(1000.0, Some(n), -3);
                let mut all = Vec::new();
                for i in 0..p {
                    let mut g = Datagen::new(&opts, i, p, None).expect("datagen");
                    let values = g.take(usize::MAX);
                    assert!(g.is_exhausted());
                    // Each subtask emits an increasing arithmetic sequence.
                    assert!(values.windows(2).all(|w| w[1] - w[0] == i64::from(p)));
                    all.extend(values);
                }
                let unique: BTreeSet<i64> = all.iter().copied().collect();
                assert_eq!(unique.len(), all.len(), "duplicates for p={p} n={n}");
                let expected: BTreeSet<i64> = (-3..-3 + n as i64).collect();
                assert_eq!(unique, expected, "p={p} n={n}");
            }
        }
    }

    /// Restoring from the snapshot's splits continues the sequence with no gap and no
    /// duplicate; a split with a step below 1 and a subtask out of range are refused.
    #[test]
    fn restore_continues_the_sequence() {
        let opts = options(1000.0, Some(50), 10);
        let mut g = Datagen::new(&opts, 1, 3, None).expect("datagen");
        let first = g.take(5);
        let state = g.splits();
        let mut restored = Datagen::new(&opts, 1, 3, Some(&state)).expect("restore");
        let rest = restored.take(usize::MAX);
        let mut fresh = Datagen::new(&opts, 1, 3, None).expect("datagen");
        let all = fresh.take(usize::MAX);
        assert_eq!([first, rest].concat(), all);
        assert!(Datagen::new(&opts, 1, 3, Some(&[SequenceSplit { next: 1, step: 0 }])).is_err());
        assert!(Datagen::new(&opts, 3, 3, None).is_err());
        // An empty set of splits is a finished source, not a fresh start.
        assert!(Datagen::new(&opts, 0, 3, Some(&[])).expect("empty").is_exhausted());
    }

    /// A subtask owning several splits (after a rescale) emits their numbers smallest first.
    #[test]
    fn several_splits_are_emitted_smallest_first() {
        let opts = options(1000.0, Some(12), 0);
        let splits = [SequenceSplit { next: 4, step: 6 }, SequenceSplit { next: 1, step: 6 }];
        let mut g = Datagen::new(&opts, 0, 2, Some(&splits)).expect("datagen");
        assert_eq!(g.take(usize::MAX), vec![1, 4, 7, 10]);
        assert!(g.is_exhausted());
    }

    /// An unbounded sequence ending at i64::MAX stops instead of wrapping around.
    #[test]
    fn overflow_stops_the_sequence() {
        let opts = options(1000.0, None, i64::MAX - 3);
        let mut g = Datagen::new(&opts, 0, 2, None).expect("datagen");
        assert_eq!(g.take(10), vec![i64::MAX - 3, i64::MAX - 1]);
        assert!(g.is_exhausted());
    }

    /// Pacing follows the rate against the first emission, and catches up by at most a second.
    #[test]
    fn pacing_follows_the_rate_without_drift() {
        let opts = options(200.0, None, 0);
        let mut g = Datagen::new(&opts, 0, 2, None).expect("datagen"); // 100 rows/s
        let t0 = Instant::now();
        assert_eq!(g.emit_due(t0).len(), 1);
        assert_eq!(g.emit_due(t0 + Duration::from_millis(5)).len(), 0);
        assert_eq!(g.next_due(), t0 + Duration::from_millis(10));
        // 10 ms steps for 1 s: 100 more records (+ the first).
        let mut total = 1;
        for k in 1..=100 {
            total += g.emit_due(t0 + Duration::from_millis(10 * k)).len();
        }
        assert_eq!(total, 101);
        // Stalled for 10 s: at most one second's worth (100) is emitted at once.
        let late = g.emit_due(t0 + Duration::from_secs(11));
        assert_eq!(late.len(), 100);
        assert!(g.emit_due(t0 + Duration::from_secs(11)).is_empty());
    }
}
