//! Which subtask of a source reads which partition.
//!
//! Keel has no central enumerator: every subtask lists the partitions itself (at open and at
//! each discovery) and keeps the ones it owns. So ownership must be a function of the partition
//! and the parallelism alone, never of which other partitions exist at that moment:
//!
//! ```text
//! owner(topic, partition, parallelism) = (start(topic) + partition) % parallelism
//! start(topic) = ((java_hash(topic) * 31) & 0x7fff_ffff) % parallelism
//! ```
//!
//! (the same owner Flink's `KafkaSourceEnumerator` computes). What follows:
//!
//! - **Deterministic**: every subtask computes the same owner from the same name and number, in
//!   any process, on any platform (the hash is Java's `String.hashCode`, fixed by definition).
//! - **Stable**: a partition never changes owner while the parallelism stays the same, whatever
//!   is added: partitions appended to a topic (they get the next subtasks in the round), new
//!   topics matching a pattern, topics that sort before existing ones. So a partition's offset
//!   always lives in the checkpoint state of the one subtask that reads it, discovery only ever
//!   adds partitions, and two subtasks that list the cluster a moment apart never both claim (or
//!   both skip) a new partition.
//! - **Even per topic**: within one topic, partitions `0..n` go round-robin over the subtasks,
//!   so each subtask gets `n / p` or `n / p + 1` of them, and exactly `n / p` when `p` divides
//!   `n` (see [`spread_warning`]). Each topic starts the round at a different subtask, so many
//!   small topics spread over the subtasks too, though not always perfectly evenly.
//!
//! A plain "sort all partitions, k-th goes to subtask k % p" is even overall but not stable:
//! one partition added to a topic that sorts first shifts every partition after it to another
//! subtask, and a restored subtask would then own partitions whose offsets are in another
//! subtask's checkpoint.

/// `TopicPartition` and `owner` live in `keel-state` (the JobManager redistributes partitions
/// by the same rule in a rescale); re-exported here.
pub use keel_state::kafka::{owner, TopicPartition};

/// The partitions of `partitions` that `subtask` of `parallelism` reads, sorted and without
/// duplicates. See the module doc for why the assignment is stable.
pub fn assign(partitions: &[TopicPartition], parallelism: u32, subtask: u32) -> Vec<TopicPartition> {
    let mut mine: Vec<TopicPartition> = partitions
        .iter()
        .filter(|tp| owner(&tp.topic, tp.partition, parallelism) == subtask)
        .cloned()
        .collect();
    mine.sort();
    mine.dedup();
    mine
}

