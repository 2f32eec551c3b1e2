//! In-process tests of the TaskManager: operator chains driven directly, and the gRPC service
//! started on 127.0.0.1:0 with the local HA backend, a fake ResourceManager and a fake
//! JobManager that record what the TaskManager sends them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_ha::local::LocalHaServices;
use keel_ha::{HaServices, Role};
use keel_proto::pb::job_manager_server::{JobManager, JobManagerServer};
use keel_proto::pb::resource_manager_server::{ResourceManager, ResourceManagerServer};
use keel_proto::pb::task_manager_client::TaskManagerClient;
use keel_proto::pb::*;
use keel_proto::KeelError;
use keel_spec::JobSpec;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::task::{
    Ack, ChainEnd, ChainIo, ChainPlan, Control, Counters, TaskInfo, TaskMetrics, TaskSnapshot,
};

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "keel-tm-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until `cond` holds, polling, or panics with `what` after `timeout`.
async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_numbers(path: &Path) -> Vec<i64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| l.parse::<i64>().expect("a number per line")).collect()
}

fn datagen_to_file(dir: &Path, parallelism: u32, rows: Option<u64>, rate: u64) -> String {
    let rows = rows.map(|n| format!("    number-of-rows: {n}\n")).unwrap_or_default();
    format!(
        "name: numbers-to-file\nparallelism: {parallelism}\nsources:\n  - name: numbers\n    connector: datagen\n    rows-per-second: {rate}\n{rows}sinks:\n  - name: out\n    connector: file\n    path: {}\n",
        dir.display()
    )
}

struct Chain {
    cancel: CancellationToken,
    control: mpsc::Sender<Control>,
    acks: mpsc::UnboundedReceiver<Ack>,
    counters: Arc<Counters>,
    metrics: Arc<TaskMetrics>,
    handle: tokio::task::JoinHandle<keel_proto::Result<ChainEnd>>,
}

/// Who a test task is.
fn task_info(job_name: &str, subtask: u32, parallelism: u32) -> TaskInfo {
    TaskInfo {
        task_id: format!("job-1/1/{subtask}#0"),
        job_id: "job-1".into(),
        job_name: job_name.into(),
        version: 1,
        subtask,
        parallelism,
        attempt: 0,
        slot_index: 0,
        allocation_id: "a1".into(),
        jobmanager_epoch: 1,
        jobmanager_address: "127.0.0.1:1".into(),
    }
}

/// Opens and starts the chain of `subtask` of `spec` directly, without RPC, with its metrics
/// in `registry`.
async fn start_chain_in(
    registry: &keel_metrics::Registry,
    spec: &str,
    subtask: u32,
    restore: &[u8],
) -> Chain {
    let spec = JobSpec::parse(spec).expect("valid spec");
    let plan = ChainPlan::build(&spec, subtask, spec.parallelism, restore).expect("plan");
    let info = task_info(&spec.name, subtask, spec.parallelism);
    let metrics = Arc::new(TaskMetrics::register(registry, &info, &plan));
    let open = plan.open(&metrics).await.expect("open chain");
    let cancel = CancellationToken::new();
    let (control, control_rx) = mpsc::channel(8);
    let (ack_tx, acks) = mpsc::unbounded_channel();
    let counters = Arc::new(Counters::default());
    let io = ChainIo {
        cancel: cancel.clone(),
        control: control_rx,
        acks: ack_tx,
        counters: counters.clone(),
        metrics: metrics.clone(),
    };
    let handle = tokio::spawn(open.run(io));
    Chain { cancel, control, acks, counters, metrics, handle }
}

/// [`start_chain_in`] with a registry nobody reads.
async fn start_chain(spec: &str, subtask: u32, restore: &[u8]) -> Chain {
    start_chain_in(&keel_metrics::Registry::new(), spec, subtask, restore).await
}

// ---------------------------------------------------------------------------------------------
// chains, without RPC
// ---------------------------------------------------------------------------------------------

/// Each subtask of a bounded datagen → file job writes exactly its share of the numbers, in
/// order, to `part-<subtask>`; together the parts hold every number once; a second attempt
/// appends to the same part file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_writes_each_subtasks_share_to_its_part_file() {
    let dir = TempDir::new("file-sink");
    let out = dir.path().join("out");
    let spec = datagen_to_file(&out, 3, Some(1000), 1_000_000);
    let mut all = Vec::new();
    for subtask in 0..3 {
        let chain = start_chain(&spec, subtask, &[]).await;
        let end = tokio::time::timeout(Duration::from_secs(20), chain.handle)
            .await
            .expect("chain finishes")
            .expect("no panic")
            .expect("no error");
        assert_eq!(end, ChainEnd::Finished);
        let values = read_numbers(&out.join(format!("part-{subtask}")));
        let expected: Vec<i64> = (0..1000).filter(|v| v % 3 == i64::from(subtask)).collect();
        assert_eq!(values, expected, "part-{subtask}");
        assert_eq!(chain.counters.records_in(), expected.len() as u64);
        assert_eq!(chain.counters.records_out(), expected.len() as u64);
        all.extend(values);
    }
    let unique: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(unique.len(), 1000);
    assert_eq!(all.len(), 1000);

    // A restarted attempt of subtask 0 appends to part-0.
    let chain = start_chain(&spec, 0, &[]).await;
    let _ = tokio::time::timeout(Duration::from_secs(20), chain.handle).await.expect("finishes");
    assert_eq!(read_numbers(&out.join("part-0")).len(), 2 * 334);
}

