//! Apache Flink, the peer of the side-by-side benchmark: a standalone session cluster of separate
//! OS processes (JobManagers, TaskManagers, a SQL gateway, and for ZooKeeper HA a ZooKeeper
//! server), started from the install of `scripts/install-flink.sh` with a configuration of our own
//! in the benchmark's directory, and driven through REST.
//!
//! - The configuration is the shipped `conf/config.yaml` (flattened: process sizes 1600m
//!   JobManager / 1728m TaskManager, the JVM options, region failover) plus what the benchmark
//!   sets: loopback ports, slots, checkpoint and savepoint directories, heartbeats, ZooKeeper HA
//!   and [`FlinkOptions::extra_config`]. It lands in `DIR/conf/config.yaml` (FLINK_CONF_DIR).
//! - Every process is a child of this one and is the JVM itself: `bin/jobmanager.sh
//!   start-foreground`, `bin/taskmanager.sh start-foreground` and `bin/sql-gateway.sh
//!   start-foreground` exec `java` (through `flink-console.sh`). Their logs go to
//!   `DIR/log/<name>/` (Flink's own log files, `.out` and `.err`).
//! - SQL goes through the SQL gateway's REST API, one statement at a time, verbatim: a warm
//!   gateway submits a job in about 1.5 s, where `bin/sql-client.sh -f` starts a JVM and a planner
//!   for every script (about 25 s on the 2-core machine).
//! - Everything else is Flink's REST API of the JobManager (`/overview`, `/taskmanagers`,
//!   `/jobs/...`).
//!
//! What a job's SQL needs on this setup (seen with Flink 2.2.1 and connector 5.0.0-2.2 on Kafka
//! 4.4.0):
//! - an exactly-once Kafka sink needs `'properties.transaction.timeout.ms' = '900000'` (or less):
//!   the connector's default of one hour exceeds the broker's `transaction.max.timeout.ms`
//!   (15 min) and the job restarts forever (`InitProducerIdResponse ... transaction timeout is
//!   larger than the maximum value allowed by the broker`);
//! - datagen emits 10,000 rows/s unless `'rows-per-second'` says otherwise, and a random STRING
//!   column is 100 characters long unless `'fields.NAME.length'` says otherwise.
//!
//! Settings of ours that change what Flink does: loopback ports, `io.tmp.dirs`, the checkpoint
//! and savepoint directories (file://), `web.refresh-interval` 100 ms (REST only), and with
//! HA ZooKeeper on loopback. A kill -9 of the leading JobManager is noticed when its ZooKeeper
//! session expires: Flink asks for 60 s, the ZooKeeper server grants at most 40 s (20 ticks);
//! `high-availability.zookeeper.client.session-timeout` in `extra_config` shortens it.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

/// How long a process may take to start (JVMs on a loaded 2-core machine are slow).
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one SQL statement may take in the gateway (an INSERT plans and submits a job).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a REST call may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a wait polls.
const POLL: Duration = Duration::from_millis(100);

/// An install of Flink made by `scripts/install-flink.sh`.
#[derive(Debug, Clone)]
pub struct FlinkHome {
    /// FLINK_HOME (`bin/`, `lib/`, `opt/`, `conf/`).
    pub home: PathBuf,
    /// The jars of the ZooKeeper server (for ZooKeeper HA).
    pub zookeeper_libs: PathBuf,
    pub flink_version: String,
    pub connector_version: String,
    pub zookeeper_version: String,
}

/// Runs `scripts/install-flink.sh` (idempotent: instant once installed; its progress goes to this
/// process's stderr) and returns what it installed.
pub fn install(repo_root: &Path) -> anyhow::Result<FlinkHome> {
    let script = repo_root.join("scripts/install-flink.sh");
    let pom = repo_root.join("scripts/flink/pom.xml");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let home = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let pom_text = std::fs::read_to_string(&pom).with_context(|| format!("reading {}", pom.display()))?;
    let prop = |name: &str| {
        pom_property(&pom_text, name).ok_or_else(|| anyhow!("{} has no <{name}>", pom.display()))
    };
    let flink_version = prop("flink.version")?;
    let connector_version = prop("flink.kafka.connector.version")?;
    let zookeeper_version = prop("zookeeper.version")?;
    // The script's layout: CACHE/dist/pyflink is FLINK_HOME, CACHE/zookeeper the ZooKeeper jars.
    let zookeeper_libs = home
        .parent()
        .and_then(Path::parent)
        .map(|cache| cache.join("zookeeper"))
        .ok_or_else(|| anyhow!("{}: FLINK_HOME has no cache directory above it", home.display()))?;
    for needed in [
        home.join("bin/jobmanager.sh"),
        home.join(format!("lib/flink-dist-{flink_version}.jar")),
        home.join(format!("lib/flink-sql-connector-kafka-{connector_version}.jar")),
        home.join(format!("opt/flink-sql-gateway-{flink_version}.jar")),
        zookeeper_libs.join(format!("zookeeper-{zookeeper_version}.jar")),
    ] {
        if !needed.exists() {
            bail!("{} is missing after {}", needed.display(), script.display());
        }
    }
    Ok(FlinkHome { home, zookeeper_libs, flink_version, connector_version, zookeeper_version })
}

/// The text of the first `<name>value</name>` element in a pom (a `<name>` mentioned in a
/// comment, not followed by its closing tag, does not count).
fn pom_property(pom: &str, name: &str) -> Option<String> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    pom.match_indices(&open).find_map(|(at, _)| {
        let rest = &pom[at + open.len()..];
        let end = rest.find('<')?;
        let value = rest[..end].trim();
        (rest[end..].starts_with(&close) && !value.is_empty()).then(|| value.to_string())
    })
}

/// The cluster to start.
#[derive(Debug, Clone)]
pub struct FlinkOptions {
    /// Everything of the cluster lives here: conf/, log/, tmp/, checkpoints/, savepoints/, ha/.
    pub dir: PathBuf,
    pub task_managers: u32,
    pub slots_per_tm: u32,
    /// ZooKeeper HA: a ZooKeeper server and two JobManagers (leader and standby).
    pub standby_jobmanager: bool,
    /// `heartbeat.interval` and `heartbeat.timeout`; `None` keeps Flink's defaults (10 s / 50 s).
    pub heartbeat: Option<(Duration, Duration)>,
    /// More `key: value` pairs for config.yaml, last (they win over everything above).
    pub extra_config: Vec<(String, String)>,
}

