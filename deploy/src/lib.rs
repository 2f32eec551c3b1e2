//! Running a Keel cluster.
//!
//! Layout:
//! - [`run_dev_cluster`]: `keel dev`, a local cluster of one ResourceManager, one JobManager and
//!   N TaskManagers as child processes of the `keel` binary, on the `local` HA backend by
//!   default (or etcd with `--ha etcd`, or three `keel ha-member` processes with `--ha raft`),
//!   each with its own log file; stops every child on Ctrl-C / SIGTERM, TaskManagers first
//!   and the Raft members last.
//! - [`kafka`]: the Apache Kafka broker `keel dev --demo` (or `--kafka`) starts beside it (one
//!   KRaft node on 127.0.0.1:9092), stopped last.
//! - `deploy/dev-cluster.yaml`, `deploy/demo-job.yaml`, `deploy/demo-kafka-job.yaml`: the dev
//!   cluster's configuration and the demo jobs (datagen -> files; Kafka -> Kafka exactly-once)
//!   (templates with `{dir}`-style placeholders filled in by `keel dev`).
//! - `deploy/systemd/`, `deploy/cluster/`: service units and an example three-machine
//!   configuration (see docs/deployment.md).

pub mod kafka;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const DEV_CONFIG: &str = include_str!("../dev-cluster.yaml");
const DEMO_JOB: &str = include_str!("../demo-job.yaml");
const DEMO_KAFKA_JOB: &str = include_str!("../demo-kafka-job.yaml");
/// Topics of the Kafka demo job (name, partitions).
const DEMO_TOPICS: [(&str, i32); 2] = [("people-in", 2), ("people-out", 2)];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HaChoice {
    Local,
    Etcd,
    /// Three `keel ha-member` processes (the embedded Raft store) on 127.0.0.1.
    Raft,
}

/// Members of the dev cluster's Raft store with `--ha raft`.
const DEV_RAFT_MEMBERS: u16 = 3;

/// Flags of `keel dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Directory for the cluster's config, HA metadata, logs and demo output.
    #[arg(long, default_value = ".keel-dev")]
    pub dir: PathBuf,
    /// HA backend: `local` (embedded, nothing to install), `etcd`, or `raft` (three
    /// `keel ha-member` processes of Keel's own Raft store, nothing to install).
    #[arg(long, value_enum, default_value = "local")]
    pub ha: HaChoice,
    /// First port of the Raft members with `--ha raft` (they take this and the next two).
    #[arg(long, default_value_t = 6130)]
    pub raft_port: u16,
    /// etcd endpoints for `--ha etcd` (comma-separated host:port).
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub etcd_endpoints: String,
    /// Number of TaskManagers.
    #[arg(long, default_value_t = 1)]
    pub taskmanagers: u32,
    /// Slots per TaskManager (the two demo jobs take two each; the rest leaves room for a
    /// handover upgrade or rescale of one, which runs both versions at once).
    #[arg(long, default_value_t = 8)]
    pub slots: u32,
    /// JobManager port.
    #[arg(long, default_value_t = 6123)]
    pub jobmanager_port: u16,
    /// ResourceManager port.
    #[arg(long, default_value_t = 6124)]
    pub resourcemanager_port: u16,
    /// Submit the demo jobs once the cluster is up: datagen -> files, and Kafka -> Kafka
    /// exactly-once on a local Apache Kafka broker (started unless --no-kafka).
    #[arg(long)]
    pub demo: bool,
    /// Start a local Apache Kafka broker (one KRaft node) also without --demo. Its jars come
    /// from scripts/install-kafka.sh; set KEEL_KAFKA_LIBS to their directory to skip it.
    #[arg(long)]
    pub kafka: bool,
    /// No Kafka broker, and no Kafka demo job.
    #[arg(long, conflicts_with = "kafka")]
    pub no_kafka: bool,
    /// Port of the Kafka broker on 127.0.0.1.
    #[arg(long, default_value_t = 9092)]
    pub kafka_port: u16,
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

/// Environment variables of the Kafka tooling (`scripts/install-kafka.sh`, keel-testkit) that
/// `keel` processes must not see: they read every `KEEL_*` variable as a configuration key and
/// refuse unknown ones.
const KAFKA_TOOLING_ENV: [&str; 2] = ["KEEL_KAFKA_LIBS", "KEEL_CACHE_DIR"];

