//! Keel configuration: one YAML file with Flink-like keys.
//!
//! Layout:
//! - [`KEYS`]: every key Keel knows, its default, the environment variable that overrides it and
//!   what it means. `keel config keys` prints this table.
//! - [`Config`]: the typed configuration, built from (lowest to highest precedence) the defaults,
//!   the YAML file, `KEEL_*` environment variables and `--set key=value` flags.
//! - [`CheckpointConfig`]: the checkpointing settings, and [`RestartConfig`]: the restart
//!   strategy (`restart-strategy.*`, Flink's keys, aliases and defaults); a job spec may
//!   override the keys in [`JOB_CONFIG_KEYS`] for that job alone.
//! - [`parse_duration`]: Flink-style durations (`500 ms`, `3 s`, `5 min`; a bare number is ms).
//!
//! Unknown keys are an error that names them, wherever they come from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid YAML: {source}")]
    Yaml { path: PathBuf, source: serde_yaml::Error },
    #[error("config file {path}: top level must be a mapping of keys to values")]
    NotAMapping { path: PathBuf },
    #[error("unknown configuration key{} {} (from {origin}); known keys are listed by `keel config keys`",
        if keys.len() == 1 { "" } else { "s" }, keys.join(", "))]
    UnknownKeys { keys: Vec<String>, origin: String },
    #[error("configuration key {key} = {value:?} (from {origin}): {reason}")]
    InvalidValue { key: String, value: String, origin: String, reason: String },
    #[error("flag --set {0:?} must have the form key=value")]
    BadFlag(String),
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// One known configuration key.
pub struct KeyInfo {
    pub key: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

impl KeyInfo {
    /// The environment variable that overrides this key: `KEEL_` + the key in upper case with
    /// `.` and `-` turned into `_` (`heartbeat.interval` -> `KEEL_HEARTBEAT_INTERVAL`).
    pub fn env_var(&self) -> String {
        env_var_for(self.key)
    }
}

pub fn env_var_for(key: &str) -> String {
    let mut out = String::from("KEEL_");
    for c in key.chars() {
        match c {
            '.' | '-' => out.push('_'),
            c => out.extend(c.to_uppercase()),
        }
    }
    out
}

/// Every key Keel knows.
pub const KEYS: &[KeyInfo] = &[
    KeyInfo { key: "high-availability.type", default: "local", help: "HA backend: `local` (lock files on one host), `etcd`, or `raft` (embedded members, no other server)" },
    KeyInfo { key: "high-availability.storageDir", default: "/tmp/keel/ha", help: "directory of the local HA backend (lock files, metadata)" },
    KeyInfo { key: "high-availability.cluster-id", default: "default", help: "name of the cluster; separates clusters sharing one etcd or storage dir" },
    KeyInfo { key: "high-availability.etcd.endpoints", default: "127.0.0.1:2379", help: "comma-separated etcd client endpoints (host:port)" },
    KeyInfo { key: "high-availability.etcd.lease-ttl", default: "3 s", help: "TTL of a leader's etcd lease; a dead leader is replaced after about this long" },
    KeyInfo { key: "high-availability.raft.members", default: "", help: "the Raft members of `high-availability.type: raft`, comma-separated `id=host:port` (3 or 5; each runs `keel ha-member`)" },
    KeyInfo { key: "high-availability.raft.member-id", default: "", help: "which of the Raft members this `keel ha-member` process is (its id); its data goes under `high-availability.storageDir`/raft-<id>" },
    KeyInfo { key: "high-availability.raft.lease-ttl", default: "3 s", help: "TTL of a leader's session in the Raft store; a dead leader is replaced after about this long" },
    KeyInfo { key: "high-availability.raft.connect-timeout", default: "5 s", help: "how long to wait for a Raft leader to answer before failing with an error naming the members" },
    KeyInfo { key: "high-availability.etcd.connect-timeout", default: "5 s", help: "how long to wait for etcd before failing with an error naming the endpoints" },
    KeyInfo { key: "heartbeat.interval", default: "1 s", help: "how often TaskManagers send heartbeats" },
    KeyInfo { key: "heartbeat.timeout", default: "5 s", help: "a TaskManager without heartbeat for this long is declared lost" },
    KeyInfo { key: "heartbeat.rpc-failure-threshold", default: "2", help: "a TaskManager that this many consecutive RPCs could not reach (connection refused, reset, unreachable; not timeouts) is declared lost before heartbeat.timeout; the ResourceManager leader pings every TaskManager each heartbeat.interval, again within 100 ms after a ping that could not reach one, and at once when its liveness stream breaks; -1 disables" },
    KeyInfo { key: "taskmanager.numberOfTaskSlots", default: "1", help: "number of task slots a TaskManager offers" },
    KeyInfo { key: "taskmanager.memory.malloc-arenas", default: "0", help: "glibc malloc arenas a TaskManager may use (mallopt M_ARENA_MAX, set at its start); 0 leaves glibc's default (an arena per allocating thread, up to 8 per core; MALLOC_ARENA_MAX in the environment also applies). Fewer arenas trade CPU for memory: on a Kafka pass-through (keel-bench, 500k records, A/B on one machine) 1 arena gave a peak RSS of 29-32 MiB against 34-46 MiB, at 15-30 % more CPU per record; 2 arenas 30-37 MiB at 10-20 % more; no effect with another allocator; not a Flink key" },
    KeyInfo { key: "taskmanager.memory.malloc-trim-interval", default: "1 s", help: "how often a TaskManager hands the free pages of glibc's malloc arenas back to the OS (malloc_trim, on a thread of its own); 0 never. Every thread that allocates gets an arena, and an arena keeps the pages of what it once held after it is freed. With the mmap threshold below it took a Kafka pass-through's peak RSS from 45-50 MiB to 30-32 MiB, at about 8 % more CPU per raw record (docs/kafka.md, \"Memory\"); no effect with another allocator; not a Flink key" },
    KeyInfo { key: "taskmanager.memory.malloc-mmap-threshold", default: "256 kb", help: "allocations of at least this size (`256 kb`, `1 mb`, a bare number is bytes; at most 32 mb) get pages of their own, handed back to the OS when freed (mallopt M_MMAP_THRESHOLD, set at a TaskManager's start); 0 leaves glibc's default, which starts at 128 kb and rises to the largest block freed so far, after which librdkafka's fetch and produce buffers stay in the arenas. 64 kb measured 5x slower on datagen (its batch buffers then get fresh pages every batch); 256 kb no slower. See docs/kafka.md (\"Memory\"); no effect with another allocator; not a Flink key" },
    KeyInfo { key: "taskmanager.id", default: "", help: "TaskManager id; generated from host and port when empty" },
    KeyInfo { key: "slot.request.timeout", default: "5 min", help: "how long a slot request waits for free slots before failing" },
    KeyInfo { key: "upgrade.health-timeout", default: "1 min", help: "a new job version must run and complete its first checkpoint within this time of its start, or the upgrade rolls back to the old version from the drain savepoint" },
    KeyInfo { key: "resourcemanager.rpc.address", default: "127.0.0.1", help: "host the ResourceManager binds and advertises" },
    KeyInfo { key: "resourcemanager.rpc.port", default: "6124", help: "port of the ResourceManager (0 picks a free one)" },
    KeyInfo { key: "jobmanager.rpc.address", default: "127.0.0.1", help: "host the JobManager binds and advertises; clients fall back to it when the HA services name no leader" },
    KeyInfo { key: "jobmanager.rpc.port", default: "6123", help: "port of the JobManager (0 picks a free one)" },
    KeyInfo { key: "taskmanager.rpc.address", default: "127.0.0.1", help: "host the TaskManager binds and advertises" },
    KeyInfo { key: "taskmanager.rpc.port", default: "0", help: "port of the TaskManager (0 picks a free one)" },
    KeyInfo { key: "metrics.reporter.prom.port", default: "0", help: "port of the TaskManager's Prometheus endpoint (`GET /metrics`) on taskmanager.rpc.address (0 picks a free one; the TaskManager prints the bound address)" },
    KeyInfo { key: "restart-strategy.type", default: "exponential-delay", help: "what a failed job does: `exponential-delay` (or `exponentialdelay`), `fixed-delay` (`fixeddelay`), `failure-rate` (`failurerate`), `none` (`off`, `disable`: fail at the first failure); a job spec may override every restart-strategy key" },
    KeyInfo { key: "restart-strategy.fixed-delay.attempts", default: "1", help: "fixed-delay: restarts allowed over the job's life; the next failure fails the job" },
    KeyInfo { key: "restart-strategy.fixed-delay.delay", default: "1 s", help: "fixed-delay: pause before each restart" },
    KeyInfo { key: "restart-strategy.exponential-delay.initial-backoff", default: "1 s", help: "exponential-delay: pause before the first restart (and after a reset)" },
    KeyInfo { key: "restart-strategy.exponential-delay.max-backoff", default: "1 min", help: "exponential-delay: the longest pause between restarts" },
    KeyInfo { key: "restart-strategy.exponential-delay.backoff-multiplier", default: "1.5", help: "exponential-delay: each further restart waits this many times longer (at least 1)" },
    KeyInfo { key: "restart-strategy.exponential-delay.reset-backoff-threshold", default: "1 h", help: "exponential-delay: a failure this long after the previous restart starts again from initial-backoff and resets the attempt count" },
    KeyInfo { key: "restart-strategy.exponential-delay.jitter-factor", default: "0.1", help: "exponential-delay: each pause is moved by up to this fraction of itself, at random (0 to 1)" },
    KeyInfo { key: "restart-strategy.exponential-delay.attempts-before-reset-backoff", default: "infinite", help: "exponential-delay: restarts allowed before the backoff is reset; the next failure fails the job; `infinite` for no limit" },
    KeyInfo { key: "restart-strategy.failure-rate.max-failures-per-interval", default: "1", help: "failure-rate: restarts allowed within failure-rate-interval; one more failure within it fails the job" },
    KeyInfo { key: "restart-strategy.failure-rate.failure-rate-interval", default: "1 min", help: "failure-rate: the window over which failures are counted" },
    KeyInfo { key: "restart-strategy.failure-rate.delay", default: "1 s", help: "failure-rate: pause before each restart" },
    KeyInfo { key: "restart-strategy.taskmanager-loss.quiet-period", default: "1 min", help: "a failure caused by a TaskManager that is gone (lost by heartbeat.timeout or heartbeat.rpc-failure-threshold, replaced on its address, or shut down) restarts without the strategy's pause when the job had no failure for this long before it (counted from when its previous restart was due; a job that never failed is quiet); the failure still counts (fixed-delay attempts, failure-rate limits, the exponential-delay backoff grow as for any failure); `off`: every failure waits the strategy's pause (Flink's behaviour); not a Flink key" },
    KeyInfo { key: "state.checkpoints.dir", default: "/tmp/keel/checkpoints", help: "directory where checkpoint metadata is written (`<dir>/<job_id>/chk-<id>/_metadata`); a job spec may override it" },
    KeyInfo { key: "execution.checkpointing.interval", default: "", help: "how often the JobManager triggers a checkpoint of each running job; empty disables checkpointing; a job spec may override it" },
    KeyInfo { key: "execution.checkpointing.timeout", default: "10 min", help: "a checkpoint not acknowledged by every task within this time is failed; a job spec may override it" },
    KeyInfo { key: "execution.checkpointing.min-pause", default: "0", help: "least time between the end of one checkpoint and the trigger of the next; a job spec may override it" },
    KeyInfo { key: "state.checkpoints.num-retained", default: "1", help: "completed checkpoints kept per job; older ones are deleted; a job spec may override it" },
];

fn key_info(key: &str) -> Option<&'static KeyInfo> {
    KEYS.iter().find(|k| k.key == key)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaBackend {
    Local {
        storage_dir: PathBuf,
    },
    Etcd {
        endpoints: Vec<String>,
        lease_ttl: Duration,
        connect_timeout: Duration,
    },
    Raft {
        /// Every member: (id, host:port), sorted by id.
        members: Vec<(u64, String)>,
        /// This process's member id (`keel ha-member` only).
        member_id: Option<u64>,
        /// Where a member keeps its data (under `raft-<id>`).
        storage_dir: PathBuf,
        lease_ttl: Duration,
        connect_timeout: Duration,
    },
}

/// Parses `high-availability.raft.members`: comma-separated `id=host:port`, ids unique and
/// greater than zero.
pub fn parse_raft_members(text: &str) -> std::result::Result<Vec<(u64, String)>, String> {
    let mut members: Vec<(u64, String)> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((id, address)) = item.split_once('=') else {
            return Err(format!("member {item:?} is not `id=host:port`"));
        };
        let id: u64 =
            id.trim().parse().map_err(|_| format!("member {item:?}: id {:?} is not a number", id.trim()))?;
        if id == 0 {
            return Err(format!("member {item:?}: ids start at 1"));
        }
        let address = address.trim();
        let port_ok = address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("member {item:?}: address {address:?} is not host:port"));
        }
        if members.iter().any(|(other, _)| *other == id) {
            return Err(format!("member id {id} is named twice"));
        }
        if members.iter().any(|(_, other)| other == address) {
            return Err(format!("address {address} is named twice"));
        }
        members.push((id, address.to_string()));
    }
    if members.is_empty() {
        return Err("at least one member is needed (3 or 5 to survive the loss of one or two)".into());
    }
    members.sort();
    Ok(members)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaConfig {
    pub backend: HaBackend,
    pub cluster_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcAddress {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for RpcAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The typed configuration of a Keel process or client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub ha: HaConfig,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub slots_per_taskmanager: u32,
    /// `taskmanager.memory.malloc-arenas`: glibc's `M_ARENA_MAX` for a TaskManager; `None`
    /// (`0`) leaves glibc's default.
    pub taskmanager_malloc_arenas: Option<u32>,
    /// `taskmanager.memory.malloc-trim-interval`: how often a TaskManager calls `malloc_trim`;
    /// `None` (`0`): never.
    pub taskmanager_malloc_trim_interval: Option<Duration>,
    /// `taskmanager.memory.malloc-mmap-threshold`: glibc's `M_MMAP_THRESHOLD` for a TaskManager,
    /// in bytes; `None` (`0`) leaves glibc's dynamic default.
    pub taskmanager_malloc_mmap_threshold: Option<u64>,
    pub taskmanager_id: Option<String>,
    pub slot_request_timeout: Duration,
    /// `upgrade.health-timeout`: how long a new version has to run and complete its first
    /// checkpoint before an upgrade rolls back.
    pub upgrade_health_timeout: Duration,
    pub resourcemanager_rpc: RpcAddress,
    pub jobmanager_rpc: RpcAddress,
    pub taskmanager_rpc: RpcAddress,
    /// `metrics.reporter.prom.port`: where a TaskManager serves its metrics (host:
    /// `taskmanager.rpc.address`); 0 picks a free port.
    pub metrics_prom_port: u16,
    /// `heartbeat.rpc-failure-threshold`: how many consecutive RPCs that cannot reach a
    /// TaskManager declare it lost; `None` when disabled (`-1`).
    pub heartbeat_rpc_failure_threshold: Option<u32>,
    /// The cluster's restart strategy (`restart-strategy.*`); a job spec may override it.
    pub restart: RestartConfig,
    /// `state.checkpoints.dir` (the same as `checkpointing.dir`).
    pub checkpoints_dir: PathBuf,
    /// The cluster's checkpointing defaults (`execution.checkpointing.*`, `state.checkpoints.*`).
    pub checkpointing: CheckpointConfig,
    /// Every key with its effective value and where it came from, for `keel config show`.
    pub effective: BTreeMap<String, (String, String)>,
}

/// Where configuration comes from, lowest precedence first.
#[derive(Debug, Default, Clone)]
pub struct ConfigSources {
    pub file: Option<PathBuf>,
    /// Environment variables (normally `std::env::vars()`); only `KEEL_*` names matching a key
    /// are used, other `KEEL_*` names are reported as unknown.
    pub env: Vec<(String, String)>,
    /// `key=value` flags.
    pub flags: Vec<String>,
}

/// Environment variables read by the binary itself rather than as configuration keys.
pub const NON_KEY_ENV_VARS: &[&str] =
    &["KEEL_CONFIG", "KEEL_LOG", "KEEL_OUTPUT", "KEEL_BIN", "KEEL_KAFKA_LIBS", "KEEL_CACHE_DIR"];
/// Prefix of the variables of Keel's tests and scripts (`KEEL_TEST_KAFKA_BOOTSTRAP`,
/// `KEEL_TEST_KEEP`, ...): never configuration keys, so a `keel` process started under a test
/// run that sets them is not refused.
pub const NON_KEY_ENV_PREFIX: &str = "KEEL_TEST_";

/// Whether `name` is an environment variable that may name a configuration key.
fn is_key_env_var(name: &str) -> bool {
    name.starts_with("KEEL_") && !name.starts_with(NON_KEY_ENV_PREFIX) && !NON_KEY_ENV_VARS.contains(&name)
}

impl ConfigSources {
    pub fn from_process(file: Option<PathBuf>, flags: Vec<String>) -> Self {
        ConfigSources { file, env: std::env::vars().collect(), flags }
    }
}

impl Config {
    /// The configuration with every key at its default.
    pub fn defaults() -> Config {
        // The defaults are valid by construction; a failure here is a bug in `KEYS`.
        Self::from_raw(BTreeMap::new()).unwrap_or_else(|e| panic!("built-in defaults: {e}"))
    }

    pub fn load(sources: &ConfigSources) -> Result<Config> {
        let mut raw: BTreeMap<String, (String, String)> = BTreeMap::new();
        if let Some(path) = &sources.file {
            for (k, v) in read_file(path)? {
                raw.insert(k, (v, path.display().to_string()));
            }
        }
        let mut unknown_env = Vec::new();
        let env_names: BTreeMap<String, &'static str> = KEYS.iter().map(|k| (k.env_var(), k.key)).collect();
        for (name, value) in &sources.env {
            if !is_key_env_var(name) {
                continue;
            }
            match env_names.get(name) {
                Some(key) => {
                    raw.insert(key.to_string(), (value.clone(), format!("env {name}")));
                }
                None => unknown_env.push(name.clone()),
            }
        }
        if !unknown_env.is_empty() {
            unknown_env.sort();
            return Err(ConfigError::UnknownKeys { keys: unknown_env, origin: "environment".into() });
        }
        let mut unknown_flags = Vec::new();
        for flag in &sources.flags {
            let (k, v) = flag.split_once('=').ok_or_else(|| ConfigError::BadFlag(flag.clone()))?;
            let k = k.trim();
            if key_info(k).is_none() {
                unknown_flags.push(k.to_string());
                continue;
            }
            raw.insert(k.to_string(), (v.trim().to_string(), format!("flag --set {k}")));
        }
        if !unknown_flags.is_empty() {
            return Err(ConfigError::UnknownKeys { keys: unknown_flags, origin: "--set flags".into() });
        }
        Self::from_raw(raw)
    }

    fn from_raw(mut raw: BTreeMap<String, (String, String)>) -> Result<Config> {
        for info in KEYS {
            raw.entry(info.key.to_string())
                .or_insert_with(|| (info.default.to_string(), "default".to_string()));
        }
        let get = |key: &str| -> (&str, &str) {
            raw.get(key).map(|(v, o)| (v.as_str(), o.as_str())).unwrap_or(("", "default"))
        };
        let invalid = |key: &str, reason: String| {
            let (value, origin) = get(key);
            ConfigError::InvalidValue {
                key: key.to_string(),
                value: value.to_string(),
                origin: origin.to_string(),
                reason,
            }
        };
        let duration = |key: &str| -> Result<Duration> {
            let d = parse_duration(get(key).0).map_err(|r| invalid(key, r))?;
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero".into()));
            }
            Ok(d)
        };
        let string = |key: &str| get(key).0.trim().to_string();
        let port = |key: &str| -> Result<u16> {
            string(key).parse::<u16>().map_err(|e| invalid(key, format!("not a port number: {e}")))
        };

        let backend = match string("high-availability.type").as_str() {
            "local" | "embedded" => {
                HaBackend::Local { storage_dir: PathBuf::from(string("high-availability.storageDir")) }
            }
            "etcd" => {
                let endpoints: Vec<String> = string("high-availability.etcd.endpoints")
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if endpoints.is_empty() {
                    return Err(invalid(
                        "high-availability.etcd.endpoints",
                        "at least one endpoint is needed".into(),
                    ));
                }
                HaBackend::Etcd {
                    endpoints,
                    lease_ttl: duration("high-availability.etcd.lease-ttl")?,
                    connect_timeout: duration("high-availability.etcd.connect-timeout")?,
                }
            }
            "raft" => {
                let members = parse_raft_members(&string("high-availability.raft.members"))
                    .map_err(|reason| invalid("high-availability.raft.members", reason))?;
                let id = string("high-availability.raft.member-id");
                let member_id = if id.is_empty() {
                    None
                } else {
                    let id: u64 = id.parse().map_err(|_| {
                        invalid("high-availability.raft.member-id", format!("{id:?} is not a member id"))
                    })?;
                    if !members.iter().any(|(m, _)| *m == id) {
                        return Err(invalid(
                            "high-availability.raft.member-id",
                            format!("{id} is not among high-availability.raft.members"),
                        ));
                    }
                    Some(id)
                };
                HaBackend::Raft {
                    members,
                    member_id,
                    storage_dir: PathBuf::from(string("high-availability.storageDir")),
                    lease_ttl: duration("high-availability.raft.lease-ttl")?,
                    connect_timeout: duration("high-availability.raft.connect-timeout")?,
                }
            }
            other => {
                return Err(invalid(
                    "high-availability.type",
                    format!("unknown backend {other:?}; expected `local`, `etcd` or `raft`"),
                ))
            }
        };
        let cluster_id = string("high-availability.cluster-id");
        if cluster_id.is_empty() || cluster_id.contains('/') {
            return Err(invalid(
                "high-availability.cluster-id",
                "must be non-empty and contain no '/'".into(),
            ));
        }
        let heartbeat_interval = duration("heartbeat.interval")?;
        let heartbeat_timeout = duration("heartbeat.timeout")?;
        if heartbeat_timeout <= heartbeat_interval {
            return Err(invalid(
                "heartbeat.timeout",
                format!("must be longer than heartbeat.interval ({heartbeat_interval:?})"),
            ));
        }
        let slots: u32 = string("taskmanager.numberOfTaskSlots")
            .parse()
            .map_err(|e| invalid("taskmanager.numberOfTaskSlots", format!("not a number: {e}")))?;
        if slots == 0 {
            return Err(invalid("taskmanager.numberOfTaskSlots", "must be at least 1".into()));
        }
        let malloc_arenas: u32 = string("taskmanager.memory.malloc-arenas").trim().parse().map_err(|e| {
            invalid(
                "taskmanager.memory.malloc-arenas",
                format!("not a whole number (0 for glibc's default): {e}"),
            )
        })?;
        let trim_interval = parse_duration(get("taskmanager.memory.malloc-trim-interval").0)
            .map_err(|r| invalid("taskmanager.memory.malloc-trim-interval", r))?;
        let mmap_threshold = parse_memory_size(get("taskmanager.memory.malloc-mmap-threshold").0)
            .map_err(|r| invalid("taskmanager.memory.malloc-mmap-threshold", r))?;
        if mmap_threshold > MAX_MMAP_THRESHOLD {
            return Err(invalid(
                "taskmanager.memory.malloc-mmap-threshold",
                format!("at most {} mb (glibc's limit on 64-bit)", MAX_MMAP_THRESHOLD >> 20),
            ));
        }
        let tm_id = string("taskmanager.id");
        let rpc_failure_threshold = match string("heartbeat.rpc-failure-threshold").as_str() {
            "-1" => None,
            text => match text.parse::<u32>() {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    return Err(invalid(
                        "heartbeat.rpc-failure-threshold",
                        "must be a whole number of at least 1, or -1 to disable".into(),
                    ))
                }
            },
        };
        let mut checkpointing = CheckpointConfig::builtin();
        for key in CHECKPOINT_CONFIG_KEYS {
            checkpointing.set(key, get(key).0).map_err(|reason| invalid(key, reason))?;
        }
        let mut restart = RestartConfig::builtin();
        for key in RESTART_CONFIG_KEYS {
            restart.set(key, get(key).0).map_err(|reason| invalid(key, reason))?;
        }
        restart.validate().map_err(|(key, reason)| invalid(&key, reason))?;
        let config = Config {
            ha: HaConfig { backend, cluster_id },
            heartbeat_interval,
            heartbeat_timeout,
            slots_per_taskmanager: slots,
            taskmanager_malloc_arenas: (malloc_arenas > 0).then_some(malloc_arenas),
            taskmanager_malloc_trim_interval: (!trim_interval.is_zero()).then_some(trim_interval),
            taskmanager_malloc_mmap_threshold: (mmap_threshold > 0).then_some(mmap_threshold),
            taskmanager_id: (!tm_id.is_empty()).then_some(tm_id),
            slot_request_timeout: duration("slot.request.timeout")?,
            upgrade_health_timeout: duration("upgrade.health-timeout")?,
            resourcemanager_rpc: RpcAddress {
                host: string("resourcemanager.rpc.address"),
                port: port("resourcemanager.rpc.port")?,
            },
            jobmanager_rpc: RpcAddress {
                host: string("jobmanager.rpc.address"),
                port: port("jobmanager.rpc.port")?,
            },
            taskmanager_rpc: RpcAddress {
                host: string("taskmanager.rpc.address"),
                port: port("taskmanager.rpc.port")?,
            },
            metrics_prom_port: port("metrics.reporter.prom.port")?,
            heartbeat_rpc_failure_threshold: rpc_failure_threshold,
            restart,
            checkpoints_dir: checkpointing.dir.clone(),
            checkpointing,
            effective: raw.clone(),
        };
        Ok(config)
    }
}