/// A checkpoint barrier is acknowledged only after every record before it is durably in the
/// file; restoring a new attempt from the acknowledged state continues the sequence exactly
/// where the barrier cut it: no gap and no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_state_restores_without_gap_or_duplicate() {
    let dir = TempDir::new("checkpoint");
    let first_out = dir.path().join("first");
    let second_out = dir.path().join("second");
    let total = 20_000u64;
    let parallelism = 2;
    let subtask = 1;

    // First attempt: runs at 2000 rows/s, checkpointed after a while, then canceled.
    let first_spec = datagen_to_file(&first_out, parallelism, Some(total), 2000);
    let mut chain = start_chain(&first_spec, subtask, &[]).await;
    let counters = chain.counters.clone();
    wait_until("records flowing", Duration::from_secs(10), || counters.records_out() > 100).await;
    chain
        .control
        .send(Control::TriggerCheckpoint {
            checkpoint_id: 7,
            timestamp_ms: 0,
            is_savepoint: false,
            drain: false,
        })
        .await
        .expect("deliver trigger");
    let ack = tokio::time::timeout(Duration::from_secs(10), chain.acks.recv())
        .await
        .expect("ack in time")
        .expect("an ack");
    assert_eq!(ack.checkpoint_id, 7);
    let snapshot = TaskSnapshot::from_json(&ack.state).expect("snapshot json");
    let next = match snapshot.sources.get("numbers") {
        Some(crate::task::chain::SourceSnapshot::Datagen { splits }) => match splits.as_slice() {
            [one] => one.next,
            other => panic!("subtask 1 of 2 owns one progression, not {other:?}"),
        },
        other => panic!("no datagen state: {other:?}"),
    };
    // Everything before the barrier is in the file when the ack arrives.
    let expected_before: Vec<i64> = (0..next).filter(|v| v % 2 == 1).collect();
    assert!(!expected_before.is_empty());
    let written = read_numbers(&first_out.join("part-1"));
    assert!(written.len() >= expected_before.len(), "ack before the data was flushed");
    assert_eq!(&written[..expected_before.len()], &expected_before[..]);

    chain
        .control
        .send(Control::NotifyCheckpointComplete { checkpoint_id: 7 })
        .await
        .expect("deliver notification");
    chain.cancel.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), chain.handle)
        .await
        .expect("cancel in time")
        .expect("no panic")
        .expect("no error");
    assert_eq!(end, ChainEnd::Canceled);

    // Second attempt, restored from the acknowledged state, runs to the end.
    let second_spec = datagen_to_file(&second_out, parallelism, Some(total), 1_000_000);
    let chain = start_chain(&second_spec, subtask, &ack.state).await;
    let end = tokio::time::timeout(Duration::from_secs(20), chain.handle)
        .await
        .expect("finish in time")
        .expect("no panic")
        .expect("no error");
    assert_eq!(end, ChainEnd::Finished);
    let after = read_numbers(&second_out.join("part-1"));
    assert_eq!(after.first().copied(), Some(next));

    let combined: Vec<i64> = expected_before.into_iter().chain(after).collect();
    let expected_all: Vec<i64> = (0..total as i64).filter(|v| v % 2 == 1).collect();
    assert_eq!(combined, expected_all);
}

/// A kafka source whose brokers cannot be reached fails to open, after its request timeout,
/// with an error naming the bootstrap servers (not a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_kafka_source_fails_naming_the_bootstrap_servers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let spec = JobSpec::parse(&format!(
        "name: k\nsources:\n  - {{name: in, connector: kafka, topic: t, scan.startup.mode: earliest-offset, properties.bootstrap.servers: '127.0.0.1:{port}', properties.default.api.timeout.ms: '2000'}}\nsinks:\n  - {{name: out, connector: blackhole}}\n"
    ))
    .expect("valid spec");
    let plan = ChainPlan::build(&spec, 0, 1, &[]).expect("plan");
    let metrics = TaskMetrics::detached(&task_info("k", 0, 1), &plan);
    let err = match tokio::time::timeout(Duration::from_secs(60), plan.open(&metrics)).await.expect("no hang")
    {
        Ok(_) => panic!("opened a source on an unreachable broker"),
        Err(e) => e,
    };
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
}

/// A restore state of another subtask or parallelism is refused (the JobManager redistributes
/// a checkpoint over the attempt's subtasks; a state meant for another one is a mistake),
/// and so is a datagen split with a step below 1.
#[test]
fn restore_state_of_another_subtask_is_refused() {
    use keel_state::SequenceSplit;
    let spec = JobSpec::parse(&datagen_to_file(Path::new("/tmp/unused"), 2, None, 10)).expect("spec");
    let datagen = |next: i64, step: i64| crate::task::chain::SourceSnapshot::Datagen {
        splits: vec![SequenceSplit { next, step }],
    };
    let state = TaskSnapshot {
        subtask: 0,
        parallelism: 2,
        sources: [("numbers".to_string(), datagen(4, 2))].into_iter().collect(),
        sinks: Default::default(),
    };
    let json = state.to_json().expect("json");
    ChainPlan::build(&spec, 0, 2, &json).expect("own state");
    assert!(ChainPlan::build(&spec, 1, 2, &json).is_err());
    assert!(ChainPlan::build(&spec, 0, 3, &json).is_err());
    assert!(ChainPlan::build(&spec, 0, 2, b"not json").is_err());
    let zero_step = br#"{"subtask":0,"parallelism":2,"sources":{"numbers":{"connector":"datagen","splits":[{"next":4,"step":0}]}}}"#;
    assert!(ChainPlan::build(&spec, 0, 2, zero_step).is_err());
    // A snapshot of the form before splits is still restored.
    let old =
        br#"{"subtask":0,"parallelism":2,"sources":{"numbers":{"connector":"datagen","next_sequence":4}}}"#;
    let plan = ChainPlan::build(&spec, 0, 2, old).expect("old form");
    assert_eq!(plan.restore.and_then(|r| r.sources.get("numbers").cloned()), Some(datagen(4, 2)));
}

