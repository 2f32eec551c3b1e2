//! The processes of a chaos run: 3 members of the HA store (etcd members, or `keel ha-member`
//! processes on the raft backend), 3 Apache Kafka nodes (KRaft, each broker and
//! controller; replication factor 3, `min.insync.replicas` 2), 2 ResourceManagers,
//! 2 JobManagers and 3 TaskManagers, each on its own address: in its own network namespace
//! ([`super::net::Network`]) or, without namespaces, on loopback with ports of its own.
//!
//! Every process can be killed (SIGKILL), paused (SIGSTOP), resumed and started again on the
//! same address (a Kafka node also stopped with SIGTERM, a controlled shutdown); each start
//! logs to `<run dir>/<name>.<n>.log`. The Kafka nodes' files and command lines come from
//! [`keel_testkit::KafkaLayout`]; in a namespace the command runs under `ip netns exec`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use keel_testkit::{free_port, wait_until, KafkaLayout, KafkaNodeAddress};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};

use super::net::Network;
use crate::Backend;

/// How long a started process may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a started Kafka node may take to be registered (JVM start-up and joining the
/// quorum take 10-60 s on a busy 2-core machine).
const KAFKA_START_TIMEOUT: Duration = Duration::from_secs(180);
/// Timeout of one `keel` client verb run by the runner.
const VERB_TIMEOUT: Duration = Duration::from_secs(15);

/// What a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Etcd(usize),
    /// A member of the Raft HA store (`keel ha-member`) with this member id.
    RaftMember(u64),
    /// An Apache Kafka node (broker and controller) with this `node.id`.
    Kafka(i32),
    ResourceManager,
    JobManager,
    TaskManager,
}

impl Role {
    pub fn keel_role(self) -> Option<&'static str> {
        match self {
            Role::ResourceManager => Some("resourcemanager"),
            Role::JobManager => Some("jobmanager"),
            Role::TaskManager => Some("taskmanager"),
            _ => None,
        }
    }

    /// A member of the HA store (etcd or Raft).
    pub fn is_ha_member(self) -> bool {
        matches!(self, Role::Etcd(_) | Role::RaftMember(_))
    }
}

/// The fixed layout: name, role, last octet of the address in namespace mode.
pub const LAYOUT: [(&str, Role, u8); 13] = [
    ("etcd0", Role::Etcd(0), 11),
    ("etcd1", Role::Etcd(1), 12),
    ("etcd2", Role::Etcd(2), 13),
    ("kafka1", Role::Kafka(1), 21),
    ("kafka2", Role::Kafka(2), 22),
    ("kafka3", Role::Kafka(3), 23),
    ("rm1", Role::ResourceManager, 31),
    ("rm2", Role::ResourceManager, 32),
    ("jm1", Role::JobManager, 41),
    ("jm2", Role::JobManager, 42),
    ("tm1", Role::TaskManager, 51),
    ("tm2", Role::TaskManager, 52),
    ("tm3", Role::TaskManager, 53),
];

/// The Raft members that replace the etcd members on `--ha raft`: same addresses (namespaces).
pub const RAFT_MEMBERS: [(&str, Role, u8); 3] = [
    ("member1", Role::RaftMember(1), 11),
    ("member2", Role::RaftMember(2), 12),
    ("member3", Role::RaftMember(3), 13),
];

/// The layout of a run on `ha`: [`LAYOUT`], its etcd members replaced by [`RAFT_MEMBERS`] on raft.
pub fn layout(ha: Backend) -> Vec<(&'static str, Role, u8)> {
    LAYOUT
        .iter()
        .map(|n| match (ha, n.1) {
            (Backend::Raft, Role::Etcd(i)) => RAFT_MEMBERS.get(i).copied().unwrap_or(*n),
            _ => *n,
        })
        .collect()
}

/// The client port of a Raft member in namespace mode.
const RAFT_PORT: u16 = 6130;

/// Pids of every process the runs of this process started (a signal handler kills them).
static STARTED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn register(pid: u32) {
    STARTED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(pid);
}

