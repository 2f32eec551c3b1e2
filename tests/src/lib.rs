//! A cluster sandbox for process-level tests: real etcd servers, real `keel` processes.
//!
//! Layout:
//! - [`Sandbox`]: a directory of its own, a config file, and every process a test starts; all
//!   of them are killed when the sandbox is dropped. Ports come from binding `127.0.0.1:0`.
//! - [`EtcdCluster`]: one or three real etcd members on loopback.
//! - [`RaftCluster`]: `keel ha-member` processes, the members of the `raft` HA backend.
//! - [`Backend`] and [`on_backends!`]: one HA test body run on local, etcd and raft.
//! - [`KeelProc`]: one `keel` role process, with its address and log.
//! - [`wait_until`]: polls a condition with a timeout and a message saying what was awaited.
//!
//! The `keel` binary is taken from `KEEL_BIN`, else from the target directory next to the test
//! executable; `scripts/test.sh` builds it before running the tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

pub mod chaos;

pub use keel_testkit::{free_port, wait_until};

/// The `keel` binary under test.
pub fn keel_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/keel; a binary of this crate
    // (target/<profile>/keel-ha-bench) finds it beside itself.
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("cannot find the test executable: {e}"));
    let beside = exe.parent().map(|d| d.join("keel")).filter(|p| p.exists());
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap_or_else(|| Path::new("."));
    let bin = beside.unwrap_or_else(|| profile_dir.join("keel"));
    assert!(
        bin.exists(),
        "keel binary not found at {}; build it first with `cargo build -p keel` (scripts/test.sh does) or set KEEL_BIN",
        bin.display()
    );
    bin
}

/// The etcd binary; the project's install script puts it there.
pub fn etcd_bin() -> PathBuf {
    let p = PathBuf::from(std::env::var_os("ETCD_BIN").unwrap_or_else(|| "/usr/bin/etcd".into()));
    assert!(
        p.exists(),
        "etcd not found at {}; run scripts/install-deps.sh (installs Debian's etcd-server)",
        p.display()
    );
    p
}

static SANDBOX_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A process started by a test, killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status()?;
        if !status.success() {
            bail!("kill -{name} {} ({}) failed", self.pid(), self.name);
        }
        Ok(())
    }

    /// kill -9, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Real etcd members on loopback.
pub struct EtcdCluster {
    pub members: Vec<Option<Proc>>,
    names: Vec<String>,
    client_ports: Vec<u16>,
    peer_ports: Vec<u16>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts `size` members on free ports and waits until they are healthy. A member whose
    /// port another process took between `free_port` and etcd's bind (tests run in parallel)
    /// never gets healthy: then the whole cluster is started again on other ports, up to three
    /// times.
    pub fn start(dir: &Path, size: usize) -> anyhow::Result<EtcdCluster> {
        let mut last_error = None;
        for attempt in 0..3 {
            let dir = dir.join(format!("try{attempt}"));
            std::fs::create_dir_all(&dir)?;
            let names: Vec<String> = (0..size).map(|i| format!("etcd{i}")).collect();
            let client_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
            let peer_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
            let mut cluster = EtcdCluster { members: Vec::new(), names, client_ports, peer_ports, dir };
            for i in 0..size {
                let p = cluster.spawn(i, "new")?;
                cluster.members.push(Some(p));
            }
            match cluster.wait_healthy(Duration::from_secs(30)) {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    eprintln!(
                        "etcd cluster (try {attempt}) not healthy, starting it again on other ports: {e:#}"
                    );
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("etcd did not start")))
    }