/// Several sources in one subtask: each record reaches exactly the sinks whose `from` names
/// its source, and counts once for the task however many of them wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_routed_to_the_sinks_of_their_source() {
    let dir = TempDir::new("routing");
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let spec = format!(
        "name: two\nsources:\n  - {{name: low, connector: datagen, number-of-rows: 50, rows-per-second: 100000}}\n  - {{name: high, connector: datagen, start: 1000, number-of-rows: 30, rows-per-second: 100000}}\nsinks:\n  - {{name: a, connector: file, from: low, path: {}}}\n  - {{name: b, connector: file, from: high, path: {}}}\n  - {{name: c, connector: blackhole, from: high}}\n",
        a.display(),
        b.display()
    );
    let chain = start_chain(&spec, 0, &[]).await;
    let counters = chain.counters.clone();
    let end = tokio::time::timeout(Duration::from_secs(20), chain.handle)
        .await
        .expect("finish")
        .expect("no panic")
        .expect("no error");
    assert_eq!(end, ChainEnd::Finished);
    assert_eq!(read_numbers(&a.join("part-0")), (0..50).collect::<Vec<_>>());
    assert_eq!(read_numbers(&b.join("part-0")), (1000..1030).collect::<Vec<_>>());
    assert_eq!(counters.records_in(), 80);
    // Each record counts once for the task, though the records of `high` went to two sinks.
    assert_eq!(counters.records_out(), 50 + 30);
}

/// Each record is counted once: in by the source driver, and out once for the task however
/// many sinks wrote it, while each sink counts its own writes. One source of 40 rows feeds a
/// file sink writing all of them and a filtered file sink writing the last 10: the task counts
/// 40 in and 40 out (not 50), the sinks 40 and 10, and a record no sink writes is not out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_record_is_counted_once_however_many_sinks_write_it() -> Result<(), Box<dyn std::error::Error>> {
    let dir = TempDir::new("count-once");
    let (all, last) = (dir.path().join("all"), dir.path().join("last"));
    let spec = format!(
        "name: once\nsources:\n  - {{name: n, connector: datagen, number-of-rows: 50, rows-per-second: 100000}}\nsinks:\n  - {{name: all, connector: file, from: n, path: {}, filter: \"id < 40\"}}\n  - {{name: last, connector: file, from: n, path: {}, filter: \"id >= 30 and id < 40\"}}\n",
        all.display(),
        last.display()
    );
    let registry = keel_metrics::Registry::new();
    let chain = start_chain_in(&registry, &spec, 0, &[]).await;
    let counters = chain.counters.clone();
    let end = tokio::time::timeout(Duration::from_secs(20), chain.handle).await???;
    assert_eq!(end, ChainEnd::Finished);
    assert_eq!(read_numbers(&all.join("part-0")), (0..40).collect::<Vec<_>>());
    assert_eq!(read_numbers(&last.join("part-0")), (30..40).collect::<Vec<_>>());
    // 50 read; rows 40..50 pass no filter and are not out.
    assert_eq!((counters.records_in(), counters.records_out()), (50, 40));
    let sink = |name: &'static str| registry.sum("numRecordsOut", &[("sink", name)]);
    assert_eq!((sink("all"), sink("last")), (Some(40.0), Some(10.0)));
    assert_eq!(registry.sum("numRecordsIn", &[("source", "n")]), Some(50.0));
    Ok(())
}

/// Every source and sink of a chain counts its records (and a sink its bytes) under the task's
/// labels plus its own name; closing the metrics removes every series of the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_metrics_count_per_source_and_sink_under_the_task_labels() {
    let dir = TempDir::new("chain-metrics");
    let a = dir.path().join("a");
    let spec = format!(
        "name: two\nsources:\n  - {{name: low, connector: datagen, number-of-rows: 50, rows-per-second: 100000}}\n  - {{name: high, connector: datagen, start: 1000, number-of-rows: 30, rows-per-second: 100000}}\nsinks:\n  - {{name: a, connector: file, from: low, path: {}}}\n  - {{name: c, connector: blackhole, from: high}}\n",
        a.display()
    );
    let registry = keel_metrics::Registry::new();
    let chain = start_chain_in(&registry, &spec, 0, &[]).await;
    let metrics = chain.metrics.clone();
    let end = tokio::time::timeout(Duration::from_secs(20), chain.handle)
        .await
        .expect("finish")
        .expect("no panic")
        .expect("no error");
    assert_eq!(end, ChainEnd::Finished);
    let task =
        [("job", "two"), ("job_id", "job-1"), ("version", "1"), ("subtask", "0"), ("task_id", "job-1/1/0#0")];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = task.to_vec();
        labels.push(extra);
        labels
    };
    assert_eq!(registry.get("numRecordsIn", &with(("source", "low"))), Some(50.0));
    assert_eq!(registry.get("numRecordsIn", &with(("source", "high"))), Some(30.0));
    assert_eq!(registry.get("numRecordsOut", &with(("sink", "a"))), Some(50.0));
    assert_eq!(registry.get("numRecordsOut", &with(("sink", "c"))), Some(30.0));
    // "0".."9" are one byte, "10".."49" two: the encoded values, without line ends.
    assert_eq!(registry.get("numBytesOut", &with(("sink", "a"))), Some(10.0 + 40.0 * 2.0));
    assert!(registry.get("numRecordsInPerSecond", &with(("source", "low"))).is_some_and(|r| r > 0.0));
    assert!(registry.get("numRecordsOutPerSecond", &with(("sink", "c"))).is_some_and(|r| r > 0.0));
    // Datagen sources and file sinks have no Kafka metrics.
    assert_eq!(registry.get("pendingRecords", &with(("source", "low"))), None);
    assert_eq!(registry.get("numBytesIn", &with(("source", "low"))), None);
    assert_eq!(registry.get("currentSendTime", &with(("sink", "a"))), None);
    let throughput = metrics.tick();
    assert!(throughput.records_in_per_second > 0.0 && throughput.records_out_per_second > 0.0);
    assert_eq!((throughput.pending_records, throughput.emit_lag_ms), (None, None));
    assert!(throughput.sources.is_empty());

    metrics.close();
    assert!(registry.snapshot().is_empty(), "{:?}", registry.snapshot());
    // The handles still count, unseen.
    if let Some(s) = metrics.source(0) {
        s.record_in(1, 0, 0);
        assert_eq!(s.num_records_in(), 51);
    }
    assert!(registry.render().is_empty());
}

