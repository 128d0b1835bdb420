//! Registration with the kubelet, built in (the role of the kubernetes-csi node-driver-registrar
//! sidecar): a socket in the kubelet's `plugins_registry` directory serving the kubelet's plugin
//! registration API. The kubelet's plugin watcher finds it, asks GetInfo (driver name, CSI
//! endpoint, versions), registers the driver, calls NodeGetInfo on the CSI endpoint, and reports
//! the outcome with NotifyRegistrationStatus. Removing the socket deregisters the driver.
//!
//! Like the CSI socket, this one is served through [`csi_proto::uds`]: kubelets before 1.26 send
//! the socket path as `:authority`.

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// The kubelet's plugin registration API, v1.
#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod pb {
    tonic::include_proto!("pluginregistration");
}

/// CSI versions the driver speaks, as the kubelet asks (it needs one of 1.x).
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];

/// What the kubelet is told.
#[derive(Debug, Clone)]
pub struct Registration {
    pub driver: String,
    /// The CSI socket as a path on the node (the kubelet dials it), which may differ from the
    /// path inside this container.
    pub endpoint: String,
    /// Fired when the kubelet reports a failed registration: the plugin then exits, so it is
    /// restarted and the kubelet tries again with a new socket (as the sidecar does).
    pub failed: CancellationToken,
}

#[tonic::async_trait]
impl pb::registration_server::Registration for Registration {
    async fn get_info(
        &self,
        _: tonic::Request<pb::InfoRequest>,
    ) -> Result<tonic::Response<pb::PluginInfo>, tonic::Status> {
        info!(driver = %self.driver, endpoint = %self.endpoint, "the kubelet asked for the plugin's registration info");
        Ok(tonic::Response::new(pb::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: self.driver.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: tonic::Request<pb::RegistrationStatus>,
    ) -> Result<tonic::Response<pb::RegistrationStatusResponse>, tonic::Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            info!(driver = %self.driver, "registered with the kubelet");
        } else {
            error!(driver = %self.driver, error = %status.error, "the kubelet refused the registration; exiting so a restart retries it");
            self.failed.cancel();
        }
        Ok(tonic::Response::new(pb::RegistrationStatusResponse {}))
    }
}

/// The registration socket's path in `dir`: `<driver>-reg.sock`, as the kubelet expects.
pub fn socket_path(dir: &Path, driver: &str) -> PathBuf {
    dir.join(format!("{driver}-reg.sock"))
}

/// Serves `registration` on `listener` until `shutdown` fires, then removes the socket at `path`
/// (which deregisters the driver).
pub async fn serve(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    registration: Registration,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let res = tonic::transport::Server::builder()
        .add_service(pb::registration_server::RegistrationServer::new(registration))
        .serve_with_incoming_shutdown(csi_proto::uds::incoming(listener), shutdown.cancelled())
        .await;
    let _ = std::fs::remove_file(&path);
    res
}
