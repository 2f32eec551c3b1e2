//! The splits of a `datagen` sequence, and how a subtask reads them.
//!
//! A [`SequenceSplit`] is an arithmetic progression `next, next + step, next + 2·step, ...`
//! (bounded by the source's `start + number-of-rows`, if any, and by `i64::MAX`). Subtask `i` of
//! `p` starts with one split, `{next: start + i, step: p}`, so the subtasks together emit every
//! number once. A subtask may own several splits after a rescale; its [`SequenceReader`] emits
//! their values smallest first, and its checkpoint state is the splits with their `next`.
//!
//! A split divides into `k` interleaved splits (`{next + j·step, k·step}`, `j < k`) that
//! together hold exactly its values, and `k` splits of one step whose `next`s are
//! `a, a + step/k, ..., a + (k-1)·step/k` merge back into `{a, step/k}`. The redistribution of
//! a rescale ([`crate::rescale`]) only divides, merges and moves splits, so no value is lost or
//! emitted twice.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use serde::{Deserialize, Serialize};

/// An arithmetic progression of sequence numbers that one subtask owns. Orders by `next`, then
/// `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SequenceSplit {
    /// The next number to emit.
    pub next: i64,
    /// The distance between two numbers of the split; at least 1.
    pub step: i64,
}

impl SequenceSplit {
    /// The split of subtask `subtask` of `parallelism` of a sequence starting at `start` (no
    /// split when `start + subtask` overflows: that subtask has nothing to emit).
    pub fn initial(start: i64, subtask: u32, parallelism: u32) -> Option<SequenceSplit> {
        let next = start.checked_add(i64::from(subtask))?;
        Some(SequenceSplit { next, step: i64::from(parallelism.max(1)) })
    }

    /// Divides the split into `parts` interleaved splits holding exactly its values: part `j`
    /// starts at `next + j·step` with step `parts·step`. Parts starting beyond `i64::MAX` hold
    /// nothing and are left out. `None` when `parts·step` overflows (the split is kept whole).
    pub fn divide(self, parts: u64) -> Option<Vec<SequenceSplit>> {
        let parts_i = i64::try_from(parts.max(1)).ok()?;
        let step = self.step.checked_mul(parts_i)?;
        let mut out = Vec::new();
        for j in 0..parts_i {
            match j.checked_mul(self.step).and_then(|o| self.next.checked_add(o)) {
                Some(next) => out.push(SequenceSplit { next, step }),
                None => break,
            }
        }
        Some(out)
    }

    /// The share of all numbers this split holds (`1 / step`).
    pub fn weight(&self) -> f64 {
        1.0 / self.step as f64
    }
}

/// Merges splits that form one progression: `k` splits of step `s` whose `next`s are
/// `a, a + s/k, ..., a + (k-1)·s/k` become `{a, s/k}`, repeated while anything merges. A
/// subtask reading its splits smallest first keeps them in such a lockstep, so its splits merge
/// back into one when a rescale gives them to one subtask. The result is sorted. Merging is an
/// optimisation (fewer splits); what the splits hold does not change.
pub fn merge(splits: Vec<SequenceSplit>) -> Vec<SequenceSplit> {
    let mut splits = splits;
    loop {
        let mut by_step: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for s in &splits {
            by_step.entry(s.step).or_default().push(s.next);
        }
        let mut merged = None;
        for (step, nexts) in by_step.iter_mut() {
            let k = nexts.len() as i64;
            if k < 2 || step % k != 0 {
                continue;
            }
            nexts.sort_unstable();
            let d = step / k;
            let first = nexts[0];
            let lockstep = nexts.iter().enumerate().all(|(i, n)| {
                i64::try_from(i).ok().and_then(|i| i.checked_mul(d)).and_then(|o| first.checked_add(o))
                    == Some(*n)
            });
            if lockstep {
                merged = Some((*step, SequenceSplit { next: first, step: d }));
                break;
            }
        }
        match merged {
            Some((step, whole)) => {
                splits.retain(|s| s.step != step);
                splits.push(whole);
            }
            None => break,
        }
    }
    splits.sort_unstable();
    splits
}

/// Reads a subtask's splits smallest number first, up to an exclusive `end` (if bounded).
#[derive(Debug, Clone)]
pub struct SequenceReader {
    /// Splits by their next number, smallest on top. A split whose next number would overflow
    /// is dropped: it has nothing more to emit.
    splits: BinaryHeap<Reverse<SequenceSplit>>,
    end: Option<i64>,
}

impl SequenceReader {
    pub fn new(splits: impl IntoIterator<Item = SequenceSplit>, end: Option<i64>) -> SequenceReader {
        SequenceReader { splits: splits.into_iter().map(Reverse).collect(), end }
    }

    /// Nothing more to emit: no split left, or every next number at or past the end.
    pub fn is_exhausted(&self) -> bool {
        match self.splits.peek() {
            None => true,
            Some(Reverse(s)) => self.end.is_some_and(|end| s.next >= end),
        }
    }

    /// The smallest number not emitted yet, if any is left.
    pub fn next_value(&mut self) -> Option<i64> {
        if self.is_exhausted() {
            return None;
        }
        let mut top = self.splits.peek_mut()?;
        let value = top.0.next;
        match value.checked_add(top.0.step) {
            Some(next) => top.0.next = next,
            None => {
                std::collections::binary_heap::PeekMut::pop(top);
            }
        }
        Some(value)
    }