/// `GET /metrics` on the metrics endpoint, the body.
async fn scrape(address: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect to /metrics");
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").await.expect("request");
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.expect("response");
        bytes
    };
    let bytes = tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("scrape within 10 s");
    let text = String::from_utf8(bytes).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the series `series` (`name{labels}`) in a scrape.
fn series_value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A running task's metrics are served on the TaskManager's `GET /metrics` with the task's
/// labels, its reports to the JobManager carry its rates, and when it ends its series leave
/// the scrape and its last report shows no throughput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_metrics_are_served_while_it_runs_and_gone_when_it_ends() {
    let mut c = start_tm("metrics").await;
    assert!(c.tm.metrics_address.starts_with("127.0.0.1:"), "{}", c.tm.metrics_address);
    assert!(!scrape(&c.tm.metrics_address).await.contains("keel_num_records_in_total"), "no task, no series");
    let jm_log = Arc::new(JmLog::default());
    let jm_address = serve(
        tonic::transport::Server::builder().add_service(JobManagerServer::new(FakeJm(jm_log.clone()))),
        c.stop_fakes.clone(),
    )
    .await;
    c.client
        .allocate_slot(AllocateSlotRequest {
            resourcemanager: rm_stamp(1),
            index: 1,
            allocation: allocation("a1", "job-1"),
        })
        .await
        .expect("allocate");
    let out = TempDir::new("metrics-out");
    let spec = datagen_to_file(out.path(), 2, None, 2000);
    c.client.deploy_task(deploy_request(&jm_address, 1, "a1", 1, &spec, 1, 2)).await.expect("deploy");
    let task_id = "job-1/1/1#0";
    let labels = format!("job=\"numbers-to-file\",job_id=\"job-1\",source=\"numbers\",subtask=\"1\",task_id=\"{task_id}\",version=\"1\"");
    let records_in = format!("keel_num_records_in_total{{{labels}}}");
    let records_out = format!(
        "keel_num_records_out_total{{job=\"numbers-to-file\",job_id=\"job-1\",sink=\"out\",subtask=\"1\",task_id=\"{task_id}\",version=\"1\"}}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let body = scrape(&c.tm.metrics_address).await;
        if series_value(&body, &records_in).is_some_and(|v| v > 0.0)
            && series_value(&body, &records_out).is_some_and(|v| v > 0.0)
        {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "no records counted in 30 s:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.contains(&format!("keel_num_records_in_per_second{{{labels}}} ")), "{body}");
    assert!(body.contains("# TYPE keel_num_records_in_total counter"), "{body}");

    // Heartbeats carry the task's rates.
    let rated = || {
        jm_log.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|h| {
            h.tasks.iter().any(|t| {
                t.task_id == task_id && t.records_in_per_second > 0.0 && t.records_out_per_second > 0.0
            })
        })
    };
    wait_until("a heartbeat with the task's rates", Duration::from_secs(30), rated).await;

    c.client
        .cancel_task(CancelTaskRequest { jobmanager: rm_stamp(1), task_id: task_id.into() })
        .await
        .expect("cancel");
    wait_until("canceled reported", Duration::from_secs(20), || {
        jm_log.states_of(task_id).last() == Some(&TaskState::Canceled)
    })
    .await;
    let body = scrape(&c.tm.metrics_address).await;
    assert!(!body.contains(task_id), "series of the ended task remain:\n{body}");
    let last = jm_log
        .updates
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .rfind(|u| u.task_id == task_id)
        .cloned()
        .expect("an update");
    assert_eq!((last.records_in_per_second, last.records_out_per_second), (0.0, 0.0), "{last:?}");
    assert!(last.records_in > 0);

    let address = c.tm.metrics_address.clone();
    c.shutdown.cancel();
    c.tm.wait().await.expect("clean shutdown");
    assert!(tokio::net::TcpStream::connect(&address).await.is_err(), "the metrics endpoint stopped");
    c.stop_fakes.cancel();
}

