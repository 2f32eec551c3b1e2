//! Running a Keel cluster.
//!
//! Layout:
//! - [`run_dev_cluster`]: `keel dev`, a local cluster of one ResourceManager, one JobManager and
//!   N TaskManagers as child processes of the `keel` binary, on the `local` HA backend by
//!   default (or etcd with `--ha etcd`), each with its own log file; stops every child on
//!   Ctrl-C / SIGTERM, TaskManagers first.
//! - `deploy/dev-cluster.yaml`, `deploy/demo-job.yaml`: the dev cluster's configuration and demo
//!   job (templates with `{dir}`-style placeholders filled in by `keel dev`).
//! - `deploy/systemd/`, `deploy/cluster/`: service units and an example three-machine
//!   configuration (see docs/deployment.md).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const DEV_CONFIG: &str = include_str!("../dev-cluster.yaml");
const DEMO_JOB: &str = include_str!("../demo-job.yaml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HaChoice {
    Local,
    Etcd,
}

/// Flags of `keel dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Directory for the cluster's config, HA metadata, logs and demo output.
    #[arg(long, default_value = ".keel-dev")]
    pub dir: PathBuf,
    /// HA backend: `local` (embedded, nothing to install) or `etcd`.
    #[arg(long, value_enum, default_value = "local")]
    pub ha: HaChoice,
    /// etcd endpoints for `--ha etcd` (comma-separated host:port).
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub etcd_endpoints: String,
    /// Number of TaskManagers.
    #[arg(long, default_value_t = 1)]
    pub taskmanagers: u32,
    /// Slots per TaskManager.
    #[arg(long, default_value_t = 2)]
    pub slots: u32,
    /// JobManager port.
    #[arg(long, default_value_t = 6123)]
    pub jobmanager_port: u16,
    /// ResourceManager port.
    #[arg(long, default_value_t = 6124)]
    pub resourcemanager_port: u16,
    /// Submit the demo job once the cluster is up.
    #[arg(long)]
    pub demo: bool,
    /// Keep the HA metadata of an earlier run (jobs are recovered) instead of starting clean
    /// (local: the HA directory is kept; etcd: the cluster id `dev` is reused).
    #[arg(long)]
    pub keep_state: bool,
    /// Stop the cluster after this many seconds instead of waiting for Ctrl-C (for scripts).
    #[arg(long)]
    pub exit_after: Option<u64>,
}

struct ChildProc {
    role: String,
    child: Child,
    address: String,
    log: PathBuf,
}

