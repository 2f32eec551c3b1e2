//! Apache Kafka for tests: real brokers (KRaft, combined broker + controller nodes) started as
//! JVM processes from the jars `scripts/install-kafka.sh` fetched from Maven Central.
//!
//! - [`KafkaLayout`]: the files of a cluster (one `server.properties` per node, a log4j2
//!   config of our own, data dirs formatted with Kafka's storage tool) and the command line of
//!   each node. The chaos suite uses it to run nodes in network namespaces of its own.
//! - [`Kafka`]: a running cluster this process controls: one node for ordinary tests, three
//!   (replication factor 3, `min.insync.replicas` 2) for fault tests; kill -9, SIGSTOP/SIGCONT,
//!   stop and start of any node; the leader of a partition. [`Kafka::shared`] is one node shared
//!   by every test of a test binary (JVM start-up takes seconds), or the external cluster
//!   `KEEL_TEST_KAFKA_BOOTSTRAP` names.
//!
//! Every broker started here dies with the process that started it, however that process ends:
//! beside each JVM runs a small watchdog (`sh`) reading a pipe whose other end only this
//! process holds; when the pipe closes it kills the JVM (and removes the data of a cluster that
//! nobody else would remove, the shared one).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use base64::Engine as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};

use crate::{client_config, free_port, tail, wait_until, ENV_BOOTSTRAP};

/// Environment variable naming the directory of Kafka's jars (else `scripts/install-kafka.sh`
/// is run, which prints it, fetching the jars first when they are not cached).
pub const ENV_KAFKA_LIBS: &str = "KEEL_KAFKA_LIBS";
/// Environment variable with the JVM options of every broker, replacing [`LIGHT_JVM_OPTS`]
/// (e.g. `-XX:+UseG1GC` for a benchmark that wants the optimizing compiler).
pub const ENV_KAFKA_JVM_OPTS: &str = "KEEL_TEST_KAFKA_JVM_OPTS";
/// The brokers' JVM options unless `KEEL_TEST_KAFKA_JVM_OPTS` says otherwise: the client
/// compiler only and the serial collector. On 2 shared cores the optimizing compiler's
/// threads and G1's workers cost a starting broker more CPU than its test load ever does.
pub const LIGHT_JVM_OPTS: &str = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC";
/// Environment variable giving each test broker's JVM heap (`-Xmx`), e.g. `768m`.
pub const ENV_KAFKA_HEAP: &str = "KEEL_TEST_KAFKA_HEAP";
/// Set (to anything) to keep the data and logs of test brokers after the test.
pub const ENV_KEEP: &str = "KEEL_TEST_KEEP";

const DEFAULT_HEAP: &str = "512m";
/// How long a started node may take to show up in the cluster's metadata (a JVM on a loaded
/// 2-core machine can take a minute).
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a node may take for a controlled shutdown after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long formatting a data dir with Kafka's storage tool may take.
const FORMAT_TIMEOUT: Duration = Duration::from_secs(120);

/// The directory holding Kafka's jars.
pub fn kafka_libs() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(ENV_KAFKA_LIBS) {
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            bail!("{ENV_KAFKA_LIBS}={} is not a directory", dir.display());
        }
        return Ok(dir);
    }
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-kafka.sh");
            let out = Command::new(&script)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("cannot run {} ({e}); set {ENV_KAFKA_LIBS}", script.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} failed ({}): Apache Kafka's jars could not be fetched from Maven Central; \
                     run scripts/install-deps.sh, or set {ENV_KAFKA_LIBS}, or point {ENV_BOOTSTRAP} \
                     at a running cluster",
                    script.display(),
                    out.status
                ));
            }
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join(".").is_dir() {
                Ok(dir)
            } else {
                Err(format!("{} printed {}, which is not a directory", script.display(), dir.display()))
            }
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The `java` to run: `$JAVA_HOME/bin/java`, else `java` on the `PATH`.
pub fn java_binary() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("java"))
}