// ---------------------------------------------------------------------------------------------
// fake leaders
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct JmLog {
    updates: Mutex<Vec<TaskStateUpdate>>,
    acks: Mutex<Vec<AcknowledgeCheckpointRequest>>,
    heartbeats: Mutex<Vec<JobManagerHeartbeatRequest>>,
}

impl JmLog {
    fn states_of(&self, task_id: &str) -> Vec<TaskState> {
        self.updates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|u| u.task_id == task_id)
            .map(|u| u.state())
            .collect()
    }
}

struct FakeJm(Arc<JmLog>);

#[tonic::async_trait]
impl JobManager for FakeJm {
    async fn submit_job(&self, _: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn cancel_job(&self, _: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_jobs(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn describe_job(&self, _: Request<DescribeJobRequest>) -> Result<Response<JobDetails>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn update_task_state(
        &self,
        request: Request<TaskStateUpdate>,
    ) -> Result<Response<UpdateTaskStateResponse>, Status> {
        self.0.updates.lock().unwrap_or_else(|p| p.into_inner()).push(request.into_inner());
        Ok(Response::new(UpdateTaskStateResponse { known: true }))
    }
    async fn task_manager_heartbeat(
        &self,
        request: Request<JobManagerHeartbeatRequest>,
    ) -> Result<Response<JobManagerHeartbeatResponse>, Status> {
        self.0.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).push(request.into_inner());
        Ok(Response::new(JobManagerHeartbeatResponse { cancel_task_ids: vec![] }))
    }
    async fn acknowledge_checkpoint(
        &self,
        request: Request<AcknowledgeCheckpointRequest>,
    ) -> Result<Response<AcknowledgeCheckpointResponse>, Status> {
        self.0.acks.lock().unwrap_or_else(|p| p.into_inner()).push(request.into_inner());
        Ok(Response::new(AcknowledgeCheckpointResponse {}))
    }
    async fn leader_info(
        &self,
        _: Request<LeaderInfoRequest>,
    ) -> Result<Response<LeaderInfoResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type UpgradeJobStream = tokio_stream::wrappers::UnboundedReceiverStream<Result<UpgradeProgress, Status>>;
    async fn upgrade_job(
        &self,
        _: Request<UpgradeJobRequest>,
    ) -> Result<Response<Self::UpgradeJobStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn trigger_savepoint(
        &self,
        _: Request<TriggerSavepointRequest>,
    ) -> Result<Response<TriggerSavepointResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn stop_job(
        &self,
        _: Request<TriggerSavepointRequest>,
    ) -> Result<Response<TriggerSavepointResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type PromoteJobStream = tokio_stream::wrappers::UnboundedReceiverStream<Result<UpgradeProgress, Status>>;
    async fn promote_job(
        &self,
        _: Request<TriggerSavepointRequest>,
    ) -> Result<Response<Self::PromoteJobStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[derive(Default)]
struct RmLog {
    registrations: Mutex<Vec<RegisterTaskManagerRequest>>,
    heartbeats: Mutex<Vec<TaskManagerHeartbeatRequest>>,
    /// Answer heartbeats with `known = false` once (as a new leader that lost the registry).
    forget_once: AtomicBool,
}

struct FakeRm(Arc<RmLog>);

#[tonic::async_trait]
impl ResourceManager for FakeRm {
    async fn register_task_manager(
        &self,
        request: Request<RegisterTaskManagerRequest>,
    ) -> Result<Response<RegisterTaskManagerResponse>, Status> {
        self.0.registrations.lock().unwrap_or_else(|p| p.into_inner()).push(request.into_inner());
        Ok(Response::new(RegisterTaskManagerResponse { resourcemanager_epoch: 3 }))
    }
    async fn heartbeat(
        &self,
        request: Request<TaskManagerHeartbeatRequest>,
    ) -> Result<Response<TaskManagerHeartbeatResponse>, Status> {
        self.0.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).push(request.into_inner());
        let known = !self.0.forget_once.swap(false, Ordering::SeqCst);
        Ok(Response::new(TaskManagerHeartbeatResponse { known, resourcemanager_epoch: 3 }))
    }
    async fn deregister_task_manager(
        &self,
        _: Request<keel_proto::pb::DeregisterTaskManagerRequest>,
    ) -> Result<Response<keel_proto::pb::DeregisterTaskManagerResponse>, Status> {
        Ok(Response::new(keel_proto::pb::DeregisterTaskManagerResponse { known: true }))
    }
    async fn request_slots(
        &self,
        _: Request<RequestSlotsRequest>,
    ) -> Result<Response<RequestSlotsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn release_slots(
        &self,
        _: Request<ReleaseSlotsRequest>,
    ) -> Result<Response<ReleaseSlotsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type WatchTaskManagersStream = tokio_stream::Empty<Result<TaskManagerEvent, Status>>;
    async fn watch_task_managers(
        &self,
        _: Request<WatchTaskManagersRequest>,
    ) -> Result<Response<Self::WatchTaskManagersStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn cluster_overview(
        &self,
        _: Request<ClusterOverviewRequest>,
    ) -> Result<Response<ClusterOverviewResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves `router` on 127.0.0.1:0 until `stop`; returns the address.
async fn serve(router: tonic::transport::server::Router, stop: CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("local addr").to_string();
    tokio::spawn(router.serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        stop.cancelled_owned(),
    ));
    address
}

struct Cluster {
    _dir: TempDir,
    ha: Arc<dyn HaServices>,
    shutdown: CancellationToken,
    stop_fakes: CancellationToken,
    tm: crate::RunningTaskManager,
    client: TaskManagerClient<tonic::transport::Channel>,
}

/// A TaskManager with 2 slots on 127.0.0.1:0, the local HA backend in a temp dir, and no
/// leaders yet.
async fn start_tm(tag: &str) -> Cluster {
    let dir = TempDir::new(tag);
    let ha: Arc<dyn HaServices> =
        Arc::new(LocalHaServices::open(&dir.path().join("ha"), "test").expect("local ha"));
    let mut config = keel_config::Config::defaults();
    config.taskmanager_rpc = keel_config::RpcAddress { host: "127.0.0.1".into(), port: 0 };
    config.slots_per_taskmanager = 2;
    config.heartbeat_interval = Duration::from_millis(100);
    config.taskmanager_id = Some(format!("tm-{tag}"));
    let shutdown = CancellationToken::new();
    let tm = crate::start(config, ha.clone(), shutdown.clone()).await.expect("start taskmanager");
    let client = TaskManagerClient::connect(format!("http://{}", tm.address)).await.expect("connect");
    Cluster { _dir: dir, ha, shutdown, stop_fakes: CancellationToken::new(), tm, client }
}

fn rm_stamp(epoch: u64) -> Option<LeaderStamp> {
    Some(LeaderStamp { epoch, address: "127.0.0.1:1".into() })
}

fn allocation(id: &str, job: &str) -> Option<SlotAllocation> {
    Some(SlotAllocation { allocation_id: id.into(), job_id: job.into(), version: 1, jobmanager_epoch: 1 })
}

fn keel_error(status: &Status) -> KeelError {
    KeelError::from_status(status, "taskmanager")
}

// ---------------------------------------------------------------------------------------------
// the gRPC service
// ---------------------------------------------------------------------------------------------

/// After a ResourceManager request with epoch 5, one with epoch 3 is rejected with
/// `StaleEpoch { received: 3, seen: 5 }`; the JobManager fence is separate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_a_stale_epoch_are_rejected() {
    let mut c = start_tm("stale").await;
    assert!(c.tm.address.starts_with("127.0.0.1:"));
    assert_ne!(c.tm.address, "127.0.0.1:0");
    c.client
        .allocate_slot(AllocateSlotRequest {
            resourcemanager: rm_stamp(5),
            index: 0,
            allocation: allocation("a1", "j"),
        })
        .await
        .expect("epoch 5 accepted");
    let status = c
        .client
        .allocate_slot(AllocateSlotRequest {
            resourcemanager: rm_stamp(3),
            index: 1,
            allocation: allocation("a2", "j"),
        })
        .await
        .expect_err("epoch 3 rejected");
    assert_eq!(
        keel_error(&status),
        KeelError::StaleEpoch { role: "resourcemanager".into(), received: 3, seen: 5 }
    );
    let status = c
        .client
        .free_slot(FreeSlotRequest { resourcemanager: rm_stamp(4), allocation_id: "a1".into() })
        .await
        .expect_err("epoch 4 rejected");
    assert!(matches!(keel_error(&status), KeelError::StaleEpoch { received: 4, seen: 5, .. }));

    // JobManager epochs are fenced separately.
    c.client
        .cancel_task(CancelTaskRequest { jobmanager: rm_stamp(9), task_id: "nope".into() })
        .await
        .expect("jm epoch 9");
    let status = c
        .client
        .cancel_task(CancelTaskRequest { jobmanager: rm_stamp(8), task_id: "nope".into() })
        .await
        .expect_err("jm epoch 8 rejected");
    assert_eq!(
        keel_error(&status),
        KeelError::StaleEpoch { role: "jobmanager".into(), received: 8, seen: 9 }
    );
    // A request without a stamp is invalid.
    let status = c
        .client
        .allocate_slot(AllocateSlotRequest {
            resourcemanager: None,
            index: 0,
            allocation: allocation("a1", "j"),
        })
        .await
        .expect_err("no stamp");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    c.shutdown.cancel();
    c.tm.wait().await.expect("clean shutdown");
}

/// Slot allocation is idempotent, conflicts name the owner, indices out of range are invalid,
/// and freeing an unknown allocation frees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_allocation_over_rpc() {
    let mut c = start_tm("slots").await;
    let req = |index, id: &str| AllocateSlotRequest {
        resourcemanager: rm_stamp(1),
        index,
        allocation: allocation(id, "j"),
    };
    c.client.allocate_slot(req(0, "a1")).await.expect("allocate");
    c.client.allocate_slot(req(0, "a1")).await.expect("idempotent");
    let status = c.client.allocate_slot(req(0, "a2")).await.expect_err("taken");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("a1") && status.message().contains("tm-slots"), "{}", status.message());
    let status = c.client.allocate_slot(req(2, "a3")).await.expect_err("out of range");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let freed = c
        .client
        .free_slot(FreeSlotRequest { resourcemanager: rm_stamp(1), allocation_id: "zz".into() })
        .await
        .expect("free")
        .into_inner()
        .freed;
    assert!(!freed);
    let freed = c
        .client
        .free_slot(FreeSlotRequest { resourcemanager: rm_stamp(1), allocation_id: "a1".into() })
        .await
        .expect("free")
        .into_inner()
        .freed;
    assert!(freed);
    c.shutdown.cancel();
    c.tm.wait().await.expect("clean shutdown");
}

