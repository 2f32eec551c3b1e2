//! Typed stores on the HA key space.
//!
//! | key | value | written by |
//! | --- | --- | --- |
//! | `jobs/<job_id>` | the job record (JSON, owned by the JobManager) | JobManager leader |
//! | `checkpoints/<job_id>` | pointer to the latest completed checkpoint (JSON) | JobManager leader |
//! | `counters/<name>` | a decimal counter | any leader |

use std::sync::Arc;

use keel_proto::{KeelError, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{HaServices, Leadership};

fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| KeelError::internal(format!("cannot encode {what}: {e}")))
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| KeelError::ha(format!("record {key} in the HA store is not readable: {e}")))
}

/// Job records, one key per job.
#[derive(Clone)]
pub struct JobStore {
    ha: Arc<dyn HaServices>,
}

impl JobStore {
    pub fn new(ha: Arc<dyn HaServices>) -> Self {
        JobStore { ha }
    }

    fn key(job_id: &str) -> String {
        format!("jobs/{job_id}")
    }

    pub async fn put<T: Serialize>(&self, leadership: &Leadership, job_id: &str, job: &T) -> Result<()> {
        self.ha.put(leadership, &Self::key(job_id), encode("job record", job)?).await
    }

    pub async fn get<T: DeserializeOwned>(&self, job_id: &str) -> Result<Option<T>> {
        let key = Self::key(job_id);
        match self.ha.get(&key).await? {
            Some(bytes) => Ok(Some(decode(&key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Every job record. A record that cannot be decoded is an error naming its key: jobs are
    /// never skipped silently.
    pub async fn list<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for (key, bytes) in self.ha.list("jobs/").await? {
            out.push(decode(&key, &bytes)?);
        }
        Ok(out)
    }

    pub async fn delete(&self, leadership: &Leadership, job_id: &str) -> Result<()> {
        self.ha.delete(leadership, &Self::key(job_id)).await
    }
}

/// The pointer to each job's latest completed checkpoint.
#[derive(Clone)]
pub struct CheckpointPointerStore {
    ha: Arc<dyn HaServices>,
}

impl CheckpointPointerStore {
    pub fn new(ha: Arc<dyn HaServices>) -> Self {
        CheckpointPointerStore { ha }
    }

    fn key(job_id: &str) -> String {
        format!("checkpoints/{job_id}")
    }

    pub async fn set<T: Serialize>(&self, leadership: &Leadership, job_id: &str, pointer: &T) -> Result<()> {
        self.ha.put(leadership, &Self::key(job_id), encode("checkpoint pointer", pointer)?).await
    }

    pub async fn get<T: DeserializeOwned>(&self, job_id: &str) -> Result<Option<T>> {
        let key = Self::key(job_id);
        match self.ha.get(&key).await? {
            Some(bytes) => Ok(Some(decode(&key, &bytes)?)),
            None => Ok(None),
        }
    }
}

/// A named, fenced, monotonically increasing counter (checkpoint ids, ...).
#[derive(Clone)]
pub struct Counter {
    ha: Arc<dyn HaServices>,
    key: String,
}

impl Counter {
    pub fn new(ha: Arc<dyn HaServices>, name: &str) -> Self {
        Counter { ha, key: format!("counters/{name}") }
    }

    pub async fn next(&self, leadership: &Leadership) -> Result<u64> {
        self.ha.increment(leadership, &self.key).await
    }

    pub async fn current(&self) -> Result<u64> {
        match self.ha.get(&self.key).await? {
            None => Ok(0),
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| KeelError::ha(format!("counter {} is not a number", self.key))),
        }
    }
}
