//! The typed stores on both backends: the same checks, run against a real etcd and against
//! local files.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{etcd_ha, exercise_stores, EtcdCluster};
use keel_ha::local::LocalHaServices;

/// On etcd: counter increments are sequential (also when concurrent) and fenced (a deposed
/// leader cannot count), job records round-trip, and `list` returns exactly the keys under a
/// prefix, sorted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_counters_are_sequential_and_fenced_and_job_store_and_list_round_trip() {
    let etcd = EtcdCluster::single().await;
    let a = etcd_ha(&etcd.endpoints(), "stores", Duration::from_secs(3)).await;
    let b = etcd_ha(&etcd.endpoints(), "stores", Duration::from_secs(3)).await;
    exercise_stores(Arc::new(a), Arc::new(b)).await;
}

/// On local files: the same properties as on etcd, with two backends on one directory standing
/// in for two processes (flock locks of separate opens conflict even within one process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_counters_are_sequential_and_fenced_and_job_store_and_list_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = LocalHaServices::open(dir.path(), "stores").expect("open");
    let b = LocalHaServices::open(dir.path(), "stores").expect("open");
    exercise_stores(Arc::new(a), Arc::new(b)).await;
}