fn deploy_request(
    jm: &str,
    epoch: u64,
    allocation_id: &str,
    slot: u32,
    spec: &str,
    subtask: u32,
    parallelism: u32,
) -> DeployTaskRequest {
    DeployTaskRequest {
        jobmanager: Some(LeaderStamp { epoch, address: jm.into() }),
        allocation_id: allocation_id.into(),
        slot_index: slot,
        task_id: format!("job-1/1/{subtask}#0"),
        job_id: "job-1".into(),
        version: 1,
        subtask,
        parallelism,
        attempt: 0,
        spec_yaml: spec.into(),
        restore_state: vec![],
        checkpoints_dir: String::new(),
    }
}

/// Deploying into a slot that is not allocated to the deploying allocation is refused with an
/// error that says so; so are invalid specs and kafka connectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_into_a_slot_not_allocated_is_refused() {
    let mut c = start_tm("unallocated").await;
    let dir = TempDir::new("unallocated-out");
    let spec = datagen_to_file(dir.path(), 1, Some(10), 100);
    let status = c
        .client
        .deploy_task(deploy_request("127.0.0.1:1", 1, "a1", 0, &spec, 0, 1))
        .await
        .expect_err("slot is free");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("not allocated to allocation a1"), "{}", status.message());

    c.client
        .allocate_slot(AllocateSlotRequest {
            resourcemanager: rm_stamp(1),
            index: 0,
            allocation: allocation("a2", "job-1"),
        })
        .await
        .expect("allocate");
    let status = c
        .client
        .deploy_task(deploy_request("127.0.0.1:1", 1, "a1", 0, &spec, 0, 1))
        .await
        .expect_err("slot belongs to a2");
    assert!(status.message().contains("belongs to allocation a2"), "{}", status.message());

    let status = c
        .client
        .deploy_task(deploy_request("127.0.0.1:1", 1, "a2", 0, "name: x\nparallelism: 0\n", 0, 1))
        .await
        .expect_err("bad spec");
    assert!(matches!(keel_error(&status), KeelError::InvalidSpec { field, .. } if field == "parallelism"));

    assert!(c.tm.shared().find_task("job-1/1/0#0").is_none());
    c.shutdown.cancel();
    c.tm.wait().await.expect("clean shutdown");
}