    fn initial_cluster(&self) -> String {
        self.names
            .iter()
            .zip(&self.peer_ports)
            .map(|(n, p)| format!("{n}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&self, i: usize, state: &str) -> anyhow::Result<Proc> {
        let data = self.dir.join(format!("{}.data", self.names[i]));
        let log = self.dir.join(format!("{}.log", self.names[i]));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(etcd_bin())
            .arg("--name")
            .arg(&self.names[i])
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", self.client_ports[i]))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{}", self.client_ports[i]))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_ports[i]))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_ports[i]))
            .arg("--initial-cluster")
            .arg(self.initial_cluster())
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg(format!("keel-test-{}", self.peer_ports[0]))
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| "cannot start etcd")?;
        Ok(Proc { name: self.names[i].clone(), child, log })
    }

    pub fn endpoints(&self) -> String {
        self.client_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    /// Waits until every running member answers `etcdctl endpoint health`, or, without
    /// etcdctl, until each client port accepts connections.
    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let eps: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_some())
            .map(|(i, _)| format!("http://127.0.0.1:{}", self.client_ports[i]))
            .collect();
        wait_until("etcd to be healthy", timeout, || {
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(eps.join(","))
                .arg("endpoint")
                .arg("health")
                .output();
            match out {
                Ok(o) if o.status.success() => Ok(Some(())),
                Ok(o) => Err(anyhow!("{}", String::from_utf8_lossy(&o.stderr))),
                Err(e) => Err(anyhow!("cannot run etcdctl: {e}")),
            }
        })
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].take() {
            p.kill9();
        }
    }

    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        let p = self.spawn(i, "existing")?;
        self.members[i] = Some(p);
        Ok(())
    }
}

/// `keel ha-member` processes on loopback: the members of the `raft` HA backend.
pub struct RaftCluster {
    pub members: Vec<Option<Proc>>,
    ports: Vec<u16>,
    config: PathBuf,
    pub dir: PathBuf,
}

impl RaftCluster {
    /// Starts `size` members on free ports and waits until the group has a leader. A member
    /// whose port another process took meanwhile exits at once: then the whole group is started
    /// again on other ports, up to three times.
    pub fn start(dir: &Path, size: usize) -> anyhow::Result<RaftCluster> {
        let mut last_error = None;
        for attempt in 0..3 {
            let dir = dir.join(format!("try{attempt}"));
            std::fs::create_dir_all(&dir)?;
            let ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
            let config = dir.join("members.yaml");
            let mut cluster = RaftCluster { members: Vec::new(), ports, config, dir };
            std::fs::write(
                &cluster.config,
                format!(
                    "high-availability.type: raft\nhigh-availability.raft.members: \"{}\"\nhigh-availability.storageDir: {}\n",
                    cluster.members_setting(),
                    cluster.dir.join("data").display()
                ),
            )?;
            let started: anyhow::Result<()> = (|| {
                for i in 0..size {
                    let p = cluster.spawn(i)?;
                    cluster.members.push(Some(p));
                }
                cluster.wait_for_leader(Duration::from_secs(30)).map(|_| ())
            })();
            match started {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    eprintln!("raft members (try {attempt}) did not elect a leader, starting again on other ports: {e:#}");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("raft members did not start")))
    }

    /// `high-availability.raft.members` for these members (ids from 1).
    pub fn members_setting(&self) -> String {
        self.ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The address of member `i` (0-based; its id is `i + 1`).
    pub fn address(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    fn spawn(&self, i: usize) -> anyhow::Result<Proc> {
        let name = format!("member{}", i + 1);
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = Command::new(keel_bin())
            .arg("ha-member")
            .arg("--config")
            .arg(&self.config)
            .arg("--set")
            .arg(format!("high-availability.raft.member-id={}", i + 1))
            .env("KEEL_LOG", "info,keel=debug,raft=info,h2=warn,tower=warn,hyper=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .context("cannot start keel ha-member")?;
        Ok(Proc { name, child, log })
    }

    /// Member `i`'s view of the group (its `MemberStatus`).
    pub fn status(&self, i: usize) -> anyhow::Result<keel_proto::pb::HaMemberStatusResponse> {
        let address = self.address(i);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(2));
            let channel = endpoint.connect().await?;
            let mut client = keel_proto::pb::ha_member_client::HaMemberClient::new(channel);
            Ok(client.member_status(keel_proto::pb::HaMemberStatusRequest {}).await?.into_inner())
        })
    }

