//! The `keel` binary: parses arguments and calls the libraries. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel::{Output, Session};

/// The global allocator: mimalloc with `--features mimalloc`, jemalloc with `--features
/// jemalloc` (mimalloc when both are on, so that `--all-features` builds), else the system
/// allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel: a high-availability cluster runtime for streaming jobs")]
struct Cli {
    /// Configuration file (YAML, Flink-like keys).
    #[arg(long, short = 'c', global = true, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// Override a configuration key: --set heartbeat.interval=500ms (repeatable).
    #[arg(long = "set", short = 'D', global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Output format of client verbs.
    #[arg(long, short = 'o', global = true, default_value = "text", env = "KEEL_OUTPUT")]
    output: Output,
    /// Talk to this JobManager instead of finding the leader through the HA services.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    jobmanager: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a ResourceManager (leader or standby).
    Resourcemanager,
    /// Run a JobManager (leader or standby).
    Jobmanager,
    /// Run a TaskManager.
    Taskmanager,
    /// Run a member of the embedded Raft HA store (`high-availability.type: raft`), the one
    /// `high-availability.raft.member-id` names.
    HaMember,
    /// Submit a job spec (YAML, or a Flink SQL script ending in `.sql`) and wait until it runs.
    Run {
        file: PathBuf,
        /// Check the spec and print its plan, like `keel explain`, without submitting it.
        #[arg(long)]
        dry_run: bool,
        /// Return right after submission instead of waiting for the job to run.
        #[arg(long, short = 'd')]
        detached: bool,
        /// Start from the latest completed checkpoint of the most recent earlier job with the
        /// same name (fails when there is none).
        #[arg(long)]
        restore: bool,
        /// Start from this savepoint (its `_metadata` file or directory), e.g. one printed by
        /// `keel savepoint` or `keel stop`.
        #[arg(long, value_name = "PATH", conflicts_with = "restore")]
        from_savepoint: Option<String>,
        /// With --from-savepoint: drop the state of sources the spec no longer has.
        #[arg(long, requires = "from_savepoint")]
        allow_non_restored_state: bool,
    },
    /// Check a job spec (YAML or SQL) with no cluster and print its plan: the sources with
    /// their formats and columns, each sink's filter, projection and columns. Exits non-zero
    /// with the error when the spec is invalid.
    Explain {
        file: PathBuf,
        /// Print the YAML spec the cluster would be sent instead (for a SQL script, its YAML twin).
        #[arg(long)]
        yaml: bool,
    },
    /// List jobs.
    List,
    /// Show a job: versions, tasks and where each runs.
    Status { job: String },
    /// Cancel a job and wait until its slots are free.
    Cancel {
        job: String,
        /// Return right after the request instead of waiting for `canceled`.
        #[arg(long, short = 'd')]
        detached: bool,
    },
    /// Replace a running job's version with the spec in FILE: a handover (the new version is
    /// deployed while the old one runs, the old one drains with a savepoint, the new one
    /// starts from it), printing each step and the measured output pause.
    Upgrade {
        job: String,
        file: PathBuf,
        #[command(flatten)]
        how: UpgradeArgs,
        /// Drop the state of sources the new version no longer has.
        #[arg(long)]
        allow_non_restored_state: bool,
    },
    /// Change a running job's parallelism by a handover upgrade (Kafka partitions are
    /// redistributed with their offsets).
    Rescale {
        job: String,
        #[arg(long, short = 'p')]
        parallelism: u32,
        #[command(flatten)]
        how: UpgradeArgs,
    },
    /// Make the side-by-side version of a job (`keel upgrade --mode side-by-side`) its active
    /// version by a handover.
    Promote { job: String },
    /// Take a savepoint of a running job (kept until deleted); the job keeps running.
    Savepoint { job: String },
    /// Stop a running job with a final savepoint: its sources stop at the savepoint, its
    /// output up to there is committed, and the job finishes. Start it again with
    /// `keel run FILE --from-savepoint PATH`.
    Stop { job: String },
    /// List a job's versions: state, parallelism, the savepoints each started from and ended with.
    History { job: String },
    /// Go back to an earlier version's spec by a handover upgrade from the current state.
    Rollback {
        job: String,
        /// The version whose spec to run again (default: the one before the active version).
        #[arg(long)]
        to: Option<u32>,
    },
    /// Show the cluster: leaders with epochs, TaskManagers, slots used and free.
    Cluster,
    /// Start a local three-process cluster (ResourceManager, JobManager, TaskManager).
    Dev(keel_deploy::DevArgs),
    /// Configuration keys and the effective configuration.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
}