/// The whole life of a task over RPC: the TaskManager registers with the ResourceManager named
/// by the HA services (and again when it is forgotten), reports deploying/running/canceled to
/// the JobManager of the deploy request, heartbeats its tasks, refuses a duplicate deployment,
/// acknowledges a checkpoint with the source state, and cancels on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_lifecycle_reports_and_checkpoints() {
    let mut c = start_tm("lifecycle").await;
    let jm_log = Arc::new(JmLog::default());
    let rm_log = Arc::new(RmLog::default());
    let jm_address = serve(
        tonic::transport::Server::builder().add_service(JobManagerServer::new(FakeJm(jm_log.clone()))),
        c.stop_fakes.clone(),
    )
    .await;
    let rm_address = serve(
        tonic::transport::Server::builder().add_service(ResourceManagerServer::new(FakeRm(rm_log.clone()))),
        c.stop_fakes.clone(),
    )
    .await;
    // The fake ResourceManager becomes leader in the HA services; the TaskManager finds it.
    let _rm_leadership =
        c.ha.campaign(Role::ResourceManager, &rm_address, &c.stop_fakes).await.expect("campaign");
    let regs = || rm_log.registrations.lock().unwrap_or_else(|p| p.into_inner()).len();
    wait_until("registration with the resourcemanager", Duration::from_secs(10), || regs() >= 1).await;
    {
        let r = rm_log.registrations.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(r[0].taskmanager_id, "tm-lifecycle");
        assert_eq!(r[0].address, c.tm.address);
        assert_eq!(r[0].num_slots, 2);
        assert_eq!(r[0].slots.len(), 2);
        assert!(r[0].memory_rss_bytes > 0);
    }
    let hbs = || rm_log.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).len();
    wait_until("heartbeats to the resourcemanager", Duration::from_secs(10), || hbs() >= 2).await;
    rm_log.forget_once.store(true, Ordering::SeqCst);
    wait_until("registration after known=false", Duration::from_secs(10), || regs() >= 2).await;

    // Allocate and deploy a datagen -> file task.
    c.client
        .allocate_slot(AllocateSlotRequest {
            resourcemanager: rm_stamp(3),
            index: 1,
            allocation: allocation("a1", "job-1"),
        })
        .await
        .expect("allocate");
    let out = TempDir::new("lifecycle-out");
    let spec = datagen_to_file(out.path(), 2, None, 2000);
    c.client.deploy_task(deploy_request(&jm_address, 4, "a1", 1, &spec, 1, 2)).await.expect("deploy");
    let task_id = "job-1/1/1#0";
    let status = c
        .client
        .deploy_task(deploy_request(&jm_address, 4, "a1", 1, &spec, 1, 2))
        .await
        .expect_err("duplicate");
    assert_eq!(status.code(), tonic::Code::AlreadyExists);

    wait_until("running reported", Duration::from_secs(10), || {
        jm_log.states_of(task_id).contains(&TaskState::Running)
    })
    .await;
    wait_until("slot report names the task", Duration::from_secs(10), || {
        rm_log
            .heartbeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .is_some_and(|h| h.slots.get(1).is_some_and(|s| s.task_id == task_id))
    })
    .await;
    wait_until("jobmanager heartbeat lists the task", Duration::from_secs(10), || {
        jm_log
            .heartbeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|h| h.tasks.iter().any(|t| t.task_id == task_id && t.records_out > 0))
    })
    .await;

    // A checkpoint: triggered with a stale epoch is refused, with the current one acknowledged.
    let status = c
        .client
        .trigger_checkpoint(TriggerCheckpointRequest {
            jobmanager: rm_stamp(2),
            task_id: task_id.into(),
            checkpoint_id: 1,
            timestamp_ms: 0,
            is_savepoint: false,
            drain: false,
        })
        .await
        .expect_err("stale");
    assert!(matches!(keel_error(&status), KeelError::StaleEpoch { .. }));
    let status = c
        .client
        .trigger_checkpoint(TriggerCheckpointRequest {
            jobmanager: rm_stamp(4),
            task_id: "nope".into(),
            checkpoint_id: 1,
            timestamp_ms: 0,
            is_savepoint: false,
            drain: false,
        })
        .await
        .expect_err("unknown task");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    c.client
        .trigger_checkpoint(TriggerCheckpointRequest {
            jobmanager: rm_stamp(4),
            task_id: task_id.into(),
            checkpoint_id: 1,
            timestamp_ms: 0,
            is_savepoint: false,
            drain: false,
        })
        .await
        .expect("trigger");
    wait_until("checkpoint acknowledged", Duration::from_secs(10), || {
        !jm_log.acks.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    })
    .await;
    let ack = jm_log.acks.lock().unwrap_or_else(|p| p.into_inner())[0].clone();
    assert_eq!(
        (ack.task_id.as_str(), ack.job_id.as_str(), ack.version, ack.checkpoint_id),
        (task_id, "job-1", 1, 1)
    );
    assert_eq!(ack.state_size, ack.state_handle.len() as u64);
    let snapshot = TaskSnapshot::from_json(&ack.state_handle).expect("snapshot");
    assert_eq!((snapshot.subtask, snapshot.parallelism), (1, 2));
    c.client
        .notify_checkpoint_complete(NotifyCheckpointCompleteRequest {
            jobmanager: rm_stamp(4),
            task_id: task_id.into(),
            checkpoint_id: 1,
        })
        .await
        .expect("notify");

    // Cancel.
    let found = c
        .client
        .cancel_task(CancelTaskRequest { jobmanager: rm_stamp(4), task_id: task_id.into() })
        .await
        .expect("cancel")
        .into_inner()
        .found;
    assert!(found);
    wait_until("canceled reported", Duration::from_secs(10), || {
        jm_log.states_of(task_id).last() == Some(&TaskState::Canceled)
    })
    .await;
    let states = jm_log.states_of(task_id);
    assert_eq!(states.first(), Some(&TaskState::Deploying), "{states:?}");
    let update = jm_log
        .updates
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .rfind(|u| u.task_id == task_id)
        .cloned()
        .expect("an update");
    assert_eq!(update.jobmanager_epoch, 4);
    assert_eq!(update.taskmanager_id, "tm-lifecycle");
    assert!(update.records_out > 0 && update.records_in >= update.records_out, "{update:?}");
    let written = read_numbers(&out.path().join("part-1"));
    assert_eq!(written.len() as u64, update.records_out);
    assert!(written.iter().enumerate().all(|(k, v)| *v == 1 + 2 * k as i64));
    let found = c
        .client
        .cancel_task(CancelTaskRequest { jobmanager: rm_stamp(4), task_id: "nope".into() })
        .await
        .expect("cancel unknown")
        .into_inner()
        .found;
    assert!(!found);

    // The slot can take the next attempt of the task.
    let mut next = deploy_request(&jm_address, 4, "a1", 1, &spec, 1, 2);
    next.task_id = "job-1/1/1#1".into();
    next.attempt = 1;
    c.client.deploy_task(next).await.expect("deploy next attempt");
    wait_until("next attempt running", Duration::from_secs(10), || {
        jm_log.states_of("job-1/1/1#1").contains(&TaskState::Running)
    })
    .await;

    // Shutdown cancels it and reports that before returning.
    c.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), c.tm.wait())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
    assert_eq!(jm_log.states_of("job-1/1/1#1").last(), Some(&TaskState::Canceled));
    c.stop_fakes.cancel();
}