/// The configuration keys a job spec may set for itself (its top-level `config:` mapping): the
/// checkpointing keys ([`CHECKPOINT_CONFIG_KEYS`]) and the restart-strategy keys
/// ([`RESTART_CONFIG_KEYS`]).
pub const JOB_CONFIG_KEYS: &[&str] = &[
    "execution.checkpointing.interval",
    "execution.checkpointing.timeout",
    "execution.checkpointing.min-pause",
    "state.checkpoints.num-retained",
    "state.checkpoints.dir",
    "restart-strategy.type",
    "restart-strategy.fixed-delay.attempts",
    "restart-strategy.fixed-delay.delay",
    "restart-strategy.exponential-delay.initial-backoff",
    "restart-strategy.exponential-delay.max-backoff",
    "restart-strategy.exponential-delay.backoff-multiplier",
    "restart-strategy.exponential-delay.reset-backoff-threshold",
    "restart-strategy.exponential-delay.jitter-factor",
    "restart-strategy.exponential-delay.attempts-before-reset-backoff",
    "restart-strategy.failure-rate.max-failures-per-interval",
    "restart-strategy.failure-rate.failure-rate-interval",
    "restart-strategy.failure-rate.delay",
    "restart-strategy.taskmanager-loss.quiet-period",
];

/// The checkpointing keys of [`JOB_CONFIG_KEYS`] ([`CheckpointConfig`]).
pub const CHECKPOINT_CONFIG_KEYS: &[&str] = &[
    "execution.checkpointing.interval",
    "execution.checkpointing.timeout",
    "execution.checkpointing.min-pause",
    "state.checkpoints.num-retained",
    "state.checkpoints.dir",
];

