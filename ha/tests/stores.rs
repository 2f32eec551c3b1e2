//! The typed stores on every backend: the same checks, run against a real etcd, against local
//! files, and against the raft store.

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

/// On the raft store (three members in this process, on loopback): the same properties as on
/// etcd, through two clients as two processes would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_counters_are_sequential_and_fenced_and_job_store_and_list_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = keel_ha::raft::testing::LocalGroup::start(dir.path(), 3, keel_ha::raft::Timing::default())
        .await
        .expect("raft members");
    let a = group.client(Duration::from_secs(3)).await.expect("client a");
    let b = group.client(Duration::from_secs(3)).await.expect("client b");
    exercise_stores(Arc::new(a), Arc::new(b)).await;
}
