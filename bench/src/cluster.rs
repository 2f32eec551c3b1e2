//! A Keel cluster of real `keel` processes for the benchmark: one ResourceManager, one
//! JobManager and one TaskManager on the `local` HA backend in the benchmark's directory,
//! started the way the process-level tests start them (`tests/src/lib.rs`), and the client
//! verbs (`keel run`, `status`, `cancel`) with `--output json`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

/// Environment variables of the Kafka tooling that `keel` processes must not see: they read
/// every `KEEL_*` variable as a configuration key and refuse unknown ones.
const KAFKA_TOOLING_ENV: [&str; 3] = ["KEEL_KAFKA_LIBS", "KEEL_CACHE_DIR", "KEEL_TEST_KAFKA_JVM_OPTS"];

/// A command running `keel`, without [`KAFKA_TOOLING_ENV`].
fn keel_command(keel: &Path) -> Command {
    let mut cmd = Command::new(keel);
    for name in KAFKA_TOOLING_ENV {
        cmd.env_remove(name);
    }
    cmd
}

/// How long a role may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `keel` binary: `explicit`, else `$KEEL_BIN`, else `keel` next to this executable
/// (`target/release/keel` for `target/release/keel-bench`).
pub fn keel_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match explicit.or_else(|| std::env::var_os("KEEL_BIN").map(PathBuf::from)) {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .map(|d| d.join("keel"))
            .ok_or_else(|| anyhow!("this executable has no directory"))?,
    };
    if !path.is_file() {
        bail!(
            "keel binary not found at {}; build it with `cargo build --release -p keel` (scripts/bench.sh \
             does) or pass --keel-bin",
            path.display()
        );
    }
    Ok(path)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One `keel` role process, killed when dropped.
pub struct RoleProc {
    pub name: String,
    pub role: String,
    /// The `--set` flags it was started with (to start it again the same way).
    sets: Vec<String>,
    /// The RPC address it listens on (from its log).
    pub address: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for RoleProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What [`Cluster::start_with`] starts.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub jobmanagers: u32,
    pub task_managers: u32,
    /// Slots per TaskManager.
    pub slots: u32,
    /// The etcd binary: the cluster runs on the etcd HA backend with a one-member etcd of its
    /// own. `None`: the local backend (lock files in the cluster's directory).
    pub etcd: Option<PathBuf>,
    /// Further lines of the cluster's configuration file (`key: value`).
    pub extra: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions { jobmanagers: 1, task_managers: 1, slots: 1, etcd: None, extra: Vec::new() }
    }
}

/// A one-member etcd on loopback, killed when dropped.
struct Etcd {
    child: Child,
    endpoint: String,
}

