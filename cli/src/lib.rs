//! What the `keel` binary does, as a library.
//!
//! Layout:
//! - [`Session`]: the global flags (config file, `--set` overrides, output format) and the entry
//!   points: running a role, running a client verb, the dev cluster, config listings.
//! - [`client`]: the client verbs (`run`, `list`, `status`, `cancel`, `cluster`) and their
//!   output, as text for people and JSON for scripts.

pub mod client;
mod format;
pub mod spec_file;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use keel_config::{Config, ConfigSources, KEYS};
use tokio_util::sync::CancellationToken;

pub use client::Client;

/// Output format of client verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy)]
pub enum RoleCmd {
    ResourceManager,
    JobManager,
    TaskManager,
    HaMember,
}

/// The global flags of one invocation.
pub struct Session {
    pub config_file: Option<PathBuf>,
    pub set: Vec<String>,
    pub output: Output,
    pub jobmanager: Option<String>,
}

/// An error with its whole cause chain on one line.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut out = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,tower=warn,hyper=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Cancels `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

/// glibc allocator settings of a TaskManager (`taskmanager.memory.malloc-*`), applied with
/// glibc's own `mallopt` and `malloc_trim` rather than another allocator: mimalloc and jemalloc
/// both measured a higher peak RSS (docs/kafka.md, "Memory").
///
/// A TaskManager's threads (librdkafka runs several per client) each get an arena, and every
/// arena keeps its high-water mark resident: fewer arenas save memory at a CPU cost (contention
/// on the shared arena), a fixed mmap threshold keeps large buffers out of the arenas, and a
/// periodic trim hands the arenas' free pages back.
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc"), not(feature = "jemalloc")))]
#[allow(unsafe_code)]
mod malloc_tuning {
    use std::sync::mpsc;
    use std::time::Duration;

    /// Sets `M_ARENA_MAX` and `M_MMAP_THRESHOLD`. Must run before the process starts a second
    /// thread: each thread's first allocation picks its arena.
    pub fn configure(arenas: Option<u32>, mmap_threshold: Option<u64>) {
        if let Some(arenas) = arenas {
            set(libc::M_ARENA_MAX, "M_ARENA_MAX", arenas.into());
        }
        if let Some(bytes) = mmap_threshold {
            // The config caps it at 32 MiB; glibc refuses a value beyond its maximum.
            set(libc::M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD", bytes);
        }
    }

    fn set(param: libc::c_int, name: &'static str, value: u64) {
        let n = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a glibc allocator parameter; it refuses (returns 0) a
        // value out of range.
        if unsafe { libc::mallopt(param, n) } == 1 {
            tracing::info!(param = name, value, "mallopt set");
        } else {
            tracing::warn!(param = name, value, "mallopt refused; glibc's default stays");
        }
    }

    /// Trims the arenas every `interval` on a thread of its own, until [`Trimming`] is dropped.
    /// The thread allocates nothing, so it takes no arena of its own.
    pub fn start_trimming(interval: Duration) -> std::io::Result<Trimming> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("malloc-trim".into()).spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                // SAFETY: malloc_trim takes each arena's lock and returns free pages to the OS;
                // it is safe to call from any thread at any time.
                unsafe { libc::malloc_trim(0) };
            }
        })?;
        Ok(Trimming { stop: Some(stop), thread: Some(thread) })
    }

    /// The trimming thread; dropping it stops the thread and waits for it.
    pub struct Trimming {
        stop: Option<mpsc::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Drop for Trimming {
        fn drop(&mut self) {
            drop(self.stop.take());
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn resident_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("VmRSS in /proc/self/status")
        }

        /// Proves that the trimming thread hands freed arena memory back: 64 MiB of blocks below
        /// the mmap threshold are freed behind a block that stays live, so glibc's own top-of-heap
        /// trim cannot return them; only `malloc_trim` can, and resident memory must drop.
        #[test]
        fn the_trimming_thread_returns_freed_arena_pages() {
            // Allocated and freed on a thread of its own: a fresh arena, away from other tests'.
            let before = std::thread::spawn(|| {
                let blocks: Vec<Vec<u8>> = (0..1024).map(|i| vec![i as u8; 64 * 1024]).collect();
                let keep = vec![1u8; 1024];
                let resident = resident_kib();
                drop(blocks);
                std::hint::black_box(&keep);
                (resident, keep)
            })
            .join()
            .expect("allocating thread");
            let trimming = start_trimming(Duration::from_millis(20)).expect("start trimming");
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while resident_kib() + 32 * 1024 > before.0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "resident {} KiB, {} KiB with the blocks: freed pages were not returned",
                    resident_kib(),
                    before.0
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(trimming);
        }
    }
}

#[cfg(not(all(
    target_os = "linux",
    target_env = "gnu",
    not(feature = "mimalloc"),
    not(feature = "jemalloc")
)))]
mod malloc_tuning {
    use std::time::Duration;

    pub fn configure(arenas: Option<u32>, mmap_threshold: Option<u64>) {
        if arenas.is_some() || mmap_threshold.is_some() {
            tracing::debug!("taskmanager.memory.malloc-* apply to glibc's allocator only");
        }
    }

    pub struct Trimming;

    pub fn start_trimming(_interval: Duration) -> std::io::Result<Trimming> {
        tracing::debug!("taskmanager.memory.malloc-trim-interval applies to glibc's allocator only");
        Ok(Trimming)
    }
}

