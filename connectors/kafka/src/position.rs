//! [`SourcePosition`]: where a Kafka source stands, the state it checkpoints.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::assign::TopicPartition;

/// The next offset to read of each partition (the offset of the last record handed out plus
/// one). This is a Kafka source's checkpoint state, and what it commits to its consumer group
/// when the checkpoint completes.
///
/// As JSON: `{"offsets": {"orders": {"0": 42, "1": 7}}}`.
///
/// Positions of several subtasks can be [merged](SourcePosition::merge): a reader restored with
/// a position that holds more partitions than it owns takes its own and ignores the rest, so a
/// restore after a change of parallelism can hand every subtask the union of all of them.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A position survives JSON (the checkpoint format) unchanged, with partitions as keys.
    #[test]
    fn position_round_trips_through_json() {
        let mut pos = SourcePosition::new();
        pos.set("orders", 0, 42);
        pos.set("orders", 1, 7);
        pos.set("pay", 3, 0);
        let json = serde_json::to_string(&pos).expect("encode");
        assert_eq!(json, r#"{"offsets":{"orders":{"0":42,"1":7},"pay":{"3":0}}}"#);
        let back: SourcePosition = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, pos);
        assert_eq!(back.len(), 3);
        assert_eq!(back.get("orders", 1), Some(7));
        assert_eq!(back.get("orders", 2), None);
    }

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
