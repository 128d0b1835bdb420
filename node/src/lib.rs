//! Barnacle node plugin: the CSI Identity and Node services (stage, publish, stats, expansion
//! with real mounts), and the userspace NBD attach used where the kernel has no nbd module.
//!
//! - [`csi`]: the gRPC adapter (validation, conversion, error codes);
//! - [`service`]: the operations, under a per-volume guard, idempotent from the kernel's state;
//! - [`attach`]: a volume's NBD export as a block device (FUSE file + loop device here);
//! - [`fuse`] and [`nbd_client`]: the `barnacle-nbd-fuse` helper's filesystem and NBD client;
//! - [`host`]: the check (and fix) that the host path shared with the host is a shared mount;
//! - [`registration`]: registration with the kubelet (the node-driver-registrar's role);
//! - [`sys`]: mounts, loop devices, signatures and the external tools.

pub mod attach;
pub mod csi;
pub mod error;
pub mod fuse;
pub mod host;
pub mod kernel_nbd;
pub mod nbd_client;
pub mod registration;
pub mod service;
pub mod sys;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use error::NodeError;

/// Serves the Identity and Node services on `listener` until `shutdown` fires.
pub async fn run(
    listener: tokio::net::UnixListener,
    service: Arc<service::NodeService>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    // Kubelets before 1.26 send the socket path as :authority; csi_proto::uds makes it valid.
    let incoming = csi_proto::uds::incoming(listener);
    tonic::transport::Server::builder()
        .add_service(csi_proto::v1::identity_server::IdentityServer::new(csi::Identity {
            service: service.clone(),
        }))
        .add_service(csi_proto::v1::node_server::NodeServer::new(csi::Node { service }))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
}