fn fill(template: &str, pairs: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (k, v) in pairs {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// Waits until `log` holds the line `keel <role> listening on <address>` and returns the
/// address; fails if the child exits first or nothing comes within `timeout`.
pub async fn wait_for_listening(
    child: &mut Child,
    role: &str,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<String> {
    let marker = format!("keel {role} listening on ");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(log) {
            if let Some(line) = text.lines().find(|l| l.starts_with(&marker)) {
                let rest = &line[marker.len()..];
                return Ok(rest.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
        if let Some(status) = child.try_wait().context("cannot wait for child")? {
            bail!("{role} exited with {status} before listening; last log lines:\n{}", tail(log, 15));
        }
        if Instant::now() > deadline {
            bail!("{role} did not start listening within {timeout:?}; last log lines:\n{}", tail(log, 15));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `n` lines of a file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`) to a process with the system's
/// `kill` command.
pub async fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("cannot run kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed ({status})");
    }
    Ok(())
}

async fn spawn_role(
    exe: &Path,
    role: &str,
    name: &str,
    config: &Path,
    set: &[String],
    logs: &Path,
) -> anyhow::Result<ChildProc> {
    let log = logs.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).with_context(|| format!("cannot create log {}", log.display()))?;
    let err = file.try_clone().context("cannot share the log file")?;
    let mut cmd = Command::new(exe);
    cmd.arg(role).arg("--config").arg(config);
    for s in set {
        cmd.arg("--set").arg(s);
    }
    if name != role {
        cmd.arg("--set").arg(format!("taskmanager.id={name}"));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} {role}", exe.display()))?;
    let address = wait_for_listening(&mut child, role, &log, Duration::from_secs(60)).await?;
    Ok(ChildProc { role: name.to_string(), child, address, log })
}

/// `keel dev`: starts the cluster, prints where everything is, optionally runs the demo job,
/// and stops every child on shutdown.
pub async fn run_dev_cluster(
    args: DevArgs,
    set: Vec<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the keel binary")?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = args.dir.canonicalize().with_context(|| format!("cannot resolve {}", args.dir.display()))?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    if !args.keep_state {
        let ha = dir.join("ha");
        if ha.exists() {
            std::fs::remove_dir_all(&ha).with_context(|| format!("cannot clear {}", ha.display()))?;
        }
    }
    let dir_s = dir.display().to_string();
    let mut config = fill(
        DEV_CONFIG,
        &[
            ("dir", dir_s.clone()),
            ("slots", args.slots.to_string()),
            ("rm_port", args.resourcemanager_port.to_string()),
            ("jm_port", args.jobmanager_port.to_string()),
        ],
    );
    if args.ha == HaChoice::Etcd {
        config = config.replace("high-availability.type: local", "high-availability.type: etcd");
        if !args.keep_state {
            // A fresh cluster id per run: jobs of an earlier run stay in etcd but are not recovered.
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            config = config.replace(
                "high-availability.cluster-id: dev",
                &format!("high-availability.cluster-id: dev-{secs}"),
            );
        }
        config.push_str(&format!("high-availability.etcd.endpoints: \"{}\"\n", args.etcd_endpoints));
    }
    let config_path = dir.join("keel.yaml");
    std::fs::write(&config_path, config)
        .with_context(|| format!("cannot write {}", config_path.display()))?;

    let mut children: Vec<ChildProc> = Vec::new();
    let started = async {
        children
            .push(spawn_role(&exe, "resourcemanager", "resourcemanager", &config_path, &set, &logs).await?);
        children.push(spawn_role(&exe, "jobmanager", "jobmanager", &config_path, &set, &logs).await?);
        for i in 0..args.taskmanagers {
            let name = format!("taskmanager-{i}");
            children.push(spawn_role(&exe, "taskmanager", &name, &config_path, &set, &logs).await?);
        }
        anyhow::Ok(())
    };
    let result = tokio::select! {
        r = started => r,
        _ = shutdown.cancelled() => Ok(()),
    };
    if let Err(e) = result {
        stop_all(&mut children).await;
        return Err(e);
    }

    println!(
        "keel dev cluster is up ({} HA, directory {dir_s})",
        match args.ha {
            HaChoice::Local => "local",
            HaChoice::Etcd => "etcd",
        }
    );
    println!("  {:<16} {:>7}  {:<21}  LOG", "PROCESS", "PID", "ADDRESS");
    for c in &children {
        println!("  {:<16} {:>7}  {:<21}  {}", c.role, c.child.id().unwrap_or(0), c.address, c.log.display());
    }
    let client_hint = format!("{} --config {}", exe.display(), config_path.display());
    println!("\nclient verbs: {client_hint} <cluster|list|status JOB|run FILE|cancel JOB>");

    if args.demo {
        let demo = fill(DEMO_JOB, &[("dir", dir_s.clone())]);
        let demo_path = dir.join("demo-job.yaml");
        std::fs::write(&demo_path, demo).with_context(|| format!("cannot write {}", demo_path.display()))?;
        println!("\nrunning the demo job ({})", demo_path.display());
        let status = Command::new(&exe)
            .arg("--config")
            .arg(&config_path)
            .arg("run")
            .arg(&demo_path)
            .status()
            .await
            .context("cannot run the demo job")?;
        if status.success() {
            let _ = Command::new(&exe).arg("--config").arg(&config_path).arg("cluster").status().await;
            println!("\ndemo output: {}/demo-output/part-*  (tail -f it to watch the numbers)", dir_s);
            println!("demo status: {client_hint} status demo");
        } else {
            println!("the demo job did not start ({status}); see the logs above");
        }
    }
    println!("\npress Ctrl-C to stop the cluster");

    let exit_after = async {
        match args.exit_after {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(exit_after);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = &mut exit_after => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for c in children.iter_mut() {
                    if let Ok(Some(status)) = c.child.try_wait() {
                        println!("{} exited ({status}); its log: {}", c.role, c.log.display());
                    }
                }
                children.retain_mut(|c| !matches!(c.child.try_wait(), Ok(Some(_))));
            }
        }
    }
    println!("stopping the dev cluster");
    stop_all(&mut children).await;
    Ok(())
}

/// Stops children in reverse start order: SIGTERM, then SIGKILL after 10 s.
async fn stop_all(children: &mut Vec<ChildProc>) {
    while let Some(mut c) = children.pop() {
        if let Some(pid) = c.child.id() {
            if signal(pid, "TERM").await.is_ok()
                && tokio::time::timeout(Duration::from_secs(10), c.child.wait()).await.is_ok()
            {
                println!("  {} stopped", c.role);
                continue;
            }
        }
        let _ = c.child.kill().await;
        println!("  {} killed", c.role);
    }
}
