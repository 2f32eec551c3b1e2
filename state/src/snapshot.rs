//! [`TaskSnapshot`]: the state of one subtask at a checkpoint, as a TaskManager acknowledges it
//! (JSON in `AcknowledgeCheckpoint.state_handle`), as the JobManager keeps it in the checkpoint's
//! metadata, and as it comes back in `DeployTaskRequest.restore_state`.
//!
//! ```json
//! {"subtask": 0, "parallelism": 2,
//!  "sources": {"numbers": {"connector": "datagen", "splits": [{"next": 40, "step": 2}]},
//!              "in": {"connector": "kafka", "offsets": [["orders", 0, 42]]}},
//!  "sinks": {"out": {"connector": "kafka", "transactional_id": "p-0", "segments": []}}}
//! ```
//!
//! Older snapshots wrote a datagen source as `{"connector": "datagen", "next_sequence": N}`
//! (one progression of step `parallelism`); they are still read, as that split.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::kafka::{ExactlyOnceState, SourcePosition};
use crate::sequence::SequenceSplit;
use crate::StateError;

/// The state of a subtask at a checkpoint: the position of each of its sources, and the open
/// transactions of its exactly-once sinks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TaskSnapshotWire")]
pub struct TaskSnapshot {
    pub subtask: u32,
    pub parallelism: u32,
    /// By source name.
    pub sources: BTreeMap<String, SourceSnapshot>,
    /// By sink name; only sinks with state (exactly-once Kafka sinks).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sinks: BTreeMap<String, SinkSnapshot>,
}

/// The state of one source of a subtask: the splits it owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "connector", rename_all = "lowercase")]
pub enum SourceSnapshot {
    /// The progressions of the sequence this subtask emits, each with its next number. Empty:
    /// nothing left to emit (not a fresh start).
    Datagen { splits: Vec<SequenceSplit> },
    /// The next offset to read of every partition the source reads (a partition is a split),
    /// as `[topic, partition, offset]` (a list: JSON maps inside a tagged enum cannot have
    /// integer keys). A partition not listed starts at its earliest offset (it appeared after
    /// the checkpoint).
    Kafka { offsets: Vec<(String, i32, i64)> },
}

impl SourceSnapshot {
    pub fn connector(&self) -> &'static str {
        match self {
            SourceSnapshot::Datagen { .. } => "datagen",
            SourceSnapshot::Kafka { .. } => "kafka",
        }
    }

    /// The state of a Kafka source at `position`.
    pub fn kafka(position: &SourcePosition) -> SourceSnapshot {
        SourceSnapshot::Kafka {
            offsets: position.iter().map(|(tp, o)| (tp.topic, tp.partition, o)).collect(),
        }
    }

    /// The offsets of a Kafka source's state as a position (`None` for another connector).
    pub fn kafka_position(&self) -> Option<SourcePosition> {
        match self {
            SourceSnapshot::Kafka { offsets } => {
                let mut position = SourcePosition::new();
                for (topic, partition, offset) in offsets {
                    position.set(topic, *partition, *offset);
                }
                Some(position)
            }
            SourceSnapshot::Datagen { .. } => None,
        }
    }
}

/// The state of one sink of a subtask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "connector", rename_all = "lowercase")]
pub enum SinkSnapshot {
    /// The transactions of an exactly-once Kafka sink not known to be committed.
    Kafka(ExactlyOnceState),
}

impl TaskSnapshot {
    /// A subtask with no source and no sink state.
    pub fn empty(subtask: u32, parallelism: u32) -> TaskSnapshot {
        TaskSnapshot { subtask, parallelism, sources: BTreeMap::new(), sinks: BTreeMap::new() }
    }

    pub fn to_json(&self) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(self).map_err(|e| StateError::Encode(e.to_string()))
    }

    pub fn from_json(bytes: &[u8]) -> Result<TaskSnapshot, StateError> {
        serde_json::from_slice(bytes).map_err(|e| StateError::NotASnapshot(e.to_string()))
    }
}

/// What a snapshot looks like in JSON, old forms included.
#[derive(Deserialize)]
struct TaskSnapshotWire {
    subtask: u32,
    parallelism: u32,
    sources: BTreeMap<String, SourceWire>,
    #[serde(default)]
    sinks: BTreeMap<String, SinkSnapshot>,
}

#[derive(Deserialize)]
#[serde(tag = "connector", rename_all = "lowercase")]
enum SourceWire {
    Datagen {
        #[serde(default)]
        splits: Option<Vec<SequenceSplit>>,
        /// The form before splits: the next number of the subtask's one progression.
        #[serde(default)]
        next_sequence: Option<i64>,
    },
    Kafka {
        offsets: Vec<(String, i32, i64)>,
    },
}

