//! The redistribution of a rescale: the subtask states of a checkpoint taken at one parallelism
//! become the restore states of another. Every source's state is a set of splits, and the
//! splits move, whole or divided, to the new subtasks:
//!
//! - **Kafka**: a partition is a split. The offsets of every old subtask are merged and each new
//!   subtask gets the offsets of the partitions it owns under the new parallelism
//!   ([`crate::kafka::owner`], the rule its reader applies). A new subtask that owns none of them
//!   still gets the (empty) state: a partition missing from it appeared after the checkpoint and
//!   is read from its earliest offset.
//! - **datagen**: a split is an arithmetic progression ([`crate::sequence`]). The splits of the
//!   old subtasks are merged where they form one progression, then divided into equal-step
//!   parts whose number is a multiple of the new parallelism, and dealt out round-robin in
//!   order of their next number: every new subtask gets the same share of the remaining numbers.
//!   (1 -> 3: the one progression becomes three interleaved ones, one per subtask.) When that
//!   would need more than [`MAX_SPLITS`] parts, the largest splits are divided only until there
//!   are enough to go round, and dealt out to the least loaded subtask.
//! - **Sinks**: state is dropped. A rescale restores from a drain savepoint (`keel rescale`, an
//!   upgrade, `keel stop`), whose transactions committed before the old version ended; an
//!   exactly-once sink's state names the transactional id of its old subtask, which a new
//!   subtask of another index could not take over.
//!
//! At the same parallelism nothing moves: every subtask gets its own state back, sinks included.

use std::collections::BTreeMap;

use crate::kafka::owner;
use crate::sequence::{merge, SequenceSplit};
use crate::snapshot::{SourceSnapshot, TaskSnapshot};
use crate::StateError;

/// The most splits one datagen source is divided into by the even redistribution.
pub const MAX_SPLITS: u128 = 4096;

/// The restore states of `parallelism` subtasks from `states`, the states of a checkpoint's
/// subtasks by subtask index. See the module documentation.
pub fn redistribute(states: &[TaskSnapshot], parallelism: u32) -> Result<Vec<TaskSnapshot>, StateError> {
    if parallelism == 0 {
        return Err(StateError::ZeroParallelism);
    }
    let same = states.len() == parallelism as usize
        && states.iter().enumerate().all(|(i, s)| s.subtask as usize == i && s.parallelism == parallelism);
    if same {
        return Ok(states.to_vec());
    }
    let mut out: Vec<TaskSnapshot> = (0..parallelism).map(|i| TaskSnapshot::empty(i, parallelism)).collect();
    let mut by_source: BTreeMap<&str, Vec<&SourceSnapshot>> = BTreeMap::new();
    for state in states {
        for (name, source) in &state.sources {
            by_source.entry(name.as_str()).or_default().push(source);
        }
    }
    for (name, sources) in by_source {
        let connector = sources.first().map(|s| s.connector()).unwrap_or("datagen");
        if let Some(other) = sources.iter().find(|s| s.connector() != connector) {
            return Err(StateError::Source {
                source_name: name.to_string(),
                reason: format!(
                    "its state is {connector} in one subtask and {} in another",
                    other.connector()
                ),
            });
        }
        let parts: Vec<SourceSnapshot> = match connector {
            "kafka" => kafka(name, &sources, parallelism)?,
            _ => {
                let splits: Vec<SequenceSplit> = sources
                    .iter()
                    .flat_map(|s| match s {
                        SourceSnapshot::Datagen { splits } => splits.clone(),
                        SourceSnapshot::Kafka { .. } => Vec::new(),
                    })
                    .collect();
                datagen(splits, parallelism)
                    .into_iter()
                    .map(|splits| SourceSnapshot::Datagen { splits })
                    .collect()
            }
        };
        for (state, part) in out.iter_mut().zip(parts) {
            state.sources.insert(name.to_string(), part);
        }
    }
    Ok(out)
}

