//! Barnacle controller: the CSI Identity and Controller services, replica placement, volume
//! records, and the orchestration of each volume's replica and engine processes.
//!
//! - [`csi`]: the gRPC adapter (validation, conversion, error codes);
//! - [`service`]: the domain operations, each under a per-volume guard;
//! - [`store`]: volume and snapshot records behind the `Store` trait (RocksDB embedded);
//!   [`k8s_store`] keeps them as custom resources ([`crd`]) in a cluster;
//! - [`orchestrator`]: the trait that runs replicas and engines; [`local`] runs them as child
//!   processes ([`supervise`] watches them), [`k8s`] as pods; [`leader`] elects one controller;
//! - [`placement`] and [`params`]: where replicas go and what a StorageClass may say;
//! - [`rpc`]: clients of the replicas' and engines' management APIs.

pub mod admin;
pub mod crd;
pub mod csi;
pub mod error;
pub mod k8s;
pub mod k8s_store;
pub mod leader;
pub mod local;
pub mod metrics;
pub mod orchestrator;
pub mod params;
pub mod placement;
pub mod rpc;
pub mod service;
pub mod store;
pub mod supervise;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use error::ControllerError;
use service::Service;

/// Serves the Identity and Controller services on `listener` until `shutdown` fires, recovering
/// the processes of existing volumes in the background; then stops watching them (the
/// orchestrator decides whether they keep running).
///
/// Recovery, and with it every change, waits for `start`: a controller that is not the leader
/// serves Probe as a healthy standby and refuses changes as Unavailable.
pub async fn run(
    listener: tokio::net::UnixListener,
    service: Arc<Service>,
    shutdown: CancellationToken,
    start: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> Result<(), tonic::transport::Error> {
    let recovering = {
        let s = service.clone();
        tokio::spawn(async move {
            start.await;
            s.set_leading();
            if let Err(e) = s.recover().await {
                tracing::error!(error = %e, "recovery failed");
            }
        })
    };
    let identity = csi::Identity { service: service.clone() };
    let controller = csi::Controller { service: service.clone() };
    let group = csi::GroupController { service: service.clone() };
    let admin = admin::Admin { service: service.clone() };
    // Kubelets before 1.26 send the socket path as :authority; csi_proto::uds makes it valid.
    let incoming = csi_proto::uds::incoming(listener);
    let res = tonic::transport::Server::builder()
        .add_service(csi_proto::v1::identity_server::IdentityServer::new(identity))
        .add_service(csi_proto::v1::controller_server::ControllerServer::new(controller))
        .add_service(csi_proto::v1::group_controller_server::GroupControllerServer::new(group))
        .add_service(admin::pb::admin_server::AdminServer::new(admin))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await;
    recovering.abort();
    service.shutdown().await;
    res
}