/// `exe` as a command for a child of `keel dev`, without [`KAFKA_TOOLING_ENV`].
fn keel_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    for name in KAFKA_TOOLING_ENV {
        cmd.env_remove(name);
    }
    cmd
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
    let mut cmd = keel_command(exe);
    cmd.arg(role).arg("--config").arg(config);
    for s in set {
        cmd.arg("--set").arg(s);
    }
    if role == "taskmanager" && name != role {
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
    if args.ha == HaChoice::Raft {
        config = config.replace("high-availability.type: local", "high-availability.type: raft");
        let members: Vec<String> = (0..DEV_RAFT_MEMBERS)
            .map(|i| format!("{}=127.0.0.1:{}", i + 1, args.raft_port.saturating_add(i)))
            .collect();
        config.push_str(&format!("high-availability.raft.members: \"{}\"\n", members.join(",")));
    }
    let config_path = dir.join("keel.yaml");
    std::fs::write(&config_path, config)
        .with_context(|| format!("cannot write {}", config_path.display()))?;

    let want_kafka = (args.demo || args.kafka) && !args.no_kafka;
    let kafka_dir = dir.join("kafka");
    let start_kafka = async {
        if !want_kafka {
            return Ok(None);
        }
        let topics: &[(&str, i32)] = if args.demo { &DEMO_TOPICS } else { &[] };
        kafka::DevKafka::start(&kafka_dir, args.kafka_port, args.keep_state, topics).await.map(Some)
    };
    let mut children: Vec<ChildProc> = Vec::new();
    let start_roles = async {
        if args.ha == HaChoice::Raft {
            for i in 1..=DEV_RAFT_MEMBERS {
                let mut member_set = set.clone();
                member_set.push(format!("high-availability.raft.member-id={i}"));
                let name = format!("ha-member-{i}");
                children.push(spawn_role(&exe, "ha-member", &name, &config_path, &member_set, &logs).await?);
            }
        }
        children
            .push(spawn_role(&exe, "resourcemanager", "resourcemanager", &config_path, &set, &logs).await?);
        children.push(spawn_role(&exe, "jobmanager", "jobmanager", &config_path, &set, &logs).await?);
        for i in 0..args.taskmanagers {
            let name = format!("taskmanager-{i}");
            children.push(spawn_role(&exe, "taskmanager", &name, &config_path, &set, &logs).await?);
        }
        anyhow::Ok(())
    };
    // The broker (seconds of JVM start-up) starts beside the Keel processes.
    let started = async {
        let (roles, broker) = tokio::join!(start_roles, start_kafka);
        (roles, broker)
    };
    let (roles, broker) = tokio::select! {
        r = started => r,
        _ = shutdown.cancelled() => (Ok(()), Ok(None)),
    };
    let mut broker = match (roles, broker) {
        (Ok(()), Ok(broker)) => broker,
        (roles, broker) => {
            stop_all(&mut children).await;
            let broker_error = match broker {
                Ok(Some(mut b)) => {
                    b.stop().await;
                    None
                }
                Ok(None) => None,
                Err(e) => Some(anyhow::Error::new(e).context("starting the dev Kafka broker")),
            };
            return Err(roles
                .err()
                .or(broker_error)
                .unwrap_or_else(|| anyhow::anyhow!("the dev cluster did not start")));
        }
    };
    if shutdown.is_cancelled() {
        stop_all(&mut children).await;
        if let Some(b) = broker.as_mut() {
            b.stop().await;
        }
        return Ok(());
    }

    println!(
        "keel dev cluster is up ({} HA, directory {dir_s})",
        match args.ha {
            HaChoice::Local => "local",
            HaChoice::Etcd => "etcd",
            HaChoice::Raft => "raft",
        }
    );
    println!("  {:<16} {:>7}  {:<21}  LOG", "PROCESS", "PID", "ADDRESS");
    for c in &children {
        println!("  {:<16} {:>7}  {:<21}  {}", c.role, c.child.id().unwrap_or(0), c.address, c.log.display());
    }
    if let Some(b) = &broker {
        println!("  {:<16} {:>7}  {:<21}  {}", "kafka", b.pid().unwrap_or(0), b.bootstrap, b.log.display());
    }
    let client_hint = format!("{} --config {}", exe.display(), config_path.display());
    println!("\nclient verbs: {client_hint} <cluster|list|status JOB|run FILE|cancel JOB>");

    if args.demo {
        run_demo(&exe, &config_path, &dir_s, &client_hint, broker.as_ref()).await?;
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
                if let Some(status) = broker.as_mut().and_then(|b| b.exited()) {
                    println!("kafka exited ({status}); its log: {}", kafka_dir.display());
                    broker = None;
                }
            }
        }
    }
    println!("stopping the dev cluster");
    stop_all(&mut children).await;
    // The broker last: the Kafka demo's sinks abort their transactions as they stop.
    if let Some(b) = broker.as_mut() {
        if b.stop().await {
            println!("  kafka stopped");
        } else {
            println!("  kafka killed");
        }
    }
    Ok(())
}