impl Etcd {
    fn start(bin: &Path, dir: &Path) -> anyhow::Result<Etcd> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let client = format!("http://127.0.0.1:{}", free_port()?);
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let child = Command::new(bin)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("bench={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let endpoint = client.trim_start_matches("http://").to_string();
        let mut etcd = Etcd { child, endpoint };
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(&etcd.endpoint).is_err() {
            if let Some(status) = etcd.child.try_wait()? {
                bail!("etcd exited with {status}; its log: {}", dir.join("etcd.log").display());
            }
            if Instant::now() > deadline {
                bail!("etcd did not listen on {} within {START_TIMEOUT:?}", etcd.endpoint);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(etcd)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    keel: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    /// In start order; dropped in reverse (TaskManagers first).
    procs: Vec<RoleProc>,
    /// Dropped after the processes.
    _etcd: Option<Etcd>,
}

impl Cluster {
    /// Starts ResourceManager, JobManager and one TaskManager with `slots` slots, with the HA
    /// directory, checkpoints and logs under `dir`, and waits until the slots are free.
    pub fn start(keel: &Path, dir: &Path, slots: u32) -> anyhow::Result<Cluster> {
        Cluster::start_with(keel, dir, &ClusterOptions { slots, ..ClusterOptions::default() })
    }

    /// Starts a cluster as `options` say: etcd (when `etcd` is given) or the local HA backend in
    /// `dir`, one ResourceManager, `jobmanagers` JobManagers (the first one started becomes the
    /// leader, the others stand by), and `task_managers` TaskManagers `tm-1`, `tm-2`, ... with
    /// `slots` slots each; waits until every slot is free.
    pub fn start_with(keel: &Path, dir: &Path, options: &ClusterOptions) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut lines = vec![
            "high-availability.cluster-id: bench".to_string(),
            format!("high-availability.storageDir: \"{}\"", dir.join("ha").display()),
            format!("state.checkpoints.dir: \"{}\"", dir.join("checkpoints").display()),
            "resourcemanager.rpc.address: 127.0.0.1".to_string(),
            "jobmanager.rpc.address: 127.0.0.1".to_string(),
            "taskmanager.rpc.address: 127.0.0.1".to_string(),
            // Client fallbacks only: clients find the leaders through the HA backend.
            format!("resourcemanager.rpc.port: {}", free_port()?),
            format!("jobmanager.rpc.port: {}", free_port()?),
            "taskmanager.rpc.port: 0".to_string(),
            format!("taskmanager.numberOfTaskSlots: {}", options.slots),
        ];
        let mut etcd = None;
        match &options.etcd {
            None => lines.push("high-availability.type: local".to_string()),
            Some(bin) => {
                let server = Etcd::start(bin, &dir.join("etcd"))?;
                lines.push("high-availability.type: etcd".to_string());
                lines.push(format!("high-availability.etcd.endpoints: \"{}\"", server.endpoint));
                etcd = Some(server);
            }
        }
        lines.extend(options.extra.iter().cloned());
        let config = dir.join("keel.yaml");
        std::fs::write(&config, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", config.display()))?;
        let mut cluster = Cluster {
            keel: keel.to_path_buf(),
            config,
            dir: dir.to_path_buf(),
            procs: Vec::new(),
            _etcd: etcd,
        };
        cluster.spawn("resourcemanager", "rm", &["resourcemanager.rpc.port=0".into()])?;
        for i in 1..=options.jobmanagers.max(1) {
            cluster.spawn("jobmanager", &format!("jm-{i}"), &["jobmanager.rpc.port=0".into()])?;
        }
        for i in 1..=options.task_managers.max(1) {
            let name = format!("tm-{i}");
            cluster.spawn("taskmanager", &name, &[format!("taskmanager.id={name}")])?;
        }
        let total = u64::from(options.slots) * u64::from(options.task_managers.max(1));
        cluster.wait_free_slots(total, START_TIMEOUT)?;
        Ok(cluster)
    }

    fn spawn(&mut self, role: &str, name: &str, sets: &[String]) -> anyhow::Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = keel_command(&self.keel);
        cmd.arg(role).arg("--config").arg(&self.config);
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("starting {} {role}", self.keel.display()))?;
        let mut proc = RoleProc {
            name: name.to_string(),
            role: role.to_string(),
            sets: sets.to_vec(),
            address: String::new(),
            child,
            log,
        };
        let marker = format!("keel {role} listening on ");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&proc.log).unwrap_or_default();
            if let Some(rest) = text.lines().find_map(|l| l.strip_prefix(&marker)) {
                proc.address = rest.split_whitespace().next().unwrap_or_default().to_string();
                break;
            }
            if let Some(status) = proc.child.try_wait()? {
                bail!("{name} exited with {status} before listening; its log:\n{text}");
            }
            if Instant::now() > deadline {
                bail!("{name} did not listen within {START_TIMEOUT:?}; its log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.procs.push(proc);
        Ok(())
    }

    /// The TaskManager's process id.
    pub fn taskmanager_pid(&self) -> anyhow::Result<u32> {
        self.procs
            .iter()
            .find(|p| p.name.starts_with("tm"))
            .map(|p| p.child.id())
            .ok_or_else(|| anyhow!("the cluster has no TaskManager"))
    }

    /// The address (`host:port`) of the first TaskManager's `GET /metrics`, from the line
    /// `keel taskmanager metrics on ADDRESS` of its log.
    pub fn taskmanager_metrics_address(&self) -> anyhow::Result<String> {
        let tm = self
            .procs
            .iter()
            .find(|p| p.name.starts_with("tm"))
            .ok_or_else(|| anyhow!("the cluster has no TaskManager"))?;
        let text =
            std::fs::read_to_string(&tm.log).with_context(|| format!("reading {}", tm.log.display()))?;
        text.lines()
            .find_map(|l| l.strip_prefix("keel taskmanager metrics on "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{} names no metrics address", tm.log.display()))
    }

    /// The process ids of the role processes named `prefix*` (`tm`, `jm`).
    pub fn pids(&self, prefix: &str) -> Vec<u32> {
        self.procs.iter().filter(|p| p.name.starts_with(prefix)).map(|p| p.child.id()).collect()
    }

    /// The process id of the process named `name`.
    pub fn pid_of(&self, name: &str) -> anyhow::Result<u32> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.child.id())
            .ok_or_else(|| anyhow!("the cluster has no process named {name}"))
    }

    /// The name of the JobManager that leads now (`keel cluster`).
    pub fn jobmanager_leader(&self) -> anyhow::Result<String> {
        let cluster = self.keel_json(&["cluster"])?;
        let address = cluster["jobmanager"]["leader"].as_str().unwrap_or_default();
        self.procs
            .iter()
            .find(|p| p.role == "jobmanager" && p.address == address)
            .map(|p| p.name.clone())
            .ok_or_else(|| anyhow!("the JobManager leader {address:?} is not a process of this cluster"))
    }

    /// The TaskManagers (names) that run tasks of `job` (`keel status`).
    pub fn taskmanagers_of(&self, job: &str) -> anyhow::Result<Vec<String>> {
        let status = self.status(job)?;
        let mut names: Vec<String> = status["tasks"]
            .as_array()
            .map(|tasks| {
                tasks
                    .iter()
                    .filter(|t| t["state"] == "running")
                    .filter_map(|t| t["taskmanager_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// SIGKILL to the process named `name`, and waits for it to die.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("the cluster has no process named {name}"))?;
        p.child.kill().with_context(|| format!("killing {name}"))?;
        p.child.wait().with_context(|| format!("waiting for {name}"))?;
        Ok(())
    }

    /// SIGKILL to the role process `pid`, and waits for it to die.
    pub fn kill_pid(&mut self, pid: u32) -> anyhow::Result<()> {
        let name = self
            .procs
            .iter()
            .find(|p| p.child.id() == pid)
            .map(|p| p.name.clone())
            .ok_or_else(|| anyhow!("process {pid} is not a role process of this cluster"))?;
        self.kill(&name)
    }

    /// Starts again every process that has exited, the same way as before (a new log file
    /// `<name>.<n>.log` each time).
    pub fn restart_exited(&mut self) -> anyhow::Result<()> {
        let mut exited = Vec::new();
        let mut i = 0;
        while i < self.procs.len() {
            if self.procs[i].child.try_wait()?.is_some() {
                exited.push(self.procs.remove(i));
            } else {
                i += 1;
            }
        }
        for p in exited {
            let generation =
                (2..).find(|n| !self.dir.join(format!("{}.{n}.log", p.name)).exists()).unwrap_or(2);
            let old_log = p.log.clone();
            let renamed = self.dir.join(format!("{}.{generation}.log", p.name));
            std::fs::rename(&old_log, &renamed).with_context(|| format!("renaming {}", old_log.display()))?;
            self.spawn(&p.role.clone(), &p.name.clone(), &p.sets.clone())?;
        }
        Ok(())
    }

    /// Where each process logs.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        self.procs.iter().map(|p| (p.name.clone(), p.log.clone())).collect()
    }

    /// Fails when a role process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} exited with {status}; its log: {}", p.name, p.log.display());
            }
        }
        Ok(())
    }

    fn keel(&self, args: &[&str]) -> anyhow::Result<Output> {
        keel_command(&self.keel)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running keel")
    }

    /// Runs a client verb with `--output json` and parses the last JSON line it printed.
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

    pub fn wait_free_slots(&self, free: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = match self.keel_json(&["cluster"]) {
                Ok(c) => format!("{} free slots", c["slots"]["free"]),
                Err(e) => format!("{e:#}"),
            };
            if seen == format!("{free} free slots") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster did not show {free} free slots within {timeout:?}; last: {seen}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `keel run FILE`: submits the job and waits until it runs.
    pub fn run(&self, spec: &Path) -> anyhow::Result<()> {
        let path = spec.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", spec.display()))?;
        let out = self.keel(&["run", path])?;
        if !out.status.success() {
            bail!(
                "keel run {path} failed: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `keel status JOB --output json`.
    pub fn status(&self, job: &str) -> anyhow::Result<serde_json::Value> {
        self.keel_json(&["status", job])
    }

    /// `keel cancel JOB` (waits until its slots are free).
    pub fn cancel(&self, job: &str) -> anyhow::Result<()> {
        let out = self.keel(&["cancel", job])?;
        if !out.status.success() {
            bail!("keel cancel {job} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }
}