/// A new KRaft cluster id: 16 random bytes, base64url without padding (what Kafka's
/// `Uuid.toString` gives). Like Kafka's own `Uuid.randomUuid`, never one that starts with `-`:
/// the storage tool would read `-t -abc...` as an option (one format in 64 failed so in CI).
pub fn new_cluster_id() -> String {
    loop {
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes());
        if !id.starts_with('-') {
            return id;
        }
    }
}

/// Where one node listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaNodeAddress {
    /// `node.id`, 1-based.
    pub id: i32,
    /// The address both listeners bind to and the broker advertises.
    pub host: String,
    /// The client (PLAINTEXT) listener.
    pub port: u16,
    /// The KRaft controller listener.
    pub controller_port: u16,
}

/// The files and command lines of a KRaft cluster whose every node is broker and controller.
#[derive(Debug, Clone)]
pub struct KafkaLayout {
    pub dir: PathBuf,
    pub cluster_id: String,
    pub nodes: Vec<KafkaNodeAddress>,
    /// Extra or overriding `server.properties` lines for every node.
    pub overrides: BTreeMap<String, String>,
    /// JVM heap (`-Xms` = `-Xmx`).
    pub heap: String,
    /// Further JVM options of the brokers (`KEEL_TEST_KAFKA_JVM_OPTS`, else [`LIGHT_JVM_OPTS`]).
    pub jvm_opts: Vec<String>,
}

impl KafkaLayout {
    /// `count` nodes on 127.0.0.1 with free ports, their files under `dir`.
    pub fn loopback(dir: &Path, count: usize) -> KafkaLayout {
        let nodes = (1..=count)
            .map(|i| KafkaNodeAddress {
                id: i32::try_from(i).unwrap_or(i32::MAX),
                host: "127.0.0.1".into(),
                port: free_port(),
                controller_port: free_port(),
            })
            .collect();
        KafkaLayout::new(dir, nodes)
    }

    /// A cluster of the given nodes, its files under `dir`.
    pub fn new(dir: &Path, nodes: Vec<KafkaNodeAddress>) -> KafkaLayout {
        KafkaLayout {
            dir: dir.to_path_buf(),
            cluster_id: new_cluster_id(),
            nodes,
            overrides: BTreeMap::new(),
            heap: std::env::var(ENV_KAFKA_HEAP).unwrap_or_else(|_| DEFAULT_HEAP.to_string()),
            jvm_opts: std::env::var(ENV_KAFKA_JVM_OPTS)
                .unwrap_or_else(|_| LIGHT_JVM_OPTS.to_string())
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        }
    }

    /// `bootstrap.servers` naming every node.
    pub fn bootstrap(&self) -> String {
        self.nodes.iter().map(|n| format!("{}:{}", n.host, n.port)).collect::<Vec<_>>().join(",")
    }

