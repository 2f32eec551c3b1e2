//! The Kafka part of checkpoint state: partitions, who owns them, source positions, and the
//! state of an exactly-once sink. The connector (`keel-kafka`) re-exports these types; the
//! JobManager uses them to redistribute partitions in a rescale without linking librdkafka.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One partition of one topic. Orders by topic, then partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> TopicPartition {
        TopicPartition { topic: topic.into(), partition }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Java's `String.hashCode` (over UTF-16 code units, wrapping).
pub fn java_hash(s: &str) -> i32 {
    s.encode_utf16().fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)))
}

/// The subtask (`0..parallelism`) that reads `partition` of `topic`: `(start(topic) +
/// partition) % parallelism` with `start(topic) = ((java_hash(topic) * 31) & 0x7fff_ffff) %
/// parallelism`, Flink's `KafkaSourceEnumerator` rule (see `keel_kafka::assign` for why it is
/// stable). A parallelism of 0 is treated as 1. The readers use it to pick their partitions and
/// the JobManager to hand each new subtask of a rescale the offsets of its partitions.
pub fn owner(topic: &str, partition: i32, parallelism: u32) -> u32 {
    let p = i64::from(parallelism.max(1));
    let start = i64::from(java_hash(topic).wrapping_mul(31) & 0x7fff_ffff) % p;
    // Partitions are never negative on a broker; rem_euclid keeps a bogus one in range anyway.
    let owner = (start + i64::from(partition)).rem_euclid(p);
    u32::try_from(owner).unwrap_or(0)
}

/// The next offset to read of each partition (the offset of the last record handed out plus
/// one). This is a Kafka source's checkpoint state, and what it commits to its consumer group
/// when the checkpoint completes.
///
/// As JSON: `{"offsets": {"orders": {"0": 42, "1": 7}}}`.
///
/// Positions of several subtasks can be [merged](SourcePosition::merge): a reader restored with
/// a position that holds more partitions than it owns takes its own and ignores the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    /// By topic, then partition.
    pub offsets: BTreeMap<String, BTreeMap<i32, i64>>,
}

impl SourcePosition {
    pub fn new() -> SourcePosition {
        SourcePosition::default()
    }

    /// The next offset of `partition` of `topic`, when known.
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.offsets.get(topic).and_then(|p| p.get(&partition)).copied()
    }

    pub fn set(&mut self, topic: &str, partition: i32, next_offset: i64) {
        match self.offsets.get_mut(topic) {
            Some(partitions) => {
                partitions.insert(partition, next_offset);
            }
            None => {
                self.offsets.insert(topic.to_string(), BTreeMap::from([(partition, next_offset)]));
            }
        }
    }

    /// Every `(partition, next offset)`, sorted by topic then partition.
    pub fn iter(&self) -> impl Iterator<Item = (TopicPartition, i64)> + '_ {
        self.offsets.iter().flat_map(|(topic, parts)| {
            parts.iter().map(move |(p, o)| (TopicPartition::new(topic.clone(), *p), *o))
        })
    }

    /// Number of partitions.
    pub fn len(&self) -> usize {
        self.offsets.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds the partitions of `other`; for a partition in both, `other`'s offset wins.
    pub fn merge(&mut self, other: &SourcePosition) {
        for (topic, parts) in &other.offsets {
            for (p, o) in parts {
                self.set(topic, *p, *o);
            }
        }
    }
}

impl FromIterator<(TopicPartition, i64)> for SourcePosition {
    fn from_iter<I: IntoIterator<Item = (TopicPartition, i64)>>(iter: I) -> Self {
        let mut pos = SourcePosition::new();
        for (tp, o) in iter {
            pos.set(&tp.topic, tp.partition, o);
        }
        pos
    }
}

/// The part of a checkpoint an exactly-once sink needs to finish its transactions after a
/// failure (see `keel_kafka::eos`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactlyOnceState {
    pub transactional_id: String,
    /// Sealed segments not known to be committed at the barrier, oldest first.
    pub segments: Vec<SegmentState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentState {
    /// The checkpoint whose barrier sealed the segment.
    pub checkpoint_id: u64,
    /// Its spool file.
    pub path: String,
    pub records: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash is Java's `String.hashCode`, so owners match Flink's and never depend on the
    /// platform or the Rust version.
    #[test]
    fn java_hash_matches_javas_string_hashcode() {
        assert_eq!(java_hash(""), 0);
        assert_eq!(java_hash("a"), 97);
        assert_eq!(java_hash("orders"), -1008770331);
        assert_eq!(java_hash("hello world"), 1794106052);
        // A non-BMP character counts as two UTF-16 code units, as in Java.
        assert_eq!(java_hash("😀"), 1772899);
    }

    /// A position survives JSON (the checkpoint format) unchanged, with partitions as keys.
    #[test]
    fn position_round_trips_through_json() -> Result<(), serde_json::Error> {
        let mut pos = SourcePosition::new();
        pos.set("orders", 0, 42);
        pos.set("orders", 1, 7);
        pos.set("pay", 3, 0);
        let json = serde_json::to_string(&pos)?;
        assert_eq!(json, r#"{"offsets":{"orders":{"0":42,"1":7},"pay":{"3":0}}}"#);
        let back: SourcePosition = serde_json::from_str(&json)?;
        assert_eq!(back, pos);
        assert_eq!(back.len(), 3);
        assert_eq!(back.get("orders", 1), Some(7));
        assert_eq!(back.get("orders", 2), None);
        Ok(())
    }

    /// Merging unions the partitions; for a partition in both, the other side wins.
    #[test]
    fn merge_unions_partitions_and_the_other_side_wins() {
        let mut a: SourcePosition =
            [(TopicPartition::new("t", 0), 5), (TopicPartition::new("t", 1), 6)].into_iter().collect();
        let b: SourcePosition =
            [(TopicPartition::new("t", 1), 9), (TopicPartition::new("u", 0), 1)].into_iter().collect();
        a.merge(&b);
        let all: Vec<(TopicPartition, i64)> = a.iter().collect();
        assert_eq!(
            all,
            vec![
                (TopicPartition::new("t", 0), 5),
                (TopicPartition::new("t", 1), 9),
                (TopicPartition::new("u", 0), 1)
            ]
        );
    }
}