impl TryFrom<TaskSnapshotWire> for TaskSnapshot {
    type Error = String;

    fn try_from(w: TaskSnapshotWire) -> Result<TaskSnapshot, String> {
        if w.parallelism == 0 || w.subtask >= w.parallelism {
            return Err(format!("subtask {} is not within parallelism {}", w.subtask, w.parallelism));
        }
        let mut sources = BTreeMap::new();
        for (name, source) in w.sources {
            let snapshot = match source {
                SourceWire::Datagen { splits: Some(splits), .. } => {
                    if let Some(bad) = splits.iter().find(|s| s.step < 1) {
                        return Err(format!(
                            "source '{name}': a datagen split with step {} (at least 1)",
                            bad.step
                        ));
                    }
                    SourceSnapshot::Datagen { splits }
                }
                SourceWire::Datagen { splits: None, next_sequence: Some(next) } => SourceSnapshot::Datagen {
                    splits: vec![SequenceSplit { next, step: i64::from(w.parallelism) }],
                },
                SourceWire::Datagen { splits: None, next_sequence: None } => {
                    return Err(format!("source '{name}': a datagen state without splits"))
                }
                SourceWire::Kafka { offsets } => SourceSnapshot::Kafka { offsets },
            };
            sources.insert(name, snapshot);
        }
        Ok(TaskSnapshot { subtask: w.subtask, parallelism: w.parallelism, sources, sinks: w.sinks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::SegmentState;

    /// A snapshot survives JSON unchanged, in the documented shape (Kafka offsets and sink state
    /// as before splits existed).
    #[test]
    fn snapshot_round_trips_in_the_documented_shape() -> Result<(), StateError> {
        let mut s = TaskSnapshot::empty(0, 2);
        s.sources.insert(
            "numbers".into(),
            SourceSnapshot::Datagen { splits: vec![SequenceSplit { next: 40, step: 2 }] },
        );
        s.sources.insert("in".into(), SourceSnapshot::Kafka { offsets: vec![("orders".into(), 0, 42)] });
        s.sinks.insert(
            "out".into(),
            SinkSnapshot::Kafka(ExactlyOnceState {
                transactional_id: "p-0".into(),
                segments: vec![SegmentState { checkpoint_id: 3, path: "/s/1.spool".into(), records: 9 }],
            }),
        );
        let json = String::from_utf8(s.to_json()?).map_err(|e| StateError::Encode(e.to_string()))?;
        assert_eq!(
            json,
            r#"{"subtask":0,"parallelism":2,"sources":{"in":{"connector":"kafka","offsets":[["orders",0,42]]},"numbers":{"connector":"datagen","splits":[{"next":40,"step":2}]}},"sinks":{"out":{"connector":"kafka","transactional_id":"p-0","segments":[{"checkpoint_id":3,"path":"/s/1.spool","records":9}]}}}"#
        );
        assert_eq!(TaskSnapshot::from_json(json.as_bytes())?, s);
        Ok(())
    }

    /// A snapshot written before splits existed (`next_sequence`, no `sinks`) is read as the one
    /// progression of its subtask: next number, step = parallelism.
    #[test]
    fn a_snapshot_of_the_old_form_is_read_as_one_split() -> Result<(), StateError> {
        let old = br#"{"subtask":1,"parallelism":3,"sources":{"numbers":{"connector":"datagen","next_sequence":31},"in":{"connector":"kafka","offsets":[["t",2,9]]}}}"#;
        let s = TaskSnapshot::from_json(old)?;
        assert_eq!(
            s.sources.get("numbers"),
            Some(&SourceSnapshot::Datagen { splits: vec![SequenceSplit { next: 31, step: 3 }] })
        );
        assert_eq!(
            s.sources.get("in").and_then(SourceSnapshot::kafka_position).and_then(|p| p.get("t", 2)),
            Some(9)
        );
        assert!(s.sinks.is_empty());
        Ok(())
    }

    /// What is not a snapshot is refused with the reason: not JSON, a subtask out of range, a
    /// split with step 0, a datagen state without position.
    #[test]
    fn malformed_snapshots_are_refused() {
        for (bad, why) in [
            (&b"not json"[..], "expected"),
            (br#"{"subtask":2,"parallelism":2,"sources":{}}"#, "not within parallelism"),
            (br#"{"subtask":0,"parallelism":1,"sources":{"g":{"connector":"datagen","splits":[{"next":1,"step":0}]}}}"#, "step 0"),
            (br#"{"subtask":0,"parallelism":1,"sources":{"g":{"connector":"datagen"}}}"#, "without splits"),
        ] {
            match TaskSnapshot::from_json(bad) {
                Err(e) => assert!(e.to_string().contains(why), "{e}"),
                Ok(s) => panic!("accepted {s:?}"),
            }
        }
    }
}
