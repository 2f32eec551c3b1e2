//! The exact accounting of a run, from the whole input and output topics.
//!
//! - **in**: distinct numbers in the input topic (and its records, with duplicates a failed
//!   delivery produced again); **out**: records in the output topic.
//! - **lost**: input numbers missing from the output. **duplicated**: output records beyond the
//!   first of each number; *by the job*: beyond the input's own copies.
//! - **out of order per key**: every key's numbers reach the output in increasing order unless
//!   the job replayed them: a *rewind* is a number not above the key's highest so far.
//! - **replay checks** (each rewind): a restored task starts reading at its checkpoint's
//!   positions, so a key's replay must start exactly at the first record of that key at or
//!   after the partition's position in some completed checkpoint (the topic's start counts as
//!   one). A rewind anywhere else means two attempts wrote at once: records of an attempt
//!   that should have stopped interleaved with its successor's. And the replay must not start
//!   before the position of the latest checkpoint completed before the fault that caused it:
//!   "at most what arrived since the last completed checkpoint".

use std::collections::{BTreeMap, HashMap};

use super::observe::{Completed, OutRecord};
use super::workload::{key_of, partition_of_key};

/// One input record.
#[derive(Debug, Clone, Copy)]
pub struct InRecord {
    pub partition: i32,
    pub offset: i64,
    pub n: u64,
}

/// A rewind of one key in the output.
#[derive(Debug, Clone)]
pub struct Rewind {
    pub key: u64,
    /// The key's highest number before the rewind, and the number it went back to.
    pub from: u64,
    pub to: u64,
    pub at_ms: u64,
    /// The fault it follows (index in the schedule), if any.
    pub fault: Option<usize>,
    /// Records of the replay (numbers at or below `from` after the rewind).
    pub replayed: u64,
    pub verdict: RewindVerdict,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RewindVerdict {
    /// Starts at the position of checkpoint `id` (0: the topic's start), not before the last
    /// checkpoint completed before the fault.
    FromCheckpoint(u64),
    /// Starts at no completed checkpoint's position: two attempts interleaved.
    NotACheckpoint,
    /// Starts before the latest checkpoint completed before the fault (`id`).
    BeforeLatest { restored: u64, latest: u64 },
    /// After a broker fault, at no checkpoint's position but after the latest checkpoint
    /// completed before the fault (`latest`, 0: none): the sink's producer sent again a batch
    /// the broker had written without acknowledging it (at-least-once; within what arrived
    /// since the last completed checkpoint).
    Resent { latest: u64 },
    /// The number is not in the input, or no positions were known.
    Unverifiable(String),
}

#[derive(Debug, Default)]
pub struct Accounting {
    pub in_numbers: u64,
    pub in_records: u64,
    pub in_duplicates: u64,
    /// Numbers below the workload's end that the input does not hold (the producer lost them).
    pub in_gaps: Vec<u64>,
    pub out_records: u64,
    pub out_distinct: u64,
    pub lost: Vec<u64>,
    pub duplicates: u64,
    pub duplicates_by_job: u64,
    pub unknown: Vec<u64>,
    pub garbage: usize,
    /// Keys whose records went to more than one output partition.
    pub split_keys: Vec<u64>,
    pub rewinds: Vec<Rewind>,
}

impl Accounting {
    pub fn bad_rewinds(&self) -> impl Iterator<Item = &Rewind> {
        self.rewinds.iter().filter(|r| {
            matches!(r.verdict, RewindVerdict::NotACheckpoint | RewindVerdict::BeforeLatest { .. })
        })
    }

    pub fn unverifiable(&self) -> usize {
        self.rewinds.iter().filter(|r| matches!(r.verdict, RewindVerdict::Unverifiable(_))).count()
    }