    fn node(&self, id: i32) -> anyhow::Result<&KafkaNodeAddress> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| anyhow!("no Kafka node {id} in this cluster"))
    }

    /// The node's own directory: `server.properties`, `data/`, `kafka.log`.
    pub fn node_dir(&self, id: i32) -> PathBuf {
        self.dir.join(format!("kafka-{id}"))
    }

    /// The node's log file (the JVM's stdout and stderr, over all its starts).
    pub fn log_path(&self, id: i32) -> PathBuf {
        self.node_dir(id).join("kafka.log")
    }

    /// The replication factor of topics (internal ones included): 3 with three or more nodes,
    /// else the node count; `min.insync.replicas` is one less (at least 1).
    pub fn replication(&self) -> (usize, usize) {
        let rf = self.nodes.len().clamp(1, 3);
        (rf, rf.saturating_sub(1).max(1))
    }

    /// The `server.properties` of node `id`.
    pub fn properties(&self, id: i32) -> anyhow::Result<String> {
        let node = self.node(id)?;
        let voters = self
            .nodes
            .iter()
            .map(|n| format!("{}@{}:{}", n.id, n.host, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let (rf, min_isr) = self.replication();
        let mut props: BTreeMap<String, String> = [
            ("process.roles", "broker,controller".to_string()),
            ("node.id", id.to_string()),
            ("controller.quorum.voters", voters),
            (
                "listeners",
                format!(
                    "PLAINTEXT://{h}:{},CONTROLLER://{h}:{}",
                    node.port,
                    node.controller_port,
                    h = node.host
                ),
            ),
            ("advertised.listeners", format!("PLAINTEXT://{}:{}", node.host, node.port)),
            ("controller.listener.names", "CONTROLLER".into()),
            ("listener.security.protocol.map", "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT".into()),
            ("inter.broker.listener.name", "PLAINTEXT".into()),
            ("log.dirs", self.node_dir(id).join("data").display().to_string()),
            ("num.partitions", "1".into()),
            ("default.replication.factor", rf.to_string()),
            ("min.insync.replicas", min_isr.to_string()),
            ("offsets.topic.replication.factor", rf.to_string()),
            // Fewer internal partitions than the default 50: faster to create on 2 cores.
            ("offsets.topic.num.partitions", "10".into()),
            ("transaction.state.log.replication.factor", rf.to_string()),
            ("transaction.state.log.min.isr", min_isr.to_string()),
            ("transaction.state.log.num.partitions", "10".into()),
            ("share.coordinator.state.topic.replication.factor", rf.to_string()),
            ("share.coordinator.state.topic.min.isr", min_isr.to_string()),
            ("group.initial.rebalance.delay.ms", "0".into()),
            // A dead node is fenced (and its partitions' leadership moved) within about 3 s
            // instead of the default 9 s.
            ("broker.heartbeat.interval.ms", "500".into()),
            ("broker.session.timeout.ms", "3000".into()),
            // 2-core machines: fewer threads than the defaults.
            ("num.network.threads", "2".into()),
            ("num.io.threads", "4".into()),
            ("num.recovery.threads.per.data.dir", "2".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in &self.overrides {
            props.insert(k.clone(), v.clone());
        }
        Ok(props.into_iter().map(|(k, v)| format!("{k}={v}\n")).collect())
    }

    fn log4j_path(&self) -> PathBuf {
        self.dir.join("log4j2.yaml")
    }

    /// Writes every node's files and formats every data dir that is not formatted yet (the
    /// storage tools of all nodes run at once).
    pub fn write_and_format(&self) -> anyhow::Result<()> {
        let libs = kafka_libs()?;
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        std::fs::write(self.log4j_path(), LOG4J2_YAML).context("writing log4j2.yaml")?;
        let mut formats = Vec::new();
        for node in &self.nodes {
            let dir = self.node_dir(node.id);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let props = dir.join("server.properties");
            std::fs::write(&props, self.properties(node.id)?)
                .with_context(|| format!("writing {}", props.display()))?;
            if dir.join("data/meta.properties").is_file() {
                continue;
            }
            let out = dir.join("format.log");
            let file = std::fs::File::create(&out)?;
            let child = self
                .java(&libs, "128m")
                // A short-lived tool: the client compiler alone starts it faster.
                .arg("-XX:TieredStopAtLevel=1")
                .args([
                    "kafka.tools.StorageTool",
                    "format",
                    "--ignore-formatted",
                    "-t",
                    &self.cluster_id,
                    "-c",
                ])
                .arg(&props)
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file)
                .spawn()
                .with_context(|| format!("starting Kafka's storage tool ({})", java_binary().display()))?;
            formats.push((node.id, child, out));
        }
        for (id, mut child, out) in formats {
            let status = wait_child(&mut child, FORMAT_TIMEOUT)?;
            if status.is_none_or(|s| !s.success()) {
                let _ = child.kill();
                bail!(
                    "formatting node {id}'s data dir with kafka.tools.StorageTool failed ({status:?}); output:\n{}",
                    tail(&std::fs::read_to_string(&out).unwrap_or_default(), 20)
                );
            }
        }
        Ok(())
    }

    fn java(&self, libs: &Path, heap: &str) -> Command {
        let mut c = Command::new(java_binary());
        c.arg(format!("-Xms{heap}"))
            .arg(format!("-Xmx{heap}"))
            .arg("-XX:+ExitOnOutOfMemoryError")
            .arg("-Djava.awt.headless=true")
            .arg(format!("-Dlog4j2.configurationFile={}", self.log4j_path().display()))
            .arg("-cp")
            .arg(format!("{}/*", libs.display()));
        c
    }

    /// The command that runs node `id` (`java ... kafka.Kafka server.properties`), without its
    /// standard streams set. [`KafkaLayout::write_and_format`] must have run.
    pub fn command(&self, id: i32) -> anyhow::Result<Command> {
        self.node(id)?;
        let libs = kafka_libs()?;
        let mut c = self.java(&libs, &self.heap);
        c.args(&self.jvm_opts);
        c.arg("kafka.Kafka").arg(self.node_dir(id).join("server.properties"));
        Ok(c)
    }
}

/// Kafka 4 logs through log4j2: warnings and errors, plus the lines that say a node started
/// or stopped.
const LOG4J2_YAML: &str = "\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: \"[%d] %p %m (%c)%n\"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
      - name: kafka.Kafka
        level: INFO
";

/// Waits up to `timeout` for `child` to exit; `None` when it did not.
fn wait_child(child: &mut Child, timeout: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running node: the JVM and its watchdog.
struct Running {
    java: Child,
    /// `sh` that kills the JVM when its stdin (a pipe only this process writes) closes.
    watchdog: Child,
}

impl Running {
    /// Kills the watchdog first (so that it neither kills nor removes anything), then the JVM
    /// with `signal` (`KILL` or `TERM`), waiting up to `timeout` before a SIGKILL.
    fn end(mut self, signal: &str, timeout: Duration) -> anyhow::Result<()> {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        if signal == "KILL" {
            let _ = self.java.kill();
        } else {
            signal_pid(self.java.id(), signal)?;
        }
        if wait_child(&mut self.java, timeout)?.is_none() {
            let _ = self.java.kill();
            self.java.wait().context("waiting for the killed broker")?;
        }
        Ok(())
    }
}

fn signal_pid(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed: {status}");
    }
    Ok(())
}

/// A Kafka cluster for tests: nodes this process started (see the module doc), or an external
/// cluster named by `KEEL_TEST_KAFKA_BOOTSTRAP` (only through [`Kafka::shared`]).
pub struct Kafka {
    bootstrap: String,
    /// `None`: external.
    layout: Option<KafkaLayout>,
    running: Mutex<BTreeMap<i32, Running>>,
    /// Removed when this is dropped (or, for the shared cluster, by the watchdogs).
    _dir: Option<tempfile::TempDir>,
    /// The watchdogs remove `layout.dir` when this process is gone (the shared cluster, which
    /// is never dropped).
    watchdog_removes_dir: bool,
    /// How long the last start of all nodes took (JVM start to every broker registered).
    pub startup: Duration,
}

impl Kafka {
    /// One node shared by every test of this test binary, started by the first that asks; or,
    /// with `KEEL_TEST_KAFKA_BOOTSTRAP` set, that external cluster. For tests that do not stop,
    /// pause or kill the broker; those start a cluster of their own.
    pub fn shared() -> anyhow::Result<&'static Kafka> {
        static SHARED: OnceLock<Result<Kafka, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let bootstrap = std::env::var(ENV_BOOTSTRAP).unwrap_or_default();
                if !bootstrap.trim().is_empty() {
                    return Kafka::external(bootstrap.trim()).map_err(|e| format!("{e:#}"));
                }
                Kafka::start_nodes(1, true).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// A single node (broker and controller) of this test's own.
    pub fn single() -> anyhow::Result<Kafka> {
        Kafka::start_nodes(1, false)
    }

    /// Three nodes (each broker and controller): topics replicated 3 times by default,
    /// `min.insync.replicas` 2, internal topics likewise.
    pub fn three() -> anyhow::Result<Kafka> {
        Kafka::start_nodes(3, false)
    }

    /// `count` nodes on loopback, with `overrides` in every `server.properties`.
    pub fn start_with(count: usize, overrides: &[(&str, &str)]) -> anyhow::Result<Kafka> {
        Kafka::start_layout(count, false, overrides)
    }

    fn start_nodes(count: usize, shared: bool) -> anyhow::Result<Kafka> {
        Kafka::start_layout(count, shared, &[])
    }

    fn start_layout(count: usize, shared: bool, overrides: &[(&str, &str)]) -> anyhow::Result<Kafka> {
        // One cluster starts at a time in this process: JVM start-up is CPU-bound, and two
        // three-node clusters starting at once on 2 cores take longer than one after another.
        static STARTING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = STARTING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let keep = std::env::var_os(ENV_KEEP).is_some();
        let tmp = tempfile::Builder::new().prefix("keel-kafka-").tempdir().context("temp dir for Kafka")?;
        let mut layout = KafkaLayout::loopback(tmp.path(), count);
        for (k, v) in overrides {
            layout.overrides.insert((*k).to_string(), (*v).to_string());
        }
        let (dir, watchdog_removes_dir) = if keep || shared {
            // A shared cluster is never dropped: its watchdogs remove its files.
            let _ = tmp.keep();
            (None, shared && !keep)
        } else {
            (Some(tmp), false)
        };
        let mut kafka = Kafka {
            bootstrap: layout.bootstrap(),
            layout: Some(layout),
            running: Mutex::new(BTreeMap::new()),
            _dir: dir,
            watchdog_removes_dir,
            startup: Duration::ZERO,
        };
        let started = Instant::now();
        let layout = kafka.layout()?;
        layout.write_and_format()?;
        let ids: Vec<i32> = layout.nodes.iter().map(|n| n.id).collect();
        for &id in &ids {
            kafka.spawn(id)?;
        }
        kafka.wait_registered(&ids)?;
        kafka.startup = started.elapsed();
        tracing::info!(bootstrap = %kafka.bootstrap, nodes = count, startup_ms = kafka.startup.as_millis() as u64, "kafka started");
        if keep {
            eprintln!("Kafka test cluster files kept in {}", kafka.layout()?.dir.display());
        }
        Ok(kafka)
    }

    fn external(bootstrap: &str) -> anyhow::Result<Kafka> {
        let kafka = Kafka {
            bootstrap: bootstrap.to_string(),
            layout: None,
            running: Mutex::new(BTreeMap::new()),
            _dir: None,
            watchdog_removes_dir: false,
            startup: Duration::ZERO,
        };
        wait_until(&format!("the Kafka cluster at {bootstrap} to answer"), START_TIMEOUT, || {
            kafka.live_brokers().map(|b| (!b.is_empty()).then_some(()))
        })?;
        Ok(kafka)
    }

    /// The `bootstrap.servers` value (every node).
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// True for the cluster `KEEL_TEST_KAFKA_BOOTSTRAP` names (not ours to stop).
    pub fn is_external(&self) -> bool {
        self.layout.is_none()
    }

    fn layout(&self) -> anyhow::Result<&KafkaLayout> {
        self.layout.as_ref().ok_or_else(|| {
            anyhow!("the external Kafka cluster {} is not this test's to control", self.bootstrap)
        })
    }

    /// The node ids, 1-based.
    pub fn node_ids(&self) -> Vec<i32> {
        self.layout.as_ref().map(|l| l.nodes.iter().map(|n| n.id).collect()).unwrap_or_default()
    }

    /// `host:port` of node `id`'s client listener.
    pub fn address(&self, id: i32) -> anyhow::Result<String> {
        let node = self.layout()?.node(id)?;
        Ok(format!("{}:{}", node.host, node.port))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<i32, Running>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The JVM's pid of node `id`, while it runs.
    pub fn pid(&self, id: i32) -> Option<u32> {
        self.lock().get(&id).map(|r| r.java.id())
    }

    fn spawn(&self, id: i32) -> anyhow::Result<()> {
        let layout = self.layout()?;
        let mut running = self.lock();
        if running.contains_key(&id) {
            bail!("Kafka node {id} runs already");
        }
        let log_path = layout.log_path(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let java = layout
            .command(id)?
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting Kafka node {id} ({})", java_binary().display()))?;
        let remove = if self.watchdog_removes_dir { layout.dir.display().to_string() } else { String::new() };
        let watchdog = Command::new("sh")
            .args([
                "-c",
                "read _ignored; kill -9 \"$1\" 2>/dev/null; sleep 1; [ -z \"$2\" ] || rm -rf \"$2\"",
            ])
            .arg("keel-kafka-watchdog")
            .arg(java.id().to_string())
            .arg(remove)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let watchdog = match watchdog {
            Ok(w) => w,
            Err(e) => {
                let mut java = java;
                let _ = java.kill();
                let _ = java.wait();
                return Err(anyhow!(e).context("starting the watchdog of a Kafka node (sh)"));
            }
        };
        tracing::debug!(node = id, pid = java.id(), "kafka node started");
        running.insert(id, Running { java, watchdog });
        Ok(())
    }

    /// Broker ids the cluster's metadata lists (registered and not fenced).
    pub fn live_brokers(&self) -> anyhow::Result<Vec<i32>> {
        let consumer: BaseConsumer = client_config(&self.bootstrap).create().context("metadata client")?;
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(2))?;
        let mut ids: Vec<i32> = metadata.brokers().iter().map(|b| b.id()).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    fn wait_registered(&self, ids: &[i32]) -> anyhow::Result<()> {
        let result = wait_until(
            &format!("Kafka nodes {ids:?} at {} to be registered", self.bootstrap),
            START_TIMEOUT,
            || {
                for &id in ids {
                    if let Some(running) = self.lock().get_mut(&id) {
                        if let Ok(Some(status)) = running.java.try_wait() {
                            bail!("Kafka node {id} exited with {status}");
                        }
                    }
                }
                let live = self.live_brokers()?;
                if ids.iter().all(|id| live.contains(id)) {
                    Ok(Some(()))
                } else {
                    Err(anyhow!("live brokers {live:?}"))
                }
            },
        );
        result.with_context(|| {
            ids.iter()
                .map(|&id| format!("\nnode {id}'s log tail:\n{}", tail(&self.log(id), 15)))
                .collect::<String>()
        })
    }

    /// kill -9 of node `id`; returns when the process is gone.
    pub fn kill(&self, id: i32) -> anyhow::Result<()> {
        self.end(id, "KILL", Duration::from_secs(30))
    }

    /// SIGTERM (a controlled shutdown: leadership moves away first); killed after 60 s.
    pub fn stop(&self, id: i32) -> anyhow::Result<()> {
        self.end(id, "TERM", STOP_TIMEOUT)
    }

    fn end(&self, id: i32, signal: &str, timeout: Duration) -> anyhow::Result<()> {
        self.layout()?;
        let running = self.lock().remove(&id).ok_or_else(|| anyhow!("Kafka node {id} is not running"))?;
        running.end(signal, timeout)?;
        tracing::debug!(node = id, signal, "kafka node ended");
        Ok(())
    }

    /// Starts node `id` again (after [`Kafka::kill`] or [`Kafka::stop`]) on the same ports
    /// and data, and waits until it is registered again.
    pub fn start(&self, id: i32) -> anyhow::Result<()> {
        self.spawn(id)?;
        self.wait_registered(&[id])
    }

    /// Starts the given nodes at once and waits until all are registered (after all were
    /// down, none can register before a quorum of controllers is back).
    pub fn start_all(&self, ids: &[i32]) -> anyhow::Result<()> {
        for &id in ids {
            self.spawn(id)?;
        }
        self.wait_registered(ids)
    }

    /// [`Kafka::kill`], then [`Kafka::start`].
    pub fn restart(&self, id: i32) -> anyhow::Result<()> {
        self.kill(id)?;
        self.start(id)
    }

    /// SIGSTOP: connections stay open, nothing is answered (a hung broker).
    pub fn pause(&self, id: i32) -> anyhow::Result<()> {
        self.signal(id, "STOP")
    }

    /// SIGCONT after [`Kafka::pause`].
    pub fn resume(&self, id: i32) -> anyhow::Result<()> {
        self.signal(id, "CONT")
    }

    fn signal(&self, id: i32, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid(id).ok_or_else(|| anyhow!("Kafka node {id} is not running"))?;
        signal_pid(pid, signal)
    }

    /// The broker id leading `topic`'s `partition`, as the metadata says now.
    pub fn leader_of(&self, topic: &str, partition: i32) -> anyhow::Result<i32> {
        let consumer: BaseConsumer = client_config(&self.bootstrap).create().context("metadata client")?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| anyhow!("no topic {topic} in the metadata"))?;
        let p = t
            .partitions()
            .iter()
            .find(|p| p.id() == partition)
            .ok_or_else(|| anyhow!("no partition {topic}/{partition} in the metadata"))?;
        if p.leader() < 0 {
            bail!("{topic}/{partition} has no leader");
        }
        Ok(p.leader())
    }

    /// Waits until every partition of `topic` has a leader and all its replicas in sync.
    pub fn wait_in_sync(&self, topic: &str, timeout: Duration) -> anyhow::Result<()> {
        let consumer: BaseConsumer = client_config(&self.bootstrap).create().context("metadata client")?;
        wait_until(&format!("every partition of {topic} to be fully in sync"), timeout, || {
            let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(2))?;
            let t =
                metadata.topics().iter().find(|t| t.name() == topic).ok_or_else(|| anyhow!("no topic"))?;
            let lagging: Vec<String> = t
                .partitions()
                .iter()
                .filter(|p| p.leader() < 0 || p.isr().len() < p.replicas().len())
                .map(|p| {
                    format!("{}: leader {} isr {:?} replicas {:?}", p.id(), p.leader(), p.isr(), p.replicas())
                })
                .collect();
            if t.partitions().is_empty() || !lagging.is_empty() {
                Err(anyhow!("{lagging:?}"))
            } else {
                Ok(Some(()))
            }
        })
    }

    /// Node `id`'s log over all its starts (empty for an external cluster).
    pub fn log(&self, id: i32) -> String {
        self.layout.as_ref().and_then(|l| std::fs::read_to_string(l.log_path(id)).ok()).unwrap_or_default()
    }

    /// Every node's log, each under a header line.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for id in self.node_ids() {
            let _ = writeln!(out, "==== kafka node {id}\n{}", self.log(id));
        }
        out
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let running = std::mem::take(&mut *self.lock());
        for (_, r) in running {
            let _ = r.end("KILL", Duration::from_secs(30));
        }
    }
}