/// The restart-strategy keys of [`JOB_CONFIG_KEYS`] ([`RestartConfig`]).
pub const RESTART_CONFIG_KEYS: &[&str] = &[
    "restart-strategy.type",
    "restart-strategy.fixed-delay.attempts",
    "restart-strategy.fixed-delay.delay",
    "restart-strategy.exponential-delay.initial-backoff",
    "restart-strategy.exponential-delay.max-backoff",
    "restart-strategy.exponential-delay.backoff-multiplier",
    "restart-strategy.exponential-delay.reset-backoff-threshold",
    "restart-strategy.exponential-delay.jitter-factor",
    "restart-strategy.exponential-delay.attempts-before-reset-backoff",
    "restart-strategy.failure-rate.max-failures-per-interval",
    "restart-strategy.failure-rate.failure-rate-interval",
    "restart-strategy.failure-rate.delay",
    "restart-strategy.taskmanager-loss.quiet-period",
];

fn is_restart_key(key: &str) -> bool {
    RESTART_CONFIG_KEYS.contains(&key)
}

/// Checkpointing settings. The cluster configuration gives the defaults; a job spec's
/// `config:` mapping overrides them for that job ([`CheckpointConfig::with_overrides`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// `execution.checkpointing.interval`; `None` (the default) disables checkpointing.
    pub interval: Option<Duration>,
    /// `execution.checkpointing.timeout`: a checkpoint not complete by then is failed.
    pub timeout: Duration,
    /// `execution.checkpointing.min-pause`: least time from the end of one checkpoint to the
    /// trigger of the next.
    pub min_pause: Duration,
    /// `state.checkpoints.num-retained`: completed checkpoints kept per job (at least 1).
    pub num_retained: u32,
    /// `state.checkpoints.dir`: checkpoints go to `<dir>/<job_id>/chk-<id>/`.
    pub dir: PathBuf,
}