#[derive(clap::Args)]
struct UpgradeArgs {
    /// `handover` (default), `stop-start` (old slots released before the new version asks
    /// for its own), `cancel-on-update` (the old version is canceled at once; the new one
    /// starts from the latest checkpoint), `side-by-side` (the new version runs beside the old
    /// one, with its own sink topics and consumer groups, until `keel promote`).
    #[arg(long, default_value = "handover")]
    mode: String,
    /// `stateful` (drain the old version with a savepoint first) or `stateless` (cancel it).
    #[arg(long, default_value = "stateful")]
    upgrade_strategy: String,
    /// `latest-state`, `latest-savepoint` or `none`: the state the new version starts from.
    #[arg(long, default_value = "latest-state")]
    restore_strategy: String,
}

impl UpgradeArgs {
    fn options(self, allow_non_restored_state: bool) -> keel::client::UpgradeOptions {
        keel::client::UpgradeOptions {
            mode: self.mode,
            upgrade_strategy: self.upgrade_strategy,
            restore_strategy: self.restore_strategy,
            allow_non_restored_state,
        }
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Every known key with its default and environment variable.
    Keys,
    /// The effective configuration and where each value comes from.
    Show,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let session =
        Session { config_file: cli.config, set: cli.set, output: cli.output, jobmanager: cli.jobmanager };
    let result = match cli.command {
        Command::Resourcemanager => session.role(keel::RoleCmd::ResourceManager),
        Command::Jobmanager => session.role(keel::RoleCmd::JobManager),
        Command::Taskmanager => session.role(keel::RoleCmd::TaskManager),
        Command::HaMember => session.role(keel::RoleCmd::HaMember),
        Command::Run { file, dry_run: true, .. } => keel::spec_file::explain(&file, false),
        Command::Explain { file, yaml } => keel::spec_file::explain(&file, yaml),
        Command::Run {
            file,
            dry_run: false,
            detached,
            restore,
            from_savepoint,
            allow_non_restored_state,
        } => session.client(|c| async move {
            c.run(&file, detached, restore, from_savepoint.as_deref(), allow_non_restored_state).await
        }),
        Command::List => session.client(|c| async move { c.list().await }),
        Command::Status { job } => session.client(|c| async move { c.status(&job).await }),
        Command::Cancel { job, detached } => {
            session.client(|c| async move { c.cancel(&job, detached).await })
        }
        Command::Upgrade { job, file, how, allow_non_restored_state } => {
            let options = how.options(allow_non_restored_state);
            session.client(|c| async move { c.upgrade(&job, Some(&file), 0, &options).await })
        }
        Command::Rescale { job, parallelism, how } => {
            let options = how.options(false);
            session.client(|c| async move { c.upgrade(&job, None, parallelism, &options).await })
        }
        Command::Promote { job } => session.client(|c| async move { c.promote(&job).await }),
        Command::Savepoint { job } => session.client(|c| async move { c.savepoint(&job, false).await }),
        Command::Stop { job } => session.client(|c| async move { c.savepoint(&job, true).await }),
        Command::History { job } => session.client(|c| async move { c.history(&job).await }),
        Command::Rollback { job, to } => session.client(|c| async move { c.rollback(&job, to).await }),
        Command::Cluster => session.client(|c| async move { c.cluster().await }),
        Command::Dev(args) => session.dev(args),
        Command::Config { what: ConfigCommand::Keys } => session.config_keys(),
        Command::Config { what: ConfigCommand::Show } => session.config_show(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", keel::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}