fn kafka(
    name: &str,
    sources: &[&SourceSnapshot],
    parallelism: u32,
) -> Result<Vec<SourceSnapshot>, StateError> {
    let mut all: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for source in sources {
        let SourceSnapshot::Kafka { offsets } = source else { continue };
        for (topic, partition, offset) in offsets {
            if let Some(before) = all.insert((topic.clone(), *partition), *offset) {
                if before != *offset {
                    return Err(StateError::Source {
                        source_name: name.to_string(),
                        reason: format!(
                            "partition {topic}/{partition} is in the state of two subtasks, at offsets {before} and {offset}"
                        ),
                    });
                }
            }
        }
    }
    let mut out = vec![Vec::new(); parallelism as usize];
    for ((topic, partition), offset) in all {
        if let Some(mine) = out.get_mut(owner(&topic, partition, parallelism) as usize) {
            mine.push((topic, partition, offset));
        }
    }
    Ok(out.into_iter().map(|offsets| SourceSnapshot::Kafka { offsets }).collect())
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The splits of each of `parallelism` new subtasks, from all the splits of a datagen source.
pub fn datagen(splits: Vec<SequenceSplit>, parallelism: u32) -> Vec<Vec<SequenceSplit>> {
    let n = parallelism.max(1) as usize;
    let splits = merge(splits);
    let mut out = vec![Vec::new(); n];
    if splits.is_empty() {
        return out;
    }
    let parts = even_parts(&splits, n).unwrap_or_else(|| {
        let mut parts = splits.clone();
        // Divide the largest splits until there is one for every subtask.
        while parts.len() < n {
            parts.sort_unstable_by_key(|s| (s.step, s.next));
            let pieces = n.div_ceil(parts.len()).max(2) as u64;
            match parts.first().and_then(|s| s.divide(pieces)) {
                Some(divided) if divided.len() > 1 => {
                    parts.remove(0);
                    parts.extend(divided);
                }
                _ => break,
            }
        }
        parts
    });
    let one_step = parts.first().map(|f| f.step);
    if parts.iter().all(|p| Some(p.step) == one_step) && parts.len().is_multiple_of(n) {
        let mut parts = parts;
        parts.sort_unstable();
        for (i, p) in parts.into_iter().enumerate() {
            out[i % n].push(p);
        }
    } else {
        // Largest first, each to the least loaded subtask.
        let mut parts = parts;
        parts.sort_unstable_by_key(|s| (s.step, s.next));
        let mut load = vec![0.0f64; n];
        for p in parts {
            let (i, _) =
                load.iter()
                    .enumerate()
                    .fold((0, f64::INFINITY), |best, (i, l)| if *l < best.1 { (i, *l) } else { best });
            load[i] += p.weight();
            out[i].push(p);
        }
    }
    out.into_iter().map(merge).collect()
}

/// `splits` divided into parts of one step, as many as a multiple of `n`; `None` when that
/// takes more than [`MAX_SPLITS`] parts or the step overflows.
fn even_parts(splits: &[SequenceSplit], n: usize) -> Option<Vec<SequenceSplit>> {
    let mut lcm: u128 = 1;
    for s in splits {
        let step = u128::try_from(s.step).ok().filter(|s| *s > 0)?;
        lcm = lcm.checked_mul(step / gcd(lcm, step))?;
        if lcm > i64::MAX as u128 {
            return None;
        }
    }
    let count: u128 = splits.iter().map(|s| lcm / s.step as u128).sum();
    let n = n as u128;
    let k = n / gcd(count, n);
    if count.checked_mul(k)? > MAX_SPLITS {
        return None;
    }
    let mut parts = Vec::new();
    for s in splits {
        let pieces = u64::try_from(lcm / s.step as u128 * k).ok()?;
        parts.extend(s.divide(pieces)?);
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequence::SequenceReader;
    use std::collections::BTreeSet;

    /// Emits up to `budget[i]` numbers from subtask `i`'s splits (smallest first), adding them
    /// to `emitted`; returns the subtasks' splits afterwards.
    fn run(
        subtasks: Vec<Vec<SequenceSplit>>,
        end: Option<i64>,
        budget: impl Fn(usize) -> usize,
        emitted: &mut Vec<i64>,
    ) -> Vec<Vec<SequenceSplit>> {
        subtasks
            .into_iter()
            .enumerate()
            .map(|(i, splits)| {
                let mut r = SequenceReader::new(splits, end);
                emitted.extend(r.take(budget(i)));
                r.splits()
            })
            .collect()
    }

    fn initial(p: u32) -> Vec<Vec<SequenceSplit>> {
        (0..p).map(|i| SequenceSplit::initial(0, i, p).into_iter().collect()).collect()
    }

    fn share(splits: &[SequenceSplit]) -> f64 {
        splits.iter().map(SequenceSplit::weight).sum()
    }

    /// 1 -> 3: the one progression becomes three interleaved ones, one per subtask.
    #[test]
    fn one_progression_is_divided_into_interleaved_ones() {
        let out = datagen(vec![SequenceSplit { next: 100, step: 1 }], 3);
        assert_eq!(
            out,
            vec![
                vec![SequenceSplit { next: 100, step: 3 }],
                vec![SequenceSplit { next: 101, step: 3 }],
                vec![SequenceSplit { next: 102, step: 3 }]
            ]
        );
        // ... and back to one when merged in one subtask that kept them in lockstep.
        let back = datagen(out.concat(), 1);
        assert_eq!(back, vec![vec![SequenceSplit { next: 100, step: 1 }]]);
    }

    /// Over rescale chains, with the subtasks progressing unevenly between rescales, a bounded
    /// sequence is emitted exactly once in full: no gap, no repeat. After each rescale every new
    /// subtask owns the same share of the sequence and at most a few splits.
    #[test]
    fn rescale_chains_emit_a_bounded_sequence_exactly_once() {
        let chains: [&[u32]; 5] =
            [&[1, 3, 2, 5, 1], &[2, 3, 4, 1, 6, 2], &[1, 2, 1, 2, 1], &[4, 7, 3], &[5, 5, 2]];
        let total = 20_000i64;
        for chain in chains {
            let mut emitted = Vec::new();
            let mut subtasks = initial(chain[0]);
            for (round, p) in chain.iter().enumerate().skip(1) {
                // Uneven progress: subtask i emits 100 + 37 i numbers per round.
                subtasks = run(subtasks, Some(total), |i| 100 + 37 * i + round, &mut emitted);
                subtasks = datagen(subtasks.concat(), *p);
                assert_eq!(subtasks.len(), *p as usize);
                let shares: Vec<f64> = subtasks.iter().map(|s| share(s)).collect();
                for s in &shares {
                    assert!(
                        (s - 1.0 / f64::from(*p)).abs() < 1e-9,
                        "chain {chain:?} round {round}: shares {shares:?}"
                    );
                }
                let most = subtasks.iter().map(Vec::len).max().unwrap_or(0);
                assert!(most <= 64, "chain {chain:?} round {round}: {most} splits in one subtask");
            }
            run(subtasks, Some(total), |_| usize::MAX, &mut emitted);
            let unique: BTreeSet<i64> = emitted.iter().copied().collect();
            assert_eq!(unique.len(), emitted.len(), "chain {chain:?}: a number emitted twice");
            assert_eq!(unique, (0..total).collect::<BTreeSet<i64>>(), "chain {chain:?}: a gap");
        }
    }

    /// Unbounded: after a chain of rescales, what was emitted and what the splits still hold
    /// are disjoint and together cover every number (checked up to a bound beyond everything
    /// emitted); the redistribution is deterministic.
    #[test]
    fn rescale_chains_of_an_unbounded_sequence_have_no_gap_and_no_overlap() {
        let chain = |emitted: &mut Vec<i64>| {
            let mut subtasks = initial(1);
            for (round, p) in [3u32, 2, 5, 1, 4, 4, 3].into_iter().enumerate() {
                subtasks = run(subtasks, None, |i| 50 * (i + 1) + round, emitted);
                subtasks = datagen(subtasks.concat(), p);
            }
            subtasks
        };
        let (mut emitted, mut again) = (Vec::new(), Vec::new());
        let subtasks = chain(&mut emitted);
        assert_eq!(chain(&mut again), subtasks, "the redistribution is deterministic");
        let bound = 100_000;
        assert!(emitted.iter().all(|v| *v < bound));
        let mut everything = emitted;
        run(subtasks, Some(bound), |_| usize::MAX, &mut everything);
        let unique: BTreeSet<i64> = everything.iter().copied().collect();
        assert_eq!(unique.len(), everything.len(), "overlap");
        assert_eq!(unique, (0..bound).collect::<BTreeSet<i64>>(), "gap");
    }

    /// A bounded sequence that is nearly done: exhausted splits go along (they emit nothing),
    /// and a subtask may get no split at all when there are fewer numbers than subtasks.
    #[test]
    fn a_nearly_finished_bounded_sequence_rescales_without_repeats() {
        let mut emitted = Vec::new();
        let subtasks = run(initial(2), Some(5), |_| usize::MAX, &mut emitted);
        assert_eq!(emitted.len(), 5);
        let subtasks = datagen(subtasks.concat(), 3);
        let mut after = Vec::new();
        run(subtasks, Some(5), |_| usize::MAX, &mut after);
        assert!(after.is_empty(), "{after:?}");
    }

    /// Split counts: dividing is bounded by MAX_SPLITS, beyond which the largest splits are
    /// divided only until every subtask has one.
    #[test]
    fn split_counts_stay_bounded() {
        // Steps whose lcm is huge: the even division would need too many parts.
        let odd: Vec<SequenceSplit> = [7i64, 11, 13, 17, 19, 23]
            .iter()
            .enumerate()
            .map(|(i, s)| SequenceSplit { next: i as i64, step: *s })
            .collect();
        assert!(even_parts(&odd, 4).is_none());
        let out = datagen(odd.clone(), 8);
        assert_eq!(out.len(), 8);
        assert!(out.iter().all(|s| !s.is_empty()), "{out:?}");
        let count: usize = out.iter().map(Vec::len).sum();
        assert!(count <= 16, "{count}");
        // Nothing lost or repeated up to a bound.
        let bound = 50_000;
        let (mut before, mut after) = (Vec::new(), Vec::new());
        run(vec![odd], Some(bound), |_| usize::MAX, &mut before);
        run(out, Some(bound), |_| usize::MAX, &mut after);
        before.sort_unstable();
        after.sort_unstable();
        assert_eq!(before, after);
    }

    /// Kafka: each new subtask gets the offsets of exactly the partitions it owns under the new
    /// parallelism; every partition goes to one subtask; a subtask owning none gets an empty
    /// state (not none); sink state is dropped; at the same parallelism nothing changes.
    #[test]
    fn kafka_partitions_go_to_their_new_owners_and_sinks_are_dropped() -> Result<(), StateError> {
        let mut a = TaskSnapshot::empty(0, 2);
        a.sources.insert(
            "in".into(),
            SourceSnapshot::Kafka { offsets: vec![("t".into(), 0, 5), ("t".into(), 2, 9)] },
        );
        a.sinks.insert(
            "out".into(),
            crate::SinkSnapshot::Kafka(crate::kafka::ExactlyOnceState {
                transactional_id: "p-0".into(),
                segments: vec![],
            }),
        );
        let mut b = TaskSnapshot::empty(1, 2);
        b.sources.insert("in".into(), SourceSnapshot::Kafka { offsets: vec![("t".into(), 1, 7)] });
        let old = vec![a, b];
        assert_eq!(redistribute(&old, 2)?, old);
        for p in [1u32, 3, 5] {
            let new = redistribute(&old, p)?;
            assert_eq!(new.len(), p as usize);
            let mut seen = BTreeMap::new();
            for (i, s) in new.iter().enumerate() {
                assert_eq!((s.subtask, s.parallelism), (i as u32, p));
                assert!(s.sinks.is_empty());
                let Some(SourceSnapshot::Kafka { offsets }) = s.sources.get("in") else {
                    panic!("no kafka state for subtask {i}: {s:?}")
                };
                for (topic, partition, offset) in offsets {
                    assert_eq!(owner(topic, *partition, p), i as u32);
                    assert!(seen.insert(*partition, *offset).is_none());
                }
            }
            assert_eq!(seen, BTreeMap::from([(0, 5), (1, 7), (2, 9)]));
        }
        Ok(())
    }

    /// A checkpoint whose subtasks disagree (a partition at two offsets, a source of two
    /// connectors) is refused naming the source; parallelism 0 is refused.
    #[test]
    fn inconsistent_states_are_refused() {
        let mut a = TaskSnapshot::empty(0, 2);
        a.sources.insert("in".into(), SourceSnapshot::Kafka { offsets: vec![("t".into(), 0, 5)] });
        let mut b = TaskSnapshot::empty(1, 2);
        b.sources.insert("in".into(), SourceSnapshot::Kafka { offsets: vec![("t".into(), 0, 6)] });
        match redistribute(&[a.clone(), b], 3) {
            Err(e) => assert!(e.to_string().contains("t/0 is in the state of two subtasks"), "{e}"),
            Ok(s) => panic!("accepted {s:?}"),
        }
        let mut c = TaskSnapshot::empty(1, 2);
        c.sources.insert("in".into(), SourceSnapshot::Datagen { splits: vec![] });
        assert!(redistribute(&[a.clone(), c], 3).is_err());
        assert_eq!(redistribute(&[a], 0), Err(StateError::ZeroParallelism));
    }
}