impl CheckpointConfig {
    /// The built-in defaults (those of [`KEYS`]).
    fn builtin() -> CheckpointConfig {
        CheckpointConfig {
            interval: None,
            timeout: Duration::from_secs(600),
            min_pause: Duration::ZERO,
            num_retained: 1,
            dir: PathBuf::from("/tmp/keel/checkpoints"),
        }
    }

    /// Sets one of the [`JOB_CONFIG_KEYS`] from its text; the error says why the value (or the
    /// key) is not accepted.
    pub fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        let value = value.trim();
        let positive = |value: &str| -> std::result::Result<Duration, String> {
            let d = parse_duration(value)?;
            if d.is_zero() {
                return Err("must be greater than zero".into());
            }
            Ok(d)
        };
        match key {
            "execution.checkpointing.interval" => {
                self.interval =
                    if value.is_empty() {
                        None
                    } else {
                        Some(positive(value).map_err(|r| {
                            format!("{r} (leave the key empty or out to disable checkpointing)")
                        })?)
                    };
            }
            "execution.checkpointing.timeout" => self.timeout = positive(value)?,
            "execution.checkpointing.min-pause" => self.min_pause = parse_duration(value)?,
            "state.checkpoints.num-retained" => {
                let n: u32 = value.parse().map_err(|e| format!("not a number: {e}"))?;
                if n == 0 {
                    return Err("must be at least 1".into());
                }
                self.num_retained = n;
            }
            "state.checkpoints.dir" => {
                if value.is_empty() {
                    return Err("must not be empty".into());
                }
                self.dir = PathBuf::from(value);
            }
            other => {
                return Err(format!(
                    "{other:?} cannot be set per job; accepted keys: {}",
                    JOB_CONFIG_KEYS.join(", ")
                ))
            }
        }
        Ok(())
    }

    /// These settings with a job's overrides applied. The error names the offending key and
    /// says why.
    pub fn with_overrides<'a>(
        &self,
        overrides: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> std::result::Result<CheckpointConfig, (String, String)> {
        let mut out = self.clone();
        for (key, value) in overrides {
            if is_restart_key(key) {
                continue;
            }
            out.set(key, value).map_err(|reason| (key.clone(), reason))?;
        }
        Ok(out)
    }
}