    pub fn replayed_by_fault(&self) -> BTreeMap<Option<usize>, u64> {
        let mut m = BTreeMap::new();
        for r in &self.rewinds {
            *m.entry(r.fault).or_default() += r.replayed;
        }
        m
    }
}

/// `faults`: (schedule index, injection time, bound), in time order, times in ms since the run
/// started. A rewind belongs to the last fault injected before it arrived; it must not start
/// before the latest checkpoint completed before that fault's *bound*: its injection time, or
/// an earlier fault's when the output had not caught up before it (a late replay of the
/// previous fault may then arrive after this one).
pub fn account(
    end: u64,
    input: &[InRecord],
    output: &[OutRecord],
    garbage: usize,
    completed: &[Completed],
    faults: &[(usize, u64, u64)],
    broker_faults: &[usize],
) -> Accounting {
    let mut acc = Accounting { garbage, ..Accounting::default() };
    // Input: counts, and each number's first (partition, offset).
    let mut in_counts: HashMap<u64, u64> = HashMap::with_capacity(input.len());
    let mut in_at: HashMap<u64, (i32, i64)> = HashMap::with_capacity(input.len());
    // Per key: the offsets of its records, sorted.
    let mut key_offsets: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    for r in input {
        *in_counts.entry(r.n).or_default() += 1;
        in_at
            .entry(r.n)
            .and_modify(|e| *e = (*e).min((r.partition, r.offset)))
            .or_insert((r.partition, r.offset));
        key_offsets.entry(key_of(r.n)).or_default().push(r.offset);
    }
    for offsets in key_offsets.values_mut() {
        offsets.sort_unstable();
        offsets.dedup();
    }
    acc.in_records = input.len() as u64;
    acc.in_numbers = in_counts.len() as u64;
    acc.in_duplicates = in_counts.values().map(|c| c - 1).sum();
    acc.in_gaps = (0..end).filter(|n| !in_counts.contains_key(n)).collect();

    let mut out_counts: HashMap<u64, u64> = HashMap::with_capacity(output.len());
    for r in output {
        *out_counts.entry(r.n).or_default() += 1;
    }
    acc.out_records = output.len() as u64;
    acc.out_distinct = out_counts.len() as u64;
    let mut lost: Vec<u64> = in_counts.keys().filter(|n| !out_counts.contains_key(n)).copied().collect();
    lost.sort_unstable();
    acc.lost = lost;
    acc.duplicates = out_counts.values().map(|c| c - 1).sum();
    acc.duplicates_by_job =
        out_counts.iter().map(|(n, c)| c.saturating_sub(in_counts.get(n).copied().unwrap_or(0).max(1))).sum();
    let mut unknown: Vec<u64> = out_counts.keys().filter(|n| !in_counts.contains_key(n)).copied().collect();
    unknown.sort_unstable();
    acc.unknown = unknown;

    // Per key, in output order (per partition, by offset).
    let mut by_key: BTreeMap<u64, Vec<&OutRecord>> = BTreeMap::new();
    for r in output {
        by_key.entry(r.key).or_default().push(r);
    }
    for (key, records) in &mut by_key {
        records.sort_by_key(|r| (r.partition, r.offset));
        let parts: std::collections::BTreeSet<i32> = records.iter().map(|r| r.partition).collect();
        if parts.len() > 1 {
            acc.split_keys.push(*key);
        }
        let mut high: Option<u64> = None;
        // The last number of the replay in progress, and its rewind's index.
        let mut open: Option<(usize, u64)> = None;
        for r in records.iter() {
            match high {
                Some(h) if r.n <= h => {
                    if let Some((i, last)) = open {
                        if r.n > last {
                            acc.rewinds[i].replayed += 1;
                            open = Some((i, r.n));
                            continue;
                        }
                    }
                    // The output arrives here late when the reader lags behind, so the fault that caused the replay may be any of those
                    // shortly before its arrival: the latest one the replay is consistent with
                    // (from a checkpoint not older than the latest completed before it) is taken.
                    let candidates: Vec<(usize, u64, u64)> = faults
                        .iter()
                        .rev()
                        .filter(|(_, t, _)| *t <= r.at_ms && r.at_ms - *t <= ATTRIBUTION_WINDOW_MS)
                        .copied()
                        .collect();
                    let judged: Vec<((usize, u64, u64), RewindVerdict)> = candidates
                        .iter()
                        .map(|f| {
                            let resend = broker_faults.contains(&f.0);
                            (*f, judge(*key, r.n, Some(f.2), resend, &in_at, &key_offsets, completed))
                        })
                        .collect();
                    let (fault, verdict) = match judged
                        .iter()
                        .find(|(_, v)| !matches!(v, RewindVerdict::BeforeLatest { .. }))
                        .or(judged.first())
                    {
                        Some((f, v)) => (Some(*f), v.clone()),
                        None => {
                            let f = faults.iter().rev().find(|(_, t, _)| *t <= r.at_ms).copied();
                            let resend = f.is_some_and(|f| broker_faults.contains(&f.0));
                            (f, judge(*key, r.n, f.map(|f| f.2), resend, &in_at, &key_offsets, completed))
                        }
                    };
                    acc.rewinds.push(Rewind {
                        key: *key,
                        from: h,
                        to: r.n,
                        at_ms: r.at_ms,
                        fault: fault.map(|f| f.0),
                        replayed: 1,
                        verdict,
                    });
                    open = Some((acc.rewinds.len() - 1, r.n));
                }
                _ => {
                    high = Some(r.n);
                    open = None;
                }
            }
        }
    }
    acc
}

/// How long before a replayed record's arrival the fault that caused it may lie (the reader's
/// lag behind the job after a fault).
const ATTRIBUTION_WINDOW_MS: u64 = 30_000;

/// The verdict on a replay of `key` starting at number `to`.
fn judge(
    key: u64,
    to: u64,
    fault_ms: Option<u64>,
    resend_ok: bool,
    in_at: &HashMap<u64, (i32, i64)>,
    key_offsets: &BTreeMap<u64, Vec<i64>>,
    completed: &[Completed],
) -> RewindVerdict {
    let Some(&(partition, offset)) = in_at.get(&to) else {
        return RewindVerdict::Unverifiable(format!("{to} is not in the input"));
    };
    let Some(offsets) = key_offsets.get(&key) else {
        return RewindVerdict::Unverifiable("no input offsets".into());
    };
    let expected = partition_of_key(key) as i32;
    if partition != expected {
        return RewindVerdict::Unverifiable(format!("{to} is in partition {partition}, not {expected}"));
    }
    // The first record of `key` at or after `position`.
    let first_at = |position: i64| offsets.iter().copied().find(|o| *o >= position);
    let restored = std::iter::once((0u64, 0i64))
        .chain(completed.iter().filter_map(|c| c.positions.get(&partition).map(|p| (c.checkpoint_id, *p))))
        .filter(|(_, p)| first_at(*p) == Some(offset))
        .map(|(id, _)| id)
        .max();
    // The latest checkpoint completed (as the watch saw it) before the fault.
    let latest = fault_ms.and_then(|t| {
        completed
            .iter()
            .filter(|c| c.seen_ms <= t)
            .filter_map(|c| c.positions.get(&partition).map(|p| (c.checkpoint_id, *p)))
            .next_back()
    });
    let Some(restored) = restored else {
        if completed.iter().all(|c| c.positions.is_empty()) {
            return RewindVerdict::Unverifiable("no checkpoint positions were read".into());
        }
        let after_latest = latest.is_none_or(|(_, pos)| first_at(pos).is_some_and(|o| offset >= o));
        if resend_ok && after_latest {
            return RewindVerdict::Resent { latest: latest.map_or(0, |l| l.0) };
        }
        return RewindVerdict::NotACheckpoint;
    };
    match latest {
        Some((latest_id, latest_pos)) if first_at(latest_pos).is_some_and(|o| offset < o) => {
            RewindVerdict::BeforeLatest { restored, latest: latest_id }
        }
        _ => RewindVerdict::FromCheckpoint(restored),
    }
}

/// p50 and max of `xs` (ms); `None` when empty.
pub fn p50_max(xs: &[u64]) -> Option<(u64, u64)> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_unstable();
    Some((v[(v.len() - 1) / 2], v[v.len() - 1]))
}