/// Submits the demo jobs and prints how to watch them.
async fn run_demo(
    exe: &Path,
    config_path: &Path,
    dir_s: &str,
    client_hint: &str,
    broker: Option<&kafka::DevKafka>,
) -> anyhow::Result<()> {
    let mut jobs = vec![("demo", fill(DEMO_JOB, &[("dir", dir_s.to_string())]))];
    if let Some(b) = broker {
        jobs.push(("demo-kafka", fill(DEMO_KAFKA_JOB, &[("bootstrap", b.bootstrap.clone())])));
    }
    let mut running = Vec::new();
    for (name, spec) in jobs {
        let path = Path::new(dir_s).join(format!("{name}-job.yaml"));
        std::fs::write(&path, spec).with_context(|| format!("cannot write {}", path.display()))?;
        // With --keep-state the job of the previous run is recovered: keep it.
        let known = match keel_command(exe)
            .arg("--config")
            .arg(config_path)
            .args(["--output", "json", "status", name])
            .stderr(Stdio::null())
            .output()
            .await
        {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                let state = text
                    .lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .and_then(|v| v["job"]["state"].as_str().map(str::to_ascii_lowercase))
                    .unwrap_or_default();
                !matches!(state.as_str(), "" | "canceled" | "failed" | "finished")
            }
            _ => false,
        };
        if known {
            println!("\nthe demo job {name} of the previous run was recovered; not submitted again");
            running.push(name);
            continue;
        }
        println!("\nrunning the demo job {name} ({})", path.display());
        let status = keel_command(exe)
            .arg("--config")
            .arg(config_path)
            .arg("run")
            .arg(&path)
            .status()
            .await
            .with_context(|| format!("cannot run the demo job {name}"))?;
        if status.success() {
            running.push(name);
        } else {
            println!("the demo job {name} did not start ({status}); see the logs above");
        }
    }
    if running.is_empty() {
        return Ok(());
    }
    let _ = keel_command(exe).arg("--config").arg(config_path).arg("cluster").status().await;
    if running.contains(&"demo") {
        println!(
            "\ndemo (datagen -> files): {dir_s}/demo-output/part-*  (tail -f them to watch the numbers)"
        );
        println!("  status: {client_hint} status demo");
    }
    if let (Some(b), true) = (broker, running.contains(&"demo-kafka")) {
        println!(
            "\ndemo-kafka (Kafka people-in -> people-out, CSV id,name,age; checkpoints every 1 s, exactly-once sink):"
        );
        println!("  status: {client_hint} status demo-kafka");
        println!("  produce people to people-in, one line each (type lines, Ctrl-D ends):");
        println!("    {}", b.tool_command("org.apache.kafka.tools.ConsoleProducer", "--topic people-in"));
        println!("  or two at once:");
        println!(
            "    printf '1,Ada,36\\n2,Linus,21\\n' | {}",
            b.tool_command("org.apache.kafka.tools.ConsoleProducer", "--topic people-in")
        );
        println!(
            "  read people-out as committed (records appear when the next checkpoint commits, about 1 s):"
        );
        println!(
            "    {}",
            b.tool_command(
                "org.apache.kafka.tools.consumer.ConsoleConsumer",
                "--topic people-out --from-beginning --isolation-level read_committed"
            )
        );
    }
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
