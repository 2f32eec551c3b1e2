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
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for RoleProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    keel: PathBuf,
    config: PathBuf,
    /// In start order; dropped in reverse (TaskManager first).
    procs: Vec<RoleProc>,
}

impl Cluster {
    /// Starts ResourceManager, JobManager and one TaskManager with `slots` slots, with the HA
    /// directory, checkpoints and logs under `dir`, and waits until the slots are free.
    pub fn start(keel: &Path, dir: &Path, slots: u32) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lines = [
            "high-availability.type: local".to_string(),
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
            format!("taskmanager.numberOfTaskSlots: {slots}"),
        ];
        let config = dir.join("keel.yaml");
        std::fs::write(&config, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", config.display()))?;
        let mut cluster = Cluster { keel: keel.to_path_buf(), config, procs: Vec::new() };
        cluster.spawn(dir, "resourcemanager", "rm", &["resourcemanager.rpc.port=0".into()])?;
        cluster.spawn(dir, "jobmanager", "jm", &["jobmanager.rpc.port=0".into()])?;
        cluster.spawn(dir, "taskmanager", "tm-1", &["taskmanager.id=tm-1".into()])?;
        cluster.wait_free_slots(u64::from(slots), START_TIMEOUT)?;
        Ok(cluster)
    }

    fn spawn(&mut self, dir: &Path, role: &str, name: &str, sets: &[String]) -> anyhow::Result<()> {
        let log = dir.join(format!("{name}.log"));
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
        let mut proc = RoleProc { name: name.to_string(), child, log };
        let marker = format!("keel {role} listening on ");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&proc.log).unwrap_or_default();
            if text.lines().any(|l| l.starts_with(&marker)) {
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

    fn wait_free_slots(&self, free: u64, timeout: Duration) -> anyhow::Result<()> {
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
