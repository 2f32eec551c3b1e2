//! Test fixtures: real etcd servers on free loopback ports, and checks shared by both backends.
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_ha::etcd::EtcdHaServices;
use keel_ha::{Counter, HaServices, JobStore, Role};
use keel_proto::KeelError;
use tokio_util::sync::CancellationToken;

/// Logs of the code under test, filtered by `RUST_LOG` (nothing by default), captured per test.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

const INSTALL_HINT: &str = "the keel-ha tests need a real etcd server (3.4 or later). Run \
     `scripts/install-deps.sh` (it installs Debian's etcd-server: `apt-get install -y etcd-server`), \
     or point KEEL_ETCD_BIN at an etcd binary.";

/// The etcd binary: `$KEEL_ETCD_BIN`, else `etcd` on the PATH, else `/usr/bin/etcd`. Panics with
/// what to do when there is none: these tests never skip silently.
pub fn etcd_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("KEEL_ETCD_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "KEEL_ETCD_BIN={} is not a file; {}", bin.display(), INSTALL_HINT);
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("etcd")).find(|p| p.is_file()));
    if let Some(bin) = on_path {
        return bin;
    }
    let debian = PathBuf::from("/usr/bin/etcd");
    if debian.is_file() {
        return debian;
    }
    panic!("etcd is not installed: {INSTALL_HINT}");
}

/// `n` distinct free loopback ports (all bound at once, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local addr").port()).collect()
}

/// Waits until `check` returns `Some`, polling every 50 ms, or panics after `limit` with `what`.
pub async fn wait_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// Real etcd processes with their own data directories, killed on drop.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
}

impl EtcdCluster {
    /// A single-member cluster, ready to serve.
    pub async fn single() -> Self {
        Self::start(1).await
    }

    /// A three-member cluster, ready to serve (it has a raft leader).
    pub async fn three() -> Self {
        Self::start(3).await
    }