/// A bounded job finishes by itself and reports `finished` with its counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_task_finishes_and_reports_it() {
    let mut c = start_tm("bounded").await;
    let jm_log = Arc::new(JmLog::default());
    let jm_address = serve(
        tonic::transport::Server::builder().add_service(JobManagerServer::new(FakeJm(jm_log.clone()))),
        c.stop_fakes.clone(),
    )
    .await;
    c.client
        .allocate_slot(AllocateSlotRequest {
            resourcemanager: rm_stamp(1),
            index: 0,
            allocation: allocation("a1", "job-1"),
        })
        .await
        .expect("allocate");
    let out = TempDir::new("bounded-out");
    let spec = datagen_to_file(out.path(), 1, Some(500), 100_000);
    c.client.deploy_task(deploy_request(&jm_address, 1, "a1", 0, &spec, 0, 1)).await.expect("deploy");
    wait_until("finished reported", Duration::from_secs(20), || {
        jm_log.states_of("job-1/1/0#0").last() == Some(&TaskState::Finished)
    })
    .await;
    let last = jm_log.updates.lock().unwrap_or_else(|p| p.into_inner()).last().cloned().expect("an update");
    assert_eq!((last.records_in, last.records_out), (500, 500));
    assert_eq!(read_numbers(&out.path().join("part-0")), (0..500).collect::<Vec<_>>());
    c.shutdown.cancel();
    c.tm.wait().await.expect("clean shutdown");
    c.stop_fakes.cancel();
}