impl FlinkOptions {
    /// One TaskManager with one slot, no HA, Flink's heartbeats.
    pub fn new(dir: impl Into<PathBuf>) -> FlinkOptions {
        FlinkOptions {
            dir: dir.into(),
            task_managers: 1,
            slots_per_tm: 1,
            standby_jobmanager: false,
            heartbeat: None,
            extra_config: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    ZooKeeper,
    JobManager(u32),
    TaskManager(u32),
    Gateway,
}

impl Role {
    fn name(self) -> String {
        match self {
            Role::ZooKeeper => "zookeeper".into(),
            Role::JobManager(i) => format!("jm-{i}"),
            Role::TaskManager(i) => format!("tm-{i}"),
            Role::Gateway => "sql-gateway".into(),
        }
    }
}

/// One process of the cluster, a child of this one.
struct Proc {
    role: Role,
    /// How to start it (again).
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    pid: u32,
    /// Killed by [`FlinkCluster::kill`] and not started again yet.
    killed: bool,
}

/// A running Flink session cluster. Dropping it kills every process it started.
pub struct FlinkCluster {
    home: FlinkHome,
    opts: FlinkOptions,
    procs: Vec<Proc>,
    /// REST port of each JobManager, by index.
    rest_ports: Vec<u16>,
    gateway_port: u16,
    zookeeper_port: Option<u16>,
    agent: ureq::Agent,
    /// How long start-up took (processes spawned -> leader answers, every TaskManager registered).
    pub startup: Duration,
}

/// `$JAVA_HOME/bin/java` if JAVA_HOME is set, else `java` (as Flink's scripts pick it).
fn java_binary() -> PathBuf {
    match std::env::var_os("JAVA_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join("bin/java"),
        _ => PathBuf::from("java"),
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `file://` URI of a local path.
fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// Flattens a YAML document (Flink's config.yaml, nested or flat keys) into `a.b.c -> value`
/// pairs in document order. Lists become Flink's `a;b;c`.
pub fn flatten_config(yaml: &str) -> anyhow::Result<Vec<(String, String)>> {
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).context("config.yaml is not YAML")?;
    let mut out = Vec::new();
    match doc {
        serde_yaml::Value::Null => {}
        serde_yaml::Value::Mapping(m) => flatten_into("", &m, &mut out)?,
        _ => bail!("config.yaml is not a mapping of keys"),
    }
    Ok(out)
}

fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn flatten_into(
    prefix: &str,
    map: &serde_yaml::Mapping,
    out: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    for (k, v) in map {
        let k = scalar(k).ok_or_else(|| anyhow!("config.yaml: a key under '{prefix}' is not a scalar"))?;
        let key = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
        match v {
            serde_yaml::Value::Mapping(m) => flatten_into(&key, m, out)?,
            serde_yaml::Value::Sequence(items) => {
                let parts = items
                    .iter()
                    .map(|i| scalar(i).ok_or_else(|| anyhow!("config.yaml: {key} holds a non-scalar item")))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                out.push((key, parts.join(";")));
            }
            serde_yaml::Value::Null => {}
            other => {
                let value =
                    scalar(other).ok_or_else(|| anyhow!("config.yaml: {key} has an unsupported value"))?;
                out.push((key, value));
            }
        }
    }
    Ok(())
}

/// Sets `key` to `value`: in place where the key is already there, else at the end.
fn set_config(config: &mut Vec<(String, String)>, key: &str, value: impl Into<String>) {
    let value = value.into();
    match config.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => config.push((key.to_string(), value)),
    }
}

/// config.yaml text with one flat key per line.
pub fn render_config(config: &[(String, String)]) -> anyhow::Result<String> {
    let mut map = serde_yaml::Mapping::new();
    for (k, v) in config {
        map.insert(serde_yaml::Value::String(k.clone()), serde_yaml::Value::String(v.clone()));
    }
    serde_yaml::to_string(&map).context("rendering config.yaml")
}

/// The shipped configuration with the benchmark's settings on top.
fn cluster_config(
    shipped: &str,
    opts: &FlinkOptions,
    rest_port: u16,
    rpc_port: u16,
    zookeeper_port: Option<u16>,
) -> anyhow::Result<Vec<(String, String)>> {
    let dir = &opts.dir;
    let mut c = flatten_config(shipped)?;
    set_config(&mut c, "jobmanager.rpc.address", "localhost");
    set_config(&mut c, "jobmanager.rpc.port", rpc_port.to_string());
    set_config(&mut c, "rest.address", "localhost");
    set_config(&mut c, "rest.bind-address", "localhost");
    set_config(&mut c, "rest.port", rest_port.to_string());
    set_config(&mut c, "taskmanager.numberOfTaskSlots", opts.slots_per_tm.to_string());
    set_config(&mut c, "io.tmp.dirs", dir.join("tmp").display().to_string());
    set_config(&mut c, "execution.checkpointing.dir", file_uri(&dir.join("checkpoints")));
    set_config(&mut c, "execution.checkpointing.savepoint-dir", file_uri(&dir.join("savepoints")));
    // How long REST may serve a job's details (state, subtasks, exceptions) from its cache:
    // 100 ms instead of 3 s, so that waits on a job's state see changes when they happen. Only
    // the REST handlers read it; the job does not.
    set_config(&mut c, "web.refresh-interval", "100");
    if let Some((interval, timeout)) = opts.heartbeat {
        set_config(&mut c, "heartbeat.interval", interval.as_millis().to_string());
        set_config(&mut c, "heartbeat.timeout", timeout.as_millis().to_string());
    }
    if let Some(port) = zookeeper_port {
        set_config(&mut c, "high-availability.type", "zookeeper");
        set_config(&mut c, "high-availability.zookeeper.quorum", format!("127.0.0.1:{port}"));
        set_config(&mut c, "high-availability.storageDir", file_uri(&dir.join("ha")));
        set_config(&mut c, "high-availability.cluster-id", "/keel-bench");
    }
    for (k, v) in &opts.extra_config {
        set_config(&mut c, k, v.clone());
    }
    Ok(c)
}

/// The state a JobManager's log shows of its leadership: `Some(true)` if its last word was that
/// its Dispatcher was granted leadership, `Some(false)` if revoked, `None` if neither.
pub fn leadership_in_log(log: &str) -> Option<bool> {
    log.lines().rev().find_map(|l| {
        if !l.contains("DefaultDispatcherRunner was") {
            None
        } else if l.contains("was granted leadership") {
            Some(true)
        } else if l.contains("revoked") {
            Some(false)
        } else {
            None
        }
    })
}

/// Splits a SQL script into statements at `;` outside quotes (`'...'`, `"..."`, `` `...` ``) and
/// comments (`-- ...`, `/* ... */`); each statement keeps its text verbatim, trimmed. Pieces that
/// hold only comments and blanks are dropped.
pub fn split_sql(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = script.as_bytes();
    let (mut start, mut i) = (0, 0);
    // Whether the current piece has something besides comments and blanks.
    let mut has_code = false;
    let mut push = |piece: &str, has_code: bool| {
        let piece = piece.trim();
        if has_code && !piece.is_empty() {
            out.push(piece.to_string());
        }
    };
    while i < bytes.len() {
        match bytes[i] {
            q @ (b'\'' | b'"' | b'`') => {
                has_code = true;
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == q {
                        // A doubled quote is an escaped quote inside the literal.
                        if bytes.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
            }
            b';' => {
                push(&script[start..i], has_code);
                has_code = false;
                i += 1;
                start = i;
            }
            c => {
                if !c.is_ascii_whitespace() {
                    has_code = true;
                }
                i += 1;
            }
        }
    }
    push(&script[start.min(script.len())..], has_code);
    out
}

/// The first line of each cause in a Flink error text (the gateway's `errors`, a job's root
/// exception): what went wrong without the stack frames.
pub fn error_summary(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("at ") && !l.starts_with("..."))
        .collect();
    let mut summary = lines.iter().take(3).copied().collect::<Vec<_>>();
    for l in lines.iter().skip(3).filter(|l| l.starts_with("Caused by:")) {
        summary.push(l);
    }
    // The deepest causes say the most; keep the message bounded.
    if summary.len() > 8 {
        let tail = summary.split_off(summary.len() - 5);
        summary.truncate(3);
        summary.push("...");
        summary.extend(tail);
    }
    summary.join("\n  ")
}

/// A job's vertices from `GET /jobs/:id`: (vertex id, parallelism, subtasks RUNNING, subtasks
/// FINISHED).
pub fn job_vertices(job: &Value) -> anyhow::Result<Vec<(String, u64, u64, u64)>> {
    let vertices =
        job["vertices"].as_array().ok_or_else(|| anyhow!("job details without vertices: {job}"))?;
    vertices
        .iter()
        .map(|v| {
            let id = v["id"].as_str().ok_or_else(|| anyhow!("vertex without id: {v}"))?;
            let parallelism =
                v["parallelism"].as_u64().ok_or_else(|| anyhow!("vertex without parallelism: {v}"))?;
            let count = |s: &str| v["tasks"][s].as_u64().unwrap_or(0);
            Ok((id.to_string(), parallelism, count("RUNNING"), count("FINISHED")))
        })
        .collect()
}

/// The TaskManager ids (`taskmanager-id`) of the subtasks of a vertex (`GET
/// /jobs/:id/vertices/:vid`) that are in one of `states`.
pub fn vertex_taskmanagers(vertex: &Value, states: &[&str]) -> anyhow::Result<Vec<String>> {
    let subtasks =
        vertex["subtasks"].as_array().ok_or_else(|| anyhow!("vertex details without subtasks: {vertex}"))?;
    Ok(subtasks
        .iter()
        .filter(|s| s["status"].as_str().is_some_and(|st| states.contains(&st)))
        .filter_map(|s| s["taskmanager-id"].as_str().map(str::to_string))
        .collect())
}

/// Registered TaskManagers from `GET /taskmanagers`: id -> slots.
pub fn registered_taskmanagers(answer: &Value) -> anyhow::Result<BTreeMap<String, u64>> {
    let tms = answer["taskmanagers"].as_array().ok_or_else(|| anyhow!("no taskmanagers list in {answer}"))?;
    Ok(tms.iter().filter_map(|t| Some((t["id"].as_str()?.to_string(), t["slotsNumber"].as_u64()?))).collect())
}

/// The value of one metric in a `GET .../metrics?get=NAME` answer.
pub fn metric_value(answer: &Value, name: &str) -> Option<String> {
    answer.as_array()?.iter().find(|m| m["id"] == name).and_then(|m| match &m["value"] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// The number of failures in a job's exception history (`GET /jobs/:id/exceptions`).
pub fn failures_in_history(answer: &Value) -> anyhow::Result<u64> {
    let entries = answer["exceptionHistory"]["entries"]
        .as_array()
        .ok_or_else(|| anyhow!("no exception history in {answer}"))?;
    if answer["exceptionHistory"]["truncated"].as_bool() == Some(true) {
        bail!("the exception history is truncated at {} entries", entries.len());
    }
    Ok(entries.len() as u64)
}

/// A savepoint operation (`GET /jobs/:id/savepoints/:trigger`): `Ok(None)` while in progress,
/// `Ok(Some(location))` once completed, an error if it failed.
pub fn savepoint_outcome(answer: &Value) -> anyhow::Result<Option<String>> {
    match answer["status"]["id"].as_str() {
        Some("IN_PROGRESS") => Ok(None),
        Some("COMPLETED") => {
            if let Some(location) = answer["operation"]["location"].as_str() {
                return Ok(Some(location.to_string()));
            }
            let cause = &answer["operation"]["failure-cause"];
            let text = cause["stack-trace"]
                .as_str()
                .or(cause["serialized-throwable"].as_str())
                .map(error_summary)
                .unwrap_or_else(|| cause.to_string());
            bail!("the savepoint failed: {text}")
        }
        _ => bail!("unexpected savepoint status: {answer}"),
    }
}

impl FlinkCluster {
    /// Starts the cluster and returns once a leader JobManager answers REST, every TaskManager is
    /// registered with its slots and the SQL gateway answers.
    pub fn start(home: &FlinkHome, opts: FlinkOptions) -> anyhow::Result<FlinkCluster> {
        if opts.task_managers == 0 || opts.slots_per_tm == 0 {
            bail!("a Flink cluster needs at least one TaskManager with at least one slot");
        }
        let dir = opts.dir.clone();
        for sub in ["conf", "log", "tmp", "pid"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let shipped_conf = home.home.join("conf");
        let shipped_path = shipped_conf.join("config.yaml");
        let shipped = std::fs::read_to_string(&shipped_path)
            .with_context(|| format!("reading {}", shipped_path.display()))?;
        // The logging configurations the scripts point the JVMs at.
        for entry in
            std::fs::read_dir(&shipped_conf).with_context(|| format!("listing {}", shipped_conf.display()))?
        {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.starts_with("log4j") || name.starts_with("logback") {
                std::fs::copy(&path, dir.join("conf").join(&name))
                    .with_context(|| format!("copying {}", path.display()))?;
            }
        }

        let jobmanagers = if opts.standby_jobmanager { 2 } else { 1 };
        let rest_ports = (0..jobmanagers).map(|_| free_port()).collect::<anyhow::Result<Vec<_>>>()?;
        let rpc_port = free_port()?;
        let gateway_port = free_port()?;
        let zookeeper_port = if opts.standby_jobmanager { Some(free_port()?) } else { None };
        let config = cluster_config(&shipped, &opts, rest_ports[0], rpc_port, zookeeper_port)?;
        let conf_file = dir.join("conf/config.yaml");
        std::fs::write(&conf_file, render_config(&config)?)
            .with_context(|| format!("writing {}", conf_file.display()))?;

        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(HTTP_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        let mut cluster = FlinkCluster {
            home: home.clone(),
            opts,
            procs: Vec::new(),
            rest_ports,
            gateway_port,
            zookeeper_port,
            agent,
            startup: Duration::ZERO,
        };
        let began = Instant::now();
        if let Some(port) = zookeeper_port {
            cluster.add_zookeeper(port)?;
            cluster.wait_ready(Role::ZooKeeper, START_TIMEOUT)?;
        }
        for i in 0..jobmanagers {
            cluster.add(Role::JobManager(i))?;
        }
        for i in 0..cluster.opts.task_managers {
            cluster.add(Role::TaskManager(i))?;
        }
        cluster.add(Role::Gateway)?;
        let roles: Vec<Role> =
            cluster.procs.iter().map(|p| p.role).filter(|r| *r != Role::ZooKeeper).collect();
        for role in roles {
            cluster.wait_ready(role, START_TIMEOUT)?;
        }
        cluster.startup = began.elapsed();
        Ok(cluster)
    }

    /// The directory of a process's logs.
    pub fn log_dir(&self, name: &str) -> PathBuf {
        self.opts.dir.join("log").join(name)
    }

    /// The REST base URL of JobManager `i`.
    pub fn rest_url(&self, i: u32) -> String {
        format!("http://127.0.0.1:{}", self.rest_ports.get(i as usize).copied().unwrap_or_default())
    }

    /// The base URL of the SQL gateway's REST endpoint.
    pub fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }

    fn add_zookeeper(&mut self, port: u16) -> anyhow::Result<()> {
        let zk = self.opts.dir.join("zookeeper");
        std::fs::create_dir_all(zk.join("data"))?;
        let cfg = zk.join("zoo.cfg");
        std::fs::write(
            &cfg,
            format!(
                "tickTime=2000\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
                 4lw.commands.whitelist=srvr,ruok\n",
                zk.join("data").display()
            ),
        )?;
        let log_dir = self.log_dir("zookeeper");
        std::fs::create_dir_all(&log_dir)?;
        let logback = zk.join("logback.xml");
        std::fs::write(
            &logback,
            format!(
                "<configuration>\n  <appender name=\"FILE\" class=\"ch.qos.logback.core.FileAppender\">\n    \
                 <file>{}</file>\n    <encoder><pattern>%d{{ISO8601}} %-5level %logger{{36}} - %msg%n</pattern></encoder>\n  \
                 </appender>\n  <root level=\"INFO\"><appender-ref ref=\"FILE\"/></root>\n</configuration>\n",
                log_dir.join("zookeeper.log").display()
            ),
        )?;
        let args = vec![
            "-Xmx128m".to_string(),
            format!("-Dlogback.configurationFile={}", logback.display()),
            "-cp".to_string(),
            format!("{}/*", self.home.zookeeper_libs.display()),
            "org.apache.zookeeper.server.ZooKeeperServerMain".to_string(),
            cfg.display().to_string(),
        ];
        self.procs.push(Proc {
            role: Role::ZooKeeper,
            program: java_binary(),
            args,
            envs: Vec::new(),
            child: None,
            pid: 0,
            killed: false,
        });
        self.spawn(self.procs.len() - 1)
    }

    fn add(&mut self, role: Role) -> anyhow::Result<()> {
        let bin = self.home.home.join("bin");
        let name = role.name();
        let (script, mut args) = match role {
            Role::JobManager(i) => (
                "jobmanager.sh",
                vec!["-D".to_string(), format!("rest.port={}", self.rest_ports[i as usize])],
            ),
            Role::TaskManager(i) => {
                ("taskmanager.sh", vec!["-D".to_string(), format!("taskmanager.resource-id=tm-{i}")])
            }
            Role::Gateway => (
                "sql-gateway.sh",
                vec![
                    "-Dsql-gateway.endpoint.rest.address=127.0.0.1".to_string(),
                    "-Dsql-gateway.endpoint.rest.bind-address=127.0.0.1".to_string(),
                    format!("-Dsql-gateway.endpoint.rest.port={}", self.gateway_port),
                ],
            ),
            Role::ZooKeeper => bail!("ZooKeeper is not started by a Flink script"),
        };
        args.insert(0, "start-foreground".to_string());
        args.insert(0, bin.join(script).display().to_string());
        let log_dir = self.log_dir(&name);
        let pid_dir = self.opts.dir.join("pid").join(&name);
        std::fs::create_dir_all(&log_dir)?;
        let mut envs = vec![
            ("FLINK_CONF_DIR".to_string(), self.opts.dir.join("conf").display().to_string()),
            ("FLINK_LOG_DIR".to_string(), log_dir.display().to_string()),
            ("FLINK_PID_DIR".to_string(), pid_dir.display().to_string()),
            ("FLINK_IDENT_STRING".to_string(), name.clone()),
            // Log to the files only (not to the console as well); stdout and stderr to .out / .err.
            ("STD_REDIRECT_TO_FILE".to_string(), "true".to_string()),
        ];
        if role == Role::Gateway {
            // The gateway is the benchmark's client, not a measured process: a bounded heap.
            envs.push(("JVM_ARGS".to_string(), "-Xmx512m".to_string()));
        }
        self.procs.push(Proc {
            role,
            program: PathBuf::from("bash"),
            args,
            envs,
            child: None,
            pid: 0,
            killed: false,
        });
        self.spawn(self.procs.len() - 1)
    }

    /// Starts process `i` (again), its output appended to `console.txt` in its log directory.
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let name = self.procs[i].role.name();
        let log_dir = self.log_dir(&name);
        std::fs::create_dir_all(&log_dir)?;
        let console_path = log_dir.join("console.txt");
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_path)
            .with_context(|| format!("opening {}", console_path.display()))?;
        let p = &mut self.procs[i];
        let mut cmd = Command::new(&p.program);
        cmd.args(&p.args)
            .current_dir(&self.opts.dir)
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console);
        // Settings of ours or of the caller's environment that would change the JVMs.
        for var in ["FLINK_ENV_JAVA_OPTS", "FLINK_ENV_JAVA_OPTS_JM", "FLINK_ENV_JAVA_OPTS_TM", "JVM_ARGS"] {
            cmd.env_remove(var);
        }
        for (k, v) in &p.envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {name} ({})", p.program.display()))?;
        p.pid = child.id();
        p.child = Some(child);
        p.killed = false;
        Ok(())
    }

    fn proc_index(&self, role: Role) -> anyhow::Result<usize> {
        self.procs
            .iter()
            .position(|p| p.role == role)
            .ok_or_else(|| anyhow!("no {} in this cluster", role.name()))
    }

    /// Fails if the process of `role` has exited, naming its log.
    fn check_alive(&mut self, role: Role) -> anyhow::Result<()> {
        let i = self.proc_index(role)?;
        let log_dir = self.log_dir(&role.name());
        let p = &mut self.procs[i];
        if let Some(child) = p.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                p.child = None;
                bail!("{} exited during start-up ({status}); see {}", role.name(), log_dir.display());
            }
        }
        Ok(())
    }