    async fn start(n: usize) -> Self {
        init_tracing();
        let bin = etcd_binary();
        let dir = tempfile::Builder::new().prefix("keel-etcd-").tempdir().expect("tempdir");
        let ports = free_ports(2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("m{i}.data")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster =
            members.iter().map(|m| format!("{}={}", m.name, m.peer_url())).collect::<Vec<_>>().join(",");
        let token = format!("keel-test-{}-{}", std::process::id(), ports[0]);
        let mut cluster = EtcdCluster { dir, members, initial_cluster, token };
        for i in 0..n {
            cluster.spawn(&bin, i, "new");
        }
        for i in 0..n {
            cluster.wait_member_ready(i, Duration::from_secs(30)).await;
        }
        cluster
    }

    fn spawn(&mut self, bin: &Path, i: usize, state: &str) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log).expect("open etcd log");
        let child = Command::new(bin)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(m.client_url())
            .arg("--advertise-client-urls")
            .arg(m.client_url())
            .arg("--listen-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.members[i].child = Some(child);
    }

    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until member `i` answers a linearizable read (so it sees a raft leader).
    async fn wait_member_ready(&mut self, i: usize, limit: Duration) {
        let endpoint = self.members[i].client_url();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.members[i].child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "etcd member {} exited with {status} while starting:\n{}",
                        self.members[i].name,
                        self.log_tail(i)
                    );
                }
            }
            let probe = async {
                let ha = EtcdHaServices::connect(
                    std::slice::from_ref(&endpoint),
                    "readiness-probe",
                    Duration::from_secs(2),
                    Duration::from_millis(500),
                )
                .await?
                .with_request_timeout(Duration::from_millis(500));
                ha.get("probe").await
            };
            if probe.await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {} at {endpoint} not ready after {limit:?}:\n{}",
                self.members[i].name,
                self.log_tail(i)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory (it rejoins the cluster) and waits until
    /// it serves.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(&etcd_binary(), i, "existing");
        self.wait_member_ready(i, Duration::from_secs(30)).await;
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Connects an etcd backend to `endpoints`.
pub async fn etcd_ha(endpoints: &[String], cluster_id: &str, ttl: Duration) -> EtcdHaServices {
    EtcdHaServices::connect(endpoints, cluster_id, ttl, Duration::from_secs(5))
        .await
        .expect("connect to etcd")
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TestJob {
    pub id: String,
    pub version: u32,
    pub spec: String,
}

/// Counters are sequential and fenced, the job store round-trips records, and `list` returns
/// exactly the keys under a prefix, sorted. `ha` and `other` are two clients of the same
/// cluster (two processes' worth of backends).
pub async fn exercise_stores(ha: Arc<dyn HaServices>, other: Arc<dyn HaServices>) {
    let never = CancellationToken::new();
    let leader = ha.campaign(Role::JobManager, "jm-1:6123", &never).await.expect("campaign");

    // Counters: sequential from 1, also under concurrent increments by the leader.
    let counter = Counter::new(ha.clone(), "checkpoint-id");
    assert_eq!(counter.current().await.expect("current"), 0);
    for expected in 1..=3 {
        assert_eq!(counter.next(&leader).await.expect("next"), expected);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (counter, leader) = (counter.clone(), leader.clone());
        tasks.spawn(async move { counter.next(&leader).await.expect("concurrent next") });
    }
    let mut seen: Vec<u64> = tasks.join_all().await;
    seen.sort_unstable();
    assert_eq!(seen, (4..=13).collect::<Vec<u64>>(), "every concurrent increment gets its own value");
    assert_eq!(counter.current().await.expect("current"), 13);

    // Job store round trip.
    let jobs = JobStore::new(ha.clone());
    let a = TestJob { id: "job-a".into(), version: 1, spec: "kafka -> kafka".into() };
    let b = TestJob { id: "job-b".into(), version: 2, spec: "{\"nested\": [1, 2]}".into() };
    jobs.put(&leader, &a.id, &a).await.expect("put a");
    jobs.put(&leader, &b.id, &b).await.expect("put b");
    assert_eq!(jobs.get::<TestJob>("job-a").await.expect("get a"), Some(a.clone()));
    assert_eq!(jobs.get::<TestJob>("missing").await.expect("get missing"), None);
    // Read through the other client: the records are in the shared store.
    let other_jobs = JobStore::new(other.clone());
    assert_eq!(other_jobs.list::<TestJob>().await.expect("list"), vec![a.clone(), b.clone()]);

    // `list` with a prefix: only keys under it, sorted, with their values.
    ha.put(&leader, "jobsx/not-a-job", b"x".to_vec()).await.expect("put jobsx");
    ha.put(&leader, "deep/a/b", b"d".to_vec()).await.expect("put nested key");
    let listed = ha.list("jobs/").await.expect("list jobs/");
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.starts_with(&["jobs/job-a", "jobs/job-b"]), "{keys:?}");
    assert!(!keys.contains(&"jobsx/not-a-job"), "{keys:?}");
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(keys, sorted);
    let everything = ha.list("").await.expect("list all");
    assert!(everything.iter().any(|(k, v)| k == "jobsx/not-a-job" && v == b"x"));
    assert!(everything.iter().any(|(k, _)| k == "counters/checkpoint-id"));
    assert_eq!(ha.list("deep/").await.expect("list deep/"), vec![("deep/a/b".to_string(), b"d".to_vec())]);
    let by_partial = ha.list("jobs").await.expect("list jobs");
    assert!(by_partial.iter().any(|(k, _)| k == "jobsx/not-a-job"), "plain string prefix");

    // Delete is fenced too and takes effect.
    jobs.delete(&leader, "job-b").await.expect("delete b");
    assert_eq!(jobs.get::<TestJob>("job-b").await.expect("get b"), None);

    // Bad keys are refused with a typed error.
    for bad in ["", "/abs", "a//b", "../escape", "a/../b"] {
        let err = ha.get(bad).await.expect_err("bad key");
        assert!(matches!(err, KeelError::InvalidArgument { .. }), "{bad:?}: {err:?}");
    }

    // Fencing: once another leadership took over, the old one can neither count nor write.
    ha.resign(&leader).await.expect("resign");
    let next_leader = other.campaign(Role::JobManager, "jm-2:6123", &never).await.expect("take over");
    assert!(next_leader.epoch > leader.epoch);
    let err = counter.next(&leader).await.expect_err("deposed leader must not count");
    assert!(matches!(err, KeelError::LeadershipLost { .. }), "{err:?}");
    let err = jobs.put(&leader, "job-z", &a).await.expect_err("deposed leader must not write");
    assert!(matches!(err, KeelError::LeadershipLost { .. }), "{err:?}");
    let other_counter = Counter::new(other.clone(), "checkpoint-id");
    assert_eq!(other_counter.next(&next_leader).await.expect("new leader counts on"), 14);
    other.resign(&next_leader).await.expect("resign");
}