    /// The member that leads the group, as a running member that calls itself leader says.
    pub fn leader(&mut self) -> Option<usize> {
        (0..self.ports.len()).find(|&i| {
            self.members[i].as_mut().is_some_and(|p| p.is_running())
                && self.status(i).is_ok_and(|s| s.state == "leader")
        })
    }

    /// Waits until some member leads the group; returns it.
    pub fn wait_for_leader(&mut self, timeout: Duration) -> anyhow::Result<usize> {
        wait_until("a raft member to lead", timeout, || {
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(p) = m {
                    if !p.is_running() {
                        bail!("raft member {} exited; log:\n{}", i + 1, p.log_text());
                    }
                }
            }
            Ok(self.leader())
        })
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].take() {
            p.kill9();
        }
    }

    /// Starts member `i` again (after a kill) on its port and data.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        let p = self.spawn(i)?;
        self.members[i] = Some(p);
        Ok(())
    }

    /// SIGSTOP / SIGCONT of member `i`.
    pub fn pause(&self, i: usize) -> anyhow::Result<()> {
        self.members[i].as_ref().ok_or_else(|| anyhow!("member {} is not running", i + 1))?.signal("STOP")
    }

    pub fn resume(&self, i: usize) -> anyhow::Result<()> {
        self.members[i].as_ref().ok_or_else(|| anyhow!("member {} is not running", i + 1))?.signal("CONT")
    }
}

/// Which HA backend a sandbox uses.
pub enum Ha {
    Local,
    Etcd(String),
    /// `high-availability.raft.members`.
    Raft(String),
}

/// The HA backends the HA tests run on (see [`on_backends`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    Etcd,
    Raft,
}

impl Backend {
    /// The key of the leader lease TTL (`None`: the local backend has no lease).
    pub fn lease_ttl_key(self) -> Option<&'static str> {
        match self {
            Backend::Local => None,
            Backend::Etcd => Some("high-availability.etcd.lease-ttl"),
            Backend::Raft => Some("high-availability.raft.lease-ttl"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Etcd => "etcd",
            Backend::Raft => "raft",
        }
    }
}

/// Runs one HA test body on several backends: `on_backends!(name, body, [Local, Etcd, Raft]);`
/// makes the tests `name::local`, `name::etcd` and `name::raft`, each calling
/// `body(Backend::X)`.
#[macro_export]
macro_rules! on_backends {
    ($name:ident, $body:ident, [$($backend:ident),+ $(,)?]) => {
        mod $name {
            $(
                #[test]
                #[allow(non_snake_case)]
                fn $backend() -> anyhow::Result<()> {
                    super::$body($crate::Backend::$backend)
                }
            )+
        }
    };
}

/// A `keel` role process with its address.
pub struct KeelProc {
    pub role: String,
    pub address: String,
    pub proc: Proc,
}

/// A test's own directory, config and processes.
pub struct Sandbox {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub procs: Vec<KeelProc>,
    pub etcd: Option<EtcdCluster>,
    pub raft: Option<RaftCluster>,
}

