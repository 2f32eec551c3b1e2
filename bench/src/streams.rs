//! Kafka Streams instances for the benchmark: the project's own Streams application
//! (`scripts/streams`, built by `scripts/install-streams.sh` into the cache directory), each
//! instance a JVM started directly as a child process (its pid is the JVM's), logging to a file.
//!
//! An instance prints one line per state change of its `KafkaStreams` object on stdout
//! (`keel-streams state=RUNNING previous=REBALANCING at_ms=1733400000000`);
//! [`StreamsInstance::start`] returns once the first `state=RUNNING` is in the log. Instances of
//! one `application.id` form one consumer group and share the input partitions; killing one
//! hands its partitions to the others at the next rebalance.
//!
//! Kafka Streams gives an output record its input record's timestamp (not the time it was
//! written). To measure a rate from output timestamps, create the output topic with
//! `message.timestamp.type=LogAppendTime`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

/// The main class of the Streams application.
pub const MAIN_CLASS: &str = "dev.keel.streams.BenchApp";
/// Heap (`-Xmx`) of an instance unless [`StreamsOptions::heap`] says otherwise.
pub const DEFAULT_HEAP: &str = "512m";
/// How long an instance may take from `java` to its first RUNNING (JVM start, group join and
/// for exactly-once the producers' `initTransactions`, on a loaded 2-core machine).
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a SIGTERM'd instance may take to close before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The built application.
#[derive(Debug, Clone)]
pub struct StreamsApp {
    /// The directory holding the application's jar and every dependency jar.
    pub libs: PathBuf,
    /// `<libs>/*`: the `java -cp` argument.
    pub classpath: String,
    /// The version of `org.apache.kafka:kafka-streams` (from the jar's file name).
    pub kafka_streams_version: String,
}

/// Builds the application unless the cache has it (`scripts/install-streams.sh` under
/// `repo_root`; Maven fetches from Maven Central on the first run) and returns where it is.
pub fn install(repo_root: &Path) -> anyhow::Result<StreamsApp> {
    let script = repo_root.join("scripts/install-streams.sh");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}): the Kafka Streams application was not built", script.display(), out.status);
    }
    let printed = String::from_utf8_lossy(&out.stdout);
    let libs = PathBuf::from(printed.trim());
    if !libs.is_dir() {
        bail!("{} printed {:?}, which is not a directory", script.display(), printed.trim());
    }
    StreamsApp::from_libs(libs)
}

impl StreamsApp {
    /// The application built into `libs` (what `scripts/install-streams.sh` printed).
    pub fn from_libs(libs: PathBuf) -> anyhow::Result<StreamsApp> {
        let names: Vec<String> = std::fs::read_dir(&libs)
            .with_context(|| format!("listing {}", libs.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !names.iter().any(|n| n == "keel-streams-bench.jar") {
            bail!("{} has no keel-streams-bench.jar: run scripts/install-streams.sh", libs.display());
        }
        let kafka_streams_version = names
            .iter()
            .find_map(|n| kafka_streams_version(n))
            .ok_or_else(|| anyhow!("{} has no kafka-streams-<version>.jar", libs.display()))?;
        let classpath = format!("{}/*", libs.display());
        Ok(StreamsApp { libs, classpath, kafka_streams_version })
    }
}

/// `4.4.0` from `kafka-streams-4.4.0.jar` (not from `kafka-streams-scala_...` or test jars).
pub fn kafka_streams_version(jar: &str) -> Option<String> {
    let version = jar.strip_prefix("kafka-streams-")?.strip_suffix(".jar")?;
    version
        .chars()
        .next()
        .filter(char::is_ascii_digit)
        .filter(|_| version.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
        .map(|_| version.to_string())
}

/// The job an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamsJob {
    /// Every record passed on unchanged (byte arrays in and out).
    PassThrough,
    /// JSON `{"id","name","age"}` in, `age >= 18` kept, `{"id","name"}` out.
    FilterProjection,
}

impl From<crate::workload::JobKind> for StreamsJob {
    fn from(kind: crate::workload::JobKind) -> StreamsJob {
        match kind {
            crate::workload::JobKind::PassThrough => StreamsJob::PassThrough,
            crate::workload::JobKind::FilterProjection => StreamsJob::FilterProjection,
        }
    }
}

impl StreamsJob {
    /// The application's `--job` argument.
    pub fn as_arg(self) -> &'static str {
        match self {
            StreamsJob::PassThrough => "pass-through",
            StreamsJob::FilterProjection => "filter-projection",
        }
    }
}

/// How to start an instance.
#[derive(Debug, Clone)]
pub struct StreamsOptions {
    /// The instance's log (`<name>.log`) and state directory (`<name>-state`) go here.
    pub dir: PathBuf,
    pub bootstrap: String,
    /// Kafka Streams' `application.id`: the consumer group, and the prefix of transactional ids.
    pub application_id: String,
    pub input: String,
    pub output: String,
    /// `processing.guarantee`: `exactly_once_v2` when true, else `at_least_once`.
    pub exactly_once: bool,
    /// `commit.interval.ms` (Kafka Streams' checkpoint: offsets committed, for exactly-once the
    /// transaction committed).
    pub commit_interval_ms: u64,
    /// `num.stream.threads`.
    pub threads: u32,
    pub kind: StreamsJob,
    /// `-Xmx` of the JVM.
    pub heap: String,
    /// Further JVM options (before the main class).
    pub jvm_opts: Vec<String>,
    /// Further Kafka Streams, consumer or producer settings (`--config key=value`), e.g.
    /// `("session.timeout.ms", "10000")` or `("group.protocol", "streams")`.
    pub configs: Vec<(String, String)>,
}

impl StreamsOptions {
    /// Exactly-once v2, a 1 s commit interval (the benchmark's 1 s checkpoints), one thread,
    /// [`DEFAULT_HEAP`], Kafka Streams' defaults for everything else.
    pub fn new(
        dir: &Path,
        bootstrap: &str,
        application_id: &str,
        input: &str,
        output: &str,
        kind: StreamsJob,
    ) -> StreamsOptions {
        StreamsOptions {
            dir: dir.to_path_buf(),
            bootstrap: bootstrap.to_string(),
            application_id: application_id.to_string(),
            input: input.to_string(),
            output: output.to_string(),
            exactly_once: true,
            commit_interval_ms: 1000,
            threads: 1,
            kind,
            heap: DEFAULT_HEAP.to_string(),
            jvm_opts: Vec::new(),
            configs: Vec::new(),
        }
    }