/// Kills (SIGKILL, with their process groups) every process the chaos runs of this process
/// started, for a runner interrupted by a signal, where no destructor runs.
pub fn kill_started() {
    let pids: Vec<u32> =
        STARTED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..).collect();
    for pid in pids {
        for target in [format!("-{pid}"), pid.to_string()] {
            let _ = Command::new("kill").args(["-KILL", "--", &target]).stderr(Stdio::null()).status();
        }
    }
}

/// A process of a node, killed on drop (its process group, for wrappers with children).
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    group: bool,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let target = if self.group { format!("-{}", self.pid()) } else { self.pid().to_string() };
        let status = Command::new("kill")
            .args([&format!("-{sig}"), "--", &target])
            .stderr(Stdio::null())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{sig} {target} failed");
        }
        Ok(())
    }

    fn kill9(&mut self) {
        let _ = self.signal("KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One node: a role on an address.
pub struct Node {
    pub name: String,
    pub role: Role,
    pub ip: String,
    pub ns: Option<String>,
    /// The main port (etcd client, Kafka client listener, keel RPC).
    pub port: u16,
    /// etcd peer port, Kafka controller port, TaskManager metrics port.
    pub port2: u16,
    pub proc: Option<Proc>,
    pub starts: u32,
    pub paused: bool,
}

impl Node {
    pub fn address(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }
}

/// The Kafka cluster of the run.
pub enum BrokerKind {
    /// Three Apache Kafka nodes this run starts, one per `kafka<N>` node (its `proc` is the
    /// JVM): their files and command lines.
    Own(KafkaLayout),
    /// `KEEL_TEST_KAFKA_BOOTSTRAP`: not ours to kill, pause or cut off.
    External(String),
    NotStarted,
}

/// Every process of the run.
pub struct Cluster {
    pub dir: PathBuf,
    pub keel: PathBuf,
    pub config: PathBuf,
    pub nodes: Vec<Node>,
    pub broker: BrokerKind,
    pub etcd_endpoints: String,
    /// The HA backend: etcd, or raft (`keel ha-member` processes instead of etcd).
    pub ha: Backend,
    /// `high-availability.raft.members` (raft only).
    pub raft_members: String,
    pub cluster_id: String,
    /// Start etcd members with `--pre-vote` (the runner turns it on unless `--no-etcd-pre-vote`).
    pub etcd_pre_vote: bool,
    /// The leader lease TTL written into the config (the runner sets it from its options).
    pub lease_ttl: Duration,
    /// Each TaskManager's metrics address (`host:port`), updated at every start.
    pub metrics: std::sync::Arc<std::sync::Mutex<BTreeMap<String, String>>>,
}

/// Runs `command` with its output in files, killing it after `timeout`.
pub fn run_with_timeout(
    mut command: Command,
    dir: &Path,
    timeout: Duration,
) -> anyhow::Result<(bool, String, String)> {
    let stamp = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    );
    let (out_path, err_path) = (dir.join(format!(".cmd-{stamp}.out")), dir.join(format!(".cmd-{stamp}.err")));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .context("spawning a command")?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    match status {
        Some(s) => Ok((s.success(), out, err)),
        None => Ok((false, out, format!("timed out after {timeout:?}; {err}"))),
    }
}

impl Cluster {
    /// Lays out the nodes (addresses and ports) without starting anything.
    pub fn layout(
        dir: &Path,
        keel: PathBuf,
        net: Option<&Network>,
        cluster_id: &str,
        ha: Backend,
    ) -> anyhow::Result<Cluster> {
        if !matches!(ha, Backend::Etcd | Backend::Raft) {
            bail!("the chaos suite runs on the etcd or the raft HA backend, not {}", ha.name());
        }
        let mut nodes = Vec::new();
        for (name, role, _) in layout(ha) {
            let (ip, ns) = match net {
                Some(n) => {
                    let node = n.node(name)?;
                    (node.ip.clone(), Some(node.ns.clone()))
                }
                None => ("127.0.0.1".to_string(), None),
            };
            let (port, port2) = match (net.is_some(), role) {
                (true, Role::Etcd(_)) => (2379, 2380),
                (true, Role::RaftMember(_)) => (RAFT_PORT, 0),
                (true, Role::Kafka(_)) => (9092, 9093),
                (true, Role::ResourceManager) => (6124, 0),
                (true, Role::JobManager) => (6123, 0),
                (true, Role::TaskManager) => (6125, 9249),
                (false, _) => (free_port(), free_port()),
            };
            nodes.push(Node {
                name: name.to_string(),
                role,
                ip,
                ns,
                port,
                port2,
                proc: None,
                starts: 0,
                paused: false,
            });
        }
        let etcd_endpoints = nodes
            .iter()
            .filter(|n| matches!(n.role, Role::Etcd(_)))
            .map(Node::address)
            .collect::<Vec<_>>()
            .join(",");
        let raft_members = nodes
            .iter()
            .filter_map(|n| match n.role {
                Role::RaftMember(id) => Some(format!("{id}={}", n.address())),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(",");
        Ok(Cluster {
            dir: dir.to_path_buf(),
            keel,
            config: dir.join("keel.yaml"),
            nodes,
            broker: BrokerKind::NotStarted,
            etcd_endpoints,
            ha,
            raft_members,
            cluster_id: cluster_id.to_string(),
            metrics: Default::default(),
            etcd_pre_vote: false,
            lease_ttl: super::DEFAULT_LEASE_TTL,
        })
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| anyhow!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> anyhow::Result<&mut Node> {
        self.nodes.iter_mut().find(|n| n.name == name).ok_or_else(|| anyhow!("no node {name}"))
    }

    pub fn names_of(&self, pred: impl Fn(Role) -> bool) -> Vec<String> {
        self.nodes.iter().filter(|n| pred(n.role)).map(|n| n.name.clone()).collect()
    }

    /// The node whose keel RPC address is `address`.
    pub fn by_address(&self, address: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.role.keel_role().is_some() && n.address() == address)
    }

    pub fn bootstrap(&self) -> String {
        match &self.broker {
            BrokerKind::Own(layout) => layout.bootstrap(),
            BrokerKind::External(bootstrap) => bootstrap.clone(),
            BrokerKind::NotStarted => String::new(),
        }
    }

    pub fn broker_is_external(&self) -> bool {
        matches!(self.broker, BrokerKind::External(_))
    }

    fn command(&self, ns: Option<&str>, program: &Path) -> Command {
        match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn spawn(&mut self, name: &str, mut command: Command, group: bool) -> anyhow::Result<()> {
        let node = self.node_mut(name)?;
        node.starts += 1;
        let file_name = format!("{name}.{}.log", node.starts);
        let log = self.dir.join(file_name);
        let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        if group {
            command.process_group(0);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        register(child.id());
        let node = self.node_mut(name)?;
        node.proc = Some(Proc { child, log, group });
        node.paused = false;
        Ok(())
    }

    // ----- etcd -----

    fn etcd_initial_cluster(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| matches!(n.role, Role::Etcd(_)))
            .map(|n| format!("{}=http://{}:{}", n.name, n.ip, n.port2))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn start_etcd(&mut self, name: &str, state: &str) -> anyhow::Result<()> {
        let bin = PathBuf::from(std::env::var_os("ETCD_BIN").unwrap_or_else(|| "/usr/bin/etcd".into()));
        if !bin.exists() {
            bail!("etcd not found at {}; run scripts/install-deps.sh", bin.display());
        }
        let initial = self.etcd_initial_cluster();
        let node = self.node(name)?;
        let (ip, port, peer) = (node.ip.clone(), node.port, node.port2);
        let mut c = self.command(node.ns.as_deref(), &bin);
        c.arg("--name")
            .arg(name)
            .arg("--data-dir")
            .arg(self.dir.join(format!("{name}.data")))
            .arg("--listen-client-urls")
            .arg(format!("http://{ip}:{port}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://{ip}:{port}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://{ip}:{peer}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{ip}:{peer}"))
            .arg("--initial-cluster")
            .arg(initial)
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg(format!("keel-chaos-{}", self.cluster_id));
        if self.etcd_pre_vote {
            // A member cut off and back does not force an election with its higher term.
            c.arg("--pre-vote");
        }
        self.spawn(name, c, false)
    }

    /// `etcdctl` against `endpoints` (all members when `None`).
    pub fn etcdctl(
        &self,
        endpoints: Option<&str>,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoints.unwrap_or(&self.etcd_endpoints))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=5s")
            .args(args);
        let (ok, out, err) = run_with_timeout(c, &self.dir, timeout)?;
        if !ok {
            bail!("etcdctl {} failed: {}", args.join(" "), err.trim());
        }
        Ok(out)
    }

    pub fn wait_etcd_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_until("etcd to be healthy", timeout, || {
            self.etcdctl(None, &["endpoint", "health"], Duration::from_secs(10)).map(|_| Some(()))
        })
    }

    /// The name of the etcd member that leads the etcd cluster now.
    pub fn etcd_leader(&self) -> anyhow::Result<String> {
        let out = self.etcdctl(None, &["endpoint", "status", "-w", "json"], Duration::from_secs(10))?;
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).context("etcdctl endpoint status JSON")?;
        for e in v.as_array().into_iter().flatten() {
            let member = &e["Status"]["header"]["member_id"];
            if !member.is_null() && *member == e["Status"]["leader"] {
                let endpoint = e["Endpoint"].as_str().unwrap_or_default();
                if let Some(n) = self
                    .nodes
                    .iter()
                    .find(|n| matches!(n.role, Role::Etcd(_)) && endpoint.ends_with(&n.address()))
                {
                    return Ok(n.name.clone());
                }
            }
        }
        bail!("no etcd leader in {out}")
    }

    // ----- the HA store's members (etcd or Raft) -----

    /// The names of the HA store's members (etcd0..2 or member1..3).
    pub fn ha_member_names(&self) -> Vec<String> {
        self.names_of(Role::is_ha_member)
    }

    /// Starts the HA store's three members and waits until the store serves.
    pub fn start_ha_store(&mut self) -> anyhow::Result<()> {
        match self.ha {
            Backend::Raft => {
                // The members read the run's config file (members, storage directory).
                self.write_config()?;
                for name in self.ha_member_names() {
                    self.spawn_member(&name)?;
                }
                for name in self.ha_member_names() {
                    self.wait_member_listening(&name)?;
                }
            }
            _ => {
                for name in self.ha_member_names() {
                    self.start_etcd(&name, "new")?;
                }
            }
        }
        self.wait_ha_store_healthy(Duration::from_secs(60))
    }

    /// Waits until the HA store is whole: every etcd member healthy; every Raft member answering
    /// and naming the same Raft leader, which calls itself leader.
    pub fn wait_ha_store_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        if self.ha != Backend::Raft {
            return self.wait_etcd_healthy(timeout);
        }
        wait_until("the raft members to agree on a leader", timeout, || {
            let mut leaders = BTreeSet::new();
            let mut leading = 0;
            for name in self.ha_member_names() {
                let status = member_status(&self.node(&name)?.address())?;
                leaders.insert(status.raft_leader);
                leading += usize::from(status.state == "leader");
            }
            Ok((leaders.len() == 1 && !leaders.contains(&0) && leading == 1).then_some(()))
        })
    }

    /// The name of the member that leads the HA store now: the etcd leader, or the Raft member
    /// that calls itself leader (the one with the highest term if a cut-off one still does).
    pub fn ha_leader(&self) -> anyhow::Result<String> {
        if self.ha != Backend::Raft {
            return self.etcd_leader();
        }
        let mut best: Option<(u64, String)> = None;
        for n in self.nodes.iter().filter(|n| matches!(n.role, Role::RaftMember(_))) {
            if n.proc.is_none() || n.paused {
                continue;
            }
            if let Ok(s) = member_status(&n.address()) {
                if s.state == "leader" && best.as_ref().is_none_or(|(t, _)| s.term > *t) {
                    best = Some((s.term, n.name.clone()));
                }
            }
        }
        best.map(|(_, name)| name).ok_or_else(|| anyhow!("no raft member leads now"))
    }

    /// Starts a `keel ha-member` process for Raft member node `name` (its id, its address from
    /// the members setting, its data under `high-availability.storageDir`/raft-<id>).
    fn spawn_member(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name)?;
        let Role::RaftMember(id) = node.role else { bail!("{name} is not a raft member") };
        let mut c = self.command(node.ns.as_deref(), &self.keel);
        c.arg("ha-member")
            .arg("--config")
            .arg(&self.config)
            .arg("--set")
            .arg(format!("high-availability.raft.member-id={id}"))
            .env("KEEL_LOG", "info,keel=debug,raft=info,h2=warn,tower=warn,hyper=warn");
        self.spawn(name, c, false)
    }

    fn wait_member_listening(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node_mut(name)?;
        wait_until(&format!("{name} to listen"), START_TIMEOUT, || {
            let Some(p) = node.proc.as_mut() else { bail!("{name} has no process") };
            let log = p.log_text();
            if log.contains("keel ha-member listening on ") {
                return Ok(Some(()));
            }
            if !p.running() {
                bail!("{name} exited; log tail:\n{}", tail(&log, 30));
            }
            Ok(None)
        })
    }

    /// Starts Raft member `name` again (same id, same data) and waits until it listens.
    pub fn start_member(&mut self, name: &str) -> anyhow::Result<()> {
        self.spawn_member(name)?;
        self.wait_member_listening(name)
    }

    // ----- Kafka -----

    /// Starts the Kafka cluster: three nodes of the run's own, each on its node's address
    /// (formatted first), or the external cluster `KEEL_TEST_KAFKA_BOOTSTRAP` names; waits
    /// until every broker is registered.
    pub fn start_brokers(&mut self) -> anyhow::Result<()> {
        let external = std::env::var(keel_testkit::ENV_BOOTSTRAP).unwrap_or_default();
        if !external.trim().is_empty() {
            let bootstrap = external.trim().to_string();
            wait_until(&format!("the Kafka cluster at {bootstrap} to answer"), START_TIMEOUT, || {
                brokers(&bootstrap).map(|b| (!b.is_empty()).then_some(()))
            })?;
            self.broker = BrokerKind::External(bootstrap);
            return Ok(());
        }
        let nodes: Vec<KafkaNodeAddress> = self
            .nodes
            .iter()
            .filter_map(|n| match n.role {
                Role::Kafka(id) => {
                    Some(KafkaNodeAddress { id, host: n.ip.clone(), port: n.port, controller_port: n.port2 })
                }
                _ => None,
            })
            .collect();
        let layout = KafkaLayout::new(&self.dir.join("kafka"), nodes);
        layout.write_and_format().context("formatting the Kafka nodes' data dirs")?;
        self.broker = BrokerKind::Own(layout);
        let names = self.names_of(|r| matches!(r, Role::Kafka(_)));
        for name in &names {
            self.spawn_kafka(name)?;
        }
        for name in &names {
            self.wait_kafka(name)?;
        }
        Ok(())
    }

    /// The Kafka node name (`kafka<N>`) of broker id `id`.
    pub fn kafka_name(&self, id: i32) -> anyhow::Result<String> {
        self.nodes
            .iter()
            .find(|n| n.role == Role::Kafka(id))
            .map(|n| n.name.clone())
            .ok_or_else(|| anyhow!("no Kafka node with id {id}"))
    }

    fn spawn_kafka(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name)?;
        let Role::Kafka(id) = node.role else { bail!("{name} is not a Kafka node") };
        let BrokerKind::Own(layout) = &self.broker else { bail!("the Kafka cluster is not this run's") };
        let java = layout.command(id)?;
        // `ip netns exec` execs the program in place: the child's pid is the JVM's.
        let mut c = self.command(node.ns.as_deref(), Path::new(java.get_program()));
        c.args(java.get_args());
        for (k, v) in java.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        self.spawn(name, c, false)
    }

    /// Waits until node `name` answers a metadata request itself and lists itself: it runs and
    /// is registered (a node killed a moment ago may still be listed by the others).
    fn wait_kafka(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name)?;
        let Role::Kafka(id) = node.role else { bail!("{name} is not a Kafka node") };
        let address = node.address();
        let result = wait_until(
            &format!("Kafka node {name} ({address}) to be registered"),
            KAFKA_START_TIMEOUT,
            || {
                let node = self.node_mut(name)?;
                if let Some(p) = node.proc.as_mut() {
                    if !p.running() {
                        bail!("{name} exited");
                    }
                }
                let live = brokers(&address)?;
                Ok(live.contains(&id).then_some(()))
            },
        );
        result.with_context(|| {
            let log =
                self.node(name).ok().and_then(|n| n.proc.as_ref()).map(Proc::log_text).unwrap_or_default();
            format!("{name}'s log tail:\n{}", tail(&log, 20))
        })
    }

    /// SIGTERM to Kafka node `name` (a controlled shutdown: its leaderships move away first);
    /// killed after 60 s. Returns when the process is gone.
    pub fn stop_kafka(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node_mut(name)?;
        let mut p = node.proc.take().ok_or_else(|| anyhow!("{name} is not running"))?;
        node.paused = false;
        p.signal("TERM")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while p.running() {
            if Instant::now() >= deadline {
                p.kill9();
                bail!("{name} did not shut down within 60 s of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits until every partition of every topic (the internal ones included) has a leader and
    /// all its replicas in sync: the cluster is whole again after a broker fault.
    pub fn wait_kafka_in_sync(&self, timeout: Duration) -> anyhow::Result<()> {
        let bootstrap = self.bootstrap();
        let consumer: BaseConsumer = metadata_client(&bootstrap)?;
        wait_until("every Kafka partition to be fully in sync", timeout, || {
            let metadata = consumer.fetch_metadata(None, Duration::from_secs(5))?;
            let lagging: Vec<String> = metadata
                .topics()
                .iter()
                .flat_map(|t| {
                    t.partitions()
                        .iter()
                        .filter(|p| p.leader() < 0 || p.isr().len() < p.replicas().len())
                        .map(move |p| format!("{}/{} isr {:?}", t.name(), p.id(), p.isr()))
                })
                .collect();
            if lagging.is_empty() {
                Ok(Some(()))
            } else {
                Err(anyhow!(
                    "{} partitions lag, e.g. {}",
                    lagging.len(),
                    lagging[..lagging.len().min(3)].join(", ")
                ))
            }
        })
    }

    // ----- keel -----

    /// Writes the cluster's config file.
    pub fn write_config(&self) -> anyhow::Result<()> {
        let rm = self.node("rm1")?;
        let jm = self.node("jm1")?;
        let store = match self.ha {
            Backend::Raft => [
                "high-availability.type: raft".to_string(),
                format!("high-availability.raft.members: \"{}\"", self.raft_members),
            ],
            _ => [
                "high-availability.type: etcd".to_string(),
                format!("high-availability.etcd.endpoints: \"{}\"", self.etcd_endpoints),
            ],
        };
        let [store_type, store_members] = store;
        let lines = [
            store_type,
            format!("high-availability.cluster-id: {}", self.cluster_id),
            store_members,
            format!("high-availability.storageDir: {}", self.dir.join("ha").display()),
            format!("state.checkpoints.dir: {}", self.dir.join("checkpoints").display()),
            format!("resourcemanager.rpc.address: {}", rm.ip),
            format!("resourcemanager.rpc.port: {}", rm.port),
            format!("jobmanager.rpc.address: {}", jm.ip),
            format!("jobmanager.rpc.port: {}", jm.port),
            "taskmanager.rpc.port: 0".to_string(),
            match self.ha.lease_ttl_key() {
                Some(key) => format!("{key}: {} ms", self.lease_ttl.as_millis()),
                None => String::new(),
            },
        ];
        let mut f = std::fs::File::create(&self.config)?;
        writeln!(f, "{}", lines.join("\n"))?;
        Ok(())
    }

    /// Starts a keel role node and waits until it listens.
    pub fn start_keel(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name)?;
        let role = node.role.keel_role().ok_or_else(|| anyhow!("{name} is not a keel role"))?;
        // On loopback every start takes free ports (port 0) and reads them back: a port chosen
        // earlier may have been taken meanwhile. In a namespace the node's ports are its own.
        let dynamic = node.ns.is_none();
        let (port, metrics_port) = if dynamic { (0, 0) } else { (node.port, node.port2) };
        let mut c = self.command(node.ns.as_deref(), &self.keel);
        c.arg(role)
            .arg("--config")
            .arg(&self.config)
            .arg("--set")
            .arg(format!("{role}.rpc.address={}", node.ip))
            .arg("--set")
            .arg(format!("{role}.rpc.port={port}"));
        if node.role == Role::TaskManager {
            c.args(["--set", &format!("taskmanager.id={name}")])
                .args(["--set", "taskmanager.numberOfTaskSlots=2"])
                .args(["--set", &format!("metrics.reporter.prom.port={metrics_port}")]);
        }
        c.env("KEEL_LOG", "info,keel=debug,h2=warn,tower=warn,hyper=warn");
        self.spawn(name, c, false)?;
        let marker = format!("keel {role} listening on ");
        let metrics_marker = "keel taskmanager metrics on ";
        let is_tm = role == "taskmanager";
        let node = self.node_mut(name)?;
        let (address, metrics) = wait_until(&format!("{name} to listen"), START_TIMEOUT, || {
            let Some(p) = node.proc.as_mut() else { bail!("{name} has no process") };
            let log = p.log_text();
            let after = |m: &str| {
                log.lines()
                    .find_map(|l| l.strip_prefix(m))
                    .and_then(|rest| rest.split_whitespace().next().map(str::to_string))
            };
            if let Some(address) = after(&marker) {
                let metrics = after(metrics_marker);
                if !is_tm || metrics.is_some() {
                    return Ok(Some((address, metrics)));
                }
            }
            if !p.running() {
                bail!("{name} exited; log tail:\n{}", tail(&log, 30));
            }
            Ok(None)
        })?;
        let port = |a: &str| a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
        if let Some(p) = port(&address) {
            node.port = p;
        }
        if let Some(m) = metrics {
            if let Some(p) = port(&m) {
                node.port2 = p;
            }
            let mut map = self.metrics.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            map.insert(name.to_string(), m);
        }
        Ok(())
    }

    /// Starts a node's process again after a kill (etcd rejoins as an existing member, a Raft
    /// member with its id and data).
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let role = self.node(name)?.role;
        match role {
            Role::Etcd(_) => self.start_etcd(name, "existing"),
            Role::RaftMember(_) => self.start_member(name),
            Role::Kafka(_) => {
                self.spawn_kafka(name)?;
                self.wait_kafka(name)
            }
            _ => self.start_keel(name),
        }
    }

    pub fn kill9(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node_mut(name)?;
        match node.proc.take() {
            Some(mut p) => {
                p.kill9();
                node.paused = false;
                Ok(())
            }
            None => bail!("{name} is not running"),
        }
    }

    pub fn pause(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node_mut(name)?;
        let p = node.proc.as_ref().ok_or_else(|| anyhow!("{name} is not running"))?;
        p.signal("STOP")?;
        node.paused = true;
        Ok(())
    }

    pub fn resume(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node_mut(name)?;
        let p = node.proc.as_ref().ok_or_else(|| anyhow!("{name} is not running"))?;
        p.signal("CONT")?;
        node.paused = false;
        Ok(())
    }

    /// Names of nodes whose process exited by itself (not killed by the runner).
    pub fn exited(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for n in &mut self.nodes {
            if let Some(p) = n.proc.as_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    out.push((n.name.clone(), format!("{status}; log {}", p.log.display())));
                }
            }
        }
        out
    }

    /// `keel --config <run> --output json ARGS`, parsed; fails with stderr.
    pub fn keel_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut c = Command::new(&self.keel);
        c.arg("--config").arg(&self.config).args(["--output", "json"]).args(args);
        let (ok, out, err) = run_with_timeout(c, &self.dir, VERB_TIMEOUT)?;
        if !ok {
            bail!("keel {} failed: {}", args.join(" "), err.trim());
        }
        let last = out.lines().rev().find(|l| l.trim_start().starts_with(['{', '['])).unwrap_or("");
        serde_json::from_str(last).with_context(|| format!("keel {} printed no JSON: {out}", args.join(" ")))
    }

    /// `keel run FILE` (waits until the job runs).
    pub fn keel_run(&self, spec: &Path) -> anyhow::Result<()> {
        let mut c = Command::new(&self.keel);
        c.arg("--config").arg(&self.config).arg("run").arg(spec);
        let (ok, out, err) = run_with_timeout(c, &self.dir, Duration::from_secs(120))?;
        if !ok {
            bail!("keel run failed: {} {}", out.trim(), err.trim());
        }
        Ok(())
    }

    /// Current leaders from `keel cluster --output json`: (jm address, jm epoch, rm address,
    /// rm epoch, taskmanager count).
    pub fn leaders(&self) -> anyhow::Result<Leaders> {
        let v = self.keel_json(&["cluster"])?;
        Ok(Leaders {
            jm: v["jobmanager"]["leader"].as_str().unwrap_or_default().to_string(),
            jm_epoch: v["jobmanager"]["epoch"].as_u64().unwrap_or(0),
            rm: v["resourcemanager"]["leader"].as_str().unwrap_or_default().to_string(),
            rm_epoch: v["resourcemanager"]["epoch"].as_u64().unwrap_or(0),
            taskmanagers: v["taskmanagers"].as_array().map(Vec::len).unwrap_or(0),
        })
    }

    /// Log tails of every node, for a failure report.
    pub fn log_paths(&self) -> BTreeMap<String, PathBuf> {
        self.nodes.iter().filter_map(|n| n.proc.as_ref().map(|p| (n.name.clone(), p.log.clone()))).collect()
    }

    /// Kills every process (Kafka and etcd last), leaving the logs.
    pub fn shutdown(&mut self) {
        for n in self.nodes.iter_mut().rev() {
            if let Some(mut p) = n.proc.take() {
                if n.paused {
                    let _ = p.signal("CONT");
                }
                p.kill9();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[derive(Debug, Clone, Default)]
pub struct Leaders {
    pub jm: String,
    pub jm_epoch: u64,
    pub rm: String,
    pub rm_epoch: u64,
    pub taskmanagers: usize,
}

/// A Raft member's view of its group (its `MemberStatus`), within 2 s.
pub fn member_status(address: &str) -> anyhow::Result<keel_proto::pb::HaMemberStatusResponse> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let address = address.to_string();
    rt.block_on(async move {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2));
        let channel = endpoint.connect().await?;
        let mut client = keel_proto::pb::ha_member_client::HaMemberClient::new(channel);
        Ok(client.member_status(keel_proto::pb::HaMemberStatusRequest {}).await?.into_inner())
    })
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn metadata_client(bootstrap: &str) -> anyhow::Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "3")
        .set("reconnect.backoff.max.ms", "500")
        .create()
        .context("creating a Kafka metadata client")
}

/// Broker ids in the metadata `bootstrap` answers with (registered, not fenced).
pub fn brokers(bootstrap: &str) -> anyhow::Result<BTreeSet<i32>> {
    let consumer = metadata_client(bootstrap)?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(3))?;
    Ok(metadata.brokers().iter().map(|b| b.id()).collect())
}

/// The broker id leading `topic`'s `partition` now, as the metadata says.
pub fn leader_of(bootstrap: &str, topic: &str, partition: i32) -> anyhow::Result<i32> {
    let consumer = metadata_client(bootstrap)?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let p = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
        .ok_or_else(|| anyhow!("no partition {topic}/{partition} in the metadata"))?;
    if p.leader() < 0 {
        bail!("{topic}/{partition} has no leader");
    }
    Ok(p.leader())
}

/// `GET path` over HTTP/1.0 with short timeouts; the body.
pub fn http_get(address: &str, path: &str, timeout: Duration) -> anyhow::Result<String> {
    let addr: std::net::SocketAddr = address.parse().with_context(|| format!("address {address}"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.split_whitespace().nth(1) == Some("200") => Ok(body.to_string()),
        _ => bail!("GET {path} on {address}: {:?}", response.lines().next()),
    }
}
