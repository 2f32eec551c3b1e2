//! The TaskManager: slots and the tasks running in them.
//!
//! Layout:
//! - [`start`] / [`run`]: bind the gRPC server, follow the leaders, drain on shutdown.
//! - [`service`]: the `TaskManager` gRPC service (slots, deployments, checkpoints), fenced by
//!   leader epochs ([`fence`]).
//! - [`slots`]: the slot table (pure logic).
//! - [`shared`]: the state shared by the service and the background loops.
//! - [`deploy`]: starting a deployed task with its state reporter and checkpoint acker.
//! - [`failure_log`]: quiet logging of a loop's repeated failures.
//! - [`task`]: tasks, their state machine and their operator chains (sources, sinks, barriers).
//! - [`rm`]: registration and heartbeats with the ResourceManager leader.
//! - [`jm`]: task state reports, checkpoint acknowledgements and heartbeats to the JobManager
//!   leader.
//!
//! On start the TaskManager prints two lines to stdout that tests and the dev cluster parse:
//! `keel taskmanager listening on <host:port> id <taskmanager id>`, then
//! `keel taskmanager metrics on <host:port>`: its Prometheus endpoint (`GET /metrics`, port
//! `metrics.reporter.prom.port`), serving the metrics of its running tasks
//! ([`task::metrics`]).

