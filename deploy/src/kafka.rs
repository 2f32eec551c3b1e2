//! The Apache Kafka broker of `keel dev`: one KRaft node (broker and controller) on
//! 127.0.0.1, its files under `<dir>/kafka` ([`keel_testkit::KafkaLayout`] writes them and
//! gives the command line, as for the tests and the chaos suite), run as a child of `keel dev`.
//!
//! The broker stops with the cluster (SIGTERM, a controlled shutdown, then SIGKILL after
//! [`STOP_TIMEOUT`]) and dies with `keel dev` however that ends: beside the JVM runs a small
//! watchdog (`sh`) reading a pipe only `keel dev` holds; when the pipe closes it kills the JVM.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use keel_testkit::{KafkaLayout, KafkaNodeAddress};
use tokio::process::{Child, ChildStdin, Command};

/// How long the broker may take to start (JVM start and KRaft election; tens of seconds on a
/// busy 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a controlled shutdown may take before the JVM is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The line the broker logs when it serves clients.
const STARTED_LINE: &str = "Kafka Server started";

/// Why the dev broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevKafkaError {
    #[error("port {port} on 127.0.0.1 is in use (another Kafka?); pass --kafka-port or --no-kafka")]
    PortInUse { port: u16 },
    #[error("cannot prepare the broker's files in {dir}: {source:#}")]
    Prepare { dir: PathBuf, source: anyhow::Error },
    #[error("cannot start the broker ({java}): {source}; is Java 17 installed? (scripts/install-deps.sh)")]
    Spawn { java: PathBuf, source: std::io::Error },
    #[error("the broker exited with {status} before it started; last log lines:\n{tail}")]
    Exited { status: std::process::ExitStatus, tail: String },
    #[error("the broker did not start within {timeout:?}; last log lines:\n{tail}")]
    StartTimeout { timeout: Duration, tail: String },
    #[error("cannot create topic {topic}: {source:#}")]
    Topic { topic: String, source: anyhow::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The running dev broker.
pub struct DevKafka {
    java: Child,
    /// Kills the JVM when `keel dev` is gone (its stdin closes); killed first on a clean stop.
    watchdog: Child,
    /// The write end of the watchdog's pipe: held, never written.
    _pipe: Option<ChildStdin>,
    pub bootstrap: String,
    pub log: PathBuf,
    /// The directory of Kafka's jars (its console tools run from there too).
    pub libs: PathBuf,
}

impl DevKafka {
    /// Starts the broker on `127.0.0.1:port` with its files under `dir` (emptied first unless
    /// `keep_state`), waits until it serves clients and creates `topics` (name, partitions;
    /// existing ones are kept).
    pub async fn start(
        dir: &Path,
        port: u16,
        keep_state: bool,
        topics: &[(&str, i32)],
    ) -> Result<DevKafka, DevKafkaError> {
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(DevKafkaError::PortInUse { port });
        }
        if !keep_state && dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        let prepare = |source: anyhow::Error| DevKafkaError::Prepare { dir: dir.to_path_buf(), source };
        let libs = keel_testkit::kafka_libs().map_err(prepare)?;
        let layout = KafkaLayout::new(
            dir,
            vec![KafkaNodeAddress {
                id: 1,
                host: "127.0.0.1".into(),
                port,
                controller_port: keel_testkit::free_port(),
            }],
        );
        let files = layout.clone();
        tokio::task::spawn_blocking(move || files.write_and_format())
            .await
            .map_err(|e| prepare(e.into()))?
            .map_err(prepare)?;
        let log = layout.log_path(1);
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let mut command = layout.command(1).map_err(prepare)?;
        command.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        let java = Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DevKafkaError::Spawn { java: keel_testkit::java_binary(), source })?;
        let pid = java.id().unwrap_or_default();
        let mut watchdog = Command::new("sh")
            .args(["-c", "read _ignored; kill -9 \"$1\" 2>/dev/null"])
            .arg("keel-dev-kafka-watchdog")
            .arg(pid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pipe = watchdog.stdin.take();
        let mut kafka = DevKafka { java, watchdog, _pipe: pipe, bootstrap: layout.bootstrap(), log, libs };
        tracing::info!(pid, bootstrap = %kafka.bootstrap, "dev kafka broker starting");
        if let Err(e) = kafka.wait_started().await {
            kafka.stop().await;
            return Err(e);
        }
        for &(topic, partitions) in topics {
            if let Err(e) = create_topic(&kafka.bootstrap, topic, partitions).await {
                kafka.stop().await;
                return Err(e);
            }
        }
        Ok(kafka)
    }

    async fn wait_started(&mut self) -> Result<(), DevKafkaError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.lines().any(|l| l.contains(STARTED_LINE)) {
                return Ok(());
            }
            if let Some(status) = self.java.try_wait()? {
                return Err(DevKafkaError::Exited { status, tail: crate::tail(&self.log, 20) });
            }
            if Instant::now() > deadline {
                return Err(DevKafkaError::StartTimeout {
                    timeout: START_TIMEOUT,
                    tail: crate::tail(&self.log, 20),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The JVM's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.java.id()
    }

    /// Has the broker exited? (`Some(status)` once.)
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.java.try_wait().ok().flatten()
    }

    /// Controlled shutdown (SIGTERM), SIGKILL after [`STOP_TIMEOUT`]. True when it stopped by
    /// itself.
    pub async fn stop(&mut self) -> bool {
        let _ = self.watchdog.kill().await;
        let Some(pid) = self.java.id() else {
            return true;
        };
        if crate::signal(pid, "TERM").await.is_ok()
            && tokio::time::timeout(STOP_TIMEOUT, self.java.wait()).await.is_ok()
        {
            return true;
        }
        let _ = self.java.kill().await;
        false
    }

    /// A Kafka command-line tool (`org.apache.kafka.tools.*`) run from the broker's jars, as a
    /// command line to copy.
    pub fn tool_command(&self, class: &str, args: &str) -> String {
        format!("java -cp '{}/*' {class} --bootstrap-server {} {args}", self.libs.display(), self.bootstrap)
    }
}

/// Creates `topic` unless it exists, retrying while the broker settles.
async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<(), DevKafkaError> {
    let (bootstrap_owned, topic_owned) = (bootstrap.to_string(), topic.to_string());
    let result = tokio::task::spawn_blocking(move || {
        keel_testkit::wait_until(
            &format!("topic {topic_owned} to be created"),
            Duration::from_secs(60),
            || match keel_testkit::create_topic(&bootstrap_owned, &topic_owned, partitions) {
                Ok(()) => Ok(Some(())),
                Err(e) if format!("{e:#}").contains("already exists") => Ok(Some(())),
                Err(e) => Err(e),
            },
        )
    })
    .await;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(DevKafkaError::Topic { topic: topic.to_string(), source }),
        Err(e) => Err(DevKafkaError::Topic { topic: topic.to_string(), source: e.into() }),
    }
}