    /// Emits up to `max` numbers, smallest first.
    pub fn take(&mut self, max: usize) -> Vec<i64> {
        if self.splits.len() == 1 {
            // One split (no rescale yet): a plain progression, computed as a whole: how many
            // numbers are left before the end (or before i64 overflows), then one tight loop.
            let end = self.end;
            let mut exhausted = false;
            let mut out = Vec::new();
            if let Some(mut top) = self.splits.peek_mut() {
                let (next, step) = (i128::from(top.0.next), i128::from(top.0.step.max(1)));
                let limit = end.map_or(i128::from(i64::MAX) + 1, i128::from);
                let left = if next < limit { (limit - next - 1) / step + 1 } else { 0 };
                let n = left.min(max as i128);
                let count = usize::try_from(n).unwrap_or(0);
                out.reserve(count.min(1 << 16));
                let (first, step64) = (top.0.next, top.0.step.max(1));
                // first + k * step stays within i64 for k < count (`left` saw to it), although
                // k * step alone may not: wrapping arithmetic gives the exact value.
                out.extend((0..count as i64).map(|k| first.wrapping_add(k.wrapping_mul(step64))));
                match i64::try_from(next + n * step) {
                    Ok(after) => top.0.next = after,
                    Err(_) => exhausted = true,
                }
            }
            if exhausted {
                self.splits.clear();
            }
            return out;
        }
        let mut out = Vec::with_capacity(max.min(8192));
        while out.len() < max {
            match self.next_value() {
                Some(v) => out.push(v),
                None => break,
            }
        }
        out
    }

    /// The splits with their next numbers (the checkpoint state), sorted.
    pub fn splits(&self) -> Vec<SequenceSplit> {
        let mut out: Vec<SequenceSplit> = self.splits.iter().map(|r| r.0).collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn values(splits: &[SequenceSplit], end: i64) -> Vec<i64> {
        let mut r = SequenceReader::new(splits.iter().copied(), Some(end));
        r.take(usize::MAX)
    }

    /// Dividing a split gives interleaved splits that hold exactly its values; merging them
    /// back gives the split again.
    #[test]
    fn divide_then_merge_is_the_identity() {
        let s = SequenceSplit { next: 7, step: 3 };
        for parts in 1..=7u64 {
            let divided = s.divide(parts).unwrap_or_default();
            assert_eq!(divided.len() as u64, parts);
            let mut all: Vec<i64> = divided.iter().flat_map(|d| values(&[*d], 500)).collect();
            all.sort_unstable();
            assert_eq!(all, values(&[s], 500), "parts {parts}");
            assert_eq!(merge(divided), vec![s], "parts {parts}");
        }
    }

    /// Splits not in lockstep, or of different steps, are not merged.
    #[test]
    fn merge_keeps_splits_that_are_not_one_progression() {
        let apart = vec![SequenceSplit { next: 0, step: 2 }, SequenceSplit { next: 3, step: 2 }];
        assert_eq!(merge(apart.clone()), apart);
        let residues = vec![
            SequenceSplit { next: 1200, step: 6 },
            SequenceSplit { next: 1201, step: 6 },
            SequenceSplit { next: 1202, step: 6 },
        ];
        assert_eq!(merge(residues.clone()), residues);
        // Four splits of step 8, two apart, are one progression of step 2.
        let four: Vec<SequenceSplit> = (0..4).map(|j| SequenceSplit { next: 10 + 2 * j, step: 8 }).collect();
        assert_eq!(merge(four), vec![SequenceSplit { next: 10, step: 2 }]);
    }

    /// A reader emits the numbers of all its splits smallest first, each once, up to the end.
    #[test]
    fn reader_emits_smallest_first_up_to_the_end() {
        let splits = [SequenceSplit { next: 5, step: 3 }, SequenceSplit { next: 0, step: 3 }];
        let mut r = SequenceReader::new(splits, Some(12));
        assert_eq!(r.take(3), vec![0, 3, 5]);
        assert_eq!(r.splits(), vec![SequenceSplit { next: 6, step: 3 }, SequenceSplit { next: 8, step: 3 }]);
        assert_eq!(r.take(usize::MAX), vec![6, 8, 9, 11]);
        assert!(r.is_exhausted());
        let all: BTreeSet<i64> = values(&splits, 12).into_iter().collect();
        assert_eq!(all.len(), 7);
    }

    /// A split that reaches i64::MAX stops instead of wrapping around.
    #[test]
    fn overflow_ends_a_split() {
        let mut r = SequenceReader::new([SequenceSplit { next: i64::MAX - 3, step: 2 }], None);
        assert_eq!(r.take(10), vec![i64::MAX - 3, i64::MAX - 1]);
        assert!(r.is_exhausted());
        assert!(r.splits().is_empty());
        assert_eq!(SequenceSplit::initial(i64::MAX, 1, 2), None);
        // Parts that would start beyond i64::MAX are empty and left out.
        let parts = SequenceSplit { next: i64::MAX - 1, step: 1 }.divide(4).unwrap_or_default();
        assert_eq!(parts.len(), 2);
    }
}