/// `keel ha-member`: one member of the Raft HA store, listening on its own address from
/// `high-availability.raft.members`; prints `keel ha-member listening on <address>` when bound.
async fn run_ha_member(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let keel_config::HaBackend::Raft { members, member_id, storage_dir, .. } = &config.ha.backend else {
        anyhow::bail!(
            "keel ha-member runs a member of the raft HA backend: set high-availability.type: raft"
        );
    };
    let Some(id) = *member_id else {
        anyhow::bail!("keel ha-member needs high-availability.raft.member-id (one of the ids in high-availability.raft.members)");
    };
    let address = members
        .iter()
        .find(|(m, _)| *m == id)
        .map(|(_, a)| a.clone())
        .with_context(|| format!("member {id} is not in high-availability.raft.members"))?;
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .with_context(|| format!("member {id}: address {address} is not host:port"))?;
    let (incoming, bound) = keel_client::bind(&host, port).await?;
    println!("keel ha-member listening on {bound}");
    let settings = keel_ha::raft::MemberSettings {
        id,
        members: members.iter().cloned().collect(),
        dir: storage_dir.join(format!("raft-{id}")),
        timing: keel_ha::raft::Timing::default(),
    };
    tracing::info!(member = id, %bound, dir = %settings.dir.display(), "ha-member started");
    keel_ha::raft::member::run(settings, incoming, shutdown).await?;
    Ok(())
}

impl Session {
    pub fn load_config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&ConfigSources::from_process(self.config_file.clone(), self.set.clone()))?)
    }

    /// Runs one cluster role until SIGTERM or Ctrl-C.
    pub fn role(&self, role: RoleCmd) -> anyhow::Result<()> {
        init_logging();
        let config = self.load_config()?;
        // Dropped when the role returns, which ends the trimming thread.
        let mut _trimming = None;
        if let RoleCmd::TaskManager = role {
            // Before the runtime starts any thread: each thread's first allocation picks its arena.
            malloc_tuning::configure(
                config.taskmanager_malloc_arenas,
                config.taskmanager_malloc_mmap_threshold,
            );
            if let Some(interval) = config.taskmanager_malloc_trim_interval {
                _trimming =
                    Some(malloc_tuning::start_trimming(interval).context("starting the malloc-trim thread")?);
            }
        }
        runtime()?.block_on(async move {
            let shutdown = CancellationToken::new();
            cancel_on_signal(shutdown.clone());
            if let RoleCmd::HaMember = role {
                run_ha_member(&config, shutdown).await?;
                tracing::info!("stopped");
                return Ok(());
            }
            let ha = keel_ha::connect(&config.ha).await?;
            match role {
                RoleCmd::ResourceManager => keel_resourcemanager::run(config, ha, shutdown).await?,
                RoleCmd::JobManager => keel_jobmanager::run(config, ha, shutdown).await?,
                RoleCmd::TaskManager => keel_taskmanager::run(config, ha, shutdown).await?,
                RoleCmd::HaMember => {}
            }
            tracing::info!("stopped");
            Ok(())
        })
    }

    /// Runs a client verb.
    pub fn client<F, Fut>(&self, verb: F) -> anyhow::Result<()>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        if std::env::var_os("KEEL_LOG").is_some() {
            init_logging();
        }
        let config = self.load_config()?;
        let output = self.output;
        let jobmanager = self.jobmanager.clone();
        runtime()?.block_on(async move {
            let shutdown = CancellationToken::new();
            let client = Arc::new(Client::connect(config, output, jobmanager, shutdown.clone()).await?);
            let result = verb(client).await;
            shutdown.cancel();
            result
        })
    }

    pub fn dev(&self, args: keel_deploy::DevArgs) -> anyhow::Result<()> {
        runtime()?.block_on(async move {
            let shutdown = CancellationToken::new();
            cancel_on_signal(shutdown.clone());
            keel_deploy::run_dev_cluster(args, self.set.clone(), shutdown).await
        })
    }

    pub fn config_keys(&self) -> anyhow::Result<()> {
        match self.output {
            Output::Json => {
                let keys: Vec<serde_json::Value> = KEYS
                    .iter()
                    .map(|k| serde_json::json!({"key": k.key, "default": k.default, "env": k.env_var(), "help": k.help}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&keys)?);
            }
            Output::Text => {
                let rows: Vec<Vec<String>> = KEYS
                    .iter()
                    .map(|k| vec![k.key.to_string(), k.default.to_string(), k.env_var(), k.help.to_string()])
                    .collect();
                print!("{}", format::table(&["KEY", "DEFAULT", "ENVIRONMENT", "MEANING"], &rows));
            }
        }
        Ok(())
    }

    pub fn config_show(&self) -> anyhow::Result<()> {
        let config = self.load_config()?;
        match self.output {
            Output::Json => {
                let map: serde_json::Map<String, serde_json::Value> = config
                    .effective
                    .iter()
                    .map(|(k, (v, origin))| (k.clone(), serde_json::json!({"value": v, "from": origin})))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&map)?);
            }
            Output::Text => {
                let rows: Vec<Vec<String>> = config
                    .effective
                    .iter()
                    .map(|(k, (v, o))| vec![k.clone(), v.clone(), o.clone()])
                    .collect();
                print!("{}", format::table(&["KEY", "VALUE", "FROM"], &rows));
            }
        }
        Ok(())
    }
}