/// Checks one entry of a job spec's `config:` mapping: the key must be one of
/// [`JOB_CONFIG_KEYS`] and the value must parse. The error says why. (Rules that relate two
/// restart-strategy keys, such as initial-backoff <= max-backoff, are checked when the job's
/// strategy is built from the cluster's and the spec's keys: [`RestartConfig::with_overrides`].)
pub fn check_job_config(key: &str, value: &str) -> std::result::Result<(), String> {
    if is_restart_key(key) {
        return RestartConfig::builtin().set(key, value);
    }
    CheckpointConfig::builtin().set(key, value)
}

/// The kinds of restart strategy (`restart-strategy.type`), with Flink's names and aliases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartStrategyType {
    /// `none`, `off`, `disable`: the first failure fails the job.
    None,
    /// `fixed-delay`, `fixeddelay`: a fixed number of restarts, a fixed pause before each.
    FixedDelay,
    /// `exponential-delay`, `exponentialdelay` (the default): growing pauses, reset after a
    /// quiet period.
    ExponentialDelay,
    /// `failure-rate`, `failurerate`: fails the job when failures come too often.
    FailureRate,
}

impl RestartStrategyType {
    /// Parses a `restart-strategy.type` value (case-insensitive, Flink's aliases accepted).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" | "off" | "disable" => Ok(RestartStrategyType::None),
            "fixed-delay" | "fixeddelay" => Ok(RestartStrategyType::FixedDelay),
            "exponential-delay" | "exponentialdelay" => Ok(RestartStrategyType::ExponentialDelay),
            "failure-rate" | "failurerate" => Ok(RestartStrategyType::FailureRate),
            other => Err(format!(
                "unknown restart strategy {other:?}; expected `exponential-delay`, `fixed-delay`, \
                 `failure-rate` or `none` (aliases: exponentialdelay, fixeddelay, failurerate, off, disable)"
            )),
        }
    }

    /// The main name of the strategy.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartStrategyType::None => "none",
            RestartStrategyType::FixedDelay => "fixed-delay",
            RestartStrategyType::ExponentialDelay => "exponential-delay",
            RestartStrategyType::FailureRate => "failure-rate",
        }
    }
}

/// `restart-strategy.fixed-delay.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedDelayConfig {
    /// Restarts allowed over the job's life (0: none).
    pub attempts: u32,
    pub delay: Duration,
}

/// `restart-strategy.exponential-delay.*`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExponentialDelayConfig {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// At least 1 (1 keeps the pause at initial-backoff).
    pub backoff_multiplier: f64,
    pub reset_backoff_threshold: Duration,
    /// 0 to 1.
    pub jitter_factor: f64,
    /// `None`: no limit (`infinite`).
    pub attempts_before_reset_backoff: Option<u32>,
}

/// `restart-strategy.failure-rate.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureRateConfig {
    pub max_failures_per_interval: u32,
    pub interval: Duration,
    pub delay: Duration,
}

/// Restart-strategy settings: the chosen type and the options of every type (only the chosen
/// type's options are used). The cluster configuration gives the defaults; a job spec's
/// `config:` mapping overrides them for that job ([`RestartConfig::with_overrides`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RestartConfig {
    pub strategy: RestartStrategyType,
    pub fixed_delay: FixedDelayConfig,
    pub exponential_delay: ExponentialDelayConfig,
    pub failure_rate: FailureRateConfig,
    /// `restart-strategy.taskmanager-loss.quiet-period`: a failure caused by a TaskManager that
    /// is gone restarts without the strategy's pause when the job had no failure for this long;
    /// `None` (`off`): every failure waits the pause.
    pub taskmanager_loss_quiet_period: Option<Duration>,
}

// The factors are checked to be finite numbers when they are set, so equality is an equivalence.
impl Eq for RestartConfig {}

impl RestartConfig {
    /// The built-in defaults (those of [`KEYS`], which are Flink's).
    pub fn builtin() -> RestartConfig {
        RestartConfig {
            strategy: RestartStrategyType::ExponentialDelay,
            fixed_delay: FixedDelayConfig { attempts: 1, delay: Duration::from_secs(1) },
            exponential_delay: ExponentialDelayConfig {
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(60),
                backoff_multiplier: 1.5,
                reset_backoff_threshold: Duration::from_secs(3600),
                jitter_factor: 0.1,
                attempts_before_reset_backoff: None,
            },
            failure_rate: FailureRateConfig {
                max_failures_per_interval: 1,
                interval: Duration::from_secs(60),
                delay: Duration::from_secs(1),
            },
            taskmanager_loss_quiet_period: Some(Duration::from_secs(60)),
        }
    }

    /// Sets one of the [`RESTART_CONFIG_KEYS`] from its text; the error says why the value (or
    /// the key) is not accepted.
    pub fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        let value = value.trim();
        let at_least_1ms = |value: &str| -> std::result::Result<Duration, String> {
            let d = parse_duration(value)?;
            if d < Duration::from_millis(1) {
                return Err("must be at least 1 ms".into());
            }
            Ok(d)
        };
        let count = |value: &str, min: u32| -> std::result::Result<u32, String> {
            let n: u32 = value.parse().map_err(|_| format!("{value:?} is not a whole number"))?;
            if n < min {
                return Err(format!("must be at least {min}"));
            }
            Ok(n)
        };
        let factor = |value: &str| -> std::result::Result<f64, String> {
            let f: f64 = value.parse().map_err(|_| format!("{value:?} is not a number"))?;
            if !f.is_finite() {
                return Err(format!("{value:?} is not a finite number"));
            }
            Ok(f)
        };
        match key {
            "restart-strategy.type" => self.strategy = RestartStrategyType::parse(value)?,
            "restart-strategy.fixed-delay.attempts" => self.fixed_delay.attempts = count(value, 0)?,
            "restart-strategy.fixed-delay.delay" => self.fixed_delay.delay = parse_duration(value)?,
            "restart-strategy.exponential-delay.initial-backoff" => {
                self.exponential_delay.initial_backoff = at_least_1ms(value)?
            }
            "restart-strategy.exponential-delay.max-backoff" => {
                self.exponential_delay.max_backoff = at_least_1ms(value)?
            }
            "restart-strategy.exponential-delay.backoff-multiplier" => {
                let f = factor(value)?;
                if f < 1.0 {
                    return Err("must be at least 1".into());
                }
                self.exponential_delay.backoff_multiplier = f;
            }
            "restart-strategy.exponential-delay.reset-backoff-threshold" => {
                self.exponential_delay.reset_backoff_threshold = at_least_1ms(value)?
            }
            "restart-strategy.exponential-delay.jitter-factor" => {
                let f = factor(value)?;
                if !(0.0..=1.0).contains(&f) {
                    return Err("must be between 0 and 1".into());
                }
                self.exponential_delay.jitter_factor = f;
            }
            "restart-strategy.exponential-delay.attempts-before-reset-backoff" => {
                self.exponential_delay.attempts_before_reset_backoff =
                    if value.eq_ignore_ascii_case("infinite") || value == i32::MAX.to_string() {
                        None
                    } else {
                        Some(count(value, 1).map_err(|r| format!("{r} (or `infinite`)"))?)
                    };
            }
            "restart-strategy.failure-rate.max-failures-per-interval" => {
                self.failure_rate.max_failures_per_interval = count(value, 1)?
            }
            "restart-strategy.failure-rate.failure-rate-interval" => {
                self.failure_rate.interval = at_least_1ms(value)?
            }
            "restart-strategy.failure-rate.delay" => self.failure_rate.delay = parse_duration(value)?,
            "restart-strategy.taskmanager-loss.quiet-period" => {
                self.taskmanager_loss_quiet_period = if value.eq_ignore_ascii_case("off") {
                    None
                } else {
                    Some(at_least_1ms(value).map_err(|r| format!("{r} (or `off`)"))?)
                };
            }
            other => {
                return Err(format!(
                    "{other:?} is not a restart-strategy key; accepted keys: {}",
                    RESTART_CONFIG_KEYS.join(", ")
                ))
            }
        }
        Ok(())
    }

    /// Checks the rules that relate two keys. The error names the offending key and says why.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let e = &self.exponential_delay;
        if e.initial_backoff > e.max_backoff {
            return Err((
                "restart-strategy.exponential-delay.max-backoff".into(),
                format!(
                    "must not be shorter than restart-strategy.exponential-delay.initial-backoff ({:?})",
                    e.initial_backoff
                ),
            ));
        }
        Ok(())
    }

    /// These settings with a job's overrides applied (keys other than the restart-strategy
    /// keys are left to [`CheckpointConfig::with_overrides`]), then validated. The error names
    /// the offending key and says why.
    pub fn with_overrides<'a>(
        &self,
        overrides: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> std::result::Result<RestartConfig, (String, String)> {
        let mut out = self.clone();
        for (key, value) in overrides {
            if is_restart_key(key) {
                out.set(key, value).map_err(|reason| (key.clone(), reason))?;
            }
        }
        out.validate()?;
        Ok(out)
    }

    /// The chosen strategy with its options, for people:
    /// `fixed-delay (2 restart attempts, 1 s delay)`.
    pub fn describe(&self) -> String {
        let strategy = self.describe_strategy();
        match (self.strategy, self.taskmanager_loss_quiet_period) {
            (RestartStrategyType::None, _) | (_, None) => strategy,
            (_, Some(quiet)) => format!(
                "{strategy}; a lost taskmanager after {} without failures restarts at once",
                format_duration(quiet)
            ),
        }
    }

    fn describe_strategy(&self) -> String {
        match self.strategy {
            RestartStrategyType::None => "none (the first failure fails the job)".into(),
            RestartStrategyType::FixedDelay => format!(
                "fixed-delay ({} restart attempt{}, {} delay)",
                self.fixed_delay.attempts,
                if self.fixed_delay.attempts == 1 { "" } else { "s" },
                format_duration(self.fixed_delay.delay)
            ),
            RestartStrategyType::ExponentialDelay => {
                let e = &self.exponential_delay;
                format!(
                    "exponential-delay (backoff {} x{} up to {}, jitter {}, reset after {}, {})",
                    format_duration(e.initial_backoff),
                    e.backoff_multiplier,
                    format_duration(e.max_backoff),
                    e.jitter_factor,
                    format_duration(e.reset_backoff_threshold),
                    match e.attempts_before_reset_backoff {
                        None => "unlimited restarts".to_string(),
                        Some(n) => format!("{n} restart{} before reset", if n == 1 { "" } else { "s" }),
                    }
                )
            }
            RestartStrategyType::FailureRate => format!(
                "failure-rate (at most {} restart{} per {}, {} delay)",
                self.failure_rate.max_failures_per_interval,
                if self.failure_rate.max_failures_per_interval == 1 { "" } else { "s" },
                format_duration(self.failure_rate.interval),
                format_duration(self.failure_rate.delay)
            ),
        }
    }
}