/// A warning when `partition_count` partitions of one topic (numbered `0..partition_count`)
/// cannot be spread evenly over `parallelism` subtasks, naming the parallelisms that would
/// spread them evenly (the divisors of the partition count). `None` when the spread is even or
/// there are no partitions.
pub fn spread_warning(partition_count: usize, parallelism: u32) -> Option<String> {
    let p = usize::try_from(parallelism.max(1)).unwrap_or(usize::MAX);
    if partition_count == 0 || partition_count.is_multiple_of(p) {
        return None;
    }
    let even: Vec<String> =
        (1..=partition_count).filter(|d| partition_count.is_multiple_of(*d)).map(|d| d.to_string()).collect();
    let even = even.join(", ");
    if p > partition_count {
        let idle = p - partition_count;
        return Some(format!(
            "parallelism {p} is larger than the {partition_count} partitions: {idle} subtasks read \
             nothing; parallelisms that spread {partition_count} partitions evenly: {even}"
        ));
    }
    let low = partition_count / p;
    let heavy = partition_count % p;
    Some(format!(
        "{partition_count} partitions over parallelism {p} is uneven: {heavy} subtasks read {} \
         partitions and {} read {low}; parallelisms that spread {partition_count} partitions evenly: {even}",
        low + 1,
        p - heavy
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str, n: i32) -> Vec<TopicPartition> {
        (0..n).map(|p| TopicPartition::new(name, p)).collect()
    }

    fn counts(partitions: &[TopicPartition], parallelism: u32) -> Vec<usize> {
        (0..parallelism).map(|s| assign(partitions, parallelism, s).len()).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner_and_assignment_is_deterministic() {
        let mut all = topic("orders", 7);
        all.extend(topic("payments", 3));
        all.extend(topic("a", 1));
        for parallelism in 1..=12 {
            let mut seen: Vec<TopicPartition> =
                (0..parallelism).flat_map(|s| assign(&all, parallelism, s)).collect();
            seen.sort();
            let mut expected = all.clone();
            expected.sort();
            assert_eq!(seen, expected, "parallelism {parallelism}");
            for s in 0..parallelism {
                assert_eq!(assign(&all, parallelism, s), assign(&all, parallelism, s));
            }
        }
    }

    /// Within a topic, partitions go round-robin: every subtask gets n/p or n/p+1, exactly n/p
    /// when p divides n, and consecutive partitions go to consecutive subtasks.
    #[test]
    fn one_topic_is_spread_evenly() {
        for n in 1..=24 {
            let all = topic("events", n);
            for p in 1..=10u32 {
                let c = counts(&all, p);
                let (min, max) = (c.iter().min().copied(), c.iter().max().copied());
                let n = usize::try_from(n).expect("small");
                let pu = usize::try_from(p).expect("small");
                if n % pu == 0 {
                    assert_eq!((min, max), (Some(n / pu), Some(n / pu)), "n={n} p={p}");
                } else {
                    assert_eq!((min, max), (Some(n / pu), Some(n / pu + 1)), "n={n} p={p}");
                }
            }
        }
        let first = owner("events", 0, 4);
        for k in 0..8 {
            assert_eq!(owner("events", k, 4), (first + u32::try_from(k).expect("small")) % 4);
        }
    }

    /// Adding partitions to a topic, adding a topic that sorts first, or discovering a new
    /// pattern match never moves an existing partition to another subtask.
    #[test]
    fn assignment_is_stable_when_partitions_and_topics_are_added() {
        let before: Vec<TopicPartition> = topic("b-orders", 3).into_iter().chain(topic("c-pay", 2)).collect();
        let mut after = before.clone();
        after.extend((3..8).map(|p| TopicPartition::new("b-orders", p)));
        after.extend(topic("a-new", 4));
        for p in 1..=6 {
            for s in 0..p {
                let old = assign(&before, p, s);
                let new = assign(&after, p, s);
                for tp in &old {
                    assert!(new.contains(tp), "{tp} left subtask {s} of {p}");
                }
            }
        }
    }

    #[test]
    fn assignment_output_is_sorted_by_topic_then_partition() {
        let all = vec![
            TopicPartition::new("z", 1),
            TopicPartition::new("a", 3),
            TopicPartition::new("a", 0),
            TopicPartition::new("z", 0),
        ];
        let mine = assign(&all, 1, 0);
        assert_eq!(
            mine,
            vec![
                TopicPartition::new("a", 0),
                TopicPartition::new("a", 3),
                TopicPartition::new("z", 0),
                TopicPartition::new("z", 1)
            ]
        );
        assert!(assign(&all, 1, 1).is_empty(), "a subtask beyond the parallelism owns nothing");
    }

    /// The warning says the spread is uneven, how, and which parallelisms would be even.
    #[test]
    fn spread_warning_names_the_even_parallelisms() {
        assert_eq!(spread_warning(8, 4), None);
        assert_eq!(spread_warning(8, 8), None);
        assert_eq!(spread_warning(0, 3), None);
        assert_eq!(spread_warning(5, 1), None);
        assert_eq!(
            spread_warning(8, 3).as_deref(),
            Some(
                "8 partitions over parallelism 3 is uneven: 2 subtasks read 3 partitions and 1 read 2; \
                 parallelisms that spread 8 partitions evenly: 1, 2, 4, 8"
            )
        );
        assert_eq!(
            spread_warning(3, 5).as_deref(),
            Some(
                "parallelism 5 is larger than the 3 partitions: 2 subtasks read nothing; \
                 parallelisms that spread 3 partitions evenly: 1, 3"
            )
        );
    }
}
