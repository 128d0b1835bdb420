//! The CSI Identity and Node services: a thin adapter that validates and converts each request,
//! calls the [`NodeService`], and converts back. Errors become gRPC codes in [`status`] only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use csi::node_service_capability::rpc::Type as Rpc;
use csi::volume_capability::access_mode::Mode;
use csi_proto::v1 as csi;
use tonic::{Request, Response, Status};

use crate::error::NodeError;
use crate::service::{Capability, FILESYSTEMS, NodeService, Publish, Stage, Usage};

pub use csi_proto::{DRIVER_NAME, TOPOLOGY_NODE, TOPOLOGY_ZONE};

/// The one place node errors become gRPC statuses.
pub fn status(e: NodeError) -> Status {
    let msg = e.to_string();
    match e {
        NodeError::InvalidArgument(_) => Status::invalid_argument(msg),
        NodeError::NotFound(_) => Status::not_found(msg),
        NodeError::AlreadyExists(_) => Status::already_exists(msg),
        NodeError::FailedPrecondition(_) => Status::failed_precondition(msg),
        NodeError::Aborted(_) => Status::aborted(msg),
        NodeError::OutOfRange(_) => Status::out_of_range(msg),
        NodeError::Unavailable(_) => Status::unavailable(msg),
        NodeError::Internal(_) => Status::internal(msg),
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() { Err(invalid(format!("{field} is required"))) } else { Ok(value) }
}

fn path(field: &str, value: &str) -> Result<PathBuf, Status> {
    let p = PathBuf::from(required(field, value)?);
    if !p.is_absolute() {
        return Err(invalid(format!("{field} must be an absolute path")));
    }
    Ok(p)
}

/// A supported capability, or InvalidArgument naming what is not.
fn capability(c: Option<&csi::VolumeCapability>) -> Result<Capability, Status> {
    let c = c.ok_or_else(|| invalid("volume_capability is required"))?;
    let mode =
        c.access_mode.as_ref().ok_or_else(|| invalid("volume_capability.access_mode is required"))?.mode;
    let single_writer = match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly | Mode::SingleNodeMultiWriter) => false,
        Ok(Mode::SingleNodeSingleWriter) => true,
        Ok(m) => {
            return Err(invalid(format!("access mode {} is not supported: one node only", m.as_str_name())));
        }
        Err(_) => return Err(invalid(format!("access mode {mode} is not a CSI access mode"))),
    };
    match &c.access_type {
        Some(csi::volume_capability::AccessType::Block(_)) => Ok(Capability {
            block: true,
            fs_type: None,
            mount_flags: Vec::new(),
            single_writer,
            mount_group: None,
        }),
        Some(csi::volume_capability::AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && !FILESYSTEMS.contains(&m.fs_type.as_str()) {
                return Err(invalid(format!("fsType {} is not supported (ext4 or xfs)", m.fs_type)));
            }
            let mount_group =
                match m.volume_mount_group.as_str() {
                    "" => None,
                    g => Some(g.parse::<u32>().map_err(|_| {
                        invalid(format!("volume_mount_group {g:?} is not a numeric group id"))
                    })?),
                };
            Ok(Capability {
                block: false,
                fs_type: Some(m.fs_type.clone()).filter(|f| !f.is_empty()),
                mount_flags: m.mount_flags.clone(),
                single_writer,
                mount_group,
            })
        }
        None => Err(invalid("volume_capability has neither block nor mount")),
    }
}