/// A duration the way Keel's keys write them: `500 ms`, `1 s`, `1.5 s`, `2 min`, `1 h`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0 ms".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{} h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{} min", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else if ms > 1000 {
        format!("{} s", ms as f64 / 1000.0)
    } else {
        format!("{ms} ms")
    }
}

/// Reads a YAML config file into flat `key -> value` pairs. Nested mappings are flattened with
/// dots, so `heartbeat: {interval: 1 s}` and `heartbeat.interval: 1 s` mean the same.
fn read_file(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let value: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|source| ConfigError::Yaml { path: path.to_path_buf(), source })?;
    let mut out = Vec::new();
    match value {
        serde_yaml::Value::Null => {}
        serde_yaml::Value::Mapping(map) => {
            flatten(path, "", &map, &mut out)?;
        }
        _ => return Err(ConfigError::NotAMapping { path: path.to_path_buf() }),
    }
    let unknown: Vec<String> =
        out.iter().filter(|(k, _)| key_info(k).is_none()).map(|(k, _)| k.clone()).collect();
    if !unknown.is_empty() {
        return Err(ConfigError::UnknownKeys { keys: unknown, origin: path.display().to_string() });
    }
    Ok(out)
}

fn flatten(
    path: &Path,
    prefix: &str,
    map: &serde_yaml::Mapping,
    out: &mut Vec<(String, String)>,
) -> Result<()> {
    for (k, v) in map {
        let key = match k {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            _ => return Err(ConfigError::NotAMapping { path: path.to_path_buf() }),
        };
        let full = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
        match v {
            serde_yaml::Value::Mapping(inner) if key_info(&full).is_none() => {
                flatten(path, &full, inner, out)?
            }
            serde_yaml::Value::String(s) => out.push((full, s.clone())),
            serde_yaml::Value::Number(n) => out.push((full, n.to_string())),
            serde_yaml::Value::Bool(b) => out.push((full, b.to_string())),
            serde_yaml::Value::Null => out.push((full, String::new())),
            serde_yaml::Value::Sequence(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|i| match i {
                        serde_yaml::Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
                    })
                    .collect();
                out.push((full, parts.join(",")));
            }
            other => out.push((full, serde_yaml::to_string(other).unwrap_or_default().trim().to_string())),
        }
    }
    Ok(())
}

/// Parses a Flink-style duration: a number followed by an optional unit (`ms`, `s`, `min`, `h`,
/// `d` and their long forms). A bare number is milliseconds.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (expected e.g. `500 ms`, `3 s`, `5 min`)"))?;
    let millis_per_unit = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "ms" | "milli" | "millis" | "millisecond" | "milliseconds" => 1.0,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000.0,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000.0,
        "h" | "hour" | "hours" => 3_600_000.0,
        "d" | "day" | "days" => 86_400_000.0,
        other => return Err(format!("unknown time unit {other:?} in {text:?}")),
    };
    Ok(Duration::from_micros((value * millis_per_unit * 1000.0).round() as u64))
}

/// The largest `M_MMAP_THRESHOLD` glibc takes on 64-bit (`HEAP_MAX_SIZE / 2`, 32 MiB).
const MAX_MMAP_THRESHOLD: u64 = 32 << 20;