    /// The `java` arguments that run instance `name` of `app` (after the `java` binary).
    pub fn java_args(&self, app: &StreamsApp, name: &str) -> Vec<String> {
        let guarantee = if self.exactly_once { "exactly_once_v2" } else { "at_least_once" };
        let mut args = vec![format!("-Xmx{}", self.heap)];
        args.extend(self.jvm_opts.iter().cloned());
        args.extend(["-cp".to_string(), app.classpath.clone(), MAIN_CLASS.to_string()]);
        let state_dir = self.dir.join(format!("{name}-state"));
        for (flag, value) in [
            ("--bootstrap", self.bootstrap.clone()),
            ("--application-id", self.application_id.clone()),
            ("--input", self.input.clone()),
            ("--output", self.output.clone()),
            ("--job", self.kind.as_arg().to_string()),
            ("--state-dir", state_dir.display().to_string()),
            ("--guarantee", guarantee.to_string()),
            ("--commit-interval-ms", self.commit_interval_ms.to_string()),
            ("--threads", self.threads.to_string()),
        ] {
            args.extend([flag.to_string(), value]);
        }
        for (k, v) in &self.configs {
            args.extend(["--config".to_string(), format!("{k}={v}")]);
        }
        args
    }
}

/// One state change of an instance, as it logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// `CREATED`, `REBALANCING`, `RUNNING`, `PENDING_SHUTDOWN`, `NOT_RUNNING`,
    /// `PENDING_ERROR`, `ERROR` (Kafka Streams' `KafkaStreams.State`).
    pub state: String,
    pub previous: String,
    /// The instance's wall clock at the change, ms since the epoch.
    pub at_ms: i64,
    /// On RUNNING: the instance's active tasks, sorted (`0_1` reads input partition 1).
    pub tasks: Option<Vec<String>>,
}

impl StateChange {
    /// The input partitions of the active tasks (task `0_p`: partition `p` of the one input).
    pub fn partitions(&self) -> Vec<u32> {
        let tasks = self.tasks.as_deref().unwrap_or_default();
        tasks.iter().filter_map(|t| t.split_once('_')).filter_map(|(_, p)| p.parse().ok()).collect()
    }
}

