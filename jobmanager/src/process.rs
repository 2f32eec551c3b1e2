//! One JobManager process: binds its gRPC port, serves [`JmService`] at once (leader or
//! standby), and campaigns for leadership, leading ([`JobManager::lead_once`]) each time it wins.

use std::sync::{Arc, RwLock};

use keel_client::{Channels, LeaderClient};
use keel_config::Config;
use keel_ha::{CheckpointPointerStore, HaServices, JobStore, Role};
use keel_proto::pb::job_manager_server::JobManagerServer;
use keel_proto::{KeelError, Result};
use tokio_util::sync::CancellationToken;

use crate::leader::JobManager;
use crate::service::JmService;
use crate::state::JobManagerCtx;

/// Runs a JobManager process until `shutdown`: serves gRPC at once and campaigns for
/// leadership; prints `keel jobmanager listening on <address>` when the port is bound.
pub async fn run(config: Config, ha: Arc<dyn HaServices>, shutdown: CancellationToken) -> Result<()> {
    let rpc = config.jobmanager_rpc.clone();
    let (incoming, address) = keel_client::bind(&rpc.host, rpc.port).await?;
    println!("keel jobmanager listening on {address}");
    tracing::info!(%address, ha = ha.backend_name(), "jobmanager started");
    let rm = LeaderClient::from_ha(Role::ResourceManager, &ha, shutdown.clone());
    let ctx = Arc::new(JobManagerCtx {
        leader_watch: ha.watch_leader(Role::JobManager, shutdown.clone()),
        jobs: JobStore::new(ha.clone()),
        pointers: CheckpointPointerStore::new(ha.clone()),
        ha: ha.clone(),
        rm,
        channels: Channels::default(),
        address,
        config,
        clock: keel_ha::clock::system(),
    });
    let jm = Arc::new(JobManager { ctx, state: RwLock::new(None) });
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobManagerServer::new(JmService(jm.clone())))
            .serve_with_incoming_shutdown(incoming, async move { server_shutdown.cancelled().await }),
    );
    let address = jm.ctx.address.clone();
    keel_ha::run_for_leadership(ha, Role::JobManager, address, shutdown.clone(), |leadership| {
        jm.clone().lead_once(leadership, shutdown.clone())
    })
    .await;
    shutdown.cancel();
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(KeelError::internal(format!("jobmanager server: {e}"))),
        Err(e) => Err(KeelError::internal(format!("jobmanager server task: {e}"))),
    }
}