impl Sandbox {
    /// A new sandbox under the system temp dir; `settings` are extra config lines.
    pub fn new(test: &str, ha: Ha, settings: &[(&str, &str)]) -> anyhow::Result<Sandbox> {
        let dir = std::env::temp_dir().join(format!(
            "keel-test-{test}-{}-{}",
            std::process::id(),
            SANDBOX_SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let mut lines = vec![
            "high-availability.cluster-id: test".to_string(),
            format!("high-availability.storageDir: {}", dir.join("ha").display()),
            format!("state.checkpoints.dir: {}", dir.join("checkpoints").display()),
            "resourcemanager.rpc.address: 127.0.0.1".into(),
            "jobmanager.rpc.address: 127.0.0.1".into(),
            "taskmanager.rpc.address: 127.0.0.1".into(),
            // Client fallback addresses point nowhere useful: tests find leaders through HA.
            format!("resourcemanager.rpc.port: {}", free_port()),
            format!("jobmanager.rpc.port: {}", free_port()),
            "taskmanager.rpc.port: 0".into(),
        ];
        match &ha {
            Ha::Local => lines.push("high-availability.type: local".into()),
            Ha::Etcd(endpoints) => {
                lines.push("high-availability.type: etcd".into());
                lines.push(format!("high-availability.etcd.endpoints: \"{endpoints}\""));
            }
            Ha::Raft(members) => {
                lines.push("high-availability.type: raft".into());
                lines.push(format!("high-availability.raft.members: \"{members}\""));
            }
        }
        for (k, v) in settings {
            lines.retain(|l| !l.starts_with(&format!("{k}:")));
            lines.push(format!("{k}: \"{v}\""));
        }
        let config = dir.join("keel.yaml");
        let mut f = std::fs::File::create(&config)?;
        writeln!(f, "{}", lines.join("\n"))?;
        Ok(Sandbox { dir, config, procs: Vec::new(), etcd: None, raft: None })
    }

    /// A sandbox on `backend`: three etcd members or three Raft members of its own for etcd and
    /// raft. `settings` may name `lease-ttl` for either with [`Backend::lease_ttl_key`].
    pub fn on(backend: Backend, test: &str, settings: &[(&str, &str)]) -> anyhow::Result<Sandbox> {
        let test = format!("{test}-{}", backend.name());
        match backend {
            Backend::Local => Sandbox::new(&test, Ha::Local, settings),
            Backend::Etcd => Sandbox::with_etcd(&test, 3, settings),
            Backend::Raft => Sandbox::with_raft(&test, 3, settings),
        }
    }

    /// A sandbox on a fresh group of `members` Raft members (`keel ha-member` processes).
    pub fn with_raft(test: &str, members: usize, settings: &[(&str, &str)]) -> anyhow::Result<Sandbox> {
        let raft_dir = std::env::temp_dir().join(format!(
            "keel-test-{test}-raft-{}-{}",
            std::process::id(),
            SANDBOX_SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&raft_dir)?;
        let raft = RaftCluster::start(&raft_dir, members)?;
        let mut sb = Sandbox::new(test, Ha::Raft(raft.members_setting()), settings)?;
        sb.raft = Some(raft);
        Ok(sb)
    }

    /// A sandbox on a fresh etcd cluster of `members` members.
    pub fn with_etcd(test: &str, members: usize, settings: &[(&str, &str)]) -> anyhow::Result<Sandbox> {
        let etcd_dir = std::env::temp_dir().join(format!(
            "keel-test-{test}-etcd-{}-{}",
            std::process::id(),
            SANDBOX_SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&etcd_dir)?;
        let etcd = EtcdCluster::start(&etcd_dir, members)?;
        let mut sb = Sandbox::new(test, Ha::Etcd(etcd.endpoints()), settings)?;
        sb.etcd = Some(etcd);
        Ok(sb)
    }

    /// Starts a role (`resourcemanager`, `jobmanager`, `taskmanager`) named `name`, with extra
    /// `--set` flags, and waits until it listens. A role that needs its own port gets port 0.
    pub fn start(&mut self, role: &str, name: &str, sets: &[String]) -> anyhow::Result<usize> {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(keel_bin());
        cmd.arg(role).arg("--config").arg(&self.config);
        match role {
            "resourcemanager" => {
                cmd.arg("--set").arg("resourcemanager.rpc.port=0");
            }
            "jobmanager" => {
                cmd.arg("--set").arg("jobmanager.rpc.port=0");
            }
            _ => {
                cmd.arg("--set").arg(format!("taskmanager.id={name}"));
            }
        }
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        let child = cmd
            .env("KEEL_LOG", "info,keel=debug,h2=warn,tower=warn,hyper=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .context("cannot start keel")?;
        let mut proc = Proc { name: name.to_string(), child, log };
        let marker = format!("keel {role} listening on ");
        let address = wait_until(&format!("{name} to listen"), Duration::from_secs(60), || {
            if let Some(line) = proc.log_text().lines().find(|l| l.starts_with(&marker)) {
                return Ok(Some(
                    line[marker.len()..].split_whitespace().next().unwrap_or_default().to_string(),
                ));
            }
            if !proc.is_running() {
                bail!("{name} exited; log:\n{}", proc.log_text());
            }
            Ok(None)
        })?;
        self.procs.push(KeelProc { role: role.to_string(), address, proc });
        Ok(self.procs.len() - 1)
    }

    pub fn proc(&mut self, name: &str) -> &mut KeelProc {
        self.procs
            .iter_mut()
            .find(|p| p.proc.name == name)
            .unwrap_or_else(|| panic!("no process named {name} in the sandbox"))
    }

    /// The process listening on `address`, if the sandbox started it.
    pub fn by_address(&mut self, address: &str) -> Option<&mut KeelProc> {
        self.procs.iter_mut().find(|p| p.address == address)
    }

    /// Runs a client verb (`keel --config <sandbox> ARGS`) and returns its output.
    pub fn keel(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(keel_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run keel")
    }

    /// Runs a client verb with `--output json` and parses stdout; fails with stderr otherwise.
    pub fn keel_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let out = self.keel(&full)?;
        if !out.status.success() {
            bail!("keel {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().rev().find(|l| l.trim_start().starts_with(['{', '['])).unwrap_or("");
        serde_json::from_str(last)
            .with_context(|| format!("keel {} printed no JSON: {stdout}", args.join(" ")))
    }

    /// Writes a job spec into the sandbox and returns its path.
    pub fn write_spec(&self, name: &str, yaml: &str) -> anyhow::Result<PathBuf> {
        self.write_file(&format!("{name}.yaml"), yaml)
    }

    /// Writes `text` to `file_name` in the sandbox (a SQL script: `job.sql`); returns its path.
    pub fn write_file(&self, file_name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(file_name);
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Writes a Flink SQL script as `<name>.sql` and submits it with `keel run [extra] FILE`;
    /// fails with keel's stderr when the run fails. Returns the script's path.
    pub fn run_sql(&self, name: &str, sql: &str, extra: &[&str]) -> anyhow::Result<PathBuf> {
        let path = self.write_file(&format!("{name}.sql"), sql)?;
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        args.push(path.to_str().unwrap_or_default());
        let out = self.keel(&args)?;
        if !out.status.success() {
            bail!("keel {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(path)
    }

    /// Writes a job spec into the sandbox and submits it with `keel run [extra args] FILE`;
    /// fails with keel's stderr when the run fails. Returns the spec's path.
    pub fn run_spec(&self, name: &str, yaml: &str, extra: &[&str]) -> anyhow::Result<PathBuf> {
        let path = self.write_spec(name, yaml)?;
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        let file = path.to_str().unwrap_or_default();
        args.push(file);
        let out = self.keel(&args)?;
        if !out.status.success() {
            bail!("keel {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(path)
    }

    /// `keel status JOB --output json`.
    pub fn status(&self, job: &str) -> anyhow::Result<serde_json::Value> {
        self.keel_json(&["status", job])
    }

    /// `keel cluster --output json`.
    pub fn cluster(&self) -> anyhow::Result<serde_json::Value> {
        self.keel_json(&["cluster"])
    }

    /// Waits until the job's state is `state`; returns its status.
    pub fn wait_job_state(
        &self,
        job: &str,
        state: &str,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        wait_until(&format!("job {job} to be {state}"), timeout, || {
            let s = self.status(job)?;
            if s["job"]["state"] == state {
                Ok(Some(s))
            } else {
                Err(anyhow!("job is {} ({})", s["job"]["state"], s["status_message"]))
            }
        })
    }

    /// Dumps every process log (for a failing test's output).
    pub fn dump_logs(&self) {
        for p in &self.procs {
            eprintln!("===== {} ({}) =====\n{}", p.proc.name, p.address, p.proc.log_text());
        }
    }
}

impl Drop for Sandbox {
    /// Stops the processes. A passed test's directories (the sandbox's, its etcd cluster's) are
    /// removed, unless `KEEL_TEST_KEEP` is set; a failed test's are kept for its logs.
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            self.dump_logs();
        }
        if failed {
            if let Some(raft) = &self.raft {
                for m in raft.members.iter().flatten() {
                    eprintln!("===== raft {} =====\n{}", m.name, m.log_text());
                }
            }
        }
        self.procs.clear();
        let etcd_dir = self.etcd.as_ref().map(|e| e.dir.clone());
        let raft_dir = self.raft.as_ref().and_then(|r| r.dir.parent().map(Path::to_path_buf));
        self.etcd = None;
        self.raft = None;
        if !failed && std::env::var_os("KEEL_TEST_KEEP").is_none() {
            for dir in std::iter::once(self.dir.clone()).chain(etcd_dir).chain(raft_dir) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// A job spec: datagen (unbounded unless `rows` is given) into a file sink in the sandbox.
pub fn datagen_to_file_spec(
    name: &str,
    parallelism: u32,
    rate: u32,
    rows: Option<u64>,
    out: &Path,
) -> String {
    let rows = rows.map(|r| format!("    number-of-rows: {r}\n")).unwrap_or_default();
    format!(
        "name: {name}\nparallelism: {parallelism}\nmaxParallelism: 128\nsources:\n  - name: numbers\n    connector: datagen\n    rows-per-second: {rate}\n{rows}sinks:\n  - name: out\n    connector: file\n    from: numbers\n    path: {}\n",
        out.display()
    )
}

/// Lines in every file of `dir` (a file sink's output), 0 when it cannot be read yet.
pub fn lines_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| std::fs::read_to_string(e.path()).map(|t| t.lines().count()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// The metrics address a TaskManager printed (`keel taskmanager metrics on <host:port>`).
pub fn metrics_address(sb: &mut Sandbox, name: &str) -> anyhow::Result<String> {
    let marker = "keel taskmanager metrics on ";
    let log = sb.proc(name).proc.log_text();
    let line =
        log.lines().find(|l| l.starts_with(marker)).context("no metrics line in the taskmanager's output")?;
    Ok(line[marker.len()..].trim().to_string())
}

/// `GET /metrics` at `address` (a TaskManager's metrics endpoint); the body.
pub fn scrape_metrics(address: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let mut stream =
        std::net::TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("an HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics answered {head}");
    }
    Ok(body.to_string())
}

/// The `task_id` labels in a TaskManager's `GET /metrics`: the tasks it runs.
pub fn metrics_tasks(address: &str) -> anyhow::Result<std::collections::BTreeSet<String>> {
    Ok(scrape_metrics(address)?
        .lines()
        .filter_map(|l| {
            l.split_once("task_id=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(id, _)| id.to_string())
        })
        .collect())
}

/// One completed checkpoint's `_metadata` file, as the tests look at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MetadataFile {
    pub checkpoint_id: u64,
    pub attempt: u64,
    /// Epoch of the JobManager leader that wrote it.
    pub epoch: u64,
    pub completed_at_ms: u64,
}

/// Every `_metadata` file of the job's checkpoints in the sandbox, by checkpoint id.
pub fn metadata_files(sb: &Sandbox, job_id: &str) -> anyhow::Result<Vec<MetadataFile>> {
    let dir = sb.dir.join("checkpoints").join(job_id);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path().join("_metadata");
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let m: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let field = |k: &str| m[k].as_u64().ok_or_else(|| anyhow!("{} has no {k}", path.display()));
        out.push(MetadataFile {
            checkpoint_id: field("checkpoint_id")?,
            attempt: field("attempt")?,
            epoch: field("epoch")?,
            completed_at_ms: field("completed_at_ms")?,
        });
    }
    out.sort_unstable();
    Ok(out)
}