    /// Waits until the process of `role` is ready: ZooKeeper serves, a JobManager answers REST, a
    /// TaskManager is registered with its slots, the gateway answers.
    fn wait_ready(&mut self, role: Role, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            self.check_alive(role)?;
            let ready = match role {
                Role::ZooKeeper => match self.zookeeper_serving() {
                    Ok(serving) => serving,
                    Err(e) => {
                        last = format!("{e:#}");
                        false
                    }
                },
                Role::JobManager(i) => match self.get(&self.rest_url(i), "/overview") {
                    Ok(_) => true,
                    Err(e) => {
                        last = format!("{e:#}");
                        false
                    }
                },
                Role::TaskManager(i) => {
                    match self.rest_get("/taskmanagers").and_then(|a| registered_taskmanagers(&a)) {
                        Ok(tms) => tms.get(&format!("tm-{i}")) == Some(&u64::from(self.opts.slots_per_tm)),
                        Err(e) => {
                            last = format!("{e:#}");
                            false
                        }
                    }
                }
                Role::Gateway => match self.get(&self.gateway_url(), "/v1/info") {
                    Ok(_) => true,
                    Err(e) => {
                        last = format!("{e:#}");
                        false
                    }
                },
            };
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready after {timeout:?} (last: {last}); see {}",
                    role.name(),
                    self.log_dir(&role.name()).display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether ZooKeeper answers `srvr` as a serving server.
    fn zookeeper_serving(&self) -> anyhow::Result<bool> {
        let port = self.zookeeper_port.ok_or_else(|| anyhow!("no ZooKeeper in this cluster"))?;
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"srvr")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer.contains("Zookeeper version") && answer.contains("Mode:"))
    }

    /// GET `base + path` as JSON; a non-2xx answer is an error carrying Flink's `errors`.
    fn get(&self, base: &str, path: &str) -> anyhow::Result<Value> {
        let url = format!("{base}{path}");
        let resp = self.agent.get(&url).call().with_context(|| format!("GET {url}"))?;
        answer_json("GET", &url, resp)
    }

    fn send(&self, method: &str, url: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let resp = match (method, body) {
            ("POST", Some(b)) => self.agent.post(url).content_type("application/json").send(b.to_string()),
            ("POST", None) => self.agent.post(url).content_type("application/json").send("{}"),
            ("PATCH", _) => self.agent.patch(url).send_empty(),
            ("DELETE", _) => self.agent.delete(url).call(),
            _ => bail!("unsupported request {method}"),
        }
        .with_context(|| format!("{method} {url}"))?;
        answer_json(method, url, resp)
    }

    /// GET from the JobManagers' REST API (`/jobs/ID`, `/overview`, ...): the first live
    /// JobManager whose endpoint answers (any of them serves the leader's view in ZooKeeper HA).
    pub fn rest_get(&self, path: &str) -> anyhow::Result<Value> {
        let mut last = None;
        for i in self.live_jobmanagers() {
            match self.get(&self.rest_url(i), path) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no JobManager is alive")))
    }

    fn rest_send(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let mut last = None;
        for i in self.live_jobmanagers() {
            match self.send(method, &format!("{}{path}", self.rest_url(i)), body) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no JobManager is alive")))
    }

    fn live_jobmanagers(&self) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|p| !p.killed && p.child.is_some())
            .filter_map(|p| match p.role {
                Role::JobManager(i) => Some(i),
                _ => None,
            })
            .collect()
    }

    /// Runs a SQL script (`SET ...; CREATE ...; INSERT ...;`) statement by statement, verbatim,
    /// in a fresh session of the SQL gateway, and returns the id of the job its one INSERT (or
    /// `EXECUTE STATEMENT SET`) submitted once every subtask is RUNNING (or the job finished).
    pub fn submit_sql(&self, sql: &str) -> anyhow::Result<String> {
        let statements = split_sql(sql);
        if statements.is_empty() {
            bail!("the SQL script holds no statement");
        }
        let gw = self.gateway_url();
        let session = self.send("POST", &format!("{gw}/v1/sessions"), Some(&serde_json::json!({})))?;
        let handle = session["sessionHandle"]
            .as_str()
            .ok_or_else(|| anyhow!("the gateway opened no session: {session}"))?
            .to_string();
        let result = self.run_statements(&handle, &statements);
        // The session only holds the script's tables and settings: close it either way.
        let _ = self.send("DELETE", &format!("{gw}/v1/sessions/{handle}"), None);
        let jobs = result?;
        let job = match jobs.as_slice() {
            [job] => job.clone(),
            [] => bail!("the SQL script submitted no job (no INSERT)"),
            _ => bail!("the SQL script submitted {} jobs ({jobs:?}): one INSERT per script", jobs.len()),
        };
        self.wait_running(&job, START_TIMEOUT)?;
        Ok(job)
    }

    fn run_statements(&self, session: &str, statements: &[String]) -> anyhow::Result<Vec<String>> {
        let base = format!("{}/v1/sessions/{session}", self.gateway_url());
        let mut jobs = Vec::new();
        for statement in statements {
            let op = self.send(
                "POST",
                &format!("{base}/statements"),
                Some(&serde_json::json!({ "statement": statement })),
            )?;
            let op = op["operationHandle"]
                .as_str()
                .ok_or_else(|| anyhow!("the gateway took no statement: {op}"))?
                .to_string();
            let deadline = Instant::now() + STATEMENT_TIMEOUT;
            loop {
                let status = self.get(&base, &format!("/operations/{op}/status"))?;
                match status["status"].as_str() {
                    Some("FINISHED") => break,
                    Some("ERROR") | Some("CANCELED") | Some("CLOSED") | Some("TIMEOUT") => {
                        // The operation's result carries the error.
                        let url = format!("{base}/operations/{op}/result/0");
                        let resp = self.agent.get(&url).call().with_context(|| format!("GET {url}"))?;
                        let text = resp.into_body().read_to_string().unwrap_or_default();
                        let errors = serde_json::from_str::<Value>(&text)
                            .ok()
                            .and_then(|v| v["errors"].as_array().cloned())
                            .map(|errs| errs.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n"))
                            .unwrap_or(text);
                        bail!("Flink refused the statement\n  {statement}\n: {}", error_summary(&errors));
                    }
                    _ => {}
                }
                if Instant::now() >= deadline {
                    bail!("the statement did not finish in {STATEMENT_TIMEOUT:?}: {statement}");
                }
                std::thread::sleep(POLL);
            }
            let result = self.get(&base, &format!("/operations/{op}/result/0"))?;
            if let Some(job) = result["jobID"].as_str() {
                jobs.push(job.to_string());
            }
        }
        Ok(jobs)
    }

    /// Waits until every subtask of `job` is RUNNING (or the job finished); fails if it failed.
    fn wait_running(&self, job: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.rest_get(&format!("/jobs/{job}")) {
                Ok(details) => {
                    let state = details["state"].as_str().unwrap_or_default().to_string();
                    match state.as_str() {
                        "FINISHED" => return Ok(()),
                        "FAILED" | "CANCELED" => bail!("job {job} is {state}: {}", self.root_exception(job)),
                        "RUNNING" => {
                            let vertices = job_vertices(&details)?;
                            if vertices.iter().all(|(_, p, running, finished)| running + finished == *p) {
                                return Ok(());
                            }
                        }
                        _ => {}
                    }
                    state
                }
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "job {job}: not every subtask RUNNING after {timeout:?} (last: {last}); last failure: {}",
                    self.root_exception(job)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The root exception of a job, summarized, or what was found instead.
    fn root_exception(&self, job: &str) -> String {
        match self.rest_get(&format!("/jobs/{job}/exceptions?maxExceptions=1")) {
            Ok(v) => v["exceptionHistory"]["entries"][0]["stacktrace"]
                .as_str()
                .or(v["root-exception"].as_str())
                .map(error_summary)
                .unwrap_or_else(|| "no exception recorded".into()),
            Err(e) => format!("(exceptions not readable: {e:#})"),
        }
    }

    /// The job's state (`RUNNING`, `RESTARTING`, `FINISHED`, ...).
    pub fn job_state(&self, job: &str) -> anyhow::Result<String> {
        let details = self.rest_get(&format!("/jobs/{job}"))?;
        details["state"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("job {job}: no state in {details}"))
    }

    /// Waits until the job is in `state`.
    pub fn wait_state(&self, job: &str, state: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.job_state(job) {
                Ok(s) if s == state => return Ok(()),
                Ok(s) => s,
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("job {job} not {state} after {timeout:?} (last: {last})");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether the job is RUNNING with every subtask RUNNING (a region failover, such as after a
    /// TaskManager loss, leaves the job RUNNING while some of its subtasks are not).
    pub fn all_running(&self, job: &str) -> anyhow::Result<bool> {
        let details = self.rest_get(&format!("/jobs/{job}"))?;
        if details["state"].as_str() != Some("RUNNING") {
            return Ok(false);
        }
        Ok(job_vertices(&details)?.iter().all(|(_, p, running, _)| running == p))
    }

    /// Waits until every subtask of the job is RUNNING again (after a restart or a failover).
    pub fn wait_all_running(&self, job: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_running(job, timeout)
    }

    /// Stop-with-savepoint (`POST /jobs/:id/stop`, no drain): waits for the savepoint and for the
    /// job to end, and returns the savepoint's path (for `SET 'execution.savepoint.path'`).
    pub fn stop_with_savepoint(&self, job: &str) -> anyhow::Result<String> {
        let trigger = self.rest_send(
            "POST",
            &format!("/jobs/{job}/stop"),
            Some(&serde_json::json!({ "drain": false })),
        )?;
        let id = trigger["request-id"]
            .as_str()
            .ok_or_else(|| anyhow!("stop-with-savepoint of {job} was not triggered: {trigger}"))?
            .to_string();
        let deadline = Instant::now() + START_TIMEOUT;
        let location = loop {
            let answer = self.rest_get(&format!("/jobs/{job}/savepoints/{id}"))?;
            if let Some(location) =
                savepoint_outcome(&answer).with_context(|| format!("stopping job {job}"))?
            {
                break location;
            }
            if Instant::now() >= deadline {
                bail!("stop-with-savepoint of {job} did not complete in {START_TIMEOUT:?}");
            }
            std::thread::sleep(POLL);
        };
        self.wait_state(job, "FINISHED", START_TIMEOUT)?;
        Ok(location)
    }

    /// Cancels the job and waits until it is CANCELED.
    pub fn cancel(&self, job: &str) -> anyhow::Result<()> {
        self.rest_send("PATCH", &format!("/jobs/{job}?mode=cancel"), None)?;
        self.wait_state(job, "CANCELED", START_TIMEOUT)
    }

    /// How often the job failed over (restarted whole or in part): the entries of its exception
    /// history (`GET /jobs/:id/exceptions`), which the scheduler keeps current. The
    /// `numRestarts` metric says the same but REST serves it from a cache refreshed after the
    /// request, so it lags.
    pub fn restarts(&self, job: &str) -> anyhow::Result<u64> {
        let answer = self.rest_get(&format!("/jobs/{job}/exceptions?maxExceptions=10000"))?;
        failures_in_history(&answer).with_context(|| format!("job {job}"))
    }

    fn pids_of(&self, want: impl Fn(Role) -> bool) -> Vec<u32> {
        self.procs.iter().filter(|p| !p.killed && p.child.is_some() && want(p.role)).map(|p| p.pid).collect()
    }

    /// Pids of the live JobManagers.
    pub fn jobmanager_pids(&self) -> Vec<u32> {
        self.pids_of(|r| matches!(r, Role::JobManager(_)))
    }

    /// Pids of the live TaskManagers (in the order tm-0, tm-1, ...).
    pub fn taskmanager_pids(&self) -> Vec<u32> {
        self.pids_of(|r| matches!(r, Role::TaskManager(_)))
    }

    /// Pid of the SQL gateway (the client, not a measured process).
    pub fn gateway_pid(&self) -> Option<u32> {
        self.pids_of(|r| r == Role::Gateway).first().copied()
    }

    /// Pid of the ZooKeeper server, with ZooKeeper HA.
    pub fn zookeeper_pid(&self) -> Option<u32> {
        self.pids_of(|r| r == Role::ZooKeeper).first().copied()
    }

    /// Pid of the leading JobManager: the only one without HA; with HA the live one whose log
    /// last says its Dispatcher was granted leadership.
    pub fn leader_jobmanager_pid(&self) -> anyhow::Result<u32> {
        if !self.opts.standby_jobmanager {
            return self
                .jobmanager_pids()
                .first()
                .copied()
                .ok_or_else(|| anyhow!("the JobManager is not running"));
        }
        let mut leaders = Vec::new();
        for p in self.procs.iter().filter(|p| !p.killed && p.child.is_some()) {
            if let Role::JobManager(_) = p.role {
                let log = self.current_log(&p.role.name())?;
                if leadership_in_log(&log) == Some(true) {
                    leaders.push(p.pid);
                }
            }
        }
        match leaders.as_slice() {
            [pid] => Ok(*pid),
            [] => bail!("no live JobManager leads (yet)"),
            _ => bail!("more than one JobManager says it leads: {leaders:?}"),
        }
    }

    /// The text of a Flink process's current log file (`*.log` in its log directory).
    fn current_log(&self, name: &str) -> anyhow::Result<String> {
        let dir = self.log_dir(name);
        let log = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "log"))
            .ok_or_else(|| anyhow!("no log file in {}", dir.display()))?;
        let bytes = std::fs::read(&log).with_context(|| format!("reading {}", log.display()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Pids of the TaskManagers running the job's subtasks (state RUNNING, DEPLOYING or
    /// INITIALIZING), without repeats.
    pub fn taskmanagers_of_job(&self, job: &str) -> anyhow::Result<Vec<u32>> {
        let details = self.rest_get(&format!("/jobs/{job}"))?;
        let mut ids = Vec::new();
        for (vertex, ..) in job_vertices(&details)? {
            let v = self.rest_get(&format!("/jobs/{job}/vertices/{vertex}"))?;
            for id in vertex_taskmanagers(&v, &["RUNNING", "DEPLOYING", "INITIALIZING"])? {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids.iter()
            .map(|id| {
                self.procs
                    .iter()
                    .find(|p| !p.killed && matches!(p.role, Role::TaskManager(_)) && p.role.name() == *id)
                    .map(|p| p.pid)
                    .ok_or_else(|| {
                        anyhow!("job {job} runs on TaskManager '{id}', which this cluster did not start")
                    })
            })
            .collect()
    }

    /// SIGKILL of one process of the cluster (ZooKeeper, a JobManager, a TaskManager or the
    /// gateway), reaped before this returns.
    pub fn kill(&mut self, pid: u32) -> anyhow::Result<()> {
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.pid == pid && !p.killed)
            .ok_or_else(|| anyhow!("pid {pid} is no live process of this Flink cluster"))?;
        let mut child = p.child.take().ok_or_else(|| anyhow!("pid {pid} has already exited"))?;
        child.kill().with_context(|| format!("killing {} ({pid})", p.role.name()))?;
        child.wait().with_context(|| format!("reaping {} ({pid})", p.role.name()))?;
        p.killed = true;
        Ok(())
    }

    /// Starts again every process [`kill`](Self::kill) killed, with the same role, ids and ports,
    /// and waits until each is back: ZooKeeper serving, a JobManager answering REST (as leader or
    /// standby), a TaskManager registered with its slots, the gateway answering.
    pub fn replace_killed(&mut self) -> anyhow::Result<()> {
        let killed: Vec<usize> = (0..self.procs.len()).filter(|&i| self.procs[i].killed).collect();
        // ZooKeeper first: the others need it.
        let (zk, rest): (Vec<usize>, Vec<usize>) =
            killed.into_iter().partition(|&i| self.procs[i].role == Role::ZooKeeper);
        for i in zk {
            self.spawn(i)?;
            self.wait_ready(Role::ZooKeeper, START_TIMEOUT)?;
        }
        for &i in &rest {
            self.spawn(i)?;
        }
        for i in rest {
            self.wait_ready(self.procs[i].role, START_TIMEOUT)?;
        }
        Ok(())
    }
}

/// The JSON of an answer; a non-2xx status is an error with Flink's `errors` (summarized).
fn answer_json(method: &str, url: &str, resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<Value> {
    let status = resp.status().as_u16();
    let text =
        resp.into_body().read_to_string().with_context(|| format!("{method} {url}: reading the answer"))?;
    if !(200..300).contains(&status) {
        let errors = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["errors"].as_array().cloned())
            .map(|errs| errs.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n"))
            .unwrap_or(text);
        bail!("{method} {url}: HTTP {status}: {}", error_summary(&errors));
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).with_context(|| format!("{method} {url}: the answer is not JSON: {text}"))
}

impl Drop for FlinkCluster {
    fn drop(&mut self) {
        // Workers and clients first, ZooKeeper last (the others would only log its absence).
        for p in self.procs.iter_mut().rev() {
            if let Some(mut child) = p.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_the_shipped_nested_config_and_overrides_in_place() {
        let shipped = "env:\n  java:\n    opts:\n      all: --add-opens=a --add-opens=b\njobmanager:\n  \
                       rpc:\n    address: localhost\n    port: 6123\n  memory:\n    process:\n      size: 1600m\n\
                       taskmanager:\n  numberOfTaskSlots: 1\n  memory:\n    process:\n      size: 1728m\n\
                       pipeline:\n  jars: [a.jar, b.jar]\nflat.key: true\n";
        let mut c = flatten_config(shipped).expect("flattens");
        assert_eq!(c[0], ("env.java.opts.all".to_string(), "--add-opens=a --add-opens=b".to_string()));
        let get =
            |c: &[(String, String)], k: &str| c.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get(&c, "jobmanager.rpc.port").as_deref(), Some("6123"));
        assert_eq!(get(&c, "jobmanager.memory.process.size").as_deref(), Some("1600m"));
        assert_eq!(get(&c, "taskmanager.memory.process.size").as_deref(), Some("1728m"));
        assert_eq!(get(&c, "pipeline.jars").as_deref(), Some("a.jar;b.jar"));
        assert_eq!(get(&c, "flat.key").as_deref(), Some("true"));
        let before = c.len();
        set_config(&mut c, "jobmanager.rpc.port", "40000");
        set_config(&mut c, "heartbeat.timeout", "5000");
        assert_eq!(c.len(), before + 1);
        assert_eq!(get(&c, "jobmanager.rpc.port").as_deref(), Some("40000"));
        // What we write reads back the same, strings that look like numbers included.
        let again = flatten_config(&render_config(&c).expect("renders")).expect("reads back");
        assert_eq!(again, c);
        assert!(flatten_config("- a\n- b\n").is_err());
        assert!(flatten_config("a: [").is_err());
    }

    #[test]
    fn the_cluster_config_keeps_the_shipped_memory_and_adds_ours() {
        let shipped = "jobmanager:\n  memory:\n    process:\n      size: 1600m\nrest:\n  port: 8081\n";
        let mut opts = FlinkOptions::new("/b");
        opts.standby_jobmanager = true;
        opts.heartbeat = Some((Duration::from_secs(1), Duration::from_secs(5)));
        opts.extra_config = vec![("rest.port".into(), "9999".into())];
        let c = cluster_config(shipped, &opts, 18081, 16123, Some(2181)).expect("config");
        let get = |k: &str| c.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("jobmanager.memory.process.size"), Some("1600m"));
        assert_eq!(get("heartbeat.interval"), Some("1000"));
        assert_eq!(get("heartbeat.timeout"), Some("5000"));
        assert_eq!(get("high-availability.type"), Some("zookeeper"));
        assert_eq!(get("high-availability.zookeeper.quorum"), Some("127.0.0.1:2181"));
        assert_eq!(get("execution.checkpointing.savepoint-dir"), Some("file:///b/savepoints"));
        // extra_config wins.
        assert_eq!(get("rest.port"), Some("9999"));
    }

    #[test]
    fn reads_pom_properties() {
        let pom =
            "<!-- the release of <flink.version> -->\n<properties>\n <flink.version>2.2.1</flink.version>\n \
                   <x></x></properties>";
        assert_eq!(pom_property(pom, "flink.version").as_deref(), Some("2.2.1"));
        assert_eq!(pom_property(pom, "x"), None);
        assert_eq!(pom_property(pom, "missing"), None);
    }

    #[test]
    fn splits_sql_at_top_level_semicolons_only() {
        let script = "-- header; not a statement\nSET 'parallelism.default' = '2';\n\
                      CREATE TABLE t (a STRING) WITH ('format' = 'csv', 'csv.field-delimiter' = ';');\n\
                      /* block ; comment */\nINSERT INTO s SELECT 'it''s; fine', `we;ird` FROM t\n;\n  -- trailing\n";
        let statements = split_sql(script);
        assert_eq!(
            statements,
            vec![
                "-- header; not a statement\nSET 'parallelism.default' = '2'".to_string(),
                "CREATE TABLE t (a STRING) WITH ('format' = 'csv', 'csv.field-delimiter' = ';')".to_string(),
                "/* block ; comment */\nINSERT INTO s SELECT 'it''s; fine', `we;ird` FROM t".to_string(),
            ]
        );
        assert_eq!(split_sql("INSERT INTO s SELECT 1"), vec!["INSERT INTO s SELECT 1".to_string()]);
        assert!(split_sql("  -- nothing\n ; ;").is_empty());
        // An unterminated literal does not panic.
        assert_eq!(split_sql("SELECT 'abc").len(), 1);
        assert_eq!(split_sql("SELECT 1 /* open").len(), 1);
    }

    #[test]
    fn reads_leadership_from_a_jobmanager_log() {
        let granted = "2026-12-05 17:56:29,127 INFO  o.a.f.r.d.runner.DefaultDispatcherRunner [] - \
                       DefaultDispatcherRunner was granted leadership with leader id 8702. Creating new \
                       DispatcherLeaderProcess.";
        let revoked = "2026-12-05 17:57:00,000 INFO  o.a.f.r.d.runner.DefaultDispatcherRunner [] - \
                       DefaultDispatcherRunner was revoked the leadership with leader id 8702. Stopping the \
                       DispatcherLeaderProcess.";
        assert_eq!(leadership_in_log("starting\nother line\n"), None);
        assert_eq!(leadership_in_log(&format!("a\n{granted}\nb\n")), Some(true));
        assert_eq!(leadership_in_log(&format!("{granted}\n{revoked}\n")), Some(false));
        assert_eq!(leadership_in_log(&format!("{revoked}\n{granted}\n")), Some(true));
    }

    #[test]
    fn parses_rest_answers() {
        let job = serde_json::json!({
            "jid": "j", "state": "RUNNING",
            "vertices": [
                {"id": "v1", "parallelism": 2, "tasks": {"RUNNING": 2, "FINISHED": 0, "DEPLOYING": 0}},
                {"id": "v2", "parallelism": 1, "tasks": {"RUNNING": 0, "DEPLOYING": 1}}
            ]
        });
        assert_eq!(
            job_vertices(&job).expect("vertices"),
            vec![("v1".to_string(), 2, 2, 0), ("v2".to_string(), 1, 0, 0)]
        );
        assert!(job_vertices(&serde_json::json!({"state": "RUNNING"})).is_err());
        assert!(job_vertices(&serde_json::json!({"vertices": [{"id": "v"}]})).is_err());

        let vertex = serde_json::json!({"subtasks": [
            {"subtask": 0, "status": "RUNNING", "taskmanager-id": "tm-1"},
            {"subtask": 1, "status": "CANCELED", "taskmanager-id": "tm-0"},
            {"subtask": 2, "status": "RUNNING"}
        ]});
        assert_eq!(vertex_taskmanagers(&vertex, &["RUNNING"]).expect("tms"), vec!["tm-1".to_string()]);
        assert!(vertex_taskmanagers(&serde_json::json!({}), &["RUNNING"]).is_err());

        let tms = serde_json::json!({"taskmanagers": [
            {"id": "tm-0", "slotsNumber": 1, "freeSlots": 1}, {"id": "tm-1", "slotsNumber": 2}, {"slotsNumber": 3}
        ]});
        let reg = registered_taskmanagers(&tms).expect("registered");
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.get("tm-1"), Some(&2));
        assert!(registered_taskmanagers(&serde_json::json!({"errors": ["x"]})).is_err());

        let history = serde_json::json!({"exceptionHistory": {"entries": [
            {"exceptionName": "x", "stacktrace": "s", "timestamp": 1, "concurrentExceptions": []},
            {"exceptionName": "y", "stacktrace": "t", "timestamp": 2, "concurrentExceptions": []}
        ], "truncated": false}});
        assert_eq!(failures_in_history(&history).expect("history"), 2);
        let empty = serde_json::json!({"exceptionHistory": {"entries": [], "truncated": false}});
        assert_eq!(failures_in_history(&empty).expect("empty"), 0);
        assert!(failures_in_history(
            &serde_json::json!({"exceptionHistory": {"entries": [], "truncated": true}})
        )
        .is_err());
        assert!(failures_in_history(&serde_json::json!({})).is_err());

        let metrics = serde_json::json!([{"id": "numRestarts", "value": "3"}]);
        assert_eq!(metric_value(&metrics, "numRestarts").as_deref(), Some("3"));
        assert_eq!(metric_value(&serde_json::json!([]), "numRestarts"), None);
        assert_eq!(metric_value(&serde_json::json!({"x": 1}), "numRestarts"), None);
    }

    #[test]
    fn parses_savepoint_operations() {
        let pending = serde_json::json!({"status": {"id": "IN_PROGRESS"}});
        assert_eq!(savepoint_outcome(&pending).expect("pending"), None);
        let done = serde_json::json!({"status": {"id": "COMPLETED"}, "operation": {"location": "file:/b/savepoints/savepoint-1"}});
        assert_eq!(
            savepoint_outcome(&done).expect("done").as_deref(),
            Some("file:/b/savepoints/savepoint-1")
        );
        let failed = serde_json::json!({"status": {"id": "COMPLETED"}, "operation": {"failure-cause": {
            "class": "java.util.concurrent.CompletionException",
            "stack-trace": "java.util.concurrent.CompletionException: boom\n\tat a.b(C.java:1)\nCaused by: java.io.IOException: disk full\n\tat x.y(Z.java:2)"
        }}});
        let err = format!("{:#}", savepoint_outcome(&failed).expect_err("failed"));
        assert!(err.contains("boom") && err.contains("disk full") && !err.contains("C.java"), "{err}");
        assert!(savepoint_outcome(&serde_json::json!({})).is_err());
    }

    #[test]
    fn summarizes_java_errors() {
        let text =
            "org.apache.flink.table.api.ValidationException: Unable to create a source\n\tat a(B.java:1)\n\
                    \tat c(D.java:2)\nCaused by: java.lang.ClassNotFoundException: x.Y\n\t... 12 more";
        let s = error_summary(text);
        assert!(s.contains("ValidationException") && s.contains("ClassNotFoundException"), "{s}");
        assert!(!s.contains("B.java") && !s.contains("more"), "{s}");
        assert_eq!(error_summary(""), "");
    }
}