/// Parses a Flink-style memory size: a whole number followed by an optional unit (`b`, `kb`,
/// `mb`, `gb` and their short and long forms, powers of 1024, any case). A bare number is bytes.
pub fn parse_memory_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: u64 =
        num.parse().map_err(|_| format!("{text:?} is not a memory size (expected e.g. `256 kb`, `1 mb`)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" | "bytes" => 0,
        "k" | "kb" | "kibibytes" => 10,
        "m" | "mb" | "mebibytes" => 20,
        "g" | "gb" | "gibibytes" => 30,
        other => return Err(format!("unknown memory unit {other:?} in {text:?}")),
    };
    value.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile_lite::TempFile {
        let f = tempfile_lite::TempFile::new();
        let mut h = std::fs::File::create(&f.path).expect("create temp file");
        h.write_all(text.as_bytes()).expect("write temp file");
        f
    }

    mod tempfile_lite {
        pub struct TempFile {
            pub path: std::path::PathBuf,
        }
        impl TempFile {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let path = std::env::temp_dir().join(format!(
                    "keel-config-test-{}-{}.yaml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                TempFile { path }
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::defaults();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(5));
        assert_eq!(c.slot_request_timeout, Duration::from_secs(300));
        assert!(matches!(c.ha.backend, HaBackend::Local { .. }));
        assert_eq!(c.metrics_prom_port, 0);
    }

    #[test]
    fn the_metrics_port_is_a_key_with_an_env_var() {
        let c = Config::load(&ConfigSources {
            env: vec![("KEEL_METRICS_REPORTER_PROM_PORT".into(), "9249".into())],
            ..Default::default()
        })
        .expect("valid port");
        assert_eq!(c.metrics_prom_port, 9249);
        let err = Config::load(&ConfigSources {
            flags: vec!["metrics.reporter.prom.port=lots".into()],
            ..Default::default()
        })
        .expect_err("not a port");
        assert!(err.to_string().contains("metrics.reporter.prom.port"), "{err}");
    }

    #[test]
    fn file_then_env_then_flags_in_that_order() {
        let f = write(
            "high-availability.type: etcd\nhigh-availability:\n  etcd:\n    endpoints: [\"a:1\", \"b:2\"]\nheartbeat.interval: 2 s\ntaskmanager.numberOfTaskSlots: 4\n",
        );
        let sources = ConfigSources {
            file: Some(f.path.clone()),
            env: vec![("KEEL_TASKMANAGER_NUMBEROFTASKSLOTS".into(), "8".into())],
            flags: vec!["heartbeat.interval=500ms".into()],
        };
        let c = Config::load(&sources).expect("valid config");
        assert_eq!(c.slots_per_taskmanager, 8);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
        match c.ha.backend {
            HaBackend::Etcd { endpoints, lease_ttl, .. } => {
                assert_eq!(endpoints, vec!["a:1".to_string(), "b:2".to_string()]);
                assert_eq!(lease_ttl, Duration::from_secs(3));
            }
            other => panic!("expected etcd, got {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_named_wherever_they_come_from() {
        let f = write("heartbeat.intervall: 1 s\ntaskmanager.numberOfTaskSlots: 2\n");
        let err = Config::load(&ConfigSources { file: Some(f.path.clone()), ..Default::default() })
            .expect_err("unknown key must fail");
        let msg = err.to_string();
        assert!(msg.contains("heartbeat.intervall"), "{msg}");

        let err = Config::load(&ConfigSources {
            env: vec![("KEEL_HEARTBEAT_INTERVALL".into(), "1".into())],
            ..Default::default()
        })
        .expect_err("unknown env var must fail");
        assert!(err.to_string().contains("KEEL_HEARTBEAT_INTERVALL"), "{err}");
        // The tests' and scripts' own variables are not keys, so they are not refused.
        Config::load(&ConfigSources {
            env: vec![
                ("KEEL_TEST_KAFKA_BOOTSTRAP".into(), "127.0.0.1:9092".into()),
                ("KEEL_TEST_KEEP".into(), "1".into()),
                ("KEEL_KAFKA_LIBS".into(), "/tmp".into()),
            ],
            ..Default::default()
        })
        .expect("test and script variables are ignored");

        let err = Config::load(&ConfigSources {
            flags: vec!["slot.request.timeot=1s".into()],
            ..Default::default()
        })
        .expect_err("unknown flag must fail");
        assert!(err.to_string().contains("slot.request.timeot"), "{err}");
    }

    #[test]
    fn bad_values_name_key_value_and_origin() {
        let err = Config::load(&ConfigSources {
            flags: vec!["heartbeat.timeout=soon".into()],
            ..Default::default()
        })
        .expect_err("bad duration");
        let msg = err.to_string();
        assert!(msg.contains("heartbeat.timeout") && msg.contains("soon"), "{msg}");
        let err = Config::load(&ConfigSources {
            flags: vec!["heartbeat.timeout=500ms".into()],
            ..Default::default()
        })
        .expect_err("timeout below interval");
        assert!(err.to_string().contains("longer than heartbeat.interval"), "{err}");
    }

    #[test]
    fn durations_parse_like_flink() {
        assert_eq!(parse_duration("500"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3 s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("5min"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn memory_sizes_parse_like_flink() {
        assert_eq!(parse_memory_size("4096"), Ok(4096));
        assert_eq!(parse_memory_size("256 kb"), Ok(256 << 10));
        assert_eq!(parse_memory_size("1MB"), Ok(1 << 20));
        assert_eq!(parse_memory_size("2 g"), Ok(2 << 30));
        assert!(parse_memory_size("1.5 mb").is_err());
        assert!(parse_memory_size("3 parsecs").is_err());
        assert!(parse_memory_size("").is_err());
        assert!(parse_memory_size("99999999999999999999 gb").is_err());
    }

    #[test]
    fn malloc_tuning_keys_are_typed_and_checked() {
        let c = Config::defaults();
        assert_eq!(c.taskmanager_malloc_trim_interval, Some(Duration::from_secs(1)));
        assert_eq!(c.taskmanager_malloc_mmap_threshold, Some(256 << 10));
        let c = Config::load(&ConfigSources {
            flags: vec![
                "taskmanager.memory.malloc-trim-interval=200 ms".into(),
                "taskmanager.memory.malloc-mmap-threshold=1 mb".into(),
            ],
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(c.taskmanager_malloc_trim_interval, Some(Duration::from_millis(200)));
        assert_eq!(c.taskmanager_malloc_mmap_threshold, Some(1 << 20));
        let c = Config::load(&ConfigSources {
            flags: vec![
                "taskmanager.memory.malloc-trim-interval=0".into(),
                "taskmanager.memory.malloc-mmap-threshold=0".into(),
            ],
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(c.taskmanager_malloc_trim_interval, None, "0: never");
        assert_eq!(c.taskmanager_malloc_mmap_threshold, None, "0: glibc's default");
        for (flag, key) in [
            ("taskmanager.memory.malloc-mmap-threshold=64 mb", "malloc-mmap-threshold"),
            ("taskmanager.memory.malloc-mmap-threshold=lots", "malloc-mmap-threshold"),
            ("taskmanager.memory.malloc-trim-interval=soon", "malloc-trim-interval"),
        ] {
            let err = Config::load(&ConfigSources { flags: vec![flag.into()], ..Default::default() })
                .expect_err(flag);
            assert!(err.to_string().contains(key), "{flag}: {err}");
        }
    }

    #[test]
    fn checkpointing_is_off_by_default_and_set_by_keys() {
        let c = Config::defaults();
        assert_eq!(c.checkpointing.interval, None);
        assert_eq!(c.checkpointing.timeout, Duration::from_secs(600));
        assert_eq!(c.checkpointing.min_pause, Duration::ZERO);
        assert_eq!(c.checkpointing.num_retained, 1);
        assert_eq!(c.checkpointing.dir, c.checkpoints_dir);
        let c = Config::load(&ConfigSources {
            flags: vec![
                "execution.checkpointing.interval=500 ms".into(),
                "state.checkpoints.num-retained=3".into(),
            ],
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(c.checkpointing.interval, Some(Duration::from_millis(500)));
        assert_eq!(c.checkpointing.num_retained, 3);
        let err = Config::load(&ConfigSources {
            flags: vec!["execution.checkpointing.interval=0".into()],
            ..Default::default()
        })
        .expect_err("zero interval");
        assert!(err.to_string().contains("execution.checkpointing.interval"), "{err}");
    }

    #[test]
    fn job_overrides_apply_and_name_the_bad_key() {
        let base = Config::defaults().checkpointing;
        let overrides: BTreeMap<String, String> = [
            ("execution.checkpointing.interval".to_string(), "2 s".to_string()),
            ("execution.checkpointing.min-pause".to_string(), "100ms".to_string()),
        ]
        .into();
        let c = base.with_overrides(&overrides).expect("valid overrides");
        assert_eq!(c.interval, Some(Duration::from_secs(2)));
        assert_eq!(c.min_pause, Duration::from_millis(100));
        assert_eq!(c.timeout, base.timeout);
        let bad: BTreeMap<String, String> =
            [("state.checkpoints.num-retained".to_string(), "0".to_string())].into();
        let (key, reason) = base.with_overrides(&bad).expect_err("zero retained");
        assert_eq!(key, "state.checkpoints.num-retained");
        assert!(reason.contains("at least 1"), "{reason}");
        assert!(check_job_config("heartbeat.interval", "1 s").is_err());
        assert!(check_job_config("execution.checkpointing.timeout", "soon").is_err());
    }

    #[test]
    fn restart_strategy_defaults_are_flinks() {
        let c = Config::defaults();
        let r = &c.restart;
        assert_eq!(r.strategy, RestartStrategyType::ExponentialDelay);
        assert_eq!(r.fixed_delay, FixedDelayConfig { attempts: 1, delay: Duration::from_secs(1) });
        let e = &r.exponential_delay;
        assert_eq!((e.initial_backoff, e.max_backoff), (Duration::from_secs(1), Duration::from_secs(60)));
        assert_eq!((e.backoff_multiplier, e.jitter_factor), (1.5, 0.1));
        assert_eq!(e.reset_backoff_threshold, Duration::from_secs(3600));
        assert_eq!(e.attempts_before_reset_backoff, None);
        assert_eq!(r.failure_rate.max_failures_per_interval, 1);
        assert_eq!(r.failure_rate.interval, Duration::from_secs(60));
        assert_eq!(r.failure_rate.delay, Duration::from_secs(1));
        assert_eq!(r.taskmanager_loss_quiet_period, Some(Duration::from_secs(60)));
        assert_eq!(r, &RestartConfig::builtin());
        assert_eq!(c.heartbeat_rpc_failure_threshold, Some(2));
        // Every restart key is in KEYS and in JOB_CONFIG_KEYS; the job keys are exactly the
        // checkpointing keys and the restart keys.
        for key in RESTART_CONFIG_KEYS {
            assert!(key_info(key).is_some(), "{key} missing from KEYS");
        }
        let both: Vec<&str> = CHECKPOINT_CONFIG_KEYS.iter().chain(RESTART_CONFIG_KEYS).copied().collect();
        assert_eq!(JOB_CONFIG_KEYS, both.as_slice());
    }

    #[test]
    fn restart_strategy_types_accept_flinks_aliases() {
        for (text, t) in [
            ("fixed-delay", RestartStrategyType::FixedDelay),
            ("fixeddelay", RestartStrategyType::FixedDelay),
            ("exponential-delay", RestartStrategyType::ExponentialDelay),
            ("ExponentialDelay", RestartStrategyType::ExponentialDelay),
            ("failure-rate", RestartStrategyType::FailureRate),
            ("failurerate", RestartStrategyType::FailureRate),
            ("none", RestartStrategyType::None),
            ("off", RestartStrategyType::None),
            ("disable", RestartStrategyType::None),
        ] {
            assert_eq!(RestartStrategyType::parse(text), Ok(t), "{text}");
        }
        let err = Config::load(&ConfigSources {
            flags: vec!["restart-strategy.type=sometimes".into()],
            ..Default::default()
        })
        .expect_err("unknown type");
        assert!(err.to_string().contains("restart-strategy.type") && err.to_string().contains("sometimes"));
    }

    #[test]
    fn restart_strategy_keys_are_set_and_checked() {
        let c = Config::load(&ConfigSources {
            flags: vec![
                "restart-strategy.type=fixed-delay".into(),
                "restart-strategy.fixed-delay.attempts=3".into(),
                "restart-strategy.fixed-delay.delay=250 ms".into(),
                "restart-strategy.exponential-delay.attempts-before-reset-backoff=5".into(),
                "restart-strategy.taskmanager-loss.quiet-period=OFF".into(),
            ],
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(c.restart.strategy, RestartStrategyType::FixedDelay);
        assert_eq!(
            c.restart.fixed_delay,
            FixedDelayConfig { attempts: 3, delay: Duration::from_millis(250) }
        );
        assert_eq!(c.restart.exponential_delay.attempts_before_reset_backoff, Some(5));
        assert_eq!(c.restart.taskmanager_loss_quiet_period, None);
        let mut r = RestartConfig::builtin();
        r.set("restart-strategy.taskmanager-loss.quiet-period", "30 s").expect("a duration");
        assert_eq!(r.taskmanager_loss_quiet_period, Some(Duration::from_secs(30)));
        assert_eq!(
            c.restart.describe(),
            "fixed-delay (3 restart attempts, 250 ms delay)",
            "quiet period off"
        );
        assert_eq!(
            RestartConfig::builtin().describe(),
            "exponential-delay (backoff 1 s x1.5 up to 1 min, jitter 0.1, reset after 1 h, unlimited restarts); \
             a lost taskmanager after 1 min without failures restarts at once"
        );
        for (flag, key) in [
            ("restart-strategy.exponential-delay.jitter-factor=1.5", "jitter-factor"),
            ("restart-strategy.exponential-delay.backoff-multiplier=0.5", "backoff-multiplier"),
            ("restart-strategy.exponential-delay.initial-backoff=0", "initial-backoff"),
            ("restart-strategy.exponential-delay.attempts-before-reset-backoff=0", "attempts-before"),
            ("restart-strategy.fixed-delay.attempts=-1", "fixed-delay.attempts"),
            ("restart-strategy.failure-rate.max-failures-per-interval=0", "max-failures-per-interval"),
            ("restart-strategy.failure-rate.failure-rate-interval=soon", "failure-rate-interval"),
            ("restart-strategy.taskmanager-loss.quiet-period=0", "taskmanager-loss.quiet-period"),
            ("restart-strategy.taskmanager-loss.quiet-period=never", "taskmanager-loss.quiet-period"),
            // initial above max: the error names max-backoff.
            ("restart-strategy.exponential-delay.initial-backoff=2 min", "max-backoff"),
        ] {
            let err = Config::load(&ConfigSources { flags: vec![flag.into()], ..Default::default() })
                .expect_err(flag);
            assert!(err.to_string().contains(key), "{flag}: {err}");
        }
    }

    #[test]
    fn restart_keys_are_overridden_per_job() {
        let base = Config::defaults();
        let overrides: BTreeMap<String, String> = [
            ("restart-strategy.type".to_string(), "failure-rate".to_string()),
            ("restart-strategy.failure-rate.max-failures-per-interval".to_string(), "3".to_string()),
            ("execution.checkpointing.interval".to_string(), "2 s".to_string()),
        ]
        .into();
        let r = base.restart.with_overrides(&overrides).expect("valid overrides");
        assert_eq!(r.strategy, RestartStrategyType::FailureRate);
        assert_eq!(r.failure_rate.max_failures_per_interval, 3);
        assert_eq!(r.failure_rate.delay, base.restart.failure_rate.delay);
        // The checkpointing settings take their keys and leave the restart keys alone.
        let c = base.checkpointing.with_overrides(&overrides).expect("valid checkpoint overrides");
        assert_eq!(c.interval, Some(Duration::from_secs(2)));
        // A combination that is only wrong together is refused with the key named.
        let bad: BTreeMap<String, String> =
            [("restart-strategy.exponential-delay.max-backoff".to_string(), "100 ms".to_string())].into();
        let (key, reason) = base.restart.with_overrides(&bad).expect_err("max below initial");
        assert_eq!(key, "restart-strategy.exponential-delay.max-backoff");
        assert!(reason.contains("initial-backoff"), "{reason}");
        assert!(check_job_config("restart-strategy.type", "fixeddelay").is_ok());
        assert!(check_job_config("restart-strategy.fixed-delay.attempts", "many").is_err());
        assert!(check_job_config("restart-strategy.fixed-delay.tries", "2").is_err());
    }

    #[test]
    fn rpc_failure_threshold_is_a_count_or_disabled() {
        let load = |v: &str| {
            Config::load(&ConfigSources {
                flags: vec![format!("heartbeat.rpc-failure-threshold={v}")],
                ..Default::default()
            })
        };
        assert_eq!(load("5").expect("valid").heartbeat_rpc_failure_threshold, Some(5));
        assert_eq!(load("-1").expect("valid").heartbeat_rpc_failure_threshold, None);
        for bad in ["0", "-2", "two"] {
            let err = load(bad).expect_err(bad);
            assert!(err.to_string().contains("heartbeat.rpc-failure-threshold"), "{err}");
        }
    }

    #[test]
    fn durations_are_written_back_readably() {
        assert_eq!(format_duration(Duration::from_millis(250)), "250 ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(format_duration(Duration::from_secs(60)), "1 min");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1 h");
        assert_eq!(format_duration(Duration::ZERO), "0 ms");
    }

    #[test]
    fn env_var_names_follow_the_key() {
        assert_eq!(env_var_for("heartbeat.interval"), "KEEL_HEARTBEAT_INTERVAL");
        assert_eq!(env_var_for("high-availability.etcd.lease-ttl"), "KEEL_HIGH_AVAILABILITY_ETCD_LEASE_TTL");
    }
}
