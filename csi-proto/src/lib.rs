//! The Container Storage Interface, spec v1.12.0: messages, the Identity, Controller,
//! GroupController and Node services, and their tonic clients and servers.
//!
//! The definition lives in `proto/csi.proto`, written from the spec with the wire format unchanged
//! (names, field numbers, types), and is compiled at build time by protox + tonic-prost-build.
//! [`uds`] serves gRPC on unix sockets to kubelets that send the socket path as `:authority`.

/// Package `csi.v1`.
#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

pub mod uds;

/// The CSI spec version this crate implements.
pub const CSI_SPEC_VERSION: &str = "1.12.0";

/// A gRPC channel to a CSI endpoint on a unix socket (`/path` or `unix:///path`), as the
/// Kubernetes sidecars reach a driver. Connects lazily: the first call fails if nothing listens.
pub fn unix_channel(path: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = std::path::PathBuf::from(path.strip_prefix("unix://").unwrap_or(path));
    // The URI is required by the API but unused: the connector ignores it.
    let endpoint = tonic::transport::Endpoint::from_static("http://csi.invalid");
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    })))
}

/// The name Barnacle's CSI driver registers under (GetPluginInfo, CSIDriver, StorageClass).
pub const DRIVER_NAME: &str = "csi.barnacle.dev";
/// Topology key naming a node: the node plugin reports it, the controller places replicas by it.
pub const TOPOLOGY_NODE: &str = "topology.barnacle.dev/node";
/// Topology key naming a zone (the well-known Kubernetes label).
pub const TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// The plugin's capabilities, one list for both sockets. The controller and the node plugin are
/// one CSI plugin, and GetPluginCapabilities describes the plugin, not the socket that answers: a
/// CO (or a conformance suite) that asks only the node socket must still learn that the plugin
/// has a Controller service, or it skips the lifecycle of real volumes.
pub fn plugin_capabilities() -> Vec<v1::PluginCapability> {
    use v1::plugin_capability::{Service, Type, VolumeExpansion, service, volume_expansion};
    let service = |t: service::Type| Type::Service(Service { r#type: t as i32 });
    [
        service(service::Type::ControllerService),
        service(service::Type::GroupControllerService),
        service(service::Type::VolumeAccessibilityConstraints),
        Type::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 }),
    ]
    .into_iter()
    .map(|t| v1::PluginCapability { r#type: Some(t) })
    .collect()
}