/// A `keel-streams state=NEW previous=OLD at_ms=MILLIS [tasks=0_0,0_1]` line; `None` for any
/// other line.
pub fn parse_state_line(line: &str) -> Option<StateChange> {
    let rest = line.trim_end().strip_prefix("keel-streams ")?;
    let (mut state, mut previous, mut at_ms, mut tasks) = (None, None, None, None);
    for field in rest.split(' ') {
        let (key, value) = field.split_once('=')?;
        let name = !value.is_empty() && value.chars().all(|c| c.is_ascii_uppercase() || c == '_');
        match key {
            "state" if name => state = Some(value.to_string()),
            "previous" if name => previous = Some(value.to_string()),
            "at_ms" => at_ms = Some(value.parse().ok()?),
            "tasks" => {
                let ids: Vec<String> =
                    value.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect();
                let number = |n: &str| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit());
                if !ids.iter().all(|t| t.split_once('_').is_some_and(|(a, b)| number(a) && number(b))) {
                    return None;
                }
                tasks = Some(ids);
            }
            _ => return None,
        }
    }
    Some(StateChange { state: state?, previous: previous?, at_ms: at_ms?, tasks })
}

/// Every state change in a log's text, in order.
pub fn state_changes(log: &str) -> Vec<StateChange> {
    log.lines().filter_map(parse_state_line).collect()
}