/// The offsets `group` has committed, per `(topic, partition)`, as Kafka's own Admin client
/// reports them (`kafka-consumer-groups --describe`, run from the jars of
/// `scripts/install-kafka.sh`): an independent reading of what Keel committed. `None`: the
/// partition is known to the group without a committed offset.
pub fn group_offsets_by_kafka_admin(
    bootstrap: &str,
    group: &str,
) -> anyhow::Result<BTreeMap<(String, i32), Option<i64>>> {
    let libs = kafka_libs()?;
    let out = Command::new(java_binary())
        .args(["-Xmx128m", "-XX:TieredStopAtLevel=1", "-Dlog4j2.level=ERROR", "-cp"])
        .arg(format!("{}/*", libs.display()))
        .arg("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand")
        .args(["--bootstrap-server", bootstrap, "--describe", "--offsets", "--group", group])
        .stdin(Stdio::null())
        .output()
        .context("running kafka-consumer-groups (ConsumerGroupCommand)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "kafka-consumer-groups --describe --group {group} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
    let mut offsets = BTreeMap::new();
    for line in stdout.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 4 || cols[0] != group {
            continue;
        }
        let partition: i32 = cols[2].parse().with_context(|| format!("partition in {line:?}"))?;
        offsets.insert((cols[1].to_string(), partition), cols[3].parse::<i64>().ok());
    }
    Ok(offsets)
}
