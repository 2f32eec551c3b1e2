//! The `_metadata` file of a completed checkpoint or savepoint (JSON), written by the
//! JobManager, and the restore states it gives an attempt of any parallelism.

use serde::{Deserialize, Serialize};

use crate::rescale::redistribute;
use crate::snapshot::TaskSnapshot;
use crate::StateError;

/// The `_metadata` file of a completed checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMetadata {
    /// Format of this file; 1.
    pub format: u32,
    /// Epoch of the JobManager leader that completed (wrote) it; 0 in files written before
    /// the field existed.
    #[serde(default)]
    pub epoch: u64,
    pub checkpoint_id: u64,
    pub job_id: String,
    pub job_name: String,
    pub version: u32,
    pub attempt: u32,
    pub parallelism: u32,
    pub trigger_time_ms: u64,
    pub completed_at_ms: u64,
    pub duration_ms: u64,
    pub total_size_bytes: u64,
    /// One per subtask, by subtask index.
    pub subtasks: Vec<SubtaskMetadata>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubtaskMetadata {
    pub subtask: u32,
    pub task_id: String,
    pub state_size: u64,
    /// The task's state as it acknowledged it.
    pub state: TaskSnapshot,
}

impl CheckpointMetadata {
    /// The states of the checkpoint's subtasks, by subtask index. Fails (saying why) when the
    /// checkpoint does not hold exactly one state per subtask.
    pub fn states(&self) -> Result<Vec<TaskSnapshot>, StateError> {
        let inconsistent =
            |reason: String| StateError::Inconsistent { checkpoint_id: self.checkpoint_id, reason };
        if self.subtasks.len() != self.parallelism as usize {
            return Err(inconsistent(format!(
                "holds state for {} subtask(s) but says parallelism {}",
                self.subtasks.len(),
                self.parallelism
            )));
        }
        let mut states: Vec<Option<TaskSnapshot>> = vec![None; self.parallelism as usize];
        for s in &self.subtasks {
            let slot = states
                .get_mut(s.subtask as usize)
                .ok_or_else(|| inconsistent(format!("names subtask {} out of range", s.subtask)))?;
            if slot.is_some() {
                return Err(inconsistent(format!("holds subtask {} twice", s.subtask)));
            }
            *slot = Some(s.state.clone());
        }
        states
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| inconsistent(format!("lacks subtask {i}"))))
            .collect()
    }

    /// The names of the sources the checkpoint holds state of, sorted.
    pub fn source_names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.subtasks.iter().flat_map(|s| s.state.sources.keys().cloned()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The restore state (a [`TaskSnapshot`] as JSON) of each subtask of `parallelism`, by
    /// subtask index: at the checkpoint's own parallelism every subtask gets its own state back;
    /// at another one the states are redistributed ([`crate::rescale`]).
    pub fn restore_states(&self, parallelism: u32) -> Result<Vec<Vec<u8>>, StateError> {
        let states = self.states()?;
        let states =
            if parallelism == self.parallelism { states } else { redistribute(&states, parallelism)? };
        states.iter().map(TaskSnapshot::to_json).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequence::SequenceSplit;
    use crate::snapshot::SourceSnapshot;

    /// The metadata file of a datagen job as the code before splits wrote it: read unchanged,
    /// and it restores at its own parallelism (each subtask's progression) and at another
    /// (the progressions redistributed).
    const OLD: &str = r#"{
  "format": 1,
  "checkpoint_id": 7,
  "job_id": "j-1",
  "job_name": "demo",
  "version": 1,
  "attempt": 1,
  "parallelism": 2,
  "trigger_time_ms": 1,
  "completed_at_ms": 2,
  "duration_ms": 1,
  "total_size_bytes": 160,
  "subtasks": [
    {"subtask": 1, "task_id": "j-1/v1/1#1", "state_size": 80,
     "state": {"subtask": 1, "parallelism": 2, "sources": {"numbers": {"connector": "datagen", "next_sequence": 41}}}},
    {"subtask": 0, "task_id": "j-1/v1/0#1", "state_size": 80,
     "state": {"subtask": 0, "parallelism": 2, "sources": {"numbers": {"connector": "datagen", "next_sequence": 40}}}}
  ]
}"#;

    fn splits(state: &[u8]) -> Result<Vec<SequenceSplit>, StateError> {
        match TaskSnapshot::from_json(state)?.sources.get("numbers") {
            Some(SourceSnapshot::Datagen { splits }) => Ok(splits.clone()),
            other => Err(StateError::NotASnapshot(format!("no datagen state: {other:?}"))),
        }
    }

    /// An old metadata file restores at its parallelism and at another.
    #[test]
    fn an_old_metadata_file_restores_at_any_parallelism() -> Result<(), StateError> {
        let meta: CheckpointMetadata =
            serde_json::from_str(OLD).map_err(|e| StateError::NotASnapshot(e.to_string()))?;
        assert_eq!(meta.epoch, 0);
        assert_eq!(meta.source_names(), vec!["numbers".to_string()]);
        let same = meta.restore_states(2)?;
        assert_eq!(splits(&same[0])?, vec![SequenceSplit { next: 40, step: 2 }]);
        assert_eq!(splits(&same[1])?, vec![SequenceSplit { next: 41, step: 2 }]);
        let one = meta.restore_states(1)?;
        assert_eq!(one.len(), 1);
        assert_eq!(splits(&one[0])?, vec![SequenceSplit { next: 40, step: 1 }]);
        let three = meta.restore_states(3)?;
        assert_eq!(three.len(), 3);
        for (i, state) in three.iter().enumerate() {
            let s = TaskSnapshot::from_json(state)?;
            assert_eq!((s.subtask, s.parallelism), (i as u32, 3));
        }
        Ok(())
    }

    /// A metadata file that does not hold exactly one state per subtask is refused, saying so.
    #[test]
    fn metadata_without_one_state_per_subtask_is_refused() -> Result<(), StateError> {
        let meta: CheckpointMetadata =
            serde_json::from_str(OLD).map_err(|e| StateError::NotASnapshot(e.to_string()))?;
        let mut twice = meta.clone();
        twice.subtasks[0].subtask = 0;
        assert!(twice.restore_states(2).is_err());
        let mut short = meta.clone();
        short.subtasks.pop();
        let err = short.restore_states(2).map(|_| ()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("checkpoint 7") && err.contains("parallelism 2"), "{err}");
        Ok(())
    }
}