/// A running instance; dropping it kills it. Beside the JVM runs a small watchdog (`sh`) that
/// kills it when this process is gone however it ended (Ctrl-C included): it reads a pipe whose
/// other end only this process holds.
pub struct StreamsInstance {
    pub name: String,
    child: Child,
    watchdog: Option<Child>,
    pid: u32,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl StreamsInstance {
    /// Starts instance `name` and returns once it logged RUNNING (within [`START_TIMEOUT`]);
    /// fails with the log's tail when it exits or does not get there.
    pub fn start(app: &StreamsApp, opts: &StreamsOptions, name: &str) -> anyhow::Result<StreamsInstance> {
        let mut instance = StreamsInstance::spawn(app, opts, name)?;
        instance.wait_running(0, START_TIMEOUT)?;
        Ok(instance)
    }

    /// Starts instance `name` and returns at once (to start several side by side; then
    /// [`StreamsInstance::wait_running`] each).
    pub fn spawn(app: &StreamsApp, opts: &StreamsOptions, name: &str) -> anyhow::Result<StreamsInstance> {
        std::fs::create_dir_all(&opts.dir).with_context(|| format!("creating {}", opts.dir.display()))?;
        let log = opts.dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("opening {} again", log.display()))?;
        let child = Command::new(keel_testkit::java_binary())
            .args(opts.java_args(app, name))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting java (the Kafka Streams instance)")?;
        let pid = child.id();
        let mut instance =
            StreamsInstance { name: name.to_string(), child, watchdog: None, pid, log, exited: None };
        let watchdog = Command::new("sh")
            .args(["-c", "read _ignored; kill -9 \"$1\" 2>/dev/null"])
            .arg("keel-streams-watchdog")
            .arg(pid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the watchdog of a Kafka Streams instance (sh)")?;
        instance.watchdog = Some(watchdog);
        Ok(instance)
    }

    /// The JVM's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The log file (stdout and stderr of the JVM).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log's text so far (empty when it cannot be read).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The state changes logged so far.
    pub fn states(&self) -> Vec<StateChange> {
        state_changes(&self.log())
    }

    /// Waits until the instance logged more than `seen` RUNNING lines (0: the first; after a
    /// rebalance, the count before it) and returns that RUNNING change. Fails when the process
    /// exits, when it logs ERROR, or after `timeout`.
    pub fn wait_running(&mut self, seen: usize, timeout: Duration) -> anyhow::Result<StateChange> {
        let deadline = Instant::now() + timeout;
        loop {
            let states = self.states();
            if let Some(change) = states.iter().filter(|c| c.state == "RUNNING").nth(seen) {
                return Ok(change.clone());
            }
            if states.iter().any(|c| c.state == "ERROR") {
                bail!("Kafka Streams instance {} went to ERROR; its log ends:\n{}", self.name, self.tail());
            }
            if let Some(status) = self.try_exit()? {
                bail!(
                    "Kafka Streams instance {} exited ({status}); its log ends:\n{}",
                    self.name,
                    self.tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "Kafka Streams instance {} was not RUNNING within {timeout:?}; its log ends:\n{}",
                    self.name,
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many times the instance reached RUNNING so far.
    pub fn running_count(&self) -> usize {
        self.states().iter().filter(|c| c.state == "RUNNING").count()
    }

    /// Ends the watchdog (so that it kills nothing once the JVM's pid is free again).
    fn end_watchdog(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if self.try_exit()?.is_some() {
            return Ok(());
        }
        self.child.kill().with_context(|| format!("killing Kafka Streams instance {}", self.name))?;
        let status =
            self.child.wait().with_context(|| format!("reaping Kafka Streams instance {}", self.name))?;
        self.exited = Some(status);
        self.end_watchdog();
        Ok(())
    }

    /// SIGTERM (the application's shutdown hook closes its `KafkaStreams`), then waits for the
    /// exit; after [`STOP_TIMEOUT`] it is killed and this fails.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.try_exit()?.is_some() {
            return Ok(());
        }
        let status =
            Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status().context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {} failed: {status}", self.pid);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.try_exit()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill()?;
        bail!("Kafka Streams instance {} did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed", self.name)
    }

    /// The exit status once the process is gone (reaped).
    pub fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().with_context(|| format!("polling instance {}", self.name))?;
        }
        if self.exited.is_some() {
            self.end_watchdog();
        }
        Ok(self.exited)
    }

    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for StreamsInstance {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.end_watchdog();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state line of the application parses; other lines of its log do not.
    #[test]
    fn state_lines_parse_and_other_lines_do_not() {
        let log = "\
keel-streams state=REBALANCING previous=CREATED at_ms=1733400000000
2026-12-05T18:00:00.000+0000 [main] WARN StreamsConfig - state=RUNNING previous=X at_ms=1
keel-streams state=RUNNING previous=REBALANCING at_ms=1733400001234 tasks=0_0,0_1
keel-streams state=RUNNING previous=REBALANCING at_ms=1733400001235 tasks=0_x
keel-streams closed at_ms=1733400009999
keel-streams state=running previous=REBALANCING at_ms=1
keel-streams state=RUNNING previous=REBALANCING at_ms=soon
keel-streams state=RUNNING previous=REBALANCING at_ms=1 extra=2
keel-streams state=RUNNING at_ms=1
keel-streams state=RUNNING previous=REBALANCING at_ms=1733400005000 tasks=\r
";
        let changes = state_changes(log);
        assert_eq!(
            changes,
            vec![
                StateChange {
                    state: "REBALANCING".into(),
                    previous: "CREATED".into(),
                    at_ms: 1_733_400_000_000,
                    tasks: None
                },
                StateChange {
                    state: "RUNNING".into(),
                    previous: "REBALANCING".into(),
                    at_ms: 1_733_400_001_234,
                    tasks: Some(vec!["0_0".into(), "0_1".into()])
                },
                StateChange {
                    state: "RUNNING".into(),
                    previous: "REBALANCING".into(),
                    at_ms: 1_733_400_005_000,
                    tasks: Some(vec![])
                },
            ]
        );
        assert_eq!(changes[1].partitions(), vec![0, 1]);
        assert!(changes[2].partitions().is_empty());
    }

    /// The version comes from kafka-streams' own jar only.
    #[test]
    fn kafka_streams_version_from_jar_names() {
        assert_eq!(kafka_streams_version("kafka-streams-4.4.0.jar").as_deref(), Some("4.4.0"));
        assert_eq!(kafka_streams_version("kafka-streams-scala_2.13-4.4.0.jar"), None);
        assert_eq!(kafka_streams_version("kafka-clients-4.4.0.jar"), None);
        assert_eq!(kafka_streams_version("kafka-streams-4.4.0.jar.sha1"), None);
    }

    /// The command line carries every option, the guarantee spelled as Kafka Streams wants it.
    #[test]
    fn java_args_carry_the_options() {
        let app = StreamsApp {
            libs: PathBuf::from("/c/libs"),
            classpath: "/c/libs/*".into(),
            kafka_streams_version: "4.4.0".into(),
        };
        let mut opts = StreamsOptions::new(
            Path::new("/d"),
            "127.0.0.1:9092",
            "app",
            "in",
            "out",
            StreamsJob::PassThrough,
        );
        opts.exactly_once = false;
        opts.threads = 2;
        opts.configs.push(("session.timeout.ms".into(), "10000".into()));
        let args = opts.java_args(&app, "a");
        let joined = args.join(" ");
        assert!(joined.starts_with("-Xmx512m -cp /c/libs/* dev.keel.streams.BenchApp "), "{joined}");
        for part in [
            "--bootstrap 127.0.0.1:9092",
            "--application-id app",
            "--input in",
            "--output out",
            "--job pass-through",
            "--state-dir /d/a-state",
            "--guarantee at_least_once",
            "--commit-interval-ms 1000",
            "--threads 2",
            "--config session.timeout.ms=10000",
        ] {
            assert!(joined.contains(part), "{part} missing from {joined}");
        }
    }
}