pub mod deploy;
pub mod failure_log;
pub mod fence;
pub mod jm;
pub mod rm;
pub mod service;
pub mod shared;
pub mod slots;
pub mod task;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use keel_client::LeaderClient;
use keel_config::Config;
use keel_ha::{HaServices, Role};
use keel_proto::pb::task_manager_server::TaskManagerServer;
use keel_proto::{KeelError, Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::service::TaskManagerService;
use crate::shared::Shared;

/// How long shutdown waits for the tasks to stop.
const TASK_DRAIN: Duration = Duration::from_secs(15);
/// How long shutdown then waits for the final task states to reach the JobManager.
const REPORT_DRAIN: Duration = Duration::from_secs(3);

/// A TaskManager whose server is bound and running.
pub struct RunningTaskManager {
    /// The advertised address, `host:port`.
    pub address: String,
    /// Where `GET /metrics` is served, `host:port`.
    pub metrics_address: String,
    pub taskmanager_id: String,
    shared: Arc<Shared>,
    handle: JoinHandle<Result<()>>,
}

impl RunningTaskManager {
    /// The state shared by the service and the loops (for tests and introspection).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Waits until the TaskManager has stopped (after `shutdown` was cancelled and the drain
    /// finished, or when its server failed).
    pub async fn wait(self) -> Result<()> {
        self.handle
            .await
            .map_err(|e| KeelError::internal(format!("taskmanager lifecycle task panicked: {e}")))?
    }
}

/// Starts a TaskManager and runs it until `shutdown` is cancelled.
pub async fn run(config: Config, ha: Arc<dyn HaServices>, shutdown: CancellationToken) -> Result<()> {
    start(config, ha, shutdown).await?.wait().await
}

/// Binds the gRPC server on `taskmanager.rpc.address:port` (port 0 picks a free one), prints
/// the listening line, starts following the ResourceManager and JobManager leaders and returns.
pub async fn start(
    config: Config,
    ha: Arc<dyn HaServices>,
    shutdown: CancellationToken,
) -> Result<RunningTaskManager> {
    let host = config.taskmanager_rpc.host.trim().to_string();
    let bind = format!("{host}:{}", config.taskmanager_rpc.port);
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .map_err(|e| KeelError::internal(format!("cannot bind the taskmanager rpc address {bind}: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| KeelError::internal(format!("cannot read the bound address of {bind}: {e}")))?
        .port();
    let address = format!("{host}:{port}");
    let id = config.taskmanager_id.clone().unwrap_or_else(|| format!("tm-{host}-{port}"));
    let registry = keel_metrics::Registry::new();
    let metrics_bind = format!("{host}:{}", config.metrics_prom_port);
    let metrics_stop = CancellationToken::new();
    let (metrics_bound, metrics_server) =
        keel_metrics::serve(&metrics_bind, registry.clone(), metrics_stop.clone()).await.map_err(|e| {
            KeelError::internal(format!(
                "cannot bind the taskmanager metrics address {metrics_bind} (metrics.reporter.prom.port): {e}"
            ))
        })?;
    let metrics_address = format!("{host}:{}", metrics_bound.port());
    let slots = config.slots_per_taskmanager;
    let interval = config.heartbeat_interval;

    // Lives until the very end of the drain: the leader watches and the background loops.
    let background = CancellationToken::new();
    let jm = LeaderClient::from_ha(Role::JobManager, &ha, background.clone()).with_retry_for(interval);
    let rm = LeaderClient::from_ha(Role::ResourceManager, &ha, background.clone()).with_retry_for(interval);
    let mut shared = Shared::new(id.clone(), address.clone(), slots, interval, jm);
    shared.registry = registry;
    shared.cut_off_after = config.heartbeat_timeout;
    let shared = Arc::new(shared);

    let loops = tokio_util::task::TaskTracker::new();
    loops.spawn(rm::run(shared.clone(), rm.clone(), background.clone()));
    loops.spawn(jm::heartbeat_loop(shared.clone(), background.clone()));
    loops.spawn(jm::cut_off_watchdog(shared.clone(), background.clone()));
    loops.close();

    let server_stop = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(TaskManagerServer::new(TaskManagerService::new(shared.clone())))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            server_stop.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);

    tracing::info!(address = %address, metrics_address = %metrics_address, taskmanager_id = %id, slots, "taskmanager started");
    let mut stdout = std::io::stdout().lock();
    // The lines are what tests and the dev cluster wait for; a closed stdout is not fatal.
    let _ = writeln!(stdout, "keel taskmanager listening on {address} id {id}")
        .and_then(|_| writeln!(stdout, "keel taskmanager metrics on {metrics_address}"))
        .and_then(|_| stdout.flush());
    drop(stdout);

    let metrics = MetricsEndpoint { stop: metrics_stop, server: metrics_server };
    let handle = tokio::spawn(lifecycle(
        shared.clone(),
        rm,
        server,
        server_stop,
        background,
        loops,
        metrics,
        shutdown,
    ));
    Ok(RunningTaskManager { address, metrics_address, taskmanager_id: id, shared, handle })
}

/// The running `GET /metrics` server.
struct MetricsEndpoint {
    stop: CancellationToken,
    server: JoinHandle<()>,
}

/// Waits for shutdown (or a server failure), then drains in order: no new tasks, deregister
/// from the ResourceManager, cancel every
/// task and wait for them, let their final states reach the JobManager, stop the loops, stop
/// the servers.
#[allow(clippy::too_many_arguments)]
async fn lifecycle(
    shared: Arc<Shared>,
    rm: LeaderClient,
    mut server: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    server_stop: CancellationToken,
    background: CancellationToken,
    loops: tokio_util::task::TaskTracker,
    metrics: MetricsEndpoint,
    shutdown: CancellationToken,
) -> Result<()> {
    let early = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        r = &mut server => Some(r),
    };
    tracing::info!(taskmanager_id = %shared.id, "taskmanager stopping");
    shared.stopping.cancel();
    // Leave the slot table before the tasks stop, so that the jobs restart elsewhere at once
    // and no slot request picks this TaskManager meanwhile.
    rm::deregister(&shared, &rm, "the taskmanager is shutting down").await;
    shared.cancel_all_for_shutdown("the taskmanager is shutting down");
    shared.tasks_tracker.close();
    if tokio::time::timeout(TASK_DRAIN, shared.tasks_tracker.wait()).await.is_err() {
        tracing::warn!(timeout = ?TASK_DRAIN, "tasks did not stop in time");
    }
    shared.reporters.close();
    if tokio::time::timeout(REPORT_DRAIN, shared.reporters.wait()).await.is_err() {
        tracing::warn!(timeout = ?REPORT_DRAIN, "final task states not all delivered to the jobmanager");
    }
    shared.reporters_stop.cancel();
    background.cancel();
    loops.wait().await;
    server_stop.cancel();
    let served = match early {
        Some(r) => r,
        None => server.await,
    };
    metrics.stop.cancel();
    if let Err(e) = metrics.server.await {
        tracing::warn!(error = %e, "the metrics endpoint panicked");
    }
    let result = match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(KeelError::internal(format!(
            "taskmanager rpc server failed: {}",
            keel_proto::error_chain(&e)
        ))),
        Err(e) => Err(KeelError::internal(format!("taskmanager rpc server panicked: {e}"))),
    };
    tracing::info!(taskmanager_id = %shared.id, "taskmanager stopped");
    result
}

#[cfg(test)]
mod tests;