/// The Identity service of the node plugin.
#[derive(Debug)]
pub struct Identity {
    pub service: Arc<NodeService>,
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // The plugin's, not this socket's: the same list as the controller's.
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: csi_proto::plugin_capabilities(),
        }))
    }

    async fn probe(&self, _: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

/// The Node service.
#[derive(Debug)]
pub struct Node {
    pub service: Arc<NodeService>,
}

impl Node {
    /// NotFound unless the volume is attached on this node. The spec's tables put NOT_FOUND (the
    /// volume) before a malformed path, so RPCs that name an existing volume check this first.
    async fn attached(&self, volume_id: &str) -> Result<(), Status> {
        match self.service.attacher().find_async(volume_id).await {
            Some(_) => Ok(()),
            None => Err(Status::not_found(format!("volume {volume_id} is not attached on this node"))),
        }
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required("volume_id", &r.volume_id)?.to_owned();
        let staging_path = path("staging_target_path", &r.staging_target_path)?;
        let capability = capability(r.volume_capability.as_ref())?;
        if !r.publish_context.contains_key("nbdSocket") {
            return Err(invalid("publish_context has no nbdSocket: was the volume published to this node?"));
        }
        self.service
            .stage(Stage {
                volume_id,
                staging_path,
                capability,
                publish_context: r.publish_context,
                volume_context: r.volume_context,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required("volume_id", &r.volume_id)?;
        let staging = path("staging_target_path", &r.staging_target_path)?;
        self.service.unstage(volume_id, &staging).await.map_err(status)?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required("volume_id", &r.volume_id)?.to_owned();
        let staging_path = path("staging_target_path", &r.staging_target_path)?;
        let target_path = path("target_path", &r.target_path)?;
        let capability = capability(r.volume_capability.as_ref())?;
        let readonly = r.readonly || r.publish_context.get("readonly").is_some_and(|v| v == "true");
        self.service
            .publish(Publish { volume_id, staging_path, target_path, capability, readonly })
            .await
            .map_err(status)?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required("volume_id", &r.volume_id)?;
        let target = path("target_path", &r.target_path)?;
        self.service.unpublish(volume_id, &target).await.map_err(status)?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required("volume_id", &r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        self.attached(volume_id).await?;
        let volume_path = path("volume_path", &r.volume_path)?;
        let (usage, problem) = self.service.stats(volume_id, &volume_path).await.map_err(status)?;
        let i = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        use csi::volume_usage::Unit;
        let usage = match usage {
            Usage::Filesystem { bytes_total, bytes_available, bytes_used, inodes_total, inodes_free } => {
                vec![
                    csi::VolumeUsage {
                        available: i(bytes_available),
                        total: i(bytes_total),
                        used: i(bytes_used),
                        unit: Unit::Bytes as i32,
                    },
                    csi::VolumeUsage {
                        available: i(inodes_free),
                        total: i(inodes_total),
                        used: i(inodes_total.saturating_sub(inodes_free)),
                        unit: Unit::Inodes as i32,
                    },
                ]
            }
            Usage::Block { bytes_total } => {
                vec![csi::VolumeUsage {
                    available: 0,
                    total: i(bytes_total),
                    used: 0,
                    unit: Unit::Bytes as i32,
                }]
            }
        };
        let volume_condition = Some(match problem {
            Some(message) => csi::VolumeCondition { abnormal: true, message },
            None => {
                csi::VolumeCondition { abnormal: false, message: "attached and its engine answers".into() }
            }
        });
        Ok(Response::new(csi::NodeGetVolumeStatsResponse { usage, volume_condition }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let volume_id = required("volume_id", &r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        self.attached(volume_id).await?;
        let volume_path = path("volume_path", &r.volume_path)?;
        let required_bytes = r.capacity_range.map_or(0, |c| c.required_bytes);
        let required_bytes =
            u64::try_from(required_bytes).map_err(|_| invalid("required_bytes must not be negative"))?;
        if let Some(c) = r.volume_capability.as_ref() {
            capability(Some(c))?;
        }
        let size = self.service.expand(volume_id, &volume_path, required_bytes).await.map_err(status)?;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let rpcs = [
            Rpc::StageUnstageVolume,
            Rpc::GetVolumeStats,
            Rpc::ExpandVolume,
            Rpc::VolumeCondition,
            Rpc::SingleNodeMultiWriter,
            Rpc::VolumeMountGroup,
        ];
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: rpcs
                .into_iter()
                .map(|t| csi::NodeServiceCapability {
                    r#type: Some(csi::node_service_capability::Type::Rpc(
                        csi::node_service_capability::Rpc { r#type: t as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let cfg = &self.service.cfg;
        let mut segments = HashMap::from([(TOPOLOGY_NODE.to_owned(), cfg.node_id.clone())]);
        if let Some(z) = &cfg.zone {
            segments.insert(TOPOLOGY_ZONE.to_owned(), z.clone());
        }
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: cfg.node_id.clone(),
            max_volumes_per_node: cfg.max_volumes,
            accessible_topology: Some(csi::Topology { segments }),
        }))
    }
}