/// p50, p99 and max of `xs`; `None` when empty.
pub fn p50_p99_max(xs: &[u64]) -> Option<(u64, u64, u64)> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some((at(0.5), at(0.99), v[v.len() - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::workload::{partition_of, IN_PARTITIONS, KEYS};

    fn input(end: u64) -> Vec<InRecord> {
        // Offsets per partition in number order.
        let mut next: HashMap<u64, i64> = HashMap::new();
        (0..end)
            .map(|n| {
                let p = partition_of(n);
                let o = next.entry(p).or_default();
                *o += 1;
                InRecord { partition: p as i32, offset: *o - 1, n }
            })
            .collect()
    }

    fn out(ns: &[u64]) -> Vec<OutRecord> {
        let mut offsets: HashMap<u64, i64> = HashMap::new();
        ns.iter()
            .enumerate()
            .map(|(i, &n)| {
                let o = offsets.entry(key_of(n)).or_default();
                *o += 1;
                OutRecord { partition: key_of(n) as i32 % 3, offset: *o, key: key_of(n), n, at_ms: i as u64 }
            })
            .collect()
    }

    fn checkpoint(id: u64, seen_ms: u64, positions: &[(i32, i64)]) -> Completed {
        Completed {
            checkpoint_id: id,
            epoch: 1,
            attempt: 1,
            revision: id,
            seen_ms,
            trigger_wall_ms: 0,
            positions: positions.iter().copied().collect(),
        }
    }

    /// Every input partition at the position of the first number >= `first` in it (`first` a
    /// multiple of the partition count: partition p holds p, p + P, p + 2P ... at offsets 0, 1, 2).
    fn at(first: u64) -> Vec<(i32, i64)> {
        (0..IN_PARTITIONS).map(|p| (p as i32, (first / IN_PARTITIONS) as i64)).collect()
    }

    #[test]
    fn clean_run_counts_and_loss() {
        let inp = input(100);
        let ns: Vec<u64> = (0..100).filter(|n| *n != 37).collect();
        let acc = account(100, &inp, &out(&ns), 0, &[], &[], &[]);
        assert_eq!(acc.in_numbers, 100);
        assert_eq!(acc.lost, vec![37]);
        assert_eq!(acc.duplicates, 0);
        assert!(acc.rewinds.is_empty());
    }

    #[test]
    fn replay_from_a_checkpoint_is_accepted_and_an_interleaving_is_not() {
        let inp = input(240);
        // Checkpoint 5 has every partition at the numbers 24, 25, 26.
        let cp = [checkpoint(5, 10, &at(24))];
        let mut ns: Vec<u64> = (0..120).collect();
        ns.extend(24..240); // a replay from checkpoint 5, fault at 100
        let acc = account(240, &inp, &out(&ns), 0, &cp, &[(1, 100, 100)], &[]);
        let key0: Vec<&Rewind> = acc.rewinds.iter().filter(|r| r.key == 0).collect();
        assert_eq!(key0.len(), 1, "{:?}", acc.rewinds);
        assert_eq!(key0[0].verdict, RewindVerdict::FromCheckpoint(5));
        assert_eq!(key0[0].fault, Some(1));
        assert_eq!(acc.bad_rewinds().count(), 0);
        assert_eq!(acc.duplicates, 96);
        assert_eq!(acc.replayed_by_fault().get(&Some(1)), Some(&96));

        // Two writers: key 0's sequence 0..=108, then 24, 120, 36, 132 ...: old and new interleaved.
        let mut ns: Vec<u64> = (0..=108).filter(|n| n % KEYS == 0).collect();
        for i in 0..5 {
            ns.push(24 + 12 * i);
            ns.push(120 + 12 * i);
        }
        let acc = account(240, &inp, &out(&ns), 0, &cp, &[(1, 5, 5)], &[]);
        assert!(acc.bad_rewinds().any(|r| r.verdict == RewindVerdict::NotACheckpoint), "{:?}", acc.rewinds);
    }

    #[test]
    fn a_replay_older_than_the_last_checkpoint_before_the_fault_is_reported() {
        let inp = input(240);
        let cp = [checkpoint(5, 10, &at(24)), checkpoint(6, 20, &at(60))];
        let mut ns: Vec<u64> = (0..120).collect();
        ns.extend(24..240);
        let acc = account(240, &inp, &out(&ns), 0, &cp, &[(1, 100, 100)], &[]);
        assert!(
            acc.rewinds.iter().any(|r| r.verdict == RewindVerdict::BeforeLatest { restored: 5, latest: 6 }),
            "{:?}",
            acc.rewinds
        );
    }

    /// After a broker fault, a batch written again by the sink (at no checkpoint's position,
    /// after the last checkpoint) is a resend; after another fault, or reaching back before the
    /// last checkpoint, it is not accepted.
    #[test]
    fn a_batch_sent_again_after_a_broker_fault_is_a_resend_and_only_then() {
        let inp = input(240);
        let cp = [checkpoint(5, 10, &at(24))];
        // 0..120, then 96..240 again: 96 is no checkpoint's position, after checkpoint 5's (24).
        let mut ns: Vec<u64> = (0..120).collect();
        ns.extend(96..240);
        let acc = account(240, &inp, &out(&ns), 0, &cp, &[(1, 100, 100)], &[1]);
        assert!(
            acc.rewinds.iter().all(|r| r.verdict == RewindVerdict::Resent { latest: 5 }),
            "{:?}",
            acc.rewinds
        );
        assert_eq!(acc.bad_rewinds().count(), 0);
        // The same output after a fault that is not the broker's: two writers.
        let acc = account(240, &inp, &out(&ns), 0, &cp, &[(1, 100, 100)], &[]);
        assert!(acc.bad_rewinds().any(|r| r.verdict == RewindVerdict::NotACheckpoint), "{:?}", acc.rewinds);
        // Reaching back before the last checkpoint (12 < 24) is not a resend either.
        let mut ns: Vec<u64> = (0..120).collect();
        ns.extend(12..240);
        let acc = account(240, &inp, &out(&ns), 0, &cp, &[(1, 100, 100)], &[1]);
        assert!(acc.bad_rewinds().count() > 0, "{:?}", acc.rewinds);
    }

    #[test]
    fn percentiles() {
        assert_eq!(p50_max(&[]), None);
        assert_eq!(p50_max(&[5]), Some((5, 5)));
        assert_eq!(p50_max(&[9, 1, 5, 7]), Some((5, 9)));
    }
}
